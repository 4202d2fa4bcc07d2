"""A layer's per-head SAEs, checked to belong together, and the block dictionary they form."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

import torch

from .errors import HookUnknownError
from .files import as_path, canonical_hook
from .sae import CONCATENATED, SAE, InputScaleWarning, warn_input_scale
from ..errors import InputError, InputTypeError


class MissingHeadsWarning(UserWarning):
    """Some heads of the layer have no SAE."""


@dataclass(frozen=True, eq=False)
class HeadSAEs:
    """Per-head SAEs of one attention layer, ordered by head.

    All SAEs must agree on ``model_name``, ``layer``, ``hook_name``, ``d_in`` (= ``d_head``), dtype and device, and
    each must read one distinct head; dictionary sizes ``d_sae`` may differ.
    """

    saes: tuple[SAE, ...]

    def __post_init__(self) -> None:
        saes = tuple(self.saes)
        if not saes:
            raise InputError("HeadSAEs needs at least one SAE")
        for i, sae in enumerate(saes):
            if not isinstance(sae, SAE):
                raise InputTypeError(f"saes[{i}] must be a sparsedecomp SAE, got {type(sae).__name__}")
            if sae.head is None:
                raise InputError(
                    f"saes[{i}] ({sae.provenance.get('source', '?')}) does not record which head it reads (a SAELens "
                    "SAE saved without metadata): give it with sae.with_hook('blocks.<layer>.attn.hook_z', head=<h>)"
                )
            if not isinstance(sae.head, int):
                raise InputError(f"{sae.describe()} reads head={sae.head!r}, not a single head")
        by_head: dict[int, SAE] = {}
        for sae in saes:
            if sae.head in by_head:
                raise InputError(
                    f"two SAEs read head {sae.head}: {by_head[sae.head].provenance.get('source', '?')} and "
                    f"{sae.provenance.get('source', '?')}"
                )
            by_head[sae.head] = sae
        ordered = tuple(by_head[h] for h in sorted(by_head))
        ref = ordered[0]
        for sae in ordered[1:]:
            for attr in ("model_name", "layer", "hook_name", "d_in", "dtype", "device"):
                if getattr(sae, attr) != getattr(ref, attr):
                    raise InputError(
                        f"head {sae.head} ({sae.provenance.get('source', '?')}) has {attr}={getattr(sae, attr)!r} "
                        f"but head {ref.head} ({ref.provenance.get('source', '?')}) has {attr}={getattr(ref, attr)!r}; "
                        "per-head SAEs of one layer must agree"
                    )
        object.__setattr__(self, "saes", ordered)

    # -- access ------------------------------------------------------------------------------------------------
    @property
    def heads(self) -> tuple[int, ...]:
        return tuple(sae.head for sae in self.saes)

    @property
    def model_name(self) -> str | None:
        return self.saes[0].model_name

    @property
    def layer(self) -> int | None:
        return self.saes[0].layer

    @property
    def hook_name(self) -> str | None:
        return self.saes[0].hook_name

    @property
    def d_head(self) -> int:
        return self.saes[0].d_in

    @property
    def d_sae(self) -> dict[int, int]:
        return {sae.head: sae.d_sae for sae in self.saes}

    @property
    def model_from_pretrained_kwargs(self) -> dict[str, Any] | None:
        """The model-loading keyword arguments the heads' checkpoints record (see
        :attr:`SAE.model_from_pretrained_kwargs`), ``None`` when none records any; heads that record different ones
        are refused, naming each head's (the model can be loaded only one way)."""
        recorded = {sae.head: sae.model_from_pretrained_kwargs for sae in self.saes}
        known = {h: kwargs for h, kwargs in recorded.items() if kwargs is not None}
        distinct = {repr(sorted(kwargs.items())) for kwargs in known.values()}
        if len(distinct) > 1:
            raise InputError(f"the per-head SAEs record different model_from_pretrained_kwargs: {known}")
        return next(iter(known.values()), None)

    @property
    def heads_needing_input_scale(self) -> tuple[int, ...]:
        return tuple(sae.head for sae in self.saes if sae.needs_input_scale)

    def __len__(self) -> int:
        return len(self.saes)

    def __iter__(self) -> Iterator[SAE]:
        return iter(self.saes)

    def __getitem__(self, head: int) -> SAE:
        for sae in self.saes:
            if sae.head == head:
                return sae
        raise KeyError(f"no SAE for head {head}; heads present: {list(self.heads)}")

    def items(self) -> Iterator[tuple[int, SAE]]:
        return ((sae.head, sae) for sae in self.saes)

    def describe(self) -> str:
        return f"{self.model_name} {self.hook_name}: heads {list(self.heads)}, d_head={self.d_head}, d_sae={self.d_sae}"

    # -- completeness ------------------------------------------------------------------------------------------
    def missing_heads(self, n_heads: int) -> list[int]:
        """Heads in ``range(n_heads)`` without an SAE (raises if an SAE reads a head ``>= n_heads``)."""
        if isinstance(n_heads, bool) or not isinstance(n_heads, int) or n_heads < 1:
            raise InputError(f"n_heads must be a positive int, got {n_heads!r}")
        extra = [h for h in self.heads if h >= n_heads]
        if extra:
            raise InputError(f"SAEs read heads {extra} but the layer has only n_heads={n_heads}")
        return [h for h in range(n_heads) if h not in self.heads]

    def check_complete(self, n_heads: int, *, on_missing: Literal["raise", "warn"] = "raise") -> "HeadSAEs":
        """Raise (or warn, ``on_missing="warn"``) when a head in ``range(n_heads)`` has no SAE; returns ``self``."""
        if on_missing not in ("raise", "warn"):
            raise InputError(f"on_missing must be 'raise' or 'warn', got {on_missing!r}")
        missing = self.missing_heads(n_heads)
        if missing:
            message = (
                f"{self.hook_name} of {self.model_name} has {n_heads} heads but no SAE for heads {missing} "
                f"(loaded: {list(self.heads)})"
            )
            if on_missing == "raise":
                raise InputError(message)
            warnings.warn(message, MissingHeadsWarning, stacklevel=2)
        return self

    # -- transformations ---------------------------------------------------------------------------------------
    def map(self, fn: Callable[[SAE], SAE]) -> "HeadSAEs":
        """Apply ``fn`` to every head's SAE."""
        return HeadSAEs(tuple(fn(sae) for sae in self.saes))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "HeadSAEs":
        return self.map(lambda sae: sae.to(device=device, dtype=dtype))

    def reconstruct_concatenated(self, z: torch.Tensor) -> torch.Tensor:
        """Every head's SAE reconstruction, side by side: ``z`` is the head-major concatenation
        ``(n, n_heads * d_head)`` and block ``h`` of the result is ``decode_h(encode_h(z[:, h*d_head:(h+1)*d_head]))``.

        This is "all per-head SAEs spliced in at once", directly comparable with a concat-z SAE's reconstruction
        (pass it to :func:`sparsedecomp.evaluation.splice.splice_losses` with ``head=None``). Needs every head
        ``0 .. n_heads-1``. Warns once (:class:`InputScaleWarning`) for heads whose input scale is not folded in."""
        self.warn_input_scale()
        n_heads = len(self.saes)
        if self.heads != tuple(range(n_heads)):
            raise InputError(f"reconstructing the concatenated z needs SAEs for heads 0..{max(self.heads)}; "
                             f"have heads {list(self.heads)}")
        if not isinstance(z, torch.Tensor) or z.ndim != 2 or z.shape[1] != n_heads * self.d_head:
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise InputError(f"z must have shape (n, n_heads * d_head) = (n, {n_heads * self.d_head}), got {shape}")
        blocks = z.split(self.d_head, dim=1)
        return torch.cat([sae.decode(sae.encode(block)) for sae, block in zip(self.saes, blocks)], dim=1)

    def warn_input_scale(self) -> bool:
        """One :class:`InputScaleWarning` naming the heads that still need their input scale and were not warned
        about yet (each SAE is warned about once); returns whether it warned."""
        return warn_input_scale(
            self.saes,
            describe=lambda pending: (
                f"the per-head SAEs of heads {[sae.head for sae in pending]} ({self.model_name} {self.hook_name})"
            ),
        )

    def dictionary(self, normalize: bool = True):
        """The block-diagonal dictionary of all heads' decoders in the concatenated ``z`` space
        (``BlockDictionary.from_blocks([W_dec_0, ..., W_dec_{n-1}], normalize=normalize)``).

        Needs every head ``0 .. n_heads-1``: head ``h``'s block sits in columns ``h*d_head:(h+1)*d_head``.
        Warns when a head still needs its input scale: directions are unaffected, but decoder norms
        (``scales``) are then in the SAE's training units.
        """
        from ..dictionary import BlockDictionary

        expected = tuple(range(len(self.saes)))
        if self.heads != expected:
            missing = [h for h in range(max(self.heads) + 1) if h not in self.heads]
            raise InputError(
                f"the block dictionary needs SAEs for heads 0..{max(self.heads)}; missing heads {missing}"
            )
        pending = self.heads_needing_input_scale
        if pending:
            warnings.warn(
                f"heads {list(pending)} were trained on inputs scaled by an unsaved factor that is not folded in: "
                "atom directions are right, but their norms are in training units (see sparsedecomp.loading.scaling)",
                InputScaleWarning,
                stacklevel=2,
            )
        return BlockDictionary.from_blocks([sae.W_dec for sae in self.saes], normalize=normalize)


