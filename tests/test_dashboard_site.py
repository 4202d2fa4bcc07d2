"""The dashboard site end to end on the offline stand-in: records, links, invariants, resume."""

import hashlib
import json
import math
import re

import pytest
import torch

from benchmarks.standins import TINY, write_standin
from sparsedecomp.dashboards.gather import gather_dashboard_data
from sparsedecomp.dashboards.records import DFA_LEVELS, dfa_values, quantize_dfa
from sparsedecomp.dashboards.site import write_site
from sparsedecomp.jobs.solve import decompose_settings
from sparsedecomp.loading import load_head_saes, load_model, load_sae
from sparsedecomp.solver_settings import SolverSetting


def stub_render(kind, **context):
    """A page that holds its record / index data, as the real templates do."""
    if kind == "feature":
        return f'<script id="sd-feature" type="application/json">{context["record_json"]}</script>\n'
    return f"<p>{kind}</p>\n"


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    return write_standin(tmp_path_factory.mktemp("standin"), config=TINY, head_d_sae=48, concat_d_sae=128, n_rows=6,
                         record_local_dataset=True)


@pytest.fixture(scope="module")
def inputs(standin):
    concat = load_sae(str(standin.concat_dir), version=standin.concat_version)
    heads = load_head_saes([str(p) for p in standin.head_runs])
    loaded = load_model(str(standin.model_dir), flags=None)
    torch.manual_seed(0)
    tokens = torch.randint(1, loaded.model.cfg.d_vocab, (12, 16))
    tokens[:, 0] = 0
    decompositions = decompose_settings(concat, heads, [SolverSetting("nn_omp", {"n_nonzero": 4})], log=lambda s: None)
    return loaded, tokens, heads, concat, decompositions


LEFT, RIGHT = 5, 2  # the world's windows: shorter than a context


@pytest.fixture(scope="module")
def world(inputs):
    return gather_dashboard_data(*inputs, top_k=5, quantile_groups=3, examples_per_group=2, left=LEFT, right=RIGHT)


def test_replaying_the_first_pass_gives_what_running_the_model_again_gives(inputs, world):
    from sparsedecomp.dashboards.replay import cache_bytes

    loaded, tokens, heads, concat, decompositions = inputs
    assert cache_bytes(loaded.model.cfg, *tokens.shape) <= 2**20  # the fixture's data was gathered by replay
    rerun = gather_dashboard_data(loaded, tokens, heads, concat, decompositions, top_k=5, quantile_groups=3,
                                  examples_per_group=2, left=5, right=2, cache_budget=0, batch_size=5)
    for name, g in world.saes.items():
        other = rerun.saes[name]
        assert torch.equal(g.examples.context, other.examples.context)
        torch.testing.assert_close(g.window_acts, other.window_acts, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g.dfa, other.dfa, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g.dfa_before_window, other.dfa_before_window, rtol=1e-5, atol=1e-5)
        assert g.window_acts.abs().sum() > 0 and g.dfa.abs().sum() > 0


def raw_encoders(standin):
    """``name -> (W_enc, b_enc, b_dec, subtract b_dec, heads it reads)`` straight from the checkpoint files (no
    package loader): the Kissane .pt (which always subtracts b_dec) and each legacy SAELens safetensors + cfg.json."""
    from safetensors.torch import load_file

    (pt,) = standin.concat_dir.rglob("*.pt")
    w = torch.load(pt, weights_only=True)
    out = {"concat": (w["W_enc"], w["b_enc"], w["b_dec"], True, tuple(range(TINY["n_heads"])))}
    for h, run in enumerate(standin.head_runs):
        (path,) = run.glob("final_*/*/sae_weights.safetensors")
        w, cfg = load_file(str(path)), json.loads((path.parent / "cfg.json").read_text())
        assert torch.equal(w["scaling_factor"], torch.ones_like(w["scaling_factor"]))  # it scales the decoder only
        out[f"head_{h}"] = (w["W_enc"], w["b_enc"], w["b_dec"], cfg["apply_b_dec_to_input"], (h,))
    return out


