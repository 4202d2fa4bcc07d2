"""The real hub paths (deselected by default; run with ``pytest -m network`` where the Hugging Face hub is
reachable). Facts checked are those of formats.md."""

import pytest
import torch

from sparsedecomp.loading import CONCATENATED, load_model, load_sae
from sparsedecomp.loading.files import canonical_hook

pytestmark = pytest.mark.network


def _hub_reachable() -> str | None:
    """``None`` when the Hugging Face hub answers, else why not (offline mode, no route, timeout)."""
    import os
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return "HF_HUB_OFFLINE is set"
    try:
        socket.create_connection(("huggingface.co", 443), timeout=5).close()
    except OSError as err:
        return f"huggingface.co:443 is not reachable ({err})"
    return None


@pytest.fixture(autouse=True, scope="module")
def _needs_the_hub():
    # A visible skip, with the reason: these tests are about the real hub and say nothing without it.
    reason = _hub_reachable()
    if reason is not None:
        pytest.skip(f"needs the Hugging Face hub: {reason}")

SEED_RUN = (
    "hf://ckkissane/tinystories-1M-SAES/concat-z-gelu-21-l1-lr-sweep-3/"
    "gelu-2l_L1_Hcat_z_lr1.00e-03_l12.00e+00_ds16384_bs4096_dc1.00e-07_rie50000_nr4_v78"
)


def test_gelu_2l_from_the_hub():
    loaded = load_model("gelu-2l")
    cfg = loaded.model.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp, cfg.d_vocab) == (2, 512, 8, 64, 2048, 48262)
    assert loaded.model.W_O.shape == (2, 8, 64, 512)
    with torch.no_grad():
        loss = loaded.model(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]), return_type="loss")
    assert torch.isfinite(loss)


def test_the_seed_kissane_run():
    sae = load_sae(SEED_RUN)
    assert (sae.d_in, sae.d_sae, sae.layer, sae.head) == (512, 16384, 1, CONCATENATED)
    assert sae.hook_name == "blocks.1.attn.hook_z" and sae.model_name == "gelu-2l"
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(16384), atol=1e-3, rtol=0)  # unit decoder rows
    assert load_sae(sae.provenance["source"]).d_sae == 16384


def test_a_saelens_release():
    sae = load_sae("saelens://gpt2-small-hook-z-kk/blocks.4.hook_z")
    assert (sae.d_in, sae.layer, sae.head, sae.model_name) == (768, 4, CONCATENATED, "gpt2-small")
    assert sae.provenance["release"] == "gpt2-small-hook-z-kk"
    assert canonical_hook(sae.hook_name) == "blocks.4.attn.hook_z"  # act_name of the release's Kissane cfg
