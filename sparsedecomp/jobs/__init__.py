"""The job layer: one place that resolves a run's inputs (:mod:`.inputs`), one decomposition driver (:mod:`.solve`),
and the jobs behind the commands (:mod:`.decompose`, :mod:`.evaluate`, :mod:`.dashboard`, :mod:`.commands`). It sits
above everything else (core types, solvers, loading, the activation stream, evaluation, dashboards, the writer) and
below only the command line, which parses flags into its options.
"""