def test_window_activations_and_dfa_match_transformer_lens_and_the_raw_weights(standin, inputs, world):
    """The gathered windows against an independent computation: each example's context run alone through
    TransformerLens's run_with_cache, the feature's activation relu((z - b_dec) @ W_enc + b_enc) at every window
    position, and its DFA by source and head, pattern[h, position, src] * (v[src, h] . W_enc[B_h, f]), summing with
    the bias terms to the pre-activation."""
    loaded, tokens, *_ = inputs
    d_head, size = TINY["d_head"], tokens.shape[1]
    caches = {}
    checked = with_sources_before = n_firing = 0
    for name, (W_enc, b_enc, b_dec, subtract, heads) in raw_encoders(standin).items():
        g = world.saes[name]
        assert g.dfa_heads == heads
        # a few examples of each SAE, spread over its features: three top examples and three quantile-group ones
        picks = set()
        for slots in (g.examples.group < 0, g.examples.group >= 0):
            filled = ((g.examples.context >= 0) & slots).nonzero().tolist()
            picks |= {tuple(filled[i]) for i in torch.linspace(0, len(filled) - 1, 3).round().long().tolist()}
        for f, e in sorted(picks):
            c, p = int(g.examples.context[f, e]), int(g.examples.position[f, e])
            if c not in caches:
                with torch.no_grad():
                    caches[c] = loaded.model.run_with_cache(tokens[c : c + 1])[1]
            cache = caches[c]
            z = cache["blocks.1.attn.hook_z"][0]  # (position, head, d_head)
            pattern, v = cache["blocks.1.attn.hook_pattern"][0], cache["blocks.1.attn.hook_v"][0]
            x = z[:, list(heads)].reshape(size, -1)
            pre = (x - b_dec * subtract) @ W_enc[:, f] + b_enc[f]
            # the ranked token and its window, position p - LEFT .. p + RIGHT
            assert float(g.examples.value[f, e]) == pytest.approx(float(torch.relu(pre[p])), rel=1e-4, abs=1e-6)
            for i, pos in enumerate(range(p - LEFT, p + RIGHT + 1)):
                inside = 0 <= pos < size
                assert int(g.windows.token_ids[f, e, i]) == (int(tokens[c, pos]) if inside else -1)
                want = float(torch.relu(pre[pos])) if inside else 0.0
                assert float(g.window_acts[f, e, i]) == pytest.approx(want, rel=1e-4, abs=1e-5), (name, f, e, i)
                n_firing += want > 0
            # DFA by source and head: window sources up to p, the sources before the window summed apart
            for k, h in enumerate(heads):
                w_block = W_enc[k * d_head : (k + 1) * d_head, f]
                by_source = pattern[h, p, :] * (v[:, h] @ w_block)  # (src,), 0 after p (causal pattern)
                for i, pos in enumerate(range(p - LEFT, p + RIGHT + 1)):
                    want = float(by_source[pos]) if 0 <= pos <= p else 0.0
                    assert float(g.dfa[f, e, i, k]) == pytest.approx(want, rel=1e-4, abs=1e-5), (name, f, e, i, h)
                before = float(by_source[: max(p - LEFT, 0)].sum())
                assert float(g.dfa_before_window[f, e, k]) == pytest.approx(before, rel=1e-4, abs=1e-5)
                with_sources_before += p - LEFT > 0
            bias_decoder = -float(b_dec @ W_enc[:, f]) if subtract else 0.0
            assert float(g.dfa_bias_encoder[f]) == pytest.approx(float(b_enc[f]), rel=1e-6)
            assert float(g.dfa_bias_decoder[f]) == pytest.approx(bias_decoder, rel=1e-5, abs=1e-7)
            total = float(g.dfa[f, e].sum() + g.dfa_before_window[f, e].sum()) + float(b_enc[f]) + bias_decoder
            assert total == pytest.approx(float(pre[p]), rel=1e-4, abs=1e-5)
            checked += 1
    assert checked == 6 * len(world.saes) and with_sources_before > 0 and n_firing > checked


