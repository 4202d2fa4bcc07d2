"""The ``decompose`` job: decompose concat-SAE features into the per-head SAE dictionaries (through the one driver,
:class:`~sparsedecomp.jobs.solve.Decomposer`), measure the result and write it out (``summary.json``, a
self-contained ``index.html`` and the sparse codes).

Targets and dictionaries are :mod:`sparsedecomp.jobs.solve`'s: unit concat decoder rows against unit per-head atoms in
``z``, both mixed through ``W_O`` and the targets renormalised in the residual stream (each feature's
``||t @ W_O_cat||`` is kept in the summary). A coefficient is the weight of a unit per-head feature direction and
``coefficient / ||W_dec_h[j]||`` the per-head feature's activation in its SAE's own units. Lasso weights default to a
fraction of each target's own ``alpha_max`` (``alpha_is_fraction_of_max=True``): the same sparsity pressure in both
spaces whatever the norms of the mixed atoms.

The run's report is a :class:`~sparsedecomp.decomposition_report.DecompositionReport` (typed, JSON-ready);
``summary.json`` is its JSON form (every key documented in ``docs/outputs.md``). Everything is written through one
:class:`~sparsedecomp.outputs.RunWriter`: atomic files, strict JSON and a ``manifest.json``.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from ..codes_file import write_codes_file
from ..decomposition import STATUS_LEGEND, Decomposition, Status
from ..decomposition_report import (AtomRecord, DecompositionReport, FeatureRecord, Ranks, ShareAgreement,
                                    SpaceResult, StatusMeaning)
from ..errors import InputError
from ..evaluation.metrics import decomposition_metrics, head_columns, target_head_shares
from ..loading import check_compatible
from ..optimality import alpha_max
from ..outputs import RunWriter
from ..solver_settings import SolverSetting
from .inputs import check_feature_selection
from .solve import DEFAULT_METHOD, Decomposer, solver_params

SPACES = ("z", "residual", "both")
# Most atoms listed per feature in summary.json (every non-zero of the sparse methods; the codes file has all).
MAX_LISTED_ATOMS = 64
# A decomposition whose median relative error exceeds this explains under 1 - 0.3^2 = 91 % of a typical target's
# squared norm; the summary and the page say so in words.
EXPLAINS_LITTLE_RELATIVE_ERROR = 0.3


@dataclass(frozen=True, eq=False)
class DecompositionRun:
    """What :func:`run_decomposition` wrote and computed: ``summary`` is the report that ``summary.json`` holds
    (``summary.to_dict()`` is the file's content)."""

    summary: DecompositionReport
    summary_path: Path
    html_path: Path
    code_paths: dict[str, Path]
    decompositions: dict[str, Decomposition] = field(default_factory=dict)


def run_decomposition(
    concat_sae,
    head_saes,
    *,
    out_dir: str | Path,
    method: str = DEFAULT_METHOD,
    params: Mapping[str, Any] | None = None,
    space: str = "z",
    W_O: Tensor | None = None,
    title: str = "Per-head decomposition of concat-SAE features",
    context: Mapping[str, Any] | None = None,
    html_max_features: int = 2048,
    progress: bool = True,
    log: Callable[[str], None] = print,
    command: str = "decompose",
    features: Sequence[int] | Sequence[range] | None = None,
    decomposer: Decomposer | None = None,
    writer: RunWriter | None = None,
    links: Sequence[Mapping[str, str]] = (),
    verdict_note: str | None = None,
) -> DecompositionRun:
    """Decompose every feature of ``concat_sae`` (or the ``features`` selected by index or range) into
    ``head_saes``' dictionaries and write the results.

    ``head_saes`` must already have their input scales folded if their magnitudes matter (directions do not depend
    on them). ``space`` is ``"z"``, ``"residual"`` (needs ``W_O``, ``(n_heads, d_head, d_model)``) or ``"both"``.
    ``context`` is copied into the summary (model, sources, flags ...). The output folder must be new, empty or an
    earlier ``command`` run's (:func:`~sparsedecomp.outputs.check_output_folder`). Records and codes rows keep the
    selected features' order, and each record names its feature. ``decomposer`` shares solved settings with other
    jobs of the same run (its feature selection must be this one's). ``writer`` writes into a folder the caller holds
    (and completes: the demo's front folder); ``links`` go at the top of ``index.html``; ``verdict_note`` is added to
    each space's verdict (what its number means for these SAEs).
    """
    if space not in SPACES:
        raise InputError(f"space must be one of {SPACES}, got {space!r}")
    if space != "z" and W_O is None and (decomposer is None or decomposer.W_O is None):
        raise InputError(f"space={space!r} needs W_O (pass a model so that W_O of layer {concat_sae.layer} is known)")
    n_heads, d_head = check_compatible(concat_sae, head_saes)  # names every difference: width, layer, hook, model
    params = solver_params(method, params)
    spaces = ["z", "residual"] if space == "both" else [space]
    own = writer is None
    if own:
        writer = RunWriter(out_dir, command=command, settings={"method": method, "params": params, "spaces": spaces})
    t0 = time.time()
    feature_ids = check_feature_selection(features, concat_sae.d_sae)
    if decomposer is None:
        decomposer = Decomposer(concat_sae, head_saes, W_O=W_O, features=None if features is None else feature_ids)
    elif not torch.equal(decomposer.feature_ids.cpu(), feature_ids):
        raise InputError("the decomposer given selects other features than this run")
    dictionary, targets = decomposer.dictionary, decomposer.targets
    concat_rank = _rank(decomposer.unit_decoder)  # of the whole decoder, whatever is selected
    weight_shares = target_head_shares(targets, head_columns(n_heads * d_head, d_head))
    log(f"dictionary: {dictionary.n_atoms} atoms ({n_heads} heads x {dictionary.n_atoms // n_heads}) in "
        f"{dictionary.dim} dims; {targets.shape[0]} targets; method {method} {params}")

    results: dict[str, Decomposition] = {}
    timings: dict[str, float] = {"setup": time.time() - t0}
    residual_norms = None
    mixed_rank = None
    target_note = decomposer.targets_note
    for name in spaces:
        solved = decomposer.solve(SolverSetting(method, params, name), progress=progress)
        results[name] = solved.decomposition
        timings[f"decompose_{name}"] = solved.seconds
        if name == "residual":
            residual_norms = solved.problem.target_norms
            mixed_rank = solved.problem.dictionary.rank()
            target_note = replace(target_note, residual_norm=solved.problem.norm_range())

    code_paths = {}
    space_results: dict[str, SpaceResult] = {}
    start = time.time()
    with writer if own else nullcontext():
        for name, dec in results.items():
            metrics = decomposition_metrics(dec)
            space_results[name] = SpaceResult(
                metrics=metrics.summarize(),
                certificate_kind=dec.certificate_kind,
                verdict=_verdict(method, params, dec, metrics) + (f" {verdict_note}" if verdict_note else ""),
                agreement_weight_vs_decomposition=_share_agreement(weight_shares, metrics.head_mass_share),
                codes_file=f"codes_{name}.safetensors",
                codes_layout=dec.codes.layout,
                features=_feature_records(dec, weight_shares, metrics,
                                          residual_norms if name == "residual" else None, feature_ids),
            )
            extra = {"feature_index": feature_ids}
            if "alpha" in params:
                extra["l1_weight"] = _l1_weights(method, params, dec)
            if name == "residual":
                # The residual targets were renormalised: these norms turn the codes back into ones for t @ W_O_cat.
                extra["target_norm"] = residual_norms
            code_paths[name] = writer.write_with(f"codes_{name}.safetensors",
                                                 lambda tmp, dec=dec, extra=extra: write_codes_file(tmp, dec, extra))
        from ..decomposition_page import render_decomposition_page

        timings["metrics_and_codes"] = time.time() - start  # the summary and the page are written after this
        report = DecompositionReport(
            title=title,
            context=dict(context or {}),
            method=method,
            params=params,
            alpha_meaning=_alpha_meaning(method, params),
            spaces=tuple(spaces),
            n_targets=int(targets.shape[0]),
            n_concat_features=int(concat_sae.d_sae),
            features_selected=None if features is None else tuple(feature_ids.tolist()),
            n_heads=n_heads,
            d_head=d_head,
            dictionary_sizes={str(h): int(s) for h, s in head_saes.d_sae.items()},
            targets=target_note,
            ranks=Ranks(head_dictionaries={str(h): r for h, r in dictionary.head_ranks().items()},
                        block_dictionary=dictionary.rank(), concat_decoder=concat_rank, mixed_dictionary=mixed_rank),
            weight_head_share_mean=tuple(float(v) for v in weight_shares.mean(0)),
            status_legend={s.name: StatusMeaning(code=int(s), meaning=STATUS_LEGEND[s.name]) for s in Status},
            results=space_results,
            timings_s={name: round(value, 3) for name, value in timings.items()},
            elapsed_s=round(time.time() - t0, 2),
        )
        summary_path = writer.write_json("summary.json", report.to_dict())
        html_path = writer.write_text("index.html", render_decomposition_page(report, max_features=html_max_features,
                                                                                  links=links))
    return DecompositionRun(summary=report, summary_path=summary_path, html_path=html_path, code_paths=code_paths,
                            decompositions=results)


NONNEGATIVE_LASSOS = ("nn_lasso", "cvxpy_nn_lasso")


def _l1_weights(method: str, params: Mapping[str, Any], dec: Decomposition) -> Tensor:
    """Each target's L1 weight as solved: ``alpha``, or ``alpha * alpha_max(t)`` for a relative alpha."""
    if not params.get("alpha_is_fraction_of_max"):
        return torch.full((dec.n_targets,), float(params["alpha"]))
    top = alpha_max(dec.targets, dec.dictionary, nonnegative=method in NONNEGATIVE_LASSOS)
    return float(params["alpha"]) * top


def _alpha_meaning(method: str, params: Mapping[str, Any]) -> str | None:
    if "alpha" not in params:
        return None
    if params.get("alpha_is_fraction_of_max"):
        top = "max_j (t . d_j)_+" if method in NONNEGATIVE_LASSOS else "max_j |t . d_j|"
        return (f"alpha = {params['alpha']} x each target's alpha_max = {top} "
                "(the smallest weight giving the zero code), in each space")
    return f"alpha = {params['alpha']}, an absolute L1 weight on unit-norm targets"


def _verdict(method: str, params: Mapping[str, Any], dec: Decomposition, metrics) -> str:
    """One sentence on how much of the targets the decomposition explains, and why it stopped."""
    median_error = float(metrics.relative_error.double().nanmedian())
    unexplained = float(metrics.relative_squared_error.double().nanmedian())
    counts = dec.status_counts()
    n = dec.n_targets
    stops = ", ".join(f"{name} on {count:,} of {n:,}" for name, count in counts.items())
    text = (f"{method} stopped with {stops} features. Median relative error {median_error:.2f}: for a typical "
            f"feature, {100 * unexplained:.0f} % of its direction's squared norm is left in the residual "
            "||t - t_hat||^2 / ||t||^2.")
    if median_error > EXPLAINS_LITTLE_RELATIVE_ERROR:
        hint = ("a larger n_nonzero or a smaller tol" if "n_nonzero" in params else
                "a smaller alpha" if "alpha" in params else "another method")
        text += (f" This decomposition explains little of most features (median relative error above "
                 f"{EXPLAINS_LITTLE_RELATIVE_ERROR}): read its head attributions with care, or try {hint}.")
    return text


def _rank(matrix: Tensor) -> int:
    return int(torch.linalg.matrix_rank(matrix.double()))


def _share_agreement(weight: Tensor, decomposition: Tensor | None) -> ShareAgreement | None:
    """How often the top head by decoder-weight share is the top head by coefficient mass, and the mean total
    variation distance between the two share vectors."""
    if decomposition is None:
        return None
    ok = decomposition.sum(1) > 0
    if not bool(ok.any()):
        return None  # no code has any mass: there is nothing to compare
    w, d = weight[ok].double(), decomposition[ok].double()
    return ShareAgreement(top_head_agreement=float((w.argmax(1) == d.argmax(1)).double().mean()),
                          mean_total_variation=float(0.5 * (w - d).abs().sum(1).mean()))


def _feature_records(dec: Decomposition, weight_shares: Tensor, metrics, residual_norms: Tensor | None,
                     feature_ids: Tensor) -> tuple[FeatureRecord, ...]:
    """One record per feature: status (by name), certificate, objective, iterations, metrics, head shares, and
    its code's atoms (every non-zero up to :data:`MAX_LISTED_ATOMS`, largest first; ``n_atoms_listed`` < ``l0``
    says a list was cut, and the codes file always has them all)."""
    codes = dec.codes.to(device="cpu")
    units = dec.feature_codes().to(device="cpu")
    head = dec.dictionary.head.cpu()
    feature = dec.dictionary.feature.cpu()
    k = min(MAX_LISTED_ATOMS, codes.width)
    top_val, top_slot = codes.values.abs().topk(k, dim=1)
    top_atom = codes.atom_indices().gather(1, top_slot)
    signed = codes.values.gather(1, top_slot)
    in_units = units.values.gather(1, top_slot)
    status, certificate = dec.status.cpu(), dec.certificate.cpu()
    objective, iterations = dec.objective.cpu(), dec.iterations.cpu()
    records = []
    for i in range(codes.n_targets):
        atoms = []
        for v, j, c, u in zip(top_val[i].tolist(), top_atom[i].tolist(), signed[i].tolist(), in_units[i].tolist()):
            if v == 0:
                break
            atoms.append(AtomRecord(head=int(head[j]), feature=int(feature[j]), coefficient=c, activation_units=u))
        dshare = metrics.head_mass_share[i] if metrics.head_mass_share is not None else None
        records.append(FeatureRecord(
            feature=int(feature_ids[i]),
            status=Status(int(status[i])).name,
            certificate=float(certificate[i]),
            objective=float(objective[i]),
            iterations=int(iterations[i]),
            l0=int(metrics.l0[i]),
            relative_error=float(metrics.relative_error[i]),
            cosine=float(metrics.cosine[i]),
            weight_head_shares=tuple(round(float(v), 4) for v in weight_shares[i]),
            decomposition_head_shares=None if dshare is None else tuple(round(float(v), 4) for v in dshare),
            n_atoms_listed=len(atoms),
            atoms=tuple(atoms),
            residual_norm=None if residual_norms is None else float(residual_norms[i]),
        ))
    return tuple(records)
