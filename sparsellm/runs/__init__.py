"""Whole runs as library functions: a typed config in, a `Run` record out, outputs written by `RunDir`.
The command line calls exactly these; so do the benchmarks.

    run_prune(PruneRun(...))     prune / allocate        runs/prune.py
    run_eval(EvalRun(...))       eval ppl / zeroshot     runs/eval.py
    run_bench(BenchRun(...))     bench                   runs/bench.py
"""

from .bench import BenchRun, run_bench
from .eval import EvalRun, run_eval
from .prune import PruneRun, run_prune
from .record import Run
from .rundir import RunDir, save_pruned
from .search import SearchRun, run_search  # Self-Pruner: search (runs/search.py)
from .finetune import FinetuneRun, run_finetune  # LoSA and its baselines: finetune (runs/finetune.py)

__all__ = ["Run", "RunDir", "save_pruned", "PruneRun", "run_prune", "EvalRun", "run_eval", "BenchRun", "run_bench",
           "SearchRun", "run_search", "FinetuneRun", "run_finetune"]
