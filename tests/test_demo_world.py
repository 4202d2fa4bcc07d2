"""The shipped demo world: it loads, its SAEs' quality as the code recomputes it on held-out tokens matches the
bars and the build's record, it fits the size budget; the build's pieces are deterministic and the build writes
only into folders it owns."""

import dataclasses
import json
import math
import platform

import pytest
import torch

from sparsedecomp.demo import ARTIFACTS_DIR, load_demo_world
from sparsedecomp.demo import quality
from sparsedecomp.demo.corpus import build_corpus
from sparsedecomp.demo.layout import (BUILD_MARKER, CONCAT_DIR, HELDOUT_FILE, REPORT_FILE, TOKENIZER_CONFIG_FILE,
                                      TOKENIZER_FILE, load_heldout_tokens)
from sparsedecomp.demo.tokenizer import pack, special_ids, train_tokenizer
from sparsedecomp.errors import InputError

MAX_ARTIFACT_BYTES = 15 * 1024 * 1024
N_HELDOUT = len(load_heldout_tokens(ARTIFACTS_DIR / HELDOUT_FILE))


@pytest.fixture(scope="module")
def report():
    """The shipped build's report: the settings it was built with and the numbers it measured."""
    return json.loads((ARTIFACTS_DIR / REPORT_FILE).read_text())


@pytest.fixture(scope="module")
def world():
    """The shipped world, as the demo loads it."""
    return load_demo_world()


def test_artifacts_fit_the_size_budget():
    total = sum(p.stat().st_size for p in ARTIFACTS_DIR.rglob("*") if p.is_file())
    assert 0 < total <= MAX_ARTIFACT_BYTES
    # No pickles ship: only JSON, safetensors and the Kissane .pt state dict (loaded with weights_only=True).
    suffixes = {p.suffix for p in ARTIFACTS_DIR.rglob("*") if p.is_file()}
    assert suffixes <= {".json", ".safetensors", ".pt"}


def test_world_loads_with_recorded_processing_and_saelens_head_folders(world, report):
    from sae_lens import SAE as LensSAE

    from sparsedecomp.activations import CollectZ, run_accumulators
    from sparsedecomp.demo.world import head_sae_sources

    cfg = world.model.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_head, cfg.act_fn) == (2, 256, 8, 32, "gelu")
    assert cfg.normalization_type == "LNPre"  # fold_ln was applied on load
    assert world.processing_flags.as_kwargs() == report["config"]["processing_flags"]
    assert len(world.head_saes) == 8 and world.head_saes.heads == tuple(range(8))
    assert world.head_saes.heads_needing_input_scale == ()  # SAELens's trainer folded the scale in
    assert world.head_saes.model_from_pretrained_kwargs == report["config"]["processing_flags"]
    z = run_accumulators(world.model, world.heldout_tokens[:4], {"z": CollectZ()}, layer=world.layer)["z"].float()
    for h, folder in head_sae_sources().items():
        sae = world.head_saes[h]
        assert sae.W_dec.shape == (128, 32) and "JumpReLU" in sae.activation.describe()
        lens = LensSAE.load_from_disk(folder)  # the folder train-heads writes, as SAELens reads it
        assert lens.cfg.metadata.hook_head_index == h and lens.cfg.architecture() == "jumprelu"
        with torch.no_grad():
            torch.testing.assert_close(sae.encode(z[:, h]), lens.encode(z[:, h]), rtol=1e-4, atol=1e-4)
    assert world.concat_sae.head == "concatenated" and world.concat_sae.W_dec.shape == (2048, 256)
    assert torch.allclose(world.concat_sae.W_dec.norm(dim=1), torch.ones(2048), atol=1e-3)
    assert world.W_O.shape == (8, 32, 256)
    assert world.heldout_tokens.dtype == torch.long and world.heldout_tokens.shape[1] == cfg.n_ctx
    bos, _ = special_ids(world.tokenizer)
    assert bool((world.heldout_tokens[:, 0] == bos).all())


