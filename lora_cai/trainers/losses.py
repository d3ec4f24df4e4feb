"""The preference objectives' names and losses, soft labels, and the rows each objective trains on."""

from __future__ import annotations

from lora_cai.errors import UserError

SOFT_LABELS = ("off", "weight", "target")
OBJECTIVE_NAMES = {"sigmoid": "DPO", "ipo": "IPO", "robust": "robust DPO", "hinge": "SLiC", "apo_zero": "APO",
                   "kto": "KTO", "simpo": "SimPO", "orpo": "ORPO"}


def trl_objective(settings) -> dict:
    """DPOConfig's arguments for `dpo.loss`: TRL reads one `beta` for every loss of the family, so each objective's
    own setting goes there (IPO's tau), and robust DPO's flip rate is TRL's `label_smoothing`."""
    loss = getattr(settings, "loss", "sigmoid")
    return {"loss_type": [loss], "beta": settings.ipo_tau if loss == "ipo" else settings.beta,
            "label_smoothing": settings.flip_rate if loss == "robust" else 0.0}


def preference_losses(loss: str, chosen_logratios, rejected_logratios, p_chosen, mode: str, *, beta: float,
                      lengths=None, flip_rate: float = 0.0):
    """Per-pair losses of the DPO-family objective `loss` with soft labels `mode`, as TRL 1.15 computes them at p = 1.

    With m = chosen - rejected log-ratio and p the pair's judged probability:
    sigmoid -logsigmoid(beta m); ipo (h - 1/(2 tau))^2 with h the log-ratio margin per completion token
    (`lengths`: chosen and rejected completion token counts) and tau passed as `beta`; robust
    [-(1-e) logsigmoid(beta m) + e logsigmoid(-beta m)] / (1 - 2e); hinge relu(1 - beta m); apo_zero
    (1 - sigmoid(beta c)) + sigmoid(beta r). `weight` multiplies any of them by 2p - 1; `target` replaces the
    label by p: sigmoid -p logsigmoid(beta m) - (1-p) logsigmoid(-beta m), ipo (h - (2p-1)/(2 tau))^2.
    """
    import torch
    import torch.nn.functional as F

    m = chosen_logratios - rejected_logratios
    p = p_chosen.to(m.dtype) if p_chosen is not None else torch.ones_like(m)
    target = mode == "target"
    if loss == "sigmoid":
        z = beta * m
        per = -p * F.logsigmoid(z) - (1 - p) * F.logsigmoid(-z) if target else -F.logsigmoid(z)
    elif loss == "ipo":
        chosen_len, rejected_len = lengths
        h = chosen_logratios / chosen_len.clamp(min=1.0) - rejected_logratios / rejected_len.clamp(min=1.0)
        per = (h - ((2 * p - 1) if target else 1.0) / (2 * beta)) ** 2
    elif loss == "robust":
        per = (-(1 - flip_rate) * F.logsigmoid(beta * m) + flip_rate * F.logsigmoid(-beta * m)) / (1 - 2 * flip_rate)
    elif loss == "hinge":
        per = torch.relu(1 - beta * m)
    elif loss == "apo_zero":
        per = (1 - torch.sigmoid(beta * chosen_logratios)) + torch.sigmoid(beta * rejected_logratios)
    else:
        raise ValueError(f"dpo.loss {loss!r} is not one of sigmoid, ipo, robust, hinge, apo_zero")
    if target and loss not in ("sigmoid", "ipo"):
        raise ValueError(f"soft_labels target is not defined for dpo.loss {loss}")
    return (2 * p - 1) * per if mode == "weight" else per


def pair_rows(pairs: list[dict], soft_labels: str = "off") -> list[dict]:
    """Pairs as TRL's conversational preference rows: prompt, chosen and rejected as chat turns, and with soft labels
    each pair's checked `p_chosen`."""
    rows = [{"prompt": [{"role": "user", "content": p["prompt"]}],
             "chosen": [{"role": "assistant", "content": p["chosen"]}],
             "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs]
    if soft_labels != "off":
        for row, p in zip(rows, pairs):
            row["p_chosen"] = _pair_probability(p)
    return rows


def _soft_weights(p, mode: str):
    """Per-pair loss weights for soft labels `mode`: 2p - 1 under `weight`, else None (no weighting)."""
    return 2 * p - 1 if mode == "weight" else None


def _pair_probability(pair: dict) -> float:
    p = float(pair.get("p_chosen", 1.0))
    if not 0.5 <= p <= 1.0:  # NaN fails this too
        raise UserError(f"pairs.jsonl: pair {pair.get('id')} has p_chosen={p}, outside [0.5, 1]; rebuild the pairs "
                        f"(delete the round's pairs.jsonl and rerun) or set dpo.soft_labels: off")
    return p


def kto_examples(pairs: list[dict]) -> list[dict]:
    """Each pair's winner as a desirable answer and its loser as an undesirable one (KTO needs no pairing), both
    carrying the pair's `p_chosen` (1.0 when it has none); an answer met twice with the same label is kept once,
    with its first pair's p."""
    seen, out = set(), []
    for p in pairs:
        for completion, label in ((p["chosen"], True), (p["rejected"], False)):
            if (p["prompt"], completion, label) in seen:
                continue
            seen.add((p["prompt"], completion, label))
            out.append({"id": p.get("id"), "prompt": p["prompt"], "completion": completion, "label": label,
                        "p_chosen": float(p.get("p_chosen", 1.0))})
    return out


def kto_weights(n_desirable: int, n_undesirable: int) -> tuple[float, float]:
    """(desirable_weight, undesirable_weight) from the counts, as the KTO paper and TRL advise: the weighted
    desirable mass over the undesirable one kept within [1, 4/3] (undesirable weight 1)."""
    if not n_desirable or not n_undesirable:
        return 1.0, 1.0
    ratio = min(max(n_desirable / n_undesirable, 1.0), 4 / 3)
    return ratio * n_undesirable / n_desirable, 1.0
