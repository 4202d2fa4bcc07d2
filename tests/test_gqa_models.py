"""Grouped-query attention and the offline stand-ins of real models (`write_standin_model`).

Stand-ins of gpt2-small (12 heads, each its own key/value head), gemma-2-2b (8 query heads sharing 4 key/value
heads) and gemma-3-270m (4 query heads sharing ONE key/value head), built from TransformerLens's own configurations
and cut to 2 layers, a vocabulary of 96 and an MLP of 32 (the attention geometry is exact). On each: DFA by source
and head plus the bias terms is the pre-activation, and each query head's DFA uses its own key/value head's `v`
(checked against a direct computation from `hook_v`, `hook_pattern` and `W_enc`); the routed `pinv` splice equals
the concat SAE's; the `dashboard` command writes pages. The model checks refuse, before any work, a model folder
whose recorded processing differs from the SAEs', heads the model lacks and an SAE of another width.

gpt2-small's configuration is read by TransformerLens from the Hugging Face hub's `config.json`: offline, from a
stand-in hub cache holding `transformers.GPT2Config()` as that file.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from sparsedecomp import make_solver
from sparsedecomp.activations import ActivationBatch, bytes_per_context, kv_head_index
from sparsedecomp.cli import main
from sparsedecomp.dashboards.replay import KeepBatches, cache_bytes
from sparsedecomp.dashboards.source_dfa import DFARequest, dfa_by_source_many
from sparsedecomp.errors import InputError
from sparsedecomp.evaluation.routing import route_decomposition, routing_error
from sparsedecomp.evaluation.splice import splice_losses, splice_variants
from sparsedecomp.jobs.inputs import ModelRequest, load_model_for
from sparsedecomp.jobs.solve import concat_targets
from sparsedecomp.loading import (STANDIN_BOS_TOKEN_ID, HeadSAEs, ProcessingFlags, load_model, save_saelens6,
                                  standin_config, write_standin_model)
from sparsedecomp.loading.heads import check_model_shape
from tests.loading.conftest import COMMIT, random_sae

LAYER, D_VOCAB, D_MLP, N_CTX, CONTEXT = 1, 96, 32, 64, 12
MODELS = {  # TransformerLens name -> (n_heads, n_key_value_heads or None, d_head)
    "gpt2-small": (12, None, 64),
    "gemma-2-2b": (8, 4, 256),
    "gemma-3-270m": (4, 1, 256),
}
TOKENS = torch.tensor([[STANDIN_BOS_TOKEN_ID, 5, 6, 7], [STANDIN_BOS_TOKEN_ID, 8, 9, 10]])
NO_PROCESSING = {"fold_ln": False, "center_writing_weights": False, "center_unembed": False,
                 "fold_value_biases": False}


@pytest.fixture(scope="module")
def gpt2_hub_cache(tmp_path_factory):
    """A Hugging Face hub cache holding gpt2's config.json (GPT2Config's values, with `n_ctx` and `architectures`
    as the hub's file has them), with the hub forced offline and pointed at it for this module."""
    import huggingface_hub.constants as constants
    from transformers import GPT2Config

    cache = tmp_path_factory.mktemp("hf_cache")
    config = GPT2Config().to_dict()
    config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2", n_ctx=config["n_positions"])
    repo = cache / "models--gpt2"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(config))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "HF_HUB_OFFLINE", True)
        patch.setattr(constants, "HF_HUB_CACHE", str(cache))
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield cache


@pytest.fixture(scope="module")
def standin_folders(tmp_path_factory, gpt2_hub_cache):
    """name -> the stand-in model folder (written once for the module)."""
    root = tmp_path_factory.mktemp("standins")
    # random biases: v's bias is part of DFA by source, and fold_value_biases then moves hook_z
    return {name: write_standin_model(name, root / name, n_layers=2, d_vocab=D_VOCAB, d_mlp=D_MLP, n_ctx=N_CTX,
                                      bias_scale=0.05) for name in MODELS}


