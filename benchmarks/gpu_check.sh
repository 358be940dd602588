#!/usr/bin/env bash
# One device call: GPU tests, then benchmarks; a short table last. Usage (device machine):
#   bash benchmarks/gpu_check.sh [tests|bench|llama|all]
# BENCH_ARGS / LLAMA_ARGS add options to the MLP / Llama benchmarks.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-/tmp/mk_out}"; mkdir -p "$OUT"
what="${1:-all}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
rc=0
if [[ "$what" == tests || "$what" == all ]]; then
  timeout 480 python3 -m pytest -m gpu -q -x -p no:logging ${GPU_TESTS:-tests/test_gpu.py} 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
  rc=${PIPESTATUS[0]}
fi
if [[ "$what" == bench || "$what" == all ]]; then
  timeout 300 python3 benchmarks/bench_mlp.py --layers 4 ${BENCH_ARGS:-} --json "$OUT/bench_mlp.json" 2>&1 | grep -v Warning | tail -9
fi
if [[ "$what" == llama || "$what" == all ]]; then
  timeout 480 python3 benchmarks/bench_llama.py ${LLAMA_ARGS:-} --json "$OUT/bench_llama.json" 2>&1 | grep -v Warning | tail -12
fi
echo "gpu tests exit code: $rc"
exit $rc
