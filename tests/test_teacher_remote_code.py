"""A teacher's repository runs its own code only when `judge.trust_remote_code` says so, whatever the student's
`model.trust_remote_code` is: a model folder whose config maps to code of its own, loaded as a teacher."""

from __future__ import annotations

import json
import shutil

import pytest

from lora_cai.config.load import recipe_from_dict
from lora_cai.errors import UserError
from lora_cai.loop.session import Models

CONFIG_CODE = '''from transformers import LlamaConfig


class MarkedConfig(LlamaConfig):
    model_type = "marked_llama"
'''
MODEL_CODE = '''import os

from transformers import LlamaForCausalLM

from .configuration_marked import MarkedConfig

os.environ["LORA_CAI_TEST_REMOTE_CODE_RAN"] = "1"  # this file was executed


class MarkedForCausalLM(LlamaForCausalLM):
    config_class = MarkedConfig
'''


@pytest.fixture
def remote_code_teacher(tiny_model, tmp_path):
    """The tiny model, with a config that maps to code shipped in its folder (as Hub repositories with custom
    architectures do)."""
    folder = tmp_path / "marked"
    shutil.copytree(tiny_model, folder)
    (folder / "configuration_marked.py").write_text(CONFIG_CODE)
    (folder / "modeling_marked.py").write_text(MODEL_CODE)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="marked_llama", architectures=["MarkedForCausalLM"],
               auto_map={"AutoConfig": "configuration_marked.MarkedConfig",
                         "AutoModelForCausalLM": "modeling_marked.MarkedForCausalLM"})
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def _recipe(student, teacher, tmp_path, **judge):
    return recipe_from_dict({"model": {"name": str(student), "backend": "transformers", "trust_remote_code": True},
                             "data": {"prompts": "builtin:smoke"}, "output_dir": str(tmp_path / "run"),
                             "judge": {"kind": "teacher", "model": str(teacher), "load_in_4bit": False, **judge}})


def test_the_teacher_does_not_inherit_the_students_trust(tiny_model, remote_code_teacher, tmp_path, monkeypatch):
    from rich.console import Console

    monkeypatch.setenv("LORA_CAI_TEST_REMOTE_CODE_RAN", "0")  # restored (unset) after the test
    cfg = _recipe(tiny_model, remote_code_teacher, tmp_path)
    assert cfg.model.trust_remote_code and not cfg.judge.trust_remote_code  # the default: off
    with pytest.raises(UserError, match=r"judge\.model: cannot load") as e:
        Models(Console(quiet=True), tmp_path / "run").teacher(cfg)
    assert "\n" not in str(e.value)
    import os

    assert os.environ["LORA_CAI_TEST_REMOTE_CODE_RAN"] == "0"  # its code never ran
    allowed = _recipe(tiny_model, remote_code_teacher, tmp_path, trust_remote_code=True)
    model, _ = Models(Console(quiet=True), tmp_path / "run").teacher(allowed)
    assert type(model).__name__ == "MarkedForCausalLM" and os.environ["LORA_CAI_TEST_REMOTE_CODE_RAN"] == "1"
