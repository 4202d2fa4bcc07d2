"""TransformerLens models with explicit, recorded weight-processing flags.

Processing changes ``hook_z``: ``fold_value_biases`` moves each head's value bias into ``b_O``, shifting ``z`` by a
constant per head. SAEs must read ``z`` from a model processed exactly as during their training (Kissane's and
SAELens 2.x's SAEs: the ``from_pretrained`` defaults), so the flags travel with the model.

A model comes from the Hugging Face hub by TransformerLens name (``gelu-2l``) or from a local model folder:

    config.json        {"hooked_transformer_config": {HookedTransformerConfig keyword arguments},
                        "processing_flags": {fold_ln, center_writing_weights, ...}  (optional: how to load it),
                        ... anything else}
    model.safetensors  the *unprocessed* HookedTransformer state dict (any floating dtype)
    tokenizer.json     optional: the model's tokenizer, a Hugging Face ``tokenizers`` file, with optionally
    tokenizer_config.json / special_tokens_map.json  (naming its BOS / EOS / pad / unk tokens): the files
                       ``transformers``' ``save_pretrained`` writes for a fast tokenizer

(the layout of the demo model, ``sparsedecomp/demo/artifacts/model``).

Tokenizers (:func:`load_tokenizer`) are read as ``transformers.PreTrainedTokenizerFast`` and attached to the
``HookedTransformer`` with its ``set_tokenizer``, so ``model.to_tokens`` / ``to_string`` and everything reading
``model.tokenizer`` (dashboards, dataset tokenisation) use them. Which token is BOS / EOS / pad / unk:

1. what ``tokenizer_config.json`` / ``special_tokens_map.json`` name (read by ``transformers``);
2. for a role they leave unnamed (or without those files), the lowest-id *special* added token of
   ``tokenizer.json`` whose text names the role: ``<|bos|>``, ``<bos>``, ``<s>``, ``[BOS]``,
   ``<|startoftext|>``, ``<|begin_of_text|>`` (BOS); ``<|eos|>``, ``</s>``, ``<|endoftext|>``,
   ``<|end_of_text|>`` (EOS); ``<pad>``, ``<|padding|>`` (pad); ``<unk>`` (unk; also the BPE / WordLevel /
   WordPiece model's own ``unk_token``), case-insensitively (:data:`SPECIAL_TOKEN_NAMES`);
3. what TransformerLens's ``set_tokenizer`` then fills in: EOS ``<|endoftext|>``, pad = EOS and, for a tokenizer
   with no BOS, BOS = EOS (the GPT-2 convention, also gelu-2l's).

A tokenizer with a BOS is set to add it (``add_bos_token=True``, what ``set_tokenizer`` otherwise does by reloading
the tokenizer by name), so ``model.to_tokens`` prepends it once; ``encode(..., add_special_tokens=False)`` (as
:mod:`sparsedecomp.loading.tokens` tokenises datasets) never does.
"""

from __future__ import annotations

import difflib
import json
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from .errors import CheckpointError, CheckpointNotFoundError, ModelNotFoundError
from .files import read_json, read_safetensors
from ..errors import InputError, InputTypeError
from ..validation import check_device

MODEL_CONFIG_NAME = "config.json"
MODEL_WEIGHTS_NAME = "model.safetensors"
TOKENIZER_NAME = "tokenizer.json"
TOKENIZER_CONFIG_NAMES = ("tokenizer_config.json", "special_tokens_map.json")
"""The ``save_pretrained`` files beside ``tokenizer.json`` that name its special tokens (read by ``transformers``)."""

SPECIAL_TOKEN_NAMES: dict[str, tuple[str, ...]] = {
    "bos_token": ("bos", "s", "startoftext", "start_of_text", "begin_of_text", "beginoftext"),
    "eos_token": ("eos", "/s", "endoftext", "end_of_text"),
    "pad_token": ("pad", "padding"),
    "unk_token": ("unk", "unknown"),
}
"""Rule 2 of the module docstring: the names (inside ``<...>``, ``<|...|>`` or ``[...]``, any case) that make a special
added token the BOS / EOS / pad / unk token when the tokenizer's config files do not say."""