class World:
    """A loaded stand-in with random SAEs on its layer-1 `hook_z`: a concat SAE (d_in = n_heads * d_head) and one
    per-head SAE per query head (d_in = d_head, d_sae > d_head so that the block dictionary has full rank)."""

    def __init__(self, name, folder):
        self.name, self.folder = name, folder
        self.loaded = load_model(folder)
        cfg = self.loaded.model.cfg
        self.n_heads, self.d_head = cfg.n_heads, cfg.d_head
        self.n_kv = cfg.n_key_value_heads or cfg.n_heads
        model_name = self.loaded.name
        self.concat = random_sae(d_in=self.n_heads * self.d_head, d_sae=24, head="concatenated", layer=LAYER,
                                 model_name=model_name, seed=100)
        self.heads = HeadSAEs(tuple(random_sae(d_in=self.d_head, d_sae=self.d_head + 8, head=h, layer=LAYER,
                                               model_name=model_name, seed=h) for h in range(self.n_heads)))
        g = torch.Generator().manual_seed(7)
        self.tokens = torch.randint(4, D_VOCAB, (6, CONTEXT), generator=g)
        self.tokens[:, 0] = STANDIN_BOS_TOKEN_ID


@pytest.fixture(scope="module")
def worlds(standin_folders):
    """name -> its World, built on first use (a test of one model does not load the others)."""
    built = {}

    def get(name):
        if name not in built:
            built[name] = World(name, standin_folders[name])
        return built[name]

    return get


@pytest.fixture(scope="module", params=list(MODELS))
def world(request, worlds):
    return worlds(request.param)


# -- the stand-ins ------------------------------------------------------------------------------------------------------
def test_standins_keep_the_attention_geometry_of_transformer_lens_configs(world):
    n_heads, n_kv, d_head = MODELS[world.name]
    cfg = world.loaded.model.cfg
    assert (cfg.n_heads, cfg.n_key_value_heads, cfg.d_head) == (n_heads, n_kv, d_head)
    assert (cfg.n_layers, cfg.d_vocab, cfg.d_mlp, cfg.n_ctx) == (2, D_VOCAB, D_MLP, N_CTX)
    recorded = json.loads((world.folder / "config.json").read_text())
    assert recorded["processing_flags"] == ProcessingFlags().as_kwargs() and recorded["standin_of"] == world.name
    if world.name.startswith("gemma"):
        # the kept layers keep their own kind: gemma-2 alternates local / global, gemma-3 starts with local ones
        assert cfg.attn_types == (["local", "global"] if world.name == "gemma-2-2b" else ["local", "local"])
        assert cfg.use_local_attn and cfg.window_size in (4096, 512)
    _, cache = world.loaded.model.run_with_cache(world.tokens[:2], names_filter=lambda n: n.startswith("blocks.1.attn"))
    assert cache["blocks.1.attn.hook_z"].shape == (2, CONTEXT, n_heads, d_head)
    assert cache["blocks.1.attn.hook_v"].shape == (2, CONTEXT, n_kv or n_heads, d_head)
    # token text, with the tokenizer's BOS prepended once
    tokenizer = world.loaded.tokenizer
    assert world.loaded.bos_token_id == STANDIN_BOS_TOKEN_ID
    assert world.loaded.model.to_tokens("tok5 tok7").tolist() == [[STANDIN_BOS_TOKEN_ID, 5, 7]]
    assert tokenizer.decode([STANDIN_BOS_TOKEN_ID, 5, D_VOCAB - 1]) == f"<bos> tok5 tok{D_VOCAB - 1}"


