"""What head attribution (four ways) and the faithfulness of one decomposition cost, on the demo world and at
gelu-2l size.

* ``--world demo``: the demo world over every shipped held-out context (``demo_tokens()``), one decomposition of
  the unit concat decoder rows by ``nn_omp`` (``n_nonzero=16, tol=0.01``); prints the attribution and faithfulness
  summaries and the time of the one activation pass that feeds both accumulators.
* ``--world full``: random weights at Kissane's gelu-2l size (concat SAE 16,384 features on 512-dim ``z``; 8 x 2,048
  per-head features of ``d_head`` 64; 1,024-token contexts; random sparse codes with 16 non-zeros a row), fed
  random ``z`` batches of ``--batch-tokens`` tokens; reports seconds per million tokens and peak memory (process RSS
  on CPU, ``torch.cuda.max_memory_allocated`` on GPU).

    python -m benchmarks.attribution_speed --world demo
    python -m benchmarks.attribution_speed --world full --tokens 8192 --batch-tokens 2048 --device cpu

Results go to ``benchmarks/results/attribution-<world>.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

from sparsedecomp import Codes, Decomposition, make_solver
from sparsedecomp.activations import ActivationBatch, run_accumulators
from sparsedecomp.evaluation.attribution import DFAAccumulator, head_attribution
from sparsedecomp.evaluation.faithfulness import FaithfulnessAccumulator
from sparsedecomp.jsonio import to_jsonable
from sparsedecomp.loading import SAE, HeadSAEs

RESULTS = Path(__file__).parent / "results"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def demo(k: int) -> dict:
    from sparsedecomp.demo import demo_tokens, load_demo_world

    world = load_demo_world()
    tokens = demo_tokens()
    concat, head_saes = world.concat_sae, world.head_saes
    n_heads = len(head_saes)
    targets = concat.W_dec / concat.W_dec.norm(dim=1, keepdim=True)
    start = time.perf_counter()
    decomposition = make_solver("nn_omp", n_nonzero=16, tol=0.01).prepare(head_saes.dictionary(normalize=True)).solve(
        targets)
    solve_s = time.perf_counter() - start
    start = time.perf_counter()
    out = run_accumulators(world.model, tokens, {
        "dfa": DFAAccumulator(concat, n_heads, k=k),
        "faithfulness": FaithfulnessAccumulator(concat, head_saes, decomposition, label="nn_omp16", k=k)},
        layer=world.layer)
    pass_s = time.perf_counter() - start
    attribution = head_attribution(concat, n_heads, dfa=out["dfa"], decompositions={"nn_omp16": decomposition})
    n_tokens = tokens.tokens.numel()
    return {
        "world": "demo", "n_contexts": int(tokens.tokens.shape[0]), "n_tokens": n_tokens, "k": k,
        "solve_s": round(solve_s, 2), "activation_pass_s": round(pass_s, 2),
        "s_per_million_tokens": round(pass_s / n_tokens * 1e6, 1), "peak_rss_mb": round(_peak_rss_mb()),
        "attribution": to_jsonable(attribution.report(top_n=10)),
        "faithfulness": to_jsonable(out["faithfulness"].report(n_worst=5)),
    }


def _random_sae(d_in: int, d_sae: int, head, g: torch.Generator, device) -> SAE:
    W_dec = torch.randn(d_sae, d_in, generator=g)
    return SAE(W_enc=(W_dec.T / d_in**0.5).to(device), b_enc=torch.full((d_sae,), -0.5).to(device),
               W_dec=W_dec.to(device), b_dec=torch.zeros(d_in).to(device), apply_b_dec_to_input=True,
               hook_name="blocks.1.attn.hook_z", layer=1, head=head, model_name=None)


def full(n_tokens: int, batch_tokens: int, k: int, device: str) -> dict:
    n_heads, d_head, per_head, d_sae, context = 8, 64, 2048, 16384, 1024
    g = torch.Generator().manual_seed(0)
    concat = _random_sae(n_heads * d_head, d_sae, "concatenated", g, device)
    head_saes = HeadSAEs(tuple(_random_sae(d_head, per_head, h, g, device) for h in range(n_heads)))
    dictionary = head_saes.dictionary(normalize=True)
    nnz = 16
    codes = Codes.sparse(torch.randint(0, n_heads * per_head, (d_sae, nnz), generator=g).to(device),
                         torch.rand(d_sae, nnz, generator=g).to(device), n_heads * per_head)
    zeros = torch.zeros(d_sae, device=device)
    decomposition = Decomposition(codes=codes, reconstruction=dictionary.reconstruct(codes),
                                  targets=concat.W_dec / concat.W_dec.norm(dim=1, keepdim=True), objective=zeros,
                                  certificate=zeros, certificate_kind="exact",
                                  iterations=zeros.long(), status=zeros.long(), solver="random", dictionary=dictionary)
    accumulators = {"dfa": DFAAccumulator(concat, n_heads, k=k),
                    "faithfulness": FaithfulnessAccumulator(concat, head_saes, decomposition, k=k)}
    if device != "cpu":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_before = _peak_rss_mb()
    timings = {name: 0.0 for name in accumulators}
    contexts = max(1, batch_tokens // context)
    for first in range(0, n_tokens // context, contexts):
        z = torch.randn(contexts, context, n_heads, d_head, generator=g).to(device)
        batch = ActivationBatch(tokens=torch.zeros(contexts, context, dtype=torch.long), z=z, first_context=first,
                                layer=1)
        for name, acc in accumulators.items():
            start = time.perf_counter()
            acc.update(batch)
            if device != "cpu":
                torch.cuda.synchronize()
            timings[name] += time.perf_counter() - start
    start = time.perf_counter()
    faithfulness = accumulators["faithfulness"].compute()
    attribution = head_attribution(concat, n_heads, dfa=accumulators["dfa"].compute(),
                                   decompositions={"random": decomposition})
    report = attribution.report()
    compute_s = time.perf_counter() - start
    return {
        "world": "full (random weights)", "device": device, "n_tokens": n_tokens, "batch_tokens": batch_tokens,
        "k": k, "s_per_million_tokens": {name: round(t / n_tokens * 1e6, 1) for name, t in timings.items()},
        "compute_and_report_s": round(compute_s, 2),
        "peak_rss_mb": round(_peak_rss_mb()), "peak_rss_before_pass_mb": round(rss_before),
        "cuda_peak_mb": round(torch.cuda.max_memory_allocated() / 2**20) if device != "cpu" else None,
        "faithfulness_median_correlation": faithfulness.report().correlation["median"],
        "dfa_undefined": report.n_undefined["dfa"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", choices=("demo", "full"), default="demo")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--batch-tokens", type=int, default=2048)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with torch.no_grad():
        result = demo(args.k) if args.world == "demo" else full(args.tokens, args.batch_tokens, args.k, args.device)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"attribution-{args.world}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
