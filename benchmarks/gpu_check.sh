#!/usr/bin/env bash
# One GPU check, at most 9.5 minutes (GPU_CHECK_MAX_S) on an H100, no network and no install needed:
#   bash benchmarks/gpu_check.sh [OUT_DIR]        (OUT_DIR defaults to $OUT, else ./gpu_check_out)
# From the repository root (it cd's there itself) with PYTHONPATH=. it
#   1. prints the card, driver, torch / CUDA / cuDNN / triton versions,
#   2. runs the Triton kernel CUDA tests (pytest -m cuda: every kernel test's CUDA instance,
#      but the torch.compile ones, which come last: step 6),
#   3. runs benchmarks/bench_step.py (training-step img/s, MFU, peak memory) with a budget,
#   4. runs benchmarks/bench_ops.py (fused ops vs eager/compile, CUDA-graph timing, and the
#      row kernels at several launch shapes: --row-configs) with a budget, then its `infer`
#      mode for the MLP (the teacher's no-grad path: cuBLASLt bias+GELU epilogue), then
#      benchmarks/bench_update.py (AdamW + EMA: torch + EMA pass vs the one-pass extension),
#   5. runs the step and extension CUDA tests (tests/test_step_cuda.py: CUDA-graph step vs
#      eager, attention backends; tests/test_fused_ema.py, tests/test_fused_adamw_ema.py: the
#      C++/CUDA extension, JIT-built in the background meanwhile),
#   6. runs the kernels' torch.compile CUDA tests (no graph break around our custom ops),
#   7. runs train.py on the GPU for 60 steps (the main job's path: data, the captured bf16
#      step, a checkpoint, a sample grid),
# in that order (kernels changed since the last GPU run; the step tests passed there; the
# test parts in parallel processes when pytest-xdist is there), each under `timeout`
# (SIGINT, so pytest still reports what ran; then SIGKILL)
# so one hang cannot eat the others' time, and writes the
# full log (gpu_check.log), pytest's junit XML and both benchmark CSVs (rows appended as they
# are measured) into OUT_DIR. A short summary is printed last. Part budgets (seconds) can be
# overridden: T_TESTS, T_STEP, T_OPS, T_INFER, T_UPDATE, T_TESTS_STEP, T_COMPILE, T_TRAIN
# (defaults 60 + 215 + 90 + 30 + 30 + 60 + 35 + 45 s, fitted into 570 s with start-up: see
# GPU_CHECK_MAX_S).
# GPU_CHECK_BUDGET_S fits the whole run into that many seconds, GPU_CHECK_DEADLINE (unix
# seconds) into the time until then (see below).
# GPU_CHECK_WORK=DIR keeps the parts' outputs out of OUT_DIR (then OUT_DIR holds gpu_check.log,
# three junit XMLs and two CSVs). GPU_CHECK_DRY=1 runs both benchmarks in their --quick CPU
# mode (to try the script here).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT_DIR="${1:-${OUT:-$ROOT/gpu_check_out}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
LOG="$OUT_DIR/gpu_check.log"
# each part's own output and the extension's build log (all also in gpu_check.log): apart
# from OUT_DIR when GPU_CHECK_WORK is set, so OUT_DIR holds six files (the device tool
# returns at most eight)
WORK="${GPU_CHECK_WORK:-$OUT_DIR}"
mkdir -p "$WORK"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-$(command -v python || command -v python3)}"
T_TESTS="${T_TESTS:-60}"
T_STEP="${T_STEP:-215}"
T_OPS="${T_OPS:-90}"
T_INFER="${T_INFER:-30}"
T_UPDATE="${T_UPDATE:-30}"
T_TESTS_STEP="${T_TESTS_STEP:-60}"
T_COMPILE="${T_COMPILE:-35}"
T_TRAIN="${T_TRAIN:-45}"

