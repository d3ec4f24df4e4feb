"""Log-probs without Triton: the chunked CPU fallback for TRL's fused LM-head kernel."""

from __future__ import annotations


# --------------------------------------------------------------------------------------------------
# TRL 1.15 computes log-probs through a fused LM head whose kernel is Triton-only: it is None where
# Triton is missing and fails without a GPU where Triton is installed. Unsloth's CPU path swaps in its
# own twin; the transformers backend on CPU needs this one. Nothing in TRL/transformers offers a
# non-Triton version, so it is written here (plain autograd, one row chunk of logits at a time).
# --------------------------------------------------------------------------------------------------
class _TorchChunkedLogProb:
    """Pure-PyTorch stand-in for `trl.kernels.ChunkedLogProbFunction` (same inputs, same outputs)."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
              logit_scale=1.0, outputs=("log_probs",)):
        import torch

        rows = max(1, (1 << 22) // max(1, weight.shape[0]))  # about 16 MB of fp32 logits per chunk
        cols = {k: [] for k in ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")}
        for start in range(0, max(hidden.shape[0], 1), rows):
            h = hidden[start:start + rows]
            logits = torch.nn.functional.linear(h, weight.to(h.dtype), None if bias is None else bias.to(h.dtype))
            # Half precision is upcast as TRL's kernel does; float64 (the equivalence tests) stays float64.
            logits = (logits.float() if logits.element_size() < 4 else logits) * logit_scale
            if final_logit_softcapping:
                logits = final_logit_softcapping * torch.tanh(logits / final_logit_softcapping)
            logits = logits / temperature
            log_z = torch.logsumexp(logits, dim=-1)
            t = targets[start:start + rows]
            target_logit = logits.gather(-1, t.unsqueeze(-1)).squeeze(-1)
            cols["log_probs"].append(target_logit - log_z)
            if "entropy" in outputs:
                cols["entropy"].append(log_z - (logits.softmax(-1) * logits).sum(-1))
            with torch.no_grad():
                if "log_sum_sq_probs" in outputs:
                    cols["log_sum_sq_probs"].append(torch.logsumexp(2 * (logits - log_z.unsqueeze(-1)), dim=-1))
                if "mean_logits" in outputs:
                    cols["mean_logits"].append(logits.mean(-1))
                if "is_top1" in outputs:
                    cols["is_top1"].append(logits.argmax(-1) == t)
        result = []
        for name in cols:
            if name == "log_probs" or name in outputs:
                result.append(torch.cat(cols[name]) if cols[name] else hidden.new_zeros(0, dtype=torch.float32))
            else:
                result.append(None)
        return tuple(result)


def install_logprob_fallback() -> None:
    """Route TRL's fused LM head to the PyTorch version wherever its Triton kernel cannot run."""
    from trl.trainer import utils as trl_utils

    kernel = getattr(trl_utils, "_ChunkedLogProbFunction", "absent")
    if kernel == "absent" or getattr(kernel, "_unsloth_cpu_dispatch", False) or getattr(kernel, "_lora_cai", False):
        return  # no fused head in this TRL, or Unsloth's CPU twin / ours already routes it

    class _Dispatch:
        _lora_cai = True

        @staticmethod
        def apply(hidden, *args, **kwargs):
            if kernel is not None and hidden.device.type in ("cuda", "xpu"):
                return kernel.apply(hidden, *args, **kwargs)
            return _TorchChunkedLogProb.apply(hidden, *args, **kwargs)

    trl_utils._ChunkedLogProbFunction = _Dispatch
