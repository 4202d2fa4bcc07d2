"""Hub references (hf://OWNER/REPO/VERSION, saelens://RELEASE/SAE_ID) through load_sae and load_head_saes, read
from a local stand-in of the Hugging Face cache with the hub forced offline."""

import pytest
import torch

from sparsedecomp.errors import InputError
from sparsedecomp.loading import (
    CONCATENATED,
    NO_HEAD,
    CheckpointNotFoundError,
    HubReference,
    load_head_saes,
    load_sae,
    parse_reference,
    save_kissane,
    save_saelens6,
)

SEED_REPO = "ckkissane/tinystories-1M-SAES"
SEED_VERSION = (
    "concat-z-gelu-21-l1-lr-sweep-3/"
    "gelu-2l_L1_Hcat_z_lr1.00e-03_l12.00e+00_ds16384_bs4096_dc1.00e-07_rie50000_nr4_v78"
)


@pytest.mark.parametrize(
    "text, expected",
    [
        (f"hf://{SEED_REPO}/{SEED_VERSION}", HubReference("hf", SEED_REPO, SEED_VERSION)),
        (f"hf://{SEED_REPO}/{SEED_VERSION}.pt", HubReference("hf", SEED_REPO, SEED_VERSION)),
        (f"hf://{SEED_REPO}/{SEED_VERSION}_cfg.json", HubReference("hf", SEED_REPO, SEED_VERSION)),
        (f"hf://{SEED_REPO}@abc123/v1", HubReference("hf", SEED_REPO, "v1", "abc123")),
        (f"hf://{SEED_REPO}", HubReference("hf", SEED_REPO, None)),
        ("saelens://gpt2-small-hook-z-kk/blocks.4.hook_z", HubReference("saelens", "gpt2-small-hook-z-kk", "blocks.4.hook_z")),
        # a release in SAELens's directory keeps every later segment in the sae id
        ("saelens://gemma-scope-2b-pt-att/layer_3/width_16k/average_l0_9",
         HubReference("saelens", "gemma-scope-2b-pt-att", "layer_3/width_16k/average_l0_9")),
        # a repo that is not a release: OWNER/REPO, then the sae id
        ("saelens://someone/head-saes/blocks.1.attn.hook_z.h5", HubReference("saelens", "someone/head-saes", "blocks.1.attn.hook_z.h5")),
    ],
)
def test_reference_syntax(text, expected):
    ref = parse_reference(text)
    assert ref == expected
    assert parse_reference(str(ref)) == ref


@pytest.mark.parametrize(
    "text, message",
    [
        ("hf://ckkissane", r"expected hf://OWNER/REPO\[@REVISION\]/VERSION"),
        ("hf://ckkissane/repo/../v1", r"expected hf://OWNER/REPO\[@REVISION\]/VERSION"),
        ("hf://ckkissane/repo@/v1", "empty repository name or revision"),
        ("saelens://gpt2-small-hook-z-kk", r"expected saelens://RELEASE/SAE_ID"),
        ("s3://bucket/sae", r"unknown reference scheme 's3://'.*hf://OWNER/REPO.*saelens://RELEASE/SAE_ID"),
    ],
)
def test_malformed_references_name_the_syntax(text, message):
    with pytest.raises(InputError, match=message):
        load_sae(text)


@pytest.fixture
def seed_run_in_cache(tmp_path, make_sae, hf_cache):
    original = make_sae(d_in=32, d_sae=48, head=CONCATENATED, layer=1, seed=3)
    pt, cfg = save_kissane(original, tmp_path / "src", SEED_VERSION)
    hf_cache(SEED_REPO, f"{SEED_VERSION}.pt", pt)
    hf_cache(SEED_REPO, f"{SEED_VERSION}_cfg.json", cfg)
    return original