# GPU_CHECK_BUDGET_S: the seconds this whole script may take (the device time left once the
# machine is up, less a margin). Unset: the part budgets above, fitted into GPU_CHECK_MAX_S.
# Set and short:
# each part gets its floor in order of need (step figures, kernel tests, step tests, ops,
# update, infer, compile tests, train smoke; a part whose floor no longer fits is skipped), the
# rest of the time tops parts up towards their budgets in that same order. The run order is
# unchanged; when a part starts it may take up to its own budget from what is left after the
# later parts' planned time (a part that ends early passes its time on), never past the
# deadline.
# GPU_CHECK_DEADLINE (unix seconds, the caller's clock) sets it to the time until then: the
# caller knows when its device time runs out (its clock at the call + the time left then), not
# how much of it the machine's start will take.
# GPU_CHECK_MAX_S (default 570) caps either: one device command may run 600 s at most.
BUDGET_S="${GPU_CHECK_BUDGET_S:-0}"
if [ "$BUDGET_S" -le 0 ] && [ -n "${GPU_CHECK_DEADLINE:-}" ]; then
  BUDGET_S=$(( GPU_CHECK_DEADLINE - $(date +%s) ))
  if [ "$BUDGET_S" -lt 60 ]; then
    BUDGET_NOTE="GPU_CHECK_DEADLINE is ${BUDGET_S}s away (clock skew, or no time left): running
the shortest check (60 s)"; BUDGET_S=60
  fi
fi
MAX_S="${GPU_CHECK_MAX_S:-570}"
if [ "$MAX_S" -gt 0 ] && { [ "$BUDGET_S" -le 0 ] || [ "$BUDGET_S" -gt "$MAX_S" ]; }; then
  BUDGET_S=$MAX_S
fi
FIXED_S=35   # environment report + summary + slack
PRIORITY=(STEP TESTS TESTS_STEP OPS UPDATE INFER COMPILE TRAIN)
# train_smoke: start-up, cold Triton compiles at its width, capture, 2 checkpoints, a grid
declare -A FLOOR=([STEP]=150 [TESTS]=45 [TESTS_STEP]=45 [OPS]=45 [UPDATE]=15 [INFER]=15 [COMPILE]=25
                  [TRAIN]=45)
ORDER=(TESTS STEP OPS INFER UPDATE TESTS_STEP COMPILE TRAIN)   # the order they run in
declare -A WANT=([STEP]=$T_STEP [TESTS]=$T_TESTS [TESTS_STEP]=$T_TESTS_STEP [OPS]=$T_OPS
                 [UPDATE]=$T_UPDATE [INFER]=$T_INFER [COMPILE]=$T_COMPILE [TRAIN]=$T_TRAIN)
declare -A GIVE=()
for k in "${PRIORITY[@]}"; do GIVE[$k]=${WANT[$k]}; done
if [ "$BUDGET_S" -gt 0 ]; then
  left=$(( BUDGET_S - FIXED_S ))
  for k in "${PRIORITY[@]}"; do
    f=${FLOOR[$k]}; [ "${WANT[$k]}" -lt "$f" ] && f=${WANT[$k]}
    if [ "$left" -ge "$f" ]; then GIVE[$k]=$f; left=$(( left - f )); else GIVE[$k]=0; fi
  done
  for k in "${PRIORITY[@]}"; do
    [ "${GIVE[$k]}" -gt 0 ] || continue
    more=$(( WANT[$k] - GIVE[$k] )); [ "$more" -gt "$left" ] && more=$left
    GIVE[$k]=$(( GIVE[$k] + more )); left=$(( left - more ))
  done
  T_STEP=${GIVE[STEP]}; T_TESTS=${GIVE[TESTS]}; T_TESTS_STEP=${GIVE[TESTS_STEP]}
  T_OPS=${GIVE[OPS]}; T_UPDATE=${GIVE[UPDATE]}; T_INFER=${GIVE[INFER]}; T_COMPILE=${GIVE[COMPILE]}
  T_TRAIN=${GIVE[TRAIN]}
fi

if [ "${GPU_CHECK_PLAN_ONLY:-0}" = "1" ]; then   # print the part budgets and stop (tests)
  echo "budget ${BUDGET_S} tests_kernels ${T_TESTS} bench_step ${T_STEP} bench_ops ${T_OPS}" \
       "bench_infer ${T_INFER} bench_update ${T_UPDATE} tests_step ${T_TESTS_STEP}" \
       "tests_compile ${T_COMPILE} train_smoke ${T_TRAIN}"
  exit 0
