"""Per-head SAEs of a layer trained in one pass against one SAELens run per head: wall time at equal work.

    python -m benchmarks.train_heads_speed --size demo                     # 8 heads: ours vs 8 SAELens runs
    python -m benchmarks.train_heads_speed --size gelu-2l --tool ours       # the gelu-2l size row (ours only)
    python -m benchmarks.train_heads_speed --size tiny --heads 0 1 --tool both --ours-repeats 1   # the smoke test

Both tools train the same SAELens training SAEs (``--architecture``, ``--d-sae``, ``--k``, Adam at ``--lr`` with
SAELens's constant schedule, ``--batch-size`` rows a step, ``--training-tokens`` rows per SAE, inputs normalised
with ``expected_average_only_in`` over the same number of norm-estimate batches) on ``blocks.1.attn.hook_z`` of the
same model, loaded and processed by :func:`sparsedecomp.loading.load_model`, from the same token contexts (one
safetensors file written here), through a mixing buffer of the same size (``--buffer-batches`` x ``--batch-size``
rows, half kept for mixing). Every run is a fresh Python process timed from outside (whole wall time, imports and
model loading included); each also reports its phases from inside.

* **SAELens** (the baseline): one ``sae_lens.LanguageModelSAETrainingRunner`` run per head, sequentially, each in its
  own process with all cores: ``hook_head_index=h``, ``override_model`` (the loaded ``HookedTransformer``),
  ``override_dataset`` (a ``datasets.Dataset`` of the same contexts, ``tokens`` column), wandb off (so no evals run
  either), no checkpoints, the final SAE written to ``output_path`` as the runner does. SAELens's knobs set to equal
  work: ``n_batches_for_norm_estimate`` as ours (its default, 1,000 batches, would forward 4M extra tokens per run),
  ``n_batches_in_buffer`` such that its mixing buffer holds as many rows as ours (SAELens 6 sizes the buffer as
  ``n_batches_in_buffer x context_size`` rows, not in store batches), ``store_batch_size_prompts`` = the contexts a
  forward pass of ours takes (:func:`sparsedecomp.activations.contexts_per_batch`; SAELens's default 32 is slower
  here), everything else SAELens's defaults (no compile, no prefetch, fp32).
* **ours**: one process training every head in one pass (:func:`sparsedecomp.training.heads.train_head_saes`: one
  forward pass per batch of contexts, split by head, SAELens's ``MultiSAETrainer``), written with
  :func:`~sparsedecomp.training.heads.save_head_saes`. :func:`ours_command` is the one place that says how ours is
  run; it becomes ``sparsedecomp train-heads ...`` once that command exists. With ``--tool both`` ours runs before
  and after the baseline (``--ours-repeats``), to bracket changes in the machine's load.

Equal work is checked, not assumed: each process records the tokens its trainer(s) trained per head, the
norm-estimate batches and the tokens its model forwarded; the parent reads every written SAE folder back (``d_in``,
``d_sae``, the weight shapes). Ratios are only printed when both sides trained the same tokens per head into SAEs
of the same shapes.

Sizes (:data:`SIZES`; defaults: ``batchtopk``, batch 4,096, lr 3e-4, a buffer of 16 batches):

* ``demo``: the shipped demo model (8 heads of 32, contexts of 128, ``demo_tokens(split="train")``), 256 features,
  k 8, 60 batches (245,760 tokens) per SAE: on 2 shared cores a SAELens run of the demo model took 33-66 s at this
  size and the whole comparison (8 runs + ours twice) about 10 minutes;
* ``gelu-2l``: a random-weight model of gelu-2l's shape (:data:`benchmarks.standins.GELU_2L`: d_model 512, 8 heads
  of 64, d_mlp 2,048, vocabulary 48,262, 2 layers, GELU, LN) written as a local model folder, random BOS-first
  contexts of 1,024 tokens, 2,048 features, k 32, 25 batches (102,400 tokens) per SAE; ours is timed after an
  untimed warm-up training of 2 batches (``--warmup-tokens``) in the same process;
* ``tiny``: the same layout shrunk (:data:`benchmarks.standins.TINY`, 8 heads of 8, contexts of 64), 16 features,
  k 4, batches of 256, 2,048 tokens per SAE: the machinery in seconds, for the tests.

The norm-estimate batches are ``train_head_saes``'s rule, ``min(NORM_ESTIMATE_BATCHES, training batches)`` (10), on
both sides; SAELens reads them before its training batches, ours rewinds its stream after the estimate and trains on
them (fewer tokens forwarded, the same tokens trained on). The gelu-2l model is not written with
``sparsedecomp.loading.standin_models.write_standin_model("gelu-2l", ...)``: offline it fails, as TransformerLens
reads gelu-2l's config from the Hugging Face hub.

Results: ``benchmarks/results/train_heads_speed-<size>-<timestamp>.json`` (``--out``) and a markdown summary
(printed). Timings on a shared machine are noisy: each process's CPU seconds and the load average are recorded next
to its wall time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results"
LAYER = 1

SIZES: dict[str, dict[str, Any]] = {
    "demo": {"model": "demo", "d_sae": 256, "k": 8, "training_tokens": 60 * 4096, "batch_size": 4096,
             "buffer_batches": 16, "context_size": 128, "warmup_tokens": 0},
    "gelu-2l": {"model": "gelu-2l", "d_sae": 2048, "k": 32, "training_tokens": 25 * 4096, "batch_size": 4096,
                "buffer_batches": 16, "context_size": 1024, "warmup_tokens": 2 * 4096},
    "tiny": {"model": "tiny", "d_sae": 16, "k": 4, "training_tokens": 2048, "batch_size": 256, "buffer_batches": 4,
             "context_size": 64, "warmup_tokens": 0},
}
"""Per-size defaults (every one a command-line option)."""


@dataclass(frozen=True)
class Settings:
    """What both tools are asked to do (one setting for every head)."""

    size: str
    architecture: str = "batchtopk"
    d_sae: int = 256
    k: int | None = 8
    batch_size: int = 4096
    lr: float = 3e-4
    training_tokens: int = 60 * 4096
    normalize_activations: str = "expected_average_only_in"
    buffer_batches: int = 16
    seed: int = 0
    context_size: int = 128
    heads: tuple[int, ...] | None = None
    threads: int = 1
    warmup_tokens: int = 0

    @property
    def norm_batches(self) -> int:
        """Norm-estimate batches: ``train_head_saes``'s rule (its SAELens trainer config), given to SAELens too."""
        from sparsedecomp.training.heads import NORM_ESTIMATE_BATCHES

        return max(1, min(NORM_ESTIMATE_BATCHES, self.training_tokens // self.batch_size))

    @property
    def buffer_rows(self) -> int:
        return self.buffer_batches * self.batch_size

    @property
    def saelens_buffer_contexts(self) -> int:
        """SAELens's ``n_batches_in_buffer`` for a buffer of :attr:`buffer_rows` rows: SAELens 6's
        ``ActivationsStore.get_data_loader`` makes its mixing buffer ``n_batches_in_buffer * training_context_size``
        rows (a count of contexts, whatever its name says)."""
        return self.buffer_rows // self.context_size

    def check(self) -> None:
        if self.buffer_rows % self.context_size:
            raise SystemExit(f"--buffer-batches x --batch-size ({self.buffer_rows}) must be a multiple of the context "
                             f"size {self.context_size}: SAELens's buffer is counted in contexts")
        if self.training_tokens < self.batch_size:
            raise SystemExit("--training-tokens must be at least one batch")


def contexts_needed(settings: Settings, forward_contexts: int) -> int:
    """Contexts enough that neither tool runs out and starts over: the norm-estimate batches, the training rows, the
    mixing buffer's fill and two forward passes' worth of look-ahead (the last one is partly unused)."""
    rows = (settings.norm_batches * settings.batch_size + settings.training_tokens + settings.buffer_rows
            + 2 * forward_contexts * settings.context_size)
    return math.ceil(rows / settings.context_size)


def seconds_per_million(seconds: float, tokens: int) -> float:
    return seconds * 1e6 / tokens


def ratio(baseline_s: float, ours_s: float) -> float:
    return baseline_s / ours_s


# -- the world both tools read ------------------------------------------------------------------------------------
@dataclass
class World:
    model_dir: str
    tokens_file: str
    n_heads: int
    d_head: int
    forward_contexts: int
    n_contexts: int
    description: dict = field(default_factory=dict)


def write_random_model(folder: Path, size: str, seed: int) -> Path:
    """A local model folder (the package's layout, as :func:`benchmarks.standins.write_standin` writes it) holding a
    random-weight model of gelu-2l's shape (``size="gelu-2l"``) or of the same layout shrunk (``"tiny"``); the SAEs
    and dataset of a full stand-in world are not needed here."""
    from benchmarks.standins import GELU_2L, TINY, write_model_folder

    config = GELU_2L if size == "gelu-2l" else {**TINY, "model_name": "tiny-gelu-2l-layout"}
    write_model_folder(folder, config, seed=seed,
                       note="train_heads_speed stand-in: gelu-2l's architecture with random weights")
    return folder


def prepare_world(settings: Settings, workdir: Path) -> World:
    """The model folder and the token file both tools read (not timed)."""
    import torch
    from safetensors.torch import save_file

    from sparsedecomp.activations import contexts_per_batch
    from sparsedecomp.loading import load_model

    if settings.size == "demo":
        from sparsedecomp.demo import demo_tokens
        from sparsedecomp.demo.layout import ARTIFACTS_DIR, MODEL_DIR

        model_dir = ARTIFACTS_DIR / MODEL_DIR
    else:
        model_dir = write_random_model(workdir / "model", settings.size, settings.seed)
    model = load_model(model_dir).model
    cfg = model.cfg
    if cfg.n_ctx < settings.context_size:
        raise SystemExit(f"--context-size {settings.context_size} exceeds the model's n_ctx {cfg.n_ctx}")
    forward_contexts = contexts_per_batch(model, settings.context_size, with_logits=False)
    n_contexts = contexts_needed(settings, forward_contexts)
    if settings.size == "demo":
        token_set = demo_tokens(n_contexts, split="train")
        tokens = token_set.tokens[:, : settings.context_size].contiguous()
        source = {"source": token_set.source, **token_set.details}
    else:
        gen = torch.Generator().manual_seed(settings.seed)
        tokens = torch.randint(1, cfg.d_vocab, (n_contexts, settings.context_size), generator=gen)
        tokens[:, 0] = 0  # BOS first, as gelu-2l's training contexts
        source = {"source": "random ids, BOS (0) first", "seed": settings.seed}
    tokens_file = workdir / "tokens.safetensors"
    save_file({"tokens": tokens.long().contiguous()}, str(tokens_file))
    description = {
        "model_dir": "sparsedecomp/demo/artifacts/model" if settings.size == "demo" else
                     "random weights (write_random_model), in a temporary folder",
        "model": {"name": cfg.model_name, "n_layers": cfg.n_layers, "d_model": cfg.d_model, "n_heads": cfg.n_heads,
                  "d_head": cfg.d_head, "d_mlp": cfg.d_mlp, "d_vocab": cfg.d_vocab, "n_ctx": cfg.n_ctx,
                  "act_fn": cfg.act_fn, "normalization_type": cfg.normalization_type},
        "hook_name": f"blocks.{LAYER}.attn.hook_z",
        "tokens": {"n_contexts": int(tokens.shape[0]), "context_size": int(tokens.shape[1]),
                   "n_tokens": int(tokens.numel()), **source},
        "forward_contexts": forward_contexts,
    }
    return World(model_dir=str(model_dir), tokens_file=str(tokens_file), n_heads=cfg.n_heads, d_head=cfg.d_head,
                 forward_contexts=forward_contexts, n_contexts=int(tokens.shape[0]), description=description)


# -- how each tool is run: one fresh process each ------------------------------------------------------------------
def ours_command(settings: Settings, world: World, out_dir: Path, result_file: Path) -> list[str]:
    """The command that trains every head in one pass. Today the library call in a child process of this module;
    once ``sparsedecomp train-heads`` lands, return (the phases recorded from inside are then absent)::

        ["sparsedecomp", "train-heads", "--model", world.model_dir, "--layer", str(LAYER),
         "--tokens", world.tokens_file, "--architecture", settings.architecture, "--d-sae", str(settings.d_sae),
         "--k", str(settings.k), "--training-tokens", str(settings.training_tokens), "--out", str(out_dir)]
    """
    job = {"tool": "ours", "settings": settings_record(settings), "world": asdict(world), "out_dir": str(out_dir),
           "result_file": str(result_file)}
    return [sys.executable, "-m", "benchmarks.train_heads_speed", "--child", json.dumps(job)]


def saelens_command(settings: Settings, world: World, head: int, out_dir: Path, result_file: Path) -> list[str]:
    job = {"tool": "saelens", "head": head, "settings": settings_record(settings), "world": asdict(world),
           "out_dir": str(out_dir), "result_file": str(result_file)}
    return [sys.executable, "-m", "benchmarks.train_heads_speed", "--child", json.dumps(job)]


def settings_record(settings: Settings) -> dict:
    return {**asdict(settings), "heads": None if settings.heads is None else list(settings.heads)}


def settings_from_record(record: dict) -> Settings:
    heads = record.get("heads")
    return Settings(**{**record, "heads": None if heads is None else tuple(heads)})


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p),
                "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TQDM_DISABLE": "1",
                "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
                "TOKENIZERS_PARALLELISM": "false"})
    return env


