"""Which models are in memory during a run: the round's policy and the local teacher, loaded lazily,
unloaded when they do not fit `vram_gb` together, and the generators and judges built on them.

Every method takes the recipe as the calling stage sees it (`inputs.View`), so what loading a model reads is
counted as that stage's read.
"""

from __future__ import annotations

import time
from pathlib import Path

from lora_cai.errors import UserError


def together_gb(cfg) -> float:
    """The planner's estimate for the student and the local teacher loaded at once (batch 1 each)."""
    from lora_cai.engine.offline_models import resolve_model_path
    from lora_cai.engine.planner import estimate_generation, load_model_config, model_shape

    total = 0.0
    for name, q4 in ((cfg.model.name, cfg.model.load_in_4bit), (cfg.judge.model, cfg.judge.load_in_4bit)):
        name = resolve_model_path(name)
        total += estimate_generation(model_shape(load_model_config(name)), batch=1, seq_len=cfg.model.max_seq_length,
                                     load_in_4bit=q4, dtype_bytes=4 if cfg.model.dtype == "float32" else 2).total_gb
    return total


def policy_identity(stack: list[Path]) -> str:
    """What a server answers for when it serves round k's starting policy: the base and the trained rounds in the
    stack, each by its train stage's input hash (which derives from everything upstream of it). Part of the API
    answer cache's key, so a round retrained on other settings never reads answers its old policy gave under the
    same model name. An adapter without its train record (copied in by hand) counts by its weights' sha256."""
    import hashlib
    import json

    parts = ["base"]
    for adapter in stack:
        record = Path(adapter).parent / "train.json"
        inputs = json.loads(record.read_text()).get("inputs") if record.is_file() else None
        if inputs is None:
            weights = Path(adapter) / "adapter_model.safetensors"
            inputs = "sha256:" + hashlib.sha256(weights.read_bytes() if weights.is_file() else b"").hexdigest()
        parts.append(f"{Path(adapter).parent.name}:{inputs}")
    return "|".join(parts)


