#!/usr/bin/env bash
# One device call: GPU tests, A/B of compile variants on one decode step (ab_decode.sh), then
# decode_latency.py (eager and torch.compile max-autotune + CUDA graphs) with the fastest
# variant's options. Arguments: variants as for ab_decode.sh ("" is the default). Everything is
# streamed and logged under $OUT; DEADLINE (seconds, default 570) bounds the whole call: the
# decode benchmark gets what is left.
#   bash benchmarks/ab_then_decode.sh "" "waits=acquire" "waits=acquire fuse_norm=True"
set -uo pipefail
OUT="${OUT:-/tmp/mk_out}"; mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
start=$SECONDS; deadline=${DEADLINE:-570}
nvidia-smi --query-gpu=name --format=csv,noheader
if [[ "${SKIP_TESTS:-0}" != 1 ]]; then
  timeout "${TESTS_TIMEOUT:-150}" python3 -m pytest -m gpu -q -p no:logging ${GPU_TESTS:-tests/test_gpu.py} 2>&1 \
    | tee "$OUT/gpu_tests.log" | grep -E "passed|failed|FAILED|Error" | tail -8
fi
if [[ -n "${OLD_TREE:-}" && -d "$OLD_TREE" ]]; then  # an older checkout (git archive), same card, same call
  echo "=== old tree $OLD_TREE"
  (cd "$OLD_TREE" && PYTHONPATH="$PWD" timeout "${VARIANT_TIMEOUT:-240}" python3 benchmarks/profile_decode.py --out "$OUT" \
    --tag _old 2>&1 | grep -E "RESULT|working|waiting|compiled in|Error|error" | grep -v Warning | tail -6 | sed 's/^RESULT/OLD/')
fi
bash "$(dirname "$0")/ab_decode.sh" "$@" 2>&1 | tee "$OUT/ab.log"
# "=== variant i: OPTS" is followed by "RESULT ...: kernel X ms, ..."; keep the fastest OPTS.
best=$(awk '/^=== variant/ {sub(/^=== variant [0-9]+: /, ""); v=$0}
            /^RESULT/ {for (i = 1; i < NF; i++) if ($i == "kernel") ms = $(i + 1);
                       if (best == "" || ms + 0 < best + 0) {best = ms; bv = v}}
            END {print bv}' "$OUT/ab.log")
[[ "$best" == default ]] && best=""
left=$(( deadline - (SECONDS - start) - 15 ))
echo "=== fastest variant: ${best:-default}; ${left} s left for decode_latency"
# DECODE_OPTS: options added to the fastest variant's for decode_latency (e.g. errors=deferred).
opts=(); envs=(); for kv in $best ${DECODE_OPTS:-}; do
  if [[ $kv == env:* ]]; then envs+=("${kv#env:}"); else opts+=(--opt "$kv"); fi
done
env "${envs[@]}" timeout $(( left > 30 ? left : 30 )) python3 benchmarks/decode_latency.py --models llama-3.2-1b --batches 1 --ctxs 512 \
  --baseline-modes ${BASELINES:-max-autotune} --time-budget $(( left > 40 ? left - 10 : 30 )) \
  --json "$OUT/decode_latency.json" "${opts[@]}" 2>&1 | grep -v Warning | tee "$OUT/decode.log" | grep -v "^ *$" | tail -20
