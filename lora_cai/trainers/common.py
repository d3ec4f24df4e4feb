"""TRL plumbing shared by every trainer: arguments, precision, logging, resumable checkpoints, progress."""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

from lora_cai.engine.models import TRAINABLE, active_adapters, barrier, rank, set_active, world_size
from lora_cai.errors import UserError


def _precision_args(model) -> dict:
    """The trainers' mixed precision follows the dtype the model was loaded in (`models.pick_dtype`, the one rule):
    bf16 for bfloat16, fp16 (with its gradient scaler) for float16, neither for float32; none on a CPU."""
    import torch

    if not torch.cuda.is_available():
        return {"bf16": False, "fp16": False, "use_cpu": True}
    dtype = getattr(model.config, "dtype", None) or getattr(model.config, "torch_dtype", None)
    return {"bf16": dtype == torch.bfloat16, "fp16": dtype == torch.float16}


# Loggers TRL/Transformers can report to: the package that must be importable, and the environment
# variable (with its value under `logging_dir`) that points the logger's files there. Transformers 5 has no
# `logging_dir` argument any more; each integration reads its own variable instead.
_LOGGERS = {
    "tensorboard": ("tensorboard", "TENSORBOARD_LOGGING_DIR", "{dir}/tensorboard"),
    "wandb": ("wandb", "WANDB_DIR", "{dir}"),
    "mlflow": ("mlflow", "MLFLOW_TRACKING_URI", "file:{dir}/mlruns"),
    "trackio": ("trackio", "TRACKIO_DIR", "{dir}/trackio"),
}


def _report_to(report_to: str | Sequence[str]) -> list[str]:
    """`report_to` as TRL wants it (`[]` = none), after checking each logger is known and installed."""
    import importlib.util

    names = [] if report_to in ("none", None) else [report_to] if isinstance(report_to, str) else list(report_to)
    for name in names:
        if name not in _LOGGERS:
            raise UserError(f"report_to: unknown logger '{name}'; use any of {sorted(_LOGGERS)}")
        package = _LOGGERS[name][0]
        if importlib.util.find_spec(package) is None:
            raise UserError(f"report_to: {name} is not installed; pip install {package}, or remove it from report_to")
    return names


@contextlib.contextmanager
def _logging_dir(report_to: list[str], logging_dir: Path | None):
    """Point the chosen loggers' files under `logging_dir` while a trainer is built and runs.

    Variables the user set already win; the environment is restored afterwards.
    """
    added = []  # trackio reads TRACKIO_DIR once, when first imported: Transformers imports it while the trainer is built
    if logging_dir is not None:
        for name in report_to:
            _, var, value = _LOGGERS[name]
            if var not in os.environ:
                added.append(var)
                os.environ[var] = value.format(dir=Path(logging_dir).resolve())
    try:
        yield
    finally:
        for var in added:
            os.environ.pop(var, None)


def _common_args(settings, out_dir: Path, seed: int, model, report_to: str | Sequence[str] = "none") -> dict:
    import torch

    report_to = _report_to(report_to)
    return dict(
        output_dir=str(out_dir), learning_rate=settings.learning_rate, num_train_epochs=settings.epochs,
        per_device_train_batch_size=settings.batch_size, gradient_accumulation_steps=settings.grad_accum,
        max_length=settings.max_length, logging_steps=1, logging_nan_inf_filter=False,  # NaN must show, to stop
        save_strategy="steps", save_steps=settings.save_steps,
        save_total_limit=1, save_only_model=False, report_to=report_to or "none", seed=seed,
        data_seed=seed, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, optim="adamw_torch",
        gradient_checkpointing=torch.cuda.is_available(), disable_tqdm=True, dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # frozen adapters do not require grad, so DDP never waits on them
        **_precision_args(model),
    )


def _last_checkpoint(out_dir: Path) -> str | None:
    """The newest complete checkpoint under `out_dir`, or None.

    Transformers' `get_last_checkpoint` takes the highest-numbered folder, complete or not; a kill -9 inside a save
    leaves one without its adapter, and resuming from it fails. The Trainer writes `trainer_state.json` last, so a
    folder without it was cut off: it is removed (by the main process) and the one before it is used. The older
    complete one is still there then, since the Trainer deletes old checkpoints only after a save finished.
    """
    import re
    import shutil

    out = Path(out_dir)
    if not out.is_dir():
        return None
    steps = sorted((int(m.group(1)), p) for p in out.iterdir()
                   if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name)))
    for _, path in reversed(steps):
        if (path / "trainer_state.json").is_file():
            return str(path)
        if rank() == 0:
            shutil.rmtree(path, ignore_errors=True)
    return None