fi
exec > >(tee -a "$LOG") 2>&1
START=$(date +%s)
declare -a SUMMARY=()
[ -n "${BUDGET_NOTE:-}" ] && echo "$BUDGET_NOTE"
[ "$BUDGET_S" -gt 0 ] && echo "budget ${BUDGET_S}s: tests_kernels ${T_TESTS}, bench_step ${T_STEP}," \
  "bench_ops ${T_OPS}, bench_infer ${T_INFER}, bench_update ${T_UPDATE}," \
  "tests_step ${T_TESTS_STEP}, tests_compile ${T_COMPILE}, train_smoke ${T_TRAIN} (0: skipped)"

# kept free at the end: a part may outlive its limit by the 15 s SIGKILL grace, then the
# summary (its Python calls bounded below) must still print before the deadline
END_MARGIN_S=40

limit_for() {  # limit_for KEY: the seconds part KEY may take now (0: skip it)
  local key="$1" t="${WANT[$1]}" reserve=0 after=0 j
  if [ "$BUDGET_S" -gt 0 ]; then
    for j in "${ORDER[@]}"; do   # the later parts' planned time stays theirs
      [ "$after" = 1 ] && reserve=$(( reserve + GIVE[$j] ))
      [ "$j" = "$key" ] && after=1
    done
    local avail=$(( START + BUDGET_S - END_MARGIN_S - $(date +%s) - reserve ))
    [ "$t" -gt "$avail" ] && t=$avail
    # a part planned out runs only if time freed since covers its floor
    if [ "${GIVE[$key]}" -eq 0 ] && [ "$t" -lt "${FLOOR[$key]}" ]; then t=0; fi
  fi
  [ "$t" -lt 0 ] && t=0
  echo "$t"
}

upto_deadline() {  # upto_deadline T: T, or less when the budget's deadline is nearer
  local t="$1"
  if [ "$BUDGET_S" -gt 0 ]; then
    local until_deadline=$(( START + BUDGET_S - END_MARGIN_S - $(date +%s) ))
    [ "$t" -gt "$until_deadline" ] && t=$until_deadline
  fi
  echo "$t"
}

part() {  # part NAME TIMEOUT_S CMD...: run under timeout, record rc and duration
  local name="$1" limit="$2"; shift 2
  local t0 rc
  limit=$(upto_deadline "$limit")   # never past the deadline (summary time kept)
  if [ "$limit" -lt 10 ]; then
    echo; echo "=================== $name: SKIPPED (budget) ==================="
    SUMMARY+=("$(printf '%-13s %-16s %4ss' "$name" "SKIPPED (budget)" 0)")
    return 0
  fi
  echo
  echo "=================== $name (limit ${limit}s) ==================="
  echo "+ $*"
  t0=$(date +%s)
  # SIGINT first: pytest then still writes its junit XML and summary for the tests that ran,
  # and the benchmarks have written their CSV rows as measured; SIGKILL 15 s later
  timeout -s INT -k 15 "$limit" "$@" 2>&1 | tee "$WORK/$name.out"
  rc=${PIPESTATUS[0]}
  local dt=$(( $(date +%s) - t0 ))
  local what="ok"
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && what="TIMED OUT"
  [ $rc -eq 5 ] && [[ " $* " == *" pytest "* ]] && what="NO TESTS"   # pytest: none selected
  [ $rc -ne 0 ] && [ "$what" = "ok" ] && what="FAILED (rc $rc)"
  SUMMARY+=("$(printf '%-13s %-16s %4ss' "$name" "$what" "$dt")")
  return 0
}

echo "=================== environment ==================="
date -Is
echo "repo: $ROOT   out: $OUT_DIR   python: $PY"
(git rev-parse --short HEAD && git status --short | head -20) 2>/dev/null || echo "(no git)"
nvidia-smi || echo "(nvidia-smi failed)"
timeout 60 "$PY" - <<'EOF'
import torch, platform
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version())
try:
    import triton; print("triton", triton.__version__)
except Exception as e:
    print("triton: not importable:", e)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", torch.cuda.get_device_name(0), "sm", f"{p.major}{p.minor}", "|",
          round(p.total_memory / 2**30, 1), "GiB |", p.multi_processor_count, "SMs")
else:
    print("NO CUDA DEVICE VISIBLE")
