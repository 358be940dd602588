#!/usr/bin/env bash
# One device call: GPU tests on this tree, then the default decode step and prefill of an older
# commit (git archive, same card, same call) and of this tree, interleaved old/new so that clock
# drift falls on both. Usage (device machine, repository root):
#   OLD_COMMIT=08daccd bash benchmarks/old_vs_new.sh     (or OLD_TREE=dir: an older checkout)
# Logs and JSON under $OUT. DECODE_ARGS / PREFILL_ARGS replace the benchmarks' case options.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/mk_out}"; mkdir -p "$OUT"
NEW="$PWD"; OLD="${OLD_TREE:-/tmp/old_tree}"
if [[ -z "${OLD_TREE:-}" ]]; then  # OLD_TREE: an older checkout made beforehand
  rm -rf "$OLD"; mkdir -p "$OLD"
  git archive "${OLD_COMMIT:?name the older commit or OLD_TREE}" | tar -x -C "$OLD" || exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
rc=0
if [[ "${SKIP_TESTS:-0}" != 1 ]]; then
  PYTHONPATH="$NEW" timeout "${TESTS_TIMEOUT:-240}" python3 -m pytest -m gpu -q -x -p no:logging ${GPU_TESTS:-tests/test_gpu.py} \
    2>&1 | tee "$OUT/gpu_tests.log" | grep -E "passed|failed|FAILED|Error" | tail -8
  rc=${PIPESTATUS[0]}
fi
decode_args=${DECODE_ARGS:---models llama-3.2-1b --batches 1 --ctxs 512}
prefill_args=${PREFILL_ARGS:---model llama-3.1-8b --layers 2 --tokens 2048}
for round in $(seq "${ROUNDS:-1}"); do
  for tag in old new; do
    tree=$OLD; [[ $tag == new ]] && tree=$NEW
    echo "=== round $round: $tag decode"
    (cd "$tree" && PYTHONPATH="$tree" timeout 120 python3 benchmarks/decode_latency.py $decode_args --no-torch-compile \
      --no-eager --json "$OUT/decode_${tag}_$round.json" 2>&1 | grep -v Warning | grep -E "kernel|call|ms|rel|Error" | tail -6)
    echo "=== round $round: $tag prefill"
    (cd "$tree" && PYTHONPATH="$tree" timeout 200 python3 benchmarks/prefill_matmul.py $prefill_args --baseline-modes none \
      --json "$OUT/prefill_${tag}_$round.json" 2>&1 | grep -v Warning | tail -8)
  done
done
echo "gpu tests exit code: $rc"
exit $rc
