#!/usr/bin/env bash
# The whole GPU measurement list of issue 21 in one call of at most 8 minutes on a lent H200.
#
# On the device machine (the device tool's `run`, in the repository root, after `make wheels` here):
#     command:   bash bench/gpu_session.sh                          every stage
#                bash bench/gpu_session.sh --only kernels,step      a second call: only the stages named
#     carry:     [".whl"]
#     timeout_s: 540        (the script keeps itself to --deadline, 480 s by default)
# Here, on a CPU:
#     bash bench/gpu_session.sh --plan       the stages, their time budget and caps, the output files
#     bash bench/gpu_session.sh --dry-run    every stage's command line parses, every import resolves; no measurement
#     bash bench/gpu_session.sh --wheels     the wheels the device image lacks into .whl/ (what `make wheels` runs)
# Options: --only A,B (stages to run; setup always runs), --cap STAGE=SECONDS (repeatable, e.g. a rerun
# with more time), --deadline SECONDS (the whole run; a stage's cap is cut to what is left of it),
# --allow-cpu (run the stages without a CUDA device: tests the harness on CPU, where they fail or time out).
#
# Runs with the machine's own python3 (PYTHON to change it), torch and triton; the repository is on
# PYTHONPATH, the wheels in .whl/ are installed to a scratch --target (no index, no network). Setup
# (always first): nvidia-smi, the wheels, the CUDA allocator library (cmake), the imports. Then each
# stage runs under its own `timeout`; a failed or timed-out stage does not stop the next one, and the
# last lines list what to rerun. Under $OUT (at most 8 files come back): session.log (every stage's
# output in order), session.json (per stage: budget, cap, measured seconds, exit code; the ceilings;
# nvidia-smi), and one JSON per instrument stage (OUTPUTS below). The scale CSV and PNG stay behind:
# scale.json holds the same rows. The exit code is the number of failed stages.
set -u -o pipefail

STAGES=(ceilings kernel-tests gpu-tests kernels lmhead compile allocator step scale)
# Seconds on an H200. BUDGET: the plan's estimate (sizes × rates of the device notes + compile and start
# times); CAP: the stage's hard limit. The caps add up to at most DEADLINE, so every stage gets its slot.
declare -A BUDGET=([setup]=15 [ceilings]=15 [kernel-tests]=45 [gpu-tests]=20 [kernels]=25 [lmhead]=70
  [compile]=40 [allocator]=12 [step]=35 [scale]=40)
declare -A CAP=([setup]=30 [ceilings]=30 [kernel-tests]=70 [gpu-tests]=40 [kernels]=45 [lmhead]=100
  [compile]=50 [allocator]=20 [step]=50 [scale]=40)
declare -A WHAT=(
  [setup]="nvidia-smi, wheels from .whl/, cmake build of engine/csrc, imports"
  [ceilings]="copy GB/s, bf16 matmul TFLOP/s at the LM-head shapes, pinned H2D/D2H GB/s"
  [kernel-tests]="pytest -m interpreter: every Triton kernel compiled, against the float64 gold"
  [gpu-tests]="pytest -m gpu: allocator, offload, attention, trainer, engine on CUDA"
  [kernels]="token_logprobs, flow_grpo_loss at N=4k,16k x V=151936: ours vs eager"
  [lmhead]="linear_* at N=4k,16k x d=1536,3584 x V=151936: fused, chunked, materialized, eager, Liger"
  [compile]="all four ops at N=16k against torch.compile of the reference"
  [allocator]="VMM pause/resume of 1, 4, 8 GiB vs pinned copies, NVML freed"
  [step]="bench step: qwen2.5-1.5b preset (random bf16 weights), embedded engine, 2 steps"
  [scale]="bench scale: the same, B=2, G=8..1024 until OOM or the stage's time budget"
)
declare -A OUTPUTS=([kernels]=kernels.json [lmhead]=kernels-lmhead.json [compile]=kernels-compile.json
  [allocator]=allocator.json [step]=step.json [scale]=scale.json)
