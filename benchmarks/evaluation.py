"""What each part of the evaluation (:func:`sparsedecomp.evaluation.evaluate.evaluate`) costs per million tokens,
and its peak memory, at gelu-2l size or on the shipped demo world.

    python -m benchmarks.evaluation --size gelu-2l              # 4 random contexts of 1,024 tokens, extrapolated
    python -m benchmarks.evaluation --size demo --contexts 256  # the demo world's held-out contexts of 128 tokens
    python -m benchmarks.evaluation --size gelu-2l --device cuda --contexts 64
    python -m benchmarks.evaluation --size gemma-3-270m         # 2 random contexts of 1,024 tokens, extrapolated

Worlds:

* ``gelu-2l``: ``HookedTransformer(HookedTransformerConfig(**GELU_2L))`` with random weights, 8 per-head SAEs of
  2,048 features on ``d_head`` 64 and one concat SAE of 16,384 features on 512 dims
  (:func:`benchmarks.standins._random_weights`), each encoder bias then set per feature so that the feature fires on
  ``--l0 / d_sae`` of 4,096 positions sampled from 16 calibration contexts (not among the measured ones): tens of
  features per token out of sample, as trained SAEs have (about 2-4x ``--l0``, since ``z`` varies between contexts;
  the realised L0 on the measured tokens is in the header). Tokens: random ids, BOS first.
* ``demo``: :func:`sparsedecomp.demo.load_demo_world` and ``demo_tokens(--contexts)`` (trained model and SAEs).
* ``gemma-3-270m``: TransformerLens's own configuration of gemma-3-270m (all 18 layers, the 262,144-token vocabulary,
  grouped-query attention with 4 query heads of 256 and one key/value head, local and global layers, QK norms,
  soft-capped logits) with random weights (:func:`sparsedecomp.loading.standin_config`), hooked at layer 12 (the
  layer of the ``gemma-scope-2-270m-pt-att`` example); a 16,384-feature JumpReLU concat SAE on the 1,024-dim ``z``
  and 4 per-head JumpReLU SAEs of 4,096 features on ``d_head`` 256, each threshold set per feature (encoder bias 0)
  so that the feature fires on ``--l0 / d_sae`` of 4,096 positions drawn from every context, the measured ones
  included (in sample, unlike the gelu-2l world: at 1,024 tokens z is dominated by a per-context component).
  Tokens: random ids, ``<bos>`` first, contexts of 1,024 (Gemma Scope's).

One decomposition of the concat SAE's unit decoder rows into the per-head atoms feeds faithfulness and the routed
splice variant: ``nn_omp`` with ``n_nonzero=16, tol=0.01`` (``--codes solve``, the default), or random sparse codes
of 16 atoms a row (``--codes random``).

Every stage runs in a fresh subprocess that builds the world (not timed), resets the RSS high-water mark
(``/proc/self/clear_refs``) and then runs only that stage: ``peak RSS`` is the stage's own high-water mark
(``VmHWM``), world included; ``world RSS`` is the resident size before the stage. Token stages are timed on the
measured contexts and extrapolated linearly to a million tokens; ``extra`` subtracts the activation pass (the model
up to the hooked layer, which every token stage runs once). Splice variants: one process runs every variant (the
``splice: all`` row, as :func:`evaluate` does); then one process per kind runs ``select_variants([name])`` (the
variant, ``clean`` and its score baseline). Their ``rerun`` column is the time of that variant's reruns alone, timed
inside the splice accumulator around each rerun (forward from the hooked layer with the replacement hooked in, to
float32 logits); the CE/KL arithmetic shared by every variant is the ``per-variant losses`` row.

Results: a markdown table, printed and written to ``benchmarks/results/evaluation-<size>-<timestamp>.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from benchmarks.quality_speed import _PassOnly
from benchmarks.standins import BOS, GELU_2L, _random_weights

RESULTS = Path(__file__).parent / "results"
N_NONZERO = 16
LABEL = "nn_omp_16"
CALIBRATION_CONTEXTS = 16
CALIBRATION_POSITIONS = 4096

TOKEN_STAGES = ("activations", "sae_quality", "mean", "dfa", "faithfulness", "head_output_cosines", "splice:all")
SPLICE_KINDS = {"clean": None, "zero_head": "zero_head_0", "zero_layer": "zero_layer", "mean_layer": "mean_layer",
                "head_sae": "head_sae_0", "all_head_saes": "all_head_saes", "concat_sae": "concat_sae",
                "routed": f"routed_{LABEL}"}
"""One representative per kind of splice variant (head variants: head 0; the eight heads cost the same)."""
WEIGHT_STAGES = ("decompose", "ranks", "carry", "mixed_interference")
STAGES = WEIGHT_STAGES + TOKEN_STAGES + tuple(f"splice:{kind}" for kind in SPLICE_KINDS)
"""In run order: ``decompose`` first, so that the later processes load its decomposition instead of solving again."""


# -- the world ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class World:
    model: Any
    head_saes: Any
    concat_sae: Any
    layer: int
    tokens: torch.Tensor
    mean_z: torch.Tensor
    """The splice's mean-ablation value: mean ``z`` over the calibration positions (its cost is the ``mean`` stage)."""


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: CUDA is not available here")
    return device


