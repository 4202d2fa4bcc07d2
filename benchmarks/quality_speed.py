"""What SAE quality costs on top of the activation pass.

Two measurements, printed as JSON (and written to ``--out`` when given):

* **demo**: the demo world's 8 per-head SAEs and its concat SAE on ``demo_tokens(n_contexts)`` (782 contexts of
  128 tokens = 100,096 tokens by default). In one process, alternating ``--repeats`` times so that load on a shared
  machine hits both alike: the activation pass alone (the stream feeding an accumulator that does nothing) and the
  same pass feeding the nine :class:`~sparsedecomp.evaluation.sae_quality.SAEQualityAccumulator` s. Best of the
  repeats.
* **gelu-2l size**: the accumulators alone (no model) for random SAEs of Kissane et al.'s gelu-2l shapes, 8 per-head
  SAEs of 2,048 features on ``d_head`` 64 and one concat SAE of 16,384 features on 512 dims, fed random ``z`` of
  ``--tokens`` tokens in batches of ``--contexts-per-batch`` contexts of 128 positions.

    python -m benchmarks.quality_speed                        # both, CPU
    python -m benchmarks.quality_speed --only gelu2l --device cuda
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sparsedecomp.activations import ActivationBatch, run_accumulators
from sparsedecomp.evaluation.sae_quality import sae_quality_accumulators
from sparsedecomp.loading import SAE, HeadSAEs

HOOK = "blocks.1.attn.hook_z"


class _PassOnly:
    """An accumulator that reads nothing: timing it times the activation stream alone."""

    needs: tuple[str, ...] = ()

    def update(self, batch: ActivationBatch) -> None:
        pass

    def compute(self) -> None:
        return None


def _sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_demo(n_contexts: int, repeats: int) -> dict:
    from sparsedecomp.demo import demo_tokens, load_demo_world

    world = load_demo_world()
    tokens = demo_tokens(n_contexts)
    device = next(world.model.parameters()).device
    passes, with_quality = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        run_accumulators(world.model, tokens, {"pass": _PassOnly()}, layer=world.layer)
        _sync(device)
        passes.append(time.perf_counter() - start)
        accumulators = sae_quality_accumulators(world.head_saes, world.concat_sae, exclude_bos=True)
        start = time.perf_counter()
        results = run_accumulators(world.model, tokens, accumulators, layer=world.layer)
        _sync(device)
        with_quality.append(time.perf_counter() - start)
    return {
        "n_tokens": int(tokens.tokens.numel()), "device": str(device), "repeats": repeats,
        "activation_pass_s": min(passes), "pass_with_quality_s": min(with_quality),
        "quality_overhead_s": min(with_quality) - min(passes), "all_pass_s": passes, "all_with_quality_s": with_quality,
        "l0": {name: round(q.l0, 2) for name, q in results.items()},
        "explained_variance": {name: round(q.explained_variance, 4) for name, q in results.items()},
    }


def random_sae(d_in: int, d_sae: int, head: int | str, device: str, gen: torch.Generator) -> SAE:
    """Random weights; ``b_enc = -2.5`` on roughly unit pre-activations, so about 0.6 % of features fire."""
    W_dec = torch.randn(d_sae, d_in, generator=gen)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    return SAE(W_enc=W_dec.T.contiguous(), b_enc=torch.full((d_sae,), -2.5), W_dec=W_dec, b_dec=torch.zeros(d_in),
               apply_b_dec_to_input=True, hook_name=HOOK, layer=1, head=head, model_name="random").to(device)


def time_gelu2l_size(n_tokens: int, contexts_per_batch: int, device: str) -> dict:
    n_heads, d_head, ctx = 8, 64, 128
    gen = torch.Generator().manual_seed(0)
    heads = HeadSAEs(tuple(random_sae(d_head, 2048, h, device, gen) for h in range(n_heads)))
    concat = random_sae(n_heads * d_head, 16384, "concatenated", device, gen)
    n_contexts = -(-n_tokens // ctx)
    # one batch of random z, reused: the accumulators' cost does not depend on the values' origin
    z = torch.randn(contexts_per_batch, ctx, n_heads, d_head, generator=gen).to(device) / d_head**0.5 * 8
    tokens = torch.ones(contexts_per_batch, ctx, dtype=torch.long, device=device)
    accumulators = sae_quality_accumulators(heads, concat, exclude_bos=True)
    timings = {name: 0.0 for name in accumulators}
    seen = 0
    while seen < n_contexts:
        take = min(contexts_per_batch, n_contexts - seen)
        batch = ActivationBatch(tokens=tokens[:take], z=z[:take], first_context=seen, layer=1)
        for name, acc in accumulators.items():
            start = time.perf_counter()
            acc.update(batch)
            _sync(device)
            timings[name] += time.perf_counter() - start
        seen += take
    results = {name: acc.compute() for name, acc in accumulators.items()}
    head_total = sum(t for name, t in timings.items() if name.startswith("head_"))
    return {
        "n_tokens": n_contexts * ctx, "contexts_per_batch": contexts_per_batch, "device": device,
        "head_saes_s": head_total, "concat_sae_s": timings["concat"], "total_s": head_total + timings["concat"],
        "l0": {"head_0": round(results["head_0"].l0, 1), "concat": round(results["concat"].l0, 1)},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("demo", "gelu2l"), default=None)
    parser.add_argument("--contexts", type=int, default=782, help="demo contexts (128 tokens each)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=100_000, help="gelu-2l size: random tokens")
    parser.add_argument("--contexts-per-batch", type=int, default=64)
    parser.add_argument("--device", default="cpu", help="gelu-2l size: device of the SAEs and activations")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    report = {"torch_threads": torch.get_num_threads()}
    if args.only in (None, "demo"):
        report["demo"] = time_demo(args.contexts, args.repeats)
    if args.only in (None, "gelu2l"):
        report["gelu2l_size"] = time_gelu2l_size(args.tokens, args.contexts_per_batch, args.device)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
