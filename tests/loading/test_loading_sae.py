"""The SAE object: formulas, validation and function-preserving transformations."""

import pytest
import torch

from sparsedecomp.loading import SAE
from sparsedecomp.loading.sae import fold_legacy_scaling_factor


def manual_forward(sae, x):
    pre = (x - sae.b_dec * float(sae.apply_b_dec_to_input)) @ sae.W_enc + sae.b_enc
    f = torch.relu(pre)
    return f, f @ sae.W_dec + sae.b_dec


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_encode_decode_follow_the_formula(make_sae, apply_b_dec):
    sae = make_sae(apply_b_dec_to_input=apply_b_dec)
    x = torch.randn(5, 3, sae.d_in)
    f, recon = manual_forward(sae, x)
    torch.testing.assert_close(sae.encode(x), f)
    torch.testing.assert_close(sae.decode(f), recon)
    torch.testing.assert_close(sae.forward(x), recon)
    assert (sae.encode(x) > 0).any() and (sae.encode(x) == 0).any()
    assert (sae.d_in, sae.d_sae) == (8, 24)


def test_apply_b_dec_changes_the_code(make_sae):
    x = torch.randn(4, 8)
    with_b = make_sae(apply_b_dec_to_input=True).encode(x)
    without = make_sae(apply_b_dec_to_input=False).encode(x)
    assert not torch.allclose(with_b, without)


def test_input_width_is_checked(make_sae):
    sae = make_sae()
    with pytest.raises(ValueError, match=r"\(\.\.\., 8\)"):
        sae.encode(torch.randn(3, 9))
    with pytest.raises(ValueError, match=r"\(\.\.\., 24\)"):
        sae.decode(torch.randn(3, 8))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"b_enc": torch.zeros(23)}, "b_enc must have shape"),
        ({"W_dec": torch.zeros(8, 24)}, "W_dec must have shape"),
        ({"b_dec": torch.zeros(24)}, "b_dec must have shape"),
        ({"b_dec": torch.zeros(8, dtype=torch.float64)}, "b_dec is torch.float64"),
        ({"head": -1}, "head must be"),
        ({"head": "cat"}, "head must be"),
        ({"layer": "1"}, "layer must be"),
        ({"hook_name": ""}, "hook_name"),
    ],
)
def test_construction_names_the_problem(make_sae, change, message):
    sae = make_sae()
    fields = {k: getattr(sae, k) for k in ("W_enc", "b_enc", "W_dec", "b_dec", "apply_b_dec_to_input", "hook_name", "layer", "head", "model_name")}
    fields.update(change)
    with pytest.raises(ValueError, match=message):
        SAE(**fields)


def test_nan_weights_are_rejected(make_sae):
    sae = make_sae()
    W = sae.W_enc.clone()
    W[0, 0] = float("nan")
    with pytest.raises(ValueError, match="W_enc contains 1 NaN"):
        SAE(W, sae.b_enc, sae.W_dec, sae.b_dec, True, sae.hook_name, 1, 0, "m")


def test_input_scale_fold_is_function_preserving(make_sae):
    sae = make_sae()
    s = 3.7
    folded = sae.with_input_scale(s, reason="test")
    x = torch.randn(6, sae.d_in)
    torch.testing.assert_close(folded.encode(x), sae.encode(s * x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(folded.forward(x), sae.forward(s * x) / s, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(folded.W_enc, sae.W_enc * s)
    torch.testing.assert_close(folded.b_dec, sae.b_dec / s)
    assert folded.transformations == ("folded input scale s=3.7 (test)",)
    assert folded.provenance["input_scale"] == pytest.approx(s)
    assert sae.transformations == ()  # the original is untouched
    twice = folded.with_input_scale(2.0)
    assert twice.provenance["input_scale"] == pytest.approx(2 * s)
    with pytest.raises(ValueError, match="s must be finite and > 0"):
        sae.with_input_scale(0.0)


def test_decoder_norm_fold(make_sae):
    sae = make_sae()
    folded = sae.with_decoder_norms_folded()
    norms = sae.W_dec.norm(dim=1)
    torch.testing.assert_close(folded.W_dec.norm(dim=1), torch.ones(sae.d_sae))
    x = torch.randn(7, sae.d_in)
    torch.testing.assert_close(folded.forward(x), sae.forward(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(folded.encode(x), sae.encode(x) * norms, rtol=1e-5, atol=1e-5)
    assert folded.transformations[0].startswith("folded decoder norms into encoder")


def test_to_records_dtype_changes_only(make_sae):
    sae = make_sae()
    assert sae.to("cpu").transformations == ()
    double = sae.to(dtype=torch.float64)
    assert double.dtype == torch.float64 and double.transformations == ("cast torch.float32 -> torch.float64",)
    x = torch.randn(3, 8)
    torch.testing.assert_close(double.forward(x).float(), sae.forward(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError):
        sae.to(dtype=torch.int64)


def test_legacy_scaling_factor_fold(make_sae):
    sae = make_sae()
    ones = torch.ones(sae.d_sae)
    same, note = fold_legacy_scaling_factor(sae.W_dec, ones)
    assert note is None and same is sae.W_dec
    factor = torch.linspace(0.5, 2.0, sae.d_sae)
    W, note = fold_legacy_scaling_factor(sae.W_dec, factor)
    f = torch.rand(4, sae.d_sae)
    torch.testing.assert_close(f @ W, (f * factor) @ sae.W_dec)
    assert "scaling_factor" in note


def test_importing_the_loaders_does_not_import_sae_lens_or_transformer_lens():
    import subprocess
    import sys

    code = (
        "import sys, sparsedecomp, sparsedecomp.loading; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'sae_lens', 'transformer_lens', 'huggingface_hub'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_a_cuda_device_without_cuda_is_refused_by_name(tmp_path):
    from sparsedecomp.errors import InputError
    from sparsedecomp.loading import load_sae

    with pytest.raises(InputError, match="torch sees no CUDA device"):
        load_sae(tmp_path, device="cuda")
    with pytest.raises(InputError, match="is not a torch device"):
        load_sae(tmp_path, device="warp-drive")