def test_quality_on_a_heldout_slice_matches_the_bars_and_the_build(world, report):
    # Fast coverage of quality.evaluate_world on the shipped world: 16 held-out contexts. Numbers from 16 contexts
    # scatter around the build's (all contexts for L0 and explained variance, 128 for splice scores): each is
    # compared with tolerance, splice scores within 3 of their standard errors.
    rows = torch.linspace(0, N_HELDOUT - 1, 16).round().long()
    world = dataclasses.replace(world, heldout_tokens=world.heldout_tokens[rows])
    result = quality.evaluate_world(world, batch_size=16, include_mean=False)
    model = result["model"]
    assert result["splice_contexts"] == 16
    assert model["heldout_cross_entropy"] <= model["unigram_entropy_heldout_fit"] - quality.MIN_CE_GAP_NATS
    assert set(result["saes"]) == {f"head_{h}" for h in range(8)} | {"concat"}
    for name, sae in result["saes"].items():
        built = report["quality"]["saes"][name]
        assert sae["l0"] == pytest.approx(built["l0"], rel=0.15), name
        assert sae["explained_variance"] == pytest.approx(built["explained_variance"], abs=0.03), name
        assert 0 < sae["mse"] and sae["n_tokens"] == 16 * world.model.cfg.n_ctx
        splice = sae["splice"]
        assert abs(splice["recovered"] - built["splice"]["recovered"]) <= 3 * splice["recovered_stderr"], name
        assert abs(splice["ablation_effect"] - built["splice"]["ablation_effect"]) <= (
            3 * splice["ablation_effect_stderr"]), name
    together = result["all_heads_spliced"]
    assert together["head"] is None and together["ablation_effect"] == pytest.approx(
        result["saes"]["concat"]["splice"]["ablation_effect"], rel=1e-9)
    assert abs(together["recovered"] - report["quality"]["all_heads_spliced"]["recovered"]) <= (
        3 * together["recovered_stderr"])


@pytest.mark.slow
def test_quality_bars_hold_when_recomputed_on_all_heldout_tokens(report):
    # The build's own evaluation, repeated by the code on the world as the build and the demo load it.
    world = load_demo_world()
    cfg = report["config"]
    result = quality.evaluate_world(world, n_splice_sequences=cfg["eval_sequences"], batch_size=cfg["eval_batch_size"],
                                    include_mean=False)
    model = result["model"]
    assert model["heldout_cross_entropy"] <= model["unigram_entropy_heldout_fit"] - quality.MIN_CE_GAP_NATS
    assert set(result["saes"]) == {f"head_{h}" for h in range(8)} | {"concat"}
    for name, sae in result["saes"].items():
        assert all(sae["passes"].values()), (name, sae["passes"])
        d_in = 256 if name == "concat" else 32
        bound = quality.MAX_CONCAT_L0_FRACTION if name == "concat" else quality.MAX_HEAD_L0_FRACTION
        assert sae["l0"] <= bound * d_in, name
        assert sae["dead_fraction"] <= (quality.MAX_DEAD_FRACTION if name == "concat" else
                                        quality.MAX_HEAD_DEAD_FRACTION), name
        splice = sae["splice"]
        if name != "concat":
            assert splice["recovered"] >= quality.MIN_HEAD_SPLICE_SCORE, (name, splice)
            assert sae["explained_variance"] >= quality.MIN_HEAD_EXPLAINED_VARIANCE, name
        # Every spliced site matters: zeroing it costs well outside the noise (the score's denominator is a
        # measurement), and the score is known to within +-0.1 (one standard error over contexts).
        effect = splice["zero_ablated"] - splice["clean"]
        assert effect >= quality.MIN_ABLATION_EFFECT_NATS, (name, splice)
        assert effect >= quality.MIN_ABLATION_EFFECT_STDERRS * splice["ablation_effect_stderr"], (name, splice)
        assert sae["passes"]["ablation_effect"], (name, splice)
        assert splice["recovered_stderr"] <= 0.1, (name, splice)
        # Same contexts as the build: its numbers reproduce up to floating-point differences (threads, versions).
        built = report["quality"]["saes"][name]
        assert sae["l0"] == pytest.approx(built["l0"], rel=1e-3), name
        assert sae["dead_fraction"] == pytest.approx(built["dead_fraction"], abs=1e-3), name
        assert sae["explained_variance"] == pytest.approx(built["explained_variance"], abs=1e-3), name
        assert splice["recovered"] == pytest.approx(built["splice"]["recovered"], abs=1e-3), name
    # All eight head SAEs spliced in at once, scored against zeroing the layer like the concat SAE.
    together = result["all_heads_spliced"]
    assert together["head"] is None and together["ablation_effect"] == pytest.approx(
        result["saes"]["concat"]["splice"]["ablation_effect"], rel=1e-9)
    assert together["recovered"] == pytest.approx(report["quality"]["all_heads_spliced"]["recovered"], abs=1e-3)
    # What the seed studies is there: features of one head, and well-sampled features whose driving head by DFA
    # holds under a quarter of the decoder norm.
    found = result["phenomena"]
    assert found["dominated_by_one_head"]["n_well_sampled"] >= 10
    assert found["n_dfa_disagreements"] >= 3
    for feature in found["dfa_disagreements"]:
        assert feature["firings"] >= quality.WELL_SAMPLED_FIRINGS
        assert feature["weight_share"] < quality.DISAGREEMENT_WEIGHT_SHARE
    assert found == report["quality"]["phenomena"]