_WRAPPED_TOKEN = re.compile(r"^(?:<\|?|\[)\s*([^<>\[\]|]+?)\s*(?:\|?>|\])$")


@dataclass(frozen=True)
class ProcessingFlags:
    """``HookedTransformer`` weight processing; defaults are those of ``HookedTransformer.from_pretrained``."""

    fold_ln: bool = True
    center_writing_weights: bool = True
    center_unembed: bool = True
    fold_value_biases: bool = True
    refactor_factored_attn_matrices: bool = False

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, bool):
                raise InputTypeError(f"ProcessingFlags.{name} must be a bool, got {value!r}")

    @classmethod
    def none(cls) -> "ProcessingFlags":
        """No processing (``from_pretrained_no_processing``)."""
        return cls(False, False, False, False, False)

    def as_kwargs(self) -> dict[str, bool]:
        return asdict(self)

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self).items())


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A ``HookedTransformer`` with the name it was loaded under, the processing applied to its weights and where
    it came from (``source``: the hub name, or the local folder).

    ``tokenizer_source`` says where ``model.tokenizer`` came from: a ``tokenizer.json`` file or tokenizer folder, a
    Hugging Face tokenizer name, or TransformerLens's default for a hub model; ``None`` when the model has none
    (token ids then cannot be shown as text, and BOS must be given by id)."""

    model: Any
    flags: ProcessingFlags
    name: str
    source: str | None = None
    tokenizer_source: str | None = None

    @property
    def tokenizer(self) -> Any:
        """The ``transformers`` tokenizer attached to the model, or ``None``."""
        return getattr(self.model, "tokenizer", None)

    @property
    def bos_token_id(self) -> int | None:
        """The tokenizer's BOS token id (``None`` without a tokenizer, or one without BOS)."""
        return _token_id(self.tokenizer, "bos_token_id")

    @property
    def special_token_ids(self) -> tuple[int, ...]:
        """The ids of the tokenizer's special tokens, sorted: ``all_special_ids`` (BOS, EOS, pad, unk and the named
        additional ones) and every added token marked special; ``()`` without a tokenizer."""
        return special_token_ids(self.tokenizer)

    def describe(self) -> str:
        where = f" from {self.source}" if self.source and self.source != self.name else ""
        tokenizer = f", tokenizer {self.tokenizer_source}" if self.tokenizer_source else ""
        return f"{self.name}{where} ({self.flags.describe()}){tokenizer}"


