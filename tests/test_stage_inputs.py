"""Each stage's declared inputs are its real inputs: a changed key reruns the stages that read it and everything
downstream, and nothing else; the declarations cover every key the stages read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_cai.core import inputs
from lora_cai.stages.registry import ROUND_STAGE_NAMES, STAGES
from lora_cai.config.schema import RecipeConfig, Section
from lora_cai.config.load import recipe_from_dict

ROOT = Path(__file__).resolve().parents[1]
RULES = str(ROOT / "recipes" / "rules" / "no-ful.yaml")

# --------------------------------------------------------------------------------------------------
# Model-free: every key of the schema
# --------------------------------------------------------------------------------------------------


def leaves(model=RecipeConfig, prefix: str = "") -> list[str]:
    """Every recipe key: a walk of the pydantic schema (lists and dicts are whole values)."""
    out = []
    for name, f in model.model_fields.items():
        if f.exclude:
            continue
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, Section):
            out += leaves(ann, f"{prefix}{name}.")
        else:
            out.append(f"{prefix}{name}")
    return out


BASE = {"model": {"name": "tiny-model"}, "data": {"prompts": "builtin:smoke", "limit": 4, "eval_limit": 2},
        "rounds": 2, "pairs": {"builder": "mix"}, "sft": {"helpful_data": "builtin:helpful"}}
# Configurations in which the conditional keys count: a teacher critiques and judges, a server judges and
# generates, rules judge, the chain of thought is on.
BASES = {
    "self": {},
    "teacher": {"critic": "teacher", "judge": {"kind": "teacher", "model": "a-teacher", "cross_check_self": True}},
    "api": {"critic": "api", "judge": {"kind": "api", "base_url": "http://127.0.0.1:9/v1", "model": "m",
                                       "chain_of_thought": True},
            "generation": {"base_url": "http://127.0.0.1:9/v1", "model": "policy-{round}"}},
    "rule": {"judge": {"kind": "rule", "rules": RULES}},
    "vllm": {"generation": {"engine": "vllm"}},
}
# A valid other value for every key (lists and dicts as whole values), and the keys that must change with it.
NEW = {
    "name": "other", "model.name": "other-model", "model.backend": "transformers", "model.load_in_4bit": False,
    "model.dtype": "float32", "model.max_seq_length": 1024, "model.trust_remote_code": True,
    "constitution": "harmless", "data.prompts": "builtin:train", "data.prompt_column": "text", "data.split": "test",
    "data.limit": 3, "data.eval_harmful": "builtin:heldout_benign", "data.eval_benign": "builtin:heldout_harmful",
    "data.eval_limit": 3, "data.eval_seed": 5, "data.eval_column": "text", "data.eval_split": "test",
    "data.eval_subset": "hard", "data.category_column": "type", "data.label_column": "category", "data.dev": 2, "rounds": 3, "seed": 7, "vram_gb": 12.0, "output_dir": "elsewhere",
    "generation.max_new_tokens": 100, "generation.critique_max_new_tokens": 50, "generation.temperature": 0.3,
    "generation.top_p": 0.8, "generation.token_budget": 8000, "generation.max_batch_size": 16,
    "generation.base_url": "http://127.0.0.1:8/v1", "generation.model": "other-{round}",
    "generation.api_key_env": "SOME_KEY", "generation.concurrency": 2, "generation.timeout": 30.0,
    "generation.engine": "vllm", "generation.vllm_weights": "lora", "generation.adapter_dir": "/shared/adapters",
    "critic": "self", "critique.steps": 3, "critique.demonstrations": 1, "critique.temperature": 0.5,
    "judge.kind": "self", "judge.model": "other-judge", "judge.base_url": "http://127.0.0.1:7/v1",
    "judge.api_key_env": "JUDGE_KEY", "judge.load_in_4bit": False, "judge.trust_remote_code": True, "judge.rules": str(ROOT / "recipes" / "rules" /
                                                                                       "no-ful.yaml") + "x",
    "judge.chain_of_thought": False, "judge.cot_max_new_tokens": 64, "judge.confidence": 0.8, "judge.top_logprobs": 5,
    "judge.concurrency": 2, "judge.timeout": 30.0, "judge.cross_check_self": False, "judge.max_failures": 0.5, "pairs.builder": "best_of_n",
    "pairs.n_samples": 3, "pairs.judge_revisions": True, "pairs.sample_demonstrations": 2, "pairs.contrast": True,
    "pairs.sft_accepted": True, "eval.max_new_tokens": 48, "eval.win_rate": False,
    "eval.capability": "", "eval.capability_limit": 10, "eval.critic_check": False, "eval.early_stop_drop": 0.2,
    "eval.per_principle": True,
    "lora.r": 8, "lora.alpha": 32, "lora.dropout": 0.1, "lora.target_modules": ["q_proj", "v_proj"],
    "sft.grad_accum": 2, "sft.save_steps": 10, "sft.learning_rate": 1e-4, "sft.epochs": 2.0, "sft.batch_size": 2,
    "sft.max_length": 512, "sft.helpful_data": None, "sft.helpful_fraction": 0.5, "sft.helpful_prompt_column": "q",
    "sft.helpful_response_column": "a", "sft.helpful_split": "test", "dpo.grad_accum": 2, "dpo.save_steps": 10,
    "dpo.beta": 0.2, "dpo.learning_rate": 1e-5, "dpo.epochs": 2.0, "dpo.batch_size": 4, "dpo.max_length": 512,
    "dpo.soft_labels": "weight", "dpo.loss": "ipo", "dpo.ipo_tau": 0.5, "dpo.flip_rate": 0.2,
    "dpo.simpo_beta": 2.5, "dpo.simpo_gamma": 1.0, "dpo.orpo_lambda": 0.2,
    "report_to": ["tensorboard"],
}
# Keys valid only together with others (schema cross-checks), changed together.
TOGETHER = {
    ("teacher", "judge.kind"): {"critic": "self"},
    ("api", "judge.kind"): {"critic": "self"},
    ("rule", "critic"): {},
    ("self", "generation.base_url"): {"generation.model": "p-{round}"},
    ("rule", "generation.base_url"): {"generation.model": "p-{round}"},
    ("teacher", "generation.base_url"): {"generation.model": "p-{round}"},
    ("api", "generation.base_url"): {},
    ("vllm", "generation.base_url"): {"generation.model": "the-base"},  # a user's vLLM server: the base's name
    ("self", "pairs.contrast"): {"pairs.builder": "best_of_n", "pairs.sample_demonstrations": 5,
                                 "pairs.n_samples": 3},
    ("rule", "pairs.sft_accepted"): {"pairs.builder": "best_of_n", "critique.steps": 0},
    ("self", "dpo.ipo_tau"): {"dpo.loss": "ipo"},  # an objective's own setting, where that objective reads it
    ("self", "dpo.flip_rate"): {"dpo.loss": "robust"},
    ("self", "dpo.simpo_beta"): {"dpo.loss": "simpo"},
    ("self", "dpo.simpo_gamma"): {"dpo.loss": "simpo"},
    ("self", "dpo.orpo_lambda"): {"dpo.loss": "orpo"},
}


def set_key(d: dict, key: str, value) -> None:
    *path, last = key.split(".")
    for p in path:
        d = d.setdefault(p, {})
    d[last] = value


def config(base: str, changes: dict | None = None):
    import copy

    d = copy.deepcopy(BASE)
    for k, v in _flat(BASES[base]).items():
        set_key(d, k, v)
    for k, v in (changes or {}).items():
        set_key(d, k, v)
    return recipe_from_dict(d, source=str(ROOT / "recipe.yaml"))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class FakeData:
    """The loaded data's hashes as the loader makes them, for keys that name missing files too: content is a
    function of the keys that choose it (a model-free stand-in for `rundata.load_run_data`)."""

    def __init__(self, cfg):
        from lora_cai.core.store import content_hash

        self.hashes = {name: content_hash([inputs.get(cfg, k) for k in inputs._keys(keys, cfg)])
                       for name, keys in inputs.DATA_KEYS.items()}


def plan(cfg) -> dict:
    from lora_cai.loop.rounds import all_inputs

    return all_inputs(cfg, FakeData(cfg), None)


def downstream(keys: set[str], rounds: int) -> set[str]:
    """Every stage key reached from `keys` through the round's data flow, the stack and the previous eval."""
    edges: dict[str, set[str]] = {"baseline_eval": {"round-1/eval"}, "critic_check": set()}
    for k in range(1, rounds + 1):
        r = f"round-{k}/"
        edges.update({r + "responses": {r + "samples", r + "critique", r + "judge"},
                      r + "samples": {r + "judge"}, r + "critique": {r + "judge"}, r + "judge": {r + "train"},
                      r + "train": {r + "eval"} | {f"round-{k + 1}/{s}" for s in ROUND_STAGE_NAMES},
                      r + "eval": {f"round-{k + 1}/eval", r + "principles"}})
    out, todo = set(), list(keys)
    while todo:
        key = todo.pop()
        if key not in out:
            out.add(key)
            todo += edges.get(key, ())
    return out


