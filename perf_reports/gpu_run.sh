#!/usr/bin/env bash
# Everything a lent GPU machine is for, in one call that ends within 9 minutes:
#
#     bash perf_reports/gpu_run.sh OUTDIR              # on the GPU machine
#     bash perf_reports/gpu_run.sh --dry-run OUTDIR    # first, on a CPU machine
#
# The GPU image has torch, Triton, numpy, pytest, hypothesis, matplotlib, tqdm, scipy, filelock
# and setuptools, but no package index, no platformdirs and no tensorly: lk3d is installed
# without its dependencies (--no-deps --no-build-isolation --no-index) from a copy of the tree
# into a folder of its own put on PYTHONPATH, so the Python that runs this is left as it was; a
# tree of links with the installed layout stands in where pip cannot build (no setuptools).
#
# --dry-run runs every step that needs no GPU: install, import, lk3d info, the goal cases' list
# (`lk3d bench --cases goals --list`), their static estimate (`lk3d estimate --cases goals`,
# 40-65 s on 2 cores; GPU_RUN_ESTIMATE_CASES=G2,G4 takes only those goal cases) and the collection
# of the CUDA test subset with LK3D_TEST_DEVICE=cuda. The real run, in this order (each step
# under `timeout`, which gets 5 s of grace to kill it):
#
#   step          limit  what
#   install         30   pip install --target (seconds; the links otherwise)
#   import          20   import lk3d from there (required)
#   nvidia-smi      10
#   info            30   lk3d info (required)
#   bench-goals    220   lk3d bench --cases goals, bf16 fwd and fwdbwd, every provider: a
#                        measurement starts only in the first 150 s (--max-time) and is killed
#                        past 1.5 x 15 s (--budget) + 30 s = 52.5 s; the table and the report
#                        in the last ~17 s (required)
#   estimate        60   lk3d estimate --cases goals --device cuda --measured results.csv: modelled
#                        vs measured per goal case (optional)
#   tests          120   the CUDA test subset (pytest -m gpu_run; tests/test_gpu_run.py keeps
#                        its kernel specialisations within what compiles in this limit) (required)
#                  ---
#                  490   + 7 x 5 s of grace = 525 s, within the 540 s deadline
#
# then, as the deadline (540 s from the start) allows, each limited to end 5 s + its grace
# before it: lk3d tune on the built-in GPU suite (at most 150 s, keeping 40 s for the export
# after it), the export of the plan cache as plans.json (the seed entries to ship; at most
# 30 s), the full benchmark set (at least 100 s left, its --max-time leaving 70 s for its last
# measurement and report) and the ahead-of-time resource report (lk3d.tools.aot, at most 60 s;
# it needs no GPU and runs in full on any CPU machine). A step that no longer fits is recorded as
# skipped.
#
# A failed step does not stop the others; the exit status is non-zero when a required step
# failed. OUTDIR receives at most 8 files (the device tool's limit): steps.txt (one line per
# step: name, exit status, seconds, required/optional), info.txt (install, import, nvidia-smi,
# lk3d info), bench.txt (the goal cases' table, the estimate against it, the full set's table),
# results.csv (the goal cases' long-format report CSV), full.csv (the full set's), tests.log (the
# CUDA tests, then the AOT report), tune.txt and plans.json; the dry run writes steps.txt,
# info.txt, bench.txt and tests.log. A report CSV committed under perf_reports/<version>/<device>/
# as results.csv gets its plots and its place in perf_reports/README.md from
# `lk3d report --dir perf_reports`. LK3D_GIT_COMMIT (set it on the command line) goes into the
# benchmark rows when the tree has no .git.
set -uo pipefail

usage() {
    echo "usage: bash perf_reports/gpu_run.sh [--dry-run] OUTDIR" >&2
    exit 2
}
DRY=0
if [ "${1:-}" = --dry-run ]; then
    DRY=1
    shift
fi
[ $# -eq 1 ] || usage
mkdir -p "$1" || exit 2
OUT="$(cd "$1" && pwd)"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec </dev/null

DEADLINE=$((SECONDS + 540))
PY="${PYTHON:-python3}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/lk3d-gpu-run.XXXXXX")" || exit 2
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-${TMPDIR:-/tmp}/lk3d-triton-cache}"
export LK3D_CACHE_DIR="$WORK/plans"  # the plans this run makes, and only those, go to plans.json
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
unset TRITON_INTERPRET
failed=()
: >"$OUT/steps.txt"

# step NAME SECONDS required|optional LOG COMMAND...: run COMMAND under `timeout`, its output
# (stdout and stderr) appended to LOG under a header, and record the outcome.
step() {
    local name=$1 limit=$2 kind=$3 log=$4 t0=$SECONDS rc note=""
    shift 4
    echo "== $name (limit ${limit}s) -> ${log#"$OUT"/}"
    echo "== $name: $*" >>"$log"
    timeout -k 5 "$limit" "$@" >>"$log" 2>&1
    rc=$?
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then note=" (timed out)"; fi
    printf '%-12s rc=%-3s %4ss %s%s\n' "$name" "$rc" "$((SECONDS - t0))" "$kind" "$note" \
        | tee -a "$OUT/steps.txt"
    tail -n 3 "$log" | sed 's/^/   | /'
    if [ "$rc" -ne 0 ] && [ "$kind" = required ]; then failed+=("$name"); fi
    return 0
}

# skip NAME KIND WHY: record a step that did not run.
skip() {
    printf '%-12s rc=-   %4ss %s (skipped: %s)\n' "$1" 0 "$2" "$3" | tee -a "$OUT/steps.txt"
}

