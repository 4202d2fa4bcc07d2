"""Every SAELens 6 inference architecture, read from folders SAELens itself wrote: ``encode`` equals SAELens's own.

The SAEs are SAELens's classes with random weights (thresholds, gates and magnitudes made non-trivial), saved with
their own ``save_model`` (inference SAEs) or ``save_inference_model`` (BatchTopK / Matryoshka training SAEs, which
SAELens writes as JumpReLU SAEs); the loaded :class:`SAE` must encode float32 inputs as SAELens does, to rounding.
"""

from __future__ import annotations

import json

import pytest
import torch

from sparsedecomp.loading import SAE, UnsupportedCheckpointError, load_sae, save_saelens6
from sparsedecomp.loading.activation_rules import Gated, JumpReLU, ReLU, TopK
from sparsedecomp.loading.errors import CheckpointError
from sparsedecomp.errors import InputError

# SAELens warns, on every SAE built with model_from_pretrained_kwargs, to load the model with them: these SAEs record
# some on purpose (the loaded SAE must keep them).
pytestmark = pytest.mark.filterwarnings(r"ignore:\s*This SAE has non-empty model_from_pretrained_kwargs:UserWarning")

N_HEADS, D_HEAD, D_SAE, K = 4, 8, 96, 7
D_IN = N_HEADS * D_HEAD
HOOK = "blocks.1.attn.hook_z"


def _metadata():
    from sae_lens.saes.sae import SAEMetadata

    return SAEMetadata(model_name="gelu-2l", hook_name=HOOK, hook_head_index=None, prepend_bos=True,
                       context_size=64, model_from_pretrained_kwargs={"fold_value_biases": False})


def _randomize(sae, seed: int):
    """Random values for every parameter (SAELens initialises biases and thresholds to zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sae.named_parameters():
            param.copy_(torch.randn(param.shape, generator=g) * (0.3 if param.ndim == 2 else 0.1))
        if hasattr(sae, "threshold"):
            sae.threshold.copy_(torch.rand(sae.threshold.shape, generator=g) * 0.3)
    return sae


def _lens_sae(architecture: str, seed: int = 0, **extra):
    from sae_lens import GatedSAE, GatedSAEConfig, JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig
    from sae_lens import TopKSAE, TopKSAEConfig

    classes = {"standard": (StandardSAE, StandardSAEConfig), "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig),
               "topk": (TopKSAE, TopKSAEConfig), "gated": (GatedSAE, GatedSAEConfig)}
    cls, cfg_cls = classes[architecture]
    cfg = cfg_cls(d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=extra.pop("apply_b_dec_to_input", True),
                  metadata=_metadata(), **extra)
    return _randomize(cls(cfg), seed)


def _trained_for_inference(architecture: str, tmp_path, seed: int = 0):
    """A BatchTopK or Matryoshka BatchTopK training SAE written by SAELens's save_inference_model (as JumpReLU)."""
    from sae_lens import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, JumpReLUSAE
    from sae_lens.saes.matryoshka_batchtopk_sae import (MatryoshkaBatchTopKTrainingSAE,
                                                        MatryoshkaBatchTopKTrainingSAEConfig)

    if architecture == "batchtopk":
        sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, metadata=_metadata()))
    else:
        sae = MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(
            d_in=D_IN, d_sae=D_SAE, k=K, matryoshka_widths=[24, 48, D_SAE], metadata=_metadata()))
    _randomize(sae, seed)
    sae.topk_threshold = torch.tensor(0.05, dtype=torch.double)
    sae.save_inference_model(tmp_path / architecture)
    return JumpReLUSAE.load_from_disk(tmp_path / architecture), tmp_path / architecture


CASES = [("standard", {}), ("jumprelu", {}), ("topk", {"k": K}), ("topk", {"k": K, "rescale_acts_by_decoder_norm": True}),
         ("gated", {}), ("jumprelu", {"apply_b_dec_to_input": False})]
RULE_OF = {"standard": ReLU, "jumprelu": JumpReLU, "topk": TopK, "gated": Gated}


def _inputs(seed: int = 5, n: int = 300) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed))


