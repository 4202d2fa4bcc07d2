"""A byte-level BPE tokenizer trained with Hugging Face ``tokenizers``, and packing text into model contexts.

Special tokens: ``<|bos|>`` (id 0) starts every context, as gelu-2l's contexts start with BOS;
``<|endoftext|>`` (id 1) separates documents. Digits are split one by one (as in gelu-2l's
``gpt-neox-tokenizer-digits``).

The tokenizer is saved into the model folder (:func:`save_tokenizer`) as ``tokenizer.json`` and a
``tokenizer_config.json`` naming BOS and EOS, the files ``transformers`` reads, so that loading the model folder
(``sparsedecomp.loading.load_model``) attaches it to the model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import Tensor
from ..errors import InputError

BOS = "<|bos|>"
EOT = "<|endoftext|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Train a byte-level BPE on ``texts``; deterministic for the same input."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


TOKENIZER_CONFIG = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": BOS,
    "eos_token": EOT,
    "clean_up_tokenization_spaces": False,
}
"""``tokenizer_config.json``: BOS and EOS by name, and decoding that keeps the text exactly (no space clean-up)."""


def save_tokenizer(tokenizer, directory: Path) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` (:data:`TOKENIZER_CONFIG`) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    special_ids(tokenizer)  # both special tokens are there
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")


def special_ids(tokenizer) -> tuple[int, int]:
    """``(bos_id, eot_id)``."""
    bos, eot = tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOT)
    if bos is None or eot is None:
        raise InputError(f"tokenizer lacks the special tokens {BOS!r} / {EOT!r}")
    return bos, eot


def pack(tokenizer, texts: Sequence[str], n_ctx: int, max_sequences: int | None = None) -> Tensor:
    """Encode ``texts``, join them with ``<|endoftext|>`` and cut the stream into ``(n_seq, n_ctx)`` contexts,
    each ``<|bos|>`` followed by ``n_ctx - 1`` stream tokens (the last partial context is dropped).

    With ``max_sequences``, that many contexts evenly spaced over the whole stream are kept (not the first ones,
    which would all come from the first few documents)."""
    bos, eot = special_ids(tokenizer)
    stream: list[int] = []
    for enc in tokenizer.encode_batch(list(texts), add_special_tokens=False):
        stream.extend(enc.ids)
        stream.append(eot)
    body = n_ctx - 1
    n_seq = len(stream) // body
    if n_seq == 0:
        raise InputError(f"text too short for one context of {n_ctx} tokens")
    flat = torch.tensor(stream[: n_seq * body], dtype=torch.long).view(n_seq, body)
    if max_sequences is not None and n_seq > max_sequences:
        flat = flat[torch.linspace(0, n_seq - 1, max_sequences).round().long()]
        n_seq = max_sequences
    return torch.cat([torch.full((n_seq, 1), bos, dtype=torch.long), flat], dim=1)
