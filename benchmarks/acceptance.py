"""The acceptance criteria of the solver benchmark, as pure functions of the numbers a check measured.

Keeping the judgement apart from the measuring lets it be tested with numbers that must pass and numbers that must
fail, which a test-sized benchmark run never produces (its checks are SKIP: the thresholds are defined at the
full shape). Every ``judge_*`` returns a :class:`Verdict`; ``official=False`` (a run at another size) turns PASS
and FAIL into SKIP but keeps which criteria the measured numbers missed.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3

# (a) 2,048 targets on 8 x 2,048 x 64, CPU, float64.
OMP_MIN_SPEEDUP = 50.0
"""``omp`` and ``nn_omp`` (16 atoms) against scikit-learn's ``orthogonal_mp_gram``."""
OMP_IDENTICAL_SUPPORTS = 1.0
"""Share of compared targets on which ``omp`` must select the same atoms as scikit-learn (``nn_omp``: none, since
scikit-learn has no non-negative OMP)."""
NN_LASSO_MIN_SPEEDUP = 5.0
"""``nn_lasso`` against scikit-learn's positive-Lasso loop."""
NN_LASSO_MAX_GAP = 1e-6
"""Largest relative objective gap of ``nn_lasso`` to scikit-learn's over the compared targets."""
# (b) 16,384 targets, CPU, float32, each solver in a fresh process; (c) the same on CUDA.
CPU_TIME_LIMITS_S = {"omp": 60.0, "nn_lasso": 180.0}
CPU_MEMORY_LIMIT_BYTES = 8 * GIB
GPU_TIME_LIMITS_S = {"omp": 0.2, "nn_lasso": 1.0}


@dataclass(frozen=True)
class Verdict:
    """The outcome of one check.

    Attributes:
        status: ``"PASS"``, ``"FAIL"`` or ``"SKIP"`` (measured away from the size the criterion is defined at).
        unmet: the criteria the measured numbers missed, in words (empty: all met).
    """

    status: str
    unmet: tuple[str, ...] = ()

    @property
    def met(self) -> bool:
        """Whether the measured numbers meet every criterion (also for a SKIP: what the outcome would be)."""
        return not self.unmet


def _verdict(unmet: list[str], official: bool) -> Verdict:
    status = "SKIP" if not official else ("FAIL" if unmet else "PASS")
    return Verdict(status, tuple(unmet))


def judge_failed_run(error: str, *, official: bool) -> Verdict:
    """A measurement that raised or whose worker died: FAIL at the official size."""
    return _verdict([f"the run failed: {error}"], official)


def judge_omp(method: str, *, speedup: float, identical_supports: float | None, official: bool) -> Verdict:
    """Check (a) for ``omp`` / ``nn_omp``: at least :data:`OMP_MIN_SPEEDUP` times faster than
    ``orthogonal_mp_gram`` and, for ``omp``, identical supports on every compared target."""
    unmet = []
    if not speedup >= OMP_MIN_SPEEDUP:
        unmet.append(f"speed-up {speedup:.1f}x < {OMP_MIN_SPEEDUP:g}x")
    if method == "omp" and not (identical_supports is not None and identical_supports >= OMP_IDENTICAL_SUPPORTS):
        unmet.append(f"identical supports {identical_supports} < {OMP_IDENTICAL_SUPPORTS:g}")
    return _verdict(unmet, official)


def judge_nn_lasso(*, speedup: float, gap_max: float, official: bool) -> Verdict:
    """Check (a) for ``nn_lasso``: at least :data:`NN_LASSO_MIN_SPEEDUP` times faster than the scikit-learn loop
    and within :data:`NN_LASSO_MAX_GAP` of its objective on every compared target."""
    unmet = []
    if not speedup >= NN_LASSO_MIN_SPEEDUP:
        unmet.append(f"speed-up {speedup:.1f}x < {NN_LASSO_MIN_SPEEDUP:g}x")
    if not gap_max <= NN_LASSO_MAX_GAP:  # a NaN gap fails too
        unmet.append(f"objective gap {gap_max:.2e} > {NN_LASSO_MAX_GAP:g}")
    return _verdict(unmet, official)


def judge_worker(*, seconds: float, time_limit: float, peak_bytes: int | None, memory_limit: int | None,
                 official: bool = True) -> Verdict:
    """Checks (b) and (c): the solve took less than ``time_limit`` seconds and, when ``memory_limit`` is given,
    the worker's peak memory was measured and below it."""
    unmet = []
    if not seconds < time_limit:
        unmet.append(f"{seconds:.3f} s >= {time_limit:g} s")
    if memory_limit is not None:
        if peak_bytes is None:
            unmet.append("peak memory not measured")
        elif not peak_bytes < memory_limit:
            unmet.append(f"peak memory {peak_bytes / GIB:.2f} GiB >= {memory_limit / GIB:g} GiB")
    return _verdict(unmet, official)