def _assert_same_codes(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Equal to rounding, and the same features fire (a feature at its threshold within rounding may differ: none
    does on these random inputs)."""
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert torch.equal(ours > 0, theirs > 0)


@pytest.mark.parametrize("architecture, extra", CASES, ids=[f"{a}-{'-'.join(e)}" for a, e in CASES])
def test_encode_equals_saelens_on_a_folder_saelens_wrote(tmp_path, architecture, extra):
    lens = _lens_sae(architecture, **dict(extra))
    lens.save_model(tmp_path / "sae")
    sae = load_sae(tmp_path / "sae")
    assert isinstance(sae.activation, RULE_OF[architecture])
    assert sae.provenance["architecture"] == architecture and sae.head == "concatenated" and sae.layer == 1
    # SAELens trained on from_pretrained_no_processing(fold_value_biases=False): every flag off
    assert sae.model_from_pretrained_kwargs == {"fold_ln": False, "center_writing_weights": False,
                                                "center_unembed": False, "fold_value_biases": False,
                                                "refactor_factored_attn_matrices": False}
    x = _inputs()
    with torch.no_grad():
        theirs = lens.encode(x)
        _assert_same_codes(sae.encode(x), theirs)
        # The decoder agrees too: the reconstruction SAELens computes from its own codes.
        torch.testing.assert_close(sae.decode(sae.encode(x)), lens.decode(theirs), rtol=1e-5, atol=1e-5)
    if architecture == "topk":
        assert int((theirs > 0).sum(1).max()) <= K


@pytest.mark.parametrize("architecture", ["batchtopk", "matryoshka_batchtopk"])
def test_batchtopk_and_matryoshka_saved_for_inference_load_as_jumprelu(tmp_path, architecture):
    lens, folder = _trained_for_inference(architecture, tmp_path)
    sae = load_sae(folder)
    assert isinstance(sae.activation, JumpReLU)
    torch.testing.assert_close(sae.activation.threshold, torch.full((D_SAE,), 0.05))
    x = _inputs()
    with torch.no_grad():
        _assert_same_codes(sae.encode(x), lens.encode(x))


def test_a_hook_z_reshaping_saelens_sae_reads_flattened_z(tmp_path):
    """SAELens's reshape_activations='hook_z' SAE reads (n, n_heads, d_head); ours reads the same z flattened."""
    lens = _lens_sae("jumprelu", reshape_activations="hook_z")
    lens.save_model(tmp_path / "sae")
    sae = load_sae(tmp_path / "sae")
    x = _inputs()
    with torch.no_grad():
        _assert_same_codes(sae.encode(x), lens.encode(x.reshape(-1, N_HEADS, D_HEAD)))


@pytest.mark.parametrize("architecture, extra", CASES, ids=[f"{a}-{'-'.join(e)}" for a, e in CASES])
def test_saved_back_saelens_reads_the_same_sae(tmp_path, architecture, extra):
    lens = _lens_sae(architecture, seed=3, **dict(extra))
    lens.save_model(tmp_path / "sae")
    sae = load_sae(tmp_path / "sae")
    save_saelens6(sae, tmp_path / "again")
    from sae_lens import SAE as LensSAE

    again = LensSAE.load_from_disk(tmp_path / "again")
    assert again.cfg.architecture() == architecture
    assert again.cfg.reshape_activations == "hook_z"  # as SAELens writes a concatenated hook_z SAE
    x = _inputs(seed=8)
    with torch.no_grad():
        _assert_same_codes(again.encode(x.reshape(-1, N_HEADS, D_HEAD)), lens.encode(x))


@pytest.mark.parametrize("architecture, extra", CASES, ids=[f"{a}-{'-'.join(e)}" for a, e in CASES])
def test_encoding_some_columns_or_examples_equals_full_encode(tmp_path, architecture, extra):
    """The streaming statistics encode column chunks (with the per-token context of a TopK SAE) and the dashboards
    one feature per example: both equal the full encode's columns."""
    lens = _lens_sae(architecture, seed=1, **dict(extra))
    lens.save_model(tmp_path / "sae")
    sae = load_sae(tmp_path / "sae")
    x = _inputs(seed=2, n=200)
    full = sae.encode(x)
    centred = sae.centred(x)
    context = sae.encoding_context(centred)
    assert (context is None) == (architecture != "topk")
    chunks = [sae.encode_columns(centred, slice(a, a + 40), context) for a in range(0, D_SAE, 40)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.encode_columns(centred, torch.tensor([5, 90, 3])), full[:, [5, 90, 3]],
                               rtol=1e-5, atol=1e-5)
    features = torch.tensor([3, 17, 60, 95])
    windows = x[:40].reshape(4, 10, D_IN)
    expected = full[:40].reshape(4, 10, D_SAE)[torch.arange(4), :, features]
    torch.testing.assert_close(sae.encode_examples(sae.centred(windows), features), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("architecture, extra", [("jumprelu", {}), ("gated", {}), ("topk", {"k": K})])
def test_an_input_scale_folds_into_every_rule(tmp_path, architecture, extra):
    """``with_input_scale(s)`` reads x where the SAE read s * x: encode'(x) = encode(s x)."""
    lens = _lens_sae(architecture, seed=4, **extra)
    lens.save_model(tmp_path / "sae")
    sae = load_sae(tmp_path / "sae")
    x = _inputs(seed=6)
    torch.testing.assert_close(sae.with_input_scale(2.5).encode(x), sae.encode(2.5 * x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("architecture", ["jumprelu", "gated"])
def test_folded_decoder_norms_scale_each_activation(tmp_path, architecture):
    lens = _lens_sae(architecture, seed=7)
    lens.save_model(tmp_path / "sae")
    sae = load_sae(tmp_path / "sae")
    folded = sae.with_decoder_norms_folded()
    x = _inputs(seed=9)
    norms = sae.W_dec.norm(dim=1)
    torch.testing.assert_close(folded.encode(x), sae.encode(x) * norms, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(folded.forward(x), sae.forward(x), rtol=1e-5, atol=1e-5)


def test_folding_unequal_decoder_norms_into_a_topk_sae_is_refused(tmp_path):
    lens = _lens_sae("topk", k=K)
    lens.save_model(tmp_path / "sae")
    with pytest.raises(InputError, match="would change which k features fire"):
        load_sae(tmp_path / "sae").with_decoder_norms_folded()


@pytest.mark.parametrize("architecture, named", [
    ("transcoder", "a transcoder"), ("skip_transcoder", "a skip transcoder"), ("temporal", "a temporal SAE"),
    ("abstopk", "an AbsTopK SAE"), ("batchtopk", "a BatchTopK \\*training\\* checkpoint"),
])
def test_architectures_the_package_cannot_represent_are_refused_by_name(tmp_path, architecture, named):
    save_saelens6(_standard_sae(), tmp_path / "a")
    cfg_path = tmp_path / "a" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["architecture"] = architecture
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedCheckpointError, match=rf"cfg\.json: architecture '{architecture}' is {named}"):
        load_sae(tmp_path / "a")


def test_a_real_saelens_transcoder_is_refused_as_a_transcoder(tmp_path):
    from sae_lens import Transcoder, TranscoderConfig

    cfg = TranscoderConfig(d_in=D_IN, d_sae=D_SAE, d_out=D_IN, apply_b_dec_to_input=False, metadata=_metadata())
    Transcoder(cfg).save_model(tmp_path / "tc")
    with pytest.raises(UnsupportedCheckpointError, match="is a transcoder .*reads one hook and writes another"):
        load_sae(tmp_path / "tc")


def test_a_jumprelu_folder_without_its_threshold_is_refused_naming_the_key(tmp_path):
    from safetensors.torch import load_file, save_file

    _lens_sae("jumprelu").save_model(tmp_path / "sae")
    weights = tmp_path / "sae" / "sae_weights.safetensors"
    tensors = load_file(str(weights))
    del tensors["threshold"]
    save_file(tensors, str(weights))
    with pytest.raises(CheckpointError, match=r"sae_weights\.safetensors is missing the keys \['threshold'\]"):
        load_sae(tmp_path / "sae")


def test_a_topk_rule_needs_a_positive_k_within_the_width():
    with pytest.raises(InputError, match="positive integer k"):
        TopK(0)
    sae = _standard_sae()
    from dataclasses import replace

    with pytest.raises(InputError, match=f"keeps k={D_SAE + 1} features but the SAE has only d_sae={D_SAE}"):
        replace(sae, activation=TopK(D_SAE + 1))
    with pytest.raises(InputError, match=rf"threshold must have shape \({D_SAE},\)"):
        replace(sae, activation=JumpReLU(torch.zeros(3)))


def _standard_sae() -> SAE:
    g = torch.Generator().manual_seed(0)
    return SAE(W_enc=torch.randn(D_IN, D_SAE, generator=g), b_enc=torch.zeros(D_SAE),
               W_dec=torch.randn(D_SAE, D_IN, generator=g), b_dec=torch.zeros(D_IN), apply_b_dec_to_input=True,
               hook_name=HOOK, layer=1, head="concatenated", model_name="gelu-2l")


def test_formats_that_store_only_relu_saes_refuse_another_rule(tmp_path):
    from dataclasses import replace

    from sparsedecomp.loading import save_kissane, save_legacy_saelens

    sae = replace(_standard_sae(), activation=TopK(K))
    with pytest.raises(InputError, match=r"the Kissane format stores ReLU SAEs; this SAE is TopK \(k=7\)"):
        save_kissane(sae, tmp_path, "v1")
    with pytest.raises(InputError, match=r"legacy SAELens checkpoints store ReLU SAEs; this SAE is TopK"):
        save_legacy_saelens(sae, tmp_path, "r", 100)
