"""lk3d.tools: the development and measurement tooling around the library; ``import lk3d`` never
loads it.

    cli             the ``lk3d`` command (``python -m lk3d.tools.cli`` where it is not on PATH);
                    cli_explain: its ``lk3d explain``
    bench           ``lk3d bench``: a run, its results table and CSV; bench_cases (the cases),
                    bench_providers (what each provider runs, one measurement), bench_worker
                    (the worker process with a time limit)
    bench_dispatch  ``lk3d bench --dispatch``: does the planner pick the fastest path?
    report          ``lk3d report``: results.csv, the plots drawn from it, the README summary
    sweep           ``lk3d tune``: measure every algorithm on a list of layers, cache the winners
    roofline        the least FLOPs and bytes of a convolution, the measured matmul/copy ceilings
    table           the aligned text tables and CSV files
    aot             ahead-of-time compile of every shipped kernel config for sm_80 / sm_90
                    (``python -m lk3d.tools.aot [80 90]``)

Every measurement is timed by ``lk3d.autotune.timing``, the planner's timing.

Optional dependencies: the plots need matplotlib and the progress bars tqdm (``pip install
'lk3d[bench]'``; without them ``lk3d bench`` still writes its table and CSV); ``aot`` needs Triton.
"""
