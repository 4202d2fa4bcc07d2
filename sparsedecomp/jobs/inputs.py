"""The one place that resolves a run's inputs and checks them once.

A command names its inputs in a :class:`InputRequest` (plain values, validated when built, so every command refuses a
bad flag the same way); :func:`resolve_inputs` turns it into :class:`Inputs`:

1. the concat SAE and the per-head SAEs, checked against each other (width, layer, hook, model);
2. the model, loaded with the processing its SAEs were trained with (a local folder's recorded flags, the SAEs'
   recorded ``model_from_pretrained_kwargs`` for a hub model; a folder recording other flags than the SAEs is
   refused), with its tokenizer (the folder's, or ``tokenizer``), checked to be the SAEs' model and shape (a folder
   before its weights load), on the device asked for;
3. the tokens: a file used as it is, or a dataset packed with the SAEs' recorded context size and BOS setting unless
   given; ids checked against the vocabulary, BOS against the tokenizer, a set of only BOS tokens refused;
4. the per-head input scales (:func:`fold_input_scales`): the training scale when one is recorded, else re-estimated
   on the first :data:`SCALE_ESTIMATE_CONTEXTS` contexts of the run's tokens (the same rule in every command), and
   folded into the SAEs;
5. a check that every head SAE reconstructs its own head best (SAEs given in the wrong head order are refused).

Nothing here writes files or prints tables: a job composes these, and the command line only parses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from ..errors import InputError

SCALE_ESTIMATE_CONTEXTS = 64
"""Per-head input scales are re-estimated on the first this-many contexts of a run's tokens (all, if fewer)."""
HEAD_ORDER_CHECK_TOKENS = 2048
"""Positions the head-order check reconstructs each head on."""
HEAD_ORDER_MARGIN = 0.1
"""A head SAE is refused as misplaced when it explains another head's ``z`` better than its own by this much
(explained variance, absolute) ..."""
HEAD_ORDER_FIT = 0.3
"""... and explains that head's ``z`` at least this well (an SAE that fits no head, say a random one, says nothing
about the order)."""


def check_positive(value: Any, flag: str, *, allow_zero: bool = False) -> Any:
    """``value`` (``None`` passes) refused unless a (non-negative, with ``allow_zero``) integer."""
    if value is None:
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or (value == 0 and not allow_zero):
        raise InputError(f"{flag} must be a {'non-negative' if allow_zero else 'positive'} integer, got {value!r}")
    return value


@dataclass(frozen=True)
class SAERequest:
    """Where the SAEs come from: a concat SAE source and one source per head (``head_index_map`` names each source's
    head when given); ``step`` picks a checkpoint step of legacy SAELens run folders."""

    concat: str | None
    heads: tuple[str, ...]
    concat_version: str | None = None
    head_index_map: tuple[int, ...] | None = None
    step: str | None = None

    def __post_init__(self) -> None:
        if self.head_index_map is not None:
            heads = list(self.head_index_map)
            bad = [h for h in heads if isinstance(h, bool) or not isinstance(h, int) or h < 0]
            if bad:
                raise InputError(f"--head-index-map: head indices must be non-negative integers, got {bad}")
            if len(heads) != len(self.heads) or len(set(heads)) != len(heads):
                raise InputError(f"--head-index-map gives {len(heads)} heads ({heads}) for {len(self.heads)} "
                                 "--head-saes sources; give one distinct head per source")

    def head_sources(self) -> dict[int, str] | list[str]:
        return list(self.heads) if self.head_index_map is None else dict(zip(self.head_index_map, self.heads))


