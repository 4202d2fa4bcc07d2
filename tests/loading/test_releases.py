"""SAELens releases of attention SAEs by reference (saelens://RELEASE/SAE_ID), read offline from a local hub cache
holding stand-ins in each release's real layout and format (release_standins.py), through SAELens's own conversion
functions; the processing each release's model was trained with; refusals of what the package cannot represent."""

from __future__ import annotations

import json

import pytest
import torch

from sparsedecomp.loading import (
    CONCATENATED,
    CheckpointNotFoundError,
    HubReference,
    ProcessingFlags,
    UnsupportedCheckpointError,
    load_sae,
    parse_reference,
)
from sparsedecomp.loading.releases import (
    RELEASE_MODEL_PROCESSING,
    cached_safetensors_shapes,
    read_safetensors_shapes,
)
from sparsedecomp.loading.saelens6 import UNREPRESENTABLE

from tests.loading.release_standins import (
    GS2_RELEASE,
    GS_RELEASE,
    KK_RELEASE,
    write_gemma_scope_2_270m_att,
    write_gemma_scope_2_270m_res,
    write_gemma_scope_2_270m_transcoder,
    write_gemma_scope_2b_att,
    write_kissane_gpt2,
)

DEFAULT = ProcessingFlags().as_kwargs()
UNPROCESSED = ProcessingFlags.none().as_kwargs()


def _lens(stand_in):
    """SAELens's own SAE for the stand-in, through ``SAE.from_pretrained_with_cfg_and_sparsity`` (offline)."""
    from sae_lens import SAE as LensSAE

    with cached_safetensors_shapes():
        sae, cfg, _ = LensSAE.from_pretrained_with_cfg_and_sparsity(stand_in.release, stand_in.sae_id)
    return sae, {**cfg, **cfg["metadata"]}  # SAELens 6 nests the model / hook facts under "metadata"


def _inputs(stand_in, n=64, seed=0):
    """float32 concatenated-z inputs scaled so that a good share of features fire (and some do not)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, stand_in.d_in, generator=g) * 1.5


def _lens_encode(lens_sae, stand_in, x):
    """SAELens's encode on the same vectors: a ``reshape_activations="hook_z"`` SAE takes ``(..., n_heads, d_head)``."""
    if lens_sae.cfg.reshape_activations == "hook_z":
        x = x.reshape(*x.shape[:-1], stand_in.n_heads, stand_in.d_head)
    with torch.no_grad():
        return lens_sae.encode(x)


# -- the stand-ins are what SAELens's own conversion functions read -------------------------------------------------
def test_kissane_standin_is_read_by_saelens_connor_rob_hook_z(tmp_path, hf_cache):
    s = write_kissane_gpt2(hf_cache, tmp_path / "kk")
    lens, cfg = _lens(s)
    assert type(lens).__name__ == "StandardSAE" and cfg["hook_name"] == "blocks.5.attn.hook_z"
    assert (lens.cfg.d_in, lens.cfg.d_sae) == (768, 256) and cfg["model_name"] == "gpt2-small"
    for name, value in s.weights.items():
        torch.testing.assert_close(getattr(lens, name).detach(), value, rtol=0, atol=0)


def test_gemma_scope_2_standin_is_read_by_saelens_gemma_3_offline(tmp_path, hf_cache):
    s = write_gemma_scope_2_270m_att(hf_cache, tmp_path / "gs2")
    assert s.files == tuple(f"attn_out/layer_12_width_16k_l0_small/{n}" for n in ("config.json", "params.safetensors"))
    lens, cfg = _lens(s)
    assert type(lens).__name__ == "JumpReLUSAE" and (lens.cfg.d_in, lens.cfg.d_sae) == (1024, 256)
    assert cfg["hook_name"] == "blocks.12.attn.hook_z" and cfg["model_name"] == "google/gemma-3-270m"
    assert cfg["hf_hook_name"] == "model.layers.12.self_attn.o_proj.input"
    assert "model_from_pretrained_kwargs" not in cfg
    for name, value in s.weights.items():
        torch.testing.assert_close(getattr(lens, name).detach(), value, rtol=0, atol=0)


def test_safetensors_shapes_come_from_the_cached_header_and_offline_misses_are_named(tmp_path, hf_cache):
    from sae_lens.loading import pretrained_sae_loaders as loaders

    s = write_gemma_scope_2_270m_att(hf_cache, tmp_path / "gs2", d_sae=96)
    params = s.files[1]
    original = loaders.get_safetensors_tensor_shapes
    with cached_safetensors_shapes():
        shapes = loaders.get_safetensors_tensor_shapes(s.repo_id, params)
        with pytest.raises(CheckpointNotFoundError, match=r"'attn_out/nothing/params\.safetensors'.*offline"):
            loaders.get_safetensors_tensor_shapes(s.repo_id, "attn_out/nothing/params.safetensors")
    assert loaders.get_safetensors_tensor_shapes is original  # restored
    assert shapes == {"w_enc": [1024, 96], "w_dec": [96, 1024], "b_enc": [96], "b_dec": [1024], "threshold": [96]}
    assert read_safetensors_shapes(str(hf_cache.cache / f"models--{s.repo_id.replace('/', '--')}" / "snapshots"
                                       / "0123456789abcdef0123456789abcdef01234567" / params)) == shapes


