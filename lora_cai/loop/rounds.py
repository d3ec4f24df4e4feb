"""The round loop: a recipe's stages in order, each with its declared inputs' hashes, the stack and early stop.

    critic check, baseline eval                      (once, before round 1)
    for round k: responses -> samples -> critique -> judge -> train -> eval -> stack (unless early stop)

(the order is `stages.registry`'s, written there once).

Every stage's input hashes are computed before anything runs (`round_inputs`), from the recipe, the loaded
data and the upstream stages' hashes alone; so `--dry-run` and `lora_cai.train` can say the same thing
without loading a model.
"""

from __future__ import annotations

from pathlib import Path

from lora_cai.core import inputs
from lora_cai.core.layout import BASELINE_EVAL, round_dir, round_of, round_of_stack_entry, stack_entry, stage_key
from lora_cai.stages.registry import ROUND_STAGES, RUN_STAGES


def round_inputs(cfg, data, k: int, stack: list[str], previous: str | None) -> dict:
    """{stage: StageInputs or None (the stage does not run)} for round k on `stack` (training hashes of the
    stacked rounds); `previous` is the input hash of the evaluation round k's is compared with."""
    out: dict = {}
    for stage in ROUND_STAGES:
        if not inputs.exists(stage, cfg):
            out[stage.name] = None
            continue
        after = {u: (out[u].hash if out.get(u) else None) for u in stage.reads.after if u != "previous"}
        after["previous"] = previous
        out[stage.name] = inputs.stage_inputs(stage, cfg, data.hashes, after=after, k=k, stack=stack)
    return out


def run_inputs(cfg, data) -> dict:
    """{stage: StageInputs or None} of the stages that run once, before round 1."""
    return {stage.name: inputs.stage_inputs(stage, cfg, data.hashes) if inputs.exists(stage, cfg) else None
            for stage in RUN_STAGES}


def all_inputs(cfg, data, manifest: dict | None) -> dict:
    """Every stage's inputs for the whole recipe, by ledger key, without running anything: the rounds the
    manifest says were stacked stay stacked, a round it says stopped early ends the plan, later rounds are
    assumed stacked."""
    manifest = manifest or {}
    done = {int(r) for r in manifest.get("rounds", {})}
    stacked = {round_of_stack_entry(s) for s in manifest.get("stack", [])}
    pre = run_inputs(cfg, data)
    plan = {stage_key(n): i for n, i in pre.items()}
    stack: list[str] = []
    previous = pre["baseline_eval"].hash if pre["baseline_eval"] else None
    for k in range(1, cfg.rounds + 1):
        ri = round_inputs(cfg, data, k, stack, previous)
        plan.update({stage_key(n, k): i for n, i in ri.items()})
        if manifest.get("stopped_round") == k:
            break
        if k not in done or k in stacked:
            stack.append(ri["train"].hash)
        previous = ri["eval"].hash if ri["eval"] else None
    return plan


def reruns(plan: dict, ledger: dict) -> list[tuple[str, str]]:
    """[(stage key, why)] for every stage of `plan` whose inputs differ from the ledger's, in run order."""
    out = []
    for key, inp in plan.items():
        if inp is None:
            continue
        stored = ledger.get(key)
        if stored is None:
            out.append((key, "not run yet"))
        elif stored.get("inputs") != inp.hash:
            named = [_why(c, key) for c in inp.changed_since(stored.get("by_input"))]
            out.append((key, ", ".join(named) or "inputs changed"))
    return out


def _why(changed: str, key: str) -> str:
    """A changed declared input, in words ('generation.temperature changed', 'round-1/train reruns')."""
    k = round_of(key.split("/")[0]) if "/" in key else None
    if changed == "after:previous":
        return f"{'baseline_eval' if k == 1 else stage_key('eval', k - 1)} reruns"
    if changed.startswith("after:"):
        return f"{stage_key(changed.removeprefix('after:'), k)} reruns"
    if changed == "stack":
        return "an earlier round retrains (the stack changed)"
    return f"{changed.removeprefix('data:')} changed"