def warn_if_input_scale_missing(obj: Any) -> bool:
    """Warn (:class:`InputScaleWarning`, once per SAE) when ``obj`` -- an :class:`SAE`, a :class:`HeadSAEs`, or a
    bound method of either (e.g. ``head_saes.reconstruct_concatenated`` handed to a splice) -- still needs an input
    scale. Anything else is ignored. Returns whether it warned."""
    owner = getattr(obj, "__self__", obj)
    if isinstance(owner, HeadSAEs):
        return owner.warn_input_scale()
    if isinstance(owner, SAE):
        return warn_input_scale((owner,))
    return False


def check_compatible(concat_sae: SAE, head_saes: HeadSAEs) -> tuple[int, int]:
    """``(n_heads, d_head)`` once the concatenated-``z`` SAE and the per-head SAEs are known to read the same layer.

    Checks that the per-head SAEs cover heads ``0 .. n_heads-1``, that the concat SAE is not a one-head SAE, that
    its width is ``n_heads * d_head``, and -- where both sides record them -- that layer, hook and model agree
    (TransformerLens aliases count as equal: ``blocks.1.hook_z`` is ``blocks.1.attn.hook_z``, ``gelu-2l`` is
    ``NeelNanda/GELU_2L512W_C4_Code``). Every difference found is named in one error.
    """
    if not isinstance(concat_sae, SAE):
        raise InputTypeError(f"concat_sae must be a sparsedecomp SAE, got {type(concat_sae).__name__}")
    if not isinstance(head_saes, HeadSAEs):
        raise InputTypeError(f"head_saes must be HeadSAEs, got {type(head_saes).__name__}")
    n_heads, d_head = max(head_saes.heads) + 1, head_saes.d_head
    missing = [h for h in range(n_heads) if h not in head_saes.heads]
    if missing:
        raise InputError(
            f"the per-head SAEs must cover heads 0..{n_heads - 1} to match a concatenated SAE; missing heads {missing}"
        )
    if isinstance(concat_sae.head, int):
        raise InputError(f"the concat SAE {concat_sae.describe()} reads head {concat_sae.head} only, not all heads' z")
    problems = []
    if concat_sae.d_in != n_heads * d_head:
        spanned = concat_sae.d_in // d_head
        hint = (f" (it spans {spanned} heads: heads {list(range(n_heads, spanned))} have no SAE here; give one per "
                "head, e.g. with --head-index-map)"
                if concat_sae.d_in % d_head == 0 and spanned > n_heads else "")
        problems.append(
            f"width: the concat SAE reads d_in={concat_sae.d_in} but {n_heads} heads of d_head={d_head} span "
            f"n_heads * d_head = {n_heads * d_head}{hint}"
        )
    if concat_sae.layer is not None and head_saes.layer is not None and concat_sae.layer != head_saes.layer:
        problems.append(f"layer: the concat SAE reads layer {concat_sae.layer}, the per-head SAEs layer {head_saes.layer}")
    if (
        concat_sae.hook_name is not None
        and head_saes.hook_name is not None
        and canonical_hook(concat_sae.hook_name) != canonical_hook(head_saes.hook_name)
    ):
        problems.append(f"hook: the concat SAE reads {concat_sae.hook_name}, the per-head SAEs {head_saes.hook_name}")
    if (
        concat_sae.model_name is not None
        and head_saes.model_name is not None
        and not _same_model(concat_sae.model_name, head_saes.model_name)
    ):
        problems.append(
            f"model: the concat SAE was trained on {concat_sae.model_name!r}, the per-head SAEs on "
            f"{head_saes.model_name!r}"
        )
    if problems:
        source = concat_sae.provenance.get("source", "?")
        raise InputError(
            f"the concat SAE ({source}) and the per-head SAEs ({head_saes.describe()}) do not match: "
            + "; ".join(problems)
        )
    return n_heads, d_head