def test_hf_reference_loads_the_kissane_pair_and_round_trips(seed_run_in_cache):
    reference = f"hf://{SEED_REPO}/{SEED_VERSION}"
    sae = load_sae(reference)
    assert sae.provenance["format"] == "kissane" and sae.provenance["repo_id"] == SEED_REPO
    assert sae.provenance["source"] == reference
    torch.testing.assert_close(sae.W_dec, seed_run_in_cache.W_dec)
    again = load_sae(sae.provenance["source"])  # the recorded source is itself a loadable reference
    torch.testing.assert_close(again.W_enc, sae.W_enc)
    # the CLI's --concat-sae hf://OWNER/REPO --concat-version VERSION form
    completed = load_sae(f"hf://{SEED_REPO}", version=SEED_VERSION)
    torch.testing.assert_close(completed.b_dec, seed_run_in_cache.b_dec)
    with pytest.raises(InputError, match="already names a version"):
        load_sae(reference, version="v2")
    with pytest.raises(InputError, match="names no checkpoint"):
        load_sae(f"hf://{SEED_REPO}")
    with pytest.raises(CheckpointNotFoundError, match=r"could not fetch 'nothing_here_v1\.pt'"):
        load_sae(f"hf://{SEED_REPO}/nothing_here_v1")
    with pytest.raises(InputError, match="takes no repo_id="):
        load_sae(reference, repo_id=SEED_REPO)


def test_saelens_release_references(tmp_path, make_sae, hf_cache):
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    # a Kissane-format release (read by our weights_only loader)
    kk = directory["gpt2-small-hook-z-kk"]
    version = kk.saes_map["blocks.0.hook_z"][: -len(".pt")]
    concat = make_sae(d_in=32, d_sae=40, head=CONCATENATED, layer=0, model_name="gpt2-small", seed=4)
    pt, cfg = save_kissane(concat, tmp_path / "kk", version)
    hf_cache(kk.repo_id, f"{version}.pt", pt)
    hf_cache(kk.repo_id, f"{version}_cfg.json", cfg)
    sae = load_sae("saelens://gpt2-small-hook-z-kk/blocks.0.hook_z")
    assert sae.provenance["source"] == "saelens://gpt2-small-hook-z-kk/blocks.0.hook_z"
    assert sae.provenance["release"] == "gpt2-small-hook-z-kk" and sae.head == CONCATENATED
    torch.testing.assert_close(sae.W_dec, concat.W_dec)

    # a release in SAELens's own format, loaded by sae_lens from the cache
    att = directory["pythia-70m-deduped-att-sm"]
    resid = make_sae(d_in=16, d_sae=32, head=NO_HEAD, layer=0, hook_name="blocks.0.hook_attn_out",
                     model_name="pythia-70m-deduped", seed=6)
    folder = save_saelens6(resid, tmp_path / "att" / att.saes_map["blocks.0.hook_attn_out"])
    for name in ("cfg.json", "sae_weights.safetensors"):
        hf_cache(att.repo_id, f"{att.saes_map['blocks.0.hook_attn_out']}/{name}", folder / name)
    sae = load_sae("saelens://pythia-70m-deduped-att-sm/blocks.0.hook_attn_out")
    assert sae.provenance["format"] == "saelens6" and sae.hook_name == "blocks.0.hook_attn_out"
    x = torch.randn(5, 16)
    torch.testing.assert_close(sae.forward(x), resid.forward(x))
    with pytest.raises(InputError, match="version= does not apply"):
        load_sae("saelens://pythia-70m-deduped-att-sm/blocks.0.hook_attn_out", version="v1")


def test_load_head_saes_takes_references_beside_local_paths(tmp_path, make_sae, hf_cache):
    """What the CLI does with --head-saes: each string goes straight to load_head_saes."""
    originals = {h: make_sae(head=h, seed=20 + h) for h in range(3)}
    for h in (0, 1):
        folder = save_saelens6(originals[h], tmp_path / "src" / f"blocks.1.attn.hook_z.h{h}")
        for name in ("cfg.json", "sae_weights.safetensors"):
            hf_cache("someone/head-saes", f"blocks.1.attn.hook_z.h{h}/{name}", folder / name)
    save_saelens6(originals[2], tmp_path / "local" / "h2")
    sources = {
        0: "saelens://someone/head-saes/blocks.1.attn.hook_z.h0",
        1: "saelens://someone/head-saes/blocks.1.attn.hook_z.h1",
        2: "h2",  # relative: taken under root; references are not
    }
    heads = load_head_saes(sources, root=tmp_path / "local", n_heads=3)
    assert heads.heads == (0, 1, 2)
    assert heads[0].provenance["source"] == sources[0]
    for h in range(3):
        torch.testing.assert_close(heads[h].W_enc, originals[h].W_enc)
    with pytest.raises(InputError, match=r"source given for head 1 \(saelens://someone/head-saes/blocks.1.attn.hook_z.h0\)"):
        load_head_saes({1: sources[0]})