@dataclass(frozen=True)
class TokenRequest:
    """Which contexts a run reads: a tokens file, or a dataset (default: the one the head SAEs record) packed into
    ``context_size``-token contexts (default: the SAEs' recorded size, else the model's ``n_ctx``) with BOS first
    when ``prepend_bos`` (default: the SAEs' recorded setting, else on)."""

    tokens_file: Path | None = None
    dataset: str | None = None
    split: str = "train"
    column: str | None = None
    context_size: int | None = None
    n_contexts: int = 64
    skip_contexts: int = 0
    prepend_bos: bool | None = None
    bos_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.tokens_file is not None and self.dataset is not None:
            raise InputError("give --tokens or --dataset, not both")
        check_positive(self.n_contexts, "--n-contexts")
        check_positive(self.skip_contexts, "--skip-contexts", allow_zero=True)
        check_positive(self.context_size, "--context-size")
        if self.context_size is not None and self.context_size < 2:
            raise InputError(f"--context-size must be at least 2 (a BOS and one predicted token), got "
                             f"{self.context_size}")
        check_positive(self.bos_token_id, "--bos-token-id", allow_zero=True)
        if self.tokens_file is not None:
            given = [flag for flag, value in (("--split", self.split != "train"), ("--column", self.column),
                                              ("--context-size", self.context_size),
                                              ("--prepend-bos/--no-prepend-bos", self.prepend_bos is not None),
                                              ("--skip-contexts", self.skip_contexts)) if value]
            if given:
                raise InputError(f"{', '.join(given)} only apply to --dataset; a --tokens file is used as it is")


@dataclass(frozen=True)
class ModelRequest:
    """The model (TransformerLens name or local folder), its tokenizer when not the model's own, and the device."""

    name: str
    tokenizer: str | None = None
    device: str = "cpu"


@dataclass(frozen=True)
class InputRequest:
    saes: SAERequest
    model: ModelRequest | None = None
    tokens: TokenRequest | None = None
    fold_scales: bool = True


@dataclass(frozen=True, eq=False)
class Inputs:
    """A run's resolved inputs. ``head_saes`` have their input scales folded (``scales`` says how); ``loaded`` and
    ``tokens`` are ``None`` when the command did not ask for them; ``context`` describes everything in words for the
    outputs."""

    concat_sae: Any
    head_saes: Any
    loaded: Any = None
    tokens: Any = None
    scales_note: str | None = None
    context: dict[str, Any] = field(default_factory=dict)

    @property
    def layer(self) -> int:
        return self.concat_sae.require_hook("reading the layer")[1]

    @property
    def model(self) -> Any:
        return None if self.loaded is None else self.loaded.model

    @property
    def W_O(self) -> Tensor | None:
        return None if self.loaded is None else self.loaded.model.W_O[self.layer].detach()

    @property
    def tokenizer(self) -> Any:
        return model_tokenizer(self.loaded)


