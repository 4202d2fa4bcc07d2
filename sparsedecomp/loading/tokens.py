"""Token sources: the contexts a model is run on, with their context size and BOS handling stated and recorded.

Three sources give one :class:`TokenSet` (``(n_contexts, context_size)`` token ids and how they were made):

* :func:`load_tokens_file`: a safetensors / ``.pt`` file holding a ``tokens`` ``[batch, pos]`` tensor (never
  unpickled: ``.pt`` files are read with ``weights_only=True``);
* :func:`load_dataset_tokens`: a Hugging Face dataset by name (or a local folder / data files, the same code path),
  pre-tokenised (a ``tokens`` / ``input_ids`` column, e.g. ``NeelNanda/c4-code-tokenized-2b`` that gelu-2l's SAEs
  were trained on) or text with a tokenizer;
* the demo world's held-out split (:func:`sparsedecomp.demo.demo_tokens`).

BOS: SAEs are trained with a fixed BOS setting (``prepend_bos`` in their config) and their input scale and
activations depend on it, so every source says whether position 0 of each context is BOS (``bos_token_id``) and
whether it was added here (``bos_added``). Given a ``tokenizer`` (a ``transformers`` tokenizer, a
``tokenizers.Tokenizer``, a ``HookedTransformer`` or a :class:`~sparsedecomp.loading.LoadedModel` with one: the
tokenizer of a model folder travels with it), the BOS id defaults to the tokenizer's (:func:`tokenizer_bos_token_id`).

``datasets`` (a dependency of ``transformer_lens``, not of this package) is imported only by
:func:`load_dataset_tokens`; without it that function raises :class:`MissingPackageError`.

Packing follows SAELens: a pre-tokenised row is one context, cut to ``context_size`` (SAELens 6's behaviour for
pre-tokenised datasets; a row without BOS gets it prepended when ``prepend_bos``, and a row too short is skipped);
text is tokenised, concatenated and cut into contexts by SAELens's own ``concat_and_batch_sequences`` with BOS at
position 0 of every context when ``prepend_bos``.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from ..errors import InputError, InputTypeError

TOKEN_COLUMNS = ("tokens", "input_ids")


class MissingPackageError(InputError, ImportError):
    """An optional package a function needs is not installed; the message names it (also an ``ImportError``)."""


def _import_datasets():
    try:
        import datasets
    except ImportError as err:
        raise MissingPackageError(f"reading a dataset needs the Hugging Face 'datasets' package, which is not "
                                  f"installed ({err}): pip install datasets, or give a tokens file") from None
    return datasets


@dataclass(frozen=True, eq=False)
class TokenSet:
    """Contexts of token ids and where they came from.

    Attributes:
        tokens: ``(n_contexts, context_size)`` long.
        source: what they are, in words (file path, dataset name and split, "demo held-out").
        bos_token_id: the token at position 0 of every context when contexts start with BOS, else ``None``.
        bos_added: whether this package prepended that BOS (to at least one context; ``False``: it was in the data).
        details: JSON-ready facts about how they were made (dataset, column, rows read, skipped ...).
    """

    tokens: Tensor
    source: str
    bos_token_id: int | None = None
    bos_added: bool = False
    details: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        from ..activations import check_tokens

        object.__setattr__(self, "tokens", check_tokens(self.tokens))

    @property
    def n_contexts(self) -> int:
        return self.tokens.shape[0]

    @property
    def context_size(self) -> int:
        return self.tokens.shape[1]

    @property
    def n_tokens(self) -> int:
        return self.tokens.numel()

    def first(self, n_contexts: int) -> "TokenSet":
        """The first ``n_contexts`` contexts (all if fewer)."""
        if isinstance(n_contexts, bool) or not isinstance(n_contexts, int) or n_contexts < 1:
            raise InputError(f"n_contexts must be a positive int, got {n_contexts!r}")
        return TokenSet(self.tokens[:n_contexts], self.source, self.bos_token_id, self.bos_added,
                        {**self.details, "contexts_taken": min(n_contexts, self.n_contexts)})

    def describe(self) -> dict[str, Any]:
        """JSON-ready: source, shape, BOS handling and details."""
        return {"source": self.source, "n_contexts": self.n_contexts, "context_size": self.context_size,
                "n_tokens": self.n_tokens, "bos_token_id": self.bos_token_id, "bos_added": self.bos_added,
                "starts_with_bos": self.bos_token_id is not None, **self.details}


def _infer_bos(tokens: Tensor, bos_token_id: int | None) -> int | None:
    """``bos_token_id`` when every context starts with it; ``None`` otherwise (BOS cannot be assumed)."""
    if bos_token_id is None:
        return None
    return bos_token_id if bool((tokens[:, 0] == bos_token_id).all()) else None


def load_tokens_file(path: str | Path, *, bos_token_id: int | None = None, tokenizer: Any = None) -> TokenSet:
    """The ``[batch, pos]`` token ids of a safetensors / ``.pt`` file (tensor ``tokens``, or the file's only
    tensor), refused by name when unreadable, not integer, not 2-D, empty or negative. ``bos_token_id`` (default:
    ``tokenizer``'s BOS, when a tokenizer or a model with one is given) is recorded as the BOS if every context
    starts with it."""
    if bos_token_id is None and tokenizer is not None:
        bos_token_id = tokenizer_bos_token_id(tokenizer)
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no tokens file at {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(str(path))
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's message suggests weights_only=False, i.e. running code from the file: never.
        raise InputError(f"{path} is not a file of tensors (reading it would mean unpickling arbitrary objects, which "
                         "this package never does); save the tokens with safetensors or torch.save of a tensor") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        kind = "safetensors" if path.suffix == ".safetensors" else "torch"
        raise InputError(f"{path} could not be read as a {kind} tensor file ({type(err).__name__}: {err})") from None
    except Exception as err:  # safetensors' own error type for a malformed file
        if type(err).__module__.startswith("safetensors"):
            raise InputError(f"{path} is not a valid safetensors file ({err})") from None
        raise
    if isinstance(data, dict):
        tokens = data.get("tokens", next(iter(data.values())) if len(data) == 1 else None)
    else:
        tokens = data
    if not isinstance(tokens, Tensor) or tokens.ndim != 2:
        found = f"shape {tuple(tokens.shape)}" if isinstance(tokens, Tensor) else type(tokens).__name__
        raise InputError(f"{path} must hold a 'tokens' [batch, pos] integer tensor, found {found}")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise InputError(f"{path} holds {tokens.dtype} values; token ids must be integers")
    if tokens.shape[0] == 0 or tokens.shape[1] < 2:
        raise InputError(f"{path} has shape {tuple(tokens.shape)}; give at least one context of at least two "
                         "positions (BOS first)")
    if int(tokens.min()) < 0:
        raise InputError(f"{path} holds negative token ids (min {int(tokens.min())})")
    tokens = tokens.long()
    return TokenSet(tokens, f"tokens file {path}", _infer_bos(tokens, bos_token_id), False,
                    {"kind": "file", "path": str(path)})


def load_dataset_tokens(
    dataset: str | Path,
    *,
    context_size: int,
    n_contexts: int,
    split: str = "train",
    column: str | None = None,
    prepend_bos: bool = True,
    bos_token_id: int | None = None,
    tokenizer: Any = None,
    revision: str | None = None,
    data_files: Any = None,
    streaming: bool = True,
    skip_contexts: int = 0,
) -> TokenSet:
    """``n_contexts`` contexts of ``context_size`` tokens from a Hugging Face dataset.

    ``dataset`` is a hub name (``NeelNanda/c4-code-tokenized-2b``), a local folder or a loader name with
    ``data_files`` (``"parquet"``, ``"json"``): all go through ``datasets.load_dataset`` (streamed, so only the rows
    used are read). ``column`` defaults to the first of :data:`TOKEN_COLUMNS` present, else ``"text"``; a text
    column needs ``tokenizer`` (a ``transformers`` tokenizer, a ``tokenizers.Tokenizer``, or a HookedTransformer /
    :class:`~sparsedecomp.loading.LoadedModel` with one), which tokenises it without special tokens.
    ``prepend_bos`` puts ``bos_token_id`` (default: the tokenizer's, :func:`tokenizer_bos_token_id`) at position 0
    of every context.
    ``skip_contexts`` drops that many contexts first (e.g. to evaluate on contexts an SAE was not trained on).
    """
    datasets = _import_datasets()

    for name, value in (("context_size", context_size), ("n_contexts", n_contexts)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be a positive int, got {value!r}")
    if isinstance(skip_contexts, bool) or not isinstance(skip_contexts, int) or skip_contexts < 0:
        raise InputError(f"skip_contexts must be a non-negative int, got {skip_contexts!r}")
    if context_size < 2:
        raise InputError(f"context_size must be at least 2, got {context_size}")
    kwargs: dict[str, Any] = {"split": split, "streaming": streaming}
    if revision is not None:
        kwargs["revision"] = revision
    if data_files is not None:
        kwargs["data_files"] = data_files
    try:
        rows = datasets.load_dataset(str(dataset), **kwargs)
    except FileNotFoundError as err:
        raise InputError(f"dataset {dataset!r} could not be found ({err})") from None
    except ConnectionError as err:  # the hub is unreachable and the dataset is not in the local cache
        raise InputError(f"dataset {dataset!r} could not be fetched ({err}): without the network, give a local "
                         "dataset folder or a tokens file") from None
    except ValueError as err:  # e.g. an unknown split
        raise InputError(f"dataset {dataset!r} could not be loaded with split={split!r}: {err}") from None
    except RuntimeError as err:
        # datasets >= 4 runs no loading scripts: "Dataset scripts are no longer supported, but found NAME.py".
        if "dataset script" not in str(err).lower():
            raise
        raise InputError(f"dataset {dataset!r} is a dataset loading script, which the installed datasets "
                         f"{getattr(datasets, '__version__', '')} does not run ({err}): give a dataset of data files (a "
                         "folder of parquet / json / csv / arrow files, or a hub dataset that has them) or a tokens "
                         "file") from None
    features = list(getattr(rows, "column_names", None) or [])
    if column is None:
        column = next((c for c in TOKEN_COLUMNS if c in features), "text" if "text" in features or not features else None)
        if column is None:
            raise InputError(f"dataset {dataset!r} has no token column {TOKEN_COLUMNS} and no 'text' column "
                             f"(columns: {features}): pass column=")
    elif features and column not in features:
        raise InputError(f"dataset {dataset!r} has no column {column!r} (columns: {features})")
    pretokenized = column in TOKEN_COLUMNS
    encode = None
    if not pretokenized:
        if tokenizer is None:
            raise InputError(f"column {column!r} holds text: pass tokenizer= (or a pre-tokenised column)")
        encode, tokenizer_bos = _encoder(tokenizer)
        bos_token_id = tokenizer_bos if bos_token_id is None else bos_token_id
    elif bos_token_id is None and tokenizer is not None:
        bos_token_id = _encoder(tokenizer)[1]
    if prepend_bos and bos_token_id is None:
        raise InputError("prepend_bos needs the BOS token id: pass bos_token_id= or a tokenizer that has one (a "
                         "tokenizers.Tokenizer without a special added token named as BOS, such as <|bos|> or <s>, "
                         "does not say which token is BOS: pass e.g. "
                         "bos_token_id=tokenizer.token_to_id('<|endoftext|>'))")

    def dataset_rows() -> Iterator[Any]:
        try:
            yield from rows
        except Exception as err:  # pyarrow / datasets errors on an empty or unreadable file
            if type(err).__module__.partition(".")[0] in ("pyarrow", "datasets"):
                raise InputError(f"dataset {dataset!r} ({split}) could not be read: {type(err).__name__}: {err} "
                                 "(is it empty?)") from None
            raise

    def sequences() -> Iterator[Tensor]:
        for row in dataset_rows():
            if column not in row:  # a streamed dataset may not know its columns before the first row
                raise InputError(f"dataset {dataset!r} has no column {column!r} (columns: {sorted(row)})")
            value = row[column]
            ids = torch.as_tensor(value, dtype=torch.long) if pretokenized else torch.as_tensor(encode(value), dtype=torch.long)
            if ids.ndim != 1:
                raise InputError(f"dataset {dataset!r} column {column!r} must hold one sequence per row, got shape "
                                 f"{tuple(ids.shape)}")
            yield ids

    skipped_short = 0
    # The contexts taken that got their BOS here (a pre-tokenised row that already starts with BOS keeps it).
    bos_prepended: list[bool] = []
    if pretokenized:
        def contexts() -> Iterator[Tensor]:
            nonlocal skipped_short
            for ids in sequences():
                added = prepend_bos and (len(ids) == 0 or int(ids[0]) != bos_token_id)
                if added:
                    ids = torch.cat([torch.tensor([bos_token_id]), ids[: context_size - 1]])
                if len(ids) < context_size:
                    skipped_short += 1
                    continue
                bos_prepended.append(added)
                yield ids[:context_size]
        packing = "one context per row, cut to context_size (SAELens 6, pre-tokenised)"
    else:
        from sae_lens.tokenization_and_batching import concat_and_batch_sequences

        def contexts() -> Iterator[Tensor]:
            # Text is tokenised without special tokens, so the packer puts every context's BOS there.
            for ids in concat_and_batch_sequences(sequences(), context_size,
                                                  begin_batch_token_id=bos_token_id if prepend_bos else None):
                bos_prepended.append(prepend_bos)
                yield ids
        packing = "tokenised, concatenated and cut (sae_lens concat_and_batch_sequences)"

    taken: list[Tensor] = []
    seen = 0
    for ids in contexts():
        seen += 1
        if seen <= skip_contexts:
            continue
        taken.append(ids)
        if len(taken) == n_contexts:
            break
    n_bos_prepended = sum(bos_prepended[skip_contexts:])
    if not taken:
        raise InputError(f"dataset {dataset!r} ({split}, column {column!r}) gave no context of {context_size} tokens "
                         f"(after skipping {skip_contexts}; {skipped_short} rows were too short)")
    tokens = torch.stack(taken)
    if len(taken) < n_contexts:
        import warnings

        warnings.warn(f"dataset {dataset!r} gave only {len(taken)} of the {n_contexts} contexts asked for", stacklevel=2)
    bos = bos_token_id if prepend_bos else _infer_bos(tokens, bos_token_id)
    details = {"kind": "dataset", "dataset": str(dataset), "split": split, "column": column, "revision": revision,
               "pretokenized": pretokenized, "packing": packing, "prepend_bos": prepend_bos,
               "skip_contexts": skip_contexts, "rows_too_short": skipped_short,
               "contexts_with_bos_prepended": n_bos_prepended}
    return TokenSet(tokens, f"dataset {dataset} [{split}] column {column!r}", bos, n_bos_prepended > 0, details)


def tokenizer_bos_token_id(tokenizer: Any) -> int | None:
    """The BOS id of a ``transformers`` tokenizer (``bos_token_id``), of a ``tokenizers.Tokenizer`` (its special
    added token named as BOS, ``<|bos|>``, ``<s>`` ...: rule 2 of :mod:`sparsedecomp.loading.models`), or of the
    tokenizer of a HookedTransformer / :class:`~sparsedecomp.loading.LoadedModel`; ``None`` if it has none."""
    return _encoder(tokenizer)[1]


def _unwrap(tokenizer: Any) -> Any:
    """The tokenizer itself, from a HookedTransformer or LoadedModel (their ``tokenizer`` attribute)."""
    if not callable(getattr(tokenizer, "encode", None)) and hasattr(tokenizer, "tokenizer"):
        inner = tokenizer.tokenizer
        if inner is None:
            name = getattr(tokenizer, "name", "") or type(tokenizer).__name__
            raise InputError(f"the model {name} has no tokenizer: load it with one (load_model(..., tokenizer=...)) "
                             "or pass a tokenizer")
        return inner
    return tokenizer


def _encoder(tokenizer: Any) -> tuple[Callable[[str], list[int]], int | None]:
    """``(text -> ids, bos_token_id)`` for a transformers tokenizer, a ``tokenizers.Tokenizer`` or a model with one.
    Special tokens are not added: BOS placement is the packer's job."""
    tokenizer = _unwrap(tokenizer)
    bos = getattr(tokenizer, "bos_token_id", None)
    encode = getattr(tokenizer, "encode", None)
    if encode is None:
        raise InputTypeError(f"tokenizer must have an encode method, got {type(tokenizer).__name__}")
    try:
        import tokenizers

        if isinstance(tokenizer, tokenizers.Tokenizer):
            from .models import infer_special_tokens

            name = infer_special_tokens(tokenizer).get("bos_token")
            bos = tokenizer.token_to_id(name) if name is not None else None
            return (lambda text: tokenizer.encode(text, add_special_tokens=False).ids), bos
    except ImportError:  # pragma: no cover - tokenizers is a dependency
        pass
    return (lambda text: list(tokenizer.encode(text, add_special_tokens=False))), bos
