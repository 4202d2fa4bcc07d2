"""Build the demo world: ``python -m sparsedecomp.demo.build --out DIR [--tiny] [--skip-model] [--reevaluate]``.

Stages (timed, seeds fixed): corpus -> tokenizer -> model (trained, saved in fp16, reloaded *processed*) -> the SAEs,
all in one pass over ``hook_z`` of the reloaded model with SAELens's trainer (:mod:`sparsedecomp.training`): one
BatchTopK SAE per head (SAELens 6 folders, as ``sparsedecomp train-heads`` writes them) and a ReLU concatenated-z SAE
(Kissane's file pair) -> evaluation of what was written, through the same loaders users call, into
``build_report.json``.

``--out`` has no default: a build writes only where it is told. It must be a new or empty folder, or a previous
build's (marked by ``demo_build.json``, which a build writes first): a rebuild replaces the SAE folders it wrote
before, and nothing is deleted anywhere else. To refresh the artifacts shipped with the package, run from a source
checkout::

    python -m sparsedecomp.demo.build --out sparsedecomp/demo/artifacts --threads 2               # everything
    python -m sparsedecomp.demo.build --out sparsedecomp/demo/artifacts --threads 2 --skip-model  # the SAEs only
    python -m sparsedecomp.demo.build --out sparsedecomp/demo/artifacts --reevaluate      # the quality section only

and commit the result (``build_report.json`` records the settings and the quality on held-out tokens).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from ..errors import InputError
from .config import DemoConfig
from .layout import (BUILD_MARKER, CONCAT_DIR, HEADS_ROOT, HELDOUT_FILE, MODEL_DIR, REPORT_FILE, TOKENIZER_CONFIG_FILE,
                     TOKENIZER_FILE, concat_version, save_heldout_tokens, tokenizer_path)


class _Timer:
    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self._start = time.time()

    def stage(self, name: str):
        timer = self

        class _Stage:
            def __enter__(self):
                self.t0 = time.time()
                print(f"[build] {name} ...", flush=True)

            def __exit__(self, *exc):
                timer.times[name] = round(time.time() - self.t0, 2)
                print(f"[build] {name} done in {timer.times[name]:.1f}s (total {time.time() - timer._start:.0f}s)",
                      flush=True)

        return _Stage()


def build(out: str | Path, cfg: DemoConfig | None = None, *, skip_model: bool = False) -> dict:
    """Run every stage and write the artifacts under ``out``; returns the build report.

    ``cfg`` defaults to ``DemoConfig()`` (the shipped build). ``out`` must be new, empty or a previous build's
    folder (see :func:`claim_output_folder`); ``skip_model`` reuses the tokenizer and model a previous build wrote
    there."""
    from tokenizers import Tokenizer

    from ..loading import save_kissane
    from ..naming import CONCAT_NAME, head_name
    from ..training import save_training_sae
    from .corpus import build_corpus
    from .model import build_model, load_model, model_config_dict, save_model, train_model
    from .sae_training import kissane_concat_sae, train_demo_saes
    from .tokenizer import pack, save_tokenizer, train_tokenizer

    cfg = DemoConfig() if cfg is None else cfg
    out = Path(out)
    if skip_model and not all(p.exists() for p in (out / BUILD_MARKER, tokenizer_path(out), out / MODEL_DIR)):
        raise InputError(f"--skip-model reuses the tokenizer and model of a previous build, but {out} is not one "
                         f"(it needs {BUILD_MARKER}, {TOKENIZER_FILE} and {MODEL_DIR}/); run a full build first")
    claim_output_folder(out)
    torch.manual_seed(cfg.seed)
    timer = _Timer()
    report: dict = {"config": cfg.to_dict(), "python": platform.python_version(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads()}  # float results depend on it

    with timer.stage("corpus"):
        corpus = build_corpus(code_char_budget=cfg.code_char_budget, prose_char_budget=cfg.prose_char_budget,
                              heldout_every=cfg.heldout_every, seed=cfg.seed)
        report["corpus"] = {**corpus.stats(cfg.heldout_doc_chars), "fingerprint": corpus.fingerprint(),
                            "sources": "pydoc_data.topics.topics (prose) + standard-library .py files (code)"}
    with timer.stage("tokenizer"):
        if skip_model:
            tokenizer = Tokenizer.from_file(str(tokenizer_path(out)))
        else:
            tokenizer = train_tokenizer([d.text for d in corpus.train], cfg.vocab_size)
        if not skip_model or not all((out / f).is_file() for f in (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE)):
            # Into the model folder, where load_model finds it (an older build's, read from beside it, is copied).
            save_tokenizer(tokenizer, out / MODEL_DIR)
        train_tokens = pack(tokenizer, [d.text for d in corpus.train], cfg.n_ctx)
        heldout = pack(tokenizer, corpus.heldout_texts(cfg.heldout_doc_chars), cfg.n_ctx, cfg.max_heldout_sequences)
        save_heldout_tokens(out / HELDOUT_FILE, heldout)
        report["tokens"] = {"train_sequences": len(train_tokens), "heldout_sequences": len(heldout),
                            "n_ctx": cfg.n_ctx, "vocab_size": tokenizer.get_vocab_size()}

    config_kwargs = model_config_dict(cfg)
    if not skip_model:
        with timer.stage("model"):
            model = build_model(config_kwargs)
            losses = train_model(model, train_tokens, steps=cfg.model_steps, batch_size=cfg.model_batch_size,
                                 lr=cfg.model_lr, warmup=cfg.model_warmup_steps, weight_decay=cfg.model_weight_decay,
                                 seed=cfg.seed, repeat_fraction=cfg.model_repeat_fraction)
            save_model(model, out / MODEL_DIR, config_kwargs, cfg.processing_flags,
                       extra={"final_train_loss": sum(losses[-20:]) / len(losses[-20:]),
                              "train_tokens_seen": cfg.model_steps * cfg.model_batch_size * cfg.n_ctx})
            del model

    with timer.stage("SAEs (one pass)"):
        # SAEs see the model exactly as users load it: fp16-rounded weights, processed with the recorded flags.
        model, flags = load_model(out / MODEL_DIR)
        trained, history = train_demo_saes(model, train_tokens, cfg)
        hook_name = f"blocks.{cfg.sae_layer}.attn.hook_z"
        _clear(out, HEADS_ROOT)
        for h in range(cfg.n_heads):
            save_training_sae(trained[head_name(h)], out / HEADS_ROOT / head_name(h), processing=flags)
        concat, l1 = kissane_concat_sae(trained[CONCAT_NAME], hook_name=hook_name, layer=cfg.sae_layer,
                                        model_name=cfg.model_name), cfg.concat_l1_coefficient
        _clear(out, CONCAT_DIR)
        version = concat_version(cfg, l1)
        steps = -(-cfg.sae_training_tokens // cfg.sae_batch_size)
        save_kissane(concat, out / CONCAT_DIR, version, cfg_extra={
            "seed": cfg.seed, "batch_size": cfg.sae_batch_size, "lr": cfg.sae_lr, "l1_coeff": l1,
            "num_tokens": steps * cfg.sae_batch_size, "dict_mult": cfg.concat_d_sae // (cfg.n_heads * cfg.d_head),
            "seq_len": cfg.n_ctx, "model_name": cfg.model_name,
            "trained_with": "SAELens standard training SAE (sparsedecomp.training, one pass with the head SAEs); "
                            "input scaling folded in, decoder rows folded to unit norm",
        })
        report["sae_training"] = {"steps": steps, "tokens_per_sae": steps * cfg.sae_batch_size,
                                  "concat_version": version, "history": history}
        del trained, model

    with timer.stage("evaluation"):
        _evaluate_into(report, out, cfg, train_tokens)
    report["timings_s"] = timer.times
    report["total_time_s"] = round(sum(timer.times.values()), 1)
    report["artifact_bytes"] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and p.name != REPORT_FILE)
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["quality"]["summary"], indent=2))
    print(f"[build] artifacts: {report['artifact_bytes'] / 1e6:.2f} MB in {out}; total {report['total_time_s']}s")
    return report


def _evaluate_into(report: dict, out: Path, cfg: DemoConfig, train_tokens: torch.Tensor) -> None:
    """Load what was written through the users' loaders and record its description and quality in ``report``."""
    from .quality import evaluate_world
    from .world import load_demo_world

    world = load_demo_world(out)
    report["world"] = world.describe()
    report["quality"] = evaluate_world(world, n_splice_sequences=cfg.eval_sequences, batch_size=cfg.eval_batch_size,
                                       train_tokens=train_tokens)