# budget MAX RESERVE: the limit of a step after the fixed ones: MAX seconds, or what is left
# before the deadline less the step's 5 s of grace, 5 s of slack and RESERVE seconds kept for
# what must follow it.
budget() {
    local left=$((DEADLINE - SECONDS - 10 - $2))
    echo $((left < $1 ? left : $1))
}

# late NAME MAX MIN RESERVE KIND LOG COMMAND...: a step after the fixed ones, limited to
# `budget MAX RESERVE`; skipped where that is under MIN seconds.
late() {
    local name=$1 min=$3 kind=$5 log=$6 limit
    limit=$(budget "$2" "$4")
    shift 6
    if [ "$limit" -lt "$min" ]; then
        skip "$name" "$kind" "${limit}s left before the deadline, needs ${min}s"
        return 0
    fi
    step "$name" "$limit" "$kind" "$log" "$@"
}

# --- install: a copy of the tree (pip builds in it), installed into a folder of its own --------
mkdir -p "$WORK/src"
cp -R pyproject.toml README.md ops kernels autotune "$WORK/src/"
step install 30 optional "$OUT/info.txt" "$PY" -m pip install --no-deps --no-build-isolation \
    --no-index --no-cache-dir --target "$WORK/site" "$WORK/src"
if [ -d "$WORK/site/lk3d" ]; then
    SITE="$WORK/site"
else
    # The package-dir mapping (ops/ -> lk3d, ...) needs an install: where pip could not build, a
    # tree of links with the installed layout.
    SITE="$WORK/links"
    echo "pip did not install lk3d: using links in $SITE on PYTHONPATH" | tee -a "$OUT/info.txt"
    mkdir -p "$SITE/lk3d"
    for f in "$PWD"/ops/*.py "$PWD"/ops/tools; do ln -s "$f" "$SITE/lk3d/"; done
    ln -s "$PWD/kernels" "$SITE/lk3d/kernels"
    ln -s "$PWD/autotune" "$SITE/lk3d/autotune"
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
# lk3d must come from there, not from an install the Python running this already has.
step import 20 required "$OUT/info.txt" "$PY" -c "import sys, lk3d, lk3d.tools.cli
print(lk3d.__file__)
sys.exit(not lk3d.__file__.startswith(sys.argv[1]))" "$SITE/"

CLI=("$PY" -m lk3d.tools.cli)
TESTS=(env LK3D_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider -m gpu_run
       --continue-on-collection-errors tests)

if [ "$DRY" -eq 1 ]; then
    step info 30 required "$OUT/info.txt" "${CLI[@]}" info
    step bench-list 30 required "$OUT/bench.txt" "${CLI[@]}" bench --cases goals --list
    estimate_cases=goals
    if [ -n "${GPU_RUN_ESTIMATE_CASES:-}" ]; then  # a subset of the goal cases, by name
        estimate_cases="$WORK/goal-cases.json"
        "$PY" -c "
import dataclasses, json, sys
from lk3d.tools.bench_cases import GOAL_CASES
names = sys.argv[2].split(',')
json.dump([dataclasses.asdict(c) for c in GOAL_CASES if c.name in names], open(sys.argv[1], 'w'))
" "$estimate_cases" "$GPU_RUN_ESTIMATE_CASES" >>"$OUT/bench.txt" 2>&1
    fi
    step estimate 240 required "$OUT/bench.txt" "${CLI[@]}" estimate --cases "$estimate_cases" \
        --arch 90
    step collect 60 required "$OUT/tests.log" "${TESTS[@]}" --collect-only
else
    step nvidia-smi 10 optional "$OUT/info.txt" nvidia-smi
    step info 30 required "$OUT/info.txt" "${CLI[@]}" info
    step bench-goals 220 required "$OUT/bench.txt" "${CLI[@]}" bench --device cuda --cases goals \
        --no-progress --budget 15 --max-time 150 --out "$WORK/goals"
    cp "$WORK/goals/results.csv" "$OUT/results.csv" 2>/dev/null \
        || echo "no results.csv from the goal cases" | tee -a "$OUT/bench.txt"
    if [ -f "$OUT/results.csv" ]; then
        step estimate 60 optional "$OUT/bench.txt" "${CLI[@]}" estimate --cases goals \
            --device cuda --measured "$OUT/results.csv"
    else
        skip estimate optional "no results.csv to compare with"
    fi
    step tests 120 required "$OUT/tests.log" "${TESTS[@]}"
    late tune 150 30 40 optional "$OUT/tune.txt" "${CLI[@]}" tune --device cuda --no-progress
    late export 30 10 0 optional "$OUT/tune.txt" "${CLI[@]}" cache export "$OUT/plans.json"
    # the full set: its last measurement starts 70 s before the step's limit (killed past
    # 1.5 x 10 s + 30 s = 45 s; then the table and the report)
    limit=$(budget 540 0)
    late bench-full "$limit" 100 0 optional "$OUT/bench.txt" "${CLI[@]}" bench --device cuda \
        --cases full --no-progress --budget 10 --max-time $((limit - 70)) --out "$WORK/full"
    cp "$WORK/full/results.csv" "$OUT/full.csv" 2>/dev/null || true
    late aot 60 30 0 optional "$OUT/tests.log" "$PY" -m lk3d.tools.aot 90
fi

rm -rf "$WORK"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "failed: ${failed[*]}" | tee -a "$OUT/steps.txt"
    exit 1
fi
echo "all required steps passed" | tee -a "$OUT/steps.txt"
