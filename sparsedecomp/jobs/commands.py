"""The commands' jobs, without argparse: each takes its resolved options, drives the run (inputs resolved once,
each decomposition solved once, every folder written through the one writer) and returns what it wrote. The command
line (:mod:`sparsedecomp.cli`) only parses flags into these options and prints.

Every long stage says what it is doing (a progress bar or a line through ``log``), and each run ends with a short
summary naming the page to open.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..errors import InputError
from ..outputs import RunWriter, check_output_folder
from ..solver_settings import SolverSetting, unique_labels
from .inputs import InputRequest, Inputs, check_feature_selection, resolve_inputs, sae_fingerprint
from .solve import DEFAULT_METHOD, DEFAULT_SETTINGS, Decomposer, solver_params

Log = Callable[[str], None]
DEMO_EVAL_CONTEXTS = 128
DEMO_DASHBOARD_CONTEXTS = 1563
"""The demo's dashboards read 1,563 contexts of 128 tokens: 200,064 tokens."""
DEFAULT_MEMORY_BUDGET_GB = 1.0


def check_settings(settings: Sequence[SolverSetting] | None) -> list[SolverSetting]:
    """The ``--methods`` settings (the defaults when none), each checked by building its solver, so a typo fails
    before anything loads."""
    settings = list(DEFAULT_SETTINGS) if not settings else list(settings)
    for setting in settings:
        try:
            solver_params(setting.method, setting.params)
        except InputError as err:
            raise InputError(f"--methods {setting.label}: {err}") from None
    return unique_labels(settings)


def check_memory_budget(gb: float) -> int:
    """``gb`` GiB as bytes, refused unless a positive, finite number of at most the machine's memory."""
    if isinstance(gb, bool) or not isinstance(gb, (int, float)) or not math.isfinite(gb) or gb <= 0:
        raise InputError(f"--memory-budget-gb must be a positive, finite number of GiB, got {gb!r}")
    return int(gb * 2**30)


@dataclass(frozen=True)
class DecomposeOptions:
    """What to decompose and how: the method and its parameters, the space(s), a feature selection (ranges)."""

    method: str = DEFAULT_METHOD
    params: Mapping[str, Any] = field(default_factory=dict)
    space: str = "z"
    features: tuple[range, ...] | None = None
    progress: bool = True


def decompose_job(request: InputRequest, options: DecomposeOptions, out: str | Path, *, log: Log = print):
    """``sparsedecomp decompose``: resolve the inputs, decompose, write ``out``."""
    from .decompose import run_decomposition

    params = solver_params(options.method, options.params)
    check_output_folder(out, command="decompose")
    t0 = time.time()
    inputs = resolve_inputs(request, log=log)
    check_feature_selection(options.features, inputs.concat_sae.d_sae)
    with _scale_note(inputs, log):
        run = run_decomposition(inputs.concat_sae, inputs.head_saes, out_dir=out, method=options.method,
                                params=params, space=options.space, W_O=inputs.W_O, context=inputs.context,
                                progress=options.progress, log=log, features=options.features)
    return run, time.time() - t0


class _scale_note:
    """Say once, in words, that activation units are training units when a scale could not be re-estimated; the
    library's warning would say it again on every call."""

    def __init__(self, inputs: Inputs, log: Log) -> None:
        self.inputs, self.log, self._catch = inputs, log, warnings.catch_warnings()

    def __enter__(self):
        self._catch.__enter__()
        needing = self.inputs.head_saes.heads_needing_input_scale
        if needing:
            from ..loading import InputScaleWarning

            self.log(f"note: heads {list(needing)} were trained on inputs scaled by a factor that was never saved; "
                     "directions are unaffected, but activation units are training units (pass --model and --tokens "
                     "to re-estimate and fold the scales)")
            warnings.simplefilter("ignore", InputScaleWarning)
        return self

    def __exit__(self, *exc):
        return self._catch.__exit__(*exc)


@dataclass(frozen=True)
class EvaluateOptions:
    """The settings evaluated and routed, the top-k of the DFA, the memory budget of a batch."""

    settings: tuple[SolverSetting, ...] = DEFAULT_SETTINGS
    top_k: int = 20
    memory_budget_gb: float = DEFAULT_MEMORY_BUDGET_GB
    progress: bool = True
    title: str = "Evaluation of per-head and concat SAEs"


def check_top_k(top_k: int, inputs: Inputs, memory_budget: int) -> int:
    """``top_k`` refused when above the tokens evaluated or when its buffers (values and positions of every concat
    feature, with a DFA value per head) alone would exceed the memory budget."""
    n_tokens = inputs.tokens.n_tokens
    if top_k > n_tokens:
        raise InputError(f"--top-k {top_k} is more than the {n_tokens:,} tokens evaluated; give at most {n_tokens}")
    n_heads = len(inputs.head_saes)
    need = inputs.concat_sae.d_sae * top_k * (n_heads + 4) * 8
    if need > memory_budget:
        raise InputError(f"--top-k {top_k} needs about {need / 2**30:.1f} GiB for the top activations of "
                         f"{inputs.concat_sae.d_sae:,} features, more than --memory-budget-gb "
                         f"{memory_budget / 2**30:g}: give a smaller --top-k or a larger budget")
    return top_k