# -- the Kissane release through load_sae ----------------------------------------------------------------------------
def test_kissane_release_loads_by_reference_with_default_processing(tmp_path, hf_cache):
    s = write_kissane_gpt2(hf_cache, tmp_path / "kk", layer=5)
    sae = load_sae(s.reference)
    assert parse_reference(s.reference).repo == KK_RELEASE
    assert (sae.hook_name, sae.layer, sae.head) == ("blocks.5.attn.hook_z", 5, CONCATENATED)
    assert sae.model_name == "gpt2-small"
    assert (sae.d_in, sae.d_sae) == (768, 256)
    assert sae.provenance["format"] == "kissane" and sae.provenance["source"] == s.reference
    # Kissane et al. loaded gpt2-small with TransformerLens's default processing
    assert sae.model_from_pretrained_kwargs == DEFAULT
    assert "default processing" in sae.provenance["model_processing_note"]
    lens, _ = _lens(s)
    x = _inputs(s)
    ours, theirs = sae.encode(x), _lens_encode(lens, s, x)
    assert 0 < int((theirs > 0).sum()) < theirs.numel()
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(sae.decode(ours), lens.decode(theirs).reshape(ours.shape[0], -1))
    assert load_sae(sae.provenance["source"]).d_sae == 256  # the recorded source loads again
    # a concatenated-z release SAE is no per-head SAE: load_head_saes (the CLI's --head-saes) says so
    from sparsedecomp.errors import InputError
    from sparsedecomp.loading import load_head_saes

    with pytest.raises(InputError, match=r"head 0 \(saelens://gpt2-small-hook-z-kk/blocks\.5\.hook_z\) holds an SAE "
                                         r"for head 'concatenated'"):
        load_head_saes({0: s.reference})


def test_release_processing_is_recorded_only_for_releases_whose_facts_are_known():
    assert RELEASE_MODEL_PROCESSING["gemma_2"][0].as_kwargs() == UNPROCESSED
    assert RELEASE_MODEL_PROCESSING["gemma_3"][0].as_kwargs() == UNPROCESSED
    assert RELEASE_MODEL_PROCESSING["connor_rob_hook_z"][0].as_kwargs() == DEFAULT
    assert set(RELEASE_MODEL_PROCESSING) == {"gemma_2", "gemma_3", "connor_rob_hook_z"}


def test_a_saelens_format_release_recording_no_processing_records_none(tmp_path, make_sae, hf_cache):
    """An unknown release gets no guessed processing: a SAELens folder saved without metadata records none."""
    from sparsedecomp.loading import save_saelens6

    sae = make_sae(d_in=16, d_sae=32, head=CONCATENATED, layer=1)
    folder = save_saelens6(sae.with_hook("blocks.1.attn.hook_z"), tmp_path / "src")
    assert "model_from_pretrained_kwargs" not in json.loads((folder / "cfg.json").read_text())["metadata"]
    for name in ("cfg.json", "sae_weights.safetensors"):
        hf_cache("someone/attn-saes", f"blocks.1.attn.hook_z/{name}", folder / name)
    loaded = load_sae("saelens://someone/attn-saes/blocks.1.attn.hook_z")
    assert loaded.hook_name == "blocks.1.attn.hook_z"
    assert loaded.model_from_pretrained_kwargs is None and "model_processing_note" not in loaded.provenance


# -- refusals by name ------------------------------------------------------------------------------------------------
def test_a_transcoder_release_is_refused_by_name(tmp_path, hf_cache):
    s = write_gemma_scope_2_270m_transcoder(hf_cache, tmp_path / "tc")
    with pytest.raises(UnsupportedCheckpointError,
                       match=r"is a JumpReLU skip transcoder .*'jumprelu_skip_transcoder'.*blocks\.9\.hook_mlp_in -> "
                             r"blocks\.9\.hook_mlp_out"):
        load_sae(s.reference)


