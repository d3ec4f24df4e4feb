"""How a stage declares what it reads (`Decl`, beside its function), and the input hashes derived from it.

A stage reruns exactly when one of its declared inputs changed. Its inputs are

* recipe settings (`settings`): hashed by value; a key that counts only in some configurations (the
  teacher's name when a teacher judges) is declared with its condition;
* loaded data (`data`): the prompt sets, the constitution, the rule file, ... hashed by content, so an
  edited file reruns what reads it even under the same name;
* upstream stages (`after`): their input hashes, so a change reruns the stage that reads it and every
  stage downstream of it; the stack of earlier rounds enters as the list of their training hashes;
* settings read but changing nothing computed (`uses`: timeouts, concurrency, the API key's variable),
  declared so that the recording proxy (`view`) can hold the declarations true in the tests, never hashed.

The per-input hashes are kept in the manifest's `stages` ledger, so a rerun (and `--dry-run`) can say
which input changed. Keys no stage reads (`NOT_INPUTS`) and the round loop's own keys (`LOOP_KEYS`) change
no stage; `FROZEN_KEYS` may not change in an existing run directory at all.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

from lora_cai.core.store import content_hash

# Bumped when the way input hashes are made changes. Scheme 3 declares every key a stage reads at every value
# (scheme 2 left pairs.sft_accepted and dpo.loss out at their defaults, to keep the hashes of runs made before
# they existed): a scheme-2 run directory continues, redoing the stages whose hashes moved (loop.rundir).
# Older ones are refused.
HASH_SCHEME = 3

# --------------------------------------------------------------------------------------------------
# Declarations
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class If:
    """Keys (or nested If groups) that count only when `when(cfg)` holds (the teacher's keys when a teacher
    judges)."""

    when: Callable
    items: tuple

    def __init__(self, when: Callable, *items):
        object.__setattr__(self, "when", when)
        object.__setattr__(self, "items", items)


@dataclass(frozen=True)
class Decl:
    settings: tuple = ()                 # keys (or If groups) hashed by value
    data: tuple = ()                    # loaded inputs (or If groups of them) hashed by content (`RunData.hashes`)
    after: tuple[str, ...] = ()         # upstream stages of the same round ("eval" of the previous round: "previous")
    uses: tuple = ()                    # read, but change nothing the stage computes
    exists: Callable | None = None      # the stage runs only when this holds
    per_round: bool = True


def critic_is(kind: str):
    return lambda c: c.critic == kind


def judge_is(*kinds: str):
    return lambda c: c.judge.kind in kinds


def engine_is(kind: str):
    return lambda c: c.generation.engine == kind


def _helpful(c) -> bool:
    return bool(c.sft.helpful_data and c.sft.helpful_fraction)


# The base model as every local stage loads it; `model.name` cannot change in a run directory (FROZEN_KEYS).
MODEL = ("model.name", "model.backend", "model.load_in_4bit", "model.dtype", "model.max_seq_length")
# Building the policy reads the new adapter's settings and the seed (its A initialisation), but its B matrices
# are zero until training: stages before training compute the same with any of them. vram_gb decides only
# whether the student and a teacher stay loaded together.
POLICY_USES = ("model.trust_remote_code", "lora.r", "lora.alpha", "lora.dropout", "lora.target_modules", "vram_gb",
               "seed")
LOCAL_BATCH = ("generation.token_budget", "generation.max_batch_size")
# The policy as vLLM serves it (generation.engine: vllm): the base as loaded, merged with the stack or beside it as one
# adapter (generation.vllm_weights), and on a user's vLLM server (generation.base_url) the base's name there.
VLLM = (*MODEL, "generation.vllm_weights", If(lambda c: bool(c.generation.base_url), "generation.model"))
# Where the adapters are written, how many requests go at once, the KV cache's size: nothing vLLM computes.
VLLM_USES = ("generation.adapter_dir", "generation.api_key_env", *LOCAL_BATCH)
# Generation on the policy: the local engine on the model in memory, on the recipe's server, or vLLM.
GENERATOR = ("generation.engine", "generation.base_url",
             If(lambda c: c.generation.engine == "local" and not c.generation.base_url, *MODEL, *LOCAL_BATCH),
             If(lambda c: c.generation.engine == "local" and bool(c.generation.base_url), "generation.model"),
             If(engine_is("vllm"), *VLLM))
GENERATOR_USES = (*POLICY_USES, "generation.api_key_env", "generation.concurrency", "generation.timeout", *VLLM_USES)
TEACHER = ("judge.model", "judge.load_in_4bit", "model.backend", "model.dtype", "model.max_seq_length")
# Whether the teacher's repository may run its code: it loads or refuses, it computes nothing else.
TEACHER_USES = ("judge.trust_remote_code",)
API = ("judge.base_url", "judge.model")
# judge.max_failures stops a stage or lets it finish; it changes nothing a finished stage computed.
API_USES = ("judge.api_key_env", "judge.concurrency", "judge.timeout", "judge.max_failures")
# Who critiques: the policy (through GENERATOR), the local teacher, or the judge's server.
CRITIC = ("critic",
          If(critic_is("self"), *GENERATOR),
          If(critic_is("teacher"), *TEACHER, *LOCAL_BATCH),
          If(critic_is("api"), *API))
# A model judge (refusals, win rate, pairs): the policy, the teacher, a server, or the rule file.
JUDGE = ("judge.kind",
         If(judge_is("self"), *MODEL, *LOCAL_BATCH, "generation.engine", If(engine_is("vllm"), *VLLM,
                                                                            "generation.base_url")),
         If(judge_is("teacher"), *TEACHER, *LOCAL_BATCH),
         If(judge_is("api"), *API, "judge.top_logprobs"))
JUDGE_DATA_RULES = If(judge_is("rule"), "judge.rules")
# Evaluation: greedy held-out answers on the policy (local, or served by vLLM), the capability probe (local), and with
# a rule judge the policy's sampled violation rate.
EVAL = (*MODEL, *LOCAL_BATCH, "generation.engine", If(engine_is("vllm"), *VLLM, "generation.base_url"),
        "eval.max_new_tokens", "eval.capability", "eval.capability_limit",
        "data.category_column", *JUDGE,
        If(judge_is("rule"), "generation.max_new_tokens", "generation.temperature", "generation.top_p", "seed",
           "data.label_column"))
EVAL_USES = (*POLICY_USES, *API_USES, *TEACHER_USES, *VLLM_USES)

# Loaded inputs and the recipe keys that choose them (a changed key reruns its readers even where the
# content happens to come out the same).
DATA_KEYS = {
    "prompts": ("data.prompts", "data.prompt_column", "data.split", "data.limit", "data.dev",
                If(lambda c: c.data.dev > 0, "data.label_column", "seed")),
    "eval_sets": ("data.eval_harmful", "data.eval_benign", "data.eval_limit", "data.dev",
                  If(lambda c: c.data.dev > 0, "data.label_column", "seed", "data.prompts", "data.prompt_column",
                     "data.split", "data.limit"),
                  If(lambda c: not c.data.dev, "data.eval_seed", "data.eval_column", "data.eval_split",
                     "data.eval_subset", "data.category_column", "data.label_column")),
    # What the held-out sets are: source, a named set's package version, the drawn subset's hash (rundata.SOURCE_KEYS).
    "eval_sources": ("data.eval_harmful", "data.eval_benign", "data.eval_limit", "data.eval_seed", "data.dev"),
    "helpful": ("sft.helpful_data", If(_helpful, "sft.helpful_fraction", "sft.helpful_prompt_column",
                                       "sft.helpful_response_column", "sft.helpful_split")),
    "constitution": ("constitution",),
    "capability": ("eval.capability", "eval.capability_limit"),
    "rules": (JUDGE_DATA_RULES,),
    "canaries": (),
    "refusal_detector": (),  # evaluation.REFUSAL_DETECTOR_VERSION: a changed detector re-judges and re-evaluates
}
# What the round loop reads: how many rounds, when to stop early. They decide which stages run (an early stop
# changes the next round's stack, and so its hashes), not what a stage computes.
LOOP_KEYS = ("rounds", "eval.early_stop_drop")
# Read by nothing that computes: where the run lives and what it is called.
NOT_INPUTS = ("name", "output_dir")
# Refused when they differ from what an existing run directory was made with (one line, exit 2).
FROZEN_KEYS = ("model.name", "constitution")


def _keys(items, cfg) -> list[str]:
    """The keys of `items` that count for `cfg` (If groups whose condition holds; every key when `cfg` is None),
    in order, once."""
    out: list[str] = []
    for item in items:
        if isinstance(item, str):
            found = [item]
        elif cfg is None or item.when(cfg):
            found = _keys(item.items, cfg)
        else:
            found = []
        out += [key for key in found if key not in out]
    return out


def declared_keys(stage, cfg=None) -> set[str]:
    """Every recipe key `stage` (a `core.stage.Stage`) may read (for `cfg`; every configuration when None),
    hashed or not."""
    d = stage.reads
    keys = set(_keys(d.settings, cfg)) | set(_keys(d.uses, cfg))
    for name in _keys(d.data, cfg):
        keys |= set(_keys(DATA_KEYS[name], cfg))
    return keys


def hashed_keys(stage, cfg) -> set[str]:
    """The recipe keys whose value enters `stage`'s input hash for `cfg` (settings and the keys choosing its data)."""
    d = stage.reads
    keys = set(_keys(d.settings, cfg))
    for name in _keys(d.data, cfg):
        keys |= set(_keys(DATA_KEYS[name], cfg))
    return keys