def evaluate_job(request: InputRequest, options: EvaluateOptions, out: str | Path, *, log: Log = print):
    """``sparsedecomp evaluate``: resolve the inputs, decompose with every setting, evaluate, write ``out``."""
    from .evaluate import run_evaluation

    settings = check_settings(options.settings)
    budget = check_memory_budget(options.memory_budget_gb)
    check_output_folder(out, command="evaluate")
    t0 = time.time()
    inputs = resolve_inputs(request, log=log)
    check_top_k(options.top_k, inputs, budget)
    run = run_evaluation(inputs.loaded, inputs.tokens, inputs.head_saes, inputs.concat_sae, out_dir=out,
                         settings=settings, context=inputs.context, top_k=options.top_k, progress=options.progress,
                         title=options.title, memory_budget=budget, log=log)
    return run, time.time() - t0


@dataclass(frozen=True)
class DashboardOptions:
    """The settings linked, the analysis page (evaluate now, or copy an earlier evaluation), what is left out."""

    settings: tuple[SolverSetting, ...] = DEFAULT_SETTINGS
    evaluate: bool = False
    evaluation_dir: Path | None = None
    eval_contexts: int = 64
    keep_bos: bool = False
    ignore_tokens: tuple[int, ...] | None = None
    neuronpedia: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if self.evaluate and self.evaluation_dir is not None:
            raise InputError("give --evaluate or --evaluation, not both")


def dashboard_job(request: InputRequest, options: DashboardOptions, out: str | Path, *, log: Log = print):
    """``sparsedecomp dashboard``: resolve the inputs, decompose, (evaluate,) gather and write the site into
    ``out`` (the evaluation report in ``out/evaluation/``, a part of the site's run)."""
    from .dashboard import (check_evaluation_matches, copy_evaluation_report, evaluation_report_files,
                            write_dashboards)
    from .evaluate import run_evaluation

    settings = check_settings(options.settings)
    out = check_output_folder(out, command="dashboard")
    linked = options.evaluate or options.evaluation_dir is not None
    evaluation_out = out / "evaluation"
    if linked:
        check_output_folder(evaluation_out, command="evaluate")
    report_files = evaluation_report_files(options.evaluation_dir) if options.evaluation_dir is not None else None
    t0 = time.time()
    inputs = resolve_inputs(request, log=log)
    d_vocab = inputs.model.cfg.d_vocab
    if options.ignore_tokens and max(options.ignore_tokens) >= d_vocab:
        raise InputError(f"--ignore-tokens: id {max(options.ignore_tokens)} is not in the model's vocabulary "
                         f"(d_vocab={d_vocab})")
    if report_files is not None:
        check_evaluation_matches(report_files, hook_name=inputs.concat_sae.hook_name,
                                 n_heads=inputs.model.cfg.n_heads, d_head=inputs.model.cfg.d_head,
                                 concat_fingerprint=inputs.context["concat_sae_fingerprint"])
    with RunWriter(out, command="dashboard", settings={"settings": [s.describe() for s in settings]}) as writer:
        decomposer = Decomposer(inputs.concat_sae, inputs.head_saes, W_O=inputs.W_O)
        if options.evaluate:
            run_evaluation(inputs.loaded, inputs.tokens.first(options.eval_contexts), inputs.head_saes,
                           inputs.concat_sae, out_dir=evaluation_out, settings=settings, context=inputs.context,
                           progress=options.progress, log=log, decomposer=decomposer)
        elif report_files is not None:
            copy_evaluation_report(report_files, evaluation_out)
        decompositions = decomposer.solve_all(settings, progress=options.progress, log=log)
        site = write_dashboards(inputs.loaded, inputs.tokens, inputs.head_saes, inputs.concat_sae, decompositions,
                                out, progress=options.progress, neuronpedia=options.neuronpedia,
                                exclude_bos=not options.keep_bos, ignore_tokens=options.ignore_tokens,
                                analysis_href="evaluation/report.html" if linked else None,
                                context={k: str(v) for k, v in inputs.context.items()}, log=log, writer=writer,
                                parts=("evaluation",) if linked else ())
    return site, time.time() - t0


@dataclass(frozen=True)
class DemoOptions(DecomposeOptions):
    """The demo's decomposition (as ``decompose``'s), then how many contexts its evaluation and dashboards read, and
    whether they run."""

    eval_contexts: int = DEMO_EVAL_CONTEXTS
    dashboard_contexts: int | None = DEMO_DASHBOARD_CONTEXTS  # None: every shipped held-out context
    dashboard_split: str = "train"
    evaluate: bool = True
    dashboards: bool = True
    artifacts: Path | None = None


