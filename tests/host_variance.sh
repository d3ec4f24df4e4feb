#!/usr/bin/env bash
# Run the equivalence tests under other kernel choices, to see on one host what another CPU would compute.
#
# oneDNN, MKL and ATen pick their kernels, and with them the order of float32 additions, by instruction set and
# thread count. A bound that held on the developer's host can fail on a user's (an Intel Xeon with AMX did). These
# knobs reproduce much of that variance anywhere: every run below must pass.
#   tests/host_variance.sh            the equivalence tests under each knob
#   tests/host_variance.sh -x -k dpo  extra pytest arguments go to every run
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-./.venv/bin/python}
tests=(tests/test_concat.py tests/test_export.py tests/test_judge.py tests/test_api.py tests/test_objectives.py)
knobs=(
  "OMP_NUM_THREADS=1"
  "OMP_NUM_THREADS=2"
  "OMP_NUM_THREADS=2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2"
  "OMP_NUM_THREADS=1 ATEN_CPU_CAPABILITY=avx2"
  "OMP_NUM_THREADS=1 ATEN_CPU_CAPABILITY=default"
)
failed=0
for knob in "${knobs[@]}"; do
  echo "== $knob"
  env $knob "$python" -m pytest -q -p no:cacheprovider "${tests[@]}" "$@" | tail -1 || failed=1
done
exit $failed