def _resumable(trainer_cls):
    """`trainer_cls` whose checkpoint resume restores the new adapter only, and the stack around it.

    Transformers' own resume loads every adapter folder of the checkpoint and re-activates the first
    active adapter alone, which for a stack is round 1's; here `default` is loaded from the checkpoint
    (the earlier adapters never change) and the stack re-activated.
    """

    class Resumable(trainer_cls):
        def __init__(self, *args, frozen_adapters: list[str], **kwargs):
            from lora_cai.engine.concat import concat_of

            self._frozen = list(frozen_adapters)
            with _adapter_stays_float32(kwargs["model"]):
                super().__init__(*args, **kwargs)
            if concat_of(self.accelerator.unwrap_model(self.model)) is not None and self.args.weight_decay:
                # The concatenation's gradient hook keeps Adam from moving the frozen slices; decoupled decay would shrink them.
                raise ValueError("weight decay would move the concatenated stack's frozen slices; keep weight_decay 0")

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            peft_model = self.accelerator.unwrap_model(model or self.model)
            weights = load_file(str(Path(resume_from_checkpoint) / "adapter_model.safetensors"))
            result = set_peft_model_state_dict(peft_model, weights, adapter_name=TRAINABLE)
            missing = [k for k in result.unexpected_keys if "lora_" in k]
            if missing:
                raise RuntimeError(f"checkpoint {resume_from_checkpoint} does not match the adapter: {missing[:3]}")
            set_active(peft_model, self._frozen + [TRAINABLE], trainable=TRAINABLE)

    Resumable.__name__ = f"Resumable{trainer_cls.__name__}"
    return Resumable


@contextlib.contextmanager
def _adapter_stays_float32(model):
    """Keep TRL's trainers from casting the adapter to bfloat16 while they are built.

    TRL 1.15's SFT and DPO trainers cast every trainable parameter of a 4-bit model to bfloat16 (the QLoRA paper's
    choice), keyed on `requires_grad`. Here the adapter keeps the dtype PEFT gave it (float32; on a GPU the
    trainer's autocast computes in half precision): the cast would round a concatenated stack's frozen slices (they share
    the tensor with the trainable slice), so the stack would change from round to round; it would make the CPU
    compute the LoRA branch in bfloat16 under a float32 model; and a T4 has no bfloat16.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _quiet(trainer) -> None:
    """Our progress bar replaces the Trainer's log printer (it prints every step's dict to stdout)."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)


def _check_stack(model, frozen: list[str], where: str) -> None:
    want = frozen + [TRAINABLE]
    if active_adapters(model) != want:
        raise RuntimeError(f"{where}: active adapters {active_adapters(model)} != {want}")
    for name, p in model.named_parameters():
        if "lora_" in name and p.requires_grad != (f".{TRAINABLE}." in name):
            raise RuntimeError(f"{where}: {name} requires_grad={p.requires_grad}")


def _progress_callback(console, desc: str):
    """A TrainerCallback drawing one rich progress bar (steps, loss, ETA) on the run's console."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from transformers import TrainerCallback

    class _RichSteps(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                     TimeRemainingColumn(), console=console, transient=False,
                                     disable=console is None)
            self.progress.start()
            self.task = self.progress.add_task(desc, total=state.max_steps, loss="-")

        def on_step_end(self, args, state, control, **kw):
            self.progress.update(self.task, completed=state.global_step)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                loss = float(logs["loss"])
                if not math.isfinite(loss):
                    # Raised before this step's checkpoint is written: the last one on disk is still good.
                    self.progress.stop()
                    good = _last_checkpoint(Path(args.output_dir))
                    raise UserError(f"{desc}: the loss became {loss} at step {state.global_step}; last good checkpoint: "
                                    f"{good or 'none (diverged before the first save)'}; lower the learning rate "
                                    f"and rerun")
                self.progress.update(self.task, loss=f"{loss:.4f}")

        def on_train_end(self, args, state, control, **kw):
            self.progress.stop()

    return _RichSteps()


def summarize(history: list[dict]) -> dict:
    """First and last value of each logged training metric, plus the step count."""
    out: dict = {"steps": 0}
    for h in history:
        if "loss" not in h:
            continue
        out["steps"] = int(h.get("step", out["steps"] + 1))
        for key in ("loss", "rewards/margins", "rewards/accuracies"):
            if key in h:
                out.setdefault(f"first_{key}", float(h[key]))
                out[f"last_{key}"] = float(h[key])
    return out


def write_log(path: Path, history: list[dict]) -> None:
    from lora_cai.core.store import write_jsonl_atomic

    write_jsonl_atomic(path, [json.loads(json.dumps(h, default=float)) for h in history])


class _WithPChosen:
    """A preference collator that also hands each batch's `p_chosen` (one float per pair) to the loss."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, examples):
        import torch

        batch = self.inner(examples)
        batch["p_chosen"] = torch.tensor([float(e["p_chosen"]) for e in examples], dtype=torch.float32)
        return batch


class _PChosenColumn:
    """Mixin for a TRL trainer (before it in the bases) that, with soft labels, keeps the dataset's `p_chosen` column:
    Trainer drops columns outside its signature and TRL's collators the ones they do not know, and the loss needs it."""

    _soft_labels = "off"

    def _keep_p_chosen(self):
        if self._soft_labels != "off":
            self.data_collator = _WithPChosen(self.data_collator)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self._soft_labels != "off" and "p_chosen" not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, "p_chosen"]


def _shared_dataset(ds, out_dir: Path):
    """`ds` itself, or under several processes a copy on disk all of them open.

    TRL caches the reference log-probs in a file beside the dataset's own, which for an in-memory dataset is a
    per-process temp dir: the other processes then cannot open the main one's file. On disk it is shared."""
    world = world_size()
    if world == 1:
        return ds
    import shutil

    from datasets import load_from_disk

    data_dir = Path(out_dir) / "data"
    if rank() == 0:
        shutil.rmtree(data_dir, ignore_errors=True)
        ds.save_to_disk(str(data_dir))
    barrier(world)
    return load_from_disk(str(data_dir))