WHEELS=(liger-kernel==0.8.5 bm25s==0.3.16) # pure Python; the device image lacks them (its package list); torch/triton/numpy/scipy are there
LOGITS_SHAPES=4096x151936,16384x151936
LMHEAD_SHAPES=4096x1536x151936,16384x1536x151936,4096x3584x151936,16384x3584x151936
COMPILE_SHAPES=16384x151936,16384x1536x151936,16384x3584x151936
DEADLINE=480
MAX_FILES=8
PY=${PYTHON:-python3}

die() {
  echo "gpu_session.sh: $*" >&2
  exit 2
}

MODE=run
ONLY=
ALLOW_CPU=0
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) MODE=dry ;;
    --plan) MODE=plan ;;
    --wheels) MODE=wheels ;;
    --allow-cpu) ALLOW_CPU=1 ;;
    --only)
      [ $# -ge 2 ] || die "--only needs a comma-separated list of stages (${STAGES[*]})"
      ONLY=$2
      shift
      ;;
    --cap)
      [ $# -ge 2 ] && [[ $2 =~ ^([a-z-]+)=([0-9]+)$ ]] || die "--cap needs STAGE=SECONDS, e.g. --cap kernels=200"
      [ -n "${CAP[${BASH_REMATCH[1]}]:-}" ] || die "--cap: unknown stage '${BASH_REMATCH[1]}'; stages: setup ${STAGES[*]}"
      CAP[${BASH_REMATCH[1]}]=${BASH_REMATCH[2]}
      shift
      ;;
    --deadline)
      [ $# -ge 2 ] && [[ $2 =~ ^[0-9]+$ ]] || die "--deadline needs whole seconds, e.g. --deadline 480"
      DEADLINE=$2
      shift
      ;;
    -h | --help)
      sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'
      exit 0
      ;;
    *) die "unknown option '$1'; see --help" ;;
  esac
  shift
done

SELECTED=("${STAGES[@]}")
if [ -n "$ONLY" ]; then
  SELECTED=()
  IFS=, read -ra wanted <<<"$ONLY"
  for s in "${wanted[@]}"; do
    [ -n "${OUTPUTS[$s]:-}${WHAT[$s]:-}" ] && [ "$s" != setup ] || die "--only: unknown stage '$s'; stages: ${STAGES[*]}"
  done
  for s in "${STAGES[@]}"; do # in the plan's order, whatever the order asked
    [[ ",$ONLY," == *",$s,"* ]] && SELECTED+=("$s")
  done
fi
[ -f pyproject.toml ] && [ -d bench ] && [ -d kernels ] \
  || die "run me from the repository root (no pyproject.toml, bench/ and kernels/ in $PWD)"

plan_table() {
  local total_b=${BUDGET[setup]} total_c=${CAP[setup]} s
  printf '%-13s %8s %6s  %s\n' stage budget_s cap_s what
  printf '%-13s %8s %6s  %s\n' setup "${BUDGET[setup]}" "${CAP[setup]}" "${WHAT[setup]}"
  for s in "${SELECTED[@]}"; do
    printf '%-13s %8s %6s  %s\n' "$s" "${BUDGET[$s]}" "${CAP[$s]}" "${WHAT[$s]}"
    total_b=$((total_b + BUDGET[$s]))
    total_c=$((total_c + CAP[$s]))
  done
  printf '%-13s %8s %6s  %s\n' total "$total_b" "$total_c" "deadline ${DEADLINE} s (caps are cut to what is left)"
}

outputs_list() {
  local s files=(session.log session.json)
  for s in "${SELECTED[@]}"; do [ -n "${OUTPUTS[$s]:-}" ] && files+=("${OUTPUTS[$s]}"); done
  echo "${files[*]}"
}

if [ "$MODE" = plan ]; then
  plan_table
  echo "outputs under \$OUT: $(outputs_list)"
  exit 0
