"""The checks every loader shares (one helper each in loading/files.py): dtype names, the sparsity file, the
layer / head derivation from a config, and the SAE folder's file names."""

import json

import pytest
import torch
from safetensors.torch import save_file

from sparsedecomp.loading import (
    CONCATENATED,
    NO_HEAD,
    CheckpointError,
    load_kissane,
    load_legacy_saelens,
    load_saelens6,
    save_kissane,
    save_legacy_saelens,
    save_saelens6,
)
from sparsedecomp.loading.files import DTYPE_NAMES, canonical_hook, resolve_head, resolve_layer


@pytest.fixture
def folders(tmp_path, make_sae):
    """The same SAE as a legacy SAELens folder and as a SAELens 6 folder."""
    sae = make_sae(head=1)
    return {
        "legacy": (save_legacy_saelens(sae, tmp_path / "legacy", "run", 10), load_legacy_saelens),
        "saelens6": (save_saelens6(sae, tmp_path / "s6"), load_saelens6),
    }


@pytest.mark.parametrize("fmt", ["legacy", "saelens6"])
@pytest.mark.parametrize(
    "sparsity, message",
    [
        (torch.zeros(24, dtype=torch.int32), r"must hold a floating 'sparsity' tensor of shape \(24,\), got torch.int32"),
        (torch.zeros(5), r"must hold a floating 'sparsity' tensor of shape \(24,\), got torch.float32 \(5,\)"),
        (torch.full((24,), float("nan")), r"sparsity contains NaN or Inf"),
    ],
)
def test_both_saelens_loaders_check_the_sparsity_file_alike(folders, fmt, sparsity, message):
    folder, load = folders[fmt]
    save_file({"sparsity": sparsity}, str(folder / "sparsity.safetensors"))
    with pytest.raises(CheckpointError, match=r"sparsity\.safetensors.*" + message):
        load(folder)


@pytest.mark.parametrize("fmt", ["legacy", "saelens6"])
def test_both_saelens_loaders_read_both_dtype_spellings(folders, fmt):
    folder, load = folders[fmt]
    cfg_path = folder / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    for name in ("float32", "torch.float32"):  # SAELens 6 writes the first, 1.x/2.x the second
        cfg["dtype"] = name
        cfg_path.write_text(json.dumps(cfg))
        assert load(folder).dtype == torch.float32
    cfg["dtype"] = "fp32"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"cfg\.json: dtype must be one of \['bfloat16', 'float16', .*'torch.float64'\], got 'fp32'"):
        load(folder)
    assert sorted(DTYPE_NAMES) == ["bfloat16", "float16", "float32", "float64", "torch.bfloat16", "torch.float16",
                                   "torch.float32", "torch.float64"]


@pytest.mark.parametrize(
    "fmt, key",
    [("legacy", "hook_point_layer"), ("saelens6", "metadata.hook_layer"), ("kissane", "layer")],
)
def test_a_layer_that_contradicts_the_hook_is_refused_by_every_loader(tmp_path, make_sae, fmt, key):
    if fmt == "kissane":
        pt, cfg_path = save_kissane(make_sae(d_in=32, head=CONCATENATED), tmp_path, "v1")
        edit, load, source = (lambda c: c.update(layer=0)), load_kissane, pt
    elif fmt == "legacy":
        source = save_legacy_saelens(make_sae(), tmp_path, "run", 10)
        cfg_path, edit, load = source / "cfg.json", (lambda c: c.update(hook_point_layer=0)), load_legacy_saelens
    else:
        source = save_saelens6(make_sae(), tmp_path / "s6")
        cfg_path, edit, load = source / "cfg.json", (lambda c: c["metadata"].update(hook_layer=0)), load_saelens6
    cfg = json.loads(cfg_path.read_text())
    edit(cfg)
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=rf"{key} is 0 but the hook 'blocks.1.attn.hook_z' is in layer 1"):
        load(source)


def test_layer_and_head_derivation():
    assert resolve_layer(None, "blocks.3.attn.hook_z", "cfg", "layer") == 3
    assert resolve_layer(3, "blocks.3.attn.hook_z", "cfg", "layer") == 3
    assert resolve_layer(None, None, "cfg", "layer") is None  # hook unknown: layer unknown
    with pytest.raises(CheckpointError, match="cfg: cannot tell the layer: no 'layer' and the hook 'hook_embed' names none"):
        resolve_layer(None, "hook_embed", "cfg", "layer")
    with pytest.raises(CheckpointError, match="cfg: layer must be a non-negative int, got True"):
        resolve_layer(True, "blocks.1.attn.hook_z", "cfg", "layer")
    assert resolve_head(None, "blocks.1.attn.hook_z", "cfg", "h") == CONCATENATED
    assert resolve_head(None, "blocks.1.hook_resid_pre", "cfg", "h") == NO_HEAD
    assert resolve_head(None, None, "cfg", "h") is None
    assert resolve_head(4, "blocks.1.attn.hook_z", "cfg", "h") == 4
    with pytest.raises(CheckpointError, match="cfg: h must be null or a head index, got -1"):
        resolve_head(-1, "blocks.1.attn.hook_z", "cfg", "h")
    assert canonical_hook("blocks.2.hook_z") == "blocks.2.attn.hook_z" == canonical_hook("blocks.2.attn.hook_z")
    assert canonical_hook("blocks.2.hook_resid_pre") == "blocks.2.hook_resid_pre"
