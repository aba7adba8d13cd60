#!/usr/bin/env bash
# One pass on a lent H100/H200 (issue 9): ceilings, the gpu test lane, kernels, allocator, step, scale.
#
#   OUT=/some/dir bash bench/gpu_session.sh [quick]
#
# Runs from the repository root with the machine's own torch/triton (no install; PYTHONPATH=.),
# prints everything and writes each instrument's JSON (+ the scale CSV/PNG) under $OUT. Each stage
# runs even when an earlier one failed; the exit code is the number of failed stages. `quick` trims
# sizes to fit a 10-minute call. Missing pure-Python packages (pytest, pytest-benchmark, liger-kernel,
# rich, nvidia-ml-py) travel as wheels in .whl/ (see /work/.library/device/README.md); they are
# installed to /tmp/site when that folder exists.
set -u
OUT=${OUT:-bench/results/gpu-session}
mkdir -p "$OUT"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
QUICK=${1:-}
fails=0
stage() {  # stage NAME COMMAND...: run, tee the log to $OUT/NAME.log, count a failure
  local name=$1; shift
  echo "=== $name: $*"
  local t0=$SECONDS
  "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc in $((SECONDS - t0)) s"
  [ "$rc" -eq 0 ] || fails=$((fails + 1))
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv > "$OUT/nvidia-smi.csv"
stage build bash -c "cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null && cmake --build build -j 16"
stage gpu-lane python3 -m pytest -q -x -m "gpu or interpreter" tests/
if [ "$QUICK" = quick ]; then TOKENS=4k; GIB=1,4; SWEEP=4,8,16,32; else TOKENS=4k,16k; GIB=1,4,8; SWEEP=; fi
stage kernels python3 -m engine.cli bench kernels --dtype bfloat16 --tokens "$TOKENS" \
  --shapes "4096x151936,16384x151936,qwen2.5-1.5b,qwen2.5-7b" --save "$OUT/kernels.json"
stage allocator python3 -m engine.cli bench allocator --gib "$GIB" --save "$OUT/allocator.json"
stage step python3 -m engine.cli bench step --preset qwen2.5-1.5b --engines embedded --save "$OUT/step.json"
stage scale python3 -m engine.cli bench scale --preset qwen2.5-1.5b --engine embedded ${SWEEP:+--groups "$SWEEP"} \
  --out "$OUT" --save "$OUT/scale.json"
echo "failed stages: $fails"
exit "$fails"
