"""Training the demo SAEs on layer ``hook_z``: per-head SAEs (Anthropic April 2024 recipe) and one concatenated-z
SAE (Kissane et al.'s recipe).

Per-head recipe (formats.md section 4), for head ``h`` with inputs ``x`` scaled by ``s_h = sqrt(d_head)/E||z_h||``::

    f = relu(x @ W_enc + b_enc)              (apply_b_dec_to_input = False)
    x_hat = f @ W_dec + b_dec
    loss = E ||x - x_hat||^2 + lambda * E sum_i f_i ||W_dec[i]||

decoder rows initialised with norm 0.1 and ``W_enc = W_dec.T``, biases 0, no unit-norm constraint, Adam,
gradient clipping at 1 (per head), lambda warm-up over the first 5% of steps, learning-rate decay to 0 over the last
20%. All heads train at once as one batched problem (parameters carry a leading head axis; every head's
optimisation is independent, so this is identical to eight separate runs).

Concat recipe: ``f = relu((x - b_dec) @ W_enc + b_enc)``, ``x_hat = f @ W_dec + b_dec``,
``loss = E ||x - x_hat||^2 + l1 * E sum_i |f_i|``, decoder rows kept at unit norm (gradient component along each
row removed before the step, rows renormalised after), Adam(0.9, 0.99), optionally the encoder initialised as the
decoder's transpose, dead features resampled at fixed steps from inputs drawn with probability proportional to their
squared reconstruction error.

Both log, every tenth of the run, the step's training batch ``x`` (``B`` rows): ``l0`` (mean active features) and
``explained_variance = 1 - E||x - x_hat||^2 / E||x - mean(x)||^2``, means over the batch, as SAELens's trainer logs
``metrics/explained_variance`` (not ``explained_variance_legacy``, the mean of per-row ratios). One batch is a noisy
estimate; :mod:`sparsedecomp.demo.quality` measures the same quantity on all held-out tokens.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor
from ..activations import CollectZ, run_accumulators
from ..errors import InputError


def collect_hook_z(model, tokens: Tensor, *, layer: int, batch_size: int = 32) -> Tensor:
    """``blocks.{layer}.attn.hook_z`` over every position of ``tokens``: ``(n_seq * n_ctx, n_heads, d_head)`` float32,
    read through the activation stream (:class:`~sparsedecomp.activations.CollectZ`). All positions are held at
    once: SAE training data and small token sets only."""
    return run_accumulators(model, tokens, {"z": CollectZ()}, layer=layer, batch_size=batch_size)["z"].float()


@dataclass(frozen=True)
class HeadSAEWeights:
    """Per-head SAE parameters stacked over heads, in the units of the *scaled* training inputs."""

    W_enc: Tensor  # (n_heads, d_head, d_sae)
    b_enc: Tensor  # (n_heads, d_sae)
    W_dec: Tensor  # (n_heads, d_sae, d_head)
    b_dec: Tensor  # (n_heads, d_head)
    training_scales: Tensor  # (n_heads,) s_h used in training (NOT saved: loaders re-estimate it)
    log: tuple[dict, ...]


@dataclass(frozen=True)
class ConcatSAEWeights:
    W_enc: Tensor  # (d_in, d_sae)
    b_enc: Tensor
    W_dec: Tensor  # (d_sae, d_in), unit rows
    b_dec: Tensor
    n_resampled: tuple[int, ...]
    log: tuple[dict, ...]


def _lr_factor(step: int, steps: int) -> float:
    """1 until the last 20% of steps, then linear decay to 0."""
    decay_start = int(0.8 * steps)
    if step < decay_start:
        return 1.0
    return max(0.0, (steps - step) / max(1, steps - decay_start))


def train_head_saes(acts: Tensor, *, d_sae: int, l1: Sequence[float], lr: float, steps: int, batch_size: int,
                    seed: int, log: Callable[[str], None] = print) -> HeadSAEWeights:
    """Train one April-2024-recipe SAE per head on ``acts`` (``(n_tokens, n_heads, d_head)``, unscaled)."""
    n, n_heads, d = acts.shape
    if len(l1) != n_heads:
        raise InputError(f"need one l1 coefficient per head ({n_heads}), got {len(l1)}")
    gen = torch.Generator().manual_seed(seed)
    scales = math.sqrt(d) / acts.norm(dim=-1).mean(0)  # (n_heads,)
    lam = torch.tensor(list(l1), dtype=torch.float32)

    direction = torch.randn(n_heads, d_sae, d, generator=gen)
    W_dec = (0.1 * direction / direction.norm(dim=-1, keepdim=True)).requires_grad_()
    W_enc = W_dec.detach().transpose(1, 2).clone().requires_grad_()
    b_enc = torch.zeros(n_heads, d_sae, requires_grad=True)
    b_dec = torch.zeros(n_heads, d, requires_grad=True)
    params = [W_enc, b_enc, W_dec, b_dec]
    opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))
    warmup = max(1, int(0.05 * steps))
    history, start = [], time.time()
    fired = torch.zeros(n_heads, d_sae)
    for step in range(steps):
        idx = torch.randint(0, n, (batch_size,), generator=gen)
        x = acts[idx] * scales[:, None]  # (B, H, d)
        for group in opt.param_groups:
            group["lr"] = lr * _lr_factor(step, steps)
        lam_now = lam * min(1.0, (step + 1) / warmup)
        with torch.enable_grad():
            f = torch.relu(torch.einsum("bhd,hdm->bhm", x, W_enc) + b_enc)
            x_hat = torch.einsum("bhm,hmd->bhd", f, W_dec) + b_dec
            mse = (x_hat - x).pow(2).sum(-1).mean(0)  # (H,)
            sparsity = (f * W_dec.norm(dim=-1)).sum(-1).mean(0)  # (H,)
            loss = (mse + lam_now * sparsity).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
        _clip_per_head(params, 1.0)
        opt.step()
        with torch.no_grad():
            fired += (f > 0).float().sum(0)
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            with torch.no_grad():
                l0 = (f > 0).float().sum(-1).mean(0)
                explained = 1 - mse / (x - x.mean(0)).pow(2).sum(-1).mean(0)
            entry = {"step": step + 1, "l0": l0.tolist(), "explained_variance": explained.tolist()}
            history.append(entry)
            log(f"  head SAEs step {step + 1}/{steps}: L0 {[round(v, 1) for v in entry['l0']]} explained variance "
                f"(batch) {[round(v, 3) for v in entry['explained_variance']]} ({time.time() - start:.0f}s)")
    return HeadSAEWeights(
        W_enc=W_enc.detach(), b_enc=b_enc.detach(), W_dec=W_dec.detach(), b_dec=b_dec.detach(),
        training_scales=scales, log=tuple(history),
    )


def _clip_per_head(params: Sequence[Tensor], max_norm: float) -> None:
    """Gradient clipping at ``max_norm`` for each head separately (dimension 0 of every parameter)."""
    sq = sum(p.grad.reshape(p.shape[0], -1).pow(2).sum(1) for p in params)
    factor = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.mul_(factor.view(-1, *([1] * (p.ndim - 1))))


def train_concat_sae(acts: Tensor, *, d_sae: int, l1: float, lr: float, steps: int, batch_size: int, seed: int,
                     resample_steps: Sequence[int] = (), tied_init: bool = False,
                     log: Callable[[str], None] = print) -> ConcatSAEWeights:
    """Train a Kissane-style SAE on concatenated ``z`` (``acts``: ``(n_tokens, n_heads * d_head)``, raw units).

    ``tied_init``: start the encoder as the (unit-row) decoder's transpose instead of an independent Kaiming draw,
    so that every feature initially reads the direction it writes (fewer features that never fire)."""
    n, d = acts.shape
    gen = torch.Generator().manual_seed(seed)
    W_enc = torch.empty(d, d_sae)
    W_dec = torch.empty(d_sae, d)
    _kaiming_uniform(W_enc, gen)
    _kaiming_uniform(W_dec, gen)
    W_dec /= W_dec.norm(dim=-1, keepdim=True)
    if tied_init:
        W_enc = W_dec.T.clone()
    W_enc.requires_grad_()
    W_dec.requires_grad_()
    b_enc = torch.zeros(d_sae, requires_grad=True)
    b_dec = torch.zeros(d, requires_grad=True)
    opt = torch.optim.Adam([W_enc, b_enc, W_dec, b_dec], lr=lr, betas=(0.9, 0.99))
    fired = torch.zeros(d_sae)
    history, resampled, start = [], [], time.time()
    for step in range(steps):
        if step in resample_steps:
            resampled.append(_resample_dead(acts, fired, W_enc, b_enc, W_dec, b_dec, opt, gen))
            fired.zero_()
        x = acts[torch.randint(0, n, (batch_size,), generator=gen)]
        for group in opt.param_groups:
            group["lr"] = lr * _lr_factor(step, steps)
        with torch.enable_grad():
            f = torch.relu((x - b_dec) @ W_enc + b_enc)
            x_hat = f @ W_dec + b_dec
            mse = (x_hat - x).pow(2).sum(-1).mean()
            loss = mse + l1 * f.abs().sum(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
        with torch.no_grad():
            # Keep W_dec rows on the unit sphere: drop the radial gradient, step, renormalise.
            unit = W_dec / W_dec.norm(dim=-1, keepdim=True)
            W_dec.grad -= (W_dec.grad * unit).sum(-1, keepdim=True) * unit
        opt.step()
        with torch.no_grad():
            W_dec /= W_dec.norm(dim=-1, keepdim=True)
            fired += (f > 0).float().sum(0)
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            with torch.no_grad():
                l0 = float((f > 0).float().sum(-1).mean())
                explained = float(1 - mse / (x - x.mean(0)).pow(2).sum(-1).mean())
            history.append({"step": step + 1, "l0": l0, "explained_variance": explained})
            log(f"  concat SAE step {step + 1}/{steps}: L0 {l0:.1f} explained variance (batch) {explained:.3f} "
                f"({time.time() - start:.0f}s)")
    return ConcatSAEWeights(W_enc=W_enc.detach(), b_enc=b_enc.detach(), W_dec=W_dec.detach(), b_dec=b_dec.detach(),
                            n_resampled=tuple(resampled), log=tuple(history))


def _kaiming_uniform(t: Tensor, gen: torch.Generator) -> None:
    # torch.nn.init.kaiming_uniform_ (a=0, fan_in = size(1)) with an explicit generator.
    bound = math.sqrt(6.0 / t.shape[1])
    t.uniform_(-bound, bound, generator=gen)


@torch.no_grad()
def _resample_dead(acts, fired, W_enc, b_enc, W_dec, b_dec, opt, gen, n_probe: int = 16384) -> int:
    """Re-initialise features that never fired since the last resample (Anthropic's 2023 scheme, simplified)."""
    dead = (fired == 0).nonzero().squeeze(1)
    if len(dead) == 0:
        return 0
    x = acts[torch.randint(0, len(acts), (n_probe,), generator=gen)]
    f = torch.relu((x - b_dec) @ W_enc + b_enc)
    err = (f @ W_dec + b_dec - x).pow(2).sum(-1)
    pick = torch.multinomial(err / err.sum(), len(dead), replacement=len(dead) > n_probe, generator=gen)
    direction = x[pick] - b_dec
    direction /= direction.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    alive = (fired > 0).nonzero().squeeze(1)
    enc_norm = W_enc[:, alive].norm(dim=0).mean() if len(alive) else torch.tensor(1.0)
    W_dec[dead] = direction
    W_enc[:, dead] = direction.T * 0.2 * enc_norm
    b_enc[dead] = 0.0
    for p in (W_enc, b_enc, W_dec):
        state = opt.state.get(p)
        if not state:
            continue
        for key in ("exp_avg", "exp_avg_sq"):
            if p is W_enc:
                state[key][:, dead] = 0.0
            else:
                state[key][dead] = 0.0
    return int(len(dead))


def calibrate_head_l1(acts: Tensor, *, d_sae: int, candidates: Sequence[float], target_l0: float, lr: float,
                      steps: int, batch_size: int, seed: int, log: Callable[[str], None] = print) -> tuple[list[float], dict]:
    """Choose lambda per head: one short batched run of every (head, candidate) pair, then per head the largest
    candidate whose final L0 is at least ``target_l0`` (the smallest candidate if none is). Sparser SAEs splice in
    worse, so the bar is on L0 from below. Returns ``(lambdas, table)`` with the measured L0s."""
    n_heads = acts.shape[1]
    cands = sorted(float(c) for c in candidates)
    k = len(cands)
    columns = [h for h in range(n_heads) for _ in range(k)]
    run = train_head_saes(acts[:, columns], d_sae=d_sae, l1=[c for _ in range(n_heads) for c in cands], lr=lr,
                          steps=steps, batch_size=batch_size, seed=seed, log=lambda s: None)
    l0 = torch.tensor(run.log[-1]["l0"]).view(n_heads, k)
    chosen, table = [], {}
    for h in range(n_heads):
        ok = [c for c, v in zip(cands, l0[h].tolist()) if v >= target_l0]
        chosen.append(max(ok) if ok else cands[0])
        table[str(h)] = {str(c): round(v, 2) for c, v in zip(cands, l0[h].tolist())}
    log(f"  calibrated lambda per head (target L0 >= {target_l0}): {chosen}")
    return chosen, table