def load_model(
    name: str | Path,
    *,
    flags: ProcessingFlags | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    tokenizer: str | Path | Any = None,
    **from_pretrained_kwargs: Any,
) -> LoadedModel:
    """A TransformerLens model with its weight processing explicit and recorded.

    ``name`` is a local model folder (see the module docstring; e.g. the demo's ``sparsedecomp/demo/artifacts/model``)
    or a TransformerLens model name or alias (``gelu-2l``), loaded with ``HookedTransformer.from_pretrained`` with
    every processing flag passed explicitly (needs the Hugging Face hub or its cache; extra keyword arguments go to
    ``from_pretrained``). ``flags`` defaults to the folder's recorded ``processing_flags`` (else the
    ``from_pretrained`` defaults, ``ProcessingFlags()``); explicit flags that differ from the recorded
    ones are used, with a warning. An unknown name raises :class:`ModelNotFoundError` naming a few close matches.

    The model's tokenizer (``model.tokenizer``, ``LoadedModel.tokenizer``; where it came from:
    ``LoadedModel.tokenizer_source``) is ``tokenizer`` when given (anything :func:`load_tokenizer` takes: a
    ``tokenizer.json`` file, a folder holding one, a Hugging Face tokenizer name, or a tokenizer object), else the
    folder's own ``tokenizer.json`` (with its ``save_pretrained`` config files) if it holds one, else none; for a hub
    model, TransformerLens's default tokenizer unless ``tokenizer`` replaces it. A tokenizer whose token ids do not
    fit the model's ``d_vocab`` is refused (:class:`CheckpointError`).
    """
    if flags is not None:
        _check_flags(flags)
    check_device(device)  # refuse a device this machine lacks before anything loads
    folder = Path(name)
    if isinstance(name, Path) or folder.is_dir():
        if from_pretrained_kwargs:
            raise InputError(f"{sorted(from_pretrained_kwargs)} only apply to hub models, not to the folder {folder}")
        return _load_model_folder(folder, flags=flags, device=device, dtype=dtype, tokenizer=tokenizer)
    if not isinstance(name, str) or not name:
        raise InputTypeError(f"name must be a model name or a model folder, got {name!r}")
    from transformer_lens import HookedTransformer

    _check_model_name(name)
    flags = ProcessingFlags() if flags is None else flags
    overlap = sorted(set(from_pretrained_kwargs) & set(flags.as_kwargs()))
    if overlap:
        raise InputError(f"pass processing flags through flags=ProcessingFlags(...), not as {overlap}")
    tokenizer_source = None
    if tokenizer is not None:  # loaded first: a bad tokenizer is refused before the model is downloaded
        tokenizer, tokenizer_source = load_tokenizer(tokenizer)
        from_pretrained_kwargs["tokenizer"] = tokenizer
    model = HookedTransformer.from_pretrained(
        name, device=device, dtype=dtype, **flags.as_kwargs(), **from_pretrained_kwargs
    )
    model.eval()
    if tokenizer is not None:
        check_tokenizer_fits(tokenizer, model.cfg.d_vocab, tokenizer_source, name)
    elif getattr(model, "tokenizer", None) is not None:
        tokenizer_source = f"{getattr(model.cfg, 'tokenizer_name', None) or name} (TransformerLens's default)"
    return LoadedModel(model=model, flags=flags, name=name, source=name, tokenizer_source=tokenizer_source)


def _check_model_name(name: str) -> None:
    """Raise :class:`ModelNotFoundError` (with at most five close matches, not TransformerLens's list of every
    supported model) unless ``name`` is a TransformerLens model name or alias."""
    from transformer_lens.loading_from_pretrained import make_model_alias_map

    known = make_model_alias_map()
    if name.lower() in known:
        return
    close = difflib.get_close_matches(name.lower(), list(known), n=5, cutoff=0.6)
    hint = f"; close matches: {close}" if close else ""
    looks_like_path = any(sep in name for sep in ("/", "\\")) or name.startswith((".", "~"))
    folder = f" and no local model folder {name} exists" if looks_like_path else ""
    raise ModelNotFoundError(f"unknown model {name!r}: not a TransformerLens model name or alias{folder}{hint}")


