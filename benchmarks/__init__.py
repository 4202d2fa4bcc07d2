"""Reproducible benchmarks for sparsedecomp (planted problems, solver comparisons); not part of the package."""
