"""One SAE per attention head of a layer, all trained from one activation stream with SAELens 6's own training code.

The package's input is a per-head SAE for every head; trained one SAELens run at a time, that costs one model pass per
head. Here every head is trained from the *same* forward passes: :class:`~sparsedecomp.training.stream.HeadBatchStream`
runs the model once per block of contexts, splits ``hook_z`` ``(tokens, n_heads, d_head)`` by head and serves every
head the same shuffled rows, and SAELens's ``MultiSAETrainer`` trains them. That trainer holds one ``SAETrainer`` per
SAE (its optimiser, learning-rate and coefficient schedules, activation scaling, dead-feature statistics), so each
head's SAE is trained exactly as a single SAELens run would train it: SAELens's training SAE classes, losses and
initialisation, not a loop written here. A concatenated-z SAE can ride along in the same pass (key ``"concat"``).

(SAELens's ``MultiSAETrainingRunner`` cannot do this in its first version: SAEs on one hook must share
``hook_head_index``. The trainer under it routes batches by key, and the keys here are one per head.)

What this module adds around SAELens's trainer (:class:`HeadSAETrainer`):

* **progress**: SAELens's progress bar, showing each head's L0 and explained variance on its latest training batch,
  ``EV = 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` over the batch (SAELens's ``metrics/explained_variance``);
* **checkpoints and resume**: every ``checkpoint_every`` steps, SAELens's own per-SAE checkpoints (weights, sparsity,
  activation scaler, optimiser and schedules) and the stream's position are written to a hidden folder that is renamed
  into place when complete (a kill leaves the previous checkpoint whole); a later run with the same settings loads the
  latest and goes on from there, on the batches an uninterrupted run would have seen;
* **the norm estimate**: SAELens estimates the input scaling (``expected_average_only_in``) on the stream's first
  batches; the stream is then rewound, so training starts on those batches (nothing read is thrown away).

Each head's SAE is written with SAELens's ``save_inference_model`` (BatchTopK as JumpReLU, as SAELens saves it) and
its metadata: ``hook_name`` the layer's ``hook_z``, ``hook_head_index`` the head, the model's name and its processing
as ``model_from_pretrained_kwargs`` (every flag written out), so both ``sae_lens.SAE.load_from_disk`` and
:func:`sparsedecomp.loading.load_head_saes` read the folders.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ..activations import check_layer, hooked_transformer
from ..errors import InputError
from ..naming import CONCAT_NAME, head_name
from .stream import HeadBatchStream

ARCHITECTURES = ("standard", "jumprelu", "topk", "batchtopk")
"""SAELens training architectures offered (the SAELens registry's names)."""
NORM_ESTIMATE_BATCHES = 10
"""Batches SAELens's input-norm estimate reads (at most; the stream is rewound after it)."""
RUN_FILE = "run.json"
STREAM_FILE = "stream.json"
_PARTIAL = ".partial-"


@dataclass(frozen=True)
class HeadTrainingSpec:
    """How each head's SAE is trained (one spec for every head).

    Attributes:
        architecture: one of :data:`ARCHITECTURES`.
        d_sae: features per head.
        training_tokens: tokens each SAE trains on (the same tokens for every head), rounded up to whole batches.
        batch_size: rows per training step.
        lr: Adam learning rate.
        k: active features per token (``topk`` / ``batchtopk``; required there, refused elsewhere).
        l1_coefficient: L1 sparsity coefficient (``standard``; SAELens's default when ``None``).
        l0_coefficient: L0 sparsity coefficient (``jumprelu``; SAELens's default when ``None``).
        lr_warm_up_steps, lr_decay_steps: SAELens's learning-rate warm-up and final linear decay (steps).
        normalize_activations: SAELens's ``"expected_average_only_in"`` (inputs scaled to norm ``sqrt(d_in)`` during
            training, folded into the weights at the end: Anthropic's April-2024 recipe) or ``"none"``.
        dead_feature_window: steps without firing after which SAELens counts a feature dead (the mask its TopK,
            BatchTopK and JumpReLU losses revive dead features with, e.g. TopK's auxiliary loss).
        buffer_batches: training batches per block of the stream (rows are shuffled across this many).
        seed: seeds the SAEs' initialisation and the stream's shuffles.
        extra: further keyword arguments of the SAELens training config (e.g. ``{"jumprelu_bandwidth": 0.05}``).
    """

    architecture: str
    d_sae: int
    training_tokens: int
    batch_size: int = 4096
    lr: float = 3e-4
    k: int | None = None
    l1_coefficient: float | None = None
    l0_coefficient: float | None = None
    lr_warm_up_steps: int = 0
    lr_decay_steps: int = 0
    normalize_activations: str = "expected_average_only_in"
    dead_feature_window: int = 1000
    buffer_batches: int = 16
    seed: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise InputError(f"architecture must be one of {list(ARCHITECTURES)}, got {self.architecture!r}")
        for name in ("d_sae", "training_tokens", "batch_size", "buffer_batches", "dead_feature_window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a positive int, got {value!r}")
        for name in ("lr_warm_up_steps", "lr_decay_steps", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InputError(f"{name} must be a non-negative int, got {value!r}")
        if self.architecture in ("topk", "batchtopk"):
            if isinstance(self.k, bool) or not isinstance(self.k, int) or not 1 <= self.k <= self.d_sae:
                raise InputError(f"a {self.architecture} SAE needs k in 1..d_sae={self.d_sae}, got k={self.k!r}")
        elif self.k is not None:
            raise InputError(f"k applies to topk / batchtopk SAEs, not to {self.architecture!r}")
        for name, architecture in (("l1_coefficient", "standard"), ("l0_coefficient", "jumprelu")):
            value = getattr(self, name)
            if value is None:
                continue
            if self.architecture != architecture:
                raise InputError(f"{name} applies to {architecture} SAEs, not to {self.architecture!r}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
                raise InputError(f"{name} must be a non-negative, finite number, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < float("inf")):
            raise InputError(f"lr must be a positive, finite number, got {self.lr!r}")
        if self.normalize_activations not in ("expected_average_only_in", "none"):
            raise InputError("normalize_activations must be 'expected_average_only_in' or 'none', got "
                             f"{self.normalize_activations!r}")
        if self.lr_warm_up_steps + self.lr_decay_steps > self.n_steps:
            raise InputError(f"lr_warm_up_steps + lr_decay_steps = {self.lr_warm_up_steps + self.lr_decay_steps} is "
                             f"more than the run's {self.n_steps} steps")

    @property
    def n_steps(self) -> int:
        """Training steps: ``ceil(training_tokens / batch_size)``."""
        return -(-self.training_tokens // self.batch_size)

    def training_config(self, d_in: int, metadata: Any) -> Any:
        """The SAELens training config of one head's SAE."""
        from sae_lens.registry import get_sae_training_class

        _, config_class = get_sae_training_class(self.architecture)
        options: dict[str, Any] = {"normalize_activations": self.normalize_activations, **dict(self.extra)}
        for name in ("k", "l1_coefficient", "l0_coefficient"):
            if getattr(self, name) is not None:
                options[name] = getattr(self, name)
        return config_class(d_in=d_in, d_sae=self.d_sae, metadata=metadata, **options)

    def trainer_config(self, *, device: str) -> Any:
        """SAELens's ``SAETrainerConfig`` shared by every SAE of the run (checkpoints are this module's)."""
        from sae_lens.config import SAETrainerConfig

        return SAETrainerConfig(
            total_training_samples=self.n_steps * self.batch_size, train_batch_size_samples=self.batch_size,
            lr=self.lr, lr_end=self.lr / 10, lr_warm_up_steps=self.lr_warm_up_steps, lr_decay_steps=self.lr_decay_steps,
            device=device, dead_feature_window=self.dead_feature_window, n_checkpoints=0, checkpoint_path=None,
            save_final_checkpoint=False,
            n_batches_for_norm_estimate=min(NORM_ESTIMATE_BATCHES, self.n_steps))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "extra": dict(self.extra)}


def _trainer_class():
    """SAELens's ``MultiSAETrainer`` with per-head progress, atomic checkpoints and resume (module docstring); made on
    first use so that importing this module does not import SAELens."""
    from sae_lens.training.multi_sae_trainer import MultiSAETrainer

    class _Trainer(MultiSAETrainer):
        checkpoint_dir: Path | None = None
        checkpoint_every: int = 0
        progress_every: int = 1
        resumed_samples: int = 0
        history: list

        def _estimate_scaling_factors(self) -> None:
            # SAELens reads the estimate's batches from the stream; rewind, so that training starts on them.
            position = self.data_provider.position
            super()._estimate_scaling_factors()
            self.data_provider.seek(position)

        def _checkpoint_if_needed(self) -> None:
            """Checkpoints are written after the step counters advance (in ``_update_pbar``), so that a resumed run
            counts its steps as an uninterrupted one."""

        @torch.no_grad()
        def _update_pbar(self, step_outputs, pbar, update_interval: int = 100) -> None:
            step, total = self.n_training_steps, -(-self.cfg.total_training_samples // self.cfg.train_batch_size_samples)
            if step % self.progress_every == 0 or step == total:
                stats = {name: batch_statistics(out.sae_in, out.sae_out, out.feature_acts)
                         for name, out in step_outputs.items()}
                self.history.append({"step": step, "samples": self.n_training_samples,
                                     **{name: {"l0": round(l0, 3), "explained_variance": round(ev, 4)}
                                        for name, (l0, ev) in stats.items()}})
                pbar.initial = self.resumed_samples  # the rate counts the samples this process trained on
                pbar.n = self.n_training_samples
                pbar.set_description(f"step {step}/{total}")
                pbar.set_postfix_str(progress_line(stats), refresh=True)
            if self.checkpoint_dir is not None and self.checkpoint_every and (
                    step % self.checkpoint_every == 0 or step == total):
                self.write_checkpoint()

        def write_checkpoint(self) -> Path:
            """SAELens's per-SAE checkpoints and the stream position, under ``checkpoint_dir/<samples>`` (written
            beside it and renamed into place; older checkpoints are then removed)."""
            final = self.checkpoint_dir / str(self.n_training_samples)
            partial = self.checkpoint_dir / f"{_PARTIAL}{self.n_training_samples}"
            shutil.rmtree(partial, ignore_errors=True)
            for name, trainer in self.trainers.items():
                trainer.save_checkpoint(checkpoint_name=name, base_path=partial)
            (partial / STREAM_FILE).write_text(json.dumps({
                "position": self.data_provider.position, "n_training_steps": self.n_training_steps,
                "n_training_samples": self.n_training_samples, "history": self.history}) + "\n")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            for older in completed_checkpoints(self.checkpoint_dir)[:-1]:
                shutil.rmtree(older, ignore_errors=True)
            return final

        def resume_from(self, checkpoint: Path) -> None:
            state = json.loads((checkpoint / STREAM_FILE).read_text())
            self.load_checkpoint(checkpoint)
            if self.n_training_samples != state["n_training_samples"]:
                raise InputError(f"checkpoint {checkpoint} is inconsistent: its SAEs trained on "
                                 f"{self.n_training_samples} samples, its stream record says {state['n_training_samples']}")
            self.data_provider.seek(int(state["position"]))
            self.history = list(state.get("history", []))
            self.resumed_samples = self.n_training_samples

    return _Trainer


def batch_statistics(sae_in: torch.Tensor, sae_out: torch.Tensor, feature_acts: torch.Tensor) -> tuple[float, float]:
    """``(L0, explained variance)`` of one training batch (see the module docstring)."""
    l0 = float((feature_acts != 0).float().sum(-1).mean())
    residual = (sae_in - sae_out).pow(2).sum()
    spread = (sae_in - sae_in.mean(0)).pow(2).sum()
    return l0, float(1 - residual / spread) if float(spread) > 0 else float("nan")


def progress_line(stats: Mapping[str, tuple[float, float]]) -> str:
    """``"L0 7.9 8.0 … | EV .84 .86 …"`` in key order (heads by number, then the concat SAE)."""
    l0 = " ".join(f"{v[0]:.1f}" for v in stats.values())
    ev = " ".join(f"{v[1]:.2f}" for v in stats.values())
    return f"L0 {l0} | EV {ev}"


def completed_checkpoints(checkpoint_dir: str | Path) -> list[Path]:
    """The complete checkpoints under ``checkpoint_dir``, oldest first (by training samples)."""
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        return []
    done = [p for p in folder.iterdir() if p.is_dir() and p.name.isdigit() and (p / STREAM_FILE).is_file()]
    return sorted(done, key=lambda p: int(p.name))


def tokens_fingerprint(tokens: Any) -> str:
    """SHA-256 of the token ids (int64, row-major): a resumed run must read the same contexts."""
    tensor = getattr(tokens, "tokens", tokens)
    return hashlib.sha256(tensor.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def train_layer_saes(model: Any, tokens: Any, *, layer: int, spec: HeadTrainingSpec,
                     heads: tuple[int, ...] | None = None, concat: HeadTrainingSpec | None = None,
                     checkpoint_dir: str | Path | None = None, checkpoint_every: int = 0, device: str = "cpu",
                     progress: bool = False, progress_every: int | None = None,
                     metadata: Mapping[str, Any] | None = None,
                     log: Callable[[str], None] = lambda message: None) -> tuple[dict[str, Any], list[dict]]:
    """Train one SAELens training SAE per head of ``heads`` (all of the layer's by default) on ``hook_z`` of
    ``layer`` in one pass, and with ``concat`` a concatenated-z SAE on all heads in the same pass (its architecture,
    width and sparsity from ``concat``; steps, batch size and learning rate from ``spec``). Returns
    ``({name: TrainingSAE}, history)``: keys ``head_<h>`` (and ``"concat"``), input scaling folded in; ``history`` the
    per-SAE batch L0 and explained variance every ``progress_every`` steps. ``metadata``: further SAELens metadata
    every SAE records (e.g. ``context_size``, ``prepend_bos``, ``dataset_path``).

    With ``checkpoint_dir`` a checkpoint is written every ``checkpoint_every`` steps and at the end, and a run that
    finds a checkpoint of the same run there (same model, layer, heads, specs and tokens: :data:`RUN_FILE`) resumes
    from the latest one; a checkpoint folder of another run is refused."""
    from sae_lens.registry import get_sae_training_class
    from sae_lens.saes.sae import SAEMetadata

    hooked = hooked_transformer(model)
    cfg = hooked.cfg
    layer = check_layer(hooked, layer)
    heads = tuple(range(cfg.n_heads)) if heads is None else tuple(heads)
    missing = [h for h in heads if isinstance(h, bool) or not isinstance(h, int) or not 0 <= h < cfg.n_heads]
    if missing or not heads or len(set(heads)) != len(heads):
        raise InputError(f"heads {missing or list(heads)} do not exist or repeat: the model's layer {layer} has heads "
                         f"0..{cfg.n_heads - 1}")
    if concat is not None and (concat.training_tokens, concat.batch_size, concat.lr) != (
            spec.training_tokens, spec.batch_size, spec.lr):
        raise InputError("a concat SAE trained in the same pass shares the heads' training_tokens, batch_size and lr")
    token_tensor = getattr(tokens, "tokens", tokens)
    stream = HeadBatchStream(model, token_tensor, layer=layer, heads=heads, batch_size=spec.batch_size,
                             buffer_batches=spec.buffer_batches, seed=spec.seed, concat=concat is not None,
                             device=device)
    usable = stream.batches_per_epoch * spec.batch_size
    if usable < spec.n_steps * spec.batch_size:
        raise InputError(f"{spec.n_steps * spec.batch_size:,} training tokens ({spec.n_steps} batches of "
                         f"{spec.batch_size}) asked for but the tokens hold {int(token_tensor.numel()):,} "
                         f"({usable:,} in whole batches): give more tokens or fewer training tokens")
    hook_name = f"blocks.{layer}.attn.hook_z"
    run = {"model": cfg.model_name, "layer": layer, "heads": list(heads), "spec": spec.to_dict(),
           "concat": None if concat is None else concat.to_dict(), "tokens_sha256": tokens_fingerprint(token_tensor)}
    resume_from = _claim_checkpoints(checkpoint_dir, run) if checkpoint_dir is not None else None

    torch.manual_seed(spec.seed)  # the SAEs' initialisation
    saes = {}
    training_class, _ = get_sae_training_class(spec.architecture)
    for h in heads:
        saes[head_name(h)] = training_class(spec.training_config(cfg.d_head, SAEMetadata(
            **dict(metadata or {}), hook_name=hook_name, hook_head_index=h, model_name=cfg.model_name)))
    if concat is not None:
        training_class, _ = get_sae_training_class(concat.architecture)
        saes[CONCAT_NAME] = training_class(concat.training_config(cfg.n_heads * cfg.d_head, SAEMetadata(
            **dict(metadata or {}), hook_name=hook_name, model_name=cfg.model_name)))
    trainer = _trainer_class()(spec.trainer_config(device=device), saes, {key: key for key in saes}, stream)
    trainer.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
    trainer.checkpoint_every = checkpoint_every
    trainer.progress_every = progress_every or max(1, spec.n_steps // 100)
    trainer.history = []
    if resume_from is not None:
        trainer.resume_from(resume_from)
        log(f"resumed from {resume_from} (step {trainer.n_training_steps} of {spec.n_steps})")
    quiet = contextlib.redirect_stderr(open(os.devnull, "w")) if not progress else contextlib.nullcontext()
    with quiet:  # SAELens's trainer always draws its progress bar (on stderr)
        trained = trainer.fit()
    return dict(trained), trainer.history


def _claim_checkpoints(checkpoint_dir: str | Path, run: Mapping[str, Any]) -> Path | None:
    """Record ``run`` in ``checkpoint_dir`` (a new folder) or check it against the record there; the latest complete
    checkpoint to resume from, if any."""
    folder = Path(checkpoint_dir)
    record = folder / RUN_FILE
    if record.is_file():
        previous = json.loads(record.read_text())
        current = json.loads(json.dumps(run))  # as the record reads back (tuples become lists)
        if previous != current:
            differ = sorted(k for k in set(current) | set(previous) if previous.get(k) != current.get(k))
            raise InputError(f"{folder} holds checkpoints of another training run (it differs in {differ}): give a new "
                             "folder, or the same settings to resume it")
    elif folder.exists() and any(folder.iterdir()):
        raise InputError(f"{folder} is not empty and holds no {RUN_FILE}: give a new or empty checkpoint folder")
    else:
        folder.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(run, indent=1) + "\n")
    done = completed_checkpoints(folder)
    return done[-1] if done else None


def train_head_saes(model: Any, tokens: Any, *, layer: int, spec: HeadTrainingSpec,
                    heads: tuple[int, ...] | None = None, checkpoint_dir: str | Path | None = None,
                    checkpoint_every: int = 0, device: str = "cpu", progress: bool = False) -> dict[int, Any]:
    """:func:`train_layer_saes` for the heads only: ``{head: TrainingSAE}``."""
    trained, _ = train_layer_saes(model, tokens, layer=layer, spec=spec, heads=heads, checkpoint_dir=checkpoint_dir,
                                  checkpoint_every=checkpoint_every, device=device, progress=progress)
    return {int(name.rsplit("_", 1)[1]): sae for name, sae in trained.items()}


def save_head_saes(saes: Mapping[int, Any], out: str | Path, *, processing: Mapping[str, bool] | None = None
                   ) -> dict[int, Path]:
    """Write each head's SAE as a SAELens 6 inference folder ``out/head_<h>`` (SAELens's ``save_inference_model``),
    recording ``processing`` (the model's processing flags, written out in full) as its ``model_from_pretrained_kwargs``.
    Returns ``{head: folder}``."""
    out = Path(out)
    folders = {}
    for h, sae in saes.items():
        folders[h] = save_training_sae(sae, out / head_name(h), processing=processing)
    return folders


def save_training_sae(sae: Any, folder: str | Path, *, processing: Mapping[str, bool] | None = None) -> Path:
    """Write one trained SAE as a SAELens 6 inference folder (``save_inference_model``), with ``processing``
    recorded as its ``model_from_pretrained_kwargs``."""
    import warnings

    if processing is not None:
        sae.cfg.metadata.model_from_pretrained_kwargs = dict(processing)
    with warnings.catch_warnings():
        # SAELens asks, for every SAE that records model_from_pretrained_kwargs, to load the model with them: recorded
        # on purpose, so that whoever loads the SAE loads the model as it was trained on.
        warnings.filterwarnings("ignore", message=r"\s*This SAE has non-empty model_from_pretrained_kwargs")
        sae.save_inference_model(str(folder))
    return Path(folder)