print("SDPA priority API:", hasattr(torch._C, "_set_sdp_priority_order"),
      "| CUDAGraph.register_generator_state:",
      hasattr(torch.cuda.CUDAGraph, "register_generator_state"))
from sra_fast.ops import attention as A
print("flash_attn builds importable:", [c[0] for c in A._fa_candidates()] or "none")
EOF

# JIT-build the C++/CUDA extension in the background while the kernel tests run, so that
# tests/test_fused_ema.py and the fused-EMA bench provider find it built (same cache dir);
# SIGINT at the limit, so torch's build releases its lock file (SIGTERM would leave it, and
# every later load would wait on it)
rm -f "$WORK/ext_build.ok" "$WORK/ext_build.failed"
EXT_BUILD='
from sra_fast import ext
m = ext.load(jit=True)
cuda = m is not None and m.with_cuda
print("[ext] built:", ext.available(), "with CUDA:", cuda, ext.unavailable_reason())
raise SystemExit(0 if cuda else 1)'
# (the whole subshell redirected: holding the log's pipe, it would keep the script's output
# open after its end; stopped at the end if still running)
( SRA_FAST_JIT_EXT=1 MAX_JOBS=8 timeout -s INT -k 15 300 "$PY" -c "$EXT_BUILD" \
    && touch "$WORK/ext_build.ok" || touch "$WORK/ext_build.failed" ) \
    </dev/null >"$WORK/ext_build.out" 2>&1 &
EXT_PID=$!
ext_check() {  # before each part that loads the extension: a build that failed is not
  # retried inside that part's time (a running one is waited for)
  if [ -f "$WORK/ext_build.failed" ]; then
    if [ -n "${SRA_FAST_JIT_EXT-unset}" ]; then   # "": already said so
      echo "extension build failed: the parts from here on run without it"
      tail -20 "$WORK/ext_build.out"
    fi
    export SRA_FAST_JIT_EXT=""
  else
    export SRA_FAST_JIT_EXT=1
  fi
}

HAVE_PYTEST=0
"$PY" -c "import pytest" 2>/dev/null && HAVE_PYTEST=1
# pytest-xdist (in the lent machine's image): the CUDA tests are mostly Triton compiles and
# fp64 references, so GPU_CHECK_WORKERS processes (default 8 of its 16 cores) share the part's
# time; `timeout` signals its whole process group, workers included
XDIST=()
if [ "${GPU_CHECK_WORKERS:-8}" -gt 1 ] && "$PY" -c "import xdist" 2>/dev/null; then
  XDIST=(-n "${GPU_CHECK_WORKERS:-8}")
fi
if [ $HAVE_PYTEST = 1 ]; then
  # the Triton kernels' CUDA tests; the extension's and the step's come last (the extension is
  # still building in the background)
  # (their torch.compile instances, ~5-15 s each, run last: tests_compile)
  # every test file but the step/extension ones, the Triton-GEMM autotuning ones
  # (test_linear_act.py) last so a cut-off part loses them first
  KERNEL_TEST_FILES=$(ls tests/test_*.py | grep -v -e test_step_cuda -e test_fused_ema \
                      -e test_fused_adamw_ema -e test_linear_act)
  part tests_kernels "$(limit_for TESTS)" "$PY" -m pytest -q "${XDIST[@]}" -m cuda $KERNEL_TEST_FILES \
       tests/test_linear_act.py -k "not compile" -p no:cacheprovider \
       -rfEs --continue-on-collection-errors --junitxml="$OUT_DIR/pytest_cuda_kernels.xml"
else
  echo "pytest is not installed: CUDA tests skipped"; SUMMARY+=("tests      NOT RUN (no pytest)")
fi

# the benchmarks use the extension built above (fused-EMA and one-pass providers)
ext_check