def calibrated(sae: Any, z: torch.Tensor, l0: float) -> Any:
    """``sae`` with each encoder bias set so that its feature fires on ``l0 / d_sae`` of the rows of ``z`` (strictly
    above the ``(m+1)``-th largest pre-activation, ``m = round(n * l0 / d_sae)``): mean L0 about ``l0`` on ``z``."""
    from dataclasses import replace

    x = z - sae.b_dec if sae.apply_b_dec_to_input else z
    return replace(sae, b_enc=-firing_cut(x.to(sae.W_enc) @ sae.W_enc, l0))


def firing_cut(pre: torch.Tensor, l0: float) -> torch.Tensor:
    """Per feature (column of ``pre``, ``(n, d_sae)``), the ``(m+1)``-th largest pre-activation, ``m = round(n * l0 /
    d_sae)``: a feature that fires strictly above it fires on ``m`` of the ``n`` rows (mean L0 about ``l0``)."""
    n, d_sae = pre.shape
    m = max(1, round(n * l0 / d_sae))
    return pre.kthvalue(n - m, dim=0).values


def gelu_2l_world(n_contexts: int, l0: float, seed: int, device: str) -> World:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from sparsedecomp.activations import CollectZ, run_accumulators
    from sparsedecomp.loading import SAE, HeadSAEs

    torch.manual_seed(seed)
    model = HookedTransformer(HookedTransformerConfig(**GELU_2L, seed=seed, device=device)).eval()
    gen = torch.Generator().manual_seed(seed)
    contexts = torch.randint(1, GELU_2L["d_vocab"], (n_contexts + CALIBRATION_CONTEXTS, GELU_2L["n_ctx"]),
                             generator=gen)
    contexts[:, 0] = BOS
    layer, n_heads, d_head = 1, GELU_2L["n_heads"], GELU_2L["d_head"]
    # Calibration positions from several contexts: z has a per-context component (each position attends over its
    # own context), so thresholds fitted on one context fire far more often on the others.
    z = run_accumulators(model, contexts[:CALIBRATION_CONTEXTS], {"z": CollectZ()}, layer=layer)["z"]
    z = z[torch.randperm(len(z), generator=gen)[:CALIBRATION_POSITIONS]]  # (positions, n_heads, d_head)
    hook = f"blocks.{layer}.attn.hook_z"

    def sae(d_in: int, d_sae: int, head: Any, x: torch.Tensor, decoder_norm: float, apply_b_dec: bool) -> Any:
        W_enc, b_enc, W_dec, b_dec = _random_weights(d_in, d_sae, gen, decoder_norm=decoder_norm)
        raw = SAE(W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec, apply_b_dec_to_input=apply_b_dec,
                  hook_name=hook, layer=layer, head=head, model_name=GELU_2L["model_name"])
        return calibrated(raw, x, l0).to(device=device)

    head_saes = HeadSAEs(tuple(sae(d_head, 2048, h, z[:, h], 2.0, False) for h in range(n_heads)))
    concat = sae(n_heads * d_head, 16384, "concatenated", z.reshape(len(z), -1), 1.0, True)
    return World(model, head_saes, concat, layer, contexts[CALIBRATION_CONTEXTS:], z.double().mean(dim=0))


