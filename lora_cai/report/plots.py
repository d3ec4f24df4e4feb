"""The report's PNG plots: training curves, held-out rates, judge labels and critiques per round."""

from __future__ import annotations

from pathlib import Path

from lora_cai.errors import UserError
from lora_cai.report.tables import STATUSES, _int, label_histogram, metrics_row, status_counts

PLOTS = {  # file name under report/ -> title
    "sft_loss.png": "SFT loss per step",
    "dpo.png": "Preference-stage (dpo.loss) loss, reward margin and reward accuracy per step",
    "eval.png": "Held-out metrics per round (round 0 = base model)",
    "judge_labels.png": "Judge labels: histogram of P(a better) per round",
    "critique_outcomes.png": "Critique outcomes per round",
}
# Drawn only when the run has what they show (report.effects).
OPTIONAL_PLOTS = {"principles.png": "Per-principle effects against the base: principles x rounds"}
TITLES = {**PLOTS, **OPTIONAL_PLOTS}


# ------------------------------------------------------------------ plots
def _figure(figsize):
    """A figure on the Agg canvas, without touching pyplot's global backend."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("the run report needs matplotlib; install it with `pip install matplotlib`") from None
    fig = Figure(figsize=figsize, dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _empty(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="0.4")


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, format="png")


def _curve_plot(ax, run: dict, log_key: str, metric: str, title: str) -> None:
    drawn = False
    for r in run["rounds"]:
        pts = [(h.get("step"), h.get(metric)) for h in r[log_key]]
        pts = [(x, y) for x, y in pts if isinstance(x, (int, float)) and isinstance(y, (int, float))]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", label=f"round {r['k']}")
            drawn = True
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize="small")
    else:
        _empty(ax, "no steps logged")


def plot_sft(run: dict, path: Path) -> None:
    fig = _figure((7, 4))
    ax = fig.add_subplot(1, 1, 1)
    _curve_plot(ax, run, "sft_log", "loss", "SFT loss")
    ax.set_ylabel("loss")
    _save(fig, path)


def plot_dpo(run: dict, path: Path) -> None:
    fig = _figure((13, 4))
    for i, (metric, title) in enumerate((("loss", "preference loss"), ("rewards/margins", "reward margin"),
                                         ("rewards/accuracies", "reward accuracy"))):
        ax = fig.add_subplot(1, 3, i + 1)
        _curve_plot(ax, run, "dpo_log", metric, title)
    _save(fig, path)


def plot_eval(run: dict, path: Path) -> None:
    fig = _figure((9, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    points = [metrics_row(run, None)] + [metrics_row(run, r) for r in run["rounds"]]
    drawn = False
    for key, label, marker in (("harmful_compliance", "harmful compliance", "o"),
                               ("over_refusal", "over-refusal", "s"),
                               ("violation_rate", "rule violation rate", "v"),
                               ("win_rate", "win rate vs previous round", "^"),
                               ("capability", "capability accuracy", "D"),
                               ("quality", "quality score", "*")):
        pts = [(row["round"], row[key]) for row in points if row[key] is not None]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker=marker, label=label, linestyle="--" if key == "quality" else "-")
            drawn = True
    m = run["manifest"]
    best, stopped = _int(m.get("best_round")), _int(m.get("stopped_round"))
    if best is not None:
        ax.axvline(best, color="green", linestyle=":", alpha=0.7, label=f"best round ({best})")
    if stopped is not None:
        ax.axvspan(stopped - 0.4, stopped + 0.4, color="red", alpha=0.12,
                   label=f"round {stopped} stopped (not stacked)")
    ax.set_xticks([row["round"] for row in points])
    ax.set_xticklabels(["base" if row["round"] == 0 else str(row["round"]) for row in points])
    ax.set_xlabel("round")
    ax.set_ylabel("rate")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("held-out metrics")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        _empty(ax, "no evaluation in this run")
    _save(fig, path)


def plot_judge_labels(run: dict, path: Path) -> None:
    """Grouped bars: per round, how many judged comparisons fell in each tenth of P(a better)."""
    fig = _figure((9, 4))
    ax = fig.add_subplot(1, 1, 1)
    hists = [(r["k"], h) for r in run["rounds"] if (h := label_histogram(r)) is not None]
    width = 0.1 / (len(hists) + 1)
    for i, (k, h) in enumerate(hists):
        xs = [b / 10 + width * (i + 1) for b in range(10)]
        ax.bar(xs, h, width=width, label=f"round {k}")
    ax.set_xticks([b / 10 for b in range(11)])
    ax.set_xlim(0, 1)
    ax.set_xlabel("P(a better), averaged over both orders (p_raw)")
    ax.set_ylabel("comparisons")
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("judge labels (0.5 = undecided; the edges are confident)")
    ax.grid(alpha=0.3, axis="y")
    if hists:
        ax.legend(fontsize="small")
    else:
        _empty(ax, "no judged comparisons")
    _save(fig, path)


def plot_critiques(run: dict, path: Path) -> None:
    fig = _figure((8, 4))
    ax = fig.add_subplot(1, 1, 1)
    ks = [r["k"] for r in run["rounds"]]
    counts = [status_counts(r) for r in run["rounds"]]
    bottom = [0] * len(ks)
    for st in STATUSES:
        vals = [c[st] for c in counts]
        ax.bar([str(k) for k in ks], vals, bottom=bottom, label=st)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xlabel("round")
    ax.set_ylabel("critique records")
    ax.set_title("critique outcomes")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if not any(bottom):
        _empty(ax, "no critique records")
    _save(fig, path)
