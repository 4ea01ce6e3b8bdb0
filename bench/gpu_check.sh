#!/usr/bin/env bash
# The GPU check (issue 13), one command, sized for under 9 minutes on one CUDA GPU:
#   1. the tests that build and train models, with the device set to CUDA
#      (FEDLORA_TEST_DEVICE=cuda puts device=cuda into every tiny-model run);
#   2. bench/precision.py on CUDA and on the CPU: seconds per client step and peak memory
#      for MiniLM fp32/bf16 and SmolLM2 bf16/int8/nf4, printed as a table with ratios;
#   3. bench/lockstep.py on CUDA: clients one after another vs in lockstep
#      (client_parallel), client-steps per second and peak memory for 3 and 10 clients,
#      and the largest difference between the two paths' updates.
# Needs fedlora's environment (`make install`, or PY=<a python with it>) on a machine
# where torch sees a GPU. Record the printed table in docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 2)" \
  || { echo "gpu_check: torch sees no CUDA device here" >&2; exit 2; }
"$PY" -c "import torch; print('device:', torch.cuda.get_device_name(0), 'torch', torch.__version__)"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
FEDLORA_TEST_DEVICE=cuda timeout 240 "$PY" -m pytest -q -x -p no:cacheprovider \
  tests/models tests/client tests/aggregation tests/methods \
  tests/runtime/test_inprocess.py tests/runtime/test_correctness.py tests/llm/test_llm_rounds.py
timeout 200 "$PY" bench/precision.py --device cuda --compare-cpu --steps 3 --warmup 1 --child-timeout 60 \
  --variants minilm:fp32 minilm:bf16 smollm2:bf16 smollm2:int8 smollm2:nf4
timeout 60 "$PY" bench/lockstep.py --device cuda --clients 3 10 --steps 5 --warmup 1