STEP_ARGS=()
[ "${GPU_CHECK_DRY:-0}" = "1" ] && STEP_ARGS+=(--quick)
# Ordered by importance: with the budget, the later entries are the ones skipped.
# Ours and the eager reference for both headline models first (seconds each), then the
# off-the-shelf best (a cold torch.compile may take minutes: B/2's, the smaller graph, first;
# each is cut off --after-compile-s before the budget's end so the entries after it still
# run), then the rest.
PLAN="SiT-XL/2@64=ours-graph;SiT-B/2@256=ours-graph;SiT-XL/2@64=eager-ref;SiT-B/2@256=eager-ref"
PLAN+=";SiT-B/2@256=compile-ro;SiT-XL/2@64=compile-ro"
PLAN+=";SiT-XL/2@64=ours-compile-graph"   # inductor inside our graph: the candidate default
PLAN+=";SiT-XL/2@64=ours-graph-t16,ours-graph-fema,ours-graph-1p,ours;SiT-B/2@256=ours"
PLAN+=";DiT-XL/2@64=ours-graph,ours"
PLAN+=";SiT-XL/2@32@512=ours-graph,eager-ref"
PLAN+=";SiT-XL/2@64=ours-graph-sync"
PLAN+=";SiT-XL/2@64=compile-graph,compile"
[ "${GPU_CHECK_DRY:-0}" = "1" ] && PLAN="tiny-SiT@8=eager-ref,ours,ours-graph,ours-graph-sync;tiny-DiT@8=ours-graph"
L=$(limit_for STEP)
part bench_step "$L" "$PY" benchmarks/bench_step.py "${STEP_ARGS[@]}" --plan "$PLAN" \
     --steps 12 --warmup 3 --budget-s $(( L > 35 ? L - 25 : 10 )) --compile-reserve-s 75 \
     --after-compile-s 40 \
     --csv "$OUT_DIR/bench_step.csv"

# XL/2 shapes only: bench_ops compiles each op for its `compile` provider; its CSV rows are
# written as measured, its table only at the end (the --budget-s stops it in time)
# the ops in order of their weight in a step (the fused residual+LN runs twice per block)
# ours before compile: a cold compile cut off by the time limit then costs only its own row
OPS_ARGS=(--mode fwd+bwd --timing graph --csv "$OUT_DIR/bench_ops.csv"
          --providers eager,triton,triton-gemm,compile
          --op gated_residual_adaln_norm,align_loss,mlp,projector,adaln_norm,gated_residual
          --row-configs 2048x8,4096x16)   # the default launch shape, then the old one
[ "${GPU_CHECK_DRY:-0}" = "1" ] || OPS_ARGS+=(--model XL/2)
[ "${GPU_CHECK_DRY:-0}" = "1" ] && OPS_ARGS+=(--quick)
if [ -f benchmarks/bench_ops.py ]; then
  if "$PY" benchmarks/bench_ops.py --help 2>/dev/null | grep -q -- "--budget-s"; then
    L=$(limit_for OPS); OPS_ARGS+=(--budget-s $(( L > 25 ? L - 15 : 10 )))
  fi
  part bench_ops "$(limit_for OPS)" "$PY" benchmarks/bench_ops.py "${OPS_ARGS[@]}"
  # the teacher's MLP (no grad): ours = cuBLASLt bias+GELU epilogue, vs eager and compile
  INFER_ARGS=(--op mlp --mode infer --providers eager,triton,compile --timing graph
              --csv "$OUT_DIR/bench_ops.csv" --budget-s $(( $(limit_for INFER) > 18 ? $(limit_for INFER) - 8 : 10 )))
  if [ "${GPU_CHECK_DRY:-0}" = "1" ]; then INFER_ARGS+=(--quick); else INFER_ARGS+=(--model XL/2); fi
  part bench_infer "$(limit_for INFER)" "$PY" benchmarks/bench_ops.py "${INFER_ARGS[@]}"
fi
# the parameter update alone (SiT-XL/2's 675M parameters; extension built in the background)
ext_check
UPDATE_ARGS=(--csv "$OUT_DIR/bench_ops.csv")
if [ "${GPU_CHECK_DRY:-0}" = "1" ]; then UPDATE_ARGS+=(--quick); else UPDATE_ARGS+=(--model SiT-XL/2); fi
part bench_update "$(limit_for UPDATE)" "$PY" benchmarks/bench_update.py "${UPDATE_ARGS[@]}"

