"""The ``evaluate`` job (also the demo's and ``dashboard --evaluate``'s): decompose the concat SAE's features with each
solver setting (through the run's one :class:`~sparsedecomp.jobs.solve.Decomposer`), evaluate everything on the model
(:func:`sparsedecomp.evaluation.evaluate.evaluate`) and write ``report.json``, ``report.html`` and ``plotly.min.js``
(the installed plotly's own script, beside the page, so it opens from disk with no network) through one
:class:`~sparsedecomp.outputs.RunWriter`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..activations import DEFAULT_MEMORY_BUDGET, hooked_transformer, model_device
from ..decomposition import Decomposition
from ..evaluation.evaluate import Evaluation, evaluate
from ..jsonio import to_jsonable
from ..loading.heads import check_compatible, check_model_shape
from ..outputs import RunWriter
from ..solver_settings import SolverSetting
from .solve import DEFAULT_SETTINGS, Decomposer


@dataclass(frozen=True, eq=False)
class EvaluationRun:
    """What :func:`run_evaluation` computed and wrote."""

    evaluation: Evaluation
    decompositions: Mapping[str, Decomposition]
    report_path: Path
    html_path: Path


def run_evaluation(model: Any, tokens: Any, head_saes: Any, concat_sae: Any, *, out_dir: str | Path,
                   settings: Sequence[SolverSetting] = DEFAULT_SETTINGS, title: str = "Evaluation",
                   context: Mapping[str, Any] | None = None, top_k: int = 20, progress: bool = True,
                   log: Callable[[str], None] = print, command: str = "evaluate",
                   memory_budget: int = DEFAULT_MEMORY_BUDGET, decomposer: Decomposer | None = None) -> EvaluationRun:
    """Decompose with every setting (``decomposer``'s settings already solved are reused), evaluate, and write the
    report (see the module docstring)."""
    from ..evaluation.report_page import render_evaluation_page

    writer = RunWriter(out_dir, command=command,
                       settings={"settings": [s.describe() for s in settings], "tokens": _describe(tokens)})
    hooked = hooked_transformer(model)
    layer = concat_sae.require_hook("evaluating on a model")[1]
    check_compatible(concat_sae, head_saes)
    check_model_shape(hooked, head_saes)  # before minutes of decompositions, not after
    # Everything where the model is: the solvers, the accumulators and the splices run on its device (a GPU if so).
    device = model_device(hooked)
    head_saes, concat_sae = head_saes.to(device=device), concat_sae.to(device=device)
    if decomposer is None:
        decomposer = Decomposer(concat_sae, head_saes, W_O=hooked.W_O[layer].detach())
    start = time.time()
    decompositions = decomposer.solve_all(settings, progress=progress, log=log)
    elapsed_decompose = time.time() - start
    evaluation = evaluate(model, tokens, head_saes, concat_sae, decompositions=decompositions, title=title,
                          context=context, top_k=top_k, progress=progress, log=log, memory_budget=memory_budget)
    # The decompositions are part of the run: their time goes into the report beside the evaluation's stages.
    report = replace(evaluation.report,
                     timings_s={"decompose": round(elapsed_decompose, 3), **evaluation.report.timings_s})
    evaluation = replace(evaluation, report=report)
    import plotly.offline

    with writer:
        report_path = writer.write_json("report.json", to_jsonable(report))
        writer.write_text("plotly.min.js", plotly.offline.get_plotlyjs())
        html_path = writer.write_text("report.html", render_evaluation_page(evaluation, plotly_src="plotly.min.js"))
    return EvaluationRun(evaluation=evaluation, decompositions=decompositions, report_path=report_path,
                         html_path=html_path)


def _describe(tokens: Any) -> Any:
    return tokens.describe() if hasattr(tokens, "describe") else {"shape": list(tokens.shape)}