def test_unigram_cross_entropy_of_known_counts():
    eval_tokens = torch.tensor([[0, 1, 1, 2, 2]])  # predicted positions: 1, 1, 2, 2
    # Fitted on the evaluated tokens: the entropy of (1/2, 1/2).
    assert quality.unigram_cross_entropy(None, eval_tokens, 4) == pytest.approx(math.log(2))
    # Add-one smoothed counts of [3, 3, 3] over 4 tokens: (1, 1, 1, 4) / 7; tokens 1 and 2 each have p = 1/7.
    train = torch.tensor([[0, 3, 3, 3]])
    assert quality.unigram_cross_entropy(train, eval_tokens, 4) == pytest.approx(math.log(7))


def test_describe_summary_reads_the_shipped_report_and_older_ones(report):
    summary = report["quality"]["summary"]
    lines = quality.describe_summary(summary)
    assert set(lines) == ({"model (held-out)", "all head SAEs at once (held-out)"}
                          | {f"{name} SAE (held-out)" for name in [f"head {h}" for h in range(8)] + ["concat"]})
    for key, label in [(f"head_{h}", f"head {h}") for h in range(8)] + [("concat", "concat")]:
        assert f"explained variance {summary[key]['explained_variance']:.3f}" in lines[f"{label} SAE (held-out)"]
    # A report written before the rename stores the fraction unexplained as "fvu": read as 1 - fvu.
    old = {"model_ce": 3.3, "unigram_ce": 6.1,
           "head0": {"l0": 39.3, "dead": 0.0, "splice": 0.93, "splice_stderr": 0.03, "fvu": 0.1211}}
    assert "explained variance 0.879," in quality.describe_summary(old)["head 0 SAE (held-out)"]


def test_corpus_split_is_deterministic_and_disjoint():
    kwargs = dict(code_char_budget=200_000, prose_char_budget=50_000, heldout_every=5, seed=0)
    a, b = build_corpus(**kwargs), build_corpus(**kwargs)
    assert a.fingerprint() == b.fingerprint()
    names_train = {d.name for d in a.train}
    names_held = {d.name for d in a.heldout}
    assert names_train and names_held and not names_train & names_held
    assert {d.kind for d in a.train} == {"prose", "code"}


def test_shipped_corpus_and_heldout_tokens_are_reproduced(report):
    # The corpus is the interpreter's own docs and standard library, so only the same Python version reproduces it.
    if report["python"] != platform.python_version():
        pytest.skip(f"the shipped corpus was read from Python {report['python']}'s standard library; this is "
                    f"Python {platform.python_version()}")
    from tokenizers import Tokenizer

    cfg = report["config"]
    full = build_corpus(code_char_budget=cfg["code_char_budget"], prose_char_budget=cfg["prose_char_budget"],
                        heldout_every=cfg["heldout_every"], seed=cfg["seed"])
    assert full.fingerprint() == report["corpus"]["fingerprint"]
    tokenizer = Tokenizer.from_file(str(ARTIFACTS_DIR / TOKENIZER_FILE))
    texts = full.heldout_texts(cfg["heldout_doc_chars"])
    tokens = pack(tokenizer, texts, cfg["n_ctx"], cfg["max_heldout_sequences"])
    assert torch.equal(tokens, load_heldout_tokens(ARTIFACTS_DIR / HELDOUT_FILE))


