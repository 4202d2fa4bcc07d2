"""Input checks shared by every public entry point.

Each check raises ``ValueError`` or ``TypeError`` whose message names the argument, what was expected and what
was received, so a researcher can fix a call without reading the source. Inputs that are legitimate but make
part of an answer meaningless (a zero target, a lasso weight that zeroes a code) are not refused: they get one
:class:`DegenerateInputWarning` per call, saying what and how many.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor
from .errors import InputError, InputTypeError

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# How many offending rows / heads / indices a message lists before it only counts them.
SHOWN = 5


class DegenerateInputWarning(UserWarning):
    """An input is valid but makes part of the answer trivially fixed (e.g. exactly zero) whatever the method."""


class ZeroTargetWarning(DegenerateInputWarning):
    """Some targets are the zero vector: their code is zero by definition, not found by the solver."""


class AlphaAboveMaxWarning(DegenerateInputWarning):
    """An absolute lasso weight is at least some targets' ``alpha_max``, so their code is exactly zero."""


def first_indices(mask: Tensor) -> list[int]:
    """The first :data:`SHOWN` indices where the 1-d ``mask`` is true, for messages."""
    return mask.nonzero().squeeze(1)[:SHOWN].tolist()


def check_tensor(value: object, name: str, *, ndim: int | None = None) -> Tensor:
    """Return ``value`` if it is a floating-point tensor with ``ndim`` dimensions and only finite entries."""
    if not isinstance(value, Tensor):
        raise InputTypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise InputTypeError(f"{name} must have a floating-point dtype, got {value.dtype}")
    if ndim is not None and value.ndim != ndim:
        raise InputError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    check_has_data(value, name)
    check_finite(value, name)
    return value


def check_like(value: Tensor, name: str, reference: Tensor, reference_name: str) -> None:
    """Refuse ``value`` unless it has ``reference``'s dtype and device (weights of one model must share both)."""
    if value.dtype != reference.dtype or value.device != reference.device:
        raise InputError(f"{name} is {value.dtype} on {value.device} but {reference_name} is {reference.dtype} on "
                         f"{reference.device}; all SAE weights must share dtype and device")


def check_has_data(value: Tensor, name: str) -> None:
    """Refuse a tensor on the ``meta`` device: it has a shape and dtype but no values, so nothing can be computed
    from it (torch would fail later, deep inside, on the first value read)."""
    if value.is_meta:
        raise InputError(f"{name} is on the meta device, which holds no data (only shapes); create or load it "
                         "on 'cpu' or 'cuda'")


def check_finite(value: Tensor, name: str) -> None:
    """Raise ``ValueError`` naming how many NaN / Inf entries ``value`` holds, and where the first one is."""
    finite = torch.isfinite(value)
    if bool(finite.all()):
        return
    bad = (~finite).nonzero()
    n_nan = int(torch.isnan(value).sum())
    n_inf = int(torch.isinf(value).sum())
    raise InputError(
        f"{name} contains {n_nan} NaN and {n_inf} Inf entries (first at index {tuple(bad[0].tolist())})"
    )


def check_targets(targets: object, dim: int, name: str = "targets") -> Tensor:
    """Check a ``(n_targets, dim)`` batch of target directions; a single ``(dim,)`` vector is rejected
    explicitly so that a forgotten batch axis never broadcasts silently."""
    targets = check_tensor(targets, name)
    if targets.ndim != 2:
        raise InputError(
            f"{name} must have shape (n_targets, {dim}); got shape {tuple(targets.shape)}"
            + (" (use targets[None] for a single target)" if targets.ndim == 1 else "")
        )
    if targets.shape[1] != dim:
        raise InputError(
            f"{name} has {targets.shape[1]} columns but the dictionary atoms have dimension {dim}: "
            f"expected shape (n_targets, {dim}), got {tuple(targets.shape)}"
        )
    check_norms_representable(targets, name)
    return targets