def token_str(i):
    return f"t{i}"


def write_site_into(world, out, **options):
    """The site written through the one writer, as the dashboard job writes it."""
    from sparsedecomp.outputs import RunWriter

    with RunWriter(out, command="dashboard") as writer:
        return write_site(world, writer, **options)


def same_manifest(a, b):
    """Two manifests equal apart from when their runs started and finished."""
    drop = ("started_unix", "finished_unix")
    return ({k: v for k, v in json.loads(a.read_text()).items() if k not in drop}
            == {k: v for k, v in json.loads(b.read_text()).items() if k not in drop})


@pytest.fixture(scope="module")
def site(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("site") / "dash"
    write_site_into(world, out, token_str=token_str, render_page=stub_render, batch_size=32)
    return out


def assert_manifest_lists_the_folder(out):
    """Every file in ``out``'s manifest has the listed size and SHA-256 (hashlib on its bytes), and every file on
    disk but the manifest itself is listed."""
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is True
    for name, meta in manifest["files"].items():
        data = (out / name).read_bytes()
        assert meta == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert on_disk - {"manifest.json"} == set(manifest["files"])
    return manifest


def records(out):
    for page in sorted(out.glob("*/f/*.html")):
        text = page.read_text()
        body = re.search(r'<script id="sd-feature" type="application/json">(.*)</script>', text, re.S).group(1)
        yield page, json.loads(body)


def test_every_page_is_written_and_every_href_resolves(world, site):
    n_pages = sum(g.sae.d_sae for g in world.saes.values())
    assert len(list(site.glob("*/f/*.html"))) == n_pages
    n_links = 0
    for page, rec in records(site):
        hrefs = [c["href"] for c in rec["correlated"]] + [u["href"] for u in rec["used_by"]]
        hrefs += [a["href"] for p in rec["decomposition"] for a in p["atoms"]]
        for href in hrefs:
            assert (page.parent / href).resolve().is_file(), (page, href)
        n_links += len(hrefs)
    assert n_links > n_pages
    for rel in ("index.html", "assets/plotly.min.js", "concat/index.html", "concat/features.js",
                "neuronpedia/concat.json", "neuronpedia/head_0.json", "manifest.json", "dashboard_state.json"):
        assert (site / rel).is_file(), rel


def test_the_site_manifest_lists_every_file_with_its_true_size_and_sha256(world, site):
    manifest = assert_manifest_lists_the_folder(site)
    n_pages = sum(g.sae.d_sae for g in world.saes.values())
    assert sum(name.endswith(".html") and "/f/" in name for name in manifest["files"]) == n_pages
    assert {"assets/plotly.min.js", "assets/dashboard.js", "assets/dashboard.css", "index.html",
            "dashboard_state.json"} <= set(manifest["files"])


def test_the_site_ships_the_packages_assets_byte_for_byte(site):
    from importlib import resources

    import plotly.offline

    packaged = {p.name: p.read_bytes() for p in (resources.files("sparsedecomp.dashboards") / "assets").iterdir()
                if p.is_file()}
    assert set(packaged) == {"dashboard.js", "dashboard.css"}
    written = {p.name: p.read_bytes() for p in (site / "assets").iterdir()}
    assert written == {**packaged, "plotly.min.js": plotly.offline.get_plotlyjs().encode("utf-8")}


def test_density_histogram_counts_every_feature_of_the_sae_once(world, site):
    by_sae = {}
    for _, rec in records(site):
        by_sae.setdefault(rec["sae"], []).append(rec)
    for name, recs in by_sae.items():
        hist = recs[0]["density_histogram"]
        assert all(r["density_histogram"] == hist for r in recs)  # one figure per SAE
        edges, counts = hist["log10_edges"], hist["counts"]
        assert sum(counts) + hist["n_dead"] == world.saes[name].sae.d_sae == len(recs)
        assert hist["n_dead"] == sum(r["n_firing"] == 0 for r in recs)
        assert edges[-1] == 0 and edges[0] <= math.log10(1 / recs[0]["n_tokens"])
        # each firing feature's density falls in a bin, and the bins' counts are those features
        expected = [0] * len(counts)
        for r in recs:
            if r["n_firing"]:
                x = math.log10(r["n_firing"] / r["n_tokens"])
                expected[min(len(counts) - 1, max(i for i, e in enumerate(edges[:-1]) if e <= x + 1e-9))] += 1
        assert counts == expected


def test_histograms_count_tokens_and_left_out_tokens_are_marked(world, site):
    n_with_bos = 0
    for _, rec in records(site):
        hist = rec["activation_histogram"]
        # counts estimate tokens: exact when the sample holds every non-zero activation, else scaled from it
        assert hist["sample_size"] == min(rec["n_firing"], world.saes[rec["sae"]].data.sample_values.shape[1])
        if rec["n_firing"] and hist["sample_size"] == rec["n_firing"]:
            assert sum(hist["counts"]) == rec["n_firing"]
        elif rec["n_firing"]:
            assert abs(sum(hist["counts"]) - rec["n_firing"]) <= len(hist["counts"])
        for e in rec["examples"]["top"]:
            bos_index = e["focus"] - e["position"]  # where position 0 is in the window, if it is
            if bos_index >= 0:
                n_with_bos += 1
                assert bos_index in e["left_out"] and e["acts"][bos_index] == 0
            assert e["focus"] not in e["left_out"]
    assert n_with_bos > 10


def test_densities_and_quantile_groups(site):
    n_groups = 0
    for _, rec in records(site):
        assert 0.0 <= rec["density"] <= 1.0
        groups = rec["examples"]["quantiles"]
        for a, b in zip(groups, groups[1:]):
            assert a["hi"] <= b["lo"] + 1e-6 * abs(b["lo"]) or a["hi"] == b["lo"]
        for g in groups:
            assert g["lo"] > 0
            for e in g["examples"]:
                assert g["lo"] * (1 - 1e-3) <= e["value"] <= g["hi"] * (1 + 1e-3)
                assert e["value"] > 0
                assert e["acts"][e["focus"]] == pytest.approx(e["value"], rel=1e-3, abs=1e-5)
            n_groups += 1
        for e in rec["examples"]["top"]:
            assert e["acts"][e["focus"]] == pytest.approx(e["value"], rel=1e-3, abs=1e-5)
    assert n_groups > 0


def test_dfa_by_head_plus_bias_is_the_pre_activation(site):
    checked = before_window = sources_before = 0
    for _, rec in records(site):
        for e in rec["examples"]["top"]:
            dfa = e["dfa"]
            assert all(isinstance(q, int) and abs(q) <= DFA_LEVELS + 1 for row in dfa["heads"] for q in row)
            assert max(abs(q) for row in dfa["heads"] for q in row) >= DFA_LEVELS - 1  # the unit is max / levels
            terms = [v for row in dfa_values(dfa) for v in row] + dfa["before_window"]
            pre = sum(terms) + dfa["bias"]["encoder"] + dfa["bias"]["decoder"]
            # Each window term is within unit / 2 of its value (plus its DIGITS rounding), the other terms and the
            # value are rounded to DIGITS: the sum can be off by that much.
            bound = len(terms) * dfa["unit"] / 2 + 1e-3 * (sum(abs(v) for v in terms) + abs(e["value"])) + 1e-6
            assert abs(pre - e["value"]) <= bound
            checked += 1
            before_window += e["position"] - e["focus"] > 0
            sources_before += any(abs(v) > 1e-3 * abs(e["value"]) for v in dfa["before_window"])
    assert checked > 100
    # windows shorter than the contexts: many examples have sources before their window, and they carry DFA
    assert before_window > 50 and sources_before > 50


def test_quantized_dfa_is_within_half_a_unit_of_the_gathered_dfa():
    torch.manual_seed(0)
    dfa = torch.randn(3, 4, 8, 17) * torch.logspace(-6, 1, 17)
    dfa[1, 2] = 0.0
    units, q = quantize_dfa(dfa)
    units, q = torch.tensor(units, dtype=torch.float64), torch.tensor(q, dtype=torch.float64)
    assert units[1, 2] == 0 and (q[1, 2] == 0).all()
    err = (q * units[..., None, None] - dfa.double()).abs()
    assert (err <= units[..., None, None] / 2 + 1e-12).all()
    assert (q.abs().amax(dim=(-2, -1))[0] - DFA_LEVELS).abs().max() <= 1


def test_back_links_are_the_inverse_of_the_decomposition_links(site):
    forward, backward = set(), set()
    for _, rec in records(site):
        for p in rec["decomposition"]:
            for a in p["atoms"]:
                forward.add((p["label"], rec["feature"], a["head"], a["feature"], a["coefficient"]))
        for u in rec["used_by"]:
            backward.add((u["label"], u["feature"], int(rec["sae"].split("_")[1]), rec["feature"], u["coefficient"]))
    assert forward and forward == backward


def test_interrupted_run_rerun_gives_the_same_site(world, site, tmp_path):
    out = tmp_path / "dash"

    class Stop(Exception):
        pass

    def stop_after_two(name, batch):
        if (name, batch) == ("concat", 1):
            raise Stop

    with pytest.raises(Stop):
        write_site_into(world, out, token_str=token_str, render_page=stub_render, batch_size=32, after_batch=stop_after_two)
    state = json.loads((out / "dashboard_state.json").read_text())
    assert state["finished"] == {"concat": [0, 1]}
    rerun = write_site_into(world, out, token_str=token_str, render_page=stub_render, batch_size=32)
    assert rerun.batches_skipped == 2
    assert_manifest_lists_the_folder(out)  # the kept pages are listed with their true sizes and hashes too
    files = sorted(p.relative_to(site) for p in site.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    for rel in files:
        if rel.name == "manifest.json":
            assert same_manifest(site / rel, out / rel)
        else:
            assert (site / rel).read_bytes() == (out / rel).read_bytes(), rel


def test_a_rewritten_site_is_unfinished_until_done_then_drops_its_stale_files(world, site, tmp_path):
    import shutil

    out = tmp_path / "dash"
    shutil.copytree(site, out)
    assert json.loads((out / "manifest.json").read_text())["complete"] is True
    assert (out / "neuronpedia" / "concat.json").is_file()

    class Stop(Exception):
        pass

    def stop_at_once(name, batch):
        raise Stop

    # other inputs (another batch size), interrupted: the folder must not still say it is a complete site
    with pytest.raises(Stop):
        write_site_into(world, out, token_str=token_str, render_page=stub_render, batch_size=16, neuronpedia=False,
                   after_batch=stop_at_once)
    assert json.loads((out / "manifest.json").read_text())["complete"] is False
    rerun = write_site_into(world, out, token_str=token_str, render_page=stub_render, batch_size=16, neuronpedia=False)
    assert rerun.batches_skipped == 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is True and not (out / "neuronpedia").exists()
    assert not any(name.startswith("neuronpedia/") for name in manifest["files"])
    assert_manifest_lists_the_folder(out)  # nothing left that the site does not list


def test_a_folder_of_another_command_is_refused(world, tmp_path):
    from sparsedecomp.errors import InputError
    from sparsedecomp.outputs import RunWriter

    run = tmp_path / "run"
    with RunWriter(run, command="evaluate") as writer:
        writer.write_text("report.html", "<p>report</p>")
    with pytest.raises(InputError, match="holds a `sparsedecomp evaluate` run, which `sparsedecomp dashboard` would"):
        write_site_into(world, run, token_str=token_str, render_page=stub_render)
    assert (run / "report.html").read_text() == "<p>report</p>"


NEURONPEDIA_BATCH = {"model_id", "layer", "sae_set", "sae_id_suffix", "features"}
NEURONPEDIA_FEATURE = {
    "feature_index", "neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
    "correlated_neurons_indices", "correlated_neurons_l1", "correlated_neurons_pearson", "correlated_features_indices",
    "correlated_features_l1", "correlated_features_pearson", "neg_str", "neg_values", "pos_str", "pos_values",
    "frac_nonzero", "freq_hist_data_bar_values", "freq_hist_data_bar_heights", "logits_hist_data_bar_heights",
    "logits_hist_data_bar_values", "n_prompts_total", "n_tokens_in_prompt", "dataset", "decoder_weights_dist",
    "activations", "vector"}
NEURONPEDIA_ACTIVATION = {"bin_min", "bin_max", "bin_contains", "tokens", "values", "qualifying_token_index",
                          "dfa_values", "dfa_maxValue", "dfa_targetIndex"}
"""Neuronpedia's batch feature JSON keys, as listed in ../shared/docs/anchors.md (what SAEDashboard's converter
writes)."""


def test_neuronpedia_export_has_every_key_and_the_pages_numbers(world, site):
    for name, g in world.saes.items():
        batch = json.loads((site / "neuronpedia" / f"{name}.json").read_text())
        assert NEURONPEDIA_BATCH <= set(batch)
        assert [f["feature_index"] for f in batch["features"]] == list(range(g.sae.d_sae))
        pages = {rec["feature"]: rec for page, rec in records(site) if rec["sae"] == name}
        for feature in batch["features"]:
            # every Neuronpedia key, plus only this package's own extras (prefixed sd_)
            assert NEURONPEDIA_FEATURE <= set(feature)
            assert all(k.startswith("sd_") for k in set(feature) - NEURONPEDIA_FEATURE)
            rec = pages[feature["feature_index"]]
            assert feature["frac_nonzero"] == pytest.approx(rec["density"], rel=1e-3, abs=1e-9)
            assert len(feature["vector"]) == g.sae.d_in
            top = [a for a in feature["activations"] if a["bin_min"] == -1]
            assert len(top) == len(rec["examples"]["top"])
            for activation in feature["activations"]:
                assert NEURONPEDIA_ACTIVATION <= set(activation)
                assert len(activation["tokens"]) == len(activation["values"])
                i = activation["qualifying_token_index"]
                assert 0 <= i < len(activation["values"])
            for a in top:
                assert a["bin_contains"] == -1
            groups = rec["examples"]["quantiles"]
            assert all(a["bin_contains"] == round(rec["n_firing"] / len(groups))
                       for a in feature["activations"] if a["bin_min"] != -1)
            # similar features are decoder cosines: exported as this package's own, not as activation correlations
            assert feature["correlated_features_pearson"] == [] and \
                feature["sd_similar_decoder_indices"] == [c["feature"] for c in rec["correlated"]]


def test_tensor_rounding_equals_rounding_one_number_at_a_time():
    from sparsedecomp.dashboards.records import DIGITS, r, round_significant

    g = torch.Generator().manual_seed(0)
    values = torch.randn(4000, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-12, 12, (4000,), generator=g)
    values = torch.cat([values, torch.tensor([0.0, -0.0, 1.0, 0.5, 99995.0, 1e-300])])
    for digits in (3, DIGITS):
        rounded = round_significant(values, digits).tolist()
        expected = [float(f"{v:.{digits}g}") for v in values.tolist()]
        mismatched = [(v, a, b) for v, a, b in zip(values.tolist(), rounded, expected) if a != b]
        # exact halfway cases may round either way (binary doubles are rarely exact halves); nothing else may differ
        assert len(mismatched) <= 2, mismatched[:5]
    assert r(float("nan")) is None