GEMMA_3_270M_LAYER, GEMMA_3_270M_CONTEXT = 12, 1024


def gemma_3_270m_world(n_contexts: int, l0: float, seed: int, device: str) -> World:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from sparsedecomp.activations import CollectZ, run_accumulators
    from sparsedecomp.loading import SAE, HeadSAEs, standin_config
    from sparsedecomp.loading.activation_rules import JumpReLU
    from sparsedecomp.loading.standin_models import STANDIN_BOS_TOKEN_ID, STANDIN_SPECIAL_TOKENS

    torch.manual_seed(seed)
    cfg = standin_config("gemma-3-270m", n_layers=18, n_ctx=GEMMA_3_270M_CONTEXT, seed=seed)
    model = HookedTransformer(HookedTransformerConfig(**cfg, device=device)).eval()
    gen = torch.Generator().manual_seed(seed)
    n_calibration = 4  # contexts of 1,024 tokens: 4,096 positions
    contexts = torch.randint(len(STANDIN_SPECIAL_TOKENS), model.cfg.d_vocab,
                             (n_contexts + n_calibration, GEMMA_3_270M_CONTEXT), generator=gen)
    contexts[:, 0] = STANDIN_BOS_TOKEN_ID
    layer, n_heads, d_head = GEMMA_3_270M_LAYER, model.cfg.n_heads, model.cfg.d_head
    # Calibrated on positions of every context, the measured ones included: at 1,024 tokens a context's z carries a
    # large per-context component (random weights attend almost uniformly), so thresholds fitted on other contexts
    # fire tens of times too often on these (a concat L0 of ~900 for a target of 16).
    z = run_accumulators(model, contexts, {"z": CollectZ()}, layer=layer)["z"]
    z = z[torch.randperm(len(z), generator=gen)[:CALIBRATION_POSITIONS]].float().cpu()
    hook = f"blocks.{layer}.attn.hook_z"

    def sae(d_in: int, d_sae: int, head: Any, x: torch.Tensor) -> Any:
        W_enc, _, W_dec, b_dec = _random_weights(d_in, d_sae, gen, decoder_norm=1.0)
        # Gemma Scope's form: no b_dec subtracted from the input, encoder bias 0 here, a threshold per feature.
        threshold = firing_cut(x @ W_enc, l0).clamp_min(0.0)
        return SAE(W_enc=W_enc, b_enc=torch.zeros(d_sae), W_dec=W_dec, b_dec=b_dec, apply_b_dec_to_input=False,
                   hook_name=hook, layer=layer, head=head, model_name=cfg["model_name"],
                   activation=JumpReLU(threshold)).to(device=device)

    head_saes = HeadSAEs(tuple(sae(d_head, 4096, h, z[:, h]) for h in range(n_heads)))
    concat = sae(n_heads * d_head, 16384, "concatenated", z.reshape(len(z), -1))
    return World(model, head_saes, concat, layer, contexts[n_calibration:], z.double().mean(dim=0).to(device))


def build_world(args: argparse.Namespace) -> World:
    """The world ``--size`` names."""
    if args.size == "gelu-2l":
        return gelu_2l_world(args.contexts, args.l0, args.seed, args.device)
    if args.size == "gemma-3-270m":
        return gemma_3_270m_world(args.contexts, args.l0, args.seed, args.device)
    return demo_world(args.contexts, args.device)


DEFAULT_CONTEXTS = {"gelu-2l": 4, "demo": 256, "gemma-3-270m": 2}


def demo_world(n_contexts: int, device: str) -> World:
    from sparsedecomp.activations import MeanAccumulator, run_accumulators
    from sparsedecomp.demo import demo_tokens, load_demo_world

    world = load_demo_world()
    tokens = demo_tokens(n_contexts + 1).tokens
    model = world.model.to(device)
    mean_z = run_accumulators(model, tokens[:1], {"mean": MeanAccumulator()}, layer=world.layer)["mean"]
    return World(model, world.head_saes.to(device=device), world.concat_sae.to(device=device), world.layer,
                 tokens[1:], mean_z)


