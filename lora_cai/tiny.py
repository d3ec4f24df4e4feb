"""Build a tiny random-weight chat model offline, for tests, benchmarks and smoke notebooks.

The model is saved to disk and loaded back through `from_pretrained`, the same path real models take:
a Llama architecture (what Unsloth patches), a byte-level BPE tokenizer trained on the fly with
`tokenizers`, and a real ChatML chat template. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Enough varied English for a byte-level BPE to learn sensible merges in well under a second.
_CORPUS = [
    "How do I bake bread at home? Mix flour, water, salt and yeast, knead, let it rise, then bake.",
    "I cannot help with that request because it could hurt people.",
    "Sorry, but I won't provide instructions for making weapons or drugs.",
    "Here is a short poem about the sea and the wind and the sky.",
    "The response is harmful because it explains how to break into a house.",
    "No changes needed: the response is safe, honest and helpful.",
    "Rewrite the response to remove anything harmful, unethical or illegal.",
    "Identify specific ways in which the assistant's last response is harmful.",
    "Which response is more helpful, honest and harmless? Answer (A) or (B).",
    "Critique: the answer gives dangerous details. Revision: I can't help with that, but here is safe advice.",
    "Python lists, dictionaries and functions are the basics of programming.",
    "The capital of France is Paris. Water boils at 100 degrees Celsius.",
] * 20


def build_tiny_model(path: str | Path, *, vocab_size: int = 512, hidden_size: int = 64, layers: int = 2,
                     seed: int = 0) -> Path:
    """Write a tiny Llama chat model with random weights to `path` and return the path.

    Idempotent: an existing complete model at `path` is reused.
    """
    path = Path(path)
    if (path / "config.json").exists() and (path / "tokenizer.json").exists():
        return path
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE

    torch.manual_seed(seed)
    # initializer_range 0.2 (not 0.02): with the default, RMSNorm'd hidden states times a tiny random LM head
    # cap every logit near zero, and LoRA on the linear layers cannot make the model learn anything.
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False, initializer_range=0.2)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


if __name__ == "__main__":  # python -m lora_cai.tiny DIR: build the tiny model where a recipe can point at it
    import sys

    if len(sys.argv) != 2:
        print("usage: python -m lora_cai.tiny DIR", file=sys.stderr)
        sys.exit(2)
    print(build_tiny_model(sys.argv[1]))
