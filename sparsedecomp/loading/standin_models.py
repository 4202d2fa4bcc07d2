"""Offline stand-in models: random weights in a real model's exact attention geometry, as a local model folder.

Research models (gpt2-small, Gemma 2 / Gemma 3) cannot be downloaded in tests or on an offline machine, but most of
what this package computes depends on a model only through its *shapes and wiring*: which hook holds what, how many
query and key/value heads a layer has, how wide they are, which layers attend locally, how scores are capped. A
stand-in keeps all of that from TransformerLens's own configuration of the named model
(``transformer_lens.loading_from_pretrained.get_pretrained_model_config``) and replaces the trained weights by
TransformerLens's random initialisation, so that code paths specific to an architecture -- grouped-query attention
above all -- are exercised exactly as on the real model.

What is kept and what may change (:func:`write_standin_model`):

* kept exactly: ``n_heads``, ``n_key_value_heads`` (grouped-query attention: query head ``h`` reads key/value head
  ``h // (n_heads // n_key_value_heads)``), ``d_head``, ``d_model``, the positional embedding (rotary dims and
  base), normalisation, attention scale and soft-caps, QK norms, the MLP's kind and activation, sliding-window size
  and the local / global pattern of the layers kept (``attn_types[:n_layers]``);
* cut: the number of layers (the first ``n_layers``); optionally the vocabulary (``d_vocab``, also the unembedding
  width), the MLP width (``d_mlp``) and the longest context (``n_ctx``, which only bounds the positions a forward
  pass may use; TransformerLens allocates ``n_ctx x n_ctx`` attention masks per layer, so the default is kept
  modest). None of these changes ``hook_z``'s shape or how it is computed from ``v`` and the pattern.

The folder is the package's local model folder (see :mod:`sparsedecomp.loading.models`): ``config.json`` with
``hooked_transformer_config`` (the configuration's JSON-able fields that differ from ``HookedTransformerConfig``'s
defaults) and ``processing_flags``, ``model.safetensors`` with the *unprocessed* state dict (for grouped-query
attention the un-expanded ``_W_K`` / ``_W_V`` of ``n_key_value_heads`` heads), and a word-level tokenizer
(``tokenizer.json`` + ``tokenizer_config.json``) covering every id: ``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>``
3 (Gemma's layout) and ``tok4`` ... ``tok{d_vocab-1}``, so that pages can show token text.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from .models import MODEL_CONFIG_NAME, MODEL_WEIGHTS_NAME, TOKENIZER_NAME, ProcessingFlags
from ..errors import InputError, InputTypeError

STANDIN_SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")
"""The stand-in tokenizer's special tokens, ids 0..3 (Gemma's order: pad, eos, bos, unk)."""
STANDIN_BOS_TOKEN_ID = STANDIN_SPECIAL_TOKENS.index("<bos>")
DEFAULT_STANDIN_N_CTX = 1024
"""The longest context of a stand-in unless asked otherwise (the model's own when shorter)."""

# Fields of the configuration that are not the model's description: where and how it runs, and numbers derived from
# the others (recomputed when the config is built again).
_NOT_RECORDED = {"device", "dtype", "n_devices", "n_params", "init_weights", "d_vocab_out", "tokenizer_name",
                 "from_checkpoint", "checkpoint_index", "checkpoint_value", "checkpoint_label_type", "load_in_4bit",
                 "quantization_method"}


def standin_config(model_name: str, *, n_layers: int = 2, d_vocab: int | None = None, d_mlp: int | None = None,
                   n_ctx: int | None = None, seed: int = 0, name: str | None = None
                   ) -> dict[str, Any]:
    """The ``HookedTransformerConfig`` keyword arguments (JSON-able) of the stand-in for ``model_name``: TransformerLens's
    configuration of that model, cut as the module docstring says. ``None`` keeps the model's own value, except for
    ``n_ctx``: ``None`` is the model's ``n_ctx`` up to :data:`DEFAULT_STANDIN_N_CTX`. ``name`` is
    the ``model_name`` recorded (default ``"<TransformerLens's model_name>-standin"``: random weights are not the
    model, and SAEs that record the real model's name are refused on it unless ``name`` says otherwise).

    Raises :class:`~sparsedecomp.errors.InputError` for sizes out of range and
    :class:`~sparsedecomp.loading.errors.ModelNotFoundError` for a name TransformerLens does not know."""
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.loading_from_pretrained import get_pretrained_model_config

    from .models import _check_model_name

    if not isinstance(model_name, str) or not model_name:
        raise InputTypeError(f"model_name must be a TransformerLens model name, got {model_name!r}")
    if name is not None and (not isinstance(name, str) or not name):
        raise InputTypeError(f"name must be a non-empty string, got {name!r}")
    _check_model_name(model_name)
    try:
        cfg = get_pretrained_model_config(model_name)
    except (OSError, ValueError) as err:  # a config read from the Hugging Face hub, offline and not cached
        raise InputError(f"TransformerLens could not give the configuration of {model_name!r} (models whose config it "
                         f"reads from the Hugging Face hub need the hub or its cache): {type(err).__name__}: "
                         f"{' '.join(str(err).split())[:300]}") from None
    full = cfg.to_dict()
    if n_ctx is None:
        n_ctx = min(full["n_ctx"], DEFAULT_STANDIN_N_CTX)
    for size, value, upper in (("n_layers", n_layers, full["n_layers"]), ("d_vocab", d_vocab, full["d_vocab"]),
                               ("d_mlp", d_mlp, None), ("n_ctx", n_ctx, full["n_ctx"])):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (upper is not None and value > upper):
            bound = f" and at most the model's {upper}" if upper is not None else ""
            raise InputError(f"{size} must be a positive int{bound}, got {value!r}")
    if d_vocab is not None and d_vocab <= len(STANDIN_SPECIAL_TOKENS):
        raise InputError(f"d_vocab must leave room for ordinary tokens after the {len(STANDIN_SPECIAL_TOKENS)} special "
                         f"ones, got {d_vocab}")
    if full.get("d_mlp") is None and d_mlp is not None:
        raise InputError(f"{model_name} has no MLP width to cut (attention-only), got d_mlp={d_mlp}")
    overrides: dict[str, Any] = {"n_layers": n_layers}
    if d_vocab is not None:
        overrides["d_vocab"] = d_vocab
    if d_mlp is not None:
        overrides["d_mlp"] = d_mlp
    if n_ctx is not None:
        overrides["n_ctx"] = n_ctx
    if full.get("attn_types") is not None:
        # attn_types lists one entry per layer: the kept layers keep their own local / global kind.
        overrides["attn_types"] = list(full["attn_types"])[:n_layers]
    defaults = {f.name: f.default for f in dataclasses.fields(HookedTransformerConfig)}
    kwargs: dict[str, Any] = {}
    for field, value in {**full, **overrides}.items():
        if field in _NOT_RECORDED or field not in defaults:
            continue
        value = _json_value(value)
        if field in overrides or value != defaults[field]:
            kwargs[field] = value
    kwargs["seed"] = seed
    kwargs["model_name"] = name or f"{full['model_name']}-standin"
    return kwargs


def _json_value(value: Any) -> Any:
    """Numpy / torch scalars as Python numbers, tuples as lists (TransformerLens computes e.g. ``attn_scale`` as a
    numpy float); anything JSON cannot hold raises naming it."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, tuple):
        value = list(value)
    json.dumps(value)  # fails loudly on anything else: better than a config that cannot be read back
    return value


def write_standin_model(model_name: str, folder: str | Path, *, n_layers: int = 2, d_vocab: int | None = None,
                        d_mlp: int | None = None, n_ctx: int | None = None, seed: int = 0,
                        processing_flags: ProcessingFlags | None = None, name: str | None = None,
                        bias_scale: float = 0.0, weights_dtype: torch.dtype = torch.float32) -> Path:
    """Write a random-weight stand-in of ``model_name`` (a TransformerLens name, e.g. ``gpt2-small``,
    ``gemma-2-2b``, ``gemma-3-270m``) as a local model folder ``folder`` (created; must not hold a model already),
    and return it. :func:`~sparsedecomp.loading.load_model` reads it back.

    Args:
        model_name: the model whose configuration is kept (see the module docstring for what is kept exactly).
            TransformerLens hard-codes some configurations (Gemma); others (GPT-2) it reads from the Hugging Face
            hub's ``config.json``, which offline must be in the hub cache.
        folder: where to write ``config.json``, ``model.safetensors``, ``tokenizer.json`` and
            ``tokenizer_config.json``.
        n_layers: keep the first ``n_layers`` layers (and their entries of ``attn_types``).
        d_vocab: a smaller vocabulary (> 4: the tokenizer's special tokens take ids 0..3); ``None`` keeps the
            model's (a Gemma vocabulary of 256k makes a 600 MB embedding at d_model 2304: cut it for tests).
        d_mlp: a smaller MLP width; ``None`` keeps the model's.
        n_ctx: the longest context; ``None``: the model's, at most :data:`DEFAULT_STANDIN_N_CTX` (Gemma's 8,192
            would allocate 64 MiB attention masks per layer).
        seed: seeds TransformerLens's initialisation: the same arguments write the same weights.
        processing_flags: recorded in ``config.json`` as how to load the folder (default: ``from_pretrained``'s,
            ``ProcessingFlags()``). The weights written are unprocessed either way.
        name: the ``model_name`` recorded (what ``LoadedModel.name`` is, and what SAEs' ``model_name`` is checked
            against); default ``"<model_name>-standin"`` (see :func:`standin_config`).
        bias_scale: the standard deviation of random biases (``b_Q``, ``b_K``, ``b_V``, ``b_O``, the MLP's and
            ``b_U``; TransformerLens initialises them to 0). Real Gemma models have no biases (TransformerLens keeps
            them at 0), GPT-2 has them: non-zero biases exercise what depends on them (``v``'s bias inside DFA by
            source, ``fold_value_biases`` shifting ``hook_z``), which zero biases would hide.
        weights_dtype: the dtype of the saved weights.
    """
    from safetensors.torch import save_file
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    flags = ProcessingFlags() if processing_flags is None else processing_flags
    if not isinstance(flags, ProcessingFlags):
        raise InputTypeError(f"processing_flags must be ProcessingFlags, got {type(flags).__name__}")
    if not isinstance(weights_dtype, torch.dtype) or not weights_dtype.is_floating_point:
        raise InputTypeError(f"weights_dtype must be a floating torch dtype, got {weights_dtype!r}")
    folder = Path(folder)
    if (folder / MODEL_CONFIG_NAME).exists() or (folder / MODEL_WEIGHTS_NAME).exists():
        raise InputError(f"{folder} already holds a model: write the stand-in into a new folder")
    kwargs = standin_config(model_name, n_layers=n_layers, d_vocab=d_vocab, d_mlp=d_mlp, n_ctx=n_ctx, seed=seed,
                            name=name)
    # init_weights on (TransformerLens turns it off for pretrained configs, leaving torch.empty's garbage)
    config = HookedTransformerConfig(**kwargs, init_weights=True, device="cpu", dtype=torch.float32)
    model = HookedTransformer(config)  # no tokenizer_name in kwargs: nothing is fetched from the hub
    if isinstance(bias_scale, bool) or not isinstance(bias_scale, (int, float)) or not bias_scale >= 0:
        raise InputError(f"bias_scale must be a non-negative number, got {bias_scale!r}")
    if bias_scale:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for key, parameter in model.named_parameters():
                if key.rsplit(".", 1)[-1].lstrip("_").startswith("b_"):  # b_Q, _b_K, _b_V, b_O, b_in, b_out, b_U
                    parameter.copy_(bias_scale * torch.randn(parameter.shape, generator=generator))
    # Exactly the keys the model folder loader expects (masks and IGNORE buffers are rebuilt from the config).
    state = {key: value.detach().to(weights_dtype).contiguous() for key, value in model.state_dict().items()
             if not key.endswith((".IGNORE", ".mask"))}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / MODEL_WEIGHTS_NAME))
    meta = {"hooked_transformer_config": kwargs, "processing_flags": flags.as_kwargs(),
            "standin_of": model_name, "weights": f"random (TransformerLens initialisation, seed {seed})"}
    (folder / MODEL_CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True), encoding="utf-8")
    write_standin_tokenizer(folder, config.d_vocab)
    return folder


def write_standin_tokenizer(folder: str | Path, d_vocab: int) -> Path:
    """Write a word-level tokenizer of exactly ``d_vocab`` ids into ``folder`` (``tokenizer.json`` and
    ``tokenizer_config.json``, as ``save_pretrained`` writes a fast tokenizer): the special tokens of
    :data:`STANDIN_SPECIAL_TOKENS` at ids 0..3, then ``tok4`` ... ``tok{d_vocab-1}``, split on whitespace. Returns
    the ``tokenizer.json`` path."""
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    if isinstance(d_vocab, bool) or not isinstance(d_vocab, int) or d_vocab <= len(STANDIN_SPECIAL_TOKENS):
        raise InputError(f"d_vocab must be an int above {len(STANDIN_SPECIAL_TOKENS)}, got {d_vocab!r}")
    vocab = {token: i for i, token in enumerate(STANDIN_SPECIAL_TOKENS)}
    vocab.update({f"tok{i}": i for i in range(len(STANDIN_SPECIAL_TOKENS), d_vocab)})
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = WhitespaceSplit()
    tokenizer.add_special_tokens([AddedToken(token, special=True) for token in STANDIN_SPECIAL_TOKENS])
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / TOKENIZER_NAME
    tokenizer.save(str(path))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
              "pad_token": "<pad>", "unk_token": "<unk>", "clean_up_tokenization_spaces": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return path