def decomposition(world: World, codes: str, seed: int) -> Any:
    """The concat SAE's unit decoder rows in ``head_saes.dictionary(normalize=True)``: solved by ``nn_omp`` or
    random sparse codes of :data:`N_NONZERO` atoms a row (unit-norm, positive)."""
    from sparsedecomp import Codes, Decomposition, make_solver
    from sparsedecomp.jobs.solve import concat_targets

    dictionary = world.head_saes.dictionary(normalize=True)
    targets = concat_targets(world.concat_sae)[0].to(dictionary.dtype)
    if codes == "solve":
        return make_solver("nn_omp", n_nonzero=N_NONZERO, tol=0.01).prepare(dictionary).solve(targets)
    gen = torch.Generator().manual_seed(seed)
    n, n_atoms = targets.shape[0], dictionary.n_atoms
    atoms = torch.rand(n, n_atoms, generator=gen).topk(N_NONZERO, dim=1).indices  # distinct atoms per row
    values = torch.rand(n, N_NONZERO, generator=gen)
    sparse = Codes.sparse(atoms.to(targets.device), (values / values.norm(dim=1, keepdim=True)).to(targets), n_atoms)
    zeros = torch.zeros(n, device=targets.device)
    return Decomposition(codes=sparse, reconstruction=dictionary.reconstruct(sparse), targets=targets,
                         objective=zeros, certificate=zeros, certificate_kind="exact", iterations=zeros.long(),
                         status=zeros.long(), solver="random", dictionary=dictionary)


# -- measuring one stage (in the child process) -------------------------------------------------------------------
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _proc_status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return -1


def _reset_peak_rss() -> None:
    """Linux: writing 5 to ``clear_refs`` resets ``VmHWM`` to the current RSS."""
    Path("/proc/self/clear_refs").write_text("5")


@dataclass(frozen=True)
class Measured:
    """One measured call: its result, wall seconds (synchronised on CUDA), RSS before, peak RSS during it (both KiB,
    from ``/proc/self/status``) and the CUDA peak (bytes; ``None`` off CUDA)."""

    result: Any
    seconds: float
    rss_before_kib: int
    peak_rss_kib: int
    cuda_peak_bytes: int | None


def measure_call(work: Callable[[], Any], device: str) -> Measured:
    """Run ``work()`` once with the RSS high-water mark and the CUDA peak reset first (:class:`Measured`)."""
    rss = _proc_status_kib("VmRSS")
    _reset_peak_rss()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    start = time.perf_counter()
    result = work()
    _sync(device)
    seconds = time.perf_counter() - start
    return Measured(result=result, seconds=seconds, rss_before_kib=rss, peak_rss_kib=_proc_status_kib("VmHWM"),
                    cuda_peak_bytes=torch.cuda.max_memory_allocated() if device == "cuda" else None)


def timed_splice_accumulator(model: Any, variants: Any, device: str) -> Any:
    """A :class:`~sparsedecomp.evaluation.splice.SpliceAccumulator` that adds up, per variant, the seconds of its
    reruns: the forward from the hooked layer with the replacement hooked in (``_final_normed``) and the
    unembedding, block of vocabulary columns by block (``_logits_block``)."""
    from sparsedecomp.evaluation.splice import SpliceAccumulator

    class TimedSplice(SpliceAccumulator):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            self.rerun_s: dict[str, float] = defaultdict(float)

        def _final_normed(self, batch, variant):
            _sync(device)
            start = time.perf_counter()
            residual = super()._final_normed(batch, variant)
            _sync(device)
            self.rerun_s["clean" if variant is None else variant.name] += time.perf_counter() - start
            return residual

        def _logits_block(self, normed, columns, name):
            _sync(device)
            start = time.perf_counter()
            logits = super()._logits_block(normed, columns, name)
            _sync(device)
            self.rerun_s[name] += time.perf_counter() - start
            return logits

    return TimedSplice(model, variants)