def reading(cfg, key: str) -> set[str]:
    """The stage keys of `cfg`'s plan that declare `key` as an input (settings, or the keys choosing their data)."""
    return {sk for sk in plan(cfg) if key in inputs.hashed_keys(STAGES[sk.split("/")[-1]], cfg)}


def test_every_key_of_the_schema_is_an_input_a_use_or_a_loop_key():
    declared = set().union(*(inputs.declared_keys(s) for s in STAGES.values()))
    assert set(leaves()) - declared - set(inputs.LOOP_KEYS) - set(inputs.NOT_INPUTS) == set()
    assert not (declared & (set(inputs.LOOP_KEYS) | set(inputs.NOT_INPUTS)))
    assert set(NEW) == set(leaves())  # the table of changed values covers the schema


@pytest.mark.parametrize("key", leaves())
def test_a_changed_key_reruns_exactly_its_readers_and_what_follows(key):
    tested = 0
    for base in BASES:
        before = config(base)
        changes = {key: NEW[key], **TOGETHER.get((base, key), {})}
        if inputs.get(before, key) == NEW[key]:
            continue
        try:
            after = config(base, changes)
        except Exception:  # not valid in this configuration (e.g. critic: self with a teacher judge's critic)
            continue
        p1, p2 = plan(before), plan(after)
        if key == "rounds":  # more rounds add stages; the existing ones stay
            assert all(p2[k] and p2[k].hash == v.hash for k, v in p1.items() if v), base
            tested += 1
            continue
        reran = {k for k in set(p1) | set(p2) if (p1.get(k) and p1[k].hash) != (p2.get(k) and p2[k].hash)}
        readers = set()
        for k in changes:
            readers |= reading(before, k) | reading(after, k)
        appeared = {k for k in set(p1) | set(p2) if bool(p1.get(k)) != bool(p2.get(k))}
        expected = {k for k in downstream(readers | appeared, before.rounds) if p1.get(k) or p2.get(k)}
        assert reran == expected, (base, key, sorted(reran ^ expected))
        if key in inputs.NOT_INPUTS or key in inputs.LOOP_KEYS:
            assert not reran, (base, key)
        tested += 1
    assert tested, f"{key}: no configuration could change it"


