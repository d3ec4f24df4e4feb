"""How a run's policies are named on a server, defined here and nowhere else.

* `base`: the base model, no adapter;
* `round-k`: the policy after round k's training, the base with rounds 1..k applied, exactly what
  `lora_cai.load_policy(run, upto=k)` computes.

Round k of a run *starts* from `round-(k-1)` (from `base` in round 1): `starting_policy_name(k)`, which a recipe's
`generation.model: "{policy}"` expands to. `lora_cai.serve` answers to these names; the round loop asks for them.
"""

from __future__ import annotations

BASE = "base"


def policy_name(k: int) -> str:
    """The served name of the policy after round k's training (k = 0: the base)."""
    return BASE if k == 0 else f"round-{k}"


def starting_policy_name(k: int) -> str:
    """The served name of round k's starting policy: `base` in round 1, `round-(k-1)` after."""
    return policy_name(k - 1)


def expand_model_template(template: str, k: int) -> str:
    """A recipe's `generation.model` for round k: `{policy}` is the starting policy's served name (`base`,
    `round-1`, ..), `{round}` the number k of the round being generated."""
    return template.replace("{policy}", starting_policy_name(k)).replace("{round}", str(k))
