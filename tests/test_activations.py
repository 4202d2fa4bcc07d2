"""The activation stream: one pass, bounded batches, streaming equals one batch."""

import pytest
import torch

from sparsedecomp.activations import (LOSS_CHUNK_BYTES, ActivationStream, CollectZ, MeanAccumulator,
                                      bytes_per_context, check_tokens, contexts_per_batch, run_accumulators)
from sparsedecomp.errors import InputError, InputTypeError
from sparsedecomp.jsonio import to_jsonable


def test_streaming_equals_one_batch(tiny_model, tokens):
    many = run_accumulators(tiny_model, tokens, {"mean": MeanAccumulator(), "z": CollectZ()}, layer=1, batch_size=3)
    one = run_accumulators(tiny_model, tokens, {"mean": MeanAccumulator(), "z": CollectZ()}, layer=1, batch_size=11)
    torch.testing.assert_close(many["mean"], one["mean"])
    torch.testing.assert_close(many["z"], one["z"])
    # and both equal the model's own cache on all tokens at once
    _, cache = tiny_model.run_with_cache(tokens, names_filter="blocks.1.attn.hook_z")
    torch.testing.assert_close(one["z"], cache["blocks.1.attn.hook_z"].reshape(-1, 4, 8))
    torch.testing.assert_close(one["mean"], cache["blocks.1.attn.hook_z"].double().mean(dim=(0, 1)))


def test_stream_batches_cover_tokens_once_with_extras(tiny_model, tokens):
    stream = ActivationStream(tiny_model, tokens, layer=0, include=("resid_pre", "v", "pattern"), batch_size=4)
    seen = []
    for batch in stream:
        assert batch.v.shape == batch.z.shape
        assert batch.pattern.shape == (batch.n_contexts, 4, 16, 16)
        assert batch.resid_pre.shape == (batch.n_contexts, 16, 32)
        # z is the pattern-weighted sum of values (the identity DFA by source position rests on)
        torch.testing.assert_close(batch.z, torch.einsum("bhds,bshe->bdhe", batch.pattern, batch.v))
        seen.append(batch.tokens.cpu())
        assert batch.first_context == 4 * (len(seen) - 1)
    assert len(stream) == 3
    torch.testing.assert_close(torch.cat(seen), tokens)


def test_batch_size_follows_memory_budget(tiny_model):
    per_context = bytes_per_context(tiny_model.cfg, 16, ("resid_pre",))
    # a splice's logits take LOSS_CHUNK_BYTES of the budget, whatever the batch; the contexts share the rest
    assert contexts_per_batch(tiny_model, 16, ("resid_pre",),
                              memory_budget=LOSS_CHUNK_BYTES + 10 * per_context) == 10
    no_logits = bytes_per_context(tiny_model.cfg, 16, ("resid_pre",), with_logits=False)
    assert no_logits < per_context
    assert contexts_per_batch(tiny_model, 16, ("resid_pre",), memory_budget=10 * no_logits, with_logits=False) == 10
    assert contexts_per_batch(tiny_model, 16, memory_budget=1) == 1
    assert bytes_per_context(tiny_model.cfg, 16, ("pattern",)) > bytes_per_context(tiny_model.cfg, 16)


def test_bad_tokens_and_layers_are_refused(tiny_model, tokens):
    with pytest.raises(InputTypeError, match="integer"):
        check_tokens(tokens.float())
    with pytest.raises(InputError, match="shape"):
        check_tokens(tokens[:, :1])
    with pytest.raises(InputError, match="vocabulary"):
        ActivationStream(tiny_model, tokens + 50, layer=1)
    with pytest.raises(InputError, match="layer"):
        ActivationStream(tiny_model, tokens, layer=2)
    with pytest.raises(InputError, match="include"):
        ActivationStream(tiny_model, tokens, layer=1, include=("q",))
    with pytest.raises(InputError, match="did not collect"):
        next(iter(ActivationStream(tiny_model, tokens, layer=1))).require("pattern")


def test_to_jsonable_refuses_tensors_and_nulls_nan():
    assert to_jsonable({"a": (1.0, float("nan")), "b": None}) == {"a": [1.0, None], "b": None}
    with pytest.raises(InputTypeError, match=r"report\.x"):
        to_jsonable({"x": torch.zeros(2)})


def test_contexts_longer_than_the_model_are_refused(tiny_model):
    with pytest.raises(InputError, match="n_ctx=16"):
        ActivationStream(tiny_model, torch.zeros(2, 17, dtype=torch.long), layer=1)