def test_declarations_name_real_keys_and_the_ones_that_matter():
    all_keys = set(leaves())
    for stage in STAGES.values():
        assert inputs.declared_keys(stage) <= all_keys, stage.name
    cfg = config("self")
    assert "generation.temperature" in inputs.hashed_keys(STAGES["responses"], cfg)
    assert "generation.concurrency" not in inputs.hashed_keys(STAGES["responses"], cfg)  # a commit batch size: no input
    assert "judge.concurrency" not in inputs.hashed_keys(STAGES["judge"], config("api"))
    assert "dpo.beta" in inputs.hashed_keys(STAGES["train"], cfg) and "dpo.beta" not in inputs.hashed_keys(STAGES["eval"], cfg)
    for key in ("model.load_in_4bit", "model.dtype", "model.backend", "seed"):  # the gaps of the hand-made hashes
        assert key in inputs.hashed_keys(STAGES["baseline_eval"], config("rule")), key
    assert {"judge.load_in_4bit"} <= inputs.hashed_keys(STAGES["judge"], config("teacher"))
    assert {"judge.top_logprobs"} <= inputs.hashed_keys(STAGES["judge"], config("api"))


@pytest.mark.parametrize("base", ["self", "rule"])
def test_a_changed_refusal_detector_reruns_what_decides_refusals(base):
    """evaluation.REFUSAL_DETECTOR_VERSION is an input of the evaluations, of contrastive sampling (it sorts the
    demonstrations) and of a rule judge (its rules may use the detector), and of nothing else."""
    from lora_cai.loop.rounds import all_inputs

    cfg = config(base, {"pairs.builder": "best_of_n", "pairs.sample_demonstrations": 5, "pairs.n_samples": 3,
                        "pairs.contrast": True, "critique.steps": 0})
    data = FakeData(cfg)
    p1 = all_inputs(cfg, data, None)
    data.hashes["refusal_detector"] = "a later detector"
    p2 = all_inputs(cfg, data, None)
    reran = {k for k in p1 if (p1[k] and p1[k].hash) != (p2[k] and p2[k].hash)}
    readers = {"baseline_eval", "round-1/samples", "round-1/eval"} | ({"round-1/judge"} if base == "rule" else set())
    assert reran == {k for k in downstream(readers, cfg.rounds) if p1.get(k)}
    assert p2["baseline_eval"].changed_since(p1["baseline_eval"].by_input) == ["data:refusal_detector"]


