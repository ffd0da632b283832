#!/usr/bin/env bash
# Everything a lent GPU machine is for, in one call that fits in 9 minutes (the step limits add
# up to 540 s, plus 5 s of grace each):
#
#     bash perf_reports/gpu_run.sh OUTDIR
#
# install lk3d (no package index there: --no-deps into the preinstalled torch + Triton), then
# lk3d info, the CUDA test suite, the ahead-of-time resource report, `lk3d tune` on the built-in
# GPU suite (its plan cache exported as plans.json: the seed entries to ship) and the benchmark,
# each under its own `timeout`. A failed step does not stop the others; the exit status is
# non-zero when a required step failed. OUTDIR receives 8 files (the device tool's limit):
# steps.txt (one line per step: name, exit status, seconds), info.txt (install log, nvidia-smi,
# lk3d info), tests.log, aot.txt, tune.txt, plans.json, bench.txt, results.csv (the report's
# long-format CSV: once it is committed under perf_reports/<version>/<device>/,
# `lk3d report --dir perf_reports` draws its plots there and adds it to perf_reports/README.md).
# LK3D_GIT_COMMIT (set it on the command line) goes into the benchmark rows when the tree has
# no .git.
set -uo pipefail

if [ $# -ne 1 ]; then
    echo "usage: bash perf_reports/gpu_run.sh OUTDIR" >&2
    exit 2
fi
mkdir -p "$1" || exit 2
OUT="$(cd "$1" && pwd)"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec </dev/null

PY="${PYTHON:-python3}"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-${TMPDIR:-/tmp}/lk3d-triton-cache}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
failed=()
: >"$OUT/steps.txt"

# step NAME SECONDS required|optional LOGFILE COMMAND...: run COMMAND under `timeout`, its
# output (stdout and stderr) into LOGFILE, and record the outcome.
step() {
    local name=$1 limit=$2 kind=$3 log=$4 t0=$SECONDS rc
    shift 4
    echo "== $name (limit ${limit}s) -> ${log#"$OUT"/}"
    timeout -k 5 "$limit" "$@" >"$log" 2>&1
    rc=$?
    local note=""
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then note=" (timed out)"; fi
    printf '%-8s rc=%-3s %4ss %s%s\n' "$name" "$rc" "$((SECONDS - t0))" "$kind" "$note" \
        | tee -a "$OUT/steps.txt"
    tail -n 3 "$log" | sed 's/^/   | /'
    if [ "$rc" -ne 0 ] && [ "$kind" = required ]; then failed+=("$name"); fi
    return 0
}

step install 40 optional "$OUT/install.log" \
    "$PY" -m pip install --no-deps --no-build-isolation -e .
# The package-dir mapping (ops/ -> lk3d, ...) needs an install. Where pip could not install, a
# tree of links with the installed layout on PYTHONPATH stands in for it.
if ! "$PY" -c "import lk3d.tools.cli" >/dev/null 2>&1; then
    shim="${TMPDIR:-/tmp}/lk3d-src"
    echo "lk3d does not import after pip: using links in $shim on PYTHONPATH" \
        | tee -a "$OUT/install.log"
    rm -rf "$shim" && mkdir -p "$shim/lk3d"
    for f in "$PWD"/ops/*.py; do ln -s "$f" "$shim/lk3d/"; done
    ln -s "$PWD/ops/tools" "$shim/lk3d/tools"
    ln -s "$PWD/kernels" "$shim/lk3d/kernels"
    ln -s "$PWD/autotune" "$shim/lk3d/autotune"
    export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
fi

step nvidia-smi 10 optional "$OUT/nvidia-smi.txt" nvidia-smi
step info 30 required "$OUT/info.txt.part" "$PY" -m lk3d.tools.cli info
cat "$OUT/install.log" "$OUT/nvidia-smi.txt" "$OUT/info.txt.part" >"$OUT/info.txt"
rm -f "$OUT/install.log" "$OUT/nvidia-smi.txt" "$OUT/info.txt.part"
step tests 150 required "$OUT/tests.log" env LK3D_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider
step aot 60 optional "$OUT/aot.txt" "$PY" -m lk3d.tools.aot
export LK3D_CACHE_DIR="${TMPDIR:-/tmp}/lk3d-gpu-plans"
step tune 70 optional "$OUT/tune.txt" "$PY" -m lk3d.tools.cli tune --device cuda --no-progress
"$PY" -m lk3d.tools.cli cache export "$OUT/plans.json" >>"$OUT/tune.txt" 2>&1
# A measurement starts only in the first 110 s and is killed past 1.5 x 20 s + 30 s.
report="${TMPDIR:-/tmp}/lk3d-gpu-report"
step bench 180 required "$OUT/bench.txt" "$PY" -m lk3d.tools.cli bench --device cuda --no-progress \
    --budget 20 --max-time 110 --out "$report"
cp "$report/results.csv" "$OUT/results.csv" 2>/dev/null || echo "no results.csv" >>"$OUT/bench.txt"

echo "== bench table"
cat "$OUT/bench.txt"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "failed: ${failed[*]}" | tee -a "$OUT/steps.txt"
    exit 1
fi
echo "all required steps passed" | tee -a "$OUT/steps.txt"
