"""Time SAEDashboard 0.8's feature data generation (``SaeVisRunner.run``) on given features and tokens.

Runs inside ``benchmarks/saedashboard/.venv`` (``setup.sh``), not the package's environment: it imports neither
``sparsedecomp`` nor ``benchmarks``. ``compare.py`` prepares the inputs and calls it; by hand::

    benchmarks/saedashboard/.venv/bin/python benchmarks/saedashboard/run_saedashboard.py \
        --sae-dir DIR --model-dir sparsedecomp/demo/artifacts/model --inputs inputs.safetensors --out timing.json

Inputs: a SAELens 6 SAE folder (``cfg.json`` + ``sae_weights.safetensors``), the demo model folder (``config.json``
with ``hooked_transformer_config`` and ``processing_flags``, ``model.safetensors`` unprocessed; the model is rebuilt
and processed with those flags, as ``sparsedecomp.loading.load_model`` does), and a safetensors file holding
``tokens`` ``(n_contexts, context_size)`` and ``features`` ``(n,)``. Only ``runner.run`` is timed (model and SAE
loading are not). The JSON written holds the seconds, the versions, and per feature the largest activation in the
top-examples group, for the caller's cross-check.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from importlib import metadata
from pathlib import Path


def load_model(folder: Path):
    """The demo ``HookedTransformer``, fp32, processed with its recorded flags."""
    from safetensors.torch import load_file
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    import torch

    meta = json.loads((folder / "config.json").read_text())
    model = HookedTransformer(HookedTransformerConfig(**meta["hooked_transformer_config"], device="cpu",
                                                      dtype=torch.float32))
    state = {k: v.float() for k, v in load_file(str(folder / "model.safetensors")).items()}
    model.load_and_process_state_dict(state, **meta.get("processing_flags", {}))
    return model.eval()


def load_sae(folder: Path):
    """The SAELens 6 SAE; SAEDashboard 0.8's DFA reads ``cfg.hook_name``, which SAELens 6 keeps in
    ``cfg.metadata.hook_name``, so it is copied across."""
    from sae_lens import SAE

    sae = SAE.load_from_disk(str(folder), device="cpu")
    if not hasattr(sae.cfg, "hook_name"):
        sae.cfg.hook_name = sae.cfg.metadata.hook_name
    return sae


def top_group_max(feature_data) -> float:
    """The largest activation shown in a feature's top-activations group (NaN if it shows none)."""
    groups = feature_data.sequence_data.seq_group_data
    values = [a for seq in groups[0].seq_data for a in seq.feat_acts] if groups else []
    return max(values) if values else float("nan")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sae-dir", type=Path, required=True)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--inputs", type=Path, required=True, help="safetensors with 'tokens' and 'features'")
    parser.add_argument("--out", type=Path, required=True, help="timing JSON to write")
    parser.add_argument("--no-dfa", action="store_true", help="leave out SAEDashboard's DFA (on by default)")
    parser.add_argument("--minibatch-size-tokens", type=int, default=64, help="SAEDashboard's default: 64")
    parser.add_argument("--minibatch-size-features", type=int, default=256, help="SAEDashboard's default: 256")
    args = parser.parse_args(argv)

    import torch
    from safetensors.torch import load_file
    from sae_dashboard.sae_vis_data import SaeVisConfig
    from sae_dashboard.sae_vis_runner import SaeVisRunner

    torch.set_grad_enabled(False)
    inputs = load_file(str(args.inputs))
    tokens, features = inputs["tokens"].long(), [int(f) for f in inputs["features"].tolist()]
    model = load_model(args.model_dir)
    sae = load_sae(args.sae_dir)
    cfg = SaeVisConfig(hook_point=sae.cfg.metadata.hook_name, features=features, use_dfa=not args.no_dfa,
                       minibatch_size_tokens=args.minibatch_size_tokens,
                       minibatch_size_features=args.minibatch_size_features,
                       ignore_positions=[0],  # BOS, as the package leaves it out
                       device="cpu", dtype="float32", verbose=False)
    start = time.perf_counter()
    data = SaeVisRunner(cfg).run(encoder=sae, model=model, tokens=tokens)
    seconds = time.perf_counter() - start

    result = {
        "tool": "SAEDashboard",
        "seconds": seconds,
        "n_features": len(features),
        "n_tokens": int(tokens.numel()),
        "n_contexts": int(tokens.shape[0]),
        "context_size": int(tokens.shape[1]),
        "use_dfa": not args.no_dfa,
        "minibatch_size_tokens": args.minibatch_size_tokens,
        "minibatch_size_features": args.minibatch_size_features,
        "torch_threads": torch.get_num_threads(),
        "versions": {name: metadata.version(name) for name in
                     ("sae-dashboard", "sae-lens", "transformer-lens", "torch", "pyarrow")},
        "python": platform.python_version(),
        "top_max": {str(f): top_group_max(data.feature_data_dict[f]) for f in features},
    }
    args.out.write_text(json.dumps(result, indent=2))
    print(f"SAEDashboard: {len(features)} features x {tokens.numel()} tokens in {seconds:.2f} s")


if __name__ == "__main__":
    main()
