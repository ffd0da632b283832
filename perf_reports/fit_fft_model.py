"""Refit lk3d.fft.COST, the FFT planner's seconds per unit of work, on this machine.

For a set of layer shapes it times lk3d.fft.xcorr over a spread of transform lengths L (the
planner's best by the current constants plus others drawn from its candidates), fits the constants
by non-negative least squares on relative error, and prints them with the planner's regret (the
measured time of the L it would pick over the best measured L) before and after. Run it with the
machine otherwise idle and PyTorch's huge pages on:

    THP_MEM_ALLOC_ENABLE=1 python perf_reports/fit_fft_model.py [--out fit.json]
"""
import argparse
import itertools
import json
import random

import numpy as np
import torch
from scipy.optimize import nnls

from lk3d import fft
from lk3d.autotune.timing import repeat_ms

# (Q, K, N, cin, cout, groups): the outputs per axis, taps per axis and channels of one correlation.
PROBLEMS = [
    ((48,) * 3, (5,) * 3, 1, 16, 16, 1),
    ((48,) * 3, (7,) * 3, 1, 16, 16, 1),
    ((48,) * 3, (11,) * 3, 1, 16, 16, 1),
    ((48,) * 3, (15,) * 3, 1, 16, 16, 1),
    ((48,) * 3, (21,) * 3, 1, 16, 16, 1),
    ((32,) * 3, (13,) * 3, 1, 32, 32, 1),
    ((40,) * 3, (9,) * 3, 2, 8, 8, 1),
    ((20, 48, 48), (7, 11, 11), 1, 16, 16, 1),
    ((48,) * 3, (7,) * 3, 1, 16, 16, 16),
    ((48,) * 3, (11,) * 3, 1, 16, 16, 16),
    ((48,) * 3, (15,) * 3, 1, 16, 16, 16),
    ((48,) * 3, (21,) * 3, 1, 16, 16, 16),
    ((64,) * 3, (7,) * 3, 1, 48, 48, 48),
    ((32,) * 3, (31,) * 3, 1, 8, 8, 8),
]


def best_ms(fn, min_run_time=1.0):
    """The fastest of about ``min_run_time`` seconds of runs after a warm-up run (and the run
    that sizes the timer's blocks): on a shared machine interference only ever adds time, and the
    first runs of a new size pay its page faults."""
    fn()
    return repeat_ms(fn, "cpu", min_run_time, stat="min")


def measure(per_problem=10, seed=0):
    rng = random.Random(seed)
    rows = []
    for Q, K, N, cin, cout, groups in PROBLEMS:
        E = K
        x = torch.randn(N, cin, *(q + e - 1 for q, e in zip(Q, E)))
        w = torch.randn(cout, cin // groups, *K)
        cands = list(itertools.product(*fft.candidate_lengths(Q, E)))
        cands.sort(key=lambda L: fft.fft_seconds(L, Q, E, K, N, cin, cout, groups))
        pick = cands[:per_problem // 2]
        rest = cands[per_problem // 2:]
        pick += rng.sample(rest, min(len(rest), per_problem - len(pick)))
        rng.shuffle(pick)
        for L in pick:
            ms = best_ms(lambda: fft.xcorr(x, w, (1, 1, 1), Q, groups, L=L))
            feats = fft.fft_features(L, Q, E, K, N, cin, cout, groups)
            rows.append(dict(problem=[Q, K, N, cin, cout, groups], L=list(L), ms=ms,
                             features=feats))
            print(f"{Q} k{K} N{N} C{cin}->{cout} g{groups} L{L}: {ms:.1f} ms", flush=True)
    return rows


def fit(rows, names):
    A = np.array([[r["features"][n] for n in names] for r in rows], dtype=float)
    y = np.array([r["ms"] / 1e3 for r in rows])
    scale = A.max(axis=0)
    scale[scale == 0] = 1
    coef, _ = nnls((A / scale) / y[:, None], np.ones_like(y))
    return dict(zip(names, (coef / scale).tolist()))


def seconds(cost, row):
    """The modelled seconds of a measured row under the constants ``cost``."""
    return sum(cost[n] * v for n, v in row["features"].items())


def regret(rows, cost):
    out = []
    for key, grp in itertools.groupby(rows, key=lambda r: json.dumps(r["problem"])):
        grp = list(grp)
        model = min(grp, key=lambda r: seconds(cost, r))
        best = min(grp, key=lambda r: r["ms"])
        out.append((key, model["ms"] / best["ms"], model["L"], best["L"]))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the measurements and the fit as JSON here")
    ap.add_argument("--rows", help="fit these measurements (a --out file) instead of measuring")
    args = ap.parse_args()
    rows = json.load(open(args.rows))["rows"] if args.rows else measure()
    names = list(fft.COST)
    cost = fit(rows, names)
    for label, c in (("current", fft.COST), ("fitted", cost)):
        print(f"{label}: " + ", ".join(f"{n}={v:.3g}" for n, v in c.items()))
        pred = np.array([seconds(c, r) for r in rows])
        ms = np.array([r["ms"] / 1e3 for r in rows])
        print(f"  model/measured: median {np.median(pred / ms):.2f}, "
              f"spread (p90/p10) {np.percentile(pred / ms, 90) / np.percentile(pred / ms, 10):.2f}")
        for key, r, lm, lb in regret(rows, c):
            print(f"  {key}: pick {lm} over best {lb}: {r:.2f}x")
    if args.out:
        from lk3d.autotune.fingerprint import device_fingerprint
        json.dump(dict(device=device_fingerprint(torch.device("cpu"))["name"],
                       torch=torch.__version__, threads=torch.get_num_threads(),
                       fitted=cost, rows=rows), open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