class Models:
    """The run's models: at most one policy (base + round k's stack + the new adapter) and one teacher."""

    def __init__(self, console, run_dir: Path):
        self.console, self.run_dir = console, Path(run_dir)
        self.backend: str | None = None
        self.model = self.tokenizer = None
        self.round: int | None = None
        self.frozen: list[str] = []
        self.trained = False  # the policy's new adapter has weights (trained here, or loaded)
        self.teacher_model = self.teacher_tokenizer = None
        self.vllm = None  # the run's vLLM engine (generation.engine: vllm), started on first use

    # ---------------------------------------------------------------- lifetimes
    def resolve_backend(self, cfg) -> str:
        from lora_cai.engine import models

        if self.backend is None:
            self.backend = models.resolve_backend(cfg.model.backend)
            _quiet_library_bars()
        return self.backend

    def policy(self, cfg, k: int, stack: list[Path]):
        """Round k's policy (loaded on first use): `(model, tokenizer)`; `self.frozen` names the stack's adapters."""
        if self.model is not None:
            return self.model, self.tokenizer
        from transformers import set_seed

        from lora_cai.engine import models

        if self.teacher_model is not None and not self.fits_together(cfg):
            self.console.log("unloading the teacher to make room for the student")
            self.drop_teacher()
        backend = self.resolve_backend(cfg)
        set_seed(cfg.seed + k)
        t = time.time()
        self.model, self.tokenizer, self.frozen = models.build_policy(cfg.model, cfg.lora, stack, backend, cfg.seed + k)
        self.round, self.trained = k, False
        self.console.log(f"round {k}: loaded {cfg.model.name} ({'4-bit' if cfg.model.load_in_4bit else 'full'}"
                         f", {backend}) + {len(stack)} frozen adapter(s) in {time.time() - t:.1f}s")
        return self.model, self.tokenizer

    def for_inference(self, cfg, k: int, stack: list[Path]):
        """The policy in eval mode; before training, as the round's starting policy (`models.use_starting_policy`)."""
        from lora_cai.engine import models

        model, tok = self.policy(cfg, k, stack)
        if not self.trained:
            models.use_starting_policy(model, self.frozen)
        models.for_inference(model, self.backend)
        return model, tok

    def for_training(self, cfg, k: int, stack: list[Path]):
        """The policy in training mode: the stack and the new adapter active, only the new one trainable."""
        from lora_cai.engine import models

        if self.vllm is not None:
            self.vllm.release()  # a managed vLLM server gives its memory and cores back to training
        model, tok = self.policy(cfg, k, stack)
        models.use_training_stack(model, self.frozen)
        models.for_training(model, self.backend)
        self.trained = True
        return model, tok

    def with_trained_adapter(self, cfg, k: int, stack: list[Path], adapter: Path):
        """Round k's trained policy in a process that did not train it: the stack plus the saved adapter."""
        from lora_cai.engine import models

        model, tok = self.policy(cfg, k, stack)
        models.load_trainable_weights(model, adapter, self.frozen)
        self.trained = True
        return model, tok

    def drop_policy(self) -> None:
        from lora_cai.engine.models import free

        self.model = self.tokenizer = None
        self.round, self.trained = None, False
        free()

    def teacher(self, cfg):
        """The local teacher, loaded once; the student is unloaded first unless both fit vram_gb."""
        if self.teacher_model is not None:
            return self.teacher_model, self.teacher_tokenizer
        from lora_cai.engine import models
        from lora_cai.config.schema import ModelConfig

        j = cfg.judge
        backend = self.resolve_backend(cfg)
        if self.model is not None and not self.fits_together(cfg):
            self.console.log("unloading the student to make room for the teacher (both do not fit "
                             f"vram_gb={cfg.vram_gb:g}); it is reloaded for training")
            self.drop_policy()
        t = time.time()
        teacher_cfg = ModelConfig(name=j.model, backend=cfg.model.backend, load_in_4bit=j.load_in_4bit,
                                  dtype=cfg.model.dtype, max_seq_length=cfg.model.max_seq_length,
                                  trust_remote_code=j.trust_remote_code)
        try:
            self.teacher_model, self.teacher_tokenizer = models.load_base(teacher_cfg, backend)
        except UserError as e:
            raise UserError(str(e).replace("model.name:", f"{cfg.source}: judge.model:", 1)) from None
        models.for_inference(self.teacher_model, backend)
        self.console.log(f"teacher {j.model} loaded ({'4-bit' if j.load_in_4bit else 'full'}) in {time.time() - t:.1f}s")
        return self.teacher_model, self.teacher_tokenizer

    def fits_together(self, cfg) -> bool:
        """Student and teacher (one generation batch each) within vram_gb, by the planner."""
        try:
            return together_gb(cfg) <= cfg.vram_gb
        except UserError:
            return False  # a model of unknown size: do not risk it

    def drop_teacher(self) -> None:
        from lora_cai.engine.models import free

        if self.teacher_model is not None:
            self.teacher_model = self.teacher_tokenizer = None
            free()

    def drop_teacher_if_crowded(self, cfg) -> None:
        """Before training: a teacher that does not fit beside the student leaves."""
        if self.teacher_model is not None and not self.fits_together(cfg):
            self.drop_teacher()

    def drop_all(self) -> None:
        self.drop_policy()
        self.drop_teacher()

    def close(self) -> None:
        """The run is over: the models leave memory, a managed vLLM server stops, and the adapter this run loaded
        into a user's vLLM server is unloaded (a round's end keeps the server: it serves the next round's start)."""
        self.drop_all()
        if self.vllm is not None:
            self.vllm.close()
            self.vllm = None

    # ---------------------------------------------------------------- what the stages drive
    def generator(self, cfg, k: int, stack: list[Path], *, local: bool = False):
        """The round's policy behind one generation interface: the local model, the recipe's server, or vLLM.

        Evaluation runs locally (`local=True`): the policy just trained is the one in memory; with
        `generation.engine: vllm` that policy (the stack and the trained adapter) is served by vLLM instead.
        """
        g = cfg.generation
        if g.engine == "vllm":
            from lora_cai.engine.vllm import VLLMGenerator

            return VLLMGenerator(self.served(cfg, k, stack), batch_size=g.max_batch_size)
        if not local and g.base_url:
            from lora_cai.engine.api import ChatClient
            from lora_cai.engine.generators import APIGenerator
            from lora_cai.engine.served import expand_model_template

            client = ChatClient(g.base_url, expand_model_template(g.model, k), api_key_env=g.api_key_env,
                                concurrency=g.concurrency, timeout=g.timeout, cache_dir=self.run_dir / "cache" / "api",
                                identity=policy_identity(stack))
            return APIGenerator(client, batch_size=max(g.concurrency * 4, 1))
        return self.local_generator(cfg, *self.for_inference(cfg, k, stack))

    def critic_generator(self, cfg, k: int, stack: list[Path]):
        """Who writes critiques and revisions: the policy, the local teacher or the judge's server."""
        if cfg.critic == "self":
            return self.generator(cfg, k, stack)
        if cfg.critic == "api":
            from lora_cai.engine.generators import APIGenerator

            return APIGenerator(self.judge_client(cfg), batch_size=max(cfg.judge.concurrency * 4, 1))
        return self.local_generator(cfg, *self.teacher(cfg))

    def judge_client(self, cfg):
        from lora_cai.engine.api import ChatClient

        j = cfg.judge
        return ChatClient(j.base_url, j.model, api_key_env=j.api_key_env, concurrency=j.concurrency,
                          timeout=j.timeout, cache_dir=self.run_dir / "cache" / "judge")

    def judge(self, cfg, k: int, stack: list[Path], rules=None):
        """The configured judge: log-probs of the policy or the teacher, a server, or the rule file."""
        from lora_cai.engine import judges as J

        j = cfg.judge
        if j.kind == "rule":
            return rules
        if j.kind == "api":
            return J.APIJudge(self.judge_client(cfg), top_logprobs=j.top_logprobs)
        if j.kind == "self" and cfg.generation.engine == "vllm":
            from lora_cai.engine.vllm import VLLMJudge

            return VLLMJudge(self.served(cfg, k, stack))
        model, tok = self.teacher(cfg) if j.kind == "teacher" else self.for_inference(cfg, k, stack)
        g = cfg.generation
        return J.LogprobJudge(model, tok, kind=j.kind, token_budget=g.token_budget, max_batch_size=g.max_batch_size)

    def cot_generator(self, cfg, k: int, stack: list[Path]):
        """The generator of the judge's chain-of-thought rationales (judge.chain_of_thought)."""
        from lora_cai.engine.generators import APIGenerator

        j = cfg.judge
        if j.kind == "api":
            return APIGenerator(self.judge_client(cfg), batch_size=max(j.concurrency * 4, 1))
        if j.kind == "self" and cfg.generation.engine == "vllm":
            return self.generator(cfg, k, stack)
        model, tok = self.teacher(cfg) if j.kind == "teacher" else self.for_inference(cfg, k, stack)
        return self.local_generator(cfg, model, tok)

    def served(self, cfg, k: int, stack: list[Path]):
        """The policy vLLM serves for round k (`engine.vllm.Served`): the starting policy (base + `stack`), or once
        round k has trained (here, or loaded by `with_trained_adapter`), the stack and round k's adapter."""
        from lora_cai.core.layout import ADAPTER, round_dir
        from lora_cai.engine.vllm import VLLMEngine

        if self.vllm is None:
            self.vllm = VLLMEngine(self.run_dir, self.console)
        policy = [Path(p) for p in stack] + ([self.run_dir / round_dir(k) / ADAPTER] if self.trained else [])
        return self.vllm.policy(cfg, policy, policy_identity(policy), self.resolve_backend(cfg))

    def local_generator(self, cfg, model, tokenizer):
        """The batched engine on an in-process model, sharing prompt prefixes where the backend allows it."""
        from lora_cai.engine.generators import LocalGenerator

        g = cfg.generation
        return LocalGenerator(model, tokenizer, token_budget=g.token_budget, max_batch_size=g.max_batch_size,
                              share_prefix=self.resolve_backend(cfg) != "unsloth")


def _quiet_library_bars() -> None:
    """Our rich bars show progress; the libraries' own tqdm bars (weights, dataset maps) would bury them."""
    import os

    import datasets
    import transformers

    os.environ["TQDM_DISABLE"] = "1"  # TRL's reference-log-prob pass reads this
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
