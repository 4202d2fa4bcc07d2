"""The ``train-heads`` job: one SAE per attention head of a layer, trained in one pass, evaluated and written.

Everything the user can get wrong is refused before the model loads or training starts (layer, heads, hook, widths,
``k``, tokens, an output folder holding another run). Then:

1. the model is loaded with its processing recorded (:func:`sparsedecomp.loading.load_model`);
2. the tokens are read (a ``--tokens`` file as it is, or enough ``--dataset`` contexts) and the last
   ``eval_contexts`` contexts are held out for the evaluation;
3. the heads are trained in one pass (:func:`sparsedecomp.training.train_layer_saes`), with checkpoints under
   ``OUT/checkpoints`` every ``checkpoint_every`` steps: the same command run again on the same folder resumes from
   the latest one;
4. each head is written as a SAELens 6 folder ``OUT/head_<h>`` and read back through the package's loader, and
   SAELens ``run_evals``'s metrics (with the splice-in cross-entropy score) are measured per head on the held-out
   contexts (:func:`sparsedecomp.evaluation.evaluate.evaluate_head_saes`) into ``OUT/report.json``.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from ..errors import InputError
from ..training.heads import HeadTrainingSpec

COMMAND = "train-heads"
CHECKPOINT_DIR = "checkpoints"
REPORT_FILE = "report.json"
DEFAULT_CHECKPOINTS = 10
"""Checkpoints a run writes by default (every ``ceil(steps / 10)`` steps, and at the end)."""
Log = Callable[[str], None]


@dataclass(frozen=True)
class TrainHeadsOptions:
    """What ``train-heads`` trains: ``spec`` for every head of ``heads`` (default all) of ``layer``'s ``hook``
    (default ``blocks.{layer}.attn.hook_z``), ``eval_contexts`` held out for the evaluation, a checkpoint every
    ``checkpoint_every`` steps (default: :data:`DEFAULT_CHECKPOINTS` per run)."""

    spec: HeadTrainingSpec
    layer: int
    heads: tuple[int, ...] | None = None
    hook: str | None = None
    eval_contexts: int = 64
    checkpoint_every: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise InputError(f"--layer must be a non-negative integer, got {self.layer!r}")
        expected = f"blocks.{self.layer}.attn.hook_z"
        if self.hook is not None and self.hook != expected:
            if self.hook.endswith("attn.hook_z"):
                raise InputError(f"--hook {self.hook} is not layer {self.layer}'s hook_z ({expected})")
            raise InputError(f"--hook {self.hook} has no head dimension: train-heads trains one SAE per head of an "
                             f"attention layer's hook_z ({expected})")
        if self.heads is not None and (not self.heads or len(set(self.heads)) != len(self.heads)):
            raise InputError(f"--heads must name distinct heads, got {list(self.heads)}")
        for name, value in (("--eval-contexts", self.eval_contexts), ("--checkpoint-every", self.checkpoint_every)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InputError(f"{name} must be a positive integer, got {value!r}")

    @property
    def hook_name(self) -> str:
        return f"blocks.{self.layer}.attn.hook_z"

    def settings(self, model: str, tokens: str) -> dict[str, Any]:
        """What the run's manifest records; an existing output folder must record the same to be resumed."""
        return {"model": model, "tokens": tokens, "layer": self.layer, "heads": self.heads, "hook": self.hook_name,
                "spec": self.spec.to_dict(), "eval_contexts": self.eval_contexts}


def check_output_for(out: str | Path, settings: dict[str, Any]) -> Path:
    """Refuse ``out`` when it holds anything but a ``train-heads`` run with the same ``settings`` (which is resumed)."""
    from ..jsonio import dumps_strict
    from ..outputs import check_output_folder, read_manifest

    out = check_output_folder(out, command=COMMAND)
    manifest = read_manifest(out) if out.is_dir() else None
    if manifest is not None and manifest.get("settings") is not None:
        import json

        previous, current = manifest["settings"], json.loads(dumps_strict(settings))
        differ = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
        if differ:
            raise InputError(f"the output folder {out} holds another train-heads run (it differs in {differ}): give a "
                             "new folder, or the same settings to resume it")
    return out


def needed_contexts(spec: HeadTrainingSpec, context_size: int, eval_contexts: int) -> int:
    """Contexts a run reads: whole blocks of the stream for the training batches, then the held-out ones."""
    from ..training.stream import contexts_for_steps

    return contexts_for_steps(spec.n_steps, buffer_batches=spec.buffer_batches, batch_size=spec.batch_size,
                              context_size=context_size) + eval_contexts