def test_tokenizer_training_and_packing_are_deterministic():
    corpus = build_corpus(code_char_budget=60_000, prose_char_budget=20_000, heldout_every=4, seed=0)
    texts = [d.text for d in corpus.train]
    t1, t2 = train_tokenizer(texts, 400), train_tokenizer(texts, 400)
    assert t1.to_str() == t2.to_str()
    assert t1.get_vocab_size() == 400
    bos, eot = special_ids(t1)
    assert (bos, eot) == (0, 1)
    p1, p2 = pack(t1, texts, 32), pack(t2, texts, 32)
    assert torch.equal(p1, p2)
    assert bool((p1[:, 0] == bos).all()) and int((p1 == eot).sum()) >= 1
    assert t1.decode(t1.encode("def f(x):\n    return x + 12").ids) == "def f(x):\n    return x + 12"


def test_repeat_half_copies_the_first_half():
    from sparsedecomp.demo.model import repeat_half

    batch = torch.arange(2 * 16).view(2, 16)
    batch[:, 0] = 0
    out = repeat_half(batch)
    assert out.shape == batch.shape
    assert torch.equal(out[:, 1:9], batch[:, 1:9]) and torch.equal(out[:, 9:], batch[:, 1:8])
    assert bool((out[:, 0] == 0).all())


def test_tiny_build_writes_a_loadable_world(tmp_path):
    from sparsedecomp.demo.build import build, reevaluate
    from sparsedecomp.demo.config import DemoConfig

    cfg = DemoConfig.tiny()
    out = tmp_path / "world"  # a new folder
    report = build(out, cfg)
    world = load_demo_world(out)
    assert len(world.head_saes) == cfg.n_heads
    assert world.concat_sae.d_sae == cfg.concat_d_sae
    assert set(report["timings_s"]) >= {"corpus", "tokenizer", "model", "SAEs (one pass)", "evaluation"}
    assert (out / BUILD_MARKER).is_file()
    # The tokenizer is written into the model folder, so the model loads with it.
    assert (out / TOKENIZER_FILE).is_file() and (out / TOKENIZER_CONFIG_FILE).is_file()
    assert not (out / "tokenizer.json").exists()
    assert world.model.tokenizer.bos_token_id == 0 and world.model.tokenizer.eos_token == "<|endoftext|>"
    assert world.model.tokenizer.get_vocab() == world.tokenizer.get_vocab(with_added_tokens=True)
    # SAELens 6 folders, as train-heads writes them: the trainer folded the input scaling in.
    cfg_json = json.loads((out / "saes" / "heads" / "head_0" / "cfg.json").read_text())
    assert cfg_json["architecture"] == "jumprelu" and cfg_json["normalize_activations"] == "none"
    assert cfg_json["metadata"]["hook_head_index"] == 0 and world.head_saes.heads_needing_input_scale == ()
    # Re-evaluating the written build reproduces the build's own quality numbers.
    again = reevaluate(out)
    assert again["quality"]["summary"] == report["quality"]["summary"]
    assert DemoConfig.from_dict(again["config"]) == cfg
    # Rebuilding the SAEs into the same folder (a previous build's) replaces the SAE folders it wrote there.
    first = {p.relative_to(out): p.read_bytes() for p in (out / "saes").rglob("*") if p.is_file()}
    stray = out / CONCAT_DIR / "stray.txt"
    stray.write_text("left by an older build")
    rebuilt = build(out, cfg, skip_model=True)
    assert not stray.exists() and len(load_demo_world(out).head_saes) == cfg.n_heads
    # The SAEs are reproducible from the build's seed: the rebuild wrote the same bytes.
    again = {p.relative_to(out): p.read_bytes() for p in (out / "saes").rglob("*") if p.is_file()}
    assert again.keys() == first.keys() and all(again[k] == first[k] for k in first)
    assert "model" not in rebuilt["timings_s"]
    # A build from before the tokenizer moved into the model folder (it lay beside it) is still read, and a rebuild
    # of its SAEs writes the tokenizer where load_model finds it.
    for name in (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE):
        (out / name).replace(out / name.rpartition("/")[2]) if name == TOKENIZER_FILE else (out / name).unlink()
    assert load_demo_world(out).model.tokenizer.bos_token_id == 0
    build(out, cfg, skip_model=True)
    assert (out / TOKENIZER_FILE).is_file() and load_demo_world(out).model.tokenizer.bos_token_id == 0