def run_stage(stage: str, world: World, tokens: torch.Tensor, dec: Any, args: argparse.Namespace
              ) -> tuple[Callable[[], Any], Any]:
    """``(work, the stage's splice accumulator or None)`` for ``stage`` on ``tokens``; what a stage needs but does
    not measure (the routed decoder, the variants, the accumulators) is built here, before the clock starts.
    ``dec``: the decomposition (faithfulness and splice stages)."""
    from sparsedecomp.activations import MeanAccumulator, run_accumulators
    from sparsedecomp.evaluation.analyses import (HeadOutputCosineAccumulator, dictionary_ranks,
                                                  mixed_feature_interference, output_subspace_carry)
    from sparsedecomp.evaluation.attribution import DFAAccumulator
    from sparsedecomp.evaluation.faithfulness import FaithfulnessAccumulator
    from sparsedecomp.evaluation.routing import route_decomposition
    from sparsedecomp.evaluation.sae_quality import sae_quality_accumulators
    from sparsedecomp.evaluation.splice import select_variants, splice_variants

    W_O = world.model.W_O[world.layer].detach()
    n_heads, d_head = world.model.cfg.n_heads, world.model.cfg.d_head

    def on_tokens(accumulators: dict) -> Callable[[], Any]:
        return lambda: run_accumulators(world.model, tokens, accumulators, layer=world.layer)

    if stage == "decompose":
        return (lambda: decomposition(world, args.codes, args.seed)), None
    if stage == "ranks":
        return (lambda: dictionary_ranks(world.head_saes, world.concat_sae, W_O)), None
    if stage == "carry":
        return (lambda: output_subspace_carry(world.head_saes, W_O)), None
    if stage == "mixed_interference":
        return (lambda: mixed_feature_interference(world.head_saes, W_O)), None
    if stage == "activations":
        return on_tokens({"pass": _PassOnly()}), None
    if stage == "sae_quality":
        return on_tokens({f"quality:{k}": v for k, v in sae_quality_accumulators(world.head_saes,
                                                                                 world.concat_sae).items()}), None
    if stage == "mean":
        return on_tokens({"mean": MeanAccumulator()}), None
    if stage == "dfa":
        return on_tokens({"dfa": DFAAccumulator(world.concat_sae, n_heads, k=20)}), None
    if stage == "head_output_cosines":
        return on_tokens({"cosines": HeadOutputCosineAccumulator(W_O)}), None
    if stage == "faithfulness":
        return on_tokens({"faithfulness": FaithfulnessAccumulator(world.concat_sae, world.head_saes, dec,
                                                                  label=LABEL, k=20)}), None
    routed = {LABEL: route_decomposition(world.concat_sae, dec, world.head_saes.dictionary(normalize=True),
                                         label=LABEL, W_O=W_O)}
    variants = splice_variants(n_heads, d_head, head_saes=world.head_saes, concat_sae=world.concat_sae,
                               mean_z=world.mean_z.to(W_O), routed=routed)
    kind = stage.removeprefix("splice:")
    if kind != "all":
        name = SPLICE_KINDS[kind]
        variants = select_variants(variants, [] if name is None else [name])
    accumulator = timed_splice_accumulator(world.model, variants, args.device)
    return on_tokens({"splice": accumulator}), accumulator


def child(args: argparse.Namespace) -> dict:
    from sparsedecomp.evaluation.metrics import l0

    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    world = build_world(args)
    dec = None
    if args.child.startswith(("faithfulness", "splice")):
        # Solved again in each stage's process (deterministic, untimed) rather than unpickled from a cache file.
        dec = decomposition(world, args.codes, args.seed)
    if args.child not in WEIGHT_STAGES:
        # The first 64 tokens of one context first, untimed: the first call of each kernel (allocator, thread pool,
        # lazy inits) is slower; a whole 1,024-token context would double a splice stage's time at gemma-3-270m.
        run_stage(args.child, world, world.tokens[:1, :64], dec, args)[0]()
    work, splice = run_stage(args.child, world, world.tokens, dec, args)
    measured = measure_call(work, args.device)
    result = measured.result
    out = {"stage": args.child, "seconds": measured.seconds, "n_tokens": world.tokens.numel(),
           "n_contexts": int(world.tokens.shape[0]), "world_rss_kib": measured.rss_before_kib,
           "peak_rss_kib": measured.peak_rss_kib, "cuda_peak_bytes": measured.cuda_peak_bytes}
    if splice is not None:
        out["rerun_s"] = dict(splice.rerun_s)
        out["n_variants"] = len(splice.variants)
    if args.child == "sae_quality":
        out["l0"] = {name.removeprefix("quality:"): q.l0 for name, q in result.items()}
    if args.child == "decompose":
        out["mean_l0"] = float(l0(result.codes).double().mean())
    return out