def test_a_transcoder_only_conversion_is_refused_before_anything_is_fetched(hf_cache):
    """gemma-scope-2b-pt-transcoders: nothing is in the (offline) cache, yet the refusal names what it is."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    sae_id = next(iter(get_pretrained_saes_directory()["gemma-scope-2b-pt-transcoders"].saes_map))
    with pytest.raises(UnsupportedCheckpointError, match=r"is a JumpReLU transcoder .*'gemma_2_transcoder'"):
        load_sae(f"saelens://gemma-scope-2b-pt-transcoders/{sae_id}")


def _saelens_folder(tmp_path, architecture):
    from sae_lens.registry import get_sae_class

    extra = {
        "abstopk": {"k": 4},
        "matching_pursuit": {"residual_threshold": 0.1},
        "transcoder": {"d_out": 8, "apply_b_dec_to_input": False},
        "skip_transcoder": {"d_out": 8, "apply_b_dec_to_input": False},
        "temporal": {"n_heads": 1, "bottleneck_factor": 1, "kval_topk": 4},
    }[architecture]
    sae_cls, cfg_cls = get_sae_class(architecture)
    lens = sae_cls(cfg_cls(d_in=8, d_sae=16, **extra))
    folder = tmp_path / architecture
    lens.save_model(str(folder))
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["metadata"].update({"model_name": "gelu-2l", "hook_name": "blocks.1.attn.hook_z", "hook_head_index": 0})
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("architecture", ["transcoder", "skip_transcoder", "temporal", "matching_pursuit", "abstopk"])
def test_architectures_the_package_cannot_represent_are_refused_by_name(tmp_path, hf_cache, architecture):
    folder = _saelens_folder(tmp_path, architecture)
    for name in ("cfg.json", "sae_weights.safetensors"):
        hf_cache("someone/odd-saes", f"{architecture}/{name}", folder / name)
    what = UNREPRESENTABLE[architecture].split(" (")[0]
    with pytest.raises(UnsupportedCheckpointError, match=rf"saelens://someone/odd-saes/{architecture} is {what} "
                                                         rf"\(.*architecture '{architecture}'"):
        load_sae(f"saelens://someone/odd-saes/{architecture}")


def test_gemma_scope_references_parse_to_their_releases():
    sae_id = "layer_5/width_16k/average_l0_30"
    assert parse_reference(f"saelens://{GS_RELEASE}/{sae_id}") == HubReference("saelens", GS_RELEASE, sae_id)
    assert parse_reference(f"saelens://{GS2_RELEASE}/layer_12_width_16k_l0_small").repo == GS2_RELEASE


def test_gemma_scope_2_residual_standin_is_a_resid_post_sae_for_saelens(tmp_path, hf_cache):
    s = write_gemma_scope_2_270m_res(hf_cache, tmp_path / "res")
    lens, cfg = _lens(s)
    assert cfg["hook_name"] == "blocks.12.hook_resid_post" and lens.cfg.d_in == 640


# -- docs/releases.md ------------------------------------------------------------------------------------------------
def _doc_commands():
    """Every ``sparsedecomp ...`` command of docs/releases.md's bash blocks, with the block's variables expanded
    (``$(printf ... $(seq 0 N))`` as bash would)."""
    import re
    import shlex
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "releases.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        env: dict[str, str] = {}
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            heads = re.match(r"^(\w+)=\$\(printf '([^']*)%d ' \$\(seq 0 (\d+)\)\)$", line)
            plain = re.match(r"^(\w+)=(\S+)$", line)
            if heads:
                env[heads.group(1)] = " ".join(heads.group(2) + f"{h}" for h in range(int(heads.group(3)) + 1))
            elif plain:
                env[plain.group(1)] = plain.group(2)
            elif line.startswith("sparsedecomp "):
                for name, value in sorted(env.items(), key=lambda kv: -len(kv[0])):
                    line = line.replace("$" + name, value)
                commands.append(shlex.split(line)[1:])
    return commands


def test_the_worked_examples_are_commands_the_cli_accepts():
    from sparsedecomp.cli import build_parser

    commands = _doc_commands()
    assert [c[0] for c in commands] == ["decompose", "evaluate", "dashboard"] * 3
    parser = build_parser()
    expected = {"gpt2-small": (12, "gpt2-small-hook-z-kk"), "gemma-2-2b": (8, "gemma-scope-2b-pt-att"),
                "google/gemma-3-270m": (4, "gemma-scope-2-270m-pt-att")}
    for args in commands:
        ns = parser.parse_args(args)
        n_heads, release = expected[ns.model]
        assert len(ns.head_saes) == n_heads and parse_reference(ns.concat_sae).repo == release
        assert all(s.endswith(f"hook_z.h{h}") for h, s in enumerate(ns.head_saes))


# -- Gemma Scope (JumpReLU) through load_sae -------------------------------------------------------------------------
def _check_release_sae(sae, s, conversion):
    assert (sae.hook_name, sae.layer, sae.head, sae.model_name) == (s.hook_name, s.layer, CONCATENATED, s.model_name)
    assert (sae.d_in, sae.d_sae) == (s.n_heads * s.d_head, s.d_sae)
    assert sae.activation.kind == "jumprelu"
    assert sae.provenance["source"] == s.reference and sae.provenance["conversion_func"] == conversion
    # Gemma Scope was trained on the unprocessed model; SAELens records nothing, the release's facts decide
    assert sae.model_from_pretrained_kwargs == UNPROCESSED
    assert "from_pretrained_no_processing" in sae.provenance["model_processing_note"]
    lens, cfg = _lens(s)
    x = _inputs(s)
    ours, theirs = sae.encode(x), _lens_encode(lens, s, x)
    fired = theirs > 0
    assert 0 < int(fired.sum()) < fired.numel()
    # the threshold decides for some features: positive pre-activations below it stay at zero
    pre = x @ s.weights["W_enc"] + s.weights["b_enc"]
    assert bool(((pre > 0) & ~fired).any())
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs)
    return lens, cfg


def test_gemma_scope_release_loads_by_reference_through_saelens_gemma_2(tmp_path, hf_cache):
    s = write_gemma_scope_2b_att(hf_cache, tmp_path / "gs", layer=5, l0=30)
    assert s.reference == "saelens://gemma-scope-2b-pt-att/layer_5/width_16k/average_l0_30"
    assert s.files == ("layer_5/width_16k/average_l0_30/params.npz",)
    sae = load_sae(s.reference)
    lens, cfg = _check_release_sae(sae, s, "gemma_2")
    assert sae.apply_b_dec_to_input is False
    # the stand-in is what SAELens's gemma_2 conversion reads: its own SAE holds the written weights
    assert type(lens).__name__ == "JumpReLUSAE" and cfg["architecture"] == "jumprelu"
    assert (lens.cfg.d_in, lens.cfg.d_sae) == (2048, 16384) == (s.d_in, s.d_sae)
    assert cfg["hook_name"] == "blocks.5.attn.hook_z" and cfg["model_name"] == "gemma-2-2b"
    assert cfg["apply_b_dec_to_input"] is False and "model_from_pretrained_kwargs" not in cfg
    for name, value in s.weights.items():
        torch.testing.assert_close(getattr(lens, name).detach(), value, rtol=0, atol=0)


def test_gemma_scope_2_release_loads_by_reference_offline_through_saelens_gemma_3(tmp_path, hf_cache):
    s = write_gemma_scope_2_270m_att(hf_cache, tmp_path / "gs2", layer=12, size="small")
    assert s.reference == "saelens://gemma-scope-2-270m-pt-att/layer_12_width_16k_l0_small"
    sae = load_sae(s.reference)
    _check_release_sae(sae, s, "gemma_3")
    assert sae.provenance["cfg"]["metadata"]["hf_hook_name"] == "model.layers.12.self_attn.o_proj.input"


def test_a_resid_post_release_sae_loads_but_is_refused_where_concatenated_z_is_required(tmp_path, hf_cache, make_sae):
    from sparsedecomp.errors import InputError
    from sparsedecomp.loading import HeadSAEs, check_compatible

    s = write_gemma_scope_2_270m_res(hf_cache, tmp_path / "res")
    res = load_sae(s.reference)
    assert (res.hook_name, res.head, res.d_in) == ("blocks.12.hook_resid_post", "none", 640)
    heads = HeadSAEs([make_sae(d_in=256, d_sae=32, head=h, layer=12, model_name="google/gemma-3-270m", seed=h)
                      for h in range(4)])
    with pytest.raises(InputError, match=r"hook: the concat SAE reads blocks\.12\.hook_resid_post"):
        check_compatible(res, heads)


def test_decompose_takes_a_gemma_scope_2_release_reference_offline(tmp_path, hf_cache, make_sae):
    """The CLI end to end in z: the release's concat SAE by reference, four per-head SAEs (one per query head of
    gemma-3-270m, d_head 256) as local SAELens folders."""
    from sparsedecomp.cli import main
    from sparsedecomp.decomposition_report import read_report
    from sparsedecomp.loading import save_saelens6

    s = write_gemma_scope_2_270m_att(hf_cache, tmp_path / "gs2", d_sae=48)
    heads = []
    for h in range(4):
        head = make_sae(d_in=256, d_sae=64, head=h, layer=12, model_name="google/gemma-3-270m", seed=40 + h)
        heads.append(str(save_saelens6(head, tmp_path / "heads" / f"blocks.12.attn.hook_z.h{h}")))
    out = tmp_path / "out"
    assert main(["decompose", "--concat-sae", s.reference, "--head-saes", *heads, "--head-index-map", "0,1,2,3",
                 "--out", str(out), "--no-progress"]) == 0
    report = read_report(out / "summary.json")
    assert (report.n_concat_features, report.n_heads, report.d_head) == (48, 4, 256)
    assert report.dictionary_sizes and report.spaces == ("z",)
