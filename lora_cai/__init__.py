"""lora_cai: parameter-efficient Constitutional AI on a single consumer GPU."""

__version__ = "0.1.0"


def load_policy(run_dir, **kwargs):
    """Load a finished run's policy: the 4-bit base model with every stacked adapter applied.

    Returns `(model, tokenizer)`. See `lora_cai.models.load_policy` for the options.
    """
    from .models import load_policy as _load_policy

    return _load_policy(run_dir, **kwargs)


__all__ = ["__version__", "load_policy"]
