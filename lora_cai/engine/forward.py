"""Batched forward passes over token sequences with left padding, for log-probs (judges, capability, serve)."""

from __future__ import annotations

from typing import Any, Iterator

from lora_cai.engine.generation import is_oom, model_device

# --------------------------------------------------------------------------------------------------
# Plain forward passes over padded batches (judges, the capability probe)
# --------------------------------------------------------------------------------------------------

def forward_batches(model, sequences: list[list[int]], batches: list[list[int]], *, pad_id: int, side: str = "left",
                    logits_to_keep: int = 0) -> Iterator[tuple[list[int], Any]]:
    """Run `model` on each batch of `sequences` (token id lists), padded; yield `(indices, logits)` per batch.

    `side="left"` puts every row's last token at the last position and passes explicit position ids, so each
    padded row computes exactly what it would alone (a judge reads the last position: `logits_to_keep=1`);
    `side="right"` keeps real tokens at their own positions (the causal mask keeps padding out of them). Runs
    under `torch.no_grad()` in whatever mode the model is in. On out-of-memory a batch is halved and retried,
    so the yielded batches may be smaller than the planned ones; a single row that does not fit re-raises.
    """
    import torch

    device = model_device(model)
    pending = [list(b) for b in batches if b]
    while pending:
        batch = pending.pop(0)
        width = max(len(sequences[i]) for i in batch)
        rows, masks = [], []
        for i in batch:
            n = width - len(sequences[i])
            rows.append([pad_id] * n + sequences[i] if side == "left" else sequences[i] + [pad_id] * n)
            masks.append([0] * n + [1] * len(sequences[i]) if side == "left" else [1] * len(sequences[i]) + [0] * n)
        input_ids = torch.tensor(rows, dtype=torch.long, device=device)
        mask = torch.tensor(masks, dtype=torch.long, device=device)
        kwargs: dict[str, Any] = {"attention_mask": mask, "use_cache": False}
        if side == "left":
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        if logits_to_keep:
            kwargs["logits_to_keep"] = logits_to_keep
        try:
            with torch.no_grad():
                logits = model(input_ids=input_ids, **kwargs).logits
        except Exception as e:  # out of memory: halve the batch and keep going
            if not is_oom(e) or len(batch) == 1:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            half = len(batch) // 2
            pending[:0] = [batch[:half], batch[half:]]
            continue
        yield batch, logits
