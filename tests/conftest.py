"""Shared test configuration.

Tests marked ``gpu`` need CUDA. The default run (``make test``, CI) deselects them with ``-m``; a plain
``pytest`` on a machine without CUDA skips them with the reason instead of failing deep inside torch.
"""

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_model():
    """A tiny random 2-layer HookedTransformer: 4 heads, d_head 8, d_model 32, contexts of 16, vocabulary 50."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(0)
    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_ctx=16, d_head=8, n_heads=4, d_vocab=50, act_fn="gelu",
                                  d_mlp=64, normalization_type="LN")
    return HookedTransformer(cfg).eval()


@pytest.fixture(scope="session")
def tokens():
    """11 random contexts of 16 tokens for `tiny_model`."""
    return torch.randint(0, 50, (11, 16), generator=torch.Generator().manual_seed(1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    no_cuda = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(no_cuda)