def check_norms_representable(rows: Tensor, name: str) -> None:
    """Raise if a row's squared norm overflows or underflows the dtype: every solver and certificate works with
    ``||y||^2``, so such a row would come back as a zero code or NaN rather than an answer."""
    if rows.numel() == 0:
        return
    work = rows.float() if rows.dtype in (torch.float16, torch.bfloat16) else rows
    squared = work.pow(2).sum(dim=1)
    finfo = torch.finfo(work.dtype)
    bad = ~torch.isfinite(squared) | ((squared < finfo.tiny) & (rows != 0).any(dim=1))
    if bool(bad.any()):
        shown = first_indices(bad)
        row = shown[0]
        largest = float(rows[row].abs().max())
        raise InputError(
            f"{name} row {row} has entries up to {largest:.3g}, whose squared norm is not representable in "
            f"{rows.dtype} ({int(bad.sum())} of {rows.shape[0]} rows, first {shown}); rescale them (e.g. divide each "
            "by its largest absolute entry, then by its norm) or use float64"
        )


def check_positive(value: float, name: str, *, allow_zero: bool = False) -> float:
    """Check a scalar hyper-parameter is a finite positive (or non-negative) number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputTypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    ok = value >= 0 if allow_zero else value > 0
    if not ok or value != value or value in (float("inf"), float("-inf")):
        bound = ">= 0" if allow_zero else "> 0"
        raise InputError(f"{name} must be finite and {bound}, got {value}")
    return value


def check_positive_int(value: int, name: str) -> int:
    """Check a scalar is a positive integer and return it as a Python ``int``.

    Any :class:`numbers.Integral` is accepted, so numpy integer scalars (``np.int64(8)``, what indexing a numpy
    array or a sweep over ``np.arange`` gives) work like ``8``, as ``np.float64`` already does for float
    parameters; bools are rejected (``True`` is not a budget, and ``np.bool_`` is not ``Integral``), and so are
    floats, even integral ones (``8.0`` is most likely a value passed to the wrong parameter).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputTypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)  # a plain int: recorded parameters must serialise to JSON and compare equal to Python ints
    if value < 1:
        raise InputError(f"{name} must be >= 1, got {value}")
    return value


def check_bool(value: object, name: str) -> bool:
    """Check a flag is a real bool (``1`` or ``"yes"`` would silently change which problem is solved)."""
    if not isinstance(value, bool):
        raise InputTypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_lasso_alpha(alpha: object, is_fraction_of_max: object) -> float:
    """Check a lasso weight: a finite ``alpha > 0``, and ``alpha <= 1`` when it is a fraction of each target's
    ``alpha_max`` (1 gives every target the zero code; more is surely an absolute weight given by mistake)."""
    check_bool(is_fraction_of_max, "alpha_is_fraction_of_max")
    value = check_positive(alpha, "alpha")
    if is_fraction_of_max and value > 1:
        raise InputError(f"alpha is a fraction of each target's alpha_max and must be <= 1 (from 1 on every code "
                         f"is zero), got {value}; for an absolute L1 weight set alpha_is_fraction_of_max=False "
                         "(--alpha-absolute)")
    return value


def check_device(device: object) -> torch.device:
    """A ``torch.device`` that this machine has and that holds data: a CUDA device asked for where torch sees none
    is refused by name (torch would fail later with an assertion deep inside a tensor move), and so is the
    ``meta`` device (tensors there have shapes but no values: every result would fail or be meaningless)."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise InputError(f"device {device!r} is not a torch device ({err})") from None
    if resolved.type == "meta":
        raise InputError(f"device {device!r} holds no data (the meta device keeps only shapes and dtypes); "
                         "use device='cpu' or 'cuda'")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {device!r} asked for, but torch sees no CUDA device here (a CPU-only build, "
                             "or no GPU); use device='cpu'")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise InputError(f"device {device!r} asked for, but torch sees {torch.cuda.device_count()} CUDA devices")
    return resolved
