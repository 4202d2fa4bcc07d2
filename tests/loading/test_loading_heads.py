"""load_sae format detection, load_head_saes agreement checks, missing heads and the block dictionary."""

import json
import warnings

import pytest
import torch

from sparsedecomp import BlockDictionary
from sparsedecomp.errors import InputError, InputTypeError
from sparsedecomp.loading import (
    CONCATENATED,
    SAE,
    CheckpointError,
    CheckpointNotFoundError,
    HeadSAEs,
    InputScaleWarning,
    MissingHeadsWarning,
    check_compatible,
    detect_format,
    load_head_saes,
    load_sae,
    save_kissane,
    save_legacy_saelens,
    save_saelens6,
)

RUNS = {0: "rovi1lwe", 1: "p7113j0v", 2: "rjc53kjg", 3: "hibm6x1l"}


@pytest.fixture
def seed_like_root(tmp_path, make_sae):
    """checkpoints/<wandb_id>/final_<n>/<sae_name>/ for four heads, as in the seed's ckpt_subfolders."""
    root = tmp_path / "checkpoints"
    saes = {}
    for head, run in RUNS.items():
        saes[head] = make_sae(head=head, d_sae=16 + 8 * head, seed=head)
        save_legacy_saelens(saes[head], root, run, 983044096, cfg_extra={"normalize_activations": True})
    return root, saes


def test_seed_mapping_loads_in_head_order_and_builds_the_dictionary(seed_like_root):
    root, saes = seed_like_root
    shuffled = {h: RUNS[h] for h in (2, 0, 3, 1)}
    heads = load_head_saes(shuffled, root=root, n_heads=4)
    assert heads.heads == (0, 1, 2, 3) and heads.d_head == 8 and heads.layer == 1
    assert heads.d_sae == {0: 16, 1: 24, 2: 32, 3: 40}
    assert heads.heads_needing_input_scale == (0, 1, 2, 3)
    with pytest.warns(InputScaleWarning, match=r"heads \[0, 1, 2, 3\]"):
        dictionary = heads.dictionary(normalize=True)
    reference = BlockDictionary.from_blocks([saes[h].W_dec for h in range(4)], normalize=True)
    torch.testing.assert_close(dictionary.atoms, reference.atoms)
    torch.testing.assert_close(dictionary.scales, reference.scales)
    assert dictionary.n_atoms == 16 + 24 + 32 + 40 and dictionary.dim == 32


def test_list_sources_take_heads_from_the_files(seed_like_root):
    root, _ = seed_like_root
    heads = load_head_saes([root / RUNS[3], root / RUNS[1]])
    assert heads.heads == (1, 3)
    assert heads.missing_heads(4) == [0, 2]
    with pytest.raises(ValueError, match=r"missing heads \[0, 2\]"):
        heads.dictionary()


def test_missing_heads_raise_or_warn(seed_like_root):
    root, _ = seed_like_root
    partial = {0: RUNS[0], 2: RUNS[2]}
    with pytest.raises(ValueError, match=r"no SAE for heads \[1, 3, 4, 5, 6, 7\]"):
        load_head_saes(partial, root=root, n_heads=8)
    with pytest.warns(MissingHeadsWarning, match=r"no SAE for heads \[1, 3\]"):
        heads = load_head_saes(partial, root=root, n_heads=4, on_missing="warn")
    assert heads.heads == (0, 2)
    with pytest.raises(ValueError, match="only n_heads=2"):
        heads.missing_heads(2)


def test_mapping_key_must_match_the_file(seed_like_root):
    root, _ = seed_like_root
    with pytest.raises(ValueError, match=r"source given for head 1 .*rovi1lwe.* holds an SAE for head 0"):
        load_head_saes({1: RUNS[0]}, root=root)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"layer": 0}, "has layer=0 but head 0"),
        ({"model_name": "gelu-1l"}, "has model_name='gelu-1l'"),
        ({"hook_name": "blocks.1.attn.hook_q"}, "has hook_name='blocks.1.attn.hook_q'"),
        ({"d_in": 16}, "has d_in=16"),
    ],
)
def test_disagreeing_heads_are_named(make_sae, change, message):
    good = make_sae(head=0)
    bad = make_sae(head=1, **change)
    with pytest.raises(ValueError, match=message):
        HeadSAEs((good, bad))


def test_duplicate_and_concatenated_saes_are_refused(make_sae):
    with pytest.raises(ValueError, match="two SAEs read head 0"):
        HeadSAEs((make_sae(head=0), make_sae(head=0, seed=1)))
    with pytest.raises(ValueError, match="not a single head"):
        HeadSAEs((make_sae(d_in=32, head=CONCATENATED),))
    heads = HeadSAEs((make_sae(head=1), make_sae(head=0)))
    assert [s.head for s in heads] == [0, 1] and heads[1].head == 1
    with pytest.raises(KeyError, match="no SAE for head 5"):
        heads[5]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # SAEs that need no input scale: no warning
        assert heads.dictionary(normalize=False).n_atoms == 48