def run_process(command: list[str], threads: int, result_file: Path) -> dict:
    """Run one tool's process to completion; its wall time from outside, its CPU seconds, the load around it and
    what it recorded from inside (``result_file``, absent for an external command)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load_before = os.getloadavg()
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=child_env(threads), capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{command[:4]} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    inside = json.loads(result_file.read_text()) if result_file.is_file() else {}
    return {"wall_s": wall, "cpu_s": cpu, "cores_busy": cpu / wall, "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(), **inside}


# -- inside the child processes -------------------------------------------------------------------------------------
class _Clock:
    def __init__(self) -> None:
        self.spans: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.spans[name] = self.spans.get(name, 0.0) + seconds


def _timed(clock: _Clock, name: str, function):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            clock.add(name, time.perf_counter() - start)
    return wrapper


def _count_forward_tokens(model) -> dict:
    """Tokens through the model's embedding (every forward pass), by a plain torch forward hook."""
    counter = {"tokens": 0}

    def hook(module, inputs, output):
        counter["tokens"] += int(inputs[0].numel())

    model.embed.register_forward_hook(hook)
    return counter


def child_ours(job: dict) -> dict:
    import torch

    settings = settings_from_record(job["settings"])
    torch.set_num_threads(settings.threads)
    clock = _Clock()
    start = time.perf_counter()
    from sae_lens.training.multi_sae_trainer import MultiSAETrainer

    from sparsedecomp.loading import load_model
    from sparsedecomp.loading.tokens import load_tokens_file
    from sparsedecomp.training.heads import HeadTrainingSpec, save_head_saes, train_head_saes
    clock.add("imports", time.perf_counter() - start)

    trained: dict = {}
    fit = MultiSAETrainer.fit

    def recording_fit(self):
        saes = fit(self)
        trained.update({
            "tokens_per_head": {name: t.n_training_samples for name, t in self.trainers.items()},
            "steps": self.n_training_steps, "norm_batches": self.cfg.n_batches_for_norm_estimate})
        return saes

    MultiSAETrainer.fit = recording_fit
    estimate = MultiSAETrainer._estimate_scaling_factors
    MultiSAETrainer._estimate_scaling_factors = _timed(clock, "norm_estimate", estimate)

    start = time.perf_counter()
    loaded = load_model(Path(job["world"]["model_dir"]))
    tokens = load_tokens_file(job["world"]["tokens_file"])
    forwarded = _count_forward_tokens(loaded.model)
    clock.add("setup", time.perf_counter() - start)

    def spec(training_tokens: int) -> HeadTrainingSpec:
        return HeadTrainingSpec(architecture=settings.architecture, d_sae=settings.d_sae,
                                training_tokens=training_tokens, batch_size=settings.batch_size, lr=settings.lr,
                                k=settings.k, normalize_activations=settings.normalize_activations,
                                buffer_batches=settings.buffer_batches, seed=settings.seed)

    if settings.warmup_tokens:
        start = time.perf_counter()
        train_head_saes(loaded.model, tokens, layer=LAYER, spec=spec(settings.warmup_tokens), heads=settings.heads)
        clock.add("warmup", time.perf_counter() - start)
        clock.spans.pop("norm_estimate", None)
        forwarded["tokens"] = 0
    start = time.perf_counter()
    saes = train_head_saes(loaded.model, tokens, layer=LAYER, spec=spec(settings.training_tokens),
                           heads=settings.heads)
    clock.add("train", time.perf_counter() - start)
    start = time.perf_counter()
    save_head_saes(saes, job["out_dir"], processing=loaded.flags.as_kwargs())
    clock.add("save", time.perf_counter() - start)
    return {"phases_s": clock.spans, "tokens_forwarded": forwarded["tokens"], "torch_threads": torch.get_num_threads(),
            **trained}


