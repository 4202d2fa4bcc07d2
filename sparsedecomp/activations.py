"""The one activation source: a hooked attention layer's activations, streamed over token batches.

Every statistic the package computes on a model (input-scale estimation, SAE quality, splice-in losses, head
attribution, faithfulness, the notebook's analyses and the dashboards) reads activations from
:class:`ActivationStream`. The stream runs the model only up to the hooked layer (``stop_at_layer=layer + 1``),
once per batch, and yields an :class:`ActivationBatch` with

* ``z``: ``blocks.{layer}.attn.hook_z``, ``(batch, pos, n_heads, d_head)``;
* where asked (``include``): ``resid_pre`` (the residual stream entering the layer, so that an intervention reruns
  only the layers from ``layer`` on), ``v`` (``attn.hook_v``, ``(batch, pos, n_key_value_heads, d_head)``) and
  ``pattern`` (``attn.hook_pattern``, ``(batch, n_heads, dest, src)``), the two DFA by source position needs.

Grouped-query attention (Gemma, Llama, ...: ``cfg.n_key_value_heads < cfg.n_heads``): ``hook_z`` and the pattern
have one head per *query* head, but ``hook_v`` has only ``n_key_value_heads`` heads, each shared by a group of
``g = n_heads // n_key_value_heads`` consecutive query heads. TransformerLens expands ``v`` with
``torch.repeat_interleave(v, g, dim=2)`` before ``z = pattern @ v``, so query head ``h`` reads key/value head
``h // g`` (:func:`kv_head_index`; :meth:`ActivationBatch.v_of_heads` gives each query head its ``v``). With
``ungroup_grouped_query_attention`` set, or without grouped-query attention, ``hook_v`` has ``n_heads`` heads and
``g = 1``.

Batches are sized from a memory budget (:func:`contexts_per_batch`), so no more than one batch of activations is
ever held. Statistics are :class:`Accumulator` objects with an ``update(batch)`` / ``compute()`` split (the
torchmetrics pattern): :func:`run_accumulators` feeds one pass to many of them, and an accumulator computes the same
result whether it sees the tokens in one batch or many (each keeps exact sums, in float64 where it matters).

Accumulators are also mergeable (``reset`` / ``merge`` / ``state_dict`` / ``load_state_dict``, see
:class:`Accumulator`), so that one pass can be split over processes or GPUs and the parts' states folded together;
the helpers at the end of this module (:func:`merged_sum`, :func:`check_merge`, :func:`check_state`) hold the
bookkeeping they share.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor

from .errors import InputError, InputTypeError

EXTRAS = ("resid_pre", "v", "pattern")
_HOOKS = {"z": "attn.hook_z", "v": "attn.hook_v", "pattern": "attn.hook_pattern", "resid_pre": "hook_resid_pre"}
DEFAULT_MEMORY_BUDGET = 2**30
"""Bytes one batch may take (activations kept plus the forward pass's working memory): 1 GiB."""


@dataclass(frozen=True, eq=False)
class ActivationBatch:
    """One batch of contexts and the hooked layer's activations on them.

    Attributes:
        tokens: ``(batch, pos)`` long, on the model's device.
        z: ``(batch, pos, n_heads, d_head)``.
        first_context: index of ``tokens[0]`` among all contexts of the stream (for top-k bookkeeping).
        layer: the hooked layer.
        resid_pre, v, pattern: as in the module docstring, or ``None`` when not asked for (``v`` has
            ``n_key_value_heads`` heads: use :meth:`v_of_heads` for the ``v`` each query head reads).
    """

    tokens: Tensor
    z: Tensor
    first_context: int
    layer: int
    resid_pre: Tensor | None = None
    v: Tensor | None = None
    pattern: Tensor | None = None

    @property
    def n_contexts(self) -> int:
        return self.tokens.shape[0]

    @property
    def context_size(self) -> int:
        return self.tokens.shape[1]

    @property
    def n_heads(self) -> int:
        return self.z.shape[2]

    @property
    def d_head(self) -> int:
        return self.z.shape[3]

    @property
    def n_kv_heads(self) -> int | None:
        """The key/value heads of ``v`` (``n_heads`` without grouped-query attention); ``None`` without ``v``."""
        return None if self.v is None else self.v.shape[2]

    def v_of_heads(self, heads: Sequence[int] | None = None) -> Tensor:
        """``(batch, pos, len(heads), d_head)``: the ``v`` each query head of ``heads`` (default: all) reads, key/value
        head ``h // (n_heads // n_kv_heads)`` for query head ``h`` (:func:`kv_head_index`). A view of ``v`` when the
        heads read consecutive distinct key/value heads (no grouped-query attention), else a gathered copy."""
        self.require("v")
        heads = list(range(self.n_heads)) if heads is None else [int(h) for h in heads]
        kv = kv_head_index(self.n_heads, self.n_kv_heads, heads)
        if kv and kv == list(range(kv[0], kv[0] + len(kv))):
            return self.v[:, :, kv[0]:kv[0] + len(kv)]
        return self.v[:, :, torch.tensor(kv, device=self.v.device)]

    def z_concatenated(self) -> Tensor:
        """``(batch * pos, n_heads * d_head)``: every position's ``z``, heads side by side (head-major), the input of
        a concatenated-``z`` SAE. Rows run over contexts, then positions."""
        return self.z.reshape(self.z.shape[0] * self.z.shape[1], -1)

    def z_head(self, head: int) -> Tensor:
        """``(batch * pos, d_head)``: head ``head``'s ``z`` at every position, the input of its per-head SAE."""
        return self.z[:, :, head, :].reshape(-1, self.z.shape[3])

    def require(self, *names: str) -> None:
        """Raise naming the activations an accumulator needs that this stream was not asked for."""
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise InputError(f"this statistic needs {missing}, which the activation stream did not collect: "
                             f"pass include={tuple(missing)} (or run it through run_accumulators)")


@runtime_checkable
class Accumulator(Protocol):
    """A streaming statistic: ``update`` with each :class:`ActivationBatch`, then ``compute`` the result.

    ``needs`` names the extra activations (of :data:`EXTRAS`) the statistic reads; :func:`run_accumulators` asks
    the stream for their union.

    Mergeable state (the torchmetrics pattern), so that one pass can be split: several accumulators built with the
    same settings each see a different part of the stream (contexts sharded over processes or GPUs, every batch
    keeping its global ``first_context``), and their states are folded into one:

    * ``reset()`` returns to the freshly constructed state (same settings);
    * ``merge(other)`` folds in ``other``, an accumulator of the same class and settings that saw a different part
      of the stream (anything else is refused with an :class:`~sparsedecomp.errors.InputError` naming the
      difference). Afterwards ``compute()`` equals what one accumulator fed both parts in stream order computes:
      exactly for counts, maxima, top-k entries (ties go to the earlier token, located by global context and
      position) and per-context lists (put in context order), and up to float rounding for sums. Merging is
      therefore associative and independent of the order of the parts, up to that rounding of sums; merging an
      accumulator that saw nothing changes nothing. The parts must be disjoint: a context seen by both is counted
      twice, as one accumulator fed it twice would;
    * ``state_dict()`` gives the state (settings included, for checking) as a flat dict of tensors and plain
      Python values (numbers, bools, strings, lists), so that the tensors can be saved with ``safetensors`` or
      ``torch.save(weights_only=True)`` and the rest as JSON; ``load_state_dict(state)`` restores it into an
      accumulator built with the same settings, refusing wrong keys, settings or shapes by name.

    :func:`run_accumulators` needs only ``needs``, ``update`` and ``compute``."""

    needs: tuple[str, ...]

    def update(self, batch: ActivationBatch) -> None: ...

    def compute(self) -> Any: ...

    def reset(self) -> None: ...

    def merge(self, other: Any) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


def kv_head_index(n_heads: int, n_kv_heads: int | None, heads: Iterable[int] | None = None) -> list[int]:
    """The key/value head each query head of ``heads`` (default: all ``n_heads``) reads: ``h // g`` with group size
    ``g = n_heads // n_kv_heads`` (TransformerLens's ``repeat_interleave`` of ``v`` and ``k``, see the module
    docstring); ``n_kv_heads`` ``None`` (a config without grouped-query attention) means ``n_heads``. Raises
    :class:`~sparsedecomp.errors.InputError` when ``n_kv_heads`` does not divide ``n_heads`` or a head is out of
    range."""
    n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
    if n_kv_heads < 1 or n_heads % n_kv_heads:
        raise InputError(f"{n_heads} query heads cannot share {n_kv_heads} key/value heads evenly: v is not this "
                         "layer's (grouped-query attention needs n_heads to be a multiple of n_key_value_heads)")
    group = n_heads // n_kv_heads
    heads = list(range(n_heads)) if heads is None else list(heads)
    bad = [h for h in heads if not 0 <= h < n_heads]
    if bad:
        raise InputError(f"heads {bad} do not exist: the layer has {n_heads} query heads")
    return [h // group for h in heads]


def hooked_transformer(model: Any) -> Any:
    """The ``HookedTransformer`` behind ``model`` (itself, or a :class:`~sparsedecomp.loading.LoadedModel`'s)."""
    hooked = getattr(model, "model", model)
    if not (hasattr(hooked, "run_with_cache") and hasattr(hooked, "cfg")):
        raise InputTypeError(f"expected a TransformerLens HookedTransformer (or a LoadedModel), got {type(model).__name__}")
    return hooked


def model_device(model: Any) -> torch.device:
    try:
        return next(hooked_transformer(model).parameters()).device
    except StopIteration:
        return torch.device("cpu")


def check_tokens(tokens: Any, *, d_vocab: int | None = None, n_ctx: int | None = None, name: str = "tokens") -> Tensor:
    """A ``(n_contexts, context_size >= 2)`` integer tensor of token ids (as long), refused by name otherwise; with
    ``d_vocab`` / ``n_ctx``, ids must be in the vocabulary and contexts no longer than the model's."""
    if not isinstance(tokens, Tensor):
        raise InputTypeError(f"{name} must be a torch.Tensor of token ids, got {type(tokens).__name__}")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise InputTypeError(f"{name} must hold integer token ids, got {tokens.dtype}")
    if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] < 2:
        raise InputError(f"{name} must have shape (n_contexts, context_size >= 2), got {tuple(tokens.shape)}")
    if int(tokens.min()) < 0:
        raise InputError(f"{name} holds negative token ids (min {int(tokens.min())})")
    if d_vocab is not None and int(tokens.max()) >= d_vocab:
        raise InputError(f"{name} holds token ids up to {int(tokens.max())} but the model's vocabulary has {d_vocab} "
                         "tokens: these tokens are not for this model")
    if n_ctx is not None and tokens.shape[1] > n_ctx:
        raise InputError(f"{name} has contexts of {tokens.shape[1]} tokens but the model takes at most n_ctx={n_ctx}: "
                         "use shorter contexts (e.g. --context-size)")
    return tokens.long()


def check_layer(model: Any, layer: Any) -> int:
    n_layers = hooked_transformer(model).cfg.n_layers
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers:
        raise InputError(f"layer must be an int in [0, {n_layers}), got {layer!r} (an SAE loaded without its hook has "
                         "layer None: give it with sae.with_hook('blocks.<layer>.attn.hook_z', ...))")
    return layer


def bytes_per_context(cfg: Any, context_size: int, include: Iterable[str] = (), *, with_logits: bool = True) -> int:
    """A conservative estimate of the memory one context of ``context_size`` takes in a batch (float32): the
    activations kept, the forward pass's largest intermediates (attention scores and pattern, MLP hidden) and,
    ``with_logits``, the final residual streams of the splice's variants. ``v`` kept is
    ``n_key_value_heads * d_head`` wide (fewer heads than ``z`` under grouped-query attention); the forward pass's
    own expanded ``k`` and ``v`` are query-head wide, which the ``2 * d_z`` working term covers."""
    pos, heads = context_size, cfg.n_heads
    d_z = heads * cfg.d_head
    ungrouped = getattr(cfg, "ungroup_grouped_query_attention", False)  # hook_v then holds the expanded v
    d_v = (heads if ungrouped else getattr(cfg, "n_key_value_heads", None) or heads) * cfg.d_head
    d_mlp = cfg.d_mlp or 4 * cfg.d_model
    floats = pos * (4 * cfg.d_model + 2 * d_mlp + 3 * heads * pos + 2 * d_z)
    include = set(include)
    floats += pos * cfg.d_model * ("resid_pre" in include) + pos * d_v * ("v" in include)
    floats += heads * pos * pos * ("pattern" in include)
    if with_logits:
        # The splice keeps every variant's final residual stream (up to SPLICE_RESIDUALS variants); its vocabulary-wide
        # logits exist only one column block at a time, LOSS_CHUNK_BYTES whatever the batch (contexts_per_batch).
        floats += SPLICE_RESIDUALS * pos * cfg.d_model
    return 4 * floats


SPLICE_RESIDUALS = 32
"""Final residual streams of splice variants a batch is sized for (:func:`bytes_per_context`)."""
LOSS_CHUNK_BYTES = 2**28
"""The memory of the splice's vocabulary-wide tensors at once (a block of clean logits and its exponentials, a
variant's block, one temporary): the vocabulary is unembedded in column blocks this size
(:mod:`sparsedecomp.evaluation.splice`), so a 262,144-token vocabulary costs 256 MiB whatever the context length
and batch."""


def contexts_per_batch(model: Any, context_size: int, include: Iterable[str] = (), *,
                       memory_budget: int = DEFAULT_MEMORY_BUDGET, with_logits: bool = True) -> int:
    """How many contexts of ``context_size`` fit in ``memory_budget`` bytes (at least 1); ``with_logits`` sets
    :data:`LOSS_CHUNK_BYTES` of it apart for the splice's logits."""
    cfg = hooked_transformer(model).cfg
    budget = int(memory_budget) - (LOSS_CHUNK_BYTES if with_logits else 0)
    return max(1, budget // bytes_per_context(cfg, context_size, include, with_logits=with_logits))


class ActivationStream:
    """Iterate over ``blocks.{layer}.attn`` activations of ``model`` on ``tokens`` in batches.

    Args:
        model: a ``HookedTransformer`` or a :class:`~sparsedecomp.loading.LoadedModel` (processed with the flags its
            SAEs were trained under).
        tokens: ``(n_contexts, context_size)`` token ids (BOS first where the model and SAEs expect it), or a
            :class:`~sparsedecomp.loading.tokens.TokenSet`.
        layer: the attention layer to hook.
        include: extra activations to collect, of :data:`EXTRAS`.
        batch_size: contexts per batch; by default as many as fit ``memory_budget`` bytes.
        progress: show a progress bar over tokens (``tqdm``).
        desc: the progress bar's label.
    """

    def __init__(self, model: Any, tokens: Any, *, layer: int, include: Iterable[str] = (),
                 batch_size: int | None = None, memory_budget: int = DEFAULT_MEMORY_BUDGET,
                 with_logits: bool = True, progress: bool = False, desc: str = "activations") -> None:
        self.model = hooked_transformer(model)
        self.layer = check_layer(model, layer)
        token_tensor = getattr(tokens, "tokens", tokens)
        self.tokens = check_tokens(token_tensor, d_vocab=self.model.cfg.d_vocab, n_ctx=self.model.cfg.n_ctx)
        self.include = tuple(dict.fromkeys(include))
        unknown = [n for n in self.include if n not in EXTRAS]
        if unknown:
            raise InputError(f"include must name activations among {EXTRAS}, got {unknown}")
        if batch_size is None:
            batch_size = contexts_per_batch(self.model, self.tokens.shape[1], self.include,
                                            memory_budget=memory_budget, with_logits=with_logits)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
        self.batch_size = batch_size
        self.progress = progress
        self.desc = desc

    @property
    def n_contexts(self) -> int:
        return self.tokens.shape[0]

    @property
    def n_tokens(self) -> int:
        return self.tokens.numel()

    def __len__(self) -> int:
        return -(-self.n_contexts // self.batch_size)

    def _run_to_z(self, tokens: Tensor, names: Mapping[str, str]) -> dict[str, Tensor]:
        return _run_to_z_impl(self.model, tokens, names, self.layer)

    def hook_name(self, what: str = "z") -> str:
        return f"blocks.{self.layer}.{_HOOKS[what]}"

    @torch.no_grad()
    def __iter__(self) -> Iterator[ActivationBatch]:
        names = {what: self.hook_name(what) for what in ("z", *self.include)}
        device = model_device(self.model)
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.n_tokens, desc=self.desc, unit="tok", unit_scale=True, leave=False)
        try:
            for start in range(0, self.n_contexts, self.batch_size):
                tokens = self.tokens[start : start + self.batch_size].to(device)
                cache = self._run_to_z(tokens, names)
                yield ActivationBatch(tokens=tokens, first_context=start, layer=self.layer,
                                      **{what: cache[name] for what, name in names.items()})
                del cache
                if bar is not None:
                    bar.update(tokens.numel())
        finally:
            if bar is not None:
                bar.close()


class _StopAfterZ(Exception):
    """Raised by the hook on ``hook_z`` once every wanted activation is kept: nothing after it is needed."""


def _run_to_z_impl(model: Any, tokens: Tensor, names: Mapping[str, str], layer: int) -> dict[str, Tensor]:
    """The activations ``names`` (all in ``blocks.{layer}``'s attention, up to ``hook_z``) of ``model`` on
    ``tokens``. The forward pass stops at ``hook_z``: the layer's output projection and MLP, which
    ``stop_at_layer=layer + 1`` alone would still run, are a third of a small model's compute and not needed."""
    kept: dict[str, Tensor] = {}
    z_name = names["z"]

    def keep(activation: Tensor, hook: Any) -> Tensor:
        kept[hook.name] = activation
        if hook.name == z_name:
            raise _StopAfterZ
        return activation

    try:
        model.run_with_hooks(tokens, fwd_hooks=[(name, keep) for name in names.values()], stop_at_layer=layer + 1)
    except _StopAfterZ:
        pass
    return kept


def run_accumulators(model: Any, tokens: Any, accumulators: Mapping[str, Accumulator], *, layer: int,
                     batch_size: int | None = None, memory_budget: int = DEFAULT_MEMORY_BUDGET,
                     progress: bool = False, desc: str = "activations") -> dict[str, Any]:
    """Feed one pass of :class:`ActivationStream` to every accumulator and return ``{name: acc.compute()}``.

    The stream collects the union of the accumulators' ``needs``; the batch size allows for an intervention rerun
    when any accumulator needs ``resid_pre`` (splice-in losses)."""
    if not accumulators:
        raise InputError("no accumulators given")
    for name, acc in accumulators.items():
        # One pass needs no merging: a statistic with only needs/update/compute is still accepted.
        if not all(hasattr(acc, attribute) for attribute in ("needs", "update", "compute")):
            raise InputTypeError(f"accumulator {name!r} has no update/compute/needs: got {type(acc).__name__}")
    include = tuple(dict.fromkeys(n for acc in accumulators.values() for n in acc.needs))
    stream = ActivationStream(model, tokens, layer=layer, include=include, batch_size=batch_size,
                              memory_budget=memory_budget, with_logits="resid_pre" in include, progress=progress,
                              desc=desc)
    for batch in stream:
        for acc in accumulators.values():
            acc.update(batch)
    return {name: acc.compute() for name, acc in accumulators.items()}


class MeanAccumulator:
    """``E z`` over every position, ``(n_heads, d_head)`` in float64 (the mean-ablation value).

    Mergeable: the sum and the count of the parts add."""

    needs: tuple[str, ...] = ()

    def __init__(self, *, exclude_bos: bool = False) -> None:
        self.exclude_bos = exclude_bos
        self.reset()

    def reset(self) -> None:
        self._sum: Tensor | None = None
        self._count = 0

    def update(self, batch: ActivationBatch) -> None:
        z = batch.z[:, 1:] if self.exclude_bos else batch.z
        total = z.double().sum(dim=(0, 1)).cpu()
        self._sum = total if self._sum is None else self._sum + total
        self._count += z.shape[0] * z.shape[1]

    def compute(self) -> Tensor:
        if self._sum is None or self._count == 0:
            raise InputError("no positions were seen: the mean is undefined")
        return self._sum / self._count

    def _settings(self) -> dict[str, Any]:
        return {"exclude_bos": bool(self.exclude_bos)}

    def merge(self, other: MeanAccumulator) -> None:
        check_merge(self, other)
        if self._sum is not None and other._sum is not None and self._sum.shape != other._sum.shape:
            raise InputError(f"cannot merge means of z with (n_heads, d_head) = {tuple(other._sum.shape)} into "
                             f"{tuple(self._sum.shape)}")
        self._sum = merged_sum(self._sum, other._sum)
        self._count += other._count

    def state_dict(self) -> dict[str, Any]:
        state = {**self._settings(), "count": self._count}
        if self._sum is not None:
            state["sum"] = snapshot(self._sum)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        check_state(self, state, {"sum": (None, None, torch.float64)}, {"count": int}, optional=("sum",))
        self._sum = state["sum"].clone() if "sum" in state else None
        self._count = state["count"]


class CollectZ:
    """Every position's ``z`` as ``(n_positions, n_heads, d_head)`` on the CPU: for small token sets only (tests,
    SAE training data); statistics should be accumulators instead.

    Mergeable: each batch's rows are kept with the batch's ``first_context``, and a merge puts the parts in context
    order (stably), so that merged parts give the rows of one pass in stream order."""

    needs: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._parts: list[Tensor] = []
        self._first: list[int] = []  # first_context of each part

    def update(self, batch: ActivationBatch) -> None:
        self._parts.append(batch.z.reshape(-1, batch.n_heads, batch.d_head).cpu())
        self._first.append(batch.first_context)

    def compute(self) -> Tensor:
        if not self._parts:
            raise InputError("no positions were seen")
        return torch.cat(self._parts)

    def _settings(self) -> dict[str, Any]:
        return {}

    def merge(self, other: CollectZ) -> None:
        check_merge(self, other)
        if self._parts and other._parts and self._parts[0].shape[1:] != other._parts[0].shape[1:]:
            raise InputError(f"cannot merge z of (n_heads, d_head) = {tuple(other._parts[0].shape[1:])} into "
                             f"{tuple(self._parts[0].shape[1:])}")
        parts, first = self._parts + other._parts, self._first + other._first
        order = sorted(range(len(parts)), key=first.__getitem__)  # stable: a part of self first among equals
        self._parts, self._first = [parts[i] for i in order], [first[i] for i in order]

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"first_context": list(self._first)}
        for i, part in enumerate(self._parts):
            state[f"part.{i}"] = snapshot(part)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        first = state.get("first_context") if isinstance(state, Mapping) else None
        n = len(first) if isinstance(first, list) else 0
        check_state(self, state, {f"part.{i}": (None, "n_heads", "d_head") for i in range(n)},
                    {"first_context": list})
        if not all(isinstance(f, int) and not isinstance(f, bool) for f in first):
            raise InputError(f"the CollectZ state's 'first_context' must list ints, got {first[:5]!r}")
        self._parts = [state[f"part.{i}"].clone() for i in range(n)]
        self._first = [int(f) for f in first]


# -- mergeable state: helpers shared by the accumulators ------------------------------------------------------------
def merged_sum(mine: Tensor | None, theirs: Tensor | None) -> Tensor | None:
    """``mine + theirs`` where either may be ``None`` (state allocated at the first batch, by an accumulator that saw
    nothing): on ``mine``'s device, and never ``theirs`` itself, so that later in-place updates of the merged
    accumulator cannot reach the other one."""
    if theirs is None:
        return mine
    if mine is None:
        return theirs.clone()
    return mine + theirs.to(mine.device)


def snapshot(value: Tensor) -> Tensor:
    """A detached, contiguous copy for a ``state_dict``: it owns its memory (``safetensors`` refuses tensors that
    share storage, e.g. token batches sliced from one tensor) and does not change with the accumulator."""
    return value.detach().clone(memory_format=torch.contiguous_format)


def _plain(value: Any) -> Any:
    """Tuples as lists (JSON reads them back as lists), recursively, for comparing settings."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def _settings_of(acc: Any) -> dict[str, Any]:
    return {name: _plain(value) for name, value in acc._settings().items()}


def check_merge(acc: Any, other: Any) -> None:
    """Refuse to merge ``other`` into ``acc`` unless it is an accumulator of the same class with the same settings
    (each accumulator's ``_settings()``: plain values), naming what differs."""
    if type(other) is not type(acc):
        raise InputTypeError(f"cannot merge a {type(other).__name__} into a {type(acc).__name__}: merge accumulators "
                             "of one class")
    mine, theirs = _settings_of(acc), _settings_of(other)
    differ = [f"{name}={mine[name]!r} here, {theirs.get(name)!r} in the other" for name in mine
              if theirs.get(name) != mine[name]]
    if differ:
        raise InputError(f"cannot merge {type(acc).__name__}s with different settings: {'; '.join(differ)}")


def check_state(acc: Any, state: Any, tensors: Mapping[str, tuple], values: Mapping[str, type] | None = None, *,
                optional: Iterable[str] = (), prefix: str = "") -> None:
    """Check ``state`` for ``acc.load_state_dict``, raising :class:`~sparsedecomp.errors.InputError` that names the
    wrong, missing or unknown keys, settings and shapes (each key under ``prefix`` when ``state`` is a part of an
    owner's state).

    ``state`` must hold exactly: ``acc._settings()``, equal; the plain ``values`` (name -> type); and ``tensors``
    (name -> shape, optionally ending with the dtype), those in ``optional`` only when present (state allocated at
    the first batch). A dimension is an int, ``None`` (any size) or a name: every dimension of one name has the same
    size across the tensors."""
    kind = type(acc).__name__
    if not isinstance(state, Mapping):
        raise InputTypeError(f"a {kind} state must be a mapping (from state_dict()), got {type(state).__name__}")
    settings, values = _settings_of(acc), dict(values or {})
    # Other settings first: they explain the other differences (e.g. keys named after variants).
    differ = [f"{prefix}{name}={value!r} here, {_plain(state[name])!r} in the state" for name, value in settings.items()
              if name in state and _plain(state[name]) != value]
    if differ:
        raise InputError(f"the {kind} state was saved with other settings: {'; '.join(differ)}")
    optional = set(optional)
    expected = {*settings, *values, *tensors}
    missing = sorted(prefix + k for k in expected if k not in state and k not in optional)
    unknown = sorted(prefix + str(k) for k in state if k not in expected)
    if missing or unknown:
        raise InputError(f"the {kind} state has missing keys {missing} and unknown keys {unknown}")
    for name, kind_of in values.items():
        value = state[name]
        if not isinstance(value, kind_of) or (kind_of is int and isinstance(value, bool)):
            raise InputError(f"the {kind} state's {prefix + name!r} must be a {kind_of.__name__}, got "
                             f"{type(value).__name__}")
    sizes: dict[str, int] = {}
    for name, spec in tensors.items():
        if name not in state:
            continue
        dtype = spec[-1] if spec and isinstance(spec[-1], torch.dtype) else None
        dims = spec[:-1] if dtype is not None else spec
        value = state[name]
        if not isinstance(value, Tensor):
            raise InputError(f"the {kind} state's {prefix + name!r} must be a tensor, got {type(value).__name__}")
        shape = tuple(value.shape)
        ok = len(shape) == len(dims) and (dtype is None or value.dtype == dtype)
        for size, dim in zip(shape, dims) if ok else ():
            if isinstance(dim, str):
                ok = ok and sizes.setdefault(dim, size) == size
            elif dim is not None:
                ok = ok and size == dim
        if not ok:
            want = tuple(sizes.get(d, d) if isinstance(d, str) else ("*" if d is None else d) for d in dims)
            raise InputError(f"the {kind} state's {prefix + name!r} has shape {shape} ({value.dtype}); expected {want}"
                             + (f" ({dtype})" if dtype is not None else ""))


def prefixed(prefix: str, state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` with every key under ``prefix.`` (a part's state inside its owner's)."""
    return {f"{prefix}.{key}": value for key, value in state.items()}


def split_state(state: Any, prefixes: Iterable[str], device: torch.device | None = None
                ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """``(own, parts)``: the entries of ``state`` under none of ``prefixes``, and per prefix the entries under
    ``prefix.`` without it (their tensors moved to ``device`` when given): an owner's state and its parts'."""
    if not isinstance(state, Mapping):
        raise InputTypeError(f"an accumulator state must be a mapping (from state_dict()), got {type(state).__name__}")
    prefixes = tuple(prefixes)
    own: dict[str, Any] = {}
    parts: dict[str, dict[str, Any]] = {prefix: {} for prefix in prefixes}
    for key, value in state.items():
        head, _, rest = key.partition(".") if isinstance(key, str) else ("", "", "")
        if head in parts and rest:
            parts[head][rest] = value.to(device) if device is not None and isinstance(value, Tensor) else value
        else:
            own[key] = value
    return own, parts
