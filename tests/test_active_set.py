"""The inner solver's batched feature-sign steps (solvers/active_set.py) on hand-checkable subproblems."""

import torch

from sparsedecomp.solvers.active_set import entering_signs, newton_step


def subproblem(seed: int, k: int = 10, d: int = 6):
    """``f(c) = 0.5 c G c - b.c + alpha ||c||_1`` for ``k`` random atoms in ``d`` dimensions (float64)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(k, d, generator=g, dtype=torch.float64)
    y = torch.randn(d, generator=g, dtype=torch.float64)
    return A @ A.T, A @ y


def objective(gram, b, c, alpha):
    return 0.5 * c @ gram @ c - b @ c + alpha * c.abs().sum()


def step(gram, b, c, sign, alpha):
    """:func:`newton_step` on every row of ``gram`` with ``q = b - c G`` current and no ridge."""
    q = b - torch.bmm(c[:, None, :], gram).squeeze(1)
    n = gram.shape[0]
    alphas = torch.full((n,), alpha, dtype=gram.dtype)
    return newton_step(gram, torch.arange(n), q, c, sign, alphas, torch.zeros(n, dtype=gram.dtype))


def test_newton_step_solves_the_active_system_and_leaves_the_rest_of_the_working_set_at_zero():
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
    new, moved, blocked = step(gram, b, c, c.sign(), alpha)
    torch.testing.assert_close(new, star, rtol=1e-9, atol=1e-12)  # zeros off the support included
    assert bool(moved.all()) and not bool(blocked.any())


def test_a_step_that_meets_a_sign_change_zeroes_a_coordinate_decreases_f_and_reports_blocked():
    # Non-negative-style start: every coordinate positive, but the unconstrained minimiser on this support has
    # negative entries, so the step must stop at (or project onto) zero for some coordinate.
    gram, b = subproblem(3, k=6, d=6)
    alpha = 0.01
    solution = torch.linalg.solve(gram, b - alpha)
    assert bool((solution < 0).any())  # the premise: the full step would flip a sign
    c = torch.full((1, 6), 0.1, dtype=torch.float64)
    new, moved, blocked = step(gram[None], b[None], c, c.sign(), alpha)
    assert bool(moved[0]) and bool(blocked[0])
    assert bool((new >= 0).all()) and bool((new == 0).any())
    assert float(objective(gram, b, new[0], alpha)) < float(objective(gram, b, c[0], alpha))


def test_one_entering_atom_from_a_pattern_minimiser_moves_along_its_sign_and_lowers_f():
    # The feature-sign guarantee the solver's fallback rests on: at the minimiser of the pattern on support {0, 1},
    # the most violating zero coordinate enters with the sign of its correlation and the step lowers f.
    gram, b = subproblem(5, k=8, d=8)
    alpha = 0.05
    c = torch.zeros(1, 8, dtype=torch.float64)
    S = torch.tensor([0, 1])
    c[0, S] = torch.tensor([0.7, -0.4], dtype=torch.float64)
    b = b.clone()
    b[S] = gram[S][:, S] @ c[0, S] + alpha * c[0, S].sign()  # so c is the minimiser of its pattern
    q = b - c[0] @ gram
    violation = q.abs() - alpha
    violation[S] = float("-inf")
    j = int(violation.argmax())
    assert float(violation[j]) > 0  # the premise: some atom violates
    sign = entering_signs(q[None], c, torch.ones(1, 8, dtype=torch.bool), torch.tensor([alpha], dtype=torch.float64),
                          torch.tensor([1]), torch.zeros(1, dtype=torch.float64), nonnegative=False)
    expected = c.sign().clone()
    expected[0, j] = torch.sign(q[j])
    assert torch.equal(sign, expected)
    new, moved, _ = step(gram[None], b[None], c, sign, alpha)
    assert bool(moved[0])
    assert float(new[0, j] * torch.sign(q[j])) > 0
    assert float(objective(gram, b, new[0], alpha)) < float(objective(gram, b, c[0], alpha))


def test_entering_signs_take_the_most_violating_usable_zero_coordinates_above_the_margin():
    q = torch.tensor([[0.9, -0.8, 0.7, -0.3, 0.2, 5.0]], dtype=torch.float64)
    c = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)  # coordinate 5 is already active
    usable = torch.tensor([[True, True, False, True, True, True]])  # coordinate 2 is padding
    alpha = torch.tensor([0.25], dtype=torch.float64)
    margin = torch.tensor([0.01], dtype=torch.float64)
    signed = entering_signs(q, c, usable, alpha, torch.tensor([3]), margin, nonnegative=False)
    # |q| - alpha: 0.65, 0.55, (padding), 0.05, -0.05: the three largest above the margin are 0, 1 and 3.
    assert signed.tolist() == [[1.0, -1.0, 0.0, -1.0, 0.0, 1.0]]
    # Non-negative: only positive correlations violate; a margin above 0.05 keeps coordinate 3 (q = -0.3) out anyway.
    nonneg = entering_signs(q, c, usable, alpha, torch.tensor([3]), margin, nonnegative=True)
    assert nonneg.tolist() == [[1.0, 0.0, 0.0, 0.0, 0.0, 1.0]]
    # n_enter = 0 (a blocked row): nothing enters.
    assert torch.equal(entering_signs(q, c, usable, alpha, torch.tensor([0]), margin, nonnegative=False), c.sign())