def child_saelens(job: dict) -> dict:
    import torch

    settings = settings_from_record(job["settings"])
    head = int(job["head"])
    torch.set_num_threads(settings.threads)
    clock = _Clock()
    start = time.perf_counter()
    from datasets import Dataset
    from safetensors.torch import load_file
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig
    from sae_lens.registry import get_sae_training_class
    from sae_lens.training.activation_scaler import ActivationScaler
    from sae_lens.training.sae_trainer import SAETrainer

    from sparsedecomp.loading import load_model
    clock.add("imports", time.perf_counter() - start)

    trained: dict = {}
    fit = SAETrainer.fit

    def recording_fit(self):
        sae = fit(self)
        trained.update({"tokens_per_head": {f"head_{head}": self.n_training_samples},
                        "steps": self.n_training_steps, "norm_batches": self.cfg.n_batches_for_norm_estimate})
        return sae

    SAETrainer.fit = recording_fit
    ActivationScaler.estimate_scaling_factor = _timed(clock, "norm_estimate", ActivationScaler.estimate_scaling_factor)

    start = time.perf_counter()
    loaded = load_model(Path(job["world"]["model_dir"]))
    model = loaded.model
    tokens = load_file(job["world"]["tokens_file"])["tokens"]
    dataset = Dataset.from_dict({"tokens": tokens.tolist()})
    forwarded = _count_forward_tokens(model)
    _, sae_config_class = get_sae_training_class(settings.architecture)
    sae_options: dict[str, Any] = {"normalize_activations": settings.normalize_activations}
    if settings.k is not None:
        sae_options["k"] = settings.k
    cfg = LanguageModelSAERunnerConfig(
        sae=sae_config_class(d_in=model.cfg.d_head, d_sae=settings.d_sae, **sae_options),
        model_name=model.cfg.model_name,
        hook_name=f"blocks.{LAYER}.attn.hook_z",
        hook_head_index=head,
        is_dataset_tokenized=True,
        streaming=False,
        context_size=settings.context_size,
        prepend_bos=True,  # the contexts hold their BOS already; a pretokenised dataset is used as it is
        n_batches_in_buffer=settings.saelens_buffer_contexts,
        store_batch_size_prompts=int(job["world"]["forward_contexts"]),
        training_tokens=settings.training_tokens,
        train_batch_size_tokens=settings.batch_size,
        lr=settings.lr,
        n_batches_for_norm_estimate=settings.norm_batches,
        device="cpu",
        seed=settings.seed,
        logger=LoggingConfig(log_to_wandb=False),
        n_checkpoints=0,
        checkpoint_path=None,
        output_path=str(job["out_dir"]),
        verbose=False,
        model_from_pretrained_kwargs=loaded.flags.as_kwargs(),
    )
    torch.manual_seed(settings.seed)  # the runner does not use cfg.seed: the SAE's initialisation
    runner = LanguageModelSAETrainingRunner(cfg, override_dataset=dataset, override_model=model)
    runner.save_final_sae = _timed(clock, "save", runner.save_final_sae)
    clock.add("setup", time.perf_counter() - start)
    start = time.perf_counter()
    runner.run()
    clock.add("train", time.perf_counter() - start)
    clock.spans["train"] -= clock.spans.get("save", 0.0)  # run() = norm estimate + training + save
    return {"phases_s": clock.spans, "tokens_forwarded": forwarded["tokens"], "torch_threads": torch.get_num_threads(),
            "contexts_read": runner.activations_store.n_dataset_processed, **trained}


