#!/usr/bin/env bash
# One device call: GPU tests, then benchmarks; a short table last. Usage (device machine):
#   bash benchmarks/gpu_check.sh [tests|bench|all]
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-/tmp/mk_out}"; mkdir -p "$OUT"
what="${1:-all}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
git log --oneline -1 2>/dev/null || true
rc=0
if [[ "$what" == tests || "$what" == all ]]; then
  timeout 420 python3 -m pytest -m gpu -q -x -p no:logging tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
  rc=${PIPESTATUS[0]}
fi
if [[ "$what" == bench || "$what" == all ]]; then
  timeout 400 python3 benchmarks/bench_mlp.py --layers 4 ${BENCH_ARGS:-} --json "$OUT/bench_mlp.json" 2>&1 | grep -v Warning | tail -12
fi
echo "gpu tests exit code: $rc"
exit $rc