def exists(stage, cfg) -> bool:
    d = stage.reads
    return d.exists is None or bool(d.exists(cfg))


# --------------------------------------------------------------------------------------------------
# Hashes
# --------------------------------------------------------------------------------------------------


def get(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


@dataclass
class StageInputs:
    """One stage's declared inputs for one round: a hash per input, and their combination."""

    stage: str
    by_input: dict[str, str] = field(default_factory=dict)

    @property
    def hash(self) -> str:
        return content_hash(self.by_input)

    def changed_since(self, stored: dict | None) -> list[str]:
        """The inputs whose hash differs from a stored `by_input` (added or removed ones too)."""
        if not stored:
            return []
        return sorted(k for k in set(stored) | set(self.by_input) if stored.get(k) != self.by_input.get(k))


def stage_inputs(stage, cfg, data_hashes: dict[str, str], *, after: dict[str, str | None] | None = None,
                 k: int | None = None, stack: list[str] | None = None) -> StageInputs:
    """The declared inputs of `stage` (a `core.stage.Stage`; round `k`, on `stack`: the training hashes of the
    stacked rounds).

    `data_hashes` maps each loaded input to its content hash (`RunData.hashes`); `after` maps upstream stage
    names to their input hashes (None: the upstream stage does not exist in this configuration).
    """
    d = stage.reads
    by: dict[str, str] = {}
    for key in _keys(d.settings, cfg):
        by[key] = content_hash(get(cfg, key))
    for name in _keys(d.data, cfg):
        keys = _keys(DATA_KEYS[name], cfg)
        if name == "rules" and not keys:
            continue  # no rule judge: the rule file is not read
        by[f"data:{name}"] = content_hash([data_hashes.get(name), {key: get(cfg, key) for key in keys}])
    for name in d.after:
        if (after or {}).get(name) is not None:
            by[f"after:{name}"] = after[name]
    if d.per_round:
        by["round"] = content_hash(k)
        by["stack"] = content_hash(list(stack or []))
    return StageInputs(stage.name, by)


# --------------------------------------------------------------------------------------------------
# The settings a stage sees: the recipe behind a read-only view that can record what is read
# --------------------------------------------------------------------------------------------------

_recording: dict[str, set[str]] | None = None


@contextlib.contextmanager
def recording() -> Iterator[dict[str, set[str]]]:
    """Inside the block, every recipe key a stage reads through its `view` is noted: {stage: {keys}}."""
    global _recording
    before, _recording = _recording, {}
    try:
        yield _recording
    finally:
        _recording = before


class View:
    """The recipe as one stage reads it: attribute access as on `RecipeConfig`, each key read noted while
    `recording()` is on. Methods of the schema (`model_dump`, `model_copy`) count as reading the whole section;
    `resolve` and `source` are not recipe keys."""

    __slots__ = ("_node", "_stage", "_prefix")

    def __init__(self, node, stage: str, prefix: str = ""):
        object.__setattr__(self, "_node", node)
        object.__setattr__(self, "_stage", stage)
        object.__setattr__(self, "_prefix", prefix)

    def __getattr__(self, name: str):
        from lora_cai.config.schema import Section

        node = object.__getattribute__(self, "_node")
        prefix = object.__getattribute__(self, "_prefix")
        value = getattr(node, name)
        fields = type(node).model_fields
        if name in fields and not fields[name].exclude:
            if isinstance(value, Section):
                return View(value, self._stage, f"{prefix}{name}.")
            self._note(f"{prefix}{name}")
            return value
        if name.startswith("model_"):  # model_dump, model_copy: the whole section
            for key in _leaves(node, prefix):
                self._note(key)
        return value

    def __setattr__(self, name, value):
        raise AttributeError("the recipe is read-only inside a stage")

    def _note(self, key: str) -> None:
        if _recording is not None:
            _recording.setdefault(self._stage, set()).add(key)

    @property
    def stage(self) -> str:
        return self._stage

    def replaced(self, **update) -> "View":
        """This section with `update` applied, as a view of the same stage: making the copy reads nothing (copying
        through `model_copy` would count as reading every key of the section); reading it later is noted."""
        node = object.__getattribute__(self, "_node")
        return View(node.model_copy(update=update), self._stage, self._prefix)


def _leaves(node, prefix: str) -> list[str]:
    from lora_cai.config.schema import Section

    out = []
    for name, f in type(node).model_fields.items():
        if f.exclude:
            continue
        value = getattr(node, name)
        out += _leaves(value, f"{prefix}{name}.") if isinstance(value, Section) else [f"{prefix}{name}"]
    return out


def view(cfg, stage: str) -> View:
    """`cfg` (the recipe, or another stage's view of it) as `stage` reads it."""
    return View(object.__getattribute__(cfg, "_node") if isinstance(cfg, View) else cfg, stage)
