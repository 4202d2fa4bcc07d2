"""The decomposition run's self-contained page (``index.html``), rendered from ``decomposition.html.j2``."""

from __future__ import annotations

from typing import Mapping, Sequence

from .decomposition_report import DecompositionReport
from .rendering import render

# Heads shown per feature in each share column.
TOP_HEADS_SHOWN = 3


def render_decomposition_page(report: DecompositionReport, *, max_features: int = 2048,
                               links: Sequence[Mapping[str, str]] = ()) -> str:
    """The page: links to the pages beside it (``links``: ``href``, ``title``, ``description``), settings and
    context, ranks, dataset-level metrics and head shares per space, then one row per concat feature (the first
    ``max_features``): top heads by coefficient mass and by decoder weight, top per-head features with their
    coefficients."""
    sizes = report.dictionary_sizes
    sizes_text = (f"{next(iter(sizes.values()))} features each" if len(set(sizes.values())) == 1
                  else ", ".join(f"h{h}: {n}" for h, n in sizes.items()))
    head_ranks = ", ".join(f"h{h}: {r}" for h, r in report.ranks.head_dictionaries.items())
    return render("decomposition.html.j2", report=report, sizes_text=sizes_text, head_ranks=head_ranks,
                  max_features=max_features, top_heads=top_heads, links=list(links))


def top_heads(shares: Sequence[float], n: int = TOP_HEADS_SHOWN) -> list[tuple[int, float]]:
    """``(head, share)`` of the ``n`` largest shares, largest first (ties by head index), leaving out zeros."""
    order = sorted(range(len(shares)), key=lambda h: -shares[h])[:n]
    return [(h, shares[h]) for h in order if shares[h] > 0]