def test_prompt_labels_are_in_the_prompts_hash(tmp_path):
    from lora_cai.data.rundata import load_run_data

    rows = [{"prompt": f"Question {i}?", "kind": "harmful"} for i in range(3)]
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = recipe_from_dict({"model": {"name": "m"}, "data": {"prompts": str(f), "eval_limit": 0}},
                           source=str(tmp_path / "r.yaml"))
    h1 = load_run_data(cfg).hashes["prompts"]
    rows[1]["kind"] = "benign"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_run_data(cfg).hashes["prompts"] != h1


# --------------------------------------------------------------------------------------------------
# The declarations are true: a recording proxy over the recipe during real tiny runs
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("judge", ["self", "rule", "teacher"])
def test_every_key_a_stage_reads_is_declared_by_that_stage(judge, tiny_model, tmp_path):
    import lora_cai

    recipe = {"model": {"name": str(tiny_model), "backend": "transformers"}, "constitution": "default",
              "data": {"prompts": "builtin:smoke", "limit": 4, "eval_limit": 2}, "rounds": 1, "seed": 3,
              "output_dir": str(tmp_path / "run"),
              "generation": {"max_new_tokens": 8, "critique_max_new_tokens": 8},
              "critique": {"steps": 1, "demonstrations": 1}, "lora": {"r": 4, "alpha": 8},
              "sft": {"batch_size": 4, "helpful_data": "builtin:helpful"}, "dpo": {"batch_size": 4},
              "pairs": {"builder": "mix", "n_samples": 2, "judge_revisions": True},
              "eval": {"capability_limit": 4, "early_stop_drop": None}}
    recipe["judge"] = {"self": {"kind": "self"}, "rule": {"kind": "rule", "rules": RULES},
                       "teacher": {"kind": "teacher", "model": str(tiny_model), "cross_check_self": True}}[judge]
    if judge == "teacher":
        recipe["critic"] = "teacher"
    with inputs.recording() as reads:
        lora_cai.run(recipe)
    cfg = recipe_from_dict(recipe)
    expected_stages = {"critic_check", "baseline_eval", "responses", "samples", "critique", "judge", "train", "eval"}
    assert set(reads) == expected_stages
    for stage, keys in reads.items():
        undeclared = keys - inputs.declared_keys(STAGES[stage], cfg)
        assert not undeclared, (stage, sorted(undeclared))
    assert {"generation.temperature", "seed"} <= reads["responses"]
    assert {"sft.learning_rate", "sft.batch_size"} <= reads["train"]
    assert "eval.max_new_tokens" in reads["eval"]


# Every shipped recipe, shrunk onto the tiny model (its teacher too; its server: lora_cai.serve on the tiny
# model), and every preference objective: a stage that reads a key it does not declare fails here, whatever the
# configuration. The shipped recipes' own settings (builders, contrast, rules, helpful data, soft labels) stay.
SHRINK = ["critique.demonstrations=0", "data.limit=4", "data.eval_limit=2", "data.dev=0", "rounds=1", "generation.max_new_tokens=8",
          "generation.critique_max_new_tokens=8", "generation.token_budget=4096", "sft.batch_size=2", "sft.epochs=1",
          "dpo.batch_size=2", "dpo.epochs=1", "eval.capability_limit=2", "eval.max_new_tokens=8",
          "eval.early_stop_drop=null", "lora.r=4", "lora.alpha=8", "model.backend=transformers",
          "model.max_seq_length=512", "sft.max_length=256", "dpo.max_length=256"]