def run(cfg, console, *, stop_before_train: bool = False) -> dict:
    """Run (or resume) a validated recipe; return the manifest."""
    from lora_cai.loop import display
    from lora_cai.report.build import build_report
    from lora_cai.data.rundata import load_run_data
    from lora_cai.loop.rundir import Ledger, check_run_dir
    from lora_cai.loop.session import Models
    from lora_cai.core.stage import Round
    from lora_cai.core.store import RunStore
    from lora_cai.stages.train import StopBeforeTrain

    data = load_run_data(cfg)
    notice = check_run_dir(cfg, data.constitution)
    if notice:
        console.print(f"[yellow]{notice}[/]", soft_wrap=True)
    store = RunStore(cfg.output_dir)
    ledger = Ledger(store, cfg, data.constitution)
    ledger.write(ledger.read())  # the hash scheme goes down first: from now on this directory is this version's
    say_reruns(console, all_inputs(cfg, data, store.read_manifest()), ledger.read()["stages"])
    models = Models(console, store.root)
    previous = before_round_one(ledger, Round(1, store.root, store.root, cfg, data, models, console))
    stack, stack_hashes = [], []
    for k in range(1, cfg.rounds + 1):
        plan = round_inputs(cfg, data, k, stack_hashes, previous)
        ctx = Round(k, store.round_dir(k), store.root, cfg, data, models, console, [store.root / s for s in stack])
        try:
            summary = run_round(ledger, ctx, plan, stop_before_train=stop_before_train)
        except StopBeforeTrain:
            models.close()
            console.print(f"round {k}: data ready ({ctx.dir}/sft.jsonl, pairs.jsonl); train it with [bold]accelerate "
                          f"launch -m lora_cai.train {cfg.source}[/], then rerun this command")
            return ledger.read()
        stopped = close_round(ledger, k, summary, cfg.eval.early_stop_drop, models.backend)
        display.print_round(console, k, summary, cfg.judge.kind)
        models.drop_all()
        if stopped:
            console.print(stopped)
            break
        stack.append(stack_entry(k))
        stack_hashes.append(plan["train"].hash)
        previous = plan["eval"].hash if plan["eval"] else None
    models.close()
    m = ledger.read()
    final = round_of_stack_entry(m["stack"][-1]) if m["stack"] else None
    display.print_before_after(console, m, _read(store.root / BASELINE_EVAL),
                               _read(store.root / round_dir(final) / "eval.json") if final else None)
    console.print(f"report: {build_report(store.root)}")
    return m


def before_round_one(ledger, ctx) -> str | None:
    """The stages before round 1 (critic check, baseline evaluation); returns the baseline's input hash (None: no
    evaluation)."""
    pre = run_inputs(ctx.cfg, ctx.data)
    for stage in RUN_STAGES:
        if pre[stage.name]:
            run_stage(ledger, ctx, stage, pre[stage.name])
    return pre["baseline_eval"].hash if pre["baseline_eval"] else None


def close_round(ledger, k: int, summary: dict, early_stop_drop: float | None, backend: str | None) -> str | None:
    """Score round k, stack it unless its score dropped, write the manifest; the early-stop message, or None."""
    from lora_cai.cai.metrics import early_stop, quality_score

    scores = {0: quality_score(_read(ledger.store.root / BASELINE_EVAL))}
    scores.update({int(r): v.get("quality") for r, v in ledger.read()["rounds"].items() if int(r) < k})
    scores[k] = summary["quality"] = quality_score(summary.get("eval"))
    stopped = early_stop(scores.get(k - 1), scores[k], early_stop_drop)
    ledger.backend = backend or ledger.backend
    m = ledger.close_round(k, summary, scores, stopped)
    if not stopped:
        return None
    return (f"[bold yellow]early stop[/]: round {k}'s quality score {scores[k]:.3f} fell more than "
            f"{100 * early_stop_drop:g}% below round {k - 1}'s {scores[k - 1]:.3f}; its adapter is kept in "
            f"{round_dir(k)}/adapter but not stacked (best round: {m['best_round']})")


