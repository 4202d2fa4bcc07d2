"""How long the notebook's analyses (:mod:`sparsedecomp.evaluation.analyses`) and their figures take.

* ``--world demo``: the shipped demo world (8 heads x 256 features, d_head 32, concat 2,048 x 256) and
  ``--contexts`` held-out contexts of 128 tokens through the real activation stream.
* ``--world gelu-2l``: random weights at gelu-2l size (8 heads x 2,048 features, d_head 64, d_model 512, concat
  16,384 x 512); the head-output cosine accumulator is fed ``--contexts`` random ``z`` batches of 1,024 positions
  (the model's forward pass is not part of the analysis and is left out).

    python -m benchmarks.analyses_speed --world demo --contexts 374
    python -m benchmarks.analyses_speed --world gelu-2l --contexts 16

Prints one line per step (seconds) and the JSON size of each result.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Callable

import torch

from sparsedecomp.activations import ActivationBatch, run_accumulators
from sparsedecomp.evaluation import figures
from sparsedecomp.evaluation.analyses import (HeadOutputCosineAccumulator, decoder_norms, dictionary_ranks,
                                              mixed_feature_interference, model_saes, output_subspace_carry)
from sparsedecomp.jsonio import to_jsonable
from sparsedecomp.loading import SAE, HeadSAEs


def random_sae(d_sae: int, d_in: int, head: Any, generator: torch.Generator) -> SAE:
    return SAE(W_enc=torch.randn(d_in, d_sae, generator=generator), b_enc=torch.zeros(d_sae),
               W_dec=torch.randn(d_sae, d_in, generator=generator) / d_in**0.5, b_dec=torch.zeros(d_in),
               apply_b_dec_to_input=False, hook_name="blocks.1.attn.hook_z", layer=1, head=head, model_name="random",
               provenance={"input_scale": 2.0})


def timed(label: str, fn: Callable[[], Any], timings: dict[str, float], *, report: bool = True) -> Any:
    start = time.perf_counter()
    result = fn()
    timings[label] = time.perf_counter() - start
    size = len(json.dumps(to_jsonable(result))) if report else 0
    print(f"{label:<28} {timings[label]:8.3f} s" + (f"   JSON {size / 1024:8.1f} KiB" if size else ""), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", choices=("demo", "gelu-2l"), default="demo")
    parser.add_argument("--contexts", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    generator = torch.Generator().manual_seed(args.seed)
    timings: dict[str, float] = {}
    if args.world == "demo":
        from sparsedecomp.demo import demo_tokens, load_demo_world

        world = timed("load demo world", load_demo_world, {}, report=False)
        head_saes, concat_sae, W_O = world.head_saes, world.concat_sae, world.W_O
        tokens = demo_tokens(args.contexts)

        def cosines():
            acc = HeadOutputCosineAccumulator(W_O)
            return run_accumulators(world.model, tokens, {"cos": acc}, layer=world.layer)["cos"]
    else:
        n_heads, d_head, d_model, n_features = 8, 64, 512, 2048
        head_saes = HeadSAEs(tuple(random_sae(n_features, d_head, h, generator) for h in range(n_heads)))
        concat_sae = random_sae(n_heads * n_features, n_heads * d_head, "concatenated", generator)
        W_O = torch.randn(n_heads, d_head, d_model, generator=generator) / d_head**0.5

        def cosines():
            acc = HeadOutputCosineAccumulator(W_O)
            for start in range(args.contexts):
                z = torch.randn(1, 1024, n_heads, d_head, generator=generator)
                acc.update(ActivationBatch(tokens=torch.zeros(1, 1024, dtype=torch.long), z=z, first_context=start,
                                           layer=1))
            return acc.compute()

    norms = timed("decoder norms", lambda: decoder_norms(model_saes(head_saes, concat_sae)), timings)
    ranks = timed("ranks", lambda: dictionary_ranks(head_saes, concat_sae, W_O), timings)
    carry = timed("W_O carry", lambda: output_subspace_carry(head_saes, W_O), timings)
    interference = timed("mixed interference", lambda: mixed_feature_interference(head_saes, W_O), timings)
    cos = timed(f"head-output cosines ({args.contexts} ctx)", cosines, timings)
    built = timed("figures + html", lambda: [figures.figure_html(f) for f in (
        figures.decoder_norms_figure(norms), figures.decoder_norms_figure(norms, units="z"),
        figures.ranks_figure(ranks), figures.head_output_cosine_figure(cos), figures.head_output_cosine_heatmap(cos),
        figures.output_subspace_carry_figure(carry), figures.mixed_feature_interference_figure(interference),
        figures.mixed_feature_interference_boxes(interference))], timings, report=False)
    print(f"{'html total':<28} {sum(len(h) for h in built) / 1024:8.1f} KiB; tokens seen {cos.n_tokens}")
    print(f"{'total':<28} {sum(timings.values()):8.3f} s")


if __name__ == "__main__":
    main()