def _load_model_folder(
    folder: Path, *, flags: ProcessingFlags | None, device: str | torch.device, dtype: str | torch.dtype,
    tokenizer: Any = None,
) -> LoadedModel:
    """Build the ``HookedTransformer`` from ``config.json`` (with ``tokenizer``, else the folder's own, attached)
    and load ``model.safetensors`` with the flags."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    if not folder.is_dir():
        raise ModelNotFoundError(f"model folder not found: {folder}")
    config_path = folder / MODEL_CONFIG_NAME
    meta = read_json(config_path, "model config")
    kwargs = meta.get("hooked_transformer_config")
    if not isinstance(kwargs, dict):
        raise CheckpointError(
            f"{config_path} has no 'hooked_transformer_config' object: a local model folder holds {MODEL_CONFIG_NAME} "
            f"with the HookedTransformerConfig keyword arguments (and optional 'processing_flags') and "
            f"{MODEL_WEIGHTS_NAME} with the unprocessed HookedTransformer state dict"
        )
    recorded = _recorded_flags(meta, config_path)
    if flags is None:
        flags = recorded if recorded is not None else ProcessingFlags()
    elif recorded is not None and flags != recorded:
        warnings.warn(
            f"{folder} records processing flags ({recorded.describe()}) but it is loaded with ({flags.describe()}): "
            "SAEs trained on the recorded processing read a different hook_z",
            UserWarning,
            stacklevel=3,
        )
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InputError(f"dtype must be a floating torch dtype or its name, got {dtype!r}")
    try:
        config = HookedTransformerConfig(**{**kwargs, "device": str(device), "dtype": dtype})
    except (TypeError, ValueError, AssertionError) as err:
        raise CheckpointError(f"{config_path}: hooked_transformer_config is not a valid HookedTransformerConfig: {err}") from err
    tokenizer_source = None
    if tokenizer is None and (folder / TOKENIZER_NAME).is_file():
        tokenizer = folder
    elif tokenizer is None:
        stray = [n for n in TOKENIZER_CONFIG_NAMES if (folder / n).is_file()]
        if stray:
            warnings.warn(f"{folder} holds {stray[0]} but no {TOKENIZER_NAME}: only fast tokenizers ({TOKENIZER_NAME}, "
                          "as save_pretrained writes it) are read, so the model is loaded without a tokenizer",
                          UserWarning, stacklevel=3)
    if tokenizer is not None:
        tokenizer, tokenizer_source = load_tokenizer(tokenizer)
        if config.d_vocab != -1:  # -1: TransformerLens takes d_vocab from the tokenizer
            check_tokenizer_fits(tokenizer, config.d_vocab, tokenizer_source, str(folder))
    state = read_safetensors(folder / MODEL_WEIGHTS_NAME, "model weights")
    model = HookedTransformer(config, tokenizer=tokenizer)
    expected = {k for k in model.state_dict() if not k.endswith((".IGNORE", ".mask"))}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{folder / MODEL_WEIGHTS_NAME} does not match {config_path}: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}"
        )
    # Shapes before processing: load_and_process_state_dict would fail on a mismatch deep inside weight folding
    # (a broadcasting error naming no tensor) or in load_state_dict.
    wanted = model.state_dict()
    wrong = [(key, tuple(state[key].shape), tuple(wanted[key].shape)) for key in sorted(expected)
             if tuple(state[key].shape) != tuple(wanted[key].shape)]
    if wrong:
        shown = "; ".join(f"{key} has shape {got} but {MODEL_CONFIG_NAME} gives {want}" for key, got, want in wrong[:5])
        more = f" (and {len(wrong) - 5} more)" if len(wrong) > 5 else ""
        raise CheckpointError(f"{folder / MODEL_WEIGHTS_NAME} does not match {config_path}: {shown}{more}")
    state = {key: value.to(dtype) for key, value in state.items()}
    name = kwargs.get("model_name") or folder.name
    loaded = process_state_dict(model, state, flags, name=name)
    return LoadedModel(model=loaded.model, flags=flags, name=name, source=str(folder),
                       tokenizer_source=tokenizer_source)


def _recorded_flags(meta: Mapping[str, Any], config_path: Path) -> ProcessingFlags | None:
    """The ``processing_flags`` a model folder's ``config.json`` records (``None`` when it records none)."""
    recorded = meta.get("processing_flags")
    if recorded is None:
        return None
    if not isinstance(recorded, dict):
        raise CheckpointError(f"{config_path}: processing_flags must be an object, got {recorded!r}")
    try:
        return ProcessingFlags(**recorded)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{config_path}: processing_flags: {err}") from err


def recorded_folder_flags(folder: str | Path) -> ProcessingFlags | None:
    """The processing flags a local model folder records in its ``config.json`` (``None`` when it records none),
    read without loading the model."""
    config_path = Path(folder) / MODEL_CONFIG_NAME
    return _recorded_flags(read_json(config_path, "model config"), config_path)


