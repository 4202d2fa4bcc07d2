"""Command line: ``sparsedecomp demo`` and ``sparsedecomp decompose``. Thin: parse, call the library, print.

Parsing imports nothing heavy (``sparsedecomp --help`` answers without torch); the library is imported once a
command runs.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Sequence

from .errors import InputError
from .outputs import check_output_folder

# Literal copies of the registry's names and the pipeline's choices, so parsing needs no torch; a test checks
# they equal sparsedecomp.SOLVERS and sparsedecomp.pipeline's.
METHODS = ("pinv", "nnls", "lasso", "nn_lasso", "omp", "nn_omp", "cvxpy_lasso", "cvxpy_nn_lasso", "cvxpy_nnls",
           "cvxpy_bpdn")
SPACES = ("z", "residual", "both")
DEFAULT_METHOD = "nn_omp"
# The flag behind each solver parameter, to name it in errors.
PARAM_FLAGS = {"alpha": "--alpha", "n_nonzero": "--n-nonzero", "tol": "--tol", "max_iter": "--max-iter",
               "eps": "--eps"}
METHOD_HELP = """methods:
  nn_omp (default)  non-negative OMP: at most --n-nonzero atoms (16), stops early at --tol (0.01) FVU; fast
  omp               signed OMP, same budget
  nn_lasso, lasso   (non-negative) lasso; --alpha is a fraction of each feature's alpha_max (e.g. 0.05) unless
                    --alpha-absolute; certified by the duality gap
  pinv              per-head pseudoinverse (the seed notebook's decomposition): exact, dense codes
  nnls              non-negative least squares: SLOW today (minutes for hundreds of features, dense codes of
                    hundreds of atoms, some targets stop at --max-iter); use it on a few features as a
                    sparsity-free baseline
  cvxpy_*           interior-point references (about a second per feature): for checking a few features
                    (--features 0-63)
"""

DEMO_EVAL_CONTEXTS = 128
DEMO_DASHBOARD_CONTEXTS = 1563
"""The demo's dashboards read 1,563 contexts of 128 tokens: 200,064 tokens, the issue's demo-world size."""
EVALUATE_HELP = """what evaluate measures (report.json keys: docs/evaluation.md):
  splice        clean, zero_head_<h>, zero_layer, mean_layer, head_sae_<h>, all_head_saes, concat_sae and
                routed_<label> per --methods setting: cross-entropy, KL to clean, loss recovered, standard errors
  sae_quality   per SAE, SAELens run_evals names (l0, explained_variance, mse, cossim, ce_loss_score, ...)
  attribution   head attribution of every concat feature: weight, encoder, DFA on top tokens, decomposition
  faithfulness  how well each sparse z-space decomposition predicts the concat feature's activation
  analyses      decoder norms, ranks, head-output interference, W_O carry, mixed-feature interference
Per-head SAEs trained on inputs scaled by an unsaved factor get it re-estimated on the evaluation tokens and folded.
"""

# Only the package's own input errors and the operating system's file errors are the user's to fix; any other
# exception is a bug and keeps its traceback.
USER_ERRORS = (InputError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


SOURCE_HELP = """
sources (--concat-sae, --head-saes): a local path, or a hub reference:
  hf://OWNER/REPO[@REVISION]/VERSION   a Kissane pair {VERSION}.pt + {VERSION}_cfg.json in a Hugging Face repo
                                       (or hf://OWNER/REPO with --concat-version VERSION)
  saelens://RELEASE/SAE_ID             an SAE of a SAELens pretrained release
  saelens://OWNER/REPO/SAE_ID          an SAELens-format SAE in a hub repo outside the release directory
"""


def _add_solver_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default=DEFAULT_METHOD, choices=METHODS,
                   help=f"sparse-coding method (default {DEFAULT_METHOD} with n_nonzero=16, tol=0.01; see below)")
    p.add_argument("--alpha", type=float, help="lasso L1 weight, as a fraction of each feature's alpha_max "
                                               "(the weight that gives the zero code), e.g. 0.05")
    p.add_argument("--alpha-absolute", action="store_true",
                   help="read --alpha as an absolute L1 weight on the unit-norm targets instead")
    p.add_argument("--n-nonzero", type=int, help="atom budget (OMP methods)")
    p.add_argument("--tol", type=float, help="stopping tolerance")
    p.add_argument("--max-iter", type=int, help="iteration limit (iterative methods)")
    p.add_argument("--eps", type=float, help="residual bound (BPDN)")
    p.add_argument("--space", default="z", choices=SPACES,
                   help="decompose in concatenated z, in the residual stream (through W_O; needs a model), or both")
    p.add_argument("--out", type=str, required=True,
                   help="output folder: new, empty, or an earlier run's (summary.json, index.html, codes, manifest)")
    p.add_argument("--features", metavar="SPEC",
                   help="decompose only these concat features: indices and ranges, e.g. 0-63,99 (default: all)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _params(args: argparse.Namespace) -> dict:
    """The solver parameters given on the command line, checked against the method before anything loads."""
    params = {name: getattr(args, name) for name in PARAM_FLAGS if getattr(args, name) is not None}
    if args.alpha_absolute:
        if "alpha" not in params:
            raise InputError("--alpha-absolute needs --alpha")
        params["alpha_is_fraction_of_max"] = False
    if args.method in ("lasso", "nn_lasso", "cvxpy_lasso", "cvxpy_nn_lasso") and "alpha" not in params:
        raise InputError(f"--method {args.method} needs --alpha (a fraction of each feature's alpha_max, e.g. "
                         "0.05; with --alpha-absolute an absolute L1 weight)")
    if args.method == "cvxpy_bpdn" and "eps" not in params:
        raise InputError("--method cvxpy_bpdn needs --eps (the residual bound relative to each feature's norm)")
    from .pipeline import solver_params

    try:
        return solver_params(args.method, params)
    except InputError as err:  # name the flag, not the keyword argument
        message = str(err)
        for name, flag in PARAM_FLAGS.items():
            message = re.sub(rf"'{name}'|\b{name}\b", flag, message)
        raise InputError(message) from None


def _add_sae_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--concat-sae", required=True,
                   help="concat SAE: a local Kissane {version}.pt/_cfg.json folder or file, SAELens folder or "
                        "legacy run, or a hub reference (see below)")
    p.add_argument("--concat-version", help="Kissane version name, when the folder holds several pairs")
    p.add_argument("--head-saes", nargs="+", required=True, metavar="SOURCE",
                   help="one checkpoint per head (legacy SAELens run / checkpoint / SAE folders, SAELens folders, "
                        "or hub references)")
    p.add_argument("--head-index-map", help="comma-separated head index of each --head-saes source, in order "
                                            "(checked against each checkpoint's config), e.g. 0,1,2,3,4,5,6,7")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparsedecomp",
        description="Decompose attention-layer (concatenated z) SAE features into per-head SAE dictionaries.",
        epilog=METHOD_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the full decomposition on the bundled demo model and SAEs",
                          epilog=METHOD_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_argument("--artifacts", type=Path, default=None, help=argparse.SUPPRESS)
    demo.add_argument("--eval-contexts", type=int, default=DEMO_EVAL_CONTEXTS,
                      help=f"held-out contexts (128 tokens each) the evaluation report runs on (default "
                           f"{DEMO_EVAL_CONTEXTS}; up to 954)")
    demo.add_argument("--dashboard-contexts", type=int, default=DEMO_DASHBOARD_CONTEXTS,
                      help=f"contexts (128 tokens each) the dashboards (DIR/dashboards/) run on (default "
                           f"{DEMO_DASHBOARD_CONTEXTS}: 200,064 tokens; about 19,000 in the training documents, 954 "
                           f"with --dashboard-split heldout)")
    demo.add_argument("--dashboard-split", choices=("train", "heldout"), default="train",
                      help="which demo documents the dashboards read: the SAEs' training documents (default; as "
                           "SAEDashboard and Neuronpedia show the training distribution) or the held-out ones")
    demo.add_argument("--no-dashboards", action="store_true", help="skip the feature dashboards")
    demo.add_argument("--no-evaluate", action="store_true",
                      help="only decompose: skip the evaluation report (DIR/evaluation/)")
    _add_solver_args(demo)

    dec = sub.add_parser("decompose", help="decompose a real concat SAE into real per-head SAEs",
                         epilog=METHOD_HELP + SOURCE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_sae_args(dec)
    dec.add_argument("--model", help="TransformerLens model name (e.g. gelu-2l; loaded with from_pretrained's "
                                     "default processing flags) or a local model folder (loaded with the flags it "
                                     "records), for W_O and input-scale estimation; must be the SAEs' model")
    dec.add_argument("--tokens", type=Path,
                     help="safetensors/pt file with a 'tokens' [batch, pos] tensor (BOS first) to re-estimate the "
                          "per-head input scales on --model")
    _add_solver_args(dec)

    ev = sub.add_parser("evaluate", help="evaluate per-head SAEs, the concat SAE and decompositions on the model",
                        epilog=EVALUATE_HELP + SOURCE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_sae_args(ev)
    ev.add_argument("--model", required=True, help="TransformerLens model name (e.g. gelu-2l) or a local model "
                                                    "folder; must be the SAEs' model, processed as in their training")
    source = ev.add_mutually_exclusive_group()
    source.add_argument("--tokens", type=Path, help="safetensors/pt file with a 'tokens' [batch, pos] tensor")
    source.add_argument("--dataset", help="Hugging Face dataset name or local dataset folder (pre-tokenised "
                                          "'tokens'/'input_ids' column, or text with the model's tokenizer); "
                                          "default: the dataset the head SAEs' configs record (dataset_path)")
    ev.add_argument("--split", default="train", help="dataset split (default train)")
    ev.add_argument("--column", help="dataset column (default: tokens / input_ids / text, the first present)")
    ev.add_argument("--context-size", type=int, help="tokens per context (default: the SAEs' recorded context_size, "
                                                     "else the model's n_ctx)")
    ev.add_argument("--n-contexts", type=int, default=64, help="contexts to evaluate on (default 64)")
    ev.add_argument("--skip-contexts", type=int, default=0, help="dataset contexts to skip first (default 0)")
    bos = ev.add_mutually_exclusive_group()
    bos.add_argument("--prepend-bos", dest="prepend_bos", action="store_true", default=None,
                     help="put BOS at position 0 of every dataset context (default: the SAEs' recorded prepend_bos, "
                          "else on)")
    bos.add_argument("--no-prepend-bos", dest="prepend_bos", action="store_false")
    ev.add_argument("--bos-token-id", type=int, help="BOS token id (default: the model tokenizer's)")
    ev.add_argument("--methods", nargs="+", metavar="SETTING", default=None,
                    help="decompositions to route and compare: METHOD[:NAME=VALUE,...][@residual] (default: pinv "
                         "nn_omp:n_nonzero=16,tol=0.01 nn_lasso:alpha=0.2)")
    ev.add_argument("--top-k", type=int, default=20, help="top-activating tokens per feature for DFA (default 20)")
    ev.add_argument("--device", default="cpu", help="where the model and SAEs run: cpu, cuda, cuda:1 ... or auto "
                                                    "(cuda when available; default cpu)")
    ev.add_argument("--memory-budget-gb", type=float, default=1.0,
                    help="memory one batch of contexts may take, activations and forward pass (default 1 GiB)")
    ev.add_argument("--out", type=str, required=True,
                    help="output folder: new, empty, or an earlier run's (report.json, report.html, plotly.min.js)")
    ev.add_argument("--no-progress", action="store_true", help="hide progress bars")

    dash = sub.add_parser("dashboard", help="write the feature dashboards (a static site) of the concat and per-head "
                                            "SAEs, linked through the decompositions")
    _add_sae_args(dash)
    dash.add_argument("--model", required=True, help="TransformerLens model name or a local model folder")
    dsource = dash.add_mutually_exclusive_group()
    dsource.add_argument("--tokens", type=Path, help="safetensors/pt file with a 'tokens' [batch, pos] tensor")
    dsource.add_argument("--dataset", help="Hugging Face dataset name or local dataset folder")
    dash.add_argument("--split", default="train", help="dataset split (default train)")
    dash.add_argument("--column", help="dataset column")
    dash.add_argument("--context-size", type=int, help="tokens per context (default: the SAEs' recorded one)")
    dash.add_argument("--n-contexts", type=int, default=256, help="contexts to gather on (default 256)")
    dash.add_argument("--skip-contexts", type=int, default=0, help="dataset contexts to skip first (default 0)")
    dbos = dash.add_mutually_exclusive_group()
    dbos.add_argument("--prepend-bos", dest="prepend_bos", action="store_true", default=None)
    dbos.add_argument("--no-prepend-bos", dest="prepend_bos", action="store_false")
    dash.add_argument("--bos-token-id", type=int, help="BOS token id (default: the model tokenizer's)")
    dash.add_argument("--methods", nargs="+", metavar="SETTING", default=None,
                      help="decompositions linked on the pages (default as for evaluate)")
    dash.add_argument("--device", default="cpu", help="cpu, cuda, ... or auto")
    dash.add_argument("--keep-bos", action="store_true",
                      help="count position 0 (BOS) in the statistics and examples (default: left out)")
    dash.add_argument("--ignore-tokens", metavar="IDS",
                      help="comma-separated token ids left out of the statistics and examples (default: the "
                           "tokenizer's special tokens; '' for none)")
    dash.add_argument("--no-neuronpedia", action="store_true",
                      help="skip the Neuronpedia batch export (neuronpedia/<sae>.json, as large as the pages)")
    analysis = dash.add_mutually_exclusive_group()
    analysis.add_argument("--evaluate", action="store_true",
                          help="also evaluate (as sparsedecomp evaluate) on the first --eval-contexts contexts, into "
                               "OUT/evaluation/, and link the report as the site's analysis page")
    analysis.add_argument("--evaluation", type=Path, metavar="EVAL_DIR",
                          help="an earlier `sparsedecomp evaluate --out EVAL_DIR` run of these SAEs: its report is "
                               "copied into OUT/evaluation/ and linked as the site's analysis page")
    dash.add_argument("--eval-contexts", type=int, default=64, help="contexts --evaluate runs on (default 64)")
    dash.add_argument("--out", type=str, required=True, help="output folder (a new one, or an earlier run's to resume)")
    dash.add_argument("--no-progress", action="store_true", help="hide progress bars")

    seed = sub.add_parser("reproduce-seed", help="reproduce the research notebook's numbers (heads or kissane)",
                          description="Reproduce the seed notebook's numbers with this package, beside the seed's "
                                      "(see docs/evaluation.md, 'Reproducing the seed').")
    parts = seed.add_subparsers(dest="part", required=True)
    heads = parts.add_parser("heads", help="per-head SAEs on gelu-2l: cross-entropy clean / spliced / zeroed, "
                                           "decoder norms, ranks")
    heads.add_argument("--head-saes", nargs="+", required=True, metavar="SOURCE",
                       help="the per-head SAE runs (the seed's checkpoints/<wandb_id> folders), one per head")
    heads.add_argument("--head-index-map", help="comma-separated head index of each --head-saes source")
    heads.add_argument("--head", type=int, default=0, help="the head whose SAE is spliced in (the seed: 0)")
    heads.add_argument("--model", default="gelu-2l", help="model name or local folder (default gelu-2l)")
    heads.add_argument("--dataset", help="dataset name or local folder (default: the SAEs' recorded dataset_path, "
                                         "else NeelNanda/c4-code-tokenized-2b)")
    heads.add_argument("--split", default="train", help="dataset split (default train)")
    heads.add_argument("--column", help="dataset column (default: tokens / input_ids / text)")
    heads.add_argument("--n-contexts", type=int, default=32, help="contexts for the many-context estimate (32)")
    heads.add_argument("--bos-token-id", type=int, help="BOS token id (default: the model tokenizer's)")
    heads.add_argument("--out", required=True, help="output folder (seed.json)")
    heads.add_argument("--no-progress", action="store_true", help="hide progress bars")
    kissane = parts.add_parser("kissane", help="Kissane et al.'s concat SAE: decoder rank, feature 99's head shares")
    kissane.add_argument("--concat-sae", default=None, help="the concat SAE (default: the seed's run on the hub, "
                                                            "hf://ckkissane/tinystories-1M-SAES/.../..._v78)")
    kissane.add_argument("--concat-version", help="Kissane version name, when the folder holds several pairs")
    kissane.add_argument("--feature", type=int, default=99, help="the feature (the seed: 99)")
    kissane.add_argument("--out", required=True, help="output folder (seed.json)")
    return parser


def _print_result(result, elapsed: float) -> None:
    for space, res in result.summary.results.items():
        m = res.metrics.metrics
        print(f"[{space}] L0 mean {fmt(m['l0'].mean, '.2f')}, cosine mean {fmt(m['cosine'].mean, '.4f')}, "
              f"relative error median {fmt(m['relative_error'].median, '.4f')}, status {res.metrics.status_counts}")
        print(f"[{space}] {res.verdict}")
    print(f"wrote {result.summary_path} and {result.html_path} in {elapsed:.1f}s")


def fmt(value: float | None, spec: str) -> str:
    """``value`` formatted by ``spec``; ``-`` when no target gave a finite value (a summary's ``None``)."""
    return "-" if value is None else format(value, spec)


def run_demo(args: argparse.Namespace) -> int:
    params = _params(args)
    features = parse_features(args.features)
    check_output_folder(args.out)
    _positive(args.eval_contexts, "--eval-contexts")
    _positive(args.dashboard_contexts, "--dashboard-contexts")
    if not args.no_evaluate:
        check_output_folder(Path(args.out) / "evaluation")
    from .demo import load_demo_world
    from .pipeline import run_decomposition

    t0 = time.time()
    print("loading the demo world (model, tokenizer, SAEs; re-estimating per-head input scales) ...", flush=True)
    world = load_demo_world(args.artifacts)
    print(f"  {world.model.cfg.model_name}: {world.hook_name}, {len(world.head_saes)} head SAEs "
          f"(scales {', '.join(f'{s:.3g}' for s in world.head_scales.scales.values())}), concat SAE "
          f"{world.concat_sae.d_sae} features ({time.time() - t0:.1f}s)", flush=True)
    context = {"world": "sparsedecomp demo", "model": world.model.cfg.model_name, "hook": world.hook_name,
               "processing_flags": world.processing_flags.describe(),
               "head_scale_estimate": world.head_scales.description,
               "concat_sae": world.describe()["concat_sae"]["source"]}
    if "quality" in world.report:
        from .demo.quality import describe_summary

        context.update(describe_summary(world.report["quality"]["summary"]))
    result = run_decomposition(world.concat_sae, world.head_saes, out_dir=args.out, method=args.method,
                               params=params, space=args.space, W_O=world.W_O,
                               title="Demo: per-head decomposition of concat-SAE features", context=context,
                               progress=not args.no_progress, command="demo", features=features)
    _print_result(result, time.time() - t0)
    if not args.no_evaluate:
        from .demo import demo_tokens
        from .evaluation_run import run_evaluation

        tokens = demo_tokens(args.eval_contexts, args.artifacts)
        print(f"evaluating on {tokens.n_tokens:,} held-out tokens ({tokens.n_contexts} contexts) ...", flush=True)
        t1 = time.time()
        run = run_evaluation(world.model, tokens, world.head_saes, world.concat_sae,
                             out_dir=Path(args.out) / "evaluation", context=context, command="demo",
                             title="Demo: evaluation of per-head and concat SAEs", progress=not args.no_progress)
        _print_evaluation(run, time.time() - t1)
    if not args.no_dashboards:
        from .demo import demo_tokens
        from .evaluation_run import DEFAULT_SETTINGS, decompose_settings

        tokens = demo_tokens(args.dashboard_contexts, args.artifacts, split=args.dashboard_split)
        # The evaluation's decompositions when it ran (the same settings), else decompose now.
        decompositions = (run.decompositions if not args.no_evaluate else
                          decompose_settings(world.concat_sae, world.head_saes, DEFAULT_SETTINGS, W_O=world.W_O))
        from .dashboard_run import write_dashboards

        write_dashboards(world.model, tokens, world.head_saes, world.concat_sae, decompositions,
                         Path(args.out) / "dashboards", progress=not args.no_progress, tokenizer=world.tokenizer,
                         analysis_href=None if args.no_evaluate else "../evaluation/report.html",
                         context={k: str(v) for k, v in context.items()}, neuronpedia=False)
    return 0


def run_dashboard(args: argparse.Namespace) -> int:
    from .dashboard_run import (check_evaluation_matches, copy_evaluation_report, evaluation_report_files,
                                write_dashboards)

    settings = _settings(args.methods)
    _positive(args.n_contexts, "--n-contexts")
    _positive(args.eval_contexts, "--eval-contexts")
    ignore_tokens = None if args.ignore_tokens is None else _token_ids(args.ignore_tokens, "--ignore-tokens")
    check_output_folder(args.out)
    evaluation_out = Path(args.out) / "evaluation"
    if args.evaluate or args.evaluation is not None:
        check_output_folder(evaluation_out)
    if args.evaluation is not None:
        report_files = evaluation_report_files(args.evaluation)  # refused now, not after the gathering pass
    concat, head_saes = _load_saes(args)
    loaded = _load_model_for(args.model, concat, head_saes, device=_device(args.device))
    tokens = _evaluation_tokens(args, loaded, head_saes)
    context = {"model": loaded.describe(), "concat_sae": concat.describe(), "head_saes": head_saes.describe(),
               "tokens": f"{tokens.n_contexts} contexts x {tokens.context_size} ({tokens.source})"}
    head_saes = _fold_scales(loaded, tokens.tokens, head_saes, context)
    d_vocab = loaded.model.cfg.d_vocab
    if ignore_tokens and max(ignore_tokens) >= d_vocab:
        raise InputError(f"--ignore-tokens: id {max(ignore_tokens)} is not in the model's vocabulary (d_vocab={d_vocab})")
    if args.evaluation is not None:
        check_evaluation_matches(report_files, hook_name=concat.hook_name, n_heads=loaded.model.cfg.n_heads,
                                 d_head=loaded.model.cfg.d_head)
    if args.evaluate or args.evaluation is not None:
        from .dashboards.site import claim_site_folder

        claim_site_folder(args.out)  # the report goes into OUT/evaluation/, before the pages
    if args.evaluate:
        from .evaluation_run import run_evaluation

        t0 = time.time()
        run = run_evaluation(loaded, tokens.first(args.eval_contexts), head_saes, concat, out_dir=evaluation_out,
                             settings=settings, context=context, progress=not args.no_progress, command="dashboard",
                             title="Evaluation of per-head and concat SAEs")
        _print_evaluation(run, time.time() - t0)
        decompositions = run.decompositions  # the same settings: the pages link what the report routed
    else:
        from .evaluation_run import decompose_settings

        layer = concat.require_hook("dashboards")[1]
        decompositions = decompose_settings(concat, head_saes, settings, W_O=loaded.model.W_O[layer].detach())
        if args.evaluation is not None:
            copy_evaluation_report(report_files, evaluation_out)
    linked = args.evaluate or args.evaluation is not None
    write_dashboards(loaded, tokens, head_saes, concat, decompositions, args.out, progress=not args.no_progress,
                     neuronpedia=not args.no_neuronpedia, exclude_bos=not args.keep_bos, ignore_tokens=ignore_tokens, analysis_href="evaluation/report.html" if linked else None,
                     context={k: str(v) for k, v in context.items()})
    return 0


def _token_ids(spec: str, flag: str) -> tuple[int, ...]:
    """``"0, 50256"`` -> ``(0, 50256)``; ``""`` -> ``()``."""
    ids = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if not part.isdigit():
            raise InputError(f"{flag}: {part!r} is not a token id (a non-negative integer)")
        ids.append(int(part))
    return tuple(ids)


def _load_tokens(path: Path):
    """The ``[batch, pos]`` token ids of the ``--tokens`` file (:func:`~sparsedecomp.loading.tokens.load_tokens_file`),
    refused with the flag's name."""
    from .loading.tokens import load_tokens_file

    try:
        return load_tokens_file(path).tokens
    except InputError as err:
        raise InputError(f"--tokens: {err}") from None


def parse_features(spec: str | None) -> list[int] | None:
    """``"0-3,9"`` -> ``[0, 1, 2, 3, 9]`` (ranges inclusive); ``None`` for all features."""
    if spec is None:
        return None
    features: list[int] = []
    for part in spec.split(","):
        first, dash, last = part.strip().partition("-")
        try:
            lo = int(first)
            hi = int(last) if dash else lo
        except ValueError:
            raise InputError(f"--features: {part.strip()!r} is not an index or a range like 0-63") from None
        if hi < lo:
            raise InputError(f"--features: the range {part.strip()!r} runs backwards")
        features.extend(range(lo, hi + 1))
    return features


def _check_tokens_fit(tokens, d_vocab: int, path: str, flag: str = "--tokens") -> None:
    if int(tokens.max()) >= d_vocab:
        raise InputError(f"{flag}: {path} holds token ids up to {int(tokens.max())} but the model's vocabulary has "
                         f"{d_vocab} tokens: these tokens are not for this model")


def _head_sources(args: argparse.Namespace) -> dict | list:
    """The --head-saes sources, keyed by the --head-index-map heads when given (one distinct head per source)."""
    sources: dict | list = list(args.head_saes)
    if args.head_index_map:
        try:
            heads = [int(h) for h in args.head_index_map.split(",")]
        except ValueError:
            raise InputError(f"--head-index-map must be comma-separated integers, got {args.head_index_map!r}") from None
        if len(heads) != len(sources) or len(set(heads)) != len(heads):
            raise InputError(f"--head-index-map gives {len(heads)} heads ({heads}) for {len(sources)} --head-saes "
                             "sources; give one distinct head per source")
        sources = dict(zip(heads, sources))
    return sources


def _load_saes(args: argparse.Namespace):
    """The concat SAE and the per-head SAEs named on the command line, checked against each other."""
    from .loading import check_compatible, load_head_saes, load_sae

    sources = _head_sources(args)
    concat = load_sae(args.concat_sae, version=args.concat_version)
    head_saes = load_head_saes(sources)
    print(f"concat SAE: {concat.describe()}\nhead SAEs: {head_saes.describe()}", flush=True)
    check_compatible(concat, head_saes)  # before the model loads
    return concat, head_saes


def _load_model_for(model_name: str, concat, head_saes, device: str = "cpu"):
    """The model (a local folder with the flags it records, a hub name with from_pretrained's) on ``device``, checked
    to be the SAEs' model."""
    from .loading import check_model_matches, load_model
    from .loading.heads import check_model_shape

    loaded = load_model(model_name, flags=None, device=device)
    check_model_matches(loaded.name, concat, head_saes)
    check_model_shape(loaded.model, head_saes)
    return loaded


def _fold_scales(loaded, tokens, head_saes, context: dict):
    """Re-estimate and fold the input scales of the heads that need one, on ``tokens``; recorded in ``context``."""
    from .loading import estimate_head_scales_from_model, fold_head_scales

    if not head_saes.heads_needing_input_scale:
        return head_saes
    scales = estimate_head_scales_from_model(loaded, list(tokens.split(8)), layer=head_saes.layer)
    context["head_scale_estimate"] = scales.description
    return fold_head_scales(head_saes, scales)


def run_decompose(args: argparse.Namespace) -> int:
    from .loading import InputScaleWarning
    from .pipeline import run_decomposition

    params = _params(args)
    features = parse_features(args.features)
    check_output_folder(args.out)
    if args.tokens is not None and not args.model:
        raise InputError("--tokens needs --model: input scales are estimated on the model's hook_z")
    # Read the tokens before anything large loads, so a bad file fails in a second, not after the model.
    tokens = _load_tokens(args.tokens) if args.tokens is not None else None
    t0 = time.time()
    concat, head_saes = _load_saes(args)
    context = {"concat_sae": concat.describe(), "head_saes": head_saes.describe()}
    W_O = None
    if args.model:
        loaded = _load_model_for(args.model, concat, head_saes)
        if tokens is not None:
            _check_tokens_fit(tokens, loaded.model.cfg.d_vocab, args.tokens)
        W_O = loaded.model.W_O[concat.require_hook("reading W_O from --model")[1]].detach()
        context["model"] = loaded.describe()
        if tokens is not None:
            head_saes = _fold_scales(loaded, tokens, head_saes, context)
    with warnings.catch_warnings():
        if head_saes.heads_needing_input_scale:
            print(f"note: heads {list(head_saes.heads_needing_input_scale)} were trained on inputs scaled by a factor "
                  "that was never saved; directions are unaffected, but activation units are training units "
                  "(pass --model and --tokens to re-estimate and fold the scales)", flush=True)
            # The note above says it for the command line; the library's warning would say it again.
            warnings.simplefilter("ignore", InputScaleWarning)
        result = run_decomposition(concat, head_saes, out_dir=args.out, method=args.method, params=params,
                                   space=args.space, W_O=W_O, context=context, progress=not args.no_progress,
                                   features=features)
    _print_result(result, time.time() - t0)
    return 0


def _settings(specs: Sequence[str] | None):
    """The ``--methods`` settings, each checked by building its solver (so a typo fails before anything loads)."""
    from .evaluation_run import DEFAULT_SETTINGS
    from .pipeline import solver_params
    from .solver_settings import parse_solver_setting, unique_labels

    try:
        settings = list(DEFAULT_SETTINGS) if not specs else [parse_solver_setting(spec) for spec in specs]
    except InputError as err:
        raise InputError(f"--methods: {err}") from None
    for setting in settings:
        try:
            solver_params(setting.method, setting.params)
        except InputError as err:
            raise InputError(f"--methods {setting.label}: {err}") from None
    return unique_labels(settings)


def _positive(value: int, flag: str, *, allow_zero: bool = False) -> int:
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise InputError(f"{flag} must be a {'non-negative' if allow_zero else 'positive'} integer, got {value}")
    return value


def _evaluation_tokens(args: argparse.Namespace, loaded, head_saes):
    """The evaluation contexts: the --tokens file, or --dataset packed with the SAEs' recorded context size and BOS
    setting unless given."""
    from .loading.tokens import load_dataset_tokens, load_tokens_file

    model = loaded.model
    tokenizer = getattr(model, "tokenizer", None)
    bos = args.bos_token_id if args.bos_token_id is not None else getattr(tokenizer, "bos_token_id", None)
    if args.tokens is not None:
        given = [flag for flag, value in (("--split", args.split != "train"), ("--column", args.column),
                                          ("--context-size", args.context_size),
                                          ("--prepend-bos/--no-prepend-bos", args.prepend_bos is not None),
                                          ("--skip-contexts", args.skip_contexts)) if value]
        if given:
            raise InputError(f"{', '.join(given)} only apply to --dataset; a --tokens file is used as it is")
        try:
            tokens = load_tokens_file(args.tokens, bos_token_id=bos)
        except InputError as err:
            raise InputError(f"--tokens: {err}") from None
        _check_tokens_fit(tokens.tokens, model.cfg.d_vocab, args.tokens)
        if tokens.n_contexts < args.n_contexts:
            print(f"note: --tokens holds {tokens.n_contexts} contexts, fewer than --n-contexts {args.n_contexts}; "
                  "using them all", flush=True)
        return tokens.first(args.n_contexts)
    recorded = recorded_training_data(head_saes)
    if args.dataset is None:
        if "dataset_path" not in recorded:
            raise InputError("give --tokens or --dataset: the head SAEs' configs record no dataset_path")
        args.dataset = recorded["dataset_path"]
    context_size = args.context_size or recorded.get("context_size") or model.cfg.n_ctx
    prepend_bos = args.prepend_bos if args.prepend_bos is not None else bool(recorded.get("prepend_bos", True))
    if int(context_size) > model.cfg.n_ctx:
        raise InputError(f"context size {context_size} ({'--context-size' if args.context_size else 'as the SAEs record'}"
                         f") is longer than the model's n_ctx={model.cfg.n_ctx}: give --context-size")
    if prepend_bos and bos is None:
        raise InputError("BOS is to be prepended but its token id is unknown (the model has no tokenizer): give "
                         "--bos-token-id, or --no-prepend-bos")
    try:
        tokens = load_dataset_tokens(args.dataset, context_size=int(context_size), n_contexts=args.n_contexts,
                                     split=args.split, column=args.column, prepend_bos=prepend_bos, bos_token_id=bos,
                                     tokenizer=tokenizer, skip_contexts=args.skip_contexts)
    except InputError as err:
        if "pass tokenizer=" in str(err):
            raise InputError(f"--dataset {args.dataset}: the column holds text and the model has no tokenizer: use a "
                             "pre-tokenised dataset (a tokens / input_ids column) or --tokens") from None
        raise
    _check_tokens_fit(tokens.tokens, model.cfg.d_vocab, args.dataset, flag="--dataset")
    return tokens


def recorded_training_data(head_saes) -> dict:
    """``context_size``, ``prepend_bos`` and ``dataset_path`` as the head SAEs' configs record them (first found)."""
    recorded: dict = {}
    for sae in head_saes:
        config = sae.provenance.get("cfg") or {}
        # SAELens 6 keeps training facts under "metadata"; legacy SAELens at the top level.
        for source in (config, config.get("metadata") or {}):
            for key in ("context_size", "prepend_bos", "dataset_path"):
                if source.get(key) is not None and key not in recorded:
                    recorded[key] = source[key]
    return recorded


def _device(name: str) -> str:
    if name == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def run_evaluate(args: argparse.Namespace) -> int:
    from .evaluation_run import run_evaluation

    settings = _settings(args.methods)
    _positive(args.n_contexts, "--n-contexts")
    _positive(args.skip_contexts, "--skip-contexts", allow_zero=True)
    _positive(args.context_size, "--context-size")
    _positive(args.top_k, "--top-k")
    if not args.memory_budget_gb > 0:
        raise InputError(f"--memory-budget-gb must be positive, got {args.memory_budget_gb}")
    check_output_folder(args.out)
    if args.tokens is not None and not args.tokens.is_file():
        raise InputError(f"--tokens: no file at {args.tokens}")
    t0 = time.time()
    concat, head_saes = _load_saes(args)
    loaded = _load_model_for(args.model, concat, head_saes, device=_device(args.device))
    tokens = _evaluation_tokens(args, loaded, head_saes)
    print(f"tokens: {tokens.n_contexts} contexts x {tokens.context_size} ({tokens.source}; BOS first: "
          f"{tokens.bos_token_id is not None})", flush=True)
    context = {"model": loaded.describe(), "concat_sae": concat.describe(), "head_saes": head_saes.describe()}
    head_saes = _fold_scales(loaded, tokens.tokens, head_saes, context)
    run = run_evaluation(loaded, tokens, head_saes, concat, out_dir=args.out, settings=settings, context=context,
                         top_k=args.top_k, progress=not args.no_progress, title="Evaluation of per-head and concat SAEs",
                         memory_budget=int(args.memory_budget_gb * 2**30))
    _print_evaluation(run, time.time() - t0)
    return 0


def _print_evaluation(run, elapsed: float) -> None:
    report = run.evaluation.report
    for name in ("clean", "zero_layer", "concat_sae", "all_head_saes",
                 *[n for n in report.splice if n.startswith("routed_")]):
        r = report.splice.get(name)
        if r is not None:
            score = "" if r.score is None else f", loss recovered {fmt(r.score, '.3f')} ± {fmt(r.score_stderr, '.3f')}"
            if r.score_measurable is False:
                score += " (not measurable: the ablation's cost is within 3 s.e. of 0)"
            print(f"  {name:<40} CE {r.ce_loss:.4f} ± {fmt(r.ce_loss_stderr, '.4f')}, KL {r.kl:.4f}{score}")
    for label, check in report.decompositions.items():
        if check.exact_expected:
            print(f"  consistency: routing through {label} reproduces the concat SAE "
                  f"({'yes' if check.consistent else 'NO'}, routing error {check.routing_error:.2g})")
    print(f"wrote {run.report_path} and {run.html_path} in {elapsed:.1f}s")


def run_reproduce_seed(args: argparse.Namespace) -> int:
    from . import seed_reproduction as seed
    from .evaluation.jsonable import to_jsonable
    from .outputs import RunWriter

    check_output_folder(args.out)
    if args.part == "kissane":
        from .loading import load_sae

        source = args.concat_sae or seed.SEED_KISSANE_SOURCE
        result = seed.reproduce_kissane(load_sae(source, version=args.concat_version), feature=args.feature)
        print(f"{result.sae}\n  decoder rank {result.rank} (seed {result.seed['rank']})")
        print(f"  feature {result.feature} (norm {result.feature_norm:.2f}) squared-norm share per head:")
        print("    ours: " + " ".join(f"{v:.2f}" for v in result.squared_shares))
        print("    seed: " + " ".join(f"{v:.2f}" for v in seed.SEED_FEATURE_SHARES))
    else:
        _positive(args.n_contexts, "--n-contexts")
        args.concat_sae, args.concat_version = None, None
        from .loading import load_head_saes, load_model

        head_saes = load_head_saes(_head_sources(args))
        loaded = load_model(args.model, flags=None)
        args.tokens, args.context_size, args.prepend_bos, args.skip_contexts = None, None, None, 0
        args.dataset = args.dataset or recorded_training_data(head_saes).get("dataset_path") or seed.SEED_DATASET
        tokens = _evaluation_tokens(args, loaded, head_saes)
        print(f"tokens: {tokens.n_contexts} contexts x {tokens.context_size} from {tokens.source}", flush=True)
        result = seed.reproduce_heads(loaded, head_saes, tokens, head=args.head, progress=not args.no_progress)
        print(f"head {result.head}: cross-entropy clean / spliced / zeroed (nats; ± s.e. over contexts)")
        print(f"  seed (one context, SAE on raw z):   {seed.SEED_CE['clean']:.3f} / {seed.SEED_CE['spliced']:.3f} / "
              f"{seed.SEED_CE['zeroed']:.3f}")
        for where, table in (("one context", result.one_context), (f"{tokens.n_contexts} contexts", result.many_contexts)):
            for name, ce in table.items():
                print(f"  {where}, {name:<19} {ce.clean:.3f}{_pm(ce.clean_stderr)} / {ce.spliced:.3f}"
                      f"{_pm(ce.spliced_stderr)} / {ce.zeroed:.3f}{_pm(ce.zeroed_stderr)}")
        print(f"  the seed's set-up: {result.seed_setup}")
        norms = ", ".join(f"{name} {value:.4f}" for name, value in result.mean_decoder_norm_training_units.items())
        print(f"mean decoder norm, training units (seed head 0: {seed.SEED_MEAN_DECODER_NORM}): {norms}")
        print(f"ranks: heads {sorted(set(result.head_ranks.values()))} (seed {seed.SEED_HEAD_RANK}), block dictionary "
              f"{result.block_rank} (seed {seed.SEED_BLOCK_RANK})")
    with RunWriter(args.out, command=f"reproduce-seed {args.part}") as writer:
        path = writer.write_json("seed.json", to_jsonable(result))
    print(f"wrote {path}")
    return 0


def _pm(stderr: float | None) -> str:
    return "" if stderr is None else f" ± {stderr:.3f}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            return run_demo(args)
        if args.command == "evaluate":
            return run_evaluate(args)
        if args.command == "dashboard":
            return run_dashboard(args)
        if args.command == "reproduce-seed":
            return run_reproduce_seed(args)
        return run_decompose(args)
    except USER_ERRORS as err:
        print(f"sparsedecomp {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
