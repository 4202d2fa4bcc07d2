"""The attention releases by reference, end to end and offline: ``decompose``, ``evaluate`` and ``dashboard`` on each
release's stand-in (its real hub layout, read by SAELens's own conversion code from a local hub cache) and a
random-weight stand-in of its model (TransformerLens's configuration of gpt2-small / gemma-2-2b / gemma-3-270m, cut
to the release's layer + 1 layers, a vocabulary of 96 and an MLP of 32; the attention geometry exact), with per-head
SAEs on every query head as a researcher would train them (SAELens 6 folders; JumpReLU for the Gemma models).

The default run takes Gemma Scope 2 on gemma-3-270m (grouped-query attention with one key/value head, JumpReLU SAEs);
the Kissane release on gpt2-small and Gemma Scope 1 on gemma-2-2b (which keeps its real 16,384 features: SAELens reads
the width from the folder name) are ``slow``.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
import torch

from sparsedecomp.cli import main
from sparsedecomp.loading import (STANDIN_BOS_TOKEN_ID, ProcessingFlags, load_sae, save_saelens6,
                                  write_standin_model)
from sparsedecomp.loading.activation_rules import JumpReLU
from tests.loading.conftest import random_sae
from tests.loading.release_standins import (write_gemma_scope_2_270m_att, write_gemma_scope_2b_att,
                                            write_kissane_gpt2)

D_VOCAB, D_MLP, N_CTX, CONTEXT, N_CONTEXTS = 96, 32, 64, 12, 6

RELEASES = {  # name -> (stand-in writer and its arguments, TransformerLens model, model processing)
    "gpt2-small-hook-z-kk": (lambda put, tmp: write_kissane_gpt2(put, tmp, layer=1, d_sae=64), "gpt2-small",
                             ProcessingFlags()),
    "gemma-scope-2b-pt-att": (lambda put, tmp: write_gemma_scope_2b_att(put, tmp, layer=1, l0=20), "gemma-2-2b",
                              ProcessingFlags.none()),
    "gemma-scope-2-270m-pt-att": (lambda put, tmp: write_gemma_scope_2_270m_att(put, tmp, layer=12, d_sae=64),
                                  "gemma-3-270m", ProcessingFlags.none()),
}


def _gpt2_config(put, tmp_path) -> None:
    """gpt2's config.json in the hub cache (TransformerLens reads gpt2-small's configuration from it)."""
    from transformers import GPT2Config

    config = GPT2Config().to_dict()
    config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2", n_ctx=config["n_positions"])
    path = tmp_path / "gpt2-config.json"
    path.write_text(json.dumps(config))
    put("gpt2", "config.json", path)


def _world(release: str, tmp_path, put):
    """``(reference, concat SAE as loaded, model folder, {"full": head SAE folders, "small": ...}, tokens file)``."""
    from safetensors.torch import save_file

    write, model_name, flags = RELEASES[release]
    if model_name == "gpt2-small":
        _gpt2_config(put, tmp_path)
    standin = write(put, tmp_path / "release")
    concat = load_sae(standin.reference)
    folder = write_standin_model(model_name, tmp_path / "model", n_layers=standin.layer + 1, d_vocab=D_VOCAB,
                                 d_mlp=D_MLP, n_ctx=N_CTX, processing_flags=flags, name=concat.model_name,
                                 bias_scale=0.05)

    def head_saes(d_sae: int, where: str) -> list:
        folders = []
        for h in range(standin.n_heads):
            sae = random_sae(d_in=standin.d_head, d_sae=d_sae, head=h, layer=standin.layer,
                             model_name=concat.model_name, seed=h)
            if model_name != "gpt2-small":  # JumpReLU per-head SAEs, as trained with SAELens 6 today
                sae = replace(sae, activation=JumpReLU(torch.full((d_sae,), 0.05)))
            folders.append(save_saelens6(sae, tmp_path / where / f"h{h}",
                                         metadata_extra={"model_from_pretrained_kwargs": flags.as_kwargs()}))
        return folders

    # Full-rank block dictionaries (routed pinv is then exact) for decompose and evaluate; small ones for the
    # dashboard, which writes a page per feature.
    heads = {"full": head_saes(standin.d_head + 8, "heads"), "small": head_saes(4, "small_heads")}
    tokens = torch.randint(4, D_VOCAB, (N_CONTEXTS, CONTEXT), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = STANDIN_BOS_TOKEN_ID
    tokens_file = tmp_path / "tokens.safetensors"
    save_file({"tokens": tokens}, str(tokens_file))
    return standin.reference, concat, folder, heads, tokens_file


def _inputs(reference, folder, heads, tokens_file):
    return ["--concat-sae", reference, "--head-saes", *map(str, heads), "--model", str(folder), "--tokens",
            str(tokens_file), "--n-contexts", str(N_CONTEXTS), "--methods", "pinv", "nn_omp:n_nonzero=4",
            "--no-progress"]


@pytest.mark.parametrize("release", [pytest.param("gpt2-small-hook-z-kk", marks=pytest.mark.slow),
                                     pytest.param("gemma-scope-2b-pt-att", marks=pytest.mark.slow),
                                     pytest.param("gemma-scope-2-270m-pt-att")])
def test_decompose_evaluate_and_dashboard_run_on_a_release_by_reference(release, tmp_path, hf_cache):
    reference, concat, folder, head_sets, tokens_file = _world(release, tmp_path, hf_cache)
    heads = head_sets["full"]
    inputs = _inputs(reference, folder, heads, tokens_file)
    gemma = release != "gpt2-small-hook-z-kk"
    assert concat.activation.kind == ("jumprelu" if gemma else "relu")

    assert main(["decompose", "--concat-sae", reference, "--head-saes", *map(str, heads), "--model", str(folder),
                 "--method", "nn_omp", "--n-nonzero", "4", "--space", "both", "--no-progress",
                 "--out", str(tmp_path / "dec")]) == 0
    summary = json.loads((tmp_path / "dec" / "summary.json").read_text())
    assert summary["n_concat_features"] == concat.d_sae and summary["n_heads"] == len(heads)

    assert main(["evaluate", *inputs, "--out", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    splice = report["splice"]
    # routed pinv (a full-rank block dictionary) splices in exactly like the concat SAE, through its own rule
    assert splice["routed_pinv"]["ce_loss"] == pytest.approx(splice["concat_sae"]["ce_loss"], abs=1e-5)
    assert report["sae_quality"]["concat"]["l0"] > 0
    assert ("jumprelu" in report["sae_quality"]["concat"]["sae"]) == gemma

    if release == "gemma-scope-2b-pt-att":
        return  # 16,384 concat pages: the dashboard is exercised on the two smaller releases
    site = tmp_path / "site"
    assert main(["dashboard", *_inputs(reference, folder, head_sets["small"], tokens_file), "--no-neuronpedia",
                 "--out", str(site)]) == 0
    assert len(list((site / "concat" / "f").glob("*.html"))) == concat.d_sae
    page = (site / "concat" / "f" / "0.html").read_text()
    record = json.loads(re.search(r'<script id="sd-feature" type="application/json">(.*?)</script>', page,
                                  re.S).group(1))
    assert ("JumpReLU threshold" if gemma else "(ReLU)") in record["firing_rule"]