def differing_flags(mine: ProcessingFlags, theirs: ProcessingFlags) -> dict[str, tuple[bool, bool]]:
    """``{flag: (mine, theirs)}`` for every processing flag on which the two differ (``{}`` when they agree)."""
    a, b = mine.as_kwargs(), theirs.as_kwargs()
    return {name: (a[name], b[name]) for name in a if a[name] != b[name]}


def folder_config(folder: str | Path) -> Any | None:
    """The ``HookedTransformerConfig`` a local model folder's ``config.json`` describes, without loading its weights
    (to check SAEs against the model before any work); ``None`` when it holds no ``hooked_transformer_config``
    (:func:`load_model` names that problem). An invalid configuration raises :class:`CheckpointError`."""
    from transformer_lens import HookedTransformerConfig

    config_path = Path(folder) / MODEL_CONFIG_NAME
    kwargs = read_json(config_path, "model config").get("hooked_transformer_config")
    if not isinstance(kwargs, dict):
        return None
    try:
        return HookedTransformerConfig(**{**kwargs, "device": "cpu"})
    except (TypeError, ValueError, AssertionError) as err:
        raise CheckpointError(f"{config_path}: hooked_transformer_config is not a valid HookedTransformerConfig: "
                              f"{err}") from err


def process_state_dict(
    model: Any,
    state_dict: Mapping[str, torch.Tensor],
    flags: ProcessingFlags = ProcessingFlags(),
    *,
    name: str | None = None,
) -> LoadedModel:
    """Load ``state_dict`` (HookedTransformer layout, unprocessed) into ``model`` with ``flags`` applied via
    ``model.load_and_process_state_dict``. That method mutates the dict it gets, so it receives a copy of
    ``state_dict`` (tensors cloned): the caller's dict and tensors are left untouched."""
    _check_flags(flags)
    if not hasattr(model, "load_and_process_state_dict"):
        raise InputTypeError(f"model must be a HookedTransformer, got {type(model).__name__}")
    copy = {key: value.detach().clone() for key, value in state_dict.items()}
    model.load_and_process_state_dict(copy, **flags.as_kwargs())
    model.eval()
    return LoadedModel(model=model, flags=flags, name=name or getattr(model.cfg, "model_name", "model"))


def _check_flags(flags: object) -> None:
    if not isinstance(flags, ProcessingFlags):
        raise InputTypeError(f"flags must be ProcessingFlags, got {type(flags).__name__}")


