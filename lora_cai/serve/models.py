"""The models `lora_cai.serve` answers for: one base with each round's adapter switched in, under the names
`engine.served` defines (`base`, `round-k`).

A run is served from one base in memory. Each round's policy is one PEFT adapter named `round-k`, built as
`load_policy` builds it: round k's own adapter grown by rounds 1..k-1 as frozen slices (`lora_cai.engine.concat`), so a
request for `round-k` runs the very same computation as `load_policy(run, upto=k)`. Switching is activating that
adapter (or none, for `base`). The memory this costs is the adapters' ranks summed over rounds (1 + 2 + .. + n
round-ranks), small beside the base. Before each request the manifest and the adapter files are looked at again:
rounds that finished since are loaded, and rounds retrained since (`--restart-from`) are reloaded, so a server left
running never answers for a policy that no longer exists.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

from lora_cai.engine.served import BASE, policy_name
from lora_cai.errors import UserError

class OneModel:
    """A single model under one name (a model directory, or a model handed to `start_server`)."""

    def __init__(self, model, tokenizer, name: str):
        self.model, self.tokenizer, self._name = model, tokenizer, name

    def names(self) -> list[str]:
        return [self._name]

    def refresh(self) -> None:
        pass

    @contextlib.contextmanager
    def use(self, name: str):
        """`(model, tokenizer)` computing the policy `name` inside the block; KeyError for a name not served."""
        if name != self._name:
            raise KeyError(name)
        yield self.model, self.tokenizer


def _stamp(path: Path) -> tuple:
    """What identifies an adapter folder's contents without reading them: its files' sizes and change times."""
    out = []
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        try:
            st = os.stat(path / f)
        except OSError:
            return ()
        out.append((f, st.st_size, st.st_mtime_ns))
    return tuple(out)


class RunModels:
    """A run's base and rounds, from one base in memory with one adapter per round."""

    def __init__(self, run_dir: str | Path, *, backend: str = "auto"):
        from lora_cai.config.schema import ModelConfig
        from lora_cai.engine.models import load_base, resolve_backend
        from lora_cai.core.store import RunStore

        self.store = RunStore(run_dir)
        manifest = self._manifest()
        self.backend = resolve_backend(backend if backend != "auto" else manifest.get("backend", "auto"))
        self.model, self.tokenizer = load_base(ModelConfig(**manifest["model"]), self.backend)
        self._loaded: list[tuple[str, tuple]] = []  # per round: (stack entry, stamp of its folder)
        self.refresh()

    def _manifest(self) -> dict:
        manifest = self.store.read_manifest()
        if manifest is None:
            raise UserError(f"{self.store.root}: no manifest.json here; is this a lora_cai run directory?")
        return manifest

    def names(self) -> list[str]:
        return [policy_name(k) for k in range(len(self._loaded) + 1)]

    def refresh(self) -> None:
        """Load the rounds finished since the last look; reload every round from the first one whose adapter
        changed on disk (a round retrained replaces its own policy and every later one)."""
        stack = self._manifest()["stack"]
        wanted = [(rel, _stamp(self.store.root / rel)) for rel in stack]
        same = 0
        while same < min(len(wanted), len(self._loaded)) and wanted[same] == self._loaded[same]:
            same += 1
        if same == 0 and self._loaded:  # every round changed: back to the bare base (PEFT keeps one adapter)
            self.model, self._loaded = self.model.unload(), []
        for k in range(len(self._loaded), same, -1):
            with warnings.catch_warnings():  # PEFT says when the adapter it deletes was the active one
                warnings.filterwarnings("ignore", message=".*was active which is now deleted")
                self.model.delete_adapter(policy_name(k))
            self._loaded.pop()
        for k in range(same + 1, len(wanted) + 1):
            self._load_round(k, [self.store.root / rel for rel, _ in wanted[:k]])
            self._loaded.append(wanted[k - 1])

    def _load_round(self, k: int, paths: list[Path]) -> None:
        """Adapter `round-k`: round k's own adapter grown by rounds 1..k-1, as `load_policy(upto=k)` builds it."""
        from lora_cai.engine import concat
        from lora_cai.engine.models import add_stack_adapter, for_inference

        self.model = add_stack_adapter(self.model, paths, policy_name(k))
        if hasattr(self.model, concat.ATTR):
            delattr(self.model, concat.ATTR)  # one Concat per model is what training expects; here there are many
        for_inference(self.model, self.backend)

    @contextlib.contextmanager
    def use(self, name: str):
        from lora_cai.engine.models import set_active

        if name not in self.names():
            raise KeyError(name)
        if name == BASE:
            if self._loaded:
                with self.model.disable_adapter():
                    yield self.model, self.tokenizer
            else:
                yield self.model, self.tokenizer
            return
        set_active(self.model, [name])
        yield self.model, self.tokenizer


def load_models(path: str | Path, *, model_name: str | None = None):
    """What `python -m lora_cai.serve PATH` serves: a run directory's base and rounds, or one model directory
    (fp32 on the CPU) under `model_name` (default: the directory's name)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such model or run directory")
    if (path / "manifest.json").is_file():
        if model_name:
            raise UserError(f"--model-name names a single model; a run's models are named "
                            f"{BASE}, {policy_name(1)}, ..: drop --model-name")
        return RunModels(path)
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: neither a run directory (manifest.json) nor a model directory (config.json)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return OneModel(model, tokenizer, model_name or path.resolve().name)