def _peak_rss_mib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def child(job_text: str) -> None:
    job = json.loads(job_text)
    result = child_ours(job) if job["tool"] == "ours" else child_saelens(job)
    result["peak_rss_mib"] = _peak_rss_mib()
    Path(job["result_file"]).write_text(json.dumps(result, indent=2))


# -- the written SAEs ----------------------------------------------------------------------------------------------
def sae_folder_shapes(folder: Path) -> dict:
    """What an SAE folder (SAELens 6 inference layout, either tool) holds: its config's sizes and weight shapes."""
    from safetensors import safe_open

    cfg = json.loads((folder / "cfg.json").read_text())
    with safe_open(str(folder / "sae_weights.safetensors"), framework="pt") as f:
        shapes = {name: list(f.get_slice(name).get_shape()) for name in f.keys()}
    metadata = cfg.get("metadata", {})
    return {"architecture": cfg.get("architecture"), "d_in": cfg.get("d_in"), "d_sae": cfg.get("d_sae"),
            "hook_name": metadata.get("hook_name"), "hook_head_index": metadata.get("hook_head_index"),
            "weights": shapes}


# -- the parent ----------------------------------------------------------------------------------------------------
def environment(settings: Settings) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    def package(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(), "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads_per_process": settings.threads, "device": "cpu", "torch": torch.__version__,
        "sae_lens": package("sae-lens"), "transformer_lens": package("transformer-lens"),
        "datasets": package("datasets"), "commit": git("rev-parse", "HEAD"),
        "dirty": None if status is None else bool(status),
        "note": "shared machine: other processes may have used the same cores; see each run's cores_busy and "
                "loadavg",
    }


