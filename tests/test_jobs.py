"""The job layer: one decomposition driver (each setting solved once per run), targets that never overflow, inputs
resolved by one set of rules (scales, model loading flags, BOS from the tokenizer)."""

import math

import pytest
import torch

from sparsedecomp.jobs import solve as solve_module
from sparsedecomp.jobs.inputs import (SCALE_ESTIMATE_CONTEXTS, check_feature_selection, fold_input_scales,
                                      parse_feature_ranges, recorded_model_loading, resolve_tokens, TokenRequest)
from sparsedecomp.jobs.solve import Decomposer, concat_targets, unit_rows
from sparsedecomp.loading import SAE, HeadSAEs, ProcessingFlags
from sparsedecomp.solver_settings import SolverSetting
from sparsedecomp.errors import InputError

N_HEADS, D_HEAD, D_SAE = 3, 4, 10


def _sae(d_in, d_sae, head, seed):
    g = torch.Generator().manual_seed(seed)
    return SAE(W_enc=torch.randn(d_in, d_sae, generator=g), b_enc=torch.zeros(d_sae),
               W_dec=torch.randn(d_sae, d_in, generator=g), b_dec=torch.zeros(d_in), apply_b_dec_to_input=False,
               hook_name="blocks.0.attn.hook_z", layer=0, head=head, model_name="m")


@pytest.fixture
def saes():
    heads = HeadSAEs(tuple(_sae(D_HEAD, D_SAE, h, h) for h in range(N_HEADS)))
    return _sae(N_HEADS * D_HEAD, 16, "concatenated", 7), heads


def test_each_setting_is_solved_once_per_run(saes, monkeypatch):
    concat, heads = saes
    calls = []
    real = solve_module.make_solver

    def counting(method, **params):
        calls.append(method)
        return real(method, **params)

    monkeypatch.setattr(solve_module, "make_solver", counting)
    decomposer = Decomposer(concat, heads)
    setting = SolverSetting("nn_omp", {"n_nonzero": 4, "tol": 0.01})
    first = decomposer.solve(setting)
    built = len(calls)  # solver_params builds the solver once to validate it, then the solve builds it
    again = decomposer.solve(SolverSetting("nn_omp", {"n_nonzero": 4, "tol": 0.01}))
    assert again is first and len(calls) == built + 1  # validated again, never solved again
    both = decomposer.solve_all([setting, SolverSetting("pinv")])
    assert both["nn_omp_n_nonzero4_tol0.01"] is first.decomposition and len(calls) == built + 1 + 1 + 2


def test_rows_of_any_finite_size_give_the_same_unit_direction():
    row = torch.tensor([[3.0, -4.0, 0.0, 12.0]])
    big = torch.cat([row, row * 1e30, row / row.abs().max() * torch.finfo(torch.float32).max])
    unit, norms = unit_rows(big)
    assert torch.isfinite(unit).all()
    torch.testing.assert_close(unit, (row / 13.0).expand(3, -1), rtol=1e-6, atol=0)
    assert norms[0] == pytest.approx(13.0) and norms[1] == pytest.approx(13e30, rel=1e-6)
    assert math.isfinite(float(norms[2])) and float(norms[2]) > torch.finfo(torch.float32).max  # kept in float64
    with pytest.raises(InputError, match=r"rows \[1\] hold NaN or infinite values"):
        unit_rows(torch.tensor([[1.0, 2.0], [float("inf"), 0.0]]))


def test_a_concat_sae_with_huge_decoder_rows_decomposes_as_the_unit_one(saes):
    concat, heads = saes
    from dataclasses import replace

    huge = replace(concat, W_dec=concat.W_dec * 1e30)
    setting = SolverSetting("nn_omp", {"n_nonzero": 4, "tol": 0.01})
    plain = Decomposer(concat, heads).solve(setting).decomposition
    scaled = Decomposer(huge, heads).solve(setting).decomposition
    torch.testing.assert_close(scaled.codes.to_dense(), plain.codes.to_dense(), rtol=1e-5, atol=1e-6)
    assert bool((scaled.codes.to_dense().abs().sum(1) > 0).all())  # no zero code passed off as CONVERGED
    note = concat_targets(huge)[1]
    assert note.norm_min > 1e29


