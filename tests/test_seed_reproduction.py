"""The seed-reproduction commands: offline on a gelu-2l-shaped stand-in in the real on-disk layouts (every number
checked against an independent computation from the files), and for real against the hub (``network``)."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from benchmarks.standins import TINY, write_standin
from sparsedecomp.cli import main
from sparsedecomp.seed_reproduction import SEED_FEATURE_SHARES


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    return write_standin(tmp_path_factory.mktemp("seed"), config=TINY, head_d_sae=48, concat_d_sae=128, n_rows=5)


def _raw_head_sae(run_dir):
    """Head SAE weights straight from the legacy SAELens files (no package loader)."""
    (weights,) = run_dir.glob("final_*/*/sae_weights.safetensors")
    w = load_file(str(weights))
    cfg = json.loads((weights.parent / "cfg.json").read_text())
    return w, cfg


def test_heads_part_matches_independent_computations(standin, tmp_path):
    from transformer_lens import HookedTransformer

    out = tmp_path / "heads"
    assert main(["reproduce-seed", "heads", "--head-saes", *map(str, standin.head_runs), "--model",
                 str(standin.model_dir), "--dataset", str(standin.dataset_dir), "--n-contexts", "3",
                 "--bos-token-id", "0", "--out", str(out), "--no-progress"]) == 0
    result = json.loads((out / "seed.json").read_text())

    from sparsedecomp.loading import load_model

    model: HookedTransformer = load_model(standin.model_dir).model
    rows = [r["tokens"] for r in __import__("datasets").load_dataset(str(standin.dataset_dir), split="train")]
    first = torch.tensor(rows[:1])
    w, cfg = _raw_head_sae(standin.head_runs[0])
    assert cfg["normalize_activations"] is True

    def spliced(z, hook):  # the seed's hook: head 0's z replaced by the unscaled SAE's reconstruction
        x = z[:, :, 0, :]
        f = torch.relu((x - w["b_dec"] * cfg.get("apply_b_dec_to_input", False)) @ w["W_enc"] + w["b_enc"])
        z[:, :, 0, :] = (f * w["scaling_factor"]) @ w["W_dec"] + w["b_dec"]
        return z

    def zeroed(z, hook):
        z[:, :, 0, :] = 0
        return z

    with torch.no_grad():
        clean = float(model(first, return_type="loss"))
        with_sae = float(model.run_with_hooks(first, return_type="loss", fwd_hooks=[("blocks.1.attn.hook_z", spliced)]))
        zero = float(model.run_with_hooks(first, return_type="loss", fwd_hooks=[("blocks.1.attn.hook_z", zeroed)]))
    one = result["one_context"]["as_loaded"]
    assert (one["clean"], one["spliced"], one["zeroed"]) == pytest.approx((clean, with_sae, zero), abs=1e-5)
    assert result["one_context"]["input_scale_folded"]["clean"] == pytest.approx(clean, abs=1e-5)
    assert result["many_contexts"]["as_loaded"]["n_contexts"] == 3
    assert result["input_scale"] > 0
    assert result["mean_decoder_norm_training_units"]["head_0"] == pytest.approx(float(w["W_dec"].norm(dim=1).mean()),
                                                                                 rel=1e-6)
    assert set(result["head_ranks"].values()) == {TINY["d_head"]}
    assert result["block_rank"] == TINY["n_heads"] * TINY["d_head"]


LOW_RANK = 37
SHARES_99 = (0.09, 0.02, 0.18, 0.22, 0.01, 0.01, 0.0, 0.47)


def _low_rank_copy(standin, root):
    """The stand-in's concat checkpoint with its decoder replaced: rank LOW_RANK, except feature 99, whose head
    blocks carry the squared-norm shares SHARES_99 (so its row is outside the others' span: rank LOW_RANK + 1)."""
    import shutil

    folder = root / "kissane_low_rank"
    shutil.copytree(standin.concat_dir, folder)
    (pt,) = folder.rglob("*.pt")
    state = torch.load(pt, weights_only=True)
    d_sae, d_in = state["W_dec"].shape
    g = torch.Generator().manual_seed(7)
    W_dec = torch.randn(d_sae, LOW_RANK, generator=g, dtype=torch.float64) @ torch.randn(LOW_RANK, d_in, generator=g,
                                                                                        dtype=torch.float64)
    d_head = d_in // len(SHARES_99)
    blocks = torch.randn(len(SHARES_99), d_head, generator=g, dtype=torch.float64)
    blocks = blocks / blocks.norm(dim=1, keepdim=True) * torch.tensor(SHARES_99, dtype=torch.float64).sqrt()[:, None]
    W_dec[99] = 3.0 * blocks.reshape(-1)
    state["W_dec"] = W_dec.float().contiguous()
    torch.save(state, pt)
    return folder


def _expected_from_file(folder, feature):
    """Rank, the feature's norm and its per-head squared-norm shares, from the raw .pt and cfg (plain torch)."""
    (pt,) = folder.rglob("*.pt")
    (cfg_path,) = folder.rglob("*_cfg.json")
    n_heads = TINY["n_heads"]
    d_head = json.loads(cfg_path.read_text())["act_size"] // n_heads
    W_dec = torch.load(pt, weights_only=True)["W_dec"].double()
    sigma = torch.linalg.svdvals(W_dec / W_dec.norm(dim=1, keepdim=True))
    # a float32 matrix: singular values below 1e-4 of the largest are rounding, not rank (here 1e-8 against 0.1)
    rank = int((sigma > 1e-4 * sigma[0]).sum())
    row = W_dec[feature]
    total = sum(float(row[i] ** 2) for i in range(row.numel()))
    shares = [sum(float(row[i] ** 2) for i in range(h * d_head, (h + 1) * d_head)) / total for h in range(n_heads)]
    return rank, total**0.5, shares


@pytest.mark.parametrize("variant", ["standin", "low_rank"])
def test_kissane_part_matches_the_checkpoint(standin, tmp_path, variant):
    folder = standin.concat_dir if variant == "standin" else _low_rank_copy(standin, tmp_path)
    for feature in (99, 5):
        out = tmp_path / f"kissane_{feature}"
        assert main(["reproduce-seed", "kissane", "--concat-sae", str(folder), "--concat-version",
                     standin.concat_version, "--feature", str(feature), "--out", str(out)]) == 0
        result = json.loads((out / "seed.json").read_text())
        rank, norm, shares = _expected_from_file(folder, feature)
        assert result["feature"] == feature
        assert result["rank"] == rank
        assert result["feature_norm"] == pytest.approx(norm, rel=1e-6)
        assert result["squared_shares"] == pytest.approx(shares, abs=2e-6)  # written rounded to 1e-6
    if variant == "low_rank":  # the constructed answers, so the rank check above is not only "full rank"
        assert rank == LOW_RANK + 1 < 64
        assert _expected_from_file(folder, 99)[2] == pytest.approx(SHARES_99, abs=1e-6)
    else:
        assert rank == 64


@pytest.mark.network
def test_kissane_part_reproduces_the_seed_from_the_hub(tmp_path):
    out = tmp_path / "kissane"
    assert main(["reproduce-seed", "kissane", "--out", str(out)]) == 0
    result = json.loads((out / "seed.json").read_text())
    assert result["rank"] == 512
    assert result["squared_shares"] == pytest.approx(list(SEED_FEATURE_SHARES), abs=0.0051)


@pytest.mark.network
def test_heads_part_reproduces_the_seed_with_its_checkpoints(tmp_path):
    """Needs the seed's own per-head runs (not on the hub): SPARSEDECOMP_SEED_HEAD_SAES="dir0 dir1 ... dir7"."""
    runs = os.environ.get("SPARSEDECOMP_SEED_HEAD_SAES", "").split()
    if len(runs) != 8:
        pytest.skip("set SPARSEDECOMP_SEED_HEAD_SAES to the seed's eight checkpoints/<wandb_id> folders")
    out = tmp_path / "heads"
    assert main(["reproduce-seed", "heads", "--head-saes", *runs, "--n-contexts", "8", "--out", str(out),
                 "--no-progress"]) == 0
    result = json.loads((out / "seed.json").read_text())
    one = result["one_context"]["as_loaded"]
    assert (one["clean"], one["spliced"], one["zeroed"]) == pytest.approx((3.699, 3.778, 3.873), abs=0.002)
    assert result["mean_decoder_norm_training_units"]["head_0"] == pytest.approx(2.0519, abs=1e-3)
    assert set(result["head_ranks"].values()) == {64} and result["block_rank"] == 512


def test_a_bad_head_index_map_is_refused(standin, tmp_path, capsys):
    args = ["reproduce-seed", "heads", "--head-saes", *map(str, standin.head_runs[:2]), "--model",
            str(standin.model_dir), "--dataset", str(standin.dataset_dir), "--out", str(tmp_path / "o")]
    assert main([*args, "--head-index-map", "a,b"]) == 2
    assert "--head-index-map: 'a' is not a non-negative integer" in capsys.readouterr().err
    assert main([*args, "--head-index-map", "0"]) == 2
    assert "one distinct head per source" in capsys.readouterr().err
