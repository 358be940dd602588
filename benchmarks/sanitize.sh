#!/usr/bin/env bash
# compute-sanitizer memcheck on the megakernels of small models and the tiny Llama decode
# (benchmarks/sanitize_models.py: each compiled, called on fresh inputs, compared with eager).
# Out-of-bounds and misaligned accesses are errors; the megakernel's cross-SM waits are plain
# loads and atomics on its own counters, which memcheck does not flag.
# Usage (device machine, repository root):
#   bash benchmarks/sanitize.sh [sanitize_models.py options, e.g. --fuzz 3 --calls 2]
# COMPUTE_SANITIZER names the tool (default: on PATH, else /usr/local/cuda*/bin); SANITIZE_TIMEOUT
# bounds the run (s, default 280). The full log goes to $OUT/memcheck.log; printed: one line per
# model, memcheck's ERROR SUMMARY, and last a line "MEMCHECK PASS" or "MEMCHECK FAIL ..."
# (exit status 0, 1; 2 when the tool is missing).
set -uo pipefail
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-/tmp/mk_out}"; mkdir -p "$OUT"
SAN="${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || ls -1 /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)}"
if [[ -z "$SAN" || ! -x "$SAN" ]]; then
  echo "MEMCHECK SKIP: compute-sanitizer not found (set COMPUTE_SANITIZER)"
  exit 2
fi
log="$OUT/memcheck.log"
t0=$SECONDS
# Every tensor its own cudaMalloc (no caching allocator): memcheck then knows each buffer's
# bounds, not only those of the allocator's large blocks, so an overrun into a neighbour shows.
# API errors are not counted (PyTorch probes the driver with calls that may fail by design).
PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -k 10 "${SANITIZE_TIMEOUT:-280}" "$SAN" --tool memcheck \
  --report-api-errors no --target-processes application-only --print-limit 50 --error-exitcode 86 \
  python3 benchmarks/sanitize_models.py --max-spin $((1 << 26)) "$@" >"$log" 2>&1
rc=$?
grep -E "^(ok|FAIL) |^    |^sanitize models:" "$log"
summary=$(grep -E "ERROR SUMMARY" "$log" | tail -1)
echo "${summary:-no ERROR SUMMARY line (the run did not finish: exit $rc)}"
errors=$(sed -nE 's/.*ERROR SUMMARY: ([0-9]+) error.*/\1/p' <<<"$summary")
ok=$(grep -cE '^ok ' "$log")
if [[ $rc -eq 0 && "$errors" == "0" && $ok -gt 0 ]]; then
  echo "MEMCHECK PASS: $ok models, 0 errors ($((SECONDS - t0)) s)"
  exit 0
fi
grep -m 40 -E "^========= " "$log" | grep -v "ERROR SUMMARY"  # the first reports: what, where
echo "MEMCHECK FAIL: exit $rc, ${errors:-unknown} memcheck errors, $(grep -cE '^FAIL ' "$log") models failed ($((SECONDS - t0)) s; log $log)"
exit 1