def summarise(settings: Settings, world: World, runs: dict) -> dict:
    heads = list(settings.heads if settings.heads is not None else range(world.n_heads))
    tokens = settings.training_tokens
    summary: dict[str, Any] = {"heads": heads, "training_tokens_per_head": tokens}
    if runs.get("saelens"):
        walls = [r["wall_s"] for r in runs["saelens"].values()]
        train = [r.get("phases_s", {}).get("train") for r in runs["saelens"].values()]
        summary["saelens"] = {
            "runs": len(walls), "wall_s": sum(walls), "wall_s_per_run": walls,
            "train_s": sum(t for t in train if t is not None),
            "s_per_1M_tokens_all_heads": seconds_per_million(sum(walls), tokens),
            "s_per_1M_tokens_per_run": seconds_per_million(sum(walls) / len(walls), tokens),
        }
    if runs.get("ours"):
        walls = [r["wall_s"] for r in runs["ours"]]
        trains = [r.get("phases_s", {}).get("train") for r in runs["ours"]]
        norms = [r.get("phases_s", {}).get("norm_estimate", 0.0) for r in runs["ours"]]
        summary["ours"] = {
            "runs": len(walls), "wall_s": walls, "mean_wall_s": sum(walls) / len(walls),
            "s_per_1M_tokens_all_heads": [seconds_per_million(w, tokens) for w in walls],
        }
        if all(t is not None for t in trains):
            summary["ours"].update({
                "train_s": trains, "norm_estimate_s": norms,
                "train_s_per_1M_tokens": [seconds_per_million(t, tokens) for t in trains],
                "train_excluding_norm_estimate_s_per_1M_tokens":
                    [seconds_per_million(t - n, tokens) for t, n in zip(trains, norms)],
            })
    equal = equal_work(settings, runs)
    summary["equal_work"] = equal
    if "saelens" in summary and "ours" in summary and equal["ok"]:
        base = summary["saelens"]["wall_s"]
        summary["ratio_wall"] = {"vs_mean_ours": ratio(base, summary["ours"]["mean_wall_s"]),
                                 "vs_each_ours": [ratio(base, w) for w in summary["ours"]["wall_s"]]}
        ours_train = summary["ours"].get("train_s")
        if ours_train and all(r.get("phases_s", {}).get("train") is not None for r in runs["saelens"].values()):
            summary["ratio_train_in_process"] = ratio(summary["saelens"]["train_s"],
                                                      sum(ours_train) / len(ours_train))
    return summary


