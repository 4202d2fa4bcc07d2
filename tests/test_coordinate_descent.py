"""The inner solver's sign-pattern Newton step (solvers/coordinate_descent.py) on hand-checkable subproblems."""

import torch

from sparsedecomp.solvers.coordinate_descent import newton_step


def subproblem(seed: int, k: int = 10, d: int = 6):
    """``f(c) = 0.5 c G c - b.c + alpha ||c||_1`` for ``k`` random atoms in ``d`` dimensions (float64)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(k, d, generator=g, dtype=torch.float64)
    y = torch.randn(d, generator=g, dtype=torch.float64)
    return A @ A.T, A @ y


def objective(gram, b, c, alpha):
    return 0.5 * c @ gram @ c - b @ c + alpha * c.abs().sum()


def test_newton_step_solves_the_support_system_and_leaves_the_rest_of_the_working_set_at_zero():
    # Row 0: support {1, 4, 7} of a working set of 10; row 1: support {0, 2} (padding up to the widest support).
    # b is built so that c* (with its signs) solves G_SS c_S = b_S - alpha sign_S; from c = c*/2 (same signs) the
    # step, which only factorises G_SS, must land exactly on c* and keep every other coordinate at zero.
    alpha = 0.05
    grams, bs, starts, targets = [], [], [], []
    for seed, (support, values) in enumerate([([1, 4, 7], [0.8, -0.5, 0.3]), ([0, 2], [-0.4, 0.9])]):
        gram, b = subproblem(seed)
        star = torch.zeros(10, dtype=torch.float64)
        star[support] = torch.tensor(values, dtype=torch.float64)
        S = torch.tensor(support)
        b = b.clone()
        b[S] = gram[S][:, S] @ star[S] + alpha * torch.sign(star[S])
        grams.append(gram), bs.append(b), starts.append(0.5 * star), targets.append(star)
    gram, b, c, star = torch.stack(grams), torch.stack(bs), torch.stack(starts), torch.stack(targets)
    q = b - torch.bmm(c[:, None, :], gram).squeeze(1)
    new, new_q, blocked = newton_step(gram, q, c, torch.full((2,), alpha, dtype=torch.float64))
    torch.testing.assert_close(new, star, rtol=1e-9, atol=1e-12)  # zeros off the support included
    assert not bool(blocked.any())
    # q is kept current: b - c G for the new codes.
    torch.testing.assert_close(new_q, b - torch.bmm(new[:, None, :], gram).squeeze(1), rtol=1e-10, atol=1e-12)


def test_a_step_that_meets_a_sign_change_zeroes_a_coordinate_decreases_f_and_reports_blocked():
    # Non-negative-style start: every coordinate positive, but the unconstrained minimiser on this support has
    # negative entries, so the step must stop at (or project onto) zero for some coordinate.
    gram, b = subproblem(3, k=6, d=6)
    alpha = 0.01
    solution = torch.linalg.solve(gram, b - alpha)
    assert bool((solution < 0).any())  # the premise: the full step would flip a sign
    c = torch.full((1, 6), 0.1, dtype=torch.float64)
    q = b[None] - c @ gram
    new, _, blocked = newton_step(gram[None], q, c, torch.full((1,), alpha, dtype=torch.float64))
    assert bool(blocked[0])
    assert bool((new >= 0).all()) and bool((new == 0).any())
    assert float(objective(gram, b, new[0], alpha)) < float(objective(gram, b, c[0], alpha))