ext_check
if [ $HAVE_PYTEST = 1 ]; then
  part tests_step "$(limit_for TESTS_STEP)" "$PY" -m pytest -q "${XDIST[@]}" -m cuda tests/test_step_cuda.py \
       tests/test_fused_ema.py tests/test_fused_adamw_ema.py -p no:cacheprovider -rfEs \
       --continue-on-collection-errors \
       --junitxml="$OUT_DIR/pytest_cuda_step.xml"
  part tests_compile "$(limit_for COMPILE)" "$PY" -m pytest -q "${XDIST[@]}" -m cuda tests/ -k "compile" \
       --ignore=tests/test_step_cuda.py --ignore=tests/test_fused_ema.py \
       --ignore=tests/test_fused_adamw_ema.py -p no:cacheprovider \
       -rfEs --continue-on-collection-errors --junitxml="$OUT_DIR/pytest_cuda_compile.xml"
fi

# the trainer itself on the GPU (the main job's path: data, the step in bf16 captured in a
# CUDA graph with the bf16 teacher shadow, logging, a checkpoint, a sample grid), 60 steps of
# the embedded digits run
TRAIN_ARGS=(--max-steps 60 --precision bf16 --log-every 20 --ckpt-every 30 --sample-every 60
            --sample-num-steps 10 --out-dir "$WORK/train_smoke" --exp-name gpu-check)
[ "${GPU_CHECK_DRY:-0}" = "1" ] || TRAIN_ARGS+=(--device cuda --cuda-graph --teacher-bf16)
rm -rf "$WORK/train_smoke"
part train_smoke "$(limit_for TRAIN)" "$PY" train.py "${TRAIN_ARGS[@]}"

EXT_STATE=""
if kill -0 "$EXT_PID" 2>/dev/null; then   # still building: stopped (SIGINT through timeout)
  pkill -INT -P "$EXT_PID" 2>/dev/null; kill "$EXT_PID" 2>/dev/null
  EXT_STATE="build still running at the end: stopped"
fi
echo
echo "=================== SUMMARY ($(( $(date +%s) - START ))s total) ==================="
for s in "${SUMMARY[@]}"; do echo "  $s"; done
if [ -n "$EXT_STATE" ]; then
  echo "  extension: $EXT_STATE"
elif [ -f "$WORK/ext_build.ok" ] || [ -f "$WORK/ext_build.failed" ]; then
  echo "  extension: $(grep -h '^\[ext\]' "$WORK/ext_build.out" | tail -1)"
else
  echo "  extension: build not started"
fi
for xml in "$OUT_DIR"/pytest_cuda_{kernels,step,compile}.xml; do
  [ -f "$xml" ] || { echo "  $(basename "$xml"): none (timed out or not run)"; continue; }
  timeout 10 "$PY" - "$xml" <<'EOF'
import os, sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suite = root if root.tag == "testsuite" else root.find("testsuite")
a = suite.attrib
print(f"  {os.path.basename(sys.argv[1])}: {a.get('tests')} run, {a.get('failures')} failed, "
      f"{a.get('errors')} errors, {a.get('skipped')} skipped, {float(a.get('time', 0)):.0f}s")
bad_cases = [(c, b) for c in suite.iter("testcase")
             for b in list(c.findall("failure")) + list(c.findall("error"))]
for case, bad in bad_cases[:25]:
    msg = (bad.attrib.get("message") or "").splitlines()
    print(f"    FAIL {case.attrib.get('classname')}::{case.attrib.get('name')}: "
          f"{msg[0][:160] if msg else ''}")
if len(bad_cases) > 25:
    print(f"    ... and {len(bad_cases) - 25} more (see the log)")
EOF
done
for part_out in "$WORK"/bench_ops.out "$WORK"/bench_infer.out; do
  [ -s "$part_out" ] || continue   # bench_ops' own table: from its last header on
  awk '/\| torch / && !/^#/ {buf=""; keep=1} keep {buf=buf $0 "\n"} END {printf "%s", buf}' \
      "$part_out"
done
if [ -s "$WORK/bench_update.out" ]; then   # its table: from the line naming the update on
  awk '/\| update of / {buf=""; keep=1} keep {buf=buf $0 "\n"} END {printf "%s", buf}' \
      "$WORK/bench_update.out"
fi
if [ -f "$OUT_DIR/bench_step.csv" ]; then
  timeout 20 "$PY" benchmarks/bench_step.py --summarize "$OUT_DIR/bench_step.csv"
fi
echo "full log: $LOG"