def equal_work(settings: Settings, runs: dict) -> dict:
    """Whether both tools trained the same tokens per head, with the same norm-estimate batches, into SAEs of the
    same shapes (recorded by the processes and read back from the written folders)."""
    problems: list[str] = []
    per_tool: dict[str, dict] = {}
    for tool, records in (("saelens", list(runs.get("saelens", {}).values())), ("ours", runs.get("ours", []))):
        tokens: dict[str, int] = {}
        shapes: dict[str, Any] = {}
        norm = set()
        for record in records:
            tokens.update(record.get("tokens_per_head", {}))
            shapes.update({h: s["weights"] for h, s in record.get("saes", {}).items()})
            if "norm_batches" in record:
                norm.add(record["norm_batches"])
        for head, count in tokens.items():
            if count != settings.training_tokens:
                problems.append(f"{tool} trained {count} tokens on {head}, not {settings.training_tokens}")
        per_tool[tool] = {"tokens_per_head": tokens, "shapes": shapes, "norm_batches": sorted(norm)}
    if "saelens" in per_tool and per_tool["saelens"]["shapes"] and per_tool["ours"]["shapes"]:
        a, b = per_tool["saelens"], per_tool["ours"]
        if a["shapes"] != b["shapes"]:
            problems.append(f"SAE shapes differ: saelens {a['shapes']} vs ours {b['shapes']}")
        if a["tokens_per_head"] and b["tokens_per_head"] and a["tokens_per_head"] != b["tokens_per_head"]:
            problems.append("tokens per head differ")
        if a["norm_batches"] != b["norm_batches"]:
            problems.append(f"norm-estimate batches differ: {a['norm_batches']} vs {b['norm_batches']}")
    return {"ok": not problems, "problems": problems, **per_tool}