def test_build_needs_an_output_folder(capsys):
    from sparsedecomp.demo.build import main

    with pytest.raises(SystemExit) as exc:
        main(["--tiny"])
    assert exc.value.code == 2
    assert "the following arguments are required: --out" in capsys.readouterr().err


def test_build_refuses_a_folder_that_is_not_a_previous_build(tmp_path, capsys):
    from sparsedecomp.demo.build import build, claim_output_folder, main
    from sparsedecomp.demo.config import DemoConfig

    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / CONCAT_DIR).mkdir(parents=True)
    (tmp_path / CONCAT_DIR / "keep.pt").write_text("mine too")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(InputError, match="not empty and not a previous demo build"):
        build(tmp_path, DemoConfig.tiny())
    with pytest.raises(InputError, match="--skip-model reuses the tokenizer and model of a previous build"):
        build(tmp_path, DemoConfig.tiny(), skip_model=True)
    assert main(["--out", str(tmp_path), "--tiny"]) == 2
    assert "not empty and not a previous demo build" in capsys.readouterr().err
    # Nothing was written or deleted.
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    with pytest.raises(InputError, match="is a file"):
        claim_output_folder(tmp_path / "notes.txt")


def test_build_claims_new_empty_and_previous_build_folders_only(tmp_path):
    from sparsedecomp.demo.build import _clear, claim_output_folder

    new, empty = tmp_path / "a" / "new", tmp_path / "empty"
    empty.mkdir()
    for folder in (new, empty):
        claim_output_folder(folder)
        assert [p.name for p in folder.iterdir()] == [BUILD_MARKER]
    # A marked folder is a previous build's: claimed again, and its SAE folders may be cleared, nothing else.
    (new / CONCAT_DIR).mkdir(parents=True)
    (new / CONCAT_DIR / "old.pt").write_text("x")
    (new / "tokenizer.json").write_text("{}")
    claim_output_folder(new)
    _clear(new, CONCAT_DIR)
    assert not any((new / CONCAT_DIR).iterdir()) and (new / "tokenizer.json").is_file()
    # Without the marker, clearing is refused even when called directly.
    (empty / BUILD_MARKER).unlink()
    (empty / CONCAT_DIR).mkdir(parents=True)
    (empty / CONCAT_DIR / "old.pt").write_text("x")
    with pytest.raises(InputError, match="refusing to delete"):
        _clear(empty, CONCAT_DIR)
    assert (empty / CONCAT_DIR / "old.pt").is_file()


def test_shipped_artifacts_are_a_build_folder():
    # Refreshing them (python -m sparsedecomp.demo.build --out sparsedecomp/demo/artifacts) needs the marker.
    assert (ARTIFACTS_DIR / BUILD_MARKER).is_file()


def test_shipped_build_is_the_default_config(report):
    # DemoConfig() documents the shipped build: rebuilding with the defaults reproduces it (up to floating-point
    # differences across torch versions and thread counts).
    from sparsedecomp.demo.config import DemoConfig

    assert json.loads(json.dumps(DemoConfig().to_dict())) == report["config"]


def test_demo_tokens_of_the_training_split_are_packed_like_the_heldout_ones():
    from sparsedecomp.demo import demo_tokens
    from sparsedecomp.errors import InputError

    train = demo_tokens(1600, split="train")
    assert train.tokens.shape == (1600, 128) and bool((train.tokens[:, 0] == 0).all())
    assert train.details["split"] == "train" and train.bos_token_id == 0
    heldout = demo_tokens(954)
    # no training context is a held-out one (the splits are disjoint documents)
    assert not set(map(tuple, train.tokens[:200].tolist())) & set(map(tuple, heldout.tokens.tolist()))
    with pytest.raises(InputError, match="split"):
        demo_tokens(10, split="test")