SHIPPED = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
LOSSES = ["sigmoid", "ipo", "robust", "hinge", "apo_zero", "kto", "simpo", "orpo"]


def _record_run(cfg, *, may_find_nothing_to_train_on: bool = False):
    import lora_cai
    from lora_cai.errors import UserError

    with inputs.recording() as reads:
        try:
            lora_cai.run(cfg)
        except UserError as e:  # the tiny model's revisions are unusable: the stages up to the judge still count
            if not (may_find_nothing_to_train_on and "nothing to train on" in str(e)):
                raise
    for stage, keys in reads.items():
        undeclared = keys - inputs.declared_keys(STAGES[stage], cfg)
        assert not undeclared, (stage, sorted(undeclared))
    return reads


@pytest.mark.slow
@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_recipe_reads_only_what_its_stages_declare(name, tiny_model, tmp_path, monkeypatch):
    from lora_cai.config.builtin import find_recipe
    from lora_cai.config.load import load_recipe
    from lora_cai.serve.server import start_server

    shipped = load_recipe(find_recipe(name))
    sets = [*SHRINK, f"model.name={tiny_model}", f"output_dir={tmp_path / 'run'}",
            f"critique.steps={min(shipped.critique.steps, 1)}", f"pairs.n_samples={min(shipped.pairs.n_samples, 3)}"]
    if shipped.pairs.sample_demonstrations:
        sets.append("pairs.sample_demonstrations=2")
    if shipped.judge.kind != "rule":  # a random judge is never confident: keep every pair it decides
        sets.append("judge.confidence=0.5")
    server = None
    if shipped.judge.kind == "teacher" or shipped.critic == "teacher":
        sets.append(f"judge.model={tiny_model}")
    if shipped.judge.kind == "api" or shipped.critic == "api":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model, tok = AutoModelForCausalLM.from_pretrained(tiny_model), AutoTokenizer.from_pretrained(tiny_model)
        server, url = start_server(model, tok, model_name="tiny", max_top_logprobs=tok.vocab_size)
        monkeypatch.setenv(shipped.judge.api_key_env or "OPENAI_API_KEY", "sk-test")
        sets += [f"judge.base_url={url}", "judge.model=tiny"]
    try:
        # As shipped; then, where the tiny model gave nothing to train on (its revisions are unusable, and it breaks
        # the refusal rules on every sample alike), without critique, with best-of-N pairs and a rule it breaks
        # only sometimes, so that training and evaluation run under the recipe's other settings too.
        reads = _record_run(load_recipe(find_recipe(name), sets), may_find_nothing_to_train_on=True)
        if "train" not in reads:
            sets += ["critique.steps=0", "pairs.builder=best_of_n", "pairs.n_samples=4", "data.limit=8",
                     f"output_dir={tmp_path / 'run2'}"]
            if shipped.judge.kind == "rule":
                sets.append("judge.rules=builtin:no-ful")
            more = _record_run(load_recipe(find_recipe(name), sets))
            reads = {stage: reads.get(stage, set()) | more.get(stage, set()) for stage in set(reads) | set(more)}
    finally:
        if server is not None:
            server.shutdown()
    assert {"responses", "judge", "train", "eval"} <= set(reads)


@pytest.mark.parametrize("loss", LOSSES)
def test_every_objective_reads_only_what_the_train_stage_declares(loss, tiny_model, tmp_path):
    from lora_cai.config.load import recipe_from_dict

    cfg = recipe_from_dict({"model": {"name": str(tiny_model), "backend": "transformers"},
                            "data": {"prompts": "builtin:smoke", "limit": 4, "eval_limit": 0}, "rounds": 1,
                            "output_dir": str(tmp_path / "run"), "critique": {"steps": 0},
                            "pairs": {"builder": "best_of_n", "n_samples": 3}, "judge": {"confidence": 0.5},
                            "generation": {"max_new_tokens": 8, "critique_max_new_tokens": 8},
                            "lora": {"r": 4, "alpha": 8}, "sft": {"batch_size": 2}, "eval": {"critic_check": False},
                            "dpo": {"batch_size": 2, "loss": loss, "soft_labels": "weight"}})
    reads = _record_run(cfg)
    assert "dpo.loss" in reads["train"]
