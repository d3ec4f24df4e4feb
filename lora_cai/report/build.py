"""Run report: tables and PNG plots across rounds, as Markdown and HTML, from a run directory's artifacts alone.

`python -m lora_cai.report DIR` (re)writes `DIR/report.md`, `DIR/report.html` (self-contained: the plots
are embedded as base64) and the plots under `DIR/report/`. Nothing is loaded but the run's files: no model,
no torch, no recipe.

Where each number comes from:

- per-round counts, first -> last training values and seconds: the round's summary in `manifest.json`
  (the file the run itself wrote); a round the manifest does not list yet falls back to its files
  (`responses.jsonl`, `critique-*.jsonl`, `sft.jsonl`, `pairs.jsonl`, `train.json`);
- held-out metrics: `baseline-eval.json` (shown as round 0) and `round-k/eval.json` (harmful compliance,
  over-refusal, rule violation rate, win rate against the previous round, capability-probe accuracy,
  detector and heuristic disagreement); the quality score is the manifest's `quality` (round 0 and rounds
  that lack it: `evaluation.quality_score` of the eval file, the same formula); the alignment tax is a
  round's capability accuracy minus the base model's; best and stopped rounds: the manifest's `best_round`,
  `stopped_round` and `stack`;
- judging: the round summary's `judge` statistics (a round the manifest does not list yet: comparisons,
  garbled, position consistency and label histogram recounted from `judgments.jsonl`), pairs by `source`
  from `pairs.jsonl`; the critic check: `critic-check.json`; peak memory: the summary's `peak_memory_gb`;
- curves: `sft_log.jsonl` and `dpo_log.jsonl` (rows that carry a `loss`);
- critique outcomes: the `status` of every record in `critique-*.jsonl`;
- the principle table, the one computed analysis: per principle, critique records (sampled), records with
  status `no_change`, records with status `revise`, the mean of `1 - difflib ratio` between a revise step's
  input text and its revision (inputs rebuilt from `trajectories.jsonl`: step 1's input is `initial`, step
  s's input is step s-1's revision), pairs in `pairs.jsonl` naming the principle (by source), and the
  judge's per-principle `judged` / `confident` counts summed over the rounds' summaries.

Anything absent (eval disabled, no pairs so no DPO steps, a round still running, a run from before these
files existed) renders as "n/a".
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lora_cai.report.blocks import _blocks
from lora_cai.report.effects import HEATMAP, plot_principles
from lora_cai.report.load import load_run
from lora_cai.report.plots import plot_critiques, plot_dpo, plot_eval, plot_judge_labels, plot_sft
from lora_cai.report.render import render_html, render_markdown


# ------------------------------------------------------------------ entry points
def build_report(run_dir: str | Path) -> Path:
    """Write report.md, report.html and report/*.png into the run directory; return report.md's path."""
    from lora_cai.core.store import atomic_write_text

    run = load_run(run_dir)
    root = run["root"]
    plot_dir = root / "report"
    plot_dir.mkdir(exist_ok=True)
    plot_sft(run, plot_dir / "sft_loss.png")
    plot_dpo(run, plot_dir / "dpo.png")
    plot_eval(run, plot_dir / "eval.png")
    plot_judge_labels(run, plot_dir / "judge_labels.png")
    plot_critiques(run, plot_dir / "critique_outcomes.png")
    if not plot_principles(run, plot_dir / HEATMAP):
        (plot_dir / HEATMAP).unlink(missing_ok=True)  # a rerun without per-principle effects keeps no stale one
    blocks = _blocks(run)
    md = root / "report.md"
    atomic_write_text(md, render_markdown(blocks))
    atomic_write_text(root / "report.html", render_html(blocks, plot_dir))
    return md


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lora_cai.report",
        description="Write DIR/report.md, DIR/report.html and DIR/report/*.png from a run directory's artifacts.")
    parser.add_argument("run_dir", metavar="DIR", help="a run directory (the output_dir of a lora_cai run)")
    return parser


def _main(args) -> int:
    args.writes_to = args.run_dir
    print(build_report(args.run_dir))
    return 0


def main(argv: list[str] | None = None) -> int:
    from lora_cai.cli import main as cli_main

    return cli_main(build_parser(), _main, argv)
