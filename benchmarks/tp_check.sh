#!/usr/bin/env bash
# Issue 8 on GPUs: a small Llama-shaped decoder under tensor parallelism (TP = 2, and 4 when
# there are 4 GPUs) against single-GPU eager, one process per GPU (tests/test_tp_gpu.py under
# torchrun). Usage (device machine, repository root):
#   bash benchmarks/tp_check.sh [N ...]        # default: 2, then 4 if 4 GPUs are present
# Each run has a hard timeout; TP=4 is skipped if TP=2 failed. If symmetric memory cannot be set
# up with torch's default backend, the run is retried once with MKCOMPILER_SYMM_BACKEND
# (default NVSHMEM, override with RETRY_BACKEND). Logs go to $OUT/tp_check_<N>.log; on failure
# their tails are printed. The last line is the one-line result.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-/tmp/mk_out}"; mkdir -p "$OUT"
LIMIT="${TP_TIMEOUT:-240}"  # seconds per torchrun (compiles included)
gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
worlds="${*:-2 $( ((gpus >= 4)) && echo 4 )}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

run() {  # run N LOG [env...]: one torchrun under the hard timeout; its exit code
  local n=$1 log=$2; shift 2
  env "$@" timeout -k 10 "$LIMIT" torchrun --standalone --nproc-per-node "$n" tests/test_tp_gpu.py >"$log" 2>&1
}

summary=() rc=0 failed=0
for n in $worlds; do
  log="$OUT/tp_check_$n.log"
  if ((n > gpus)); then summary+=("TP=$n SKIP (only $gpus GPUs)"); continue; fi
  if ((failed)); then summary+=("TP=$n not run (a smaller TP failed)"); continue; fi
  t0=$SECONDS
  run "$n" "$log"; r=$?
  if ((r != 0)) && grep -q "symmetric memory setup failed" "$log"; then
    backend="${RETRY_BACKEND:-NVSHMEM}"
    echo "TP=$n: symmetric memory setup failed with the default backend; retrying with $backend"
    grep -m1 "symmetric memory setup failed" "$log" | cut -c1-400
    mv "$log" "$log.default-backend"
    run "$n" "$log" MKCOMPILER_SYMM_BACKEND="$backend"; r=$?
    ((r == 0)) && export MKCOMPILER_SYMM_BACKEND="$backend"  # the next TP starts with what worked
  fi
  if ((r == 0)); then line=$(grep -h "^TP=$n " "$log" | tail -1); else line=$(grep -h "^TP=$n " "$log" | head -1); fi
  if ((r == 124 || r == 137)); then line="TP=$n FAIL: timed out after $LIMIT s"; fi
  if ((r != 0)); then
    rc=1 failed=1
    echo "=== TP=$n failed (exit $r, $((SECONDS - t0)) s); last lines of $log:"
    grep -v "Warning\|warnings.warn" "$log" | tail -30
    [[ -n "$line" ]] || line="TP=$n FAIL (exit $r): see $log"
  fi
  summary+=("$line [$((SECONDS - t0)) s]")
done
printf '%s\n' "${summary[@]}"
echo "tp_check: $( ((rc == 0)) && echo PASS || echo FAIL ) -- $(printf '%s; ' "${summary[@]}" | cut -c1-900)"
exit $rc