def run_benchmark(settings: Settings, tool: str, out: Path | None, *, ours_repeats: int = 2,
                  workdir: Path | None = None, log=print) -> dict:
    settings.check()
    own_workdir = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="train_heads_speed-")) if workdir is None else Path(workdir)
    try:
        world = prepare_world(settings, workdir)
        heads = list(settings.heads if settings.heads is not None else range(world.n_heads))
        log(f"{settings.size}: {len(heads)} heads of {world.d_head}, {settings.training_tokens:,} training tokens per "
            f"SAE, {world.n_contexts:,} contexts of {settings.context_size} written, {world.forward_contexts} "
            f"contexts per forward pass, {settings.threads} torch threads a process")
        runs: dict[str, Any] = {}

        def ours_run(index: int) -> None:
            out_dir = workdir / f"ours-{index}"
            result = workdir / f"ours-{index}.json"
            record = run_process(ours_command(settings, world, out_dir, result), settings.threads, result)
            record["saes"] = {f"head_{h}": sae_folder_shapes(out_dir / f"head_{h}") for h in heads}
            runs.setdefault("ours", []).append(record)
            log(f"  ours (all {len(heads)} heads, one process): {record['wall_s']:.1f} s wall, "
                f"{record['cores_busy']:.2f} cores busy")

        repeats = ours_repeats if tool == "both" else 1
        if tool in ("ours", "both"):
            ours_run(0)
        if tool in ("saelens", "both"):
            runs["saelens"] = {}
            for h in heads:
                out_dir = workdir / f"saelens-head_{h}"
                result = workdir / f"saelens-head_{h}.json"
                record = run_process(saelens_command(settings, world, h, out_dir, result), settings.threads, result)
                record["saes"] = {f"head_{h}": sae_folder_shapes(out_dir)}
                runs["saelens"][f"head_{h}"] = record
                log(f"  SAELens head {h}: {record['wall_s']:.1f} s wall, {record['cores_busy']:.2f} cores busy")
        for index in range(1, repeats):
            ours_run(index)
        report = {"benchmark": "train_heads_speed", "tool": tool, "settings": settings_record(settings),
                  "derived": {"norm_estimate_batches": settings.norm_batches, "buffer_rows": settings.buffer_rows,
                              "saelens_n_batches_in_buffer": settings.saelens_buffer_contexts,
                              "saelens_store_batch_size_prompts": world.forward_contexts},
                  "world": world.description, "environment": environment(settings), "runs": runs,
                  "summary": summarise(settings, world, runs)}
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            path = out / f"train_heads_speed-{settings.size}-{time.strftime('%Y%m%d-%H%M%S')}.json"
            path.write_text(json.dumps(report, indent=2) + "\n")
            report["path"] = str(path)
        log(markdown(report))
        return report
    finally:
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def markdown(report: dict) -> str:
    s = report["summary"]
    st = report["settings"]
    lines = [f"### train_heads_speed, {st['size']}: {len(s['heads'])} heads, {st['architecture']} d_sae {st['d_sae']} "
             f"k {st['k']}, batch {st['batch_size']}, lr {st['lr']}, {s['training_tokens_per_head']:,} training "
             f"tokens per SAE, {report['derived']['norm_estimate_batches']} norm-estimate batches",
             "", "| tool | processes | wall s | s per 1M training tokens (all heads) | in-process training s |",
             "|---|---|---|---|---|"]
    if "saelens" in s:
        b = s["saelens"]
        lines.append(f"| SAELens, one run per head | {b['runs']} | {b['wall_s']:.1f} | "
                     f"{b['s_per_1M_tokens_all_heads']:.0f} | {b['train_s']:.1f} |")
    if "ours" in s:
        o = s["ours"]
        for i, wall in enumerate(o["wall_s"]):
            train = o.get("train_s", [None] * len(o["wall_s"]))[i]
            lines.append(f"| ours, one pass (run {i + 1}) | 1 | {wall:.1f} | {o['s_per_1M_tokens_all_heads'][i]:.0f} | "
                         f"{'-' if train is None else f'{train:.1f}'} |")
    lines.append("")
    if "ratio_wall" in s:
        r = s["ratio_wall"]
        lines.append(f"wall-time ratio SAELens / ours: {r['vs_mean_ours']:.2f} (against each run of ours: "
                     + ", ".join(f"{x:.2f}" for x in r["vs_each_ours"]) + ")")
    if "ratio_train_in_process" in s:
        lines.append(f"in-process training ratio: {s['ratio_train_in_process']:.2f}")
    if "ours" in s and "train_excluding_norm_estimate_s_per_1M_tokens" in s["ours"]:
        o = s["ours"]
        lines.append("ours, in process: train " + ", ".join(f"{x:.0f}" for x in o["train_s_per_1M_tokens"])
                     + " s per 1M tokens; without the norm estimate "
                     + ", ".join(f"{x:.0f}" for x in o["train_excluding_norm_estimate_s_per_1M_tokens"]))
    if not s["equal_work"]["ok"]:
        lines.append("NOT EQUAL WORK (no ratio): " + "; ".join(s["equal_work"]["problems"]))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=tuple(SIZES), default="demo")
    parser.add_argument("--tool", choices=("ours", "saelens", "both"), default=None,
                        help="default: both at demo size, ours at gelu-2l size")
    parser.add_argument("--training-tokens", type=int, default=None, help="per SAE (default: per size)")
    parser.add_argument("--architecture", default="batchtopk", choices=("standard", "jumprelu", "topk", "batchtopk"))
    parser.add_argument("--d-sae", type=int, default=None)
    parser.add_argument("--k", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None, help="rows a training step (default: per size)")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--buffer-batches", type=int, default=None, help="mixing buffer, in training batches")
    parser.add_argument("--heads", type=int, nargs="+", default=None, help="default: every head")
    parser.add_argument("--threads", type=int, default=None, help="torch threads a process (default: all cores)")
    parser.add_argument("--warmup-tokens", type=int, default=None, help="ours: untimed warm-up training first")
    parser.add_argument("--ours-repeats", type=int, default=2,
                        help="with --tool both: runs of ours around the baseline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the model, tokens and SAEs here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> Settings:
    defaults = SIZES[args.size]
    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    architecture = args.architecture
    k = args.k if args.k is not None else defaults["k"]
    return Settings(
        size=args.size, architecture=architecture, d_sae=args.d_sae or defaults["d_sae"],
        k=k if architecture in ("topk", "batchtopk") else None, batch_size=args.batch_size or defaults["batch_size"],
        lr=args.lr, training_tokens=args.training_tokens or defaults["training_tokens"],
        buffer_batches=args.buffer_batches or defaults["buffer_batches"],
        seed=args.seed, context_size=defaults["context_size"],
        heads=None if args.heads is None else tuple(args.heads), threads=threads,
        warmup_tokens=defaults["warmup_tokens"] if args.warmup_tokens is None else args.warmup_tokens)


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.child is not None:
        child(args.child)
        return None
    settings = settings_from_args(args)
    tool = args.tool or ("both" if args.size == "demo" else "ours")
    return run_benchmark(settings, tool, args.out, ours_repeats=args.ours_repeats, workdir=args.workdir)


if __name__ == "__main__":
    main()
