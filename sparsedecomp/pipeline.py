"""The job behind both CLI subcommands: decompose every concat-SAE feature into the per-head SAE dictionaries,
measure the result and write it out (``summary.json``, a self-contained ``index.html`` and the sparse codes).

Targets are the concat SAE's decoder rows ``W_dec[i] / ||W_dec[i]||`` (Kissane's rows are already unit norm,
recorded in the summary); the dictionary is the per-head decoders lifted block-diagonally into concatenated ``z``
with unit atoms (``normalize=True``), so a coefficient is the weight of a unit per-head feature direction and
``coefficient / ||W_dec_h[j]||`` is the per-head feature's activation in its SAE's own units. In the residual space
both sides go through the layer's ``W_O``: atoms ``d_j @ W_O[h]`` and targets ``t @ W_O_cat`` (not renormalised).
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from .decomposition import Decomposition, concat_decompositions
from .dictionary import BlockDictionary, Dictionary, mix_targets
from .evaluation.metrics import decomposition_metrics, head_columns, target_head_shares
from .solvers import decompose, make_solver
from .errors import InputError, InputTypeError

SPACES = ("z", "residual", "both")
DEFAULT_METHOD = "nn_omp"
DEFAULT_PARAMS: dict[str, dict[str, Any]] = {"nn_omp": {"n_nonzero": 16, "tol": 0.01}}


@dataclass(frozen=True, eq=False)
class PipelineResult:
    """What :func:`run_decomposition` wrote and computed."""

    summary: dict
    summary_path: Path
    html_path: Path
    code_paths: dict[str, Path]
    decompositions: dict[str, Decomposition] = field(default_factory=dict)


def concat_targets(concat_sae) -> tuple[Tensor, dict]:
    """Unit-norm concat decoder rows and a note on their original norms."""
    norms = concat_sae.W_dec.norm(dim=1)
    unit = bool(torch.allclose(norms, torch.ones_like(norms), atol=1e-3))
    note = {"decoder_already_unit_norm": unit, "norm_min": float(norms.min()), "norm_mean": float(norms.mean()),
            "norm_max": float(norms.max()), "zero_rows": int((norms == 0).sum())}
    if note["zero_rows"]:
        raise InputError(f"the concat SAE has {note['zero_rows']} all-zero decoder rows; they cannot be decomposed")
    return concat_sae.W_dec / norms[:, None], note


def check_compatible(concat_sae, head_saes) -> tuple[int, int]:
    """``(n_heads, d_head)`` after checking the concat SAE reads the per-head SAEs' layer, all heads together."""
    n_heads, d_head = len(head_saes), head_saes.d_head
    if concat_sae.d_in != n_heads * d_head:
        raise InputError(
            f"the concat SAE reads {concat_sae.d_in} dimensions but {n_heads} head SAEs of d_head={d_head} span "
            f"{n_heads * d_head}; give one SAE per head of the layer (or a --head-index-map)"
        )
    if concat_sae.layer != head_saes.layer:
        raise InputError(f"the concat SAE reads layer {concat_sae.layer} but the head SAEs read layer {head_saes.layer}")
    return n_heads, d_head


def solver_params(method: str, params: Mapping[str, Any] | None) -> dict[str, Any]:
    """``params`` over the method's defaults (only ``nn_omp`` has defaults here); validated by building the solver."""
    merged = {**DEFAULT_PARAMS.get(method, {}), **{k: v for k, v in (params or {}).items() if v is not None}}
    make_solver(method, **merged)  # raises ValueError / TypeError naming a bad method or parameter
    return merged