def test_a_standin_is_reproducible_and_refuses_bad_sizes(tmp_path):
    a = write_standin_model("gemma-3-270m", tmp_path / "a", d_vocab=D_VOCAB, d_mlp=D_MLP, n_ctx=N_CTX, seed=3)
    b = write_standin_model("gemma-3-270m", tmp_path / "b", d_vocab=D_VOCAB, d_mlp=D_MLP, n_ctx=N_CTX, seed=3)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    config = standin_config("gemma-3-270m", n_layers=6, d_vocab=D_VOCAB)
    assert config["attn_types"] == ["local"] * 5 + ["global"] and config["model_name"] == "gemma-3-270m-standin"
    assert config["n_ctx"] == 1024 and config["n_key_value_heads"] == 1 and config["d_mlp"] == 2048  # kept
    assert standin_config("gemma-3-270m", name="gemma-3-270m")["model_name"] == "gemma-3-270m"
    with pytest.raises(InputError, match=r"n_layers must be a positive int and at most the model's 18, got 19"):
        standin_config("gemma-3-270m", n_layers=19)
    with pytest.raises(InputError, match=r"d_vocab must leave room for ordinary tokens"):
        standin_config("gemma-3-270m", d_vocab=4)
    with pytest.raises(InputError, match="already holds a model"):
        write_standin_model("gemma-3-270m", a)