def train_heads_job(model_request: Any, token_request: Any, options: TrainHeadsOptions, out: str | Path, *,
                    log: Log = print) -> dict[str, Any]:
    """Run ``train-heads`` (module docstring); returns the report written to ``OUT/report.json``."""
    from ..evaluation.evaluate import evaluate_head_saes
    from ..jsonio import to_jsonable
    from ..loading import load_head_saes, load_model
    from ..outputs import RunWriter
    from ..training import save_training_sae, train_layer_saes
    from .inputs import resolve_device, resolve_tokens

    tokens_source = str(token_request.tokens_file or token_request.dataset)
    settings = options.settings(str(model_request.name), tokens_source)
    out = check_output_for(out, settings)
    device = resolve_device(model_request.device)
    loaded = load_model(model_request.name, device=device, tokenizer=model_request.tokenizer)
    cfg = loaded.model.cfg
    if options.layer >= cfg.n_layers:
        raise InputError(f"--layer {options.layer} does not exist: {loaded.name} has layers 0..{cfg.n_layers - 1}")
    heads = options.heads or tuple(range(cfg.n_heads))
    missing = [h for h in heads if not 0 <= h < cfg.n_heads]
    if missing:
        raise InputError(f"--heads {missing} do not exist: layer {options.layer} of {loaded.name} has heads "
                         f"0..{cfg.n_heads - 1}")
    if token_request.dataset is not None:
        context_size = token_request.context_size or cfg.n_ctx
        token_request = replace(token_request, n_contexts=needed_contexts(options.spec, context_size,
                                                                          options.eval_contexts))
    else:
        token_request = replace(token_request, n_contexts=2**62)  # a tokens file is used whole
    tokens = resolve_tokens(token_request, loaded, [])
    all_tokens = tokens.tokens
    if all_tokens.shape[0] <= options.eval_contexts:
        raise InputError(f"the tokens hold {all_tokens.shape[0]} contexts: fewer than --eval-contexts "
                         f"{options.eval_contexts} plus the training contexts")
    train, held_out = all_tokens[: -options.eval_contexts], all_tokens[-options.eval_contexts:]
    spec = options.spec
    every = options.checkpoint_every or max(1, math.ceil(spec.n_steps / DEFAULT_CHECKPOINTS))
    log(f"training {len(heads)} {spec.architecture} SAEs of {spec.d_sae} features on {options.hook_name} of "
        f"{loaded.describe()}: {spec.n_steps} steps of {spec.batch_size} tokens from {train.shape[0]:,} contexts of "
        f"{tokens_source}; {options.eval_contexts} contexts held out for the evaluation")

    with RunWriter(out, command=COMMAND, settings=settings) as writer:
        start = time.time()
        trained, history = train_layer_saes(loaded.model, train, layer=options.layer, spec=spec, heads=heads,
                                            checkpoint_dir=out / CHECKPOINT_DIR, checkpoint_every=every,
                                            device=device, progress=options.progress, log=log,
                                            metadata={"context_size": int(all_tokens.shape[1]),
                                                      "prepend_bos": tokens.bos_token_id is not None,
                                                      "dataset_path": tokens_source})
        seconds = time.time() - start
        with tempfile.TemporaryDirectory(dir=out, prefix=".staging-") as staging, warnings.catch_warnings():
            # SAELens asks to load the model with the SAEs' recorded processing: it was loaded with it.
            warnings.filterwarnings("ignore", message=r"\s*This SAE has non-empty model_from_pretrained_kwargs")
            for name, sae in trained.items():
                folder = save_training_sae(sae, Path(staging) / name, processing=loaded.flags.as_kwargs())
                for file in sorted(folder.iterdir()):
                    writer.write_with(f"{name}/{file.name}", lambda tmp, src=file: shutil.copyfile(src, tmp))
            writer.commit()
            head_saes = load_head_saes([out / name for name in trained], n_heads=None)
        log(f"trained in {seconds:.0f}s; evaluating on {held_out.shape[0]} held-out contexts")
        quality, splice = evaluate_head_saes(loaded.model, held_out, head_saes.to(device=device),
                                             progress=options.progress)
        report = {
            "command": COMMAND, "model": loaded.describe(), "hook_name": options.hook_name, "heads": list(heads),
            "spec": spec.to_dict(), "tokens": {"source": tokens_source, "training_contexts": int(train.shape[0]),
                                               "eval_contexts": int(held_out.shape[0]),
                                               "context_size": int(all_tokens.shape[1])},
            "training": {"steps": spec.n_steps, "tokens_per_sae": spec.n_steps * spec.batch_size,
                         "seconds": round(seconds, 2), "checkpoint_every": every, "history": history},
            "evals": to_jsonable(quality),
            "splice": to_jsonable(dict(splice.results)),
        }
        writer.write_json(REPORT_FILE, report)
    return report
