"""The job behind ``sparsedecomp evaluate`` (and the demo's evaluation): decompose the concat SAE's features with
each solver setting, evaluate everything on the model (:func:`sparsedecomp.evaluation.evaluate.evaluate`) and write
``report.json``, ``report.html`` and ``plotly.min.js`` (the installed plotly's own script, beside the page, so it
opens from disk with no network) through one :class:`~sparsedecomp.outputs.RunWriter`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .activations import DEFAULT_MEMORY_BUDGET
from .decomposition import Decomposition
from .dictionary import mix_targets
from .errors import InputError
from .evaluation.evaluate import Evaluation, evaluate
from .evaluation.jsonable import to_jsonable
from .loading.heads import check_compatible, check_model_shape
from .outputs import RunWriter
from .pipeline import concat_targets, solver_params
from .solver_settings import SolverSetting, unique_labels
from .solvers import make_solver

DEFAULT_SETTINGS = (SolverSetting("pinv"), SolverSetting("nn_omp", {"n_nonzero": 16, "tol": 0.01}),
                    SolverSetting("nn_lasso", {"alpha": 0.2}))
"""Three routed settings by default: the exact pseudoinverse (the consistency check), sparse OMP and the lasso."""


@dataclass(frozen=True, eq=False)
class EvaluationRun:
    """What :func:`run_evaluation` computed and wrote."""

    evaluation: Evaluation
    decompositions: Mapping[str, Decomposition]
    report_path: Path
    html_path: Path


def decompose_settings(concat_sae: Any, head_saes: Any, settings: Sequence[SolverSetting], *, W_O: Any = None,
                       progress: bool = False, log: Callable[[str], None] = print) -> dict[str, Decomposition]:
    """One decomposition of the concat SAE's unit decoder rows per setting (``label -> Decomposition``): in ``z``
    into ``head_saes.dictionary(normalize=True)``, or in the residual stream (targets ``t @ W_O_cat`` renormalised,
    atoms ``dictionary.mix(W_O)``, as :func:`~sparsedecomp.pipeline.run_decomposition` does)."""
    settings = unique_labels(list(settings))
    dictionary = head_saes.dictionary(normalize=True)
    targets = concat_targets(concat_sae)[0].to(dictionary.dtype)
    out = {}
    for setting in settings:
        params = solver_params(setting.method, setting.params)
        if setting.space == "residual":
            if W_O is None:
                raise InputError(f"setting {setting.label!r} is in the residual space: a model (W_O) is needed")
            W = W_O.to(dictionary.dtype)
            mixed = mix_targets(targets, W)
            space_targets = mixed / mixed.norm(dim=1).clamp_min(1e-30)[:, None]
            space_dictionary = dictionary.mix(W)
        else:
            space_targets, space_dictionary = targets, dictionary
        start = time.time()
        out[setting.label] = make_solver(setting.method, **params).prepare(space_dictionary).solve(
            space_targets, progress=progress, desc=f"decompose ({setting.label})")
        log(f"decomposed {targets.shape[0]} features with {setting.label} ({time.time() - start:.1f}s): "
            f"{out[setting.label].status_counts()}")
    return out


def run_evaluation(model: Any, tokens: Any, head_saes: Any, concat_sae: Any, *, out_dir: str | Path,
                   settings: Sequence[SolverSetting] = DEFAULT_SETTINGS, title: str = "Evaluation",
                   context: Mapping[str, Any] | None = None, top_k: int = 20, progress: bool = True,
                   log: Callable[[str], None] = print, command: str = "evaluate",
                   memory_budget: int = DEFAULT_MEMORY_BUDGET) -> EvaluationRun:
    """Decompose with every setting, evaluate, and write the report (see the module docstring)."""
    from .activations import hooked_transformer, model_device
    from .evaluation.report_page import render_evaluation_page

    writer = RunWriter(out_dir, command=command,
                       settings={"settings": [s.describe() for s in settings], "tokens": _describe(tokens)})
    hooked = hooked_transformer(model)
    layer = concat_sae.require_hook("evaluating on a model")[1]
    check_compatible(concat_sae, head_saes)
    check_model_shape(hooked, head_saes)  # before minutes of decompositions, not after
    # Everything where the model is: the solvers, the accumulators and the splices run on its device (a GPU if so).
    device = model_device(hooked)
    head_saes, concat_sae = head_saes.to(device=device), concat_sae.to(device=device)
    start = time.time()
    decompositions = decompose_settings(concat_sae, head_saes, settings, W_O=hooked.W_O[layer].detach(),
                                        progress=progress, log=log)
    elapsed_decompose = time.time() - start
    evaluation = evaluate(model, tokens, head_saes, concat_sae, decompositions=decompositions, title=title,
                          context=context,
                          top_k=top_k, progress=progress, log=log, memory_budget=memory_budget)
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