def model_tokenizer(loaded: Any) -> Any:
    """The tokenizer that travels with a loaded model (``None`` without one)."""
    if loaded is None:
        return None
    tokenizer = getattr(loaded, "tokenizer", None)
    return tokenizer if tokenizer is not None else getattr(getattr(loaded, "model", None), "tokenizer", None)


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; any other name checked by the library."""
    from ..validation import check_device

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    check_device(name)
    return name


def load_saes(request: SAERequest, log: Callable[[str], None] = print) -> tuple[Any, Any]:
    """The concat SAE and the per-head SAEs, checked against each other before anything large loads."""
    from ..loading import check_compatible, load_head_saes, load_sae

    concat = load_sae(request.concat, version=request.concat_version)
    head_saes = load_head_saes(request.head_sources(), **({"step": request.step} if request.step else {}))
    log(f"concat SAE: {concat.describe()}\nhead SAEs: {head_saes.describe()}")
    check_compatible(concat, head_saes)
    return concat, head_saes


def load_model_for(request: ModelRequest, head_saes: Any, *saes: Any) -> Any:
    """The model on ``request.device``, checked to be the SAEs' model (name and shape), loaded as the SAEs were trained:
    the processing flags among their recorded ``model_from_pretrained_kwargs`` become its
    :class:`~sparsedecomp.loading.ProcessingFlags` (a local folder records its own: one that records others is refused,
    :func:`check_folder_model`), and the other recorded keyword arguments go to ``from_pretrained`` for a hub model.
    The SAEs' widths, heads and layer are checked against a local folder's ``config.json`` before its weights load,
    and against the loaded model after (a hub model's configuration is not fetched apart: offline, the hub client's
    retries would double the wait before the download fails)."""
    from ..loading import check_model_matches, load_model
    from ..loading.heads import check_model_shape

    flags, extra = recorded_model_loading(head_saes, *saes)
    if Path(request.name).is_dir():
        extra = {}  # a local folder holds its own configuration
        check_folder_model(Path(request.name), flags, head_saes, *saes)  # before its weights load
    loaded = load_model(request.name, flags=flags, device=resolve_device(request.device), tokenizer=request.tokenizer,
                        **extra)
    check_model_matches(loaded.name, *saes, head_saes)
    check_model_shape(loaded.model, head_saes, *saes)
    return loaded


def check_folder_model(folder: Path, flags: Any, head_saes: Any, *saes: Any) -> None:
    """Refuse, before its weights load, a local model folder that cannot be the SAEs' model:

    * its recorded ``processing_flags`` differ from those of the SAEs' recorded ``model_from_pretrained_kwargs``
      (``flags``; ``None`` when the SAEs record none, and then the folder's apply). Processing changes ``hook_z``
      (``fold_value_biases`` shifts each head's ``z`` by a constant, ``fold_ln`` / centring change the inputs of
      ``W_V``), and the two records then disagree on which ``hook_z`` the SAEs read: the run would silently hold one
      of them wrong. The error names each differing flag;
    * its configuration (``config.json``) lacks the SAEs' layer or heads, or has other widths
      (:func:`~sparsedecomp.loading.heads.check_model_shape`)."""
    from ..loading.heads import check_model_shape
    from ..loading.models import differing_flags, folder_config, recorded_folder_flags

    recorded = recorded_folder_flags(folder)
    if flags is not None and recorded is not None:
        differ = differing_flags(recorded, flags)
        if differ:
            shown = ", ".join(f"{name}={mine} in the folder but {theirs} for the SAEs"
                              for name, (mine, theirs) in differ.items())
            raise InputError(f"--model {folder} records other processing than the SAEs were trained with ({shown}; the "
                             "SAEs' from their model_from_pretrained_kwargs): their hook_z differ. Give a model folder "
                             "recording the SAEs' processing_flags (its weights are stored unprocessed, so only "
                             "config.json's processing_flags change)")
    config = folder_config(folder)
    if config is not None:
        check_model_shape(config, head_saes, *saes)


def recorded_model_loading(head_saes: Any, *saes: Any) -> tuple[Any, dict[str, Any]]:
    """``(flags, kwargs)`` from the ``model_from_pretrained_kwargs`` the head SAEs and the other SAEs (the concat SAE)
    record: the processing flags among them over ``from_pretrained``'s defaults (``None`` when none is recorded) and
    the rest. All the SAEs read one model's ``hook_z``, so SAEs recording different processing are refused, naming
    each side's."""
    from ..loading import ProcessingFlags

    records = [("the per-head SAEs", head_saes.model_from_pretrained_kwargs)]
    records += [(sae.describe(), sae.model_from_pretrained_kwargs) for sae in saes]
    known = [(who, dict(kwargs)) for who, kwargs in records if kwargs is not None]
    names = set(ProcessingFlags().as_kwargs())

    def flags_of(kwargs: dict[str, Any]) -> ProcessingFlags:
        return ProcessingFlags(**{**ProcessingFlags().as_kwargs(), **{k: bool(v) for k, v in kwargs.items()
                                                                          if k in names}})

    for (who, kwargs), (other, theirs) in zip(known, known[1:]):
        mine, yours = flags_of(kwargs), flags_of(theirs)
        if mine != yours:
            raise InputError(f"the SAEs were trained on differently processed models, so they read different hook_z: "
                             f"{who}: {mine.describe()}; {other}: {yours.describe()}")
    recorded = known[0][1] if known else {}
    given = {k: bool(v) for k, v in recorded.items() if k in names}
    flags = flags_of(recorded) if given else None
    return flags, {k: v for k, v in recorded.items() if k not in names}


def recorded_training_data(head_saes: Any) -> dict:
    """``context_size``, ``prepend_bos`` and ``dataset_path`` as the head SAEs' configs record them (first found)."""
    recorded: dict = {}
    for sae in head_saes:
        config = sae.provenance.get("cfg") or {}
        # SAELens 6 keeps training facts under "metadata"; legacy SAELens at the top level.
        for source in (config, config.get("metadata") or {}):
            for key in ("context_size", "prepend_bos", "dataset_path"):
                if source.get(key) is not None and key not in recorded:
                    recorded[key] = source[key]
    return recorded


def read_tokens_file(path: Path) -> Any:
    """The ``--tokens`` file's contexts (BOS not yet known), refused with the flag's name."""
    from ..loading.tokens import load_tokens_file

    try:
        return load_tokens_file(path)
    except InputError as err:
        raise InputError(f"--tokens: {err}") from None


def resolve_tokens(request: TokenRequest, loaded: Any, head_saes: Any, *, read: Any = None) -> Any:
    """The run's contexts (a :class:`~sparsedecomp.loading.tokens.TokenSet`), checked against the model; ``read`` is
    the tokens file already read (:func:`read_tokens_file`), whose BOS is then taken from the model's tokenizer."""
    from ..loading.tokens import TokenSet, load_dataset_tokens

    cfg = loaded.model.cfg
    tokenizer = model_tokenizer(loaded)
    bos = request.bos_token_id if request.bos_token_id is not None else getattr(loaded, "bos_token_id", None)
    if bos is not None and not 0 <= bos < cfg.d_vocab:
        raise InputError(f"--bos-token-id {bos} is not in the model's vocabulary (d_vocab={cfg.d_vocab})")
    if request.tokens_file is not None:
        read = read_tokens_file(request.tokens_file) if read is None else read
        starts_with_bos = bos is not None and bool((read.tokens[:, 0] == bos).all())
        tokens = TokenSet(read.tokens, read.source, bos if starts_with_bos else None, False, read.details)
        source, flag = request.tokens_file, "--tokens"
        if tokens.n_contexts > request.n_contexts:
            tokens = tokens.first(request.n_contexts)
    else:
        recorded = recorded_training_data(head_saes)
        dataset = request.dataset if request.dataset is not None else recorded.get("dataset_path")
        if dataset is None:
            raise InputError("give --tokens or --dataset: the head SAEs' configs record no dataset_path")
        context_size = request.context_size or recorded.get("context_size") or cfg.n_ctx
        prepend_bos = request.prepend_bos if request.prepend_bos is not None else bool(recorded.get("prepend_bos", True))
        if int(context_size) > cfg.n_ctx:
            said = "--context-size" if request.context_size else "as the SAEs record"
            raise InputError(f"context size {context_size} ({said}) is longer than the model's n_ctx={cfg.n_ctx}: "
                             "give --context-size")
        if prepend_bos and bos is None:
            raise InputError("BOS is to be prepended but its token id is unknown (the model has no tokenizer): give "
                             "--tokenizer or --bos-token-id, or --no-prepend-bos")
        try:
            tokens = load_dataset_tokens(dataset, context_size=int(context_size), n_contexts=request.n_contexts,
                                         split=request.split, column=request.column, prepend_bos=prepend_bos,
                                         bos_token_id=bos, tokenizer=tokenizer, skip_contexts=request.skip_contexts)
        except InputError as err:
            if "pass tokenizer=" in str(err):
                raise InputError(f"--dataset {dataset}: the column holds text and the model has no tokenizer: give "
                                 "--tokenizer, a pre-tokenised dataset (a tokens / input_ids column) or --tokens") from None
            raise
        source, flag = dataset, "--dataset"
    check_token_content(tokens.tokens, d_vocab=cfg.d_vocab, n_ctx=cfg.n_ctx, bos_token_id=tokens.bos_token_id,
                        source=f"{flag} {source}")
    return tokens


def check_token_content(tokens: Tensor, *, d_vocab: int, n_ctx: int, bos_token_id: int | None, source: str) -> None:
    """Refuse ids outside the vocabulary and contexts longer than ``n_ctx`` (the activation stream's own
    :func:`~sparsedecomp.activations.check_tokens`), and a set with nothing after BOS."""
    from ..activations import check_tokens

    check_tokens(tokens, d_vocab=d_vocab, n_ctx=n_ctx, name=source)
    if bos_token_id is not None and bool((tokens == bos_token_id).all()):
        raise InputError(f"{source} holds only BOS tokens (id {bos_token_id}): nothing to evaluate")
    if bos_token_id is None and bool((tokens == tokens[:, :1]).all()):
        # Every position the same token: no statistic means anything.
        raise InputError(f"{source} holds one token id ({int(tokens[0, 0])}) at every position")


def fold_input_scales(head_saes: Any, loaded: Any, tokens: Tensor | None, *,
                      recorded: Mapping[int, float] | None = None, recorded_source: str = "") -> tuple[Any, str | None]:
    """Head SAEs with their input scales folded, and how the scales were found (``None`` when none was needed).

    The rule, the same in every command: a scale the training recorded (``recorded``, e.g. the demo build's) is
    used as it is; otherwise each needed scale ``s_h = sqrt(d_head) / E||z_h||`` is re-estimated on the first
    :data:`SCALE_ESTIMATE_CONTEXTS` contexts of ``tokens`` (all positions, BOS included, as in training)."""
    from ..loading import estimate_head_scales_from_model, fold_head_scales
    from ..loading.scaling import HeadScales

    needing = head_saes.heads_needing_input_scale
    if not needing:
        return head_saes, None
    if recorded is not None:
        missing = [h for h in needing if h not in recorded]
        if missing:
            raise InputError(f"no recorded training scale for heads {missing}")
        bad = {h: s for h, s in recorded.items() if not (math.isfinite(s) and s > 0)}
        if bad:
            raise InputError(f"recorded training scales must be positive and finite, got {bad}")
        note = f"the training scales recorded by {recorded_source or 'the checkpoint'}"
        scales = HeadScales(scales={h: float(recorded[h]) for h in needing}, mean_norms={}, d_head=head_saes.d_head,
                            n_vectors=0, description=note)
        return fold_head_scales(head_saes, scales), note
    if loaded is None or tokens is None:
        return head_saes, None  # directions only: the caller says the units are training units
    sample = tokens[:SCALE_ESTIMATE_CONTEXTS]
    scales = estimate_head_scales_from_model(loaded, list(sample.split(8)), layer=head_saes.layer, heads=list(needing))
    note = f"re-estimated on the first {sample.shape[0]} contexts of the run's tokens: {scales.description}"
    scales = HeadScales(scales=scales.scales, mean_norms=scales.mean_norms, d_head=scales.d_head,
                        n_vectors=scales.n_vectors, description=note)
    return fold_head_scales(head_saes, scales), note


def check_head_order(head_saes: Any, loaded: Any, tokens: Tensor) -> None:
    """Refuse head SAEs that reconstruct another head's ``z`` clearly better than their own (given in the wrong
    order, or with a wrong ``--head-index-map``): each SAE's explained variance on every head's ``z`` is compared,
    on the first :data:`HEAD_ORDER_CHECK_TOKENS` positions."""
    from ..activations import CollectZ, run_accumulators

    if len(head_saes) < 2:
        return
    n_contexts = max(1, HEAD_ORDER_CHECK_TOKENS // tokens.shape[1])
    z = run_accumulators(loaded, tokens[:n_contexts], {"z": CollectZ()}, layer=head_saes.layer)["z"]
    z = z.to(device=next(iter(head_saes)).W_dec.device, dtype=next(iter(head_saes)).W_dec.dtype)
    heads = list(head_saes.heads)
    x = z[:, heads]  # (positions, heads, d_head): each SAE reconstructs every head's z in one call
    total = (x - x.mean(0)).pow(2).sum((0, 2))
    misplaced = []
    for h, sae in head_saes.items():
        residual = (x - sae.forward(x)).pow(2).sum((0, 2))
        scores = {g: float(1 - residual[i] / total[i]) if float(total[i]) > 0 else float("nan")
                  for i, g in enumerate(heads)}
        best = max(scores, key=lambda g: -math.inf if math.isnan(scores[g]) else scores[g])
        if best != h and scores[best] >= HEAD_ORDER_FIT and scores[best] - scores[h] > HEAD_ORDER_MARGIN:
            misplaced.append(f"the SAE given for head {h} explains head {best}'s z (explained variance "
                             f"{scores[best]:.2f}) better than head {h}'s ({scores[h]:.2f})")
    if misplaced:
        raise InputError("the head SAEs look misplaced: " + "; ".join(misplaced) + ". Each SAE is placed at the head "
                         "its checkpoint's config records (checked against --head-index-map when given): check that "
                         "these name the heads the SAEs were trained on")


def resolve_inputs(request: InputRequest, *, log: Callable[[str], None] = print) -> Inputs:
    """Load and check everything ``request`` names (see the module docstring), each thing once."""
    if request.tokens is not None and request.model is None:
        raise InputError("--tokens / --dataset need --model: activations are read from the model's hook_z")
    read = None
    if request.tokens is not None and request.tokens.tokens_file is not None:
        read = read_tokens_file(request.tokens.tokens_file)  # a bad file fails in a second, not after the model loads
    concat, head_saes = load_saes(request.saes, log)
    context: dict[str, Any] = {"concat_sae": concat.describe(), "concat_sae_fingerprint": sae_fingerprint(concat),
                               "head_saes": head_saes.describe()}
    loaded = tokens = None
    if request.model is not None:
        loaded = load_model_for(request.model, head_saes, concat)
        context["model"] = loaded.describe()
        device = next(loaded.model.parameters()).device
        head_saes, concat = head_saes.to(device=device), concat.to(device=device)
    if request.tokens is not None:
        tokens = resolve_tokens(request.tokens, loaded, head_saes, read=read)
        context["tokens"] = (f"{tokens.n_contexts} contexts x {tokens.context_size} ({tokens.source}; BOS first: "
                             f"{tokens.bos_token_id is not None})")
    scales_note = None
    if request.fold_scales:
        head_saes, scales_note = fold_input_scales(head_saes, loaded, None if tokens is None else tokens.tokens)
        if scales_note is not None:
            context["head_scale_estimate"] = scales_note
    if loaded is not None and tokens is not None and not head_saes.heads_needing_input_scale:
        check_head_order(head_saes, loaded, tokens.tokens)
    return Inputs(concat_sae=concat, head_saes=head_saes, loaded=loaded, tokens=tokens, scales_note=scales_note,
                  context=context)


def sae_fingerprint(sae: Any) -> str:
    """The first 16 hex digits of the SHA-256 of an SAE's decoder (float32, row-major): names the SAE whatever its
    path, so a report of another SAE is told apart."""
    import hashlib

    return hashlib.sha256(sae.W_dec.detach().cpu().float().contiguous().numpy().tobytes()).hexdigest()[:16]


def parse_index_list(spec: str | None, flag: str) -> tuple[int, ...] | None:
    """``"0, 50256"`` -> ``(0, 50256)``; ``""`` -> ``()``; ``None`` -> ``None``. Only non-negative integers."""
    if spec is None:
        return None
    ids = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if not part.isdigit():
            raise InputError(f"{flag}: {part!r} is not a non-negative integer")
        ids.append(int(part))
    return tuple(ids)


def parse_feature_ranges(spec: str | None) -> tuple[range, ...] | None:
    """``"0-3,9"`` -> ``(range(0, 4), range(9, 10))`` (ranges inclusive); ``None`` for all features. Ranges are kept
    as ranges, so a huge one is refused against the SAE's width without being expanded."""
    if spec is None:
        return None
    ranges = []
    for part in spec.split(","):
        first, dash, last = part.strip().partition("-")
        try:
            lo = int(first)
            hi = int(last) if dash else lo
        except ValueError:
            raise InputError(f"--features: {part.strip()!r} is not an index or a range like 0-63") from None
        if hi < lo:
            raise InputError(f"--features: the range {part.strip()!r} runs backwards")
        ranges.append(range(lo, hi + 1))
    return tuple(ranges)


def check_feature_selection(features: Sequence[int] | Sequence[range] | None, n_features: int) -> Tensor:
    """The selected concat-feature indices as a long tensor (all when ``None``), refused by name when out of range,
    repeated or empty. ``features`` may be indices or ranges (checked before they are expanded)."""
    if features is None:
        return torch.arange(n_features)
    if any(not isinstance(p, range) and (isinstance(p, bool) or not isinstance(p, int)) for p in features):
        raise InputError(f"features must be integer indices or ranges, got {list(features)[:5]}")
    parts = [p if isinstance(p, range) else range(p, p + 1) for p in features]
    if not parts or all(len(p) == 0 for p in parts):
        raise InputError("the feature selection is empty")
    bad = [p for p in parts if p.start < 0 or p.stop > n_features]
    if bad:
        shown = [p.start if len(p) == 1 else f"{p.start}-{p.stop - 1}" for p in bad[:5]]
        raise InputError(f"features {shown} are out of range: the concat SAE has {n_features} features "
                         f"(0..{n_features - 1})")
    ids = [i for p in parts for i in p]
    if len(set(ids)) != len(ids):
        raise InputError("the feature selection repeats indices")
    return torch.tensor(ids, dtype=torch.long)
