"""The stage list, written once: the stages before round 1 and a round's stages, in the order they run.

Each stage is declared beside its function (`core.stage.Stage`: what it reads, the stages upstream of it, the
files it owns). The round loop, the input hashes, `--restart-from`, the round table and the report read this.
"""

from __future__ import annotations

from lora_cai.stages.critic_check import CRITIC_CHECK_STAGE
from lora_cai.stages.critique import CRITIQUE_STAGE
from lora_cai.stages.evaluate import BASELINE_STAGE, EVAL_STAGE
from lora_cai.stages.judge import JUDGE_STAGE
from lora_cai.stages.principles import PRINCIPLES_STAGE
from lora_cai.stages.responses import RESPONSES_STAGE, SAMPLES_STAGE
from lora_cai.stages.train import TRAIN_STAGE

# Once, before round 1, each writing one file at the run directory's top.
RUN_STAGES = (CRITIC_CHECK_STAGE, BASELINE_STAGE)
# Every round, in this order, each owning its files inside round-<k>/.
ROUND_STAGES = (RESPONSES_STAGE, SAMPLES_STAGE, CRITIQUE_STAGE, JUDGE_STAGE, TRAIN_STAGE, EVAL_STAGE, PRINCIPLES_STAGE)
STAGES = {s.name: s for s in RUN_STAGES + ROUND_STAGES}
ROUND_STAGE_NAMES = tuple(s.name for s in ROUND_STAGES)
# What --restart-from offers (samples restarts with the responses it extends).
RESTARTABLE = tuple(s.name for s in ROUND_STAGES if s.restartable)


def restart_files(stage: str) -> list[str]:
    """File patterns `--restart-from STAGE` supersedes inside its round: the stage's and every later stage's."""
    start = ROUND_STAGE_NAMES.index(stage)
    return [pattern for s in ROUND_STAGES[start:] for pattern in s.files]
