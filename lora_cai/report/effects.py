"""Per-category and per-principle effects in the report: tables, the principles x rounds heatmap, what each held-out
set measures.

Where the numbers come from: `round-k/eval.json`'s `by_category` (each category's rates, base and round k, the
paired change with its 95% interval and Holm's flag: `cai.effects.by_category`) and `violations_by_principle`
(rules that name a principle), `round-k/principles.json`'s `win_rates` (the per-principle stage), and the sets'
own descriptions (`sets`: a named set's package, version, drawn subset and what its rates measure).
"""

from __future__ import annotations

from pathlib import Path

from lora_cai.report.tables import NA, _dict, _number

HEATMAP = "principles.png"
MEASURES = {  # key -> (where, what a cell is, which direction is better)
    "win": ("principles.json", "win rate against the base", "higher"),
    "violations": ("eval.json", "change in rule violations against the base", "lower"),
}
RATE_LABELS = {"harmful_compliance": "harmful compliance", "over_refusal": "over-refusal"}


def _principles_of(run: dict, measure: str) -> dict[int, dict]:
    """{round: {principle: effect}} of one measure, for the rounds that have it."""
    out = {}
    for r in run["rounds"]:
        if measure == "win":
            table = _dict(_dict(r.get("principles")).get("win_rates"))
        else:
            table = _dict(_dict(r.get("eval")).get("violations_by_principle"))
        table = {name: e for name, e in table.items() if isinstance(e, dict)}
        if table:
            out[r["k"]] = table
    return out


def _order(run: dict, names: set[str]) -> list[str]:
    """The principles in the constitution's order where a per-principle record gives it, else by name."""
    seen: list[str] = []
    for r in run["rounds"]:
        for rec in _dict(r.get("principles")).get("records") or []:
            if isinstance(rec, dict) and rec.get("principle") in names and rec["principle"] not in seen:
                seen.append(rec["principle"])
    return seen + sorted(names - set(seen))


def principle_grid(run: dict, measure: str) -> dict | None:
    """{"measure", "principles", "rounds", "cells": {principle: {round: effect}}} or None when no round has it."""
    by_round = _principles_of(run, measure)
    if not by_round:
        return None
    names = {n for table in by_round.values() for n in table}
    cells = {n: {k: table[n] for k, table in by_round.items() if n in table} for n in names}
    return {"measure": measure, "principles": _order(run, names), "rounds": sorted(by_round), "cells": cells}


def _flag_mark(flag) -> str:
    return {"improved": " ▲ improved", "worsened": " ▼ worsened"}.get(flag, "")


def _cell(e: dict | None, measure: str) -> str:
    if not e:
        return NA
    low, high = _number(e.get("low")), _number(e.get("high"))
    if measure == "win":
        value = _number(e.get("win_rate"))
        if value is None:
            return NA
        return f"{100 * value:.0f}% ({100 * low:.0f} to {100 * high:.0f}, n {e.get('n')}){_flag_mark(e.get('flag'))}"
    base, rate, change = _number(e.get("base")), _number(e.get("rate")), _number(e.get("change"))
    if change is None:
        return NA
    return (f"{100 * base:.0f}% → {100 * rate:.0f}%: {100 * change:+.0f} pts ({100 * low:+.0f} to {100 * high:+.0f})"
            f"{_flag_mark(e.get('flag'))}")


def principle_table(grid: dict) -> tuple[list[str], list[list[str]]]:
    headers = ["principle"] + [f"round {k}" for k in grid["rounds"]]
    rows = [[name] + [_cell(grid["cells"][name].get(k), grid["measure"]) for k in grid["rounds"]]
            for name in grid["principles"]]
    return headers, rows


def heatmap_grid(run: dict) -> dict | None:
    """The grid the heatmap draws: the model judges' win rates where the per-principle stage ran, else the rules'
    violations."""
    return principle_grid(run, "win") or principle_grid(run, "violations")


def plot_principles(run: dict, path: Path) -> bool:
    """The principles x rounds heatmap (green: better than the base, red: worse; ▲ / ▼ where Holm's correction
    flags the change); False (nothing drawn) when no round has per-principle effects."""
    from lora_cai.report.plots import _figure, _save

    grid = heatmap_grid(run)
    if grid is None:
        return False
    names, rounds, win = grid["principles"], grid["rounds"], grid["measure"] == "win"
    import numpy as np

    values = np.full((len(names), len(rounds)), np.nan)
    for i, n in enumerate(names):
        for j, k in enumerate(rounds):
            e = grid["cells"][n].get(k) or {}
            v = _number(e.get("win_rate") if win else e.get("change"))
            if v is not None:
                values[i, j] = v - 0.5 if win else -v  # positive: better than the base
    span = 0.5 if win else max(0.1, float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 0.1)
    fig = _figure((2.2 + 1.3 * len(rounds), 1.2 + 0.38 * len(names)))
    ax = fig.add_subplot(1, 1, 1)
    from matplotlib import colormaps

    cmap = colormaps["RdYlGn"].with_extremes(bad="0.85")
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=-span, vmax=span, aspect="auto")
    for i, n in enumerate(names):
        for j, k in enumerate(rounds):
            e = grid["cells"][n].get(k) or {}
            if np.isnan(values[i, j]):
                text = "n/a"
            else:
                shown = e.get("win_rate") if win else e.get("change")
                text = f"{100 * shown:.0f}%" if win else f"{100 * shown:+.0f}"
                text += {"improved": " ▲", "worsened": " ▼"}.get(e.get("flag"), "")
            ax.text(j, i, text, ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(rounds)))
    ax.set_xticklabels([f"round {k}" for k in rounds])
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=8)
    ax.set_title("win rate against the base, by principle" if win else
                 "rule violations against the base, by principle (points)", fontsize=10)
    bar = fig.colorbar(image, ax=ax, fraction=0.05)
    ticks = [-span, -span / 2, 0.0, span / 2, span]
    bar.set_ticks(ticks)
    bar.set_ticklabels([f"{100 * (t + 0.5):.0f}%" for t in ticks] if win else [f"{-100 * t:+.0f}" for t in ticks])
    bar.set_label("win rate vs base" if win else "violations vs base (pts)")
    _save(fig, path)
    return True