def test_detect_format_and_errors(tmp_path, make_sae):
    save_kissane(make_sae(d_in=32, head=CONCATENATED), tmp_path / "k", "v1")
    save_saelens6(make_sae(), tmp_path / "s6")
    legacy = save_legacy_saelens(make_sae(), tmp_path / "leg", "run", 10)
    assert detect_format(tmp_path / "k") == "kissane"
    assert detect_format(tmp_path / "k" / "v1_cfg.json") == "kissane"
    assert detect_format(tmp_path / "s6") == "saelens6"
    assert detect_format(tmp_path / "s6" / "cfg.json") == "saelens6"
    assert detect_format(legacy) == "saelens_legacy"
    assert load_sae(tmp_path / "s6" / "cfg.json").provenance["format"] == "saelens6"
    with pytest.raises(CheckpointNotFoundError):
        load_sae(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint recognised at .*empty"):
        load_sae(tmp_path / "empty")
    with pytest.raises(ValueError, match="format must be one of"):
        load_sae(tmp_path / "s6", format="hdf5")
    with pytest.raises(CheckpointError, match="holds no Kissane checkpoint v2"):
        load_sae(tmp_path / "k", version="v2")
    with pytest.raises(ValueError, match="version= only applies"):
        load_sae(tmp_path / "s6", format="saelens6", version="v1")
    cfg = json.loads((tmp_path / "s6" / "cfg.json").read_text())
    for key in ("architecture", "metadata"):
        cfg.pop(key)
    (tmp_path / "s6" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"cfg\.json matches no known format"):
        load_sae(tmp_path / "s6")
    # a forced format that does not match what is on disk is an error naming the file
    with pytest.raises(CheckpointError, match=r"cfg\.json is not a SAELens 6 config"):
        load_sae(legacy, format="saelens6")


def test_reconstruct_concatenated_runs_each_head_on_its_own_block(make_sae):
    saes = [make_sae(head=h, d_sae=12 + 4 * h, seed=10 + h) for h in range(3)]
    heads = HeadSAEs(tuple(saes))
    z = torch.randn(5, 3 * 8, generator=torch.Generator().manual_seed(0))
    out = heads.reconstruct_concatenated(z)
    assert out.shape == z.shape
    for h, sae in enumerate(saes):
        block = z[:, 8 * h : 8 * (h + 1)]
        torch.testing.assert_close(out[:, 8 * h : 8 * (h + 1)], sae.decode(sae.encode(block)))
    with pytest.raises(ValueError, match=r"shape \(n, n_heads \* d_head\) = \(n, 24\), got \(5, 16\)"):
        heads.reconstruct_concatenated(z[:, :16])
    with pytest.raises(ValueError, match=r"heads 0..2; have heads \[0, 2\]"):
        HeadSAEs((saes[0], saes[2])).reconstruct_concatenated(z)


# -- check_compatible ---------------------------------------------------------------------------------------------
@pytest.fixture
def four_heads(make_sae):
    return HeadSAEs(tuple(make_sae(head=h, seed=h) for h in range(4)))


def test_check_compatible_returns_the_layout(make_sae, four_heads):
    concat = make_sae(d_in=32, d_sae=40, head=CONCATENATED)
    assert check_compatible(concat, four_heads) == (4, 8)
    # TransformerLens aliases are the same hook / model
    alias = make_sae(d_in=32, d_sae=40, head=CONCATENATED, hook_name="blocks.1.hook_z",
                     model_name="NeelNanda/GELU_2L512W_C4_Code")
    assert check_compatible(alias, four_heads) == (4, 8)
    # a concat SAE that does not record its hook (a bare SAELens SAE) is compared on width only
    bare = SAE(**{f: getattr(concat, f) for f in ("W_enc", "b_enc", "W_dec", "b_dec", "apply_b_dec_to_input")},
               hook_name=None, layer=None, head=None, model_name=None)
    assert check_compatible(bare, four_heads) == (4, 8)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"d_in": 24}, r"width: the concat SAE reads d_in=24 but 4 heads of d_head=8 span n_heads \* d_head = 32"),
        ({"layer": 0}, r"layer: the concat SAE reads layer 0, the per-head SAEs layer 1"),
        ({"hook_name": "blocks.1.attn.hook_v"}, r"hook: the concat SAE reads blocks.1.attn.hook_v, the per-head SAEs blocks.1.attn.hook_z"),
        ({"model_name": "gelu-1l"}, r"model: the concat SAE was trained on 'gelu-1l', the per-head SAEs on 'gelu-2l'"),
    ],
)
def test_check_compatible_names_what_differs(make_sae, four_heads, change, message):
    fields = {"d_in": 32, "d_sae": 40, "head": CONCATENATED, **change}
    if "layer" in change:
        fields["hook_name"] = f"blocks.{change['layer']}.attn.hook_z"
    with pytest.raises(InputError, match=r"do not match: .*" + message):
        check_compatible(make_sae(**fields), four_heads)


def test_check_compatible_lists_every_difference_and_refuses_bad_inputs(make_sae, four_heads):
    wrong = make_sae(d_in=24, d_sae=40, head=CONCATENATED, layer=0, model_name="gelu-1l")
    with pytest.raises(InputError, match=r"width: .*; layer: .*; model: "):
        check_compatible(wrong, four_heads)
    with pytest.raises(InputError, match=r"reads head 2 only, not all heads' z"):
        check_compatible(make_sae(d_in=32, head=2), four_heads)
    gap = HeadSAEs(tuple(make_sae(head=h, seed=h) for h in (0, 1, 3)))
    with pytest.raises(InputError, match=r"must cover heads 0..3 .*missing heads \[2\]"):
        check_compatible(make_sae(d_in=32, head=CONCATENATED), gap)
    with pytest.raises(InputTypeError, match="head_saes must be HeadSAEs, got list"):
        check_compatible(make_sae(d_in=32, head=CONCATENATED), list(four_heads))
    with pytest.raises(InputTypeError, match="concat_sae must be a sparsedecomp SAE, got dict"):
        check_compatible({}, four_heads)
