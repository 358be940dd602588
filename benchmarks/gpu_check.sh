#!/usr/bin/env bash
# One device call: GPU tests, then benchmarks; a short table last. Usage (device machine):
#   bash benchmarks/gpu_check.sh [tests|bench|llama|decode|profile|pdecode|issue3|prefill|gluon|compile|all] ...
#   bash benchmarks/gpu_check.sh reliability   # issue 22: fuzz, determinism, soak, sanitize (each also a mode)
# several modes may be given. BENCH_ARGS / LLAMA_ARGS / DECODE_ARGS / PREFILL_ARGS add options to
# the MLP / Llama / decode-latency / prefill-matmul benchmarks; PROFILE_FACTORY names the model
# `profile` runs; PDECODE_ARGS are profile_decode.py's options (pdecode, issue3, prefill and gluon
# are not part of `all`); GLUON_ARGS add options to the Gluon chain benchmark. FUZZ_ARGS / SOAK_ARGS /
# SANITIZE_ARGS add options to the GPU fuzz campaign (pytest), soak.py and sanitize_models.py
# (fuzz, determinism, soak, sanitize and reliability are not part of `all` either).
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-/tmp/mk_out}"; mkdir -p "$OUT"
modes=" ${*:-all} "
NOT_ALL=" pdecode issue3 prefill gluon fuzz determinism soak sanitize reliability "
want() { [[ "$modes" == *" $1 "* || ("$modes" == *" all "* && "$NOT_ALL" != *" $1 "*) ]]; }
reliable() { want "$1" || want reliability; }  # issue 22's sections: each alone, or all four
left() { echo $(( ${1} < ${2} - SECONDS ? ${1} : (${2} - SECONDS > 30 ? ${2} - SECONDS : 30) )); }  # min(want, end - now)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
rc=0
if want tests; then
  timeout 480 python3 -m pytest -m gpu -q -x -p no:logging ${GPU_TESTS:-tests/test_gpu.py} 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
  rc=${PIPESTATUS[0]}
fi
if want bench; then
  timeout 300 python3 benchmarks/bench_mlp.py --layers 4 ${BENCH_ARGS:-} --json "$OUT/bench_mlp.json" 2>&1 | grep -v Warning | tail -9
fi
if want llama; then
  timeout 480 python3 benchmarks/bench_llama.py ${LLAMA_ARGS:-} --json "$OUT/bench_llama.json" 2>&1 | grep -v Warning | tail -12
fi
if want decode; then
  timeout 400 python3 benchmarks/decode_latency.py ${DECODE_ARGS:---models llama-3.2-1b --batches 1 --ctxs 512} \
    --time-budget 380 --json "$OUT/decode_latency.json" 2>&1 | grep -v Warning | tail -14
fi
if want profile; then
  timeout 200 python3 -m mkcompiler profile "${PROFILE_FACTORY:-examples.factories:llama_1b_decode}" --out "$OUT/profile" \
    2>&1 | grep -v Warning | tail -40
fi
if want pdecode; then  # per-instruction stamps of a decode step, saved under $OUT for offline analysis
  timeout 240 python3 benchmarks/profile_decode.py --out "$OUT" ${PDECODE_ARGS:-} 2>&1 | grep -v Warning | tail -30
fi
if want issue3; then  # issue 3's acceptance runs (not part of `all`): 8B prefill and batch 16 with an fp32 copy,
  # then batches 4 and 64 and a long context on the 1B shapes
  # (8B batch 16 with an fp32 copy was run in session 5: the copy leaves no room for step 1.)
  for a in "--model llama-3.1-8b --batch 1 --ctx 512 --prefill 512 --steps 1 --fp32-ref" \
           "--model llama-3.2-1b --batch 4 --ctx 512 --steps 2" \
           "--model llama-3.2-1b --batch 64 --ctx 1024 --steps 2" \
           "--model llama-3.2-1b --batch 1 --ctx 8190 --steps 2" \
           "--model llama-3.1-8b --batch 16 --ctx 512 --steps 2"; do
    echo "=== bench_llama $a"
    # Streamed (no tail): a run the call's time limit cuts still shows what it printed.
    timeout 240 python3 benchmarks/run_with_stacks.py 150 benchmarks/bench_llama.py $a 2>&1 | tee -a "$OUT/issue3.log" | grep --line-buffered -v Warning \
      | grep --line-buffered -E "rel err|vs fp32|ms|compiled|Error"
  done
fi
if want prefill; then  # matmul instructions' share of cuBLAS's rate on an 8B prefill, per variant
  # (e.g. PREFILL_ARGS='--variant "" --variant "matmul_tile=(128,128,64)"')
  eval "timeout 560 python3 benchmarks/prefill_matmul.py --model llama-3.1-8b --layers 2 --tokens 2048 ${PREFILL_ARGS:-} \
    --time-budget 520 --json $OUT/prefill_matmul.json" 2>&1 | grep -v Warning | tail -16
fi
if want gluon; then  # issue 7: the Gluon streamer's GPU tests, then a dependent matvec chain against the Triton backend
  timeout 200 python3 -m pytest -m gpu -q -x -p no:logging tests/test_gluon_stream.py 2>&1 | tail -4
  timeout 300 python3 benchmarks/gluon_stream_bw.py --chain ${GLUON_CHAIN:-8} --configs 64,128,8 64,128,4 64,256,6 128,128,6 \
    --profile "$OUT/gluon_chain_stamps.npz" ${GLUON_ARGS:-} 2>&1 | grep -v Warning | tail -16
fi
if want compile; then
  timeout 200 python3 benchmarks/compile_times.py --model llama-3.2-1b 2>&1 | grep -v Warning | tail -4
fi
if reliable fuzz; then  # issue 22: random models against eager, one worker per SM (tests/test_gpu_fuzz.py)
  MKCOMPILER_FUZZ_REPORT="$OUT/gpu_fuzz.json" timeout -k 10 "$(left 350 560)" \
    python3 -m pytest -m gpu -q -s -p no:logging tests/test_gpu_fuzz.py \
    --fuzz-budget-s "${FUZZ_BUDGET_S:-210}" ${FUZZ_ARGS:-} 2>&1 | tee "$OUT/gpu_fuzz.log" | grep -v Warning | tail -25
  ((PIPESTATUS[0])) && rc=1
  [[ -d tests/fuzz_repros ]] && cp -r tests/fuzz_repros "$OUT/"  # reproducers of failures, if any
fi
if reliable determinism; then  # issue 22: 1B decode launched 1,000 times, greedy loop runs: bitwise the same
  timeout -k 10 "$(left 200 565)" python3 -m pytest -m gpu -q -s -p no:logging tests/test_gpu_determinism.py 2>&1 \
    | tee "$OUT/gpu_determinism.log" | grep -v Warning | tail -16
  ((PIPESTATUS[0])) && rc=1
fi
if reliable soak; then  # issue 22: 100,000 calls of a small decode megakernel; SOAK PASS/FAIL last
  timeout -k 10 "$(left 120 575)" python3 benchmarks/soak.py --json "$OUT/soak.json" ${SOAK_ARGS:-} 2>&1 | grep -v Warning | tail -3
  ((PIPESTATUS[0])) && rc=1
fi
if reliable sanitize; then  # issue 22: compute-sanitizer memcheck; MEMCHECK PASS/FAIL last
  SANITIZE_TIMEOUT="$(left 280 585)" bash benchmarks/sanitize.sh ${SANITIZE_ARGS:-} 2>&1 | tail -30
  ((PIPESTATUS[0])) && rc=1
fi
echo "gpu tests exit code: $rc"
exit $rc