def check_model_matches(model_name: str, *saes: SAE | HeadSAEs) -> None:
    """Raise :class:`~sparsedecomp.errors.InputError` if any SAE records a model other than ``model_name``
    (TransformerLens aliases count as equal; an SAE that records no model is not checked): ``W_O`` and input
    scales taken from another model would be silently wrong."""
    recorded = {sae.model_name for sae in saes if sae.model_name is not None}
    differing = sorted(name for name in recorded if not _same_model(name, model_name))
    if differing:
        raise InputError(f"the model {model_name!r} is not the one the SAEs were trained on ({differing}): its W_O "
                         "and hook_z would not be the SAEs'; give the SAEs' model")


def check_model_shape(model: Any, head_saes: "HeadSAEs", *saes: SAE) -> None:
    """Raise :class:`~sparsedecomp.errors.InputError` unless ``model`` has the layer the SAEs read, exactly their
    heads and their widths: a model under the right name can still be another size, and it would fail much later,
    with a message about something else.

    ``model`` is a HookedTransformer, a LoadedModel or a ``HookedTransformerConfig`` (to check before loading the
    weights). The widths are those of ``hook_z``: ``d_head`` for a per-head SAE, ``n_heads * d_head`` (query heads)
    for a concatenated SAE among ``saes``. Under grouped-query attention ``hook_v`` and ``hook_k`` are only
    ``n_key_value_heads * d_head`` wide; an SAE of that width is named as one that reads them, not ``hook_z``."""
    hooked = getattr(model, "model", model)
    cfg = getattr(hooked, "cfg", hooked)
    n_heads, d_head = cfg.n_heads, cfg.d_head
    n_kv_heads = getattr(cfg, "n_key_value_heads", None) or n_heads
    layer = head_saes.layer
    if layer is not None and not layer < cfg.n_layers:
        raise InputError(f"the SAEs read layer {layer} but the model has {cfg.n_layers} layers")
    if d_head != head_saes.d_head:
        raise InputError(f"the model's heads have d_head={d_head} but the SAEs read heads of width {head_saes.d_head}")
    beyond = [h for h in head_saes.heads if h >= n_heads]
    if beyond:
        raise InputError(f"the per-head SAEs read heads {beyond}, which do not exist: the model has {n_heads} heads per "
                         f"layer (0..{n_heads - 1})")
    if len(head_saes.heads) != n_heads:
        raise InputError(f"the model has {n_heads} heads per layer; the per-head SAEs are for heads "
                         f"{list(head_saes.heads)}: give one SAE for each of the model's heads")
    for sae in saes:
        if sae.head == CONCATENATED and sae.d_in != n_heads * d_head:
            hint = (f" ({n_kv_heads} key/value heads * d_head: the width of hook_v / hook_k under grouped-query "
                    "attention, not of hook_z)" if n_kv_heads != n_heads and sae.d_in == n_kv_heads * d_head else "")
            raise InputError(f"the concat SAE ({sae.provenance.get('source', '?')}) reads d_in={sae.d_in}{hint} but the "
                             f"model's hook_z is n_heads * d_head = {n_heads} * {d_head} = {n_heads * d_head} wide")
        if sae.layer is not None and not sae.layer < cfg.n_layers:
            raise InputError(f"the SAE {sae.describe()} reads layer {sae.layer} but the model has {cfg.n_layers} layers")