def category_rows(run: dict, k: int | None) -> tuple[list[str], list[list[str]]] | None:
    """Round k's (the final round's) rates per category against the base, with how each category is counted."""
    ev = next((r["eval"] for r in run["rounds"] if r["k"] == k), None) if k else None
    cats = _dict(_dict(ev).get("by_category"))
    if not cats:
        return None
    sets = _dict(_dict(ev).get("sets"))
    headers = ["rate", "category", "counted as", "n", "base", f"round {k}", "change (95% CI)", "Holm flag"]
    rows = []
    for rate, table in cats.items():
        areas = _dict(_dict(sets.get("harmful" if rate == "harmful_compliance" else "benign")).get("areas"))
        for cat, e in _dict(table).items():
            e = _dict(e)
            counted = _dict(areas.get(cat)).get("counted") or RATE_LABELS.get(rate, rate)
            base, after, change = _number(e.get("base")), _number(e.get("rate")), _number(e.get("change"))
            rows.append([RATE_LABELS.get(rate, rate), cat, counted, str(e.get("n", NA)),
                         NA if base is None else f"{100 * base:.0f}%", NA if after is None else f"{100 * after:.0f}%",
                         NA if change is None else (f"{100 * change:+.0f} pts ({100 * e['low']:+.0f} to "
                                                    f"{100 * e['high']:+.0f})"),
                         e.get("flag") or "none"])
    return headers, rows


def set_lines(run: dict, k: int | None) -> list[str]:
    """One line per held-out set read from a named set or drawn with a seed: what it is and what its rates measure."""
    ev = next((r["eval"] for r in run["rounds"] if r["k"] == k), None) if k else None
    ev = ev if isinstance(ev, dict) else run["baseline"]
    lines = []
    for key, info in _dict(_dict(ev).get("sets")).items():
        info = _dict(info)
        if not info.get("set") and info.get("seed") is None:
            continue
        what = (f"{info.get('title')} from {info.get('package')} {info.get('version')}" if info.get("set")
                else str(info.get("source")))
        drawn = (f", {info.get('n')} of {info.get('total')} drawn with seed {info['seed']} (subset "
                 f"{info.get('subset')})" if info.get("seed") is not None else f", {info.get('n')} prompts")
        measured = f": {info['measured']}" if info.get("measured") else ""
        lines.append(f"held-out {key} set: {what}{drawn}{measured}")
    return lines


def effect_blocks(run: dict, k: int | None) -> list[tuple]:
    """The report's sections on categories and principles (nothing when the run has neither)."""
    b: list[tuple] = []
    cats = category_rows(run, k)
    if cats:
        b.append(("h2", "Held-out rates per category"))
        b.append(("note", f"From round-{k}/eval.json's by_category: the final round against the base model over the "
                          "prompts of each category both answered, with the totals' paired bootstrap 95% interval; "
                          "Holm flag: improved or worsened after Holm's correction over the categories of one rate "
                          "(level 0.05, sign-flip p-values), none otherwise; fell or rose in a category where "
                          "answering is not harm (no direction is better there). counted as: what an answer counts "
                          "as in that category (in some Do-Not-Answer areas answering is not harm)."))
        b.append(("table", *cats))
    grids = [g for g in (principle_grid(run, "win"), principle_grid(run, "violations")) if g]
    if grids:
        b.append(("h2", "Per-principle effects"))
        b.append(("note", "Each principle against the base model, per round. win rate (round-k/principles.json, "
                          "eval.per_principle): P(the round's held-out answer is better than the base's by the "
                          "principle's own judge question), both orders averaged, ties 0.5, with a 95% interval over "
                          "the answers; rule violations (round-k/eval.json, rules naming a principle): the share of "
                          "sampled answers breaking one of the principle's rules, base → round, and the paired change "
                          "with its 95% interval. ▲ improved / ▼ worsened only where Holm's correction over the "
                          "round's principles (level 0.05) rejects no change: with 17 principles at 95% about one "
                          "interval a round misses by chance. The heatmap beside the first table draws it."))
        for n, g in enumerate(grids):
            b.append(("h3", MEASURES[g["measure"]][1]))
            # the heatmap beside the first table (the one it draws)
            b.append(("beside", HEATMAP, *principle_table(g)) if n == 0 else ("table", *principle_table(g)))
    return b
