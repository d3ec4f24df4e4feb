"""LoRA SFT through TRL on a stacked policy: the new adapter trains, earlier ones stay frozen."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lora_cai.trainers.common import (
    _check_stack,
    _common_args,
    _last_checkpoint,
    _logging_dir,
    _progress_callback,
    _quiet,
    _resumable,
)
from lora_cai.trainers.logprob import install_logprob_fallback


def train_sft(model, tokenizer, records: list[dict], settings, out_dir: Path, *, seed: int, frozen: list[str],
              report_to: Sequence[str] = (), logging_dir: Path | None = None, console=None,
              desc: str = "SFT") -> list[dict]:
    """SFT of the `default` adapter on (prompt, revision) records; loss on the completion only.

    `report_to` names extra loggers (TRL's `report_to`; empty = none), whose files go under `logging_dir`.
    Returns TRL's log history (one dict per logged step).
    """
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    install_logprob_fallback()
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                             "completion": [{"role": "assistant", "content": r["completion"]}]} for r in records])
    args = SFTConfig(**_common_args(settings, out_dir, seed, model, report_to), completion_only_loss=True,
                     dataset_num_proc=None)
    with _logging_dir(args.report_to, logging_dir):
        trainer = _resumable(SFTTrainer)(model=model, args=args, train_dataset=ds, processing_class=tokenizer,
                                         callbacks=[_progress_callback(console, desc)], frozen_adapters=frozen)
        _quiet(trainer)
        _check_stack(model, frozen, "SFT")
        trainer.train(resume_from_checkpoint=_last_checkpoint(out_dir))
    _check_stack(model, frozen, "after SFT")
    return [dict(h) for h in trainer.state.log_history]


def sft_training_records(objective: str, records: list[dict], pairs: list[dict]) -> list[dict]:
    """What the round's SFT trains on: every record, except under ORPO, whose own likelihood term already trains
    each pair's winner: there SFT keeps the records no pair covers (helpful data, revisions left unpaired), so
    ORPO does not silently drop what keeps the policy helpful."""
    if objective != "orpo":
        return records
    won = {(p["prompt"], p["chosen"]) for p in pairs}
    return [r for r in records if (r["prompt"], r["completion"]) not in won]