fi

if [ "$MODE" = wheels ]; then
  # The device README's recipe: no dependencies (they are in the image), binaries only, for its Python 3.12.
  dl=$(mktemp -d "${TMPDIR:-/tmp}/flowgrpo-wheels.XXXXXX") || die "cannot create a download folder"
  trap 'rm -rf "$dl"' EXIT
  "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$dl" "${WHEELS[@]}" || die "pip download of ${WHEELS[*]} failed"
  for w in "$dl"/*.whl; do
    [[ $w == *-none-any.whl ]] || die "$(basename "$w") is not a pure-Python wheel (py3-none-any); it may not run on the device"
  done
  kib=$(du -sk "$dl" | cut -f1)
  [ "$kib" -le $((32 * 1024)) ] || die "the wheels would take ${kib} KiB; keep .whl/ under 32 MiB (the tree travels within 64 MiB)"
  [ -d .whl ] && echo "replacing .whl/: $(ls .whl | tr '\n' ' ')"
  rm -rf .whl && mkdir .whl && mv "$dl"/*.whl .whl/ || die "cannot fill .whl/"
  echo "wheels in .whl/ (${kib} KiB): $(ls .whl | tr '\n' ' ')"
  exit 0
fi

SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/flowgrpo-session.XXXXXX")
trap 'rm -rf "$SCRATCH"' EXIT
SITE=$SCRATCH/site # the wheels' --target; on the path from the start (an empty folder there is harmless)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}:$SITE" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ "$MODE" = run ]; then
  OUT=${OUT:-runs/gpu-session}
  mkdir -p "$OUT" || die "cannot create \$OUT=$OUT"
  LOG=$OUT/session.log
else
  OUT=$SCRATCH/out
  mkdir -p "$OUT"
  LOG=$SCRATCH/session.log
fi
: >"$LOG"
STAGES_TSV=$SCRATCH/stages.tsv
: >"$STAGES_TSV"
T0=${EPOCHREALTIME/./}

log() { echo "$*" | tee -a "$LOG"; }
elapsed_s() { echo $(((${EPOCHREALTIME/./} - T0) / 1000000)); }

stage_argv() { # stage_argv STAGE CAP: the stage's command line into ARGV
  local cli=("$PY" -m engine.cli bench)
  case $1 in
    ceilings) ARGV=("${cli[@]}" ceilings --device cuda --dtype bfloat16 --tokens 4k,16k --hidden 1536,3584
      --vocab 151936 --copy-gib 1,4 --pinned-gib 1,4 --save "$SCRATCH/ceilings.json") ;;
    kernel-tests) ARGV=("$PY" -m pytest tests/ -m interpreter -q -rfE -p no:cacheprovider --durations=10 "${XDIST[@]}") ;;
    gpu-tests) ARGV=("$PY" -m pytest tests/ -m gpu -q -rfE -p no:cacheprovider --durations=10) ;;
    kernels) ARGV=("${cli[@]}" kernels --device cuda --dtype bfloat16 --ops token_logprobs,flow_grpo_loss
      --providers ours,reference --shapes "$LOGITS_SHAPES" --warmup 2 --repeats 10 --save "$OUT/${OUTPUTS[kernels]}") ;;
    lmhead) ARGV=("${cli[@]}" kernels --device cuda --dtype bfloat16 --ops linear_token_logprobs,linear_flow_grpo_loss
      --providers "fused,chunked,materialize,reference$LIGER" --shapes "$LMHEAD_SHAPES" --warmup 1 --repeats 5
      --save "$OUT/${OUTPUTS[lmhead]}") ;;
    compile) ARGV=("${cli[@]}" kernels --device cuda --dtype bfloat16 --providers compiled --shapes "$COMPILE_SHAPES"
      --warmup 2 --repeats 5 --save "$OUT/${OUTPUTS[compile]}") ;;
    allocator) ARGV=("${cli[@]}" allocator --gib 1,4,8 --repeats 5 --save "$OUT/${OUTPUTS[allocator]}") ;;
    step) ARGV=("${cli[@]}" step --preset qwen2.5-1.5b --engines embedded --steps 2 --save "$OUT/${OUTPUTS[step]}") ;;
    scale) ARGV=("${cli[@]}" scale --preset qwen2.5-1.5b --engine embedded --queries 2 --steps 1
      --groups 8,16,32,64,128,256,512,1024 --budget-s $(($2 > 30 ? $2 - 15 : 15)) --out "$SCRATCH"
      --save "$OUT/${OUTPUTS[scale]}") ;;
    *) die "no command for stage '$1'" ;;
  esac
}

record() { # record STAGE CAP_USED RC SECONDS STATUS
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "${BUDGET[$1]}" "${CAP[$1]}" "$2" "$3" "$4" "$5" >>"$STAGES_TSV"
}

run_capped() { # run_capped STAGE CAP COMMAND...: the command under `timeout`, output to the log; records it
  local name=$1 cap=$2 t0 rc secs status
  shift 2
  log "=== [$name] $(date -u +%H:%M:%S) cap ${cap} s: $*"
  t0=${EPOCHREALTIME/./}
  timeout -k 5 "$cap" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  secs=$(((${EPOCHREALTIME/./} - t0) / 1000))
  secs=$((secs / 1000)).$(printf '%03d' $((secs % 1000)))
  case $rc in
    0) status=ok ;;
    124 | 137) status=timeout ;;
    *) status=failed ;;
  esac
  log "=== [$name] $status (exit $rc) in ${secs} s"
  record "$name" "$cap" "$rc" "$secs" "$status"
  [ "$rc" -eq 0 ]
}

IMPORTS="torch triton transformers safetensors tokenizers numpy matplotlib pynvml rich pytest pytest_benchmark
  liger_kernel.chunked_loss kernels engine.loop engine.allocator engine.device_memory engine.parallelize bench.kernels bench.step bench.scale
  bench.allocator bench.ceilings"

setup_steps() { # setup_steps DRY WHEEL...: nvidia-smi, wheels, library, imports; DRY=1 checks instead
  local dry=$1 rc=0 build
  shift
  set -o pipefail # not inherited through bash -c
  if [ "$dry" = 1 ]; then
    bash -n "$SCRIPT" && echo "bash -n $SCRIPT: ok" || rc=1
  else
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.sm --format=csv \
      | tee "$SCRATCH/nvidia-smi.csv" || rc=1
  fi
  if compgen -G ".whl/*.whl" >/dev/null; then
    local how=(--target "$SITE")
    [ "$dry" = 1 ] && how=(--dry-run)
    # isolated: no pip configuration or PIP_* variable adds another source of wheels than .whl/
    PIP_CONFIG_FILE=/dev/null "$PY" -m pip install -q --isolated --disable-pip-version-check --no-index --no-deps \
      --ignore-installed --no-compile --no-cache-dir --find-links .whl "${how[@]}" "$@" \
      && echo "wheels: $* from .whl/ ok" || rc=1
  else
    echo "WARNING: no .whl/*.whl: $* not installed (run \`make wheels\` here and carry .whl)"
  fi
  build=build
  [ "$dry" = 1 ] && build=$SCRATCH/build
  if cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release >"$SCRATCH/cmake.log" 2>&1; then
    if [ "$dry" = 1 ]; then echo "cmake configure: ok"; else cmake --build "$build" -j 16 || rc=1; fi
  else
    cat "$SCRATCH/cmake.log"
    rc=1
  fi
  [ "$dry" = 1 ] && return $rc # the dry run checks the imports in its own process
  # shellcheck disable=SC2086  # IMPORTS is a word list
  "$PY" - $IMPORTS <<'EOF' || rc=1
import importlib, sys
missing = []
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception as e:  # any failure to import is the stage's failure
        missing.append(f"{name} ({type(e).__name__}: {e})")
import torch, triton, transformers
from importlib.metadata import PackageNotFoundError, version
def v(dist):
    try:
        return version(dist)
    except PackageNotFoundError:
        return "absent"
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}, "
      f"transformers {transformers.__version__}, liger-kernel {v('liger-kernel')}, CUDA available {torch.cuda.is_available()}")
if missing:
    print("imports that fail: " + "; ".join(missing))
sys.exit(1 if missing else 0)
EOF
  return $rc
}

export -f setup_steps # run under `timeout` through bash -c, with what it reads exported
export PY SCRATCH SITE IMPORTS SCRIPT=$0

XDIST=()
LIGER=,liger
HAS_CUDA=0
probe_optional() { # xdist parallelises the kernel tests' compiles; Liger is a provider only where importable
  local found
  found=$("$PY" - <<'EOF'
import importlib.util
import torch
print(" ".join(n for n in ("xdist", "liger_kernel") if importlib.util.find_spec(n)), "cuda" * torch.cuda.is_available())
EOF
  )
  [[ " $found " == *" xdist "* ]] && XDIST=(-n 8)
  [[ " $found " == *" cuda "* ]] && HAS_CUDA=1
  [[ " $found " == *" liger_kernel "* ]] && return
  LIGER=
  log "WARNING: liger_kernel is not importable: lmhead runs without the Liger provider"
}

if [ "$MODE" = dry ]; then
  log "# dry run with $("$PY" --version 2>&1) ($PY): every stage's command line and every import, nothing measured"
  plan_table | tee -a "$LOG"
  fails=0
  run_capped setup 300 bash -c 'setup_steps "$@"' setup 1 "${WHEELS[@]}" || fails=$((fails + 1))
  probe_optional
  # One process (torch loads once): the imports, then each stage's exact command line: pytest's with
  # --collect-only (a lane that collects nothing fails), engine.cli's with --dry-run (argparse and each
  # instrument's own checks of its values, before any work).
  LINES=$SCRATCH/dry.lines
  : >"$LINES"
  for s in "${SELECTED[@]}"; do
    stage_argv "$s" "${CAP[$s]}"
    printf '%s\t%s\n' "$s" "$(printf '%q ' "${ARGV[@]}")" >>"$LINES"
  done
  # shellcheck disable=SC2086  # IMPORTS is a word list
  timeout 600 "$PY" - "$LINES" "$PY" $IMPORTS <<'EOF' 2>&1 | tee -a "$LOG"
import contextlib, importlib, io, shlex, sys
lines, py, imports = sys.argv[1], sys.argv[2], sys.argv[3:]
failed = []
for name in imports:
    try:
        importlib.import_module(name)
    except Exception as e:  # any failure to import is a failure of the dry run
        print(f"=== import {name} FAILED: {type(e).__name__}: {e}")
        failed.append(f"import {name}")
print(f"=== imports: {len(imports) - len(failed)} of {len(imports)} resolve")
import pytest
from engine import cli
for line in open(lines):
    stage, command = line.rstrip("\n").split("\t", 1)
    argv = shlex.split(command)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            if argv[:3] == [py, "-m", "pytest"]:
                rc = int(pytest.main([*argv[3:], "--collect-only", "-qq", "-W", "ignore::pytest.PytestAssertRewriteWarning"]))
            elif argv[:3] == [py, "-m", "engine.cli"]:
                rc = cli.main([*argv[3:], "--dry-run"])
            else:
                print(f"stage {stage}: neither pytest nor engine.cli: {command}", file=sys.stderr)
                rc = 2
    except SystemExit as e:  # argparse rejects the command line
        rc = e.code
    status = "ok" if rc == 0 else f"FAILED (exit {rc})"
    print(f"=== [{stage}] dry run {status}: {shlex.join(argv)}")
    if rc != 0:
        print(err.getvalue().strip())
        failed.append(stage)
print(f"=== dry-run checks: {len(failed)} failed" + (f": {', '.join(failed)}" if failed else ""))
sys.exit(min(len(failed), 100))
EOF
  rc=${PIPESTATUS[0]}
  fails=$((fails + (rc > 100 ? 1 : rc)))
  log "outputs under \$OUT on the device: $(outputs_list)"
  log "dry run: $fails failed"
  exit "$fails"
fi

# ---- the run on the device ----
log "# flowgrpo GPU session $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
log "# plan (seconds on an H200; budget = estimate, cap = hard limit):"
plan_table | tee -a "$LOG"
fails=0
FAILED=()
run_capped setup "${CAP[setup]}" bash -c 'setup_steps "$@"' setup 0 "${WHEELS[@]}" || { fails=$((fails + 1)) && FAILED+=(setup); }
probe_optional
if [ "$ALLOW_CPU" = 0 ] && [ "$HAS_CUDA" = 0 ]; then
  log "no CUDA device visible to $PY: the stages need one; stopping before any of them"
  exit 2
fi
for s in "${SELECTED[@]}"; do
  left=$((DEADLINE - $(elapsed_s) - 5))
  cap=$((CAP[$s] < left ? CAP[$s] : left))
  if [ "$left" -lt 10 ]; then
    log "=== [$s] skipped: ${left} s left of the ${DEADLINE} s deadline"
    record "$s" 0 -1 0 skipped
    fails=$((fails + 1)) && FAILED+=("$s")
    continue
  fi
  stage_argv "$s" "$cap"
  run_capped "$s" "$cap" "${ARGV[@]}" || { fails=$((fails + 1)) && FAILED+=("$s"); }
done

"$PY" - "$STAGES_TSV" "$SCRATCH" "$OUT/session.json" <<'EOF' 2>&1 | tee -a "$LOG"
import json, os, sys
from pathlib import Path
tsv, scratch, target = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
stages = []
for line in open(tsv):
    name, budget, cap, cap_used, rc, secs, status = line.rstrip("\n").split("\t")
    stages.append({"stage": name, "budget_s": int(budget), "cap_s": int(cap), "cap_used_s": int(cap_used),
                   "exit": int(rc), "seconds": float(secs), "status": status})
print(f"{'stage':<13} {'budget_s':>8} {'cap_s':>6} {'measured_s':>10}  status")
for s in stages:
    print(f"{s['stage']:<13} {s['budget_s']:>8} {s['cap_s']:>6} {s['seconds']:>10.1f}  {s['status']} (exit {s['exit']})")
print(f"{'total':<13} {sum(s['budget_s'] for s in stages):>8} {sum(s['cap_s'] for s in stages):>6} "
      f"{sum(s['seconds'] for s in stages):>10.1f}")
ceilings = scratch / "ceilings.json"
smi = scratch / "nvidia-smi.csv"
payload = {
    "bench": "gpu_session",
    "stages": stages,
    "ceilings": json.loads(ceilings.read_text()) if ceilings.is_file() else None,
    "nvidia_smi": smi.read_text() if smi.is_file() else None,
}
tmp = target.with_name(f".{target.name}.tmp")
with open(tmp, "w") as f:
    json.dump(payload, f, indent=1)
    f.flush()
    os.fsync(f.fileno())
tmp.replace(target)
EOF
n=$(find "$OUT" -type f | wc -l)
[ "$n" -le "$MAX_FILES" ] || log "WARNING: $n files under $OUT; only $MAX_FILES come back from the device"
log "session: $fails failed stage(s) in $(elapsed_s) s; files under $OUT: $(ls "$OUT" | tr '\n' ' ')"
if [ "$fails" -gt 0 ]; then
  rerun=$(printf '%s\n' "${FAILED[@]}" | grep -vx setup | paste -sd, -)
  log "rerun what failed: bash bench/gpu_session.sh${rerun:+ --only $rerun}"
fi
exit "$fails"
