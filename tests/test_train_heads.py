"""Per-head SAEs trained in one pass with SAELens's trainer (`sparsedecomp.training`): one model forward per batch of
contexts feeds every head (the count does not grow with the heads), the SAEs learn, and the folders load in SAELens
and in the package with the head, hook and model processing recorded."""

import pytest
import torch

from sparsedecomp.activations import CollectZ, run_accumulators
from sparsedecomp.errors import InputError
from sparsedecomp.loading import ProcessingFlags, load_head_saes
from sparsedecomp.training import HeadTrainingSpec, save_head_saes, train_head_saes

LAYER = 1
SPEC = HeadTrainingSpec("topk", d_sae=32, k=4, training_tokens=3200, batch_size=64, lr=1e-2, buffer_batches=4)
# SAELens warns, on every SAE built with model_from_pretrained_kwargs, to load the model with them: recorded on purpose.
pytestmark = pytest.mark.filterwarnings(r"ignore:\s*This SAE has non-empty model_from_pretrained_kwargs:UserWarning")


@pytest.fixture(scope="module")
def training_tokens():
    return torch.randint(0, 50, (250, 16), generator=torch.Generator().manual_seed(4))


def count_forwards(model):
    """A counter of ``hook_z`` firings at the layer (one per model forward over a batch of contexts)."""
    calls = []
    hook = model.blocks[LAYER].attn.hook_z
    hook.add_hook(lambda z, hook: calls.append(z.shape[0]), is_permanent=True)
    return calls, hook


def test_every_head_trains_from_the_same_forward_passes(tiny_model, training_tokens):
    counts = {}
    for heads in ((0,), (0, 1, 2, 3)):
        calls, hook = count_forwards(tiny_model)
        try:
            saes = train_head_saes(tiny_model, training_tokens, layer=LAYER, spec=SPEC, heads=heads)
        finally:
            hook.remove_hooks(including_permanent=True)
        assert sorted(saes) == list(heads)
        counts[heads] = (len(calls), 16 * sum(calls))  # forwards, tokens forwarded
    # the same forwards whatever the number of heads (not one pass per head), over about the tokens the SAEs need
    # (plus the mixing buffer's fill and the norm estimate's batches)
    assert counts[(0,)] == counts[(0, 1, 2, 3)]
    assert SPEC.training_tokens <= counts[(0, 1, 2, 3)][1] <= 3 * SPEC.training_tokens


def test_trained_heads_learn_and_load_in_saelens_and_the_package(tiny_model, tokens, training_tokens, tmp_path):
    from sae_lens import SAE as LensSAE

    z = run_accumulators(tiny_model, tokens, {"z": CollectZ()}, layer=LAYER)["z"]  # held-out tokens
    untrained = train_head_saes(tiny_model, training_tokens, layer=LAYER, heads=(2,), spec=HeadTrainingSpec(
        "topk", d_sae=32, k=4, training_tokens=64, batch_size=64, lr=1e-9, buffer_batches=1))[2]
    saes = train_head_saes(tiny_model, training_tokens, layer=LAYER, spec=SPEC)
    folders = save_head_saes(saes, tmp_path, processing=ProcessingFlags().as_kwargs())
    loaded = load_head_saes(folders)
    assert loaded.heads == (0, 1, 2, 3) and loaded.model_from_pretrained_kwargs == ProcessingFlags().as_kwargs()
    for h, folder in folders.items():
        lens = LensSAE.load_from_disk(folder)
        assert lens.cfg.metadata.hook_head_index == h and lens.cfg.metadata.hook_name == f"blocks.{LAYER}.attn.hook_z"
        x = z[:, h].float()
        with torch.no_grad():
            torch.testing.assert_close(loaded[h].encode(x), lens.encode(x), rtol=1e-5, atol=1e-5)
        assert int((loaded[h].encode(x) > 0).sum(1).max()) <= SPEC.k
    with torch.no_grad():
        x = z[:, 2].float()
        error = lambda sae: float((sae.decode(sae.encode(x)) - x).pow(2).sum(1).mean())  # noqa: E731
        assert error(saes[2]) < 0.5 * error(untrained)


@pytest.mark.parametrize("change, message", [
    (dict(layer=5), r"layer must be an int in \[0, 2\), got 5"),
    (dict(heads=(4,)), r"heads \[4\] do not exist or repeat: the model.s layer 1 has heads 0\.\.3"),
    (dict(spec=HeadTrainingSpec("topk", d_sae=32, k=4, training_tokens=10**6, batch_size=64)),
     r"1,000,000 training tokens \(15625 batches of 64\) asked for but the tokens hold 4,000"),
])
def test_bad_training_requests_are_refused_before_training(tiny_model, training_tokens, change, message):
    arguments = {"layer": LAYER, "spec": SPEC, **change}
    with pytest.raises(InputError, match=message):
        train_head_saes(tiny_model, training_tokens, **arguments)


@pytest.mark.parametrize("arguments, message", [
    (dict(architecture="gated", d_sae=8, training_tokens=64), r"architecture must be one of \['standard', 'jumprelu', "
                                                              r"'topk', 'batchtopk'\], got 'gated'"),
    (dict(architecture="topk", d_sae=8, k=9, training_tokens=64), r"needs k in 1\.\.d_sae=8, got k=9"),
    (dict(architecture="standard", d_sae=8, k=2, training_tokens=64), "k applies to topk / batchtopk SAEs"),
    (dict(architecture="standard", d_sae=8, training_tokens=640, batch_size=64, lr_decay_steps=11),
     r"lr_warm_up_steps \+ lr_decay_steps = 11 is more than the run's 10 steps"),
    (dict(architecture="topk", d_sae=8, k=2, training_tokens=64, l0_coefficient=1.0),
     "l0_coefficient applies to jumprelu SAEs, not to 'topk'"),
])
def test_a_spec_that_cannot_work_is_refused_by_name(arguments, message):
    with pytest.raises(InputError, match=message):
        HeadTrainingSpec(**arguments)
