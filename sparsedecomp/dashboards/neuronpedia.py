"""Neuronpedia's batch feature JSON (the keys of ``shared/docs/anchors.md``, "Feature dashboards") from feature
records, with this package's extras under ``sd_*`` keys: per-head DFA on each activation (``sd_dfa_heads``, the
window's DFA by head; ``sd_dfa_before_window``, each head's DFA from the sources before the window; and
``sd_dfa_bias``) and the head attribution of a concat feature (``sd_head_attribution``).

Neuronpedia's own ``dfa_values`` is the DFA summed over heads at each source token; ``dfa_maxValue`` its maximum
and ``dfa_targetIndex`` the ranked token. The top-activations group has ``bin_min = bin_max = bin_contains = -1``
as SAEDashboard writes it; quantile groups carry their interval and sample count of examples.
"""

from __future__ import annotations

from typing import Any

from ..naming import CONCAT_NAME
from .gather import DashboardData
from .records import DIGITS, dfa_values


def neuronpedia_batch(data: DashboardData, name: str, records: list[dict[str, Any]], *,
                      model_id: str) -> dict[str, Any]:
    """The batch object for SAE ``name``'s ``records``."""
    g = data.saes[name]
    vectors = g.sae.W_dec.tolist()
    features = []
    for rec in records:
        f = rec["feature"]
        activations = [_activation(e, -1, -1, -1) for e in rec["examples"]["top"]]
        for group in rec["examples"]["quantiles"]:
            # bin_contains: the activations in the interval, estimated as an equal share of the non-zero ones
            # (the intervals are quantiles of equal mass)
            contains = round(rec["n_firing"] / len(rec["examples"]["quantiles"]))
            activations += [_activation(e, group["lo"], group["hi"], contains) for e in group["examples"]]
        attribution = rec["attribution"]
        features.append({
            "feature_index": f,
            "neuron_alignment_indices": [], "neuron_alignment_values": [], "neuron_alignment_l1": [],
            "correlated_neurons_indices": [], "correlated_neurons_l1": [], "correlated_neurons_pearson": [],
            # activation correlations are not computed: the similar features (decoder cosine) go under sd_*
            "correlated_features_indices": [], "correlated_features_l1": [], "correlated_features_pearson": [],
            "sd_similar_decoder_indices": [c["feature"] for c in rec["correlated"]],
            "sd_similar_decoder_cosines": [c["cosine"] for c in rec["correlated"]],
            "neg_str": [t for t, _ in rec["logits"]["bottom"]], "neg_values": [v for _, v in rec["logits"]["bottom"]],
            "pos_str": [t for t, _ in rec["logits"]["top"]], "pos_values": [v for _, v in rec["logits"]["top"]],
            "frac_nonzero": rec["density"],
            "freq_hist_data_bar_values": _centres(rec["activation_histogram"]["edges"]),
            "freq_hist_data_bar_heights": rec["activation_histogram"]["counts"],
            "logits_hist_data_bar_values": _centres(rec["logits"]["histogram"]["edges"]),
            "logits_hist_data_bar_heights": rec["logits"]["histogram"]["counts"],
            "n_prompts_total": data.n_contexts, "n_tokens_in_prompt": data.context_size, "dataset": "",
            "decoder_weights_dist": (attribution["methods"]["weight"] or []) if attribution else [],
            "activations": activations,
            "vector": vectors[f],
            "sd_head_attribution": attribution,
            "sd_firing_rule": rec["firing_rule"],
        })
    return {"model_id": model_id, "layer": data.layer, "sae_set": "sparsedecomp",
            "sae_id_suffix": name if name != CONCAT_NAME else "concat",
            "sd_activation_rule": g.sae.activation.summary(), "features": features}


def _activation(example: dict[str, Any], lo: float, hi: float, contains: int) -> dict[str, Any]:
    dfa = example["dfa"]
    heads = None if dfa is None else dfa_values(dfa)
    summed = None if heads is None else [float(f"{sum(col):.{DIGITS}g}") for col in zip(*heads)]
    return {"bin_min": lo, "bin_max": hi, "bin_contains": contains, "tokens": example["tokens"],
            "values": example["acts"], "qualifying_token_index": example["focus"],
            "dfa_values": summed or [], "dfa_maxValue": max(summed) if summed else 0.0,
            "dfa_targetIndex": example["focus"],
            "sd_dfa_heads": heads,
            "sd_dfa_before_window": None if dfa is None else dfa["before_window"],
            "sd_dfa_bias": None if dfa is None else dfa["bias"]}


def _centres(edges: list) -> list:
    return [None if a is None or b is None else (a + b) / 2 for a, b in zip(edges, edges[1:])]