def reevaluate(out: str | Path) -> dict:
    """Recompute the quality section of an existing build's report (e.g. after the bars changed) without
    retraining anything; the build's config is read from its report and its training tokens re-packed."""
    from tokenizers import Tokenizer

    from .corpus import build_corpus
    from .tokenizer import pack

    out = Path(out)
    path = out / REPORT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no build report to re-evaluate (run a full build first)")
    report = json.loads(path.read_text())
    cfg = DemoConfig.from_dict(report["config"])
    corpus = build_corpus(code_char_budget=cfg.code_char_budget, prose_char_budget=cfg.prose_char_budget,
                          heldout_every=cfg.heldout_every, seed=cfg.seed)
    tokenizer = Tokenizer.from_file(str(tokenizer_path(out)))
    train_tokens = pack(tokenizer, [d.text for d in corpus.train], cfg.n_ctx)
    start = time.time()
    _evaluate_into(report, out, cfg, train_tokens)
    report.setdefault("timings_s", {})["evaluation"] = round(time.time() - start, 2)
    report["total_time_s"] = round(sum(report["timings_s"].values()), 1)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["quality"]["summary"], indent=2))
    return report


def claim_output_folder(out: Path) -> None:
    """Make ``out`` a build folder: create it (or take an empty one) and write :data:`BUILD_MARKER` into it; a
    folder that already carries the marker is a previous build's and is reused. Any other existing path is refused,
    so that a build never writes into, or deletes from, a folder it did not create."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; give a new or empty folder, or a previous build's")
    if out.is_dir() and not (out / BUILD_MARKER).is_file() and any(out.iterdir()):
        raise InputError(f"--out {out} is not empty and not a previous demo build (no {BUILD_MARKER} in it); give a "
                         "new or empty folder, or a previous build's")
    out.mkdir(parents=True, exist_ok=True)
    if not (out / BUILD_MARKER).is_file():
        _write_marker(out)


def _write_marker(out: Path) -> None:
    (out / BUILD_MARKER).write_text(json.dumps({
        "written_by": "python -m sparsedecomp.demo.build",
        "note": "a sparsedecomp demo build: rebuilding into this folder replaces the files the build writes",
    }, indent=2) + "\n")


def _clear(out: Path, subfolder: str) -> None:
    """Remove a previous build's files under ``out / subfolder`` (only files this build writes live there)."""
    if not (out / BUILD_MARKER).is_file():
        raise InputError(f"refusing to delete from {out}: not a demo build folder (no {BUILD_MARKER})")
    directory = out / subfolder
    if directory.exists():
        for path in sorted(directory.rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparsedecomp.demo.build", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True,
                        help="artifact folder: new, empty or a previous build's (the shipped world, from a source "
                             "checkout: sparsedecomp/demo/artifacts)")
    parser.add_argument("--tiny", action="store_true", help="seconds-long build with tiny settings (for testing)")
    parser.add_argument("--skip-model", action="store_true",
                        help="reuse the tokenizer and model already in --out; retrain only the SAEs")
    parser.add_argument("--reevaluate", action="store_true",
                        help="only recompute the quality section of the report in --out (nothing is retrained)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 is faster on a crowded machine)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        if args.reevaluate:
            reevaluate(args.out)
        else:
            build(args.out, DemoConfig.tiny() if args.tiny else DemoConfig(), skip_model=args.skip_model)
    except (InputError, FileNotFoundError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
