#!/usr/bin/env bash
# Issue 8 throughput on GPUs: benchmarks/tp_throughput.py (mkcompiler vs the peer baseline
# ../shared/bench/peer_llama_tp.py, one torchrun process group) under a hard timeout. Usage
# (device machine, repository root):
#   bash benchmarks/tp_bench.sh [N] [more tp_throughput.py options]   # N: GPUs (default: all)
#   CASES=prefill4096 bash benchmarks/tp_bench.sh 4
#   CASES=decode256 bash benchmarks/tp_bench.sh 4 --profile "$OUT/tp_profile"   # + rank 0's profile
#   CASES=prefill4096 bash benchmarks/tp_bench.sh 4 --exchange    # the post-attention exchange
# Environment: MODEL (llama-70b), LAYERS (10), CASES (decode256,prefill4096,decode64),
# TP_BENCH_BUDGET (480 s: --time-budget, what would end later is skipped), TP_BENCH_TIMEOUT (560 s:
# the hard limit of the torchrun). The log is tee'd to $OUT/tp_bench_<N>.log, the JSON written to
# $OUT/tp_bench_<N>.json (rewritten after every case: a cut-off run keeps what it measured).
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-/tmp/mk_out}"; mkdir -p "$OUT"
gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
n="${1:-$gpus}"; (($# > 0)) && shift
if ((n < 1 || n > gpus)); then echo "tp_bench: asked for $n GPUs, this machine has $gpus"; exit 2; fi
LIMIT="${TP_BENCH_TIMEOUT:-560}"
BUDGET="${TP_BENCH_BUDGET:-480}"
log="$OUT/tp_bench_$n.log" json="$OUT/tp_bench_$n.json"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
echo "tp_bench: $n GPUs, hard limit $LIMIT s, budget $BUDGET s; log $log"
t0=$SECONDS
timeout -k 15 "$LIMIT" torchrun --standalone --nproc-per-node "$n" benchmarks/tp_throughput.py \
  --model "${MODEL:-llama-70b}" --layers "${LAYERS:-10}" --cases "${CASES:-decode256,prefill4096,decode64}" \
  --time-budget "$BUDGET" --json "$json" "$@" 2>&1 | tee "$log" | grep --line-buffered -v "Warning\|warnings.warn"
rc=${PIPESTATUS[0]}
if ((rc == 124 || rc == 137)); then echo "tp_bench: TIMED OUT after $LIMIT s (the tables above are what was measured)"; fi
echo "tp_bench: exit $rc after $((SECONDS - t0)) s; log $log, JSON $json"
exit "$rc"