def decompose_with_progress(targets: Tensor, dictionary: Dictionary, *, method: str, params: Mapping[str, Any],
                            chunk: int | None = None, progress: bool = True, desc: str = "decompose") -> Decomposition:
    """:func:`sparsedecomp.decompose` over chunks of targets with a tqdm bar.

    ``chunk`` defaults to about a tenth of the targets (at least 512): batched solvers amortise their per-step
    overhead over the chunk, so many small progress chunks would make a full-size run several times slower.
    """
    from tqdm.auto import tqdm

    if chunk is None:
        chunk = max(512, -(-targets.shape[0] // 10))
    parts = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for start in tqdm(range(0, targets.shape[0], chunk), desc=desc, unit="chunk", disable=not progress):
            parts.append(decompose(targets[start : start + chunk], dictionary, method=method, **params))
    result = concat_decompositions(parts)
    if any(w.category.__name__ == "ConvergenceWarning" for w in caught):
        result.warn_if_failed()
    for w in caught:
        if w.category.__name__ != "ConvergenceWarning":
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return result


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
    top_atoms: int = 8,
    html_max_features: int = 2048,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> PipelineResult:
    """Decompose every feature of ``concat_sae`` into ``head_saes``' dictionaries and write the results.

    ``head_saes`` must already have their input scales folded if their magnitudes matter (directions do not
    depend on them; :class:`~sparsedecomp.loading.HeadSAEs` warns otherwise). ``space`` is ``"z"``,
    ``"residual"`` (needs ``W_O``, ``(n_heads, d_head, d_model)``) or ``"both"``. ``context`` is copied into the
    summary (model, sources, flags ...).
    """
    if space not in SPACES:
        raise InputError(f"space must be one of {SPACES}, got {space!r}")
    if space != "z" and W_O is None:
        raise InputError(f"space={space!r} needs W_O (pass a model so that W_O of layer {concat_sae.layer} is known)")
    n_heads, d_head = check_compatible(concat_sae, head_saes)
    params = solver_params(method, params)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    dictionary = head_saes.dictionary(normalize=True)
    targets, target_note = concat_targets(concat_sae)
    targets = targets.to(dictionary.dtype)
    weight_shares = target_head_shares(targets, head_columns(n_heads * d_head, d_head))
    log(f"dictionary: {dictionary.n_atoms} atoms ({n_heads} heads x {dictionary.n_atoms // n_heads}) in "
        f"{dictionary.dim} dims; {targets.shape[0]} targets; method {method} {params}")

    spaces = ["z", "residual"] if space == "both" else [space]
    results: dict[str, Decomposition] = {}
    ranks: dict[str, Any] = {"head_dictionaries": {str(h): r for h, r in dictionary.head_ranks().items()},
                             "block_dictionary": dictionary.rank(), "concat_decoder": _rank(targets)}
    for name in spaces:
        if name == "z":
            dict_s, targets_s = dictionary, targets
        else:
            dict_s = dictionary.mix(W_O.to(dictionary.dtype))
            targets_s = mix_targets(targets, W_O.to(dictionary.dtype))
            ranks["mixed_dictionary"] = dict_s.rank()
        results[name] = decompose_with_progress(targets_s, dict_s, method=method, params=params,
                                                progress=progress, desc=f"decompose ({name})")

    summary: dict[str, Any] = {
        "title": title,
        "context": dict(context or {}),
        "method": method,
        "params": params,
        "spaces": spaces,
        "n_targets": int(targets.shape[0]),
        "n_heads": n_heads,
        "d_head": d_head,
        "dictionary_sizes": {str(h): int(s) for h, s in head_saes.d_sae.items()},
        "targets": target_note,
        "ranks": ranks,
        "weight_head_share_mean": [float(v) for v in weight_shares.mean(0)],
        "results": {},
    }
    code_paths = {}
    for name, dec in results.items():
        metrics = decomposition_metrics(dec)
        features = _feature_records(dec, weight_shares, metrics, top_atoms)
        summary["results"][name] = {
            "metrics": metrics.summary(),
            "agreement_weight_vs_decomposition": _share_agreement(weight_shares, metrics.head_mass_share),
            "features": features,
        }
        code_paths[name] = _save_codes(out / f"codes_{name}.safetensors", dec)
    summary["elapsed_s"] = round(time.time() - t0, 2)
    summary_path = out / "summary.json"
    summary_path.write_text(json.dumps(summary, separators=(",", ":"), default=_json_default) + "\n")
    from .summary_html import render_summary_html

    html_path = out / "index.html"
    html_path.write_text(render_summary_html(summary, max_features=html_max_features), encoding="utf-8")
    return PipelineResult(summary=summary, summary_path=summary_path, html_path=html_path, code_paths=code_paths,
                          decompositions=results)


def _rank(matrix: Tensor) -> int:
    return int(torch.linalg.matrix_rank(matrix.double()))


def _share_agreement(weight: Tensor, decomposition: Tensor | None) -> dict[str, float] | None:
    """How often the top head by decoder-weight share is the top head by coefficient mass, and the mean total
    variation distance between the two share vectors."""
    if decomposition is None:
        return None
    ok = decomposition.sum(1) > 0
    if not bool(ok.any()):
        return {"top_head_agreement": 0.0, "mean_total_variation": 1.0}
    w, d = weight[ok].double(), decomposition[ok].double()
    return {"top_head_agreement": float((w.argmax(1) == d.argmax(1)).double().mean()),
            "mean_total_variation": float(0.5 * (w - d).abs().sum(1).mean())}


def _feature_records(dec: Decomposition, weight_shares: Tensor, metrics, top_atoms: int) -> list[dict]:
    coef = dec.coefficients
    units = dec.feature_coefficients()
    head = dec.dictionary.head
    feature = dec.dictionary.feature
    k = min(top_atoms, coef.shape[1])
    top_val, top_idx = coef.abs().topk(k, dim=1)
    records = []
    for i in range(coef.shape[0]):
        atoms = []
        for v, j in zip(top_val[i].tolist(), top_idx[i].tolist()):
            if v == 0:
                break
            atoms.append({"head": int(head[j]), "feature": int(feature[j]), "coefficient": float(coef[i, j]),
                          "activation_units": float(units[i, j])})
        dshare = metrics.head_mass_share[i] if metrics.head_mass_share is not None else None
        records.append({
            "feature": i,
            "status": int(dec.status[i]),
            "l0": int(metrics.l0[i]),
            "relative_error": float(metrics.relative_error[i]),
            "cosine": float(metrics.cosine[i]),
            "weight_head_shares": [round(float(v), 4) for v in weight_shares[i]],
            "decomposition_head_shares": None if dshare is None else [round(float(v), 4) for v in dshare],
            "atoms": atoms,
        })
    return records


def _save_codes(path: Path, dec: Decomposition) -> Path:
    """The non-zero coefficients in coordinate form (target row, atom index, value) plus atom labels."""
    from safetensors.torch import save_file

    nz = dec.coefficients.nonzero()
    tensors = {
        "row": nz[:, 0].contiguous(),
        "atom": nz[:, 1].contiguous(),
        "value": dec.coefficients[nz[:, 0], nz[:, 1]].float().contiguous(),
        "atom_head": dec.dictionary.head.contiguous(),
        "atom_feature": dec.dictionary.feature.contiguous(),
        "atom_scale": dec.dictionary.scales.float().contiguous(),
    }
    save_file(tensors, str(path), metadata={"shape": json.dumps(list(dec.coefficients.shape)), "solver": dec.solver})
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    raise InputTypeError(f"not JSON serialisable: {type(value).__name__}")