# -- tokenizers -------------------------------------------------------------------------------------------------------
def load_tokenizer(tokenizer: str | Path | Any) -> tuple[Any, str]:
    """``(tokenizer, source)``: a ``transformers`` fast tokenizer with its special tokens set (the module docstring's
    rule) and ready for ``HookedTransformer.set_tokenizer``, and where it came from, in words.

    ``tokenizer`` is one of:

    * a ``tokenizer.json`` file (a Hugging Face ``tokenizers`` file; when it is named ``tokenizer.json`` and its
      folder holds ``tokenizer_config.json`` / ``special_tokens_map.json``, the folder is read, as below);
    * a folder holding ``tokenizer.json`` and optionally those config files (``save_pretrained``'s output, or a
      local model folder), read with ``PreTrainedTokenizerFast.from_pretrained``;
    * a Hugging Face tokenizer name (``"gpt2"``, ``"NeelNanda/gpt-neox-tokenizer-digits"``): a string that is no
      local path, read with ``transformers.AutoTokenizer.from_pretrained`` (needs the hub or its cache);
    * a ``tokenizers.Tokenizer`` (wrapped) or a ``transformers`` tokenizer (used as it is).

    A missing path raises :class:`CheckpointNotFoundError`, a file that is not a tokenizer :class:`CheckpointError`.
    """
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

    if isinstance(tokenizer, PreTrainedTokenizerBase):
        source = f"{type(tokenizer).__name__} {getattr(tokenizer, 'name_or_path', '') or 'object'}"
        return (_prepare(tokenizer) if isinstance(tokenizer, PreTrainedTokenizerFast) else tokenizer), source
    try:
        from tokenizers import Tokenizer
    except ImportError:  # pragma: no cover - tokenizers is a dependency
        Tokenizer = None
    if Tokenizer is not None and isinstance(tokenizer, Tokenizer):
        return _prepare(PreTrainedTokenizerFast(tokenizer_object=tokenizer)), "tokenizers.Tokenizer object"
    if not isinstance(tokenizer, (str, Path)) or not str(tokenizer):
        raise InputTypeError("tokenizer must be a tokenizer.json file, a folder holding one, a Hugging Face tokenizer "
                             f"name or a tokenizer object, got {type(tokenizer).__name__}")
    path = Path(tokenizer).expanduser()
    beside = path.parent
    if path.is_file() and path.name == TOKENIZER_NAME and any((beside / n).is_file() for n in TOKENIZER_CONFIG_NAMES):
        path = beside
    if path.is_dir():
        file = path / TOKENIZER_NAME
        if not file.is_file():
            raise CheckpointNotFoundError(
                f"tokenizer folder {path} holds no {TOKENIZER_NAME} (a Hugging Face tokenizers file; a slow "
                "tokenizer's vocabulary files are not read: save the fast tokenizer with save_pretrained)")
        _check_tokenizer_file(file)
        try:
            loaded = PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, TypeError, KeyError) as err:
            raise CheckpointError(f"tokenizer folder {path} could not be read by transformers: "
                                  f"{type(err).__name__}: {_one_line(err)}") from None
        return _prepare(loaded), str(path)
    if path.is_file():
        _check_tokenizer_file(path)
        return _prepare(PreTrainedTokenizerFast(tokenizer_file=str(path), name_or_path=str(path))), str(path)
    name = str(tokenizer)
    if isinstance(tokenizer, Path) or name.endswith(".json") or name.startswith(("/", ".", "~", "\\")):
        raise CheckpointNotFoundError(f"tokenizer not found: no file or folder {name}")
    return _load_hub_tokenizer(name)