def test_feature_ranges_are_checked_before_they_are_expanded():
    ranges = parse_feature_ranges("0-99999999999")
    with pytest.raises(InputError, match=r"features \['0-99999999999'\] are out of range: the concat SAE has 16"):
        check_feature_selection(ranges, 16)
    assert check_feature_selection(parse_feature_ranges("3,0-1"), 16).tolist() == [3, 0, 1]
    with pytest.raises(InputError, match="repeats"):
        check_feature_selection(parse_feature_ranges("0-3,2"), 16)


def test_recorded_model_kwargs_become_flags_and_from_pretrained_arguments():
    class Heads:
        model_from_pretrained_kwargs = {"center_writing_weights": False, "n_devices": 1}

    flags, extra = recorded_model_loading(Heads())
    assert flags == ProcessingFlags(center_writing_weights=False) and extra == {"n_devices": 1}

    class Nothing:
        model_from_pretrained_kwargs = None

    assert recorded_model_loading(Nothing()) == (None, {})


def test_the_concat_saes_recorded_processing_counts_and_a_disagreement_is_refused():
    """A Gemma Scope concat SAE records the unprocessed model: with per-head SAEs that record nothing, the model is
    loaded unprocessed; with per-head SAEs trained on a processed model, the run is refused naming both sides."""
    unprocessed = ProcessingFlags.none().as_kwargs()

    class Concat:
        model_from_pretrained_kwargs = unprocessed

        def describe(self):
            return "the concat SAE"

    class Silent:
        model_from_pretrained_kwargs = None

    class Processed:
        model_from_pretrained_kwargs = {"center_writing_weights": False}

    flags, _ = recorded_model_loading(Silent(), Concat())
    assert flags == ProcessingFlags.none()
    with pytest.raises(InputError, match=r"differently processed models, so they read different hook_z: the per-head "
                                         r"SAEs: fold_ln=True.*; the concat SAE: fold_ln=False"):
        recorded_model_loading(Processed(), Concat())


def test_a_recorded_training_scale_wins_and_is_said(saes):
    _, heads = saes
    from dataclasses import replace

    needing = heads.map(lambda sae: replace(sae, provenance={**sae.provenance, "needs_input_scale": True}))
    assert needing.heads_needing_input_scale == (0, 1, 2)
    folded, note = fold_input_scales(needing, None, None, recorded={0: 2.0, 1: 0.5, 2: 1.0}, recorded_source="a build")
    assert note == "the training scales recorded by a build"
    torch.testing.assert_close(folded[0].W_enc, needing[0].W_enc * 2.0)
    with pytest.raises(InputError, match="positive and finite"):
        fold_input_scales(needing, None, None, recorded={0: 2.0, 1: -1.0, 2: 1.0})


def test_a_tokens_file_of_the_demo_starts_with_bos_from_the_models_tokenizer(tmp_path):
    """`evaluate --tokens` on the demo used to record starts_with_bos: false (no tokenizer named BOS)."""
    from safetensors.torch import save_file

    from sparsedecomp.demo import demo_tokens
    from sparsedecomp.demo.layout import ARTIFACTS_DIR
    from sparsedecomp.loading import load_model

    tokens = demo_tokens(4).tokens
    path = tmp_path / "t.safetensors"
    save_file({"tokens": tokens.contiguous()}, str(path))
    loaded = load_model(ARTIFACTS_DIR / "model")
    resolved = resolve_tokens(TokenRequest(tokens_file=path), loaded, head_saes=())
    assert resolved.describe()["starts_with_bos"] is True and resolved.bos_token_id == 0
    assert SCALE_ESTIMATE_CONTEXTS == 64
