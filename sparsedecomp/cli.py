"""Command line: a parser and a dispatcher. Each subcommand's flags are parsed into the job layer's options
(:mod:`sparsedecomp.jobs`) without changing them; the jobs resolve inputs, drive the run and check everything once.
Flags that several commands share are declared once, in parent parsers, and validated by the same code.

Parsing imports nothing heavy (``sparsedecomp --help`` answers without torch); the library is imported once a command
runs.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path
from typing import Sequence

from .errors import InputError, OutputError

# Literal copies of the registry's names and the decompose job's choices, so parsing needs no torch; a test checks
# they equal sparsedecomp.SOLVERS and sparsedecomp.jobs.decompose's / jobs.solve's.
METHODS = ("pinv", "nnls", "lasso", "nn_lasso", "omp", "nn_omp", "cvxpy_lasso", "cvxpy_nn_lasso", "cvxpy_nnls",
           "cvxpy_bpdn")
SPACES = ("z", "residual", "both")
DEFAULT_METHOD = "nn_omp"
TRAINING_ARCHITECTURES = ("standard", "jumprelu", "topk", "batchtopk")  # sparsedecomp.training.ARCHITECTURES
# The flag behind each solver parameter, to name it in errors.
PARAM_FLAGS = {"alpha": "--alpha", "n_nonzero": "--n-nonzero", "tol": "--tol", "max_iter": "--max-iter",
               "eps": "--eps"}
METHOD_HELP = """methods:
  nn_omp (default)  non-negative OMP: at most --n-nonzero atoms (16), stops early at --tol (0.01) FVU; fast
  omp               signed OMP, same budget
  nn_lasso, lasso   (non-negative) lasso; --alpha is a fraction of each feature's alpha_max (e.g. 0.05) unless
                    --alpha-absolute; certified by the duality gap
  pinv              per-head pseudoinverse (the seed notebook's decomposition): exact, dense codes
  nnls              non-negative least squares: the sparsity-free baseline (dense codes where heads compete)
  cvxpy_*           interior-point references, one solve per feature: for checking a few features
                    (--features 0-63)
"""

EVALUATE_HELP = """what evaluate measures (report.json keys: docs/evaluation.md):
  splice        clean, zero_head_<h>, zero_layer, mean_layer, head_sae_<h>, all_head_saes, concat_sae and
                routed_<label> per --methods setting: cross-entropy, KL to clean, loss recovered, standard errors
  sae_quality   per SAE, SAELens run_evals names (l0, explained_variance, mse, cossim, ce_loss_score, ...)
  attribution   head attribution of every concat feature: weight, encoder, DFA on top tokens, decomposition
  faithfulness  how well each sparse z-space decomposition predicts the concat feature's activation
  analyses      decoder norms, ranks, head-output interference, W_O carry, mixed-feature interference
Per-head SAEs trained on inputs scaled by an unsaved factor get it re-estimated on the first 64 contexts of the
tokens and folded (the rule every command uses; a training scale the checkpoint records is used as it is).
"""

# Only the package's own input errors and the operating system's file errors are the user's to fix; any other
# exception is a bug and keeps its traceback.
USER_ERRORS = (InputError, OutputError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


SOURCE_HELP = """
sources (--concat-sae, --head-saes): a local path, or a hub reference:
  hf://OWNER/REPO[@REVISION]/VERSION   a Kissane pair {VERSION}.pt + {VERSION}_cfg.json in a Hugging Face repo
                                       (or hf://OWNER/REPO with --concat-version VERSION)
  saelens://RELEASE/SAE_ID             an SAE of a SAELens pretrained release
  saelens://OWNER/REPO/SAE_ID          an SAELens-format SAE in a hub repo outside the release directory
"""




def positive_float(text: str) -> float:
    """An argparse type: a positive, finite number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive, finite number, got {text}")
    return value


def _int_at_least(lowest: int, words: str):
    """An argparse type: an integer of at least ``lowest`` (``words`` names the kind in the error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < lowest:
            raise argparse.ArgumentTypeError(f"must be a {words} integer, got {value}")
        return value

    parse.__name__ = f"{words.replace('-', '_')}_int"  # argparse names the type by it
    return parse


positive_int = _int_at_least(1, "positive")
non_negative_int = _int_at_least(0, "non-negative")


def _parent(build) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    build(parser)
    return parser


def _solver_flags(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--features", metavar="SPEC",
                   help="decompose only these concat features: indices and ranges, e.g. 0-63,99 (default: all)")


def _sae_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--concat-sae", required=True,
                   help="concat SAE: a local Kissane {version}.pt/_cfg.json folder or file, SAELens folder or "
                        "legacy run, or a hub reference (see below)")
    p.add_argument("--concat-version", help="Kissane version name, when the folder holds several pairs")
    _head_sae_flags(p)


def _head_sae_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--head-saes", nargs="+", required=True, metavar="SOURCE",
                   help="one checkpoint per head (legacy SAELens run / checkpoint / SAE folders, SAELens folders, "
                        "or hub references)")
    p.add_argument("--head-index-map", metavar="H,H,...",
                   help="comma-separated head index of each --head-saes source, in order (checked against each "
                        "checkpoint's config), e.g. 0,1,2,3,4,5,6,7")


def _model_flags(p: argparse.ArgumentParser, *, required: bool) -> None:
    p.add_argument("--model", required=required,
                   help="TransformerLens model name (e.g. gelu-2l; loaded with the processing its SAEs were trained "
                        "with) or a local model folder (with the flags and the tokenizer it holds); must be the "
                        "SAEs' model")
    p.add_argument("--tokenizer", help="tokenizer for token text, special tokens and BOS, when the model has none: a "
                                       "tokenizer.json file, a folder of one, or a Hugging Face tokenizer name")
    p.add_argument("--device", default="cpu", help="where the model and SAEs run: cpu, cuda, cuda:1 ... or auto "
                                                   "(cuda when available; default cpu)")


def _token_flags(p: argparse.ArgumentParser, *, n_contexts: int) -> None:
    source = p.add_mutually_exclusive_group()
    source.add_argument("--tokens", type=Path, help="safetensors/pt file with a 'tokens' [batch, pos] tensor (BOS "
                                                    "first), used as it is")
    source.add_argument("--dataset", help="Hugging Face dataset name or local dataset folder (pre-tokenised "
                                          "'tokens'/'input_ids' column, or text with the model's tokenizer); "
                                          "default: the dataset the head SAEs' configs record (dataset_path)")
    p.add_argument("--split", default="train", help="dataset split (default train)")
    p.add_argument("--column", help="dataset column (default: tokens / input_ids / text, the first present)")
    p.add_argument("--context-size", type=positive_int, help="tokens per dataset context (default: the SAEs' "
                                                             "recorded context_size, else the model's n_ctx)")
    p.add_argument("--n-contexts", type=positive_int, default=n_contexts,
                   help=f"contexts to read (default {n_contexts})")
    p.add_argument("--skip-contexts", type=non_negative_int, default=0,
                   help="dataset contexts to skip first (default 0)")
    bos = p.add_mutually_exclusive_group()
    bos.add_argument("--prepend-bos", dest="prepend_bos", action="store_true", default=None,
                     help="put BOS at position 0 of every dataset context (default: the SAEs' recorded prepend_bos, "
                          "else on)")
    bos.add_argument("--no-prepend-bos", dest="prepend_bos", action="store_false")
    p.add_argument("--bos-token-id", type=non_negative_int, help="BOS token id (default: the tokenizer's)")


def _methods_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", nargs="+", metavar="SETTING", default=None,
                   help="decompositions to route, compare and link: METHOD[:NAME=VALUE,...][@residual] (default: pinv "
                        "nn_omp:n_nonzero=16,tol=0.01 nn_lasso:alpha=0.2)")


def _run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=str, required=True,
                   help="output folder: new, empty, or an earlier run of the same command (rewritten when this run "
                        "completes; the dashboards resume from their finished batches)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparsedecomp",
        description="Decompose attention-layer (concatenated z) SAE features into per-head SAE dictionaries.",
        epilog=METHOD_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    solver, saes, run, methods = (_parent(_solver_flags), _parent(_sae_flags), _parent(_run_flags),
                                  _parent(_methods_flag))
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", parents=[solver, run], epilog=METHOD_HELP,
                          help="run the whole job (decompose, evaluate, dashboards) on the built-in demo world",
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_argument("--artifacts", type=Path, default=None, help=argparse.SUPPRESS)
    demo.add_argument("--eval-contexts", type=positive_int, default=None,
                      help="held-out contexts (128 tokens each) the evaluation report runs on (default 128)")
    demo.add_argument("--dashboard-contexts", type=positive_int, default=None,
                      help="contexts (128 tokens each) the dashboards (DIR/dashboards/) run on (default 1563: "
                           "200,064 tokens, of about 19,000 in the training documents; with --dashboard-split heldout "
                           "the 374 shipped held-out contexts, up to 954)")
    demo.add_argument("--dashboard-split", choices=("train", "heldout"), default=None,
                      help="which demo documents the dashboards read: the SAEs' training documents (default; as "
                           "SAEDashboard and Neuronpedia show the training distribution) or the held-out ones")
    demo.add_argument("--no-dashboards", action="store_true", help="skip the feature dashboards")
    demo.add_argument("--no-evaluate", action="store_true",
                      help="skip the evaluation report (DIR/evaluation/)")

    model_optional, model_required = _parent(lambda p: _model_flags(p, required=False)), _parent(
        lambda p: _model_flags(p, required=True))
    dec = sub.add_parser("decompose", parents=[saes, model_optional, solver, run],
                         help="decompose a concat SAE's features into per-head SAEs",
                         epilog=METHOD_HELP + SOURCE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    _token_flags(dec, n_contexts=64)

    ev = sub.add_parser("evaluate", parents=[saes, model_required, methods, run],
                        help="evaluate per-head SAEs, the concat SAE and decompositions on the model",
                        epilog=EVALUATE_HELP + SOURCE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    _token_flags(ev, n_contexts=64)
    ev.add_argument("--top-k", type=positive_int, default=20,
                    help="top-activating tokens per feature for DFA (default 20)")
    ev.add_argument("--memory-budget-gb", type=positive_float, default=1.0,
                    help="memory one batch of contexts may take, activations and forward pass (default 1 GiB)")

    dash = sub.add_parser("dashboard", parents=[saes, model_required, methods, run],
                          help="write the feature dashboards (a static site) of the concat and per-head SAEs, linked "
                               "through the decompositions", epilog=SOURCE_HELP,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    _token_flags(dash, n_contexts=256)
    dash.add_argument("--keep-bos", action="store_true",
                      help="count position 0 (BOS) in the statistics and examples (default: left out)")
    dash.add_argument("--ignore-tokens", metavar="IDS",
                      help="comma-separated token ids left out of the statistics and examples (default: the "
                           "tokenizer's special tokens; '' for none)")
    dash.add_argument("--no-neuronpedia", action="store_true",
                      help="skip the Neuronpedia batch export (neuronpedia/<sae>.json)")
    analysis = dash.add_mutually_exclusive_group()
    analysis.add_argument("--evaluate", action="store_true",
                          help="also evaluate (as sparsedecomp evaluate) on the first --eval-contexts contexts, into "
                               "OUT/evaluation/, and link the report as the site's analysis page")
    analysis.add_argument("--evaluation", type=Path, metavar="EVAL_DIR",
                          help="an earlier `sparsedecomp evaluate --out EVAL_DIR` run of these SAEs: its report is "
                               "copied into OUT/evaluation/ and linked as the site's analysis page")
    dash.add_argument("--eval-contexts", type=positive_int, default=64, help="contexts --evaluate runs on (default 64)")

    seed = sub.add_parser("reproduce-seed", help="reproduce the research notebook's numbers (heads or kissane)",
                          description="Reproduce the seed notebook's numbers with this package, beside the seed's "
                                      "(see docs/evaluation.md, 'Reproducing the seed').")
    parts = seed.add_subparsers(dest="part", required=True)
    heads = parts.add_parser("heads", parents=[_parent(_head_sae_flags)],
                             help="per-head SAEs on gelu-2l: cross-entropy clean / spliced / zeroed, decoder norms, "
                                  "ranks")
    heads.add_argument("--step", default=None,
                       help="the checkpoint step of each legacy SAELens run folder (the seed: 983044096; 'final' for "
                            "final_<n>; default: the only one, else the final one, with a warning)")
    heads.add_argument("--head", type=non_negative_int, default=0,
                       help="the head whose SAE is spliced in (the seed: 0)")
    heads.add_argument("--model", default="gelu-2l", help="model name or local folder (default gelu-2l)")
    heads.add_argument("--tokenizer", help="tokenizer, when the model has none")
    heads.add_argument("--dataset", help="dataset name or local folder (default: the SAEs' recorded dataset_path, "
                                         "else NeelNanda/c4-code-tokenized-2b)")
    heads.add_argument("--split", default="train", help="dataset split (default train)")
    heads.add_argument("--column", help="dataset column (default: tokens / input_ids / text)")
    heads.add_argument("--n-contexts", type=positive_int, default=32,
                       help="contexts for the many-context estimate (32)")
    heads.add_argument("--bos-token-id", type=non_negative_int, help="BOS token id (default: the tokenizer's)")
    _run_flags(heads)
    kissane = parts.add_parser("kissane", help="Kissane et al.'s concat SAE: decoder rank, feature 99's head shares")
    kissane.add_argument("--concat-sae", default=None, help="the concat SAE (default: the seed's run on the hub, "
                                                            "hf://ckkissane/tinystories-1M-SAES/.../..._v78)")
    kissane.add_argument("--concat-version", help="Kissane version name, when the folder holds several pairs")
    kissane.add_argument("--feature", type=non_negative_int, default=99, help="the feature (the seed: 99)")
    kissane.add_argument("--out", required=True, help="output folder (seed.json)")

    train = sub.add_parser("train-heads", help="train one SAE per attention head of a layer, all heads in one pass "
                                               "(SAELens's trainer), with checkpoints, resume and per-head evals",
                           epilog=TRAIN_HEADS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    _train_heads_flags(train)
    return parser


TRAIN_HEADS_HELP = """output (--out DIR):
  head_<h>/            one SAELens 6 folder per head (cfg.json, sae_weights.safetensors): hook_name the layer's
                       hook_z, hook_head_index h, the model and its processing recorded; read by
                       sae_lens.SAE.load_from_disk and by sparsedecomp's --head-saes
  report.json          per-head SAELens run_evals metrics (l0, explained_variance, mse, ce_loss_score, ...) on the
                       held-out contexts, the training curve (L0, explained variance) and timings
  checkpoints/         the latest SAELens checkpoint: run the same command again to resume after a kill
sparsity: --k for topk / batchtopk, --l1-coefficient for standard, --l0-coefficient for jumprelu (SAELens's
defaults otherwise); inputs are scaled to norm sqrt(d_head) while training and the scale folded in at the end.
"""


def _train_heads_flags(p: argparse.ArgumentParser) -> None:
    from_args = p.add_argument_group("model and tokens")
    from_args.add_argument("--model", required=True, help="TransformerLens model name (processed with "
                                                          "from_pretrained's defaults) or a local model folder")
    from_args.add_argument("--tokenizer", help="tokenizer, when the model has none (file, folder or hub name)")
    from_args.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... or auto (default cpu)")
    from_args.add_argument("--layer", type=non_negative_int, required=True, help="the attention layer")
    from_args.add_argument("--heads", metavar="H,H,...", help="heads to train (default: every head of the layer)")
    from_args.add_argument("--hook", help="the hook (default and only choice: blocks.LAYER.attn.hook_z)")
    source = from_args.add_mutually_exclusive_group(required=True)
    source.add_argument("--tokens", type=Path, help="safetensors/pt file with a 'tokens' [contexts, positions] "
                                                    "tensor (BOS first), used whole")
    source.add_argument("--dataset", help="Hugging Face dataset name or local dataset folder (pre-tokenised or text)")
    from_args.add_argument("--split", default="train", help="dataset split (default train)")
    from_args.add_argument("--column", help="dataset column (default: tokens / input_ids / text, the first present)")
    from_args.add_argument("--context-size", type=positive_int, help="tokens per dataset context (default: n_ctx)")
    from_args.add_argument("--bos-token-id", type=non_negative_int, help="BOS token id (default: the tokenizer's)")
    sae = p.add_argument_group("SAEs (SAELens training configuration)")
    sae.add_argument("--architecture", required=True, choices=TRAINING_ARCHITECTURES, help="SAELens architecture")
    sae.add_argument("--d-sae", type=positive_int, required=True, help="features per head")
    sae.add_argument("--k", type=positive_int, help="active features per token (topk, batchtopk)")
    sae.add_argument("--l1-coefficient", type=float, help="L1 coefficient (standard)")
    sae.add_argument("--l0-coefficient", type=float, help="L0 coefficient (jumprelu)")
    sae.add_argument("--training-tokens", type=positive_int, required=True, help="tokens each head's SAE trains on")
    sae.add_argument("--batch-size", type=positive_int, default=4096, help="tokens per step (default 4096)")
    sae.add_argument("--lr", type=positive_float, default=3e-4, help="Adam learning rate (default 3e-4)")
    sae.add_argument("--lr-warm-up-steps", type=non_negative_int, default=0, help="linear warm-up steps (default 0)")
    sae.add_argument("--lr-decay-steps", type=non_negative_int, default=0,
                     help="final linear decay steps (default 0)")
    sae.add_argument("--no-normalize-activations", action="store_true",
                     help="train on raw z (default: scaled to norm sqrt(d_head), folded in at the end)")
    sae.add_argument("--dead-feature-window", type=positive_int, default=1000,
                     help="steps without firing after which a feature counts as dead, for the losses that revive "
                          "dead features (TopK's auxiliary loss; SAELens's default 1000)")
    sae.add_argument("--buffer-batches", type=positive_int, default=16,
                     help="batches whose rows are shuffled together (default 16)")
    sae.add_argument("--seed", type=non_negative_int, default=0, help="initialisation and shuffling seed")
    run = p.add_argument_group("run")
    run.add_argument("--eval-contexts", type=positive_int, default=64,
                     help="last contexts of the tokens held out for the per-head evals (default 64)")
    run.add_argument("--checkpoint-every", type=positive_int, help="steps between checkpoints (default: a tenth "
                                                                   "of the run)")
    run.add_argument("--out", required=True, help="output folder: new, empty, or this run's (resumed)")
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")


# -- flags -> the job layer's options (the namespace is read, never changed) -------------------------------------------
def solver_options(args: argparse.Namespace) -> tuple[str, dict]:
    """The method and its parameters given on the command line, checked against the method before anything loads."""
    from .jobs.solve import solver_params

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
    try:
        return args.method, solver_params(args.method, params)
    except InputError as err:  # name the flag, not the keyword argument
        message = str(err)
        for name, flag in PARAM_FLAGS.items():
            message = re.sub(rf"'{name}'|\b{name}\b", flag, message)
        raise InputError(message) from None


def setting_options(specs: Sequence[str] | None):
    from .jobs.commands import check_settings
    from .solver_settings import parse_solver_setting

    try:
        parsed = None if not specs else [parse_solver_setting(spec) for spec in specs]
    except InputError as err:
        raise InputError(f"--methods: {err}") from None
    return tuple(check_settings(parsed))


def input_request(args: argparse.Namespace, *, with_concat: bool = True, with_tokens: bool = True):
    """The :class:`~sparsedecomp.jobs.inputs.InputRequest` the flags name."""
    from .jobs.inputs import InputRequest, ModelRequest, SAERequest, TokenRequest, parse_index_list

    index_map = parse_index_list(args.head_index_map, "--head-index-map")
    saes = SAERequest(concat=args.concat_sae if with_concat else None, heads=tuple(args.head_saes),
                      concat_version=getattr(args, "concat_version", None),
                      head_index_map=index_map, step=getattr(args, "step", None))
    model = None if not args.model else ModelRequest(args.model, tokenizer=args.tokenizer,
                                                     device=getattr(args, "device", "cpu"))
    tokens = None
    if with_tokens and (args.tokens is not None or args.dataset is not None or (model is not None and
                                                                                 args.command != "decompose")):
        tokens = TokenRequest(tokens_file=args.tokens, dataset=args.dataset, split=args.split, column=args.column,
                              context_size=args.context_size, n_contexts=args.n_contexts,
                              skip_contexts=args.skip_contexts, prepend_bos=args.prepend_bos,
                              bos_token_id=args.bos_token_id)
    if args.command == "decompose" and tokens is not None and model is None:
        flag = "--tokens" if args.tokens is not None else "--dataset"
        raise InputError(f"{flag} needs --model: input scales are estimated on the model's hook_z")
    return InputRequest(saes=saes, model=model, tokens=tokens)


def _progress(args: argparse.Namespace) -> bool:
    return not args.no_progress


def run_decompose(args: argparse.Namespace) -> int:
    from .jobs.commands import DecomposeOptions, decompose_job
    from .jobs.inputs import parse_feature_ranges

    method, params = solver_options(args)
    options = DecomposeOptions(method=method, params=params, space=args.space,
                               features=parse_feature_ranges(args.features), progress=_progress(args))
    run, elapsed = decompose_job(input_request(args), options, args.out, log=_log)
    _print_decomposition(run)
    print(f"wrote {run.summary_path}, the codes and {run.html_path} in {elapsed:.1f}s: open {run.html_path}")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from .jobs.commands import EvaluateOptions, evaluate_job

    options = EvaluateOptions(settings=setting_options(args.methods), top_k=args.top_k,
                              memory_budget_gb=args.memory_budget_gb, progress=_progress(args))
    run, elapsed = evaluate_job(input_request(args), options, args.out, log=_log)
    _print_evaluation(run)
    print(f"wrote {run.report_path} and {run.html_path} in {elapsed:.1f}s: open {run.html_path}")
    return 0


def run_dashboard(args: argparse.Namespace) -> int:
    from .jobs.commands import DashboardOptions, dashboard_job
    from .jobs.inputs import parse_index_list

    options = DashboardOptions(settings=setting_options(args.methods), evaluate=args.evaluate,
                               evaluation_dir=args.evaluation, eval_contexts=args.eval_contexts,
                               keep_bos=args.keep_bos, ignore_tokens=parse_index_list(args.ignore_tokens,
                                                                                      "--ignore-tokens"),
                               neuronpedia=not args.no_neuronpedia, progress=_progress(args))
    site, elapsed = dashboard_job(input_request(args), options, args.out, log=_log)
    print(f"done in {elapsed:.1f}s: {sum(site.n_pages.values()):,} feature pages; open {site.out / 'index.html'}")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from .jobs.commands import DEMO_DASHBOARD_CONTEXTS, DEMO_EVAL_CONTEXTS, DemoOptions, demo_job
    from .jobs.inputs import parse_feature_ranges

    method, params = solver_options(args)
    if args.no_evaluate and args.eval_contexts is not None:
        raise InputError("--eval-contexts has no effect with --no-evaluate")
    if args.no_dashboards and (args.dashboard_contexts is not None or args.dashboard_split is not None):
        raise InputError("--dashboard-contexts / --dashboard-split have no effect with --no-dashboards")
    split = args.dashboard_split or "train"
    dashboard_contexts = args.dashboard_contexts or (DEMO_DASHBOARD_CONTEXTS if split == "train" else None)
    options = DemoOptions(method=method, params=params, space=args.space,
                          features=parse_feature_ranges(args.features),
                          eval_contexts=args.eval_contexts or DEMO_EVAL_CONTEXTS,
                          dashboard_contexts=dashboard_contexts, dashboard_split=split,
                          evaluate=not args.no_evaluate, dashboards=not args.no_dashboards, artifacts=args.artifacts,
                          progress=_progress(args))
    run, evaluation, site, elapsed = demo_job(options, args.out, log=_log)
    _print_decomposition(run)
    if evaluation is not None:
        _print_evaluation(evaluation)
    linked = [w for w, on in (("the evaluation report", evaluation is not None),
                              ("the feature dashboards", site is not None)) if on]
    print(f"demo done in {elapsed:.1f}s. Open {Path(args.out) / 'index.html'}: the decomposition"
          + (f", with links to {' and '.join(linked)}" if linked else ""))
    return 0


def run_train_heads(args: argparse.Namespace) -> int:
    from .jobs.inputs import ModelRequest, TokenRequest, parse_index_list
    from .jobs.train_heads import TrainHeadsOptions, train_heads_job
    from .training import HeadTrainingSpec

    if args.tokens is not None:
        given = [flag for flag, value in (("--split", args.split != "train"), ("--column", args.column),
                                          ("--context-size", args.context_size)) if value]
        if given:
            raise InputError(f"{', '.join(given)} only apply to --dataset; a --tokens file is used as it is")
    spec = HeadTrainingSpec(
        args.architecture, d_sae=args.d_sae, training_tokens=args.training_tokens, batch_size=args.batch_size,
        lr=args.lr, k=args.k, l1_coefficient=args.l1_coefficient, l0_coefficient=args.l0_coefficient,
        lr_warm_up_steps=args.lr_warm_up_steps, lr_decay_steps=args.lr_decay_steps,
        normalize_activations="none" if args.no_normalize_activations else "expected_average_only_in",
        dead_feature_window=args.dead_feature_window, buffer_batches=args.buffer_batches, seed=args.seed)
    options = TrainHeadsOptions(spec=spec, layer=args.layer, heads=parse_index_list(args.heads, "--heads"),
                                hook=args.hook, eval_contexts=args.eval_contexts,
                                checkpoint_every=args.checkpoint_every, progress=_progress(args))
    tokens = TokenRequest(tokens_file=args.tokens, dataset=args.dataset, split=args.split, column=args.column,
                          context_size=args.context_size, bos_token_id=args.bos_token_id)
    report = train_heads_job(ModelRequest(args.model, args.tokenizer, args.device), tokens, options, args.out,
                             log=_log)
    print(f"{'head':>6} {'L0':>7} {'expl.var':>9} {'dead %':>7} {'CE score':>9}")
    for name, q in report["evals"].items():
        dead = 100 * q["dead_fraction"] if q.get("dead_fraction") is not None else float("nan")
        print(f"{name:>6} {q['l0']:7.2f} {q['explained_variance']:9.4f} {dead:7.1f} "
              f"{fmt(q.get('ce_loss_score'), '9.4f')}")
    print(f"wrote {len(report['evals'])} SAELens folders and report.json to {args.out} "
          f"(training {report['training']['seconds']:.0f}s)")
    return 0


def _log(message: str) -> None:
    print(message, flush=True)


def _print_decomposition(run) -> None:
    for space, res in run.summary.results.items():
        m = res.metrics.metrics
        print(f"[{space}] L0 mean {fmt(m['l0'].mean, '.2f')}, cosine mean {fmt(m['cosine'].mean, '.4f')}, "
              f"relative error median {fmt(m['relative_error'].median, '.4f')}, status {res.metrics.status_counts}")
        print(f"[{space}] {res.verdict}")


def fmt(value: float | None, spec: str) -> str:
    """``value`` formatted by ``spec``; ``-`` when no target gave a finite value (a summary's ``None``)."""
    return "-" if value is None else format(value, spec)


def _print_evaluation(run) -> None:
    from .evaluation.splice import MEASURABLE_NATS, MEASURABLE_STDERRS

    report = run.evaluation.report
    for name in ("clean", "zero_layer", "concat_sae", "all_head_saes",
                 *[n for n in report.splice if n.startswith("routed_")]):
        r = report.splice.get(name)
        if r is not None:
            score = "" if r.score is None else f", loss recovered {fmt(r.score, '.3f')} ± {fmt(r.score_stderr, '.3f')}"
            if r.score_measurable is False:
                score += (f" (not measurable: the ablation costs under {MEASURABLE_NATS:g} nats or "
                          f"{MEASURABLE_STDERRS:g} s.e.)")
            print(f"  {name:<40} CE {r.ce_loss:.4f} ± {fmt(r.ce_loss_stderr, '.4f')}, KL {r.kl:.4f}{score}")
    for label, check in report.decompositions.items():
        if check.exact_expected:
            print(f"  consistency: routing through {label} reproduces the concat SAE "
                  f"({'yes' if check.consistent else 'NO'}, routing error {check.routing_error:.2g})")


def run_reproduce_seed(args: argparse.Namespace) -> int:
    from . import seed_reproduction as seed
    from .jsonio import to_jsonable
    from .outputs import RunWriter, check_output_folder

    check_output_folder(args.out, command=f"reproduce-seed {args.part}")
    if args.part == "kissane":
        from .loading import load_sae

        source = args.concat_sae or seed.SEED_KISSANE_SOURCE
        result = seed.reproduce_kissane(load_sae(source, version=args.concat_version), feature=args.feature)
        print(f"{result.sae}\n  decoder rank {result.rank} (seed {result.seed['rank']})")
        print(f"  feature {result.feature} (norm {result.feature_norm:.2f}) squared-norm share per head:")
        print("    ours: " + " ".join(f"{v:.2f}" for v in result.squared_shares))
        print("    seed: " + " ".join(f"{v:.2f}" for v in seed.SEED_FEATURE_SHARES))
    else:
        from .jobs.inputs import (ModelRequest, SAERequest, TokenRequest, load_model_for, parse_index_list,
                                  recorded_training_data, resolve_tokens)
        from .loading import load_head_saes

        request = SAERequest(concat=None, heads=tuple(args.head_saes), step=args.step,
                             head_index_map=parse_index_list(args.head_index_map, "--head-index-map"))
        head_saes = load_head_saes(request.head_sources(), **({"step": args.step} if args.step else {}))
        used = sorted({str(sae.provenance.get("step", "?")) for sae in head_saes})
        print(f"head SAEs: {head_saes.describe()}\n  checkpoint step(s) used: {', '.join(used)}", flush=True)
        loaded = load_model_for(ModelRequest(args.model, tokenizer=args.tokenizer), head_saes)
        dataset = args.dataset or recorded_training_data(head_saes).get("dataset_path") or seed.SEED_DATASET
        tokens = resolve_tokens(TokenRequest(dataset=dataset, split=args.split, column=args.column,
                                             n_contexts=args.n_contexts, bos_token_id=args.bos_token_id),
                                loaded, head_saes)
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


# Flags whose value is a comma-separated list that may start with "-" (argparse would read "-1,0" as a flag).
_LIST_FLAGS = ("--head-index-map", "--ignore-tokens", "--features")


def _join_list_values(argv: Sequence[str]) -> list[str]:
    """``--head-index-map -1,0`` -> ``--head-index-map=-1,0``, so that the value reaches the check that names it."""
    out, argv = [], list(argv)
    i = 0
    while i < len(argv):
        if argv[i] in _LIST_FLAGS and i + 1 < len(argv) and argv[i + 1].startswith("-") and argv[i + 1][1:2].isdigit():
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


COMMANDS = {"demo": run_demo, "decompose": run_decompose, "evaluate": run_evaluate, "dashboard": run_dashboard,
            "reproduce-seed": run_reproduce_seed, "train-heads": run_train_heads}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_join_list_values(sys.argv[1:] if argv is None else argv))
    try:
        return COMMANDS[args.command](args)
    except USER_ERRORS as err:
        print(f"sparsedecomp {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