def _read(path: Path) -> dict | None:
    from lora_cai.core.store import read_json

    return read_json(path) if path.exists() else None


def run_round(ledger, ctx, plan: dict, *, stop_before_train: bool = False) -> dict:
    """Round k's stages in order, each given the outputs of the stages it takes; returns the round's summary for
    the manifest. Under --stop-before train it raises `StopBeforeTrain` where training would start."""
    import time

    t0, done = time.time(), {}
    for stage in ROUND_STAGES:
        if plan[stage.name] is None:  # not in this configuration (samples without best-of-N, eval without a set)
            continue
        if stage.frees_teacher:
            ctx.models.drop_teacher_if_crowded(ctx.cfg)
        args = [done[name].outputs if name in done else None for name in stage.takes]
        kw = {"stop_before": stop_before_train} if stage.stops_before else {}
        done[stage.name] = run_stage(ledger, ctx, stage, plan[stage.name], *args, k=ctx.k, **kw)
        if stage.check is not None:
            stage.check(ctx.k, done)
    return _summary(ledger, ctx, done, time.time() - t0)


def run_stage(ledger, ctx, stage, inp, *args, k: int | None = None, **kw):
    """Run one stage on its own view of the recipe; note it in the ledger; its timing goes into `Done.timing`."""
    d = stage.run(ctx.for_stage(stage.name), inp, *args, **kw)
    ledger.backend = ctx.models.backend or ledger.backend
    d.timing = ledger.record(stage_key(stage.name, k), inp, d)
    return d


def _summary(ledger, ctx, done: dict, seconds: float) -> dict:
    """The round's entry in the manifest: counts, losses, eval, peak memory and time, in one key order."""
    prompts = ctx.data.prompts
    summary: dict = {"prompts": len(prompts.records), "dropped_empty_prompts": prompts.dropped_empty,
                     "dropped_duplicate_prompts": prompts.dropped_duplicate, "peak_memory_gb": {}}
    for d in done.values():
        for key, value in d.summary.items():
            if key == "peak_memory_gb":
                summary["peak_memory_gb"].update(value)
            else:
                summary[key] = value
    summary["timing"] = {name: d.timing for name, d in done.items() if d.timing}
    worked = any(d.ran for d in done.values())
    before = ((ledger.store.read_manifest() or {}).get("rounds") or {}).get(str(ctx.k), {})
    summary["seconds"] = round(seconds, 1) if worked or "seconds" not in before else before["seconds"]
    if not worked:  # nothing ran: keep what the run that did the work measured
        for key in ("peak_memory_gb", "peak_memory_kind"):
            if key in before:
                summary[key] = before[key]
    return dict(sorted(summary.items()))  # one key order whichever stages ran: a rerun rewrites the same bytes


def say_reruns(console, plan: dict, ledger: dict) -> None:
    """On an existing run directory, which finished stages this run redoes and which input changed."""
    changed = [(key, why) for key, why in reruns(plan, ledger) if why != "not run yet"]
    if changed:
        console.print("inputs changed since the last run; redoing:")
        from lora_cai.loop.display import print_plan

        print_plan(console, changed)


def stale_data(cfg, data, manifest: dict, k: int) -> list[tuple[str, str]]:
    """Round k's data stages (responses .. judge) that the recipe would redo: `lora_cai.train` refuses to train
    on data older than the recipe."""
    plan = all_inputs(cfg, data, manifest)
    first_train = next(i for i, s in enumerate(ROUND_STAGES) if s.stops_before)
    keys = {stage_key(s.name, k) for s in ROUND_STAGES[:first_train]}
    return [(key, why) for key, why in reruns({kk: v for kk, v in plan.items() if kk in keys},
                                              manifest.get("stages") or {})]
