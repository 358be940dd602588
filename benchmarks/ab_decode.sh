#!/usr/bin/env bash
# A/B of compile options on one decode step, one device call: each argument is one variant,
# a space-separated list of k=v options (e.g. "num_warps=4 workers_per_sm=2"; "" is the
# default; "env:NAME=VALUE" sets an environment variable for that variant only, e.g. an
# experiment read when the kernel is compiled). Prints each variant's kernel/call ms and how its
# workers spent the span.
#   bash benchmarks/ab_decode.sh "" "schedule=static" ...      (PDECODE_ARGS: model/batch/ctx)
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/mk_out}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader
i=0
for variant in "$@"; do
  opts=(); envs=(); for kv in $variant; do
    if [[ $kv == env:* ]]; then envs+=("${kv#env:}"); else opts+=(--opt "$kv"); fi
  done
  echo "=== variant $i: ${variant:-default}"
  env "${envs[@]}" timeout ${VARIANT_TIMEOUT:-240} python3 benchmarks/profile_decode.py --out "$OUT" --tag "_v$i" ${PDECODE_ARGS:-} "${opts[@]}" 2>&1 \
    | grep -E "RESULT|working|waiting|compiled in|Error|error" | grep -v Warning | tail -6
  i=$((i + 1))
done