# -- the parent: one subprocess per stage, then the table ---------------------------------------------------------
def measure(stage: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, "-m", "benchmarks.evaluation", "--child", stage, "--size", args.size,
               "--contexts", str(args.contexts), "--threads", str(args.threads), "--device", args.device,
               "--codes", args.codes, "--l0", str(args.l0), "--seed", str(args.seed)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        sys.exit(f"stage {stage} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(lines[-1].removeprefix("RESULT "))
    print(f"  {stage:<24} {result['seconds']:8.2f} s   peak RSS {result['peak_rss_kib'] / 1024:8.0f} MiB", flush=True)
    return result


def _mib(kib: int) -> str:
    return f"{kib / 1024:,.0f}"


def table(results: dict[str, dict], args: argparse.Namespace) -> str:
    n_tokens = results["activations"]["n_tokens"]
    per_m = 1e6 / n_tokens
    activations_s = results["activations"]["seconds"]
    cuda = args.device == "cuda"
    head = ("| stage | measured s | s per 1M tokens | extra over activation pass, s per 1M | world RSS MiB | "
            "peak RSS MiB |" + (" CUDA peak MiB |" if cuda else "") + " note |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]

    def row(name: str, r: dict, seconds: float, per_million: str, extra: str, note: str = "") -> None:
        cells = [name, f"{seconds:.2f}", per_million, extra, _mib(r["world_rss_kib"]), _mib(r["peak_rss_kib"])]
        if cuda:
            cells.append(f"{r['cuda_peak_bytes'] / 2**20:,.0f}")
        cells.append(note)
        rows.append("| " + " | ".join(cells) + " |")

    for stage in TOKEN_STAGES:
        if stage not in results:
            continue
        r = results[stage]
        extra = "" if stage == "activations" else f"{(r['seconds'] - activations_s) * per_m:,.0f}"
        label = {"activations": "activation pass alone (model up to the hooked layer)",
                 "sae_quality": "SAE quality (every per-head SAE + concat)", "mean": "mean pass",
                 "dfa": "DFA / top-k attribution", "faithfulness": f"faithfulness ({LABEL}, codes: {args.codes})",
                 "splice:all": f"splice: all {r.get('n_variants', '?')} variants"}.get(stage, stage)
        row(label, r, r["seconds"], f"{r['seconds'] * per_m:,.0f}", extra)
    everything = results.get("splice:all")
    if everything is not None:
        loss_s = (everything["seconds"] - activations_s - sum(everything["rerun_s"].values())) / everything["n_variants"]
        rows.append(f"| splice: per-variant losses (CE, KL; shared by every variant) | {loss_s:.2f} | "
                    f"{loss_s * per_m:,.0f} | | | |" + (" |" if cuda else "") + " |")
        if not any(f"splice:{kind}" in results for kind in SPLICE_KINDS):
            for variant, seconds in everything["rerun_s"].items():  # each variant's reruns, timed in that pass
                rows.append(f"| splice rerun in the all-variants pass: {variant} | {seconds:.2f} | "
                            f"{seconds * per_m:,.0f} | | | |" + (" |" if cuda else "") + " |")
    for kind, name in SPLICE_KINDS.items():
        if f"splice:{kind}" not in results or everything is None:
            continue
        r = results[f"splice:{kind}"]
        rerun = r["rerun_s"]["clean" if name is None else name]
        in_all = [s for v, s in everything["rerun_s"].items() if v == (name or "clean") or
                  (kind in ("zero_head", "head_sae") and v.startswith(kind + "_"))]
        note = (f"rerun in the all-variants pass: {sum(in_all) / len(in_all) * per_m:,.0f} s per 1M"
                + (f" (mean of {len(in_all)} heads)" if len(in_all) > 1 else ""))
        row(f"splice rerun: {kind}" + ("" if name in (None, kind) else f" ({name}, alone)"), r, rerun,
            f"{rerun * per_m:,.0f}", "", note)
    for stage in WEIGHT_STAGES:
        if stage not in results:
            continue
        r = results[stage]
        label = {"decompose": f"decompose ({'nn_omp n_nonzero=16' if args.codes == 'solve' else 'random codes'}, "
                              "weights only)"}.get(stage, f"{stage} (weights only)")
        row(label, r, r["seconds"], "", "")
    return "\n".join(rows)


def header(args: argparse.Namespace, results: dict[str, dict]) -> str:
    r = results["activations"]
    l0 = results.get("sae_quality", {}).get("l0", {})
    heads = [v for k, v in l0.items() if k != "concat"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                text=True).stdout.strip())
    lines = [
        f"# Evaluation cost, size {args.size}",
        "",
        f"- {r['n_contexts']} contexts, {r['n_tokens']:,} tokens measured; every 'per 1M tokens' number is that "
        "measurement extrapolated linearly",
        f"- device {args.device}; torch {torch.__version__}, {args.threads} threads; {os.cpu_count()} CPUs; "
        f"load average before/after {results['_load'][0]} / {os.getloadavg()[0]:.2f}; "
        f"{platform.platform()}; commit {commit}{' (dirty)' if dirty else ''}",
        f"- SAE L0 on the measured tokens: per-head mean {sum(heads) / max(len(heads), 1):.1f} "
        f"(min {min(heads, default=float('nan')):.1f}, max {max(heads, default=float('nan')):.1f}), "
        f"concat {l0.get('concat', float('nan')):.1f}"
        + (" (the demo's trained SAEs)" if args.size == "demo" else f" (target {args.l0:g})"),
        f"- decomposition: {'nn_omp n_nonzero=16 tol=0.01, solved' if args.codes == 'solve' else 'random sparse codes'}"
        f", mean L0 {results.get('decompose', {}).get('mean_l0', float('nan')):.1f}",
        "- each stage in a fresh process: 'world RSS' = resident before the stage, 'peak RSS' = the stage's VmHWM "
        "(world included); splice reruns are timed inside the accumulator (head variants: head 0)",
        "",
    ]
    return "\n".join(lines) + "\n"


def add_world_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a benchmark world (:func:`build_world`) and where it runs."""
    parser.add_argument("--size", choices=tuple(DEFAULT_CONTEXTS), default="gelu-2l")
    parser.add_argument("--contexts", type=int, default=None,
                        help="measured contexts (default: 4 of 1,024 tokens at gelu-2l, 256 of 128 on the demo, 2 of "
                             "1,024 at gemma-3-270m)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    parser.add_argument("--l0", type=float, default=16.0, help="target L0 of the random SAEs (gelu-2l, gemma-3-270m)")
    parser.add_argument("--seed", type=int, default=0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_world_arguments(parser)
    parser.add_argument("--codes", choices=("solve", "random"), default="solve")
    parser.add_argument("--child", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=None,
                        help="the stages to measure, in run order (default: all; gemma-3-270m: activations, "
                             "sae_quality, decompose, splice:all -- the splice row times every variant's reruns)")
    args = parser.parse_args(argv)
    if args.stages is None:
        args.stages = (("decompose", "activations", "sae_quality", "splice:all") if args.size == "gemma-3-270m"
                       else STAGES)
    args.stages = [stage for stage in STAGES if stage in args.stages]
    args.device = resolve_device(args.device)
    if args.contexts is None:
        args.contexts = DEFAULT_CONTEXTS[args.size]
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    print(f"size {args.size}, {args.contexts} contexts, device {args.device}, {args.threads} threads", flush=True)
    results: dict[str, Any] = {"_load": [f"{x:.2f}" for x in os.getloadavg()]}
    for stage in args.stages:
        results[stage] = measure(stage, args)
    write_result(f"evaluation-{args.size}", header(args, results) + table(results, args) + "\n")


def write_result(stem: str, text: str) -> Path:
    """Print a markdown result and write it to ``benchmarks/results/<stem>-<timestamp>.md``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}.md"
    path.write_text(text)
    print()
    print(text)
    print(f"written to {path}")
    return path


if __name__ == "__main__":
    main()