# -- grouped-query attention: which v each query head reads --------------------------------------------------------------
def test_query_heads_read_key_value_heads_as_transformer_lens_groups_them():
    assert kv_head_index(8, 4) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert kv_head_index(4, 1) == [0, 0, 0, 0]
    assert kv_head_index(12, None) == list(range(12)) and kv_head_index(8, 4, [5]) == [2]
    # TransformerLens's own expansion of v puts kv head h // g at query head h
    v = torch.arange(4.0).view(1, 1, 4, 1)
    assert torch.repeat_interleave(v, 2, dim=2).flatten().tolist() == [float(k) for k in kv_head_index(8, 4)]
    with pytest.raises(InputError, match="8 query heads cannot share 3 key/value heads evenly"):
        kv_head_index(8, 3)
    with pytest.raises(InputError, match=r"heads \[8\] do not exist: the layer has 8 query heads"):
        kv_head_index(8, 4, [8])
    batch = ActivationBatch(tokens=torch.zeros(1, 2, dtype=torch.long), z=torch.zeros(1, 2, 8, 3), first_context=0,
                            layer=0, v=torch.arange(4.0).view(1, 1, 4, 1).expand(1, 2, 4, 3))
    assert batch.n_kv_heads == 4
    assert batch.v_of_heads()[0, 0, :, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert batch.v_of_heads([5])[0, 0, :, 0].tolist() == [2]


def test_folding_value_biases_moves_each_query_heads_z_by_its_kv_heads_bias(standin_folders):
    """Pattern rows sum to 1, so z[h] = sum_src A v[src, h // g] carries b_V[h // g] whole; fold_value_biases moves
    it into b_O (RMS norms fold no bias into b_V, so the stored _b_V is the one moved)."""
    from safetensors.torch import load_file

    folder = standin_folders["gemma-2-2b"]  # 8 query heads, 4 kv heads
    b_V = load_file(str(folder / "model.safetensors"))[f"blocks.{LAYER}.attn._b_V"]  # (4, 256)
    assert float(b_V.abs().min()) > 0
    processed = load_model(folder)
    with pytest.warns(UserWarning, match=r"records processing flags .* but it is loaded with"):  # the library warns
        raw = load_model(folder, flags=ProcessingFlags(fold_value_biases=False))
    tokens = torch.tensor([[STANDIN_BOS_TOKEN_ID, 9, 17, 33, 5]])
    with torch.no_grad():
        z = [m.model.run_with_cache(tokens, names_filter=f"blocks.{LAYER}.attn.hook_z")[1][
            f"blocks.{LAYER}.attn.hook_z"][0] for m in (processed, raw)]
    torch.testing.assert_close(z[1] - z[0], b_V[kv_head_index(8, 4)].expand_as(z[0]), atol=1e-5, rtol=1e-4)


def test_memory_estimates_count_v_with_its_key_value_heads(standin_folders):
    cfg = load_model(standin_folders["gemma-3-270m"]).model.cfg  # 4 query heads of 256, one kv head
    with_v, without = bytes_per_context(cfg, 16, ("v",)), bytes_per_context(cfg, 16)
    assert with_v - without == 4 * 16 * 1 * 256
    assert cache_bytes(cfg, 3, 16) == 4 * 3 * (16 * (4 + 1) * 256 + 4 * 16 * 16)


def direct_dfa(world, cache, sae, heads, positions, features):
    """``dfa[e, src, i] = A[h, p_e, src] * (v[src, h // g] . W_enc[B_h, f_e])`` for ``h = heads[i]``, straight from
    the model's ``hook_v`` (n_key_value_heads heads) and ``hook_pattern`` of the examples' contexts."""
    v, pattern = cache[f"blocks.{LAYER}.attn.hook_v"], cache[f"blocks.{LAYER}.attn.hook_pattern"]
    group = world.n_heads // world.n_kv
    out = torch.zeros(len(positions), CONTEXT, len(heads))
    for e, (p, f) in enumerate(zip(positions.tolist(), features.tolist())):
        for i, h in enumerate(heads):
            rows = slice(h * world.d_head, (h + 1) * world.d_head) if len(heads) > 1 else slice(None)
            out[e, :, i] = pattern[e, h, p] * (v[e, :, h // group] @ sae.W_enc[rows, f])
    return out


def test_dfa_by_source_and_head_uses_each_query_heads_own_kv_head_and_sums_to_the_pre_activation(world):
    contexts, positions = torch.tensor([0, 3, 3, 5]), torch.tensor([11, 4, 9, 7])
    features = torch.tensor([1, 5, 2, 7])
    saes = [world.concat, *world.heads]
    requests = [DFARequest(sae=sae, context=contexts, position=positions, feature=features) for sae in saes]
    results = dfa_by_source_many(world.loaded, world.tokens, requests, layer=LAYER, batch_size=2, chunk_elements=500)
    with torch.no_grad():
        _, cache = world.loaded.model.run_with_cache(world.tokens[contexts], stop_at_layer=LAYER + 1,
                                                     names_filter=lambda n: n.startswith(f"blocks.{LAYER}.attn"))
    assert cache[f"blocks.{LAYER}.attn.hook_v"].shape[2] == world.n_kv  # hook_v really has the kv heads only
    z = cache[f"blocks.{LAYER}.attn.hook_z"][torch.arange(len(contexts)), positions]  # (e, n_heads, d_head)
    for sae, result in zip(saes, results):
        x = z.reshape(len(contexts), -1) if sae.head == "concatenated" else z[:, sae.head]
        pre = ((x - sae.b_dec) @ sae.W_enc + sae.b_enc)[torch.arange(len(contexts)), features]
        torch.testing.assert_close(result.pre_activation(), pre, atol=2e-4, rtol=1e-4)
        # the sum over sources (from v and the pattern) is each head's total (from z): v is the right kv head's
        torch.testing.assert_close(result.values.sum(dim=1), result.head_totals, atol=2e-4, rtol=1e-4)
        expected = direct_dfa(world, cache, sae, list(result.heads), positions, features)
        torch.testing.assert_close(result.values, expected, atol=1e-5, rtol=1e-4)
    assert [r.heads for r in results[1:]] == [(h,) for h in range(world.n_heads)]


def test_kept_batches_of_a_gqa_model_round_trip_through_their_state(world):
    from sparsedecomp.activations import run_accumulators

    kept = run_accumulators(world.loaded, world.tokens, {"kept": KeepBatches()}, layer=LAYER, batch_size=4)["kept"]
    keeper = KeepBatches()
    keeper.batches = list(kept)
    restored = KeepBatches()
    restored.load_state_dict(keeper.state_dict())  # v has n_key_value_heads heads, z n_heads
    assert [tuple(b.v.shape) for b in restored.batches] == [(4, CONTEXT, world.n_kv, world.d_head),
                                                            (2, CONTEXT, world.n_kv, world.d_head)]
    assert torch.equal(restored.batches[1].pattern, kept[1].pattern)


# -- the routed pinv splice ---------------------------------------------------------------------------------------------
def test_routed_pinv_splices_in_exactly_like_the_concat_sae(world):
    dictionary = world.heads.dictionary(normalize=True)
    targets, _ = concat_targets(world.concat)
    pinv = route_decomposition(world.concat, make_solver("pinv").prepare(dictionary).solve(targets), dictionary,
                               label="pinv")
    omp = route_decomposition(world.concat, make_solver("nn_omp", n_nonzero=2, tol=0.01).prepare(dictionary)
                              .solve(targets), dictionary, label="omp2")
    assert routing_error(pinv, world.concat) < 1e-4 and routing_error(omp, world.concat) > 0.05
    variants = splice_variants(world.n_heads, world.d_head, concat_sae=world.concat,
                               routed={"pinv": pinv, "omp2": omp}, heads=[0])  # one head's ablation: fewer reruns
    report = splice_losses(world.loaded, world.tokens, variants, layer=LAYER)
    assert report["concat_sae"].kl > 1e-7  # the splice changes the model's output at all
    assert report["routed_pinv"].ce_loss == pytest.approx(report["concat_sae"].ce_loss, abs=1e-5)
    assert report["routed_pinv"].kl == pytest.approx(report["concat_sae"].kl, rel=1e-2, abs=1e-7)
    assert abs(report["routed_omp2"].kl - report["concat_sae"].kl) > 1e-2 * report["concat_sae"].kl


def test_splice_losses_made_a_few_vocabulary_columns_at_a_time_equal_transformer_lens_own_loss(world, monkeypatch):
    """The splice unembeds blocks of vocabulary columns itself (final norm, unembedding, Gemma's logit soft-cap: the
    tail of TransformerLens's forward); its clean loss is TransformerLens's own."""
    import sparsedecomp.evaluation.splice as splice

    monkeypatch.setattr(splice, "LOSS_CHUNK_BYTES", 16 * world.loaded.model.cfg.d_vocab * 5)
    variants = splice_variants(world.n_heads, world.d_head, concat_sae=world.concat, heads=[0])
    report = splice_losses(world.loaded, world.tokens, variants, layer=LAYER, batch_size=4)
    with torch.no_grad():
        expected = world.loaded.model(world.tokens, return_type="loss")
    assert report["clean"].ce_loss == pytest.approx(float(expected), rel=1e-5)


# -- the dashboard command ----------------------------------------------------------------------------------------------
def write_sae_folders(root, *, d_head, model_name, heads, concat_d_in=None, model_kwargs=None):
    """SAELens 6 folders of random SAEs on layer 1's hook_z (small dictionaries: a page per feature is written): a
    concat SAE over ``heads`` and one per head."""
    extra = {} if model_kwargs is None else {"metadata_extra": {"model_from_pretrained_kwargs": model_kwargs}}
    concat = random_sae(d_in=concat_d_in or len(heads) * d_head, d_sae=6, head="concatenated", layer=LAYER,
                        model_name=model_name, seed=50)
    concat_dir = save_saelens6(concat, root / "concat", **extra)
    head_dirs = [save_saelens6(random_sae(d_in=d_head, d_sae=3, head=h, layer=LAYER, model_name=model_name, seed=h),
                               root / f"head{h}", **extra) for h in heads]
    return concat_dir, head_dirs


def dashboard_argv(root, model_folder, tokens, concat_dir, head_dirs, out):
    from safetensors.torch import save_file

    tokens_file = root / "tokens.safetensors"
    save_file({"tokens": tokens.contiguous()}, str(tokens_file))
    return ["dashboard", "--concat-sae", str(concat_dir), "--head-saes", *map(str, head_dirs), "--model",
            str(model_folder), "--tokens", str(tokens_file), "--n-contexts", "6", "--methods", "pinv",
            "--no-neuronpedia", "--no-progress", "--out", str(out)]


@pytest.mark.parametrize("name", [pytest.param("gpt2-small", marks=pytest.mark.slow),  # 5-6 s each on 2 cores
                                  pytest.param("gemma-2-2b", marks=pytest.mark.slow), "gemma-3-270m"])
def test_the_dashboard_command_writes_pages_on_each_model(worlds, name, tmp_path):
    world = worlds(name)
    concat_dir, head_dirs = write_sae_folders(tmp_path, d_head=world.d_head, model_name=world.loaded.name,
                                              heads=range(world.n_heads))
    out = tmp_path / "site"
    assert main(dashboard_argv(tmp_path, world.folder, world.tokens, concat_dir, head_dirs, out)) == 0
    assert len(list((out / "concat" / "f").glob("*.html"))) == 6
    assert all(len(list((out / f"head_{h}" / "f").glob("*.html"))) == 3 for h in range(world.n_heads))
    page = (out / "concat" / "f" / "0.html").read_text()
    record = json.loads(re.search(r'<script id="sd-feature" type="application/json">(.*?)</script>', page,
                                  re.S).group(1))
    assert "tok" in json.dumps(record)  # token text from the stand-in's tokenizer


# -- model checks before any work ----------------------------------------------------------------------------------------
def refused_line(capsys, argv):
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture
def no_model_loading(monkeypatch):
    """Loading the model's weights fails the test: the checks must refuse before it."""
    import sparsedecomp.loading as loading

    def forbidden(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were refused")

    monkeypatch.setattr(loading, "load_model", forbidden)


def test_a_folder_recording_other_processing_than_the_saes_is_refused_before_loading(standin_folders, tmp_path,
                                                                                      capsys, no_model_loading):
    # SAEs trained on gemma-2-2b loaded with from_pretrained_no_processing; the folder records the defaults
    concat_dir, head_dirs = write_sae_folders(tmp_path, d_head=256, model_name="gemma-2-2b-standin", heads=range(8),
                                              model_kwargs=NO_PROCESSING)
    out = tmp_path / "site"
    line = refused_line(capsys, dashboard_argv(tmp_path, standin_folders["gemma-2-2b"], TOKENS, concat_dir, head_dirs,
                                               out))
    assert "records other processing than the SAEs were trained with" in line
    for flag in NO_PROCESSING:
        assert f"{flag}=True in the folder but False for the SAEs" in line
    assert "refactor_factored_attn_matrices" not in line and not out.exists()


def test_heads_the_model_lacks_are_refused_before_loading(standin_folders, tmp_path, capsys, no_model_loading):
    # 6 per-head SAEs (and a concat SAE over 6 heads) for gemma-3-270m's 4 query heads
    concat_dir, head_dirs = write_sae_folders(tmp_path, d_head=256, model_name="gemma-3-270m-standin", heads=range(6))
    line = refused_line(capsys, dashboard_argv(tmp_path, standin_folders["gemma-3-270m"], TOKENS, concat_dir,
                                               head_dirs, tmp_path / "site"))
    assert "the per-head SAEs read heads [4, 5], which do not exist: the model has 4 heads per layer (0..3)" in line


def test_saes_of_another_width_are_refused_by_name(standin_folders):
    loaded = load_model(standin_folders["gemma-2-2b"])
    heads = HeadSAEs(tuple(random_sae(d_in=256, d_sae=4, head=h, layer=LAYER, model_name=loaded.name, seed=h)
                           for h in range(8)))
    # a concat SAE as wide as hook_v (4 kv heads x 256), not hook_z (8 query heads x 256)
    as_wide_as_v = random_sae(d_in=4 * 256, d_sae=4, head="concatenated", layer=LAYER, model_name=loaded.name)
    with pytest.raises(InputError, match=r"reads d_in=1024 \(4 key/value heads \* d_head: the width of hook_v / hook_k "
                                         r"under grouped-query attention, not of hook_z\) but the model's hook_z is "
                                         r"n_heads \* d_head = 8 \* 256 = 2048 wide"):
        check_model_shape(loaded, heads, as_wide_as_v)
    narrow = HeadSAEs(tuple(random_sae(d_in=64, d_sae=4, head=h, layer=LAYER, model_name=loaded.name, seed=h)
                            for h in range(8)))
    with pytest.raises(InputError, match="the model's heads have d_head=256 but the SAEs read heads of width 64"):
        check_model_shape(loaded.model.cfg, narrow)
    right = random_sae(d_in=8 * 256, d_sae=4, head="concatenated", layer=LAYER, model_name=loaded.name)
    check_model_shape(loaded, heads, right)  # the right widths pass
    assert load_model_for(ModelRequest(str(standin_folders["gemma-2-2b"])), heads, right).name == loaded.name
