"""`sparsellm search`: Self-Pruner's structured pruning at searched layer-wise rates (Huang et al., 2025).
Flags come from the run's configs, in groups; `--backend llm` is an alias (openai with --llm_base_url,
else local); a setting of a backend that is not chosen, given a non-default value, is a usage error."""

from __future__ import annotations

import dataclasses

from ..config import Calibration, Evaluation, ModelSource, Output
from ..registry import get, names
from .common import add_config, add_quiet, config_from

HELP = ("Self-Pruner: structured pruning (heads and MLP channels) at layer-wise rates found by an evolutionary "
        "search with LLM (openai, local) or GA operators")
DTYPE_HELP = ("dtype of the model for calibration forwards, fitness and evaluation: auto (bfloat16 on a GPU, float16 "
              "for a float16 checkpoint; float32 on a CPU), float32, bfloat16 or float16 (statistics are always "
              "accumulated in float32)")
CALIBRATION_HELPS = {"nsamples": "calibration windows for the importance", "seqlen": "tokens per calibration window",
                     "calib_dataset": "c4 (bundled) or a local text file",
                     "seed": "seed of the calibration windows and of the search"}
OUTPUT_HELPS = {"out": "output directory: the pruned model (structure.json), reports, plots",
                "overwrite": "replace existing outputs and search state"}


def backend_settings() -> list[str]:
    """The flat setting names of every registered backend (nested LLMConfig included)."""
    from ..selfpruner.backends import all_settings

    return list(all_settings())


def add_parser(sub) -> None:
    from ..runs.search import SearchRun
    from ..selfpruner import Fitness, SearchConfig, Structure
    from ..selfpruner.parallel import Parallel

    p = sub.add_parser("search", help=HELP)
    run_defaults = SearchRun()
    add_config(p.add_argument_group("model"), ModelSource(), helps={"dtype": DTYPE_HELP}, required=("model",))
    add_config(p.add_argument_group("calibration"), run_defaults.calibration, helps=CALIBRATION_HELPS)
    search = p.add_argument_group("search")
    add_config(search, SearchConfig(), skip=("seed",))  # one --seed: the calibration's and the search's
    add_config(search, Structure())
    backend = p.add_argument_group("backend")
    add_config(backend, run_defaults, skip=("resume", "keep_state", "bench"))
    seen: set = set()
    for name in names("search_backend"):
        cfg = get("search_backend", name).config()
        nested = [getattr(cfg, f.name) for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))]
        for part in (cfg, *nested):  # the LLM backends' shared LLMConfig once
            seen.update(add_config(backend, part, skip=seen))
    add_config(p.add_argument_group("fitness"), Fitness())
    add_config(p.add_argument_group("parallel fitness"), Parallel())
    evaluation = p.add_argument_group("evaluation")
    add_config(evaluation, Evaluation(), skip=("eval_dense",))
    add_config(evaluation, run_defaults, skip=("backend", "resume", "keep_state"))
    output = p.add_argument_group("output")
    add_config(output, Output(), skip=("save",), required=("out",), helps=OUTPUT_HELPS)
    add_config(output, run_defaults, skip=("backend", "bench"))
    add_quiet(p)
    p.set_defaults(run=run)


def search_run(args):
    """The SearchRun of the parsed flags (`backend_config` refuses another backend's setting)."""
    from ..runs.search import SearchRun
    from ..selfpruner import Fitness, SearchConfig, Structure
    from ..selfpruner.backends import backend_config, resolve_alias
    from ..selfpruner.parallel import Parallel

    backend = resolve_alias(args.backend, args.llm_base_url)
    return SearchRun(source=config_from(args, ModelSource), search=config_from(args, SearchConfig),
                     structure=config_from(args, Structure), fitness=config_from(args, Fitness),
                     calibration=config_from(args, Calibration), backend=backend,
                     backend_config=backend_config(backend, {k: getattr(args, k) for k in backend_settings()}),
                     evaluation=config_from(args, Evaluation), parallel=config_from(args, Parallel),
                     output=config_from(args, Output), resume=args.resume,
                     keep_state=args.keep_state, bench=args.bench)


def run(args) -> int:
    from ..report import search_markdown
    from ..runs.search import run_search

    record = run_search(search_run(args), progress=not args.quiet)
    print(search_markdown(record.to_dict()))
    return 0