def demo_verdict_note(params: Mapping[str, Any], *, evaluated: bool, world: Any) -> str | None:
    """What an atom budget's relative error means on the demo world (for the OMP methods; ``None`` otherwise)."""
    if "n_nonzero" not in params:
        return None
    where = ("the exact pseudoinverse decomposition and the lasso are routed beside it in evaluation/report.html, "
             "where the loss each recovers says what the missing part costs" if evaluated else
             "--method pinv decomposes every feature exactly, and the evaluation report (run the demo without "
             "--no-evaluate) says what the missing part costs in loss")
    heads = world.head_saes
    return (f"On the demo world: each of its {world.concat_sae.d_sae:,} concat features spreads over several heads' "
            f"features ({len(heads)} dictionaries of {heads[heads.heads[0]].d_sae} on {heads.d_head}-dimensional "
            f"heads), so a budget of {params['n_nonzero']} unit atoms leaves part of each direction out; {where}.")
DEMO_LINKS = {
    "dashboards": ("dashboards/index.html", "Feature dashboards",
                   "every concat and per-head feature, linked through the decompositions"),
    "evaluation": ("evaluation/report.html", "Evaluation report",
                   "SAE quality, splice-in losses, head attribution, faithfulness and the weight analyses"),
}


def demo_job(options: DemoOptions, out: str | Path, *, log: Log = print):
    """``sparsedecomp demo``: the whole job on the built-in demo world. ``out`` gets the decomposition (its
    ``index.html`` is the front page, linking the rest), ``out/evaluation/`` and ``out/dashboards/``; the top manifest
    is complete only when both parts are."""
    from ..demo import demo_tokens, load_demo_world
    from .dashboard import write_dashboards
    from .decompose import run_decomposition
    from .evaluate import run_evaluation

    params = solver_params(options.method, options.params)
    out = check_output_folder(out, command="demo")
    # Everything under the demo's folder is the demo's run (its parts are written as `demo` runs too), so a rerun
    # rewrites them and another command's folder is refused.
    for part, wanted in (("evaluation", options.evaluate), ("dashboards", options.dashboards)):
        if wanted:
            check_output_folder(out / part, command="demo")
    t0 = time.time()
    log("loading the demo world (model with its tokenizer, per-head SAEs, concat SAE) ...")
    world = load_demo_world(options.artifacts)
    log(f"  {world.model.cfg.model_name}: {world.hook_name}, {len(world.head_saes)} head SAEs "
        f"({world.head_saes[0].activation.describe()}, {world.head_saes[0].d_sae} features each), concat SAE "
        f"{world.concat_sae.d_sae} features ({time.time() - t0:.1f}s)")
    context = {"world": "sparsedecomp demo", "model": world.model.cfg.model_name, "hook": world.hook_name,
               "processing_flags": world.processing_flags.describe(),
               "concat_sae": world.describe()["concat_sae"]["source"],
               "concat_sae_fingerprint": sae_fingerprint(world.concat_sae)}
    if "quality" in world.report:
        from ..demo.quality import describe_summary

        context.update(describe_summary(world.report["quality"]["summary"]))
    top = RunWriter(out, command="demo", settings={"method": options.method, "params": params,
                                                   "space": options.space})
    decomposer = Decomposer(world.concat_sae, world.head_saes, W_O=world.W_O)
    links = [{"href": href, "title": title, "description": text} for part, (href, title, text) in DEMO_LINKS.items()
             if (part == "evaluation" and options.evaluate) or (part == "dashboards" and options.dashboards)]
    with top:
        run = run_decomposition(world.concat_sae, world.head_saes, out_dir=out, method=options.method,
                                params=params, space=options.space, W_O=world.W_O,
                                title="Demo: per-head decomposition of concat-SAE features", context=context,
                                progress=options.progress, command="demo", features=options.features,
                                decomposer=decomposer if options.features is None else None, writer=top,
                                links=links, log=log, verdict_note=demo_verdict_note(params, evaluated=options.evaluate,
                                                                               world=world))
        evaluation = None
        if options.evaluate:
            tokens = demo_tokens(options.eval_contexts, options.artifacts)
            log(f"evaluating on {tokens.n_tokens:,} held-out tokens ({tokens.n_contexts} contexts) ...")
            evaluation = run_evaluation(world.model, tokens, world.head_saes, world.concat_sae,
                                        out_dir=out / "evaluation", context=context, log=log,
                                        title="Demo: evaluation of per-head and concat SAEs", command="demo",
                                        progress=options.progress, decomposer=decomposer)
            top.add_part("evaluation")
        site = None
        if options.dashboards:
            tokens = demo_tokens(options.dashboard_contexts, options.artifacts, split=options.dashboard_split)
            log(f"dashboards on {tokens.n_tokens:,} tokens of the demo's {options.dashboard_split} documents ...")
            decompositions = decomposer.solve_all(DEFAULT_SETTINGS, progress=options.progress, log=log)
            site = write_dashboards(world.model, tokens, world.head_saes, world.concat_sae, decompositions,
                                    out / "dashboards", progress=options.progress, tokenizer=world.tokenizer,
                                    analysis_href="../evaluation/report.html" if options.evaluate else None,
                                    context={k: str(v) for k, v in context.items()}, neuronpedia=True, log=log,
                                    command="demo")
            top.add_part("dashboards")
    return run, evaluation, site, time.time() - t0