def _same_model(a: str, b: str) -> bool:
    """Equal names, or two TransformerLens names / aliases of one model."""
    if a == b:
        return True
    try:
        from transformer_lens.loading_from_pretrained import make_model_alias_map
    except ImportError:
        return False
    aliases = make_model_alias_map()
    official_a, official_b = aliases.get(a.lower()), aliases.get(b.lower())
    return official_a is not None and official_a == official_b


def load_head_saes(
    sources: Mapping[int, str | Path] | Sequence[str | Path],
    *,
    root: str | Path | None = None,
    n_heads: int | None = None,
    on_missing: Literal["raise", "warn"] = "raise",
    format: str | None = None,
    device: str | torch.device = "cpu",
    step: int | str | None = None,
) -> HeadSAEs:
    """Load one SAE per head and check that they belong together.

    ``sources`` maps head -> checkpoint (like the seed's ``ckpt_subfolders = {0: "rovi1lwe", ...}``; each source
    may be a run folder, a checkpoint folder, an SAE folder or one of its files, or a hub reference such as
    ``saelens://RELEASE/SAE_ID`` (see :func:`~sparsedecomp.loading.registry.load_sae`); relative paths are taken
    under ``root``, references are not) or is a list of checkpoints whose configs name their heads. With
    ``n_heads``, heads without an SAE raise (``on_missing="raise"``) or warn (``"warn"``). ``step`` picks the same
    checkpoint of every legacy SAELens run folder (its number of training tokens, or ``"final"``; the seed used
    ``983044096``); each SAE records the one used in ``provenance["step"]``.
    """
    from .hub import is_reference

    from .registry import load_sae

    if on_missing not in ("raise", "warn"):
        raise InputError(f"on_missing must be 'raise' or 'warn', got {on_missing!r}")
    if isinstance(sources, (str, Path)):
        raise InputTypeError("sources must be a mapping head -> path or a list of paths, not a single path")
    items = list(sources.items()) if isinstance(sources, Mapping) else [(None, s) for s in sources]
    if not items:
        raise InputError("sources is empty")
    saes = []
    for position, (expected_head, source) in enumerate(items):
        name = f"sources[{position if expected_head is None else expected_head!r}]"
        if is_reference(source):
            path = source
            if format is not None or step is not None:
                raise InputError(f"format= and step= do not apply to the hub reference {source}")
            sae = load_sae(source, device=device)
        else:
            path = as_path(source, name, references=True)
            path = as_path(root, "root") / path if root is not None else path
            sae = load_sae(path, format=format, device=device, step=step)
        if sae.head is None:
            head = "<h>" if expected_head is None else expected_head
            raise HookUnknownError(
                f"{path} does not record which hook and head it reads (a SAELens SAE saved without metadata): load it "
                f"with load_sae, give them with sae.with_hook('blocks.<layer>.attn.hook_z', head={head}) and build "
                "HeadSAEs((sae, ...)) from the results"
            )
        if expected_head is not None and sae.head != expected_head:
            raise InputError(f"the source given for head {expected_head} ({path}) holds an SAE for head {sae.head!r}")
        saes.append(sae)
    result = HeadSAEs(tuple(saes))
    if n_heads is not None:
        result.check_complete(n_heads, on_missing=on_missing)
    return result

