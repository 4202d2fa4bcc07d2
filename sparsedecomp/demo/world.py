"""The demo world: a small trained transformer, its tokenizer, held-out tokens and SAEs on layer ``hook_z``.

Everything is read from the package's artifacts through the same loaders a user calls on real checkpoints:
the model is rebuilt from its recorded config and processed with its recorded TransformerLens flags; the per-head
SAEs are SAELens 6 folders as ``sparsedecomp train-heads`` writes them (BatchTopK, saved as JumpReLU; input scaling
folded in by SAELens's trainer); the concat SAE is a Kissane ``.pt`` + ``_cfg.json`` pair.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from .layout import (ARTIFACTS_DIR, CONCAT_DIR, HEADS_ROOT, HELDOUT_FILE, MODEL_DIR, REPORT_FILE, load_heldout_tokens,
                     tokenizer_path)
from ..errors import InputError


@dataclass(frozen=True, eq=False)
class DemoWorld:
    """A model, its SAEs and data, ready for decomposition and evaluation.

    Attributes:
        model: the ``HookedTransformer`` (fp32, processed with ``processing_flags``), with the tokenizer of its
            folder attached (``model.tokenizer``: a ``transformers`` fast tokenizer, BOS ``<|bos|>`` = 0).
        processing_flags: the :class:`~sparsedecomp.loading.ProcessingFlags` applied on load.
        tokenizer: the same tokenizer as a ``tokenizers.Tokenizer`` (``<|bos|>`` = 0 starts every context).
        heldout_tokens: ``(n_contexts, n_ctx)`` long, never seen in training.
        head_saes: :class:`~sparsedecomp.loading.HeadSAEs`.
        concat_sae: the concatenated-z :class:`~sparsedecomp.loading.SAE`.
        layer: the attention layer all SAEs read (``blocks.{layer}.attn.hook_z``).
        W_O: ``(n_heads, d_head, d_model)`` output projection of that layer (processed model).
        artifacts_dir: where everything was read from.
        report: the build report (``{}`` if absent).
    """

    model: Any
    processing_flags: Any
    tokenizer: Any
    heldout_tokens: Tensor
    head_saes: Any
    concat_sae: Any
    layer: int
    W_O: Tensor
    artifacts_dir: Path
    report: dict = field(default_factory=dict)

    @property
    def hook_name(self) -> str:
        return f"blocks.{self.layer}.attn.hook_z"

    def _relative(self, path: Any) -> str:
        """``path`` relative to the artifacts folder when it lies inside it (reports must not name one machine)."""
        try:
            return Path(path).relative_to(self.artifacts_dir).as_posix()
        except ValueError:
            return str(path)

    def describe(self) -> dict:
        """A JSON-ready description: model, flags, SAEs and how their scales were obtained."""
        cfg = self.model.cfg
        return {
            "model": {"name": cfg.model_name, "n_layers": cfg.n_layers, "d_model": cfg.d_model, "n_heads": cfg.n_heads,
                      "d_head": cfg.d_head, "d_mlp": cfg.d_mlp, "d_vocab": cfg.d_vocab, "n_ctx": cfg.n_ctx,
                      "normalization_type": cfg.normalization_type},
            "processing_flags": self.processing_flags.as_kwargs(),
            "hook_name": self.hook_name,
            "heldout_contexts": int(self.heldout_tokens.shape[0]),
            "head_saes": {str(h): {"d_sae": sae.d_sae, "firing_rule": sae.activation.describe(),
                                   "source": self._relative(sae.provenance.get("source", ""))}
                          for h, sae in self.head_saes.items()},
            "concat_sae": {"d_in": self.concat_sae.d_in, "d_sae": self.concat_sae.d_sae,
                           "source": self._relative(self.concat_sae.provenance.get("source", ""))},
        }


def head_sae_sources(artifacts_dir: Path = ARTIFACTS_DIR) -> dict[int, Path]:
    """Head -> SAELens folder (``saes/heads/head_<h>``) for every shipped head SAE."""
    from ..naming import head_name

    root = Path(artifacts_dir) / HEADS_ROOT
    sources = {}
    while (root / head_name(len(sources))).is_dir():
        sources[len(sources)] = root / head_name(len(sources))
    if not sources:
        raise FileNotFoundError(f"no per-head SAE folders under {root}; rebuild with "
                                "python -m sparsedecomp.demo.build --out DIR")
    return sources


def concat_sae_path(artifacts_dir: Path = ARTIFACTS_DIR) -> tuple[Path, str]:
    """``(folder, version)`` of the shipped Kissane pair."""
    folder = Path(artifacts_dir) / CONCAT_DIR
    cfgs = sorted(folder.glob("*_cfg.json"))
    if len(cfgs) != 1:
        raise FileNotFoundError(f"expected one *_cfg.json under {folder}, found {len(cfgs)}")
    return folder, cfgs[0].name[: -len("_cfg.json")]


def load_demo_world(artifacts_dir: str | Path | None = None) -> DemoWorld:
    """Load the demo world from ``artifacts_dir`` (default: the package's artifacts) through the users' loaders."""
    import warnings

    from tokenizers import Tokenizer

    from ..loading import ProcessingFlags, load_head_saes, load_sae
    from .model import load_model

    root = Path(artifacts_dir) if artifacts_dir is not None else ARTIFACTS_DIR
    if not (root / MODEL_DIR).is_dir():
        raise FileNotFoundError(f"no demo model under {root}; build it with "
                                "python -m sparsedecomp.demo.build --out DIR")
    tokenizer_file = tokenizer_path(root)
    # An older build keeps its tokenizer beside the model folder, not in it: attached all the same.
    model, flags = load_model(root / MODEL_DIR, tokenizer=None if tokenizer_file.parent == root / MODEL_DIR else
                              tokenizer_file)
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    heldout = load_heldout_tokens(root / HELDOUT_FILE)
    with warnings.catch_warnings():
        # SAELens asks to load the model with the SAEs' recorded processing: load_model above did.
        warnings.filterwarnings("ignore", message=r"\s*This SAE has non-empty model_from_pretrained_kwargs")
        head_saes = load_head_saes(head_sae_sources(root), n_heads=model.cfg.n_heads)
    layer = head_saes.layer
    report_path = root / REPORT_FILE
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    folder, version = concat_sae_path(root)
    concat = load_sae(folder, version=version)
    if concat.layer != layer or concat.hook_name != head_saes.hook_name:
        raise InputError(f"concat SAE reads {concat.hook_name} but head SAEs read {head_saes.hook_name}")
    return DemoWorld(
        model=model,
        processing_flags=ProcessingFlags(**flags),
        tokenizer=tokenizer,
        heldout_tokens=heldout,
        head_saes=head_saes,
        concat_sae=concat,
        layer=layer,
        W_O=model.W_O[layer].detach(),
        artifacts_dir=root,
        report=report,
    )


def demo_tokens(n_contexts: int | None = None, artifacts_dir: str | Path | None = None, *, split: str = "heldout"):
    """Held-out contexts of the demo world as a :class:`~sparsedecomp.loading.tokens.TokenSet` (BOS first);
    ``split="train"`` gives contexts of the training documents instead (about 19,000 of them: for feature dashboards
    over more tokens than the held-out split holds; never for evaluation, which must not see training text).

    Up to the shipped file's 374 contexts (``n_contexts=None``: all of them) they are that file's, the contexts the
    build report was measured on. More are packed the same way (the shipped tokenizer, ``<|endoftext|>`` between
    documents, BOS then ``n_ctx - 1`` tokens) from more of each held-out document: the first 40,000 characters
    instead of 8,000, evenly spaced over the stream. The held-out documents never reach training either way; the
    corpus is read from this interpreter's standard library (its fingerprint is recorded)."""
    from tokenizers import Tokenizer

    from ..loading.tokens import TokenSet
    from .corpus import build_corpus
    from .tokenizer import pack, special_ids

    root = Path(artifacts_dir) if artifacts_dir is not None else ARTIFACTS_DIR
    shipped = load_heldout_tokens(root / HELDOUT_FILE)
    tokenizer = Tokenizer.from_file(str(tokenizer_path(root)))
    bos = special_ids(tokenizer)[0]
    if n_contexts is not None and (isinstance(n_contexts, bool) or not isinstance(n_contexts, int) or n_contexts < 1):
        raise InputError(f"n_contexts must be a positive int or None, got {n_contexts!r}")
    if split not in ("heldout", "train"):
        raise InputError(f"split must be 'heldout' or 'train', got {split!r}")
    if split == "heldout" and (n_contexts is None or n_contexts <= len(shipped)):
        tokens = shipped if n_contexts is None else shipped[:n_contexts]
        return TokenSet(tokens, "demo held-out split (shipped file)", bos, False,
                        {"kind": "demo", "file": HELDOUT_FILE})
    config = json.loads((root / REPORT_FILE).read_text())["config"] if (root / REPORT_FILE).is_file() else {}
    corpus = build_corpus(code_char_budget=config.get("code_char_budget"),
                          prose_char_budget=config.get("prose_char_budget"),
                          heldout_every=config.get("heldout_every", 20), seed=config.get("seed", 0))
    if split == "train":
        tokens = pack(tokenizer, [d.text for d in corpus.train], shipped.shape[1], n_contexts)
        source, details = "demo training split", {"kind": "demo", "split": "train"}
    else:
        tokens = pack(tokenizer, corpus.heldout_texts(DEMO_EXTENDED_DOC_CHARS), shipped.shape[1], n_contexts)
        source, details = ("demo held-out split (packed from more of each document)",
                           {"kind": "demo", "doc_chars": DEMO_EXTENDED_DOC_CHARS})
    if n_contexts is not None and len(tokens) < n_contexts:
        raise InputError(f"the demo's {split} documents give {len(tokens)} contexts of {shipped.shape[1]} tokens, "
                         f"fewer than the {n_contexts} asked for")
    return TokenSet(tokens, source, bos, False, {**details, "corpus_fingerprint": corpus.fingerprint()})


DEMO_EXTENDED_DOC_CHARS = 40_000
