"""The train stage: the round's SFT then preference training on its stacked policy, fitted to the GPU's memory."""

from __future__ import annotations

from lora_cai.engine.models import barrier, rank, world_size
from lora_cai.errors import UserError
from lora_cai.trainers.common import summarize, write_log
from lora_cai.trainers.dpo import train_preferences
from lora_cai.trainers.losses import OBJECTIVE_NAMES
from lora_cai.trainers.sft import sft_training_records, train_sft
from lora_cai.core.inputs import MODEL, Decl, If
from lora_cai.core.layout import ADAPTER
from lora_cai.core.stage import Stage

# --------------------------------------------------------------------------------------------------
# The round's training stage
# --------------------------------------------------------------------------------------------------

class StopBeforeTrain(Exception):
    """Raised where a round's training would start under --stop-before train."""


def per_process(settings, world: int):
    """The recipe's effective batch split over `world` processes (grad_accum divided where it divides)."""
    if world > 1 and settings.grad_accum % world == 0:
        return settings.model_copy(update={"grad_accum": settings.grad_accum // world})
    return settings


def fit_to_gpu(cfg, settings, stage: str, console=None, *, earlier_rounds: int = 0, objective: str = "sigmoid"):
    """On a GPU, the recipe's batch for `stage` shrunk (accumulation raised) to fit vram_gb by the planner, for a
    round with `earlier_rounds` adapters in memory."""
    import torch

    from lora_cai.core import inputs
    from lora_cai.engine.offline_models import resolve_model_path
    from lora_cai.engine.planner import fit_batch, load_model_config

    if not torch.cuda.is_available():
        return settings  # no VRAM budget to fit on a CPU
    try:
        name = resolve_model_path(cfg.model.name)
        # Reads the model, lora, the stage's batch and length, and vram_gb through the stage's view: all declared
        # by the train stage, and recorded like every other read.
        fitted = fit_batch(cfg, settings, stage, load_model_config(name), earlier_rounds=earlier_rounds,
                           objective=objective)
    except UserError as e:
        if console is not None:
            console.log(f"planner: {e}; keeping the recipe's {stage} batch")
        return settings
    if fitted is None:
        return settings
    if console is not None:
        console.log(f"planner: {stage} batch {settings.batch_size} x accumulation {settings.grad_accum} -> "
                    f"{fitted[0]} x {fitted[1]} to fit vram_gb={cfg.vram_gb:g}")
    # A copy with the new split, read through the stage's view like the recipe's own settings.
    update = {"batch_size": fitted[0], "grad_accum": fitted[1]}
    return settings.replaced(**update) if isinstance(settings, inputs.View) else settings.model_copy(update=update)


def train_stage(ctx, inp, *, stop_before: bool = False):
    """SFT then the preference objective (dpo.loss; skipped at dpo.epochs 0) of round k's new adapter on sft.jsonl
    and pairs.jsonl (under ORPO, SFT keeps the records no pair covers: `sft_training_records`); resumes from checkpoints.

    Under `accelerate launch -m lora_cai.train` every process trains its shard of each batch and only the main
    one writes; the effective batch of the recipe is kept where grad_accum divides by the number of processes
    (the input hash is the recipe's, so a later single-process rerun of the recipe finds this training done).
    `stop_before` (--stop-before train) raises `StopBeforeTrain` where training would start.
    """
    import shutil
    import time

    from lora_cai.core.layout import round_dir
    from lora_cai.core.stage import Done, peak_memory
    from lora_cai.core.store import atomic_write_json, read_json, read_jsonl, write_jsonl_atomic
    from lora_cai.data.sources import mix_helpful
    from lora_cai.engine import models

    cfg, k, rd, done = ctx.cfg, ctx.k, ctx.dir, Done()
    adapter, record = rd / "adapter", rd / "train.json"
    main, world = rank() == 0, world_size()
    if not (record.exists() and read_json(record).get("inputs") == inp.hash
            and (adapter / "adapter_model.safetensors").exists()):
        if stop_before:
            raise StopBeforeTrain(k)
        done.ran = True
        t0 = time.perf_counter()
        pairs = read_jsonl(rd / "pairs.jsonl")
        objective = cfg.dpo.loss
        sft = sft_training_records(objective, mix_helpful(read_jsonl(rd / "sft.jsonl"), ctx.data.helpful,
                                                    cfg.sft.helpful_fraction, cfg.seed + k), pairs)
        fit = dict(earlier_rounds=len(ctx.stack), objective=objective)
        sft_cfg = per_process(fit_to_gpu(cfg, cfg.sft, "sft", ctx.console, **fit), world)
        dpo_cfg = per_process(fit_to_gpu(cfg, cfg.dpo, "dpo", ctx.console, **fit), world)
        ckpt = rd / "checkpoints"
        if main:
            if (ckpt / "inputs.json").exists() and read_json(ckpt / "inputs.json").get("inputs") != inp.hash:
                shutil.rmtree(ckpt)  # checkpoints of other inputs: stale
            atomic_write_json(ckpt / "inputs.json", {"inputs": inp.hash})
        barrier(world)
        model, tokenizer = ctx.models.for_training(cfg, k, ctx.stack)
        frozen = ctx.models.frozen
        log_kw = {"report_to": list(cfg.report_to), "logging_dir": ctx.run_dir / "logs" / round_dir(k)}
        sft_done = ckpt / "sft-adapter"
        # SFT is off when switched off or when ORPO's likelihood term covers every record; the preference stage
        # when switched off (dpo.epochs 0: SFT alone) or when the round has no pairs.
        run_sft, run_prefs = cfg.sft.epochs > 0 and bool(sft), cfg.dpo.epochs > 0 and bool(pairs)
        if not (run_sft or run_prefs):
            raise UserError(f"round {k}: sft.epochs is 0 (or ORPO left SFT nothing) and the round has no preference "
                            f"pairs to train on, so nothing would train its adapter; set sft.epochs above 0 or make "
                            f"pairs (pairs.builder)")
        with peak_memory(done.summary, "train"):
            if not run_sft:
                sft_log = []
            elif (sft_done / "adapter_model.safetensors").exists():  # SFT finished before a crash: keep it
                models.load_trainable_weights(model, sft_done, frozen)
                sft_log = read_jsonl(ckpt / "sft_log.jsonl")
            else:
                sft_log = train_sft(model, tokenizer, sft, sft_cfg, ckpt / "sft", seed=cfg.seed + k, frozen=frozen,
                                    console=ctx.console, desc=f"round {k} SFT", **log_kw)
                if main:
                    write_log(ckpt / "sft_log.jsonl", sft_log)
                    models.save_adapter(model, sft_done)
                barrier(world)
            dpo_log, ref = [], []
            if run_prefs:
                dpo_log, ref = train_preferences(model, tokenizer, pairs, dpo_cfg, ckpt / "dpo", seed=cfg.seed + k,
                                                 frozen=frozen, console=ctx.console,
                                                 desc=f"round {k} {OBJECTIVE_NAMES[objective]}", **log_kw)
        if main:
            write_jsonl_atomic(rd / "ref_logps.jsonl", ref)
            write_log(rd / "sft_log.jsonl", sft_log)
            write_log(rd / "dpo_log.jsonl", dpo_log)
            models.save_adapter(model, adapter)
            atomic_write_json(record, {"inputs": inp.hash, "sft": summarize(sft_log), "dpo": summarize(dpo_log),
                                       "objective": objective})
        barrier(world)
        done.timing = _training_timing(time.perf_counter() - t0, sft_log, dpo_log)
    summary = read_json(record)
    if main:
        shutil.rmtree(rd / "checkpoints", ignore_errors=True)  # the adapter and train.json are committed
    done.summary.update(sft=summary["sft"], dpo=summary["dpo"], objective=summary.get("objective", "sigmoid"))
    done.outputs = adapter
    return done


TRAIN_STAGE = Stage(
    "train", train_stage, files=("checkpoints", "train.json", ADAPTER, "ref_logps.jsonl", "sft_log.jsonl", "dpo_log.jsonl"),
    stops_before=True, frees_teacher=True,
    reads=Decl(settings=(*MODEL, "lora.r", "lora.alpha", "lora.dropout", "lora.target_modules", "seed", "vram_gb",
                         "sft.learning_rate", "sft.epochs", "sft.batch_size", "sft.grad_accum", "sft.max_length",
                         If(lambda c: c.dpo.loss not in ("ipo", "simpo", "orpo"), "dpo.beta"), "dpo.learning_rate",
                         "dpo.epochs", "dpo.batch_size", "dpo.grad_accum", "dpo.max_length", "dpo.soft_labels",
                         "dpo.loss",  # each objective's own settings where it reads them:
                         If(lambda c: c.dpo.loss == "ipo", "dpo.ipo_tau"),
                         If(lambda c: c.dpo.loss == "robust", "dpo.flip_rate"),
                         If(lambda c: c.dpo.loss == "simpo", "dpo.simpo_beta", "dpo.simpo_gamma"),
                         If(lambda c: c.dpo.loss == "orpo", "dpo.orpo_lambda")),
               data=("helpful",), after=("judge",),
               uses=("model.trust_remote_code", "sft.save_steps", "dpo.save_steps", "report_to",
                     "sft.helpful_fraction")))


def _training_timing(seconds: float, sft_log: list[dict], dpo_log: list[dict]) -> dict:
    """The stage's wall seconds and each trainer's optimizer steps per second (its own runtime, this process)."""
    out: dict = {"seconds": round(seconds, 1)}
    for name, log in (("sft", sft_log), ("dpo", dpo_log)):
        end = next((h for h in reversed(log) if "train_runtime" in h), None)
        steps = max((int(h["step"]) for h in log if "step" in h), default=0)
        if end and end["train_runtime"] > 0 and steps:
            out[f"{name}_steps_per_s"] = round(steps / end["train_runtime"], 3)
    return out