def _load_hub_tokenizer(name: str) -> tuple[Any, str]:
    """``AutoTokenizer.from_pretrained(name)`` (the hub, or its local cache), errors in one line."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        loaded = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:  # no such repository, no network and not cached, no tokenizer in it
        raise CheckpointNotFoundError(
            f"tokenizer {name!r} is neither a local file or folder nor a Hugging Face tokenizer that could be loaded "
            f"({type(err).__name__}: {_one_line(err)})") from None
    if isinstance(loaded, PreTrainedTokenizerFast):
        loaded = _prepare(loaded)
    return loaded, f"{name} (Hugging Face hub)"


def _check_tokenizer_file(path: Path) -> None:
    """Refuse, naming the file, anything the ``tokenizers`` library cannot read as a tokenizer."""
    from tokenizers import Tokenizer

    try:
        text = path.read_text(encoding="utf-8")
        value = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"tokenizer file {path} is not JSON ({_one_line(err)}); a tokenizer file is a Hugging "
                              "Face tokenizers tokenizer.json") from None
    if not isinstance(value, dict) or "model" not in value:
        keys = sorted(value)[:6] if isinstance(value, dict) else type(value).__name__
        raise CheckpointError(f"{path} is not a Hugging Face tokenizers file (tokenizer.json): it has no 'model' "
                              f"(found {keys})")
    try:
        Tokenizer.from_str(text)
    except Exception as err:  # tokenizers raises a bare Exception for a malformed file
        raise CheckpointError(f"{path} is not a readable Hugging Face tokenizers file: {_one_line(err)}") from None


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 300 else text[:297] + "..."


def infer_special_tokens(tokenizer: Any) -> dict[str, str]:
    """Role (``bos_token``, ``eos_token``, ``pad_token``, ``unk_token``) -> token text, from the special added tokens
    of a ``tokenizers.Tokenizer`` or ``transformers`` fast tokenizer by :data:`SPECIAL_TOKEN_NAMES` (the lowest id
    wins), and unk also from the tokenization model's ``unk_token``. Only what the token texts say; the config files
    of a saved tokenizer take precedence (see the module docstring)."""
    if hasattr(tokenizer, "added_tokens_decoder"):  # transformers
        added = tokenizer.added_tokens_decoder
        backend = getattr(tokenizer, "backend_tokenizer", None)
    elif hasattr(tokenizer, "get_added_tokens_decoder"):  # tokenizers.Tokenizer
        added, backend = tokenizer.get_added_tokens_decoder(), tokenizer
    else:
        return {}
    roles: dict[str, str] = {}
    unk = getattr(getattr(backend, "model", None), "unk_token", None)
    if isinstance(unk, str) and unk and backend.token_to_id(unk) is not None:
        roles["unk_token"] = unk
    for _, token in sorted(added.items()):
        if not getattr(token, "special", False):
            continue
        content = str(getattr(token, "content", token))
        match = _WRAPPED_TOKEN.match(content)
        core = match.group(1).lower() if match else None
        for role, names in SPECIAL_TOKEN_NAMES.items():
            if core in names:
                roles.setdefault(role, content)
    return roles


def _prepare(tokenizer: Any) -> Any:
    """Fill the BOS / EOS / pad / unk roles the tokenizer's files left unset (:func:`infer_special_tokens`), and set
    a tokenizer with BOS to add it (``add_bos_token``, which ``HookedTransformer.set_tokenizer`` wants; else it
    reloads the tokenizer by name with that setting, which a tokenizer built from a file cannot be). Mutates and
    returns ``tokenizer``."""
    # set_tokenizer reads init_kwargs["name_or_path"] unconditionally; a tokenizer built in memory has none.
    tokenizer.init_kwargs.setdefault("name_or_path", getattr(tokenizer, "name_or_path", "") or "")
    for role, token in infer_special_tokens(tokenizer).items():
        if getattr(tokenizer, role, None) is None:
            setattr(tokenizer, role, token)
    if getattr(tokenizer, "bos_token", None) is not None and not getattr(tokenizer, "add_bos_token", False):
        tokenizer.add_bos_token = True
    return tokenizer


def tokenizer_size(tokenizer: Any) -> int:
    """One more than the largest token id the tokenizer can produce (its vocabulary and added tokens)."""
    vocab = tokenizer.get_vocab()
    return max(vocab.values()) + 1 if vocab else 0


def check_tokenizer_fits(tokenizer: Any, d_vocab: int, source: str | None, model: str) -> None:
    """Refuse (:class:`CheckpointError`) a tokenizer with token ids the model's embedding has no row for."""
    size = tokenizer_size(tokenizer)
    if size > d_vocab:
        raise CheckpointError(f"tokenizer {source or ''} has token ids up to {size - 1} but model {model} has d_vocab="
                              f"{d_vocab}: it is not this model's tokenizer")


def special_token_ids(tokenizer: Any) -> tuple[int, ...]:
    """Sorted ids of ``tokenizer``'s special tokens: a ``transformers`` tokenizer's ``all_special_ids`` and its added
    tokens marked special (a ``tokenizers.Tokenizer``'s: the latter); ``()`` for ``None``."""
    if tokenizer is None:
        return ()
    ids = set(getattr(tokenizer, "all_special_ids", None) or ())
    added = getattr(tokenizer, "added_tokens_decoder", None)
    if added is None and hasattr(tokenizer, "get_added_tokens_decoder"):
        added = tokenizer.get_added_tokens_decoder()
    ids.update(i for i, token in (added or {}).items() if getattr(token, "special", False))
    return tuple(sorted(i for i in ids if isinstance(i, int) and i >= 0))


def _token_id(tokenizer: Any, attribute: str) -> int | None:
    value = getattr(tokenizer, attribute, None) if tokenizer is not None else None
    return value if isinstance(value, int) else None
