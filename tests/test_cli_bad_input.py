"""Bad inputs against the command line, one test per item of an independent catalogue of them: each is refused
with exit status 2 and one line naming the problem (or an argparse usage error for a flag's own value), before any
work it would waste, or behaves as documented. Most run on the tiny offline stand-in (real on-disk formats, random
weights); the head-order check needs SAEs trained on their heads, so it runs on the demo world."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks.standins import TINY, write_standin
from sparsedecomp.cli import main

HEAD_D_SAE, CONCAT_D_SAE, N_CONTEXTS = 48, 128, 2


# -- fixtures and helpers ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    return write_standin(tmp_path_factory.mktemp("standin"), config=TINY, head_d_sae=HEAD_D_SAE,
                         concat_d_sae=CONCAT_D_SAE, n_rows=6, record_local_dataset=True)


def saes(standin, concat_dir=None) -> list[str]:
    return ["--concat-sae", str(concat_dir or standin.concat_dir), "--concat-version", standin.concat_version,
            "--head-saes", *map(str, standin.head_runs)]


def with_model(standin, model_dir=None) -> list[str]:
    return ["--model", str(model_dir or standin.model_dir)]


def evaluate_argv(standin, out, *extra, concat_dir=None, model_dir=None) -> list[str]:
    """A small evaluate of the stand-in: 2 contexts of its recorded dataset, pinv only."""
    return ["evaluate", *saes(standin, concat_dir), *with_model(standin, model_dir), "--n-contexts", str(N_CONTEXTS),
            "--bos-token-id", "0", "--methods", "pinv", "--top-k", "5", "--no-progress", "--out", str(out), *extra]


def decompose_argv(standin, out, *extra) -> list[str]:
    return ["decompose", *saes(standin), "--n-nonzero", "4", "--no-progress", "--out", str(out), *extra]


def refused(capsys, argv, *messages) -> str:
    """Run ``argv``: exit status 2 with one ``sparsedecomp <cmd>: error: ...`` line holding every message; no
    traceback. Returns the line."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("sparsedecomp ")]
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith(f"sparsedecomp {argv[0]}: error: "), line
    for message in messages:
        assert message in line, line
    return line


def parser_refuses(capsys, argv, message) -> None:
    """argparse refuses ``argv`` (SystemExit 2, a usage error naming ``message``)."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err


@pytest.fixture
def no_work(monkeypatch):
    """Refuse-before-work checks: any solve, evaluation or dashboard write fails the test."""
    def ran(*args, **kwargs):
        raise AssertionError("work started before the input was refused")

    for target in ("sparsedecomp.jobs.solve.Decomposer.solve", "sparsedecomp.jobs.evaluate.run_evaluation",
                   "sparsedecomp.jobs.dashboard.write_dashboards", "sparsedecomp.jobs.decompose.run_decomposition"):
        try:
            monkeypatch.setattr(target, ran)
        except (ImportError, AttributeError):  # code without the job layer: nothing to guard
            pass


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def without_keys(value, keys=("timings_s", "elapsed_s")):
    if isinstance(value, dict):
        return {k: without_keys(v, keys) for k, v in value.items() if k not in keys}
    if isinstance(value, list):
        return [without_keys(v, keys) for v in value]
    return value


def write_model_folder(folder: Path, config: dict, *, seed: int = 0) -> Path:
    """A local model folder (config.json + model.safetensors) of ``config``, weights that match it."""
    from safetensors.torch import save_file
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    folder.mkdir(parents=True)
    model = HookedTransformer(HookedTransformerConfig(**config, seed=seed))
    (folder / "config.json").write_text(json.dumps({"hooked_transformer_config": config}))
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith((".IGNORE", ".mask"))}
    save_file(state, str(folder / "model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def evaluated(standin, tmp_path_factory):
    """An evaluate run of the stand-in (its folder)."""
    out = tmp_path_factory.mktemp("evaluated") / "eval"
    assert main(evaluate_argv(standin, out)) == 0
    return out


# -- 1 and 18: a context size of 0; a positional solver parameter ------------------------------------------------------
@pytest.mark.parametrize("command", ["dashboard", "evaluate", "decompose"])
def test_context_size_zero_is_refused_by_the_parser_in_every_command(standin, tmp_path, capsys, command):
    argv = [command, *saes(standin), *with_model(standin), "--dataset", str(standin.dataset_dir),
            "--context-size", "0", "--out", str(tmp_path / "o")]
    parser_refuses(capsys, argv, "argument --context-size: must be a positive integer")
    assert not (tmp_path / "o").exists()


def test_a_positional_solver_parameter_is_a_type_error():
    from sparsedecomp.errors import InputTypeError
    from sparsedecomp.solvers import make_solver

    with pytest.raises(InputTypeError, match="keyword parameters only"):
        make_solver("nn_lasso", 0.2)


# -- 2: BOS ids --------------------------------------------------------------------------------------------------------
def test_a_negative_bos_token_id_is_refused_by_the_parser(standin, tmp_path, capsys):
    parser_refuses(capsys, evaluate_argv(standin, tmp_path / "o", "--bos-token-id", "-1"),
                   "argument --bos-token-id: must be a non-negative integer")


def test_a_bos_token_id_beyond_the_vocabulary_is_refused_by_name(standin, tmp_path, capsys, no_work):
    argv = evaluate_argv(standin, tmp_path / "o")
    argv[argv.index("--bos-token-id") + 1] = "99999"
    refused(capsys, argv, "--bos-token-id 99999 is not in the model's vocabulary", f"d_vocab={TINY['d_vocab']}")


# -- 3: a negative head index ------------------------------------------------------------------------------------------
def test_a_negative_head_index_is_named(standin, tmp_path, capsys, no_work):
    refused(capsys, decompose_argv(standin, tmp_path / "o", "--head-index-map", "-1,0,1,2,3,4,5,6"),
            "--head-index-map", "'-1' is not a non-negative integer")
    assert not (tmp_path / "o").exists()


# -- 4: only BOS tokens ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["evaluate", "dashboard"])
def test_a_tokens_file_of_only_bos_tokens_is_refused(standin, tmp_path, capsys, no_work, command):
    from safetensors.torch import save_file

    tokens = tmp_path / "bos.safetensors"
    save_file({"tokens": torch.zeros(3, 16, dtype=torch.long)}, str(tokens))  # the stand-in's BOS is 0
    argv = [command, *saes(standin), *with_model(standin), "--tokens", str(tokens), "--bos-token-id", "0",
            "--methods", "pinv", "--no-progress", "--out", str(tmp_path / "o")]
    refused(capsys, argv, "--tokens", "holds only BOS tokens (id 0)")


def test_only_bos_tokens_by_the_models_own_tokenizer_are_refused(tmp_path, capsys, no_work):
    """The demo model has a tokenizer: its BOS is known without --bos-token-id."""
    from safetensors.torch import save_file

    from sparsedecomp.demo import ARTIFACTS_DIR, demo_tokens
    from sparsedecomp.demo.world import concat_sae_path, head_sae_sources

    bos = demo_tokens(1).bos_token_id
    tokens = tmp_path / "bos.safetensors"
    save_file({"tokens": torch.full((2, 16), bos, dtype=torch.long)}, str(tokens))
    folder, version = concat_sae_path()
    argv = ["evaluate", "--concat-sae", str(folder), "--concat-version", version, "--head-saes",
            *map(str, head_sae_sources().values()), "--model", str(ARTIFACTS_DIR / "model"), "--tokens", str(tokens),
            "--methods", "pinv", "--no-progress", "--out", str(tmp_path / "o")]
    refused(capsys, argv, f"holds only BOS tokens (id {bos})")


# -- 5: head SAEs out of place (the demo world's real SAEs and model) --------------------------------------------------
@pytest.fixture(scope="module")
def demo_eval_tokens(tmp_path_factory):
    from safetensors.torch import save_file

    from sparsedecomp.demo import demo_tokens

    path = tmp_path_factory.mktemp("demo-tokens") / "heldout8.safetensors"
    save_file({"tokens": demo_tokens(8).tokens.contiguous()}, str(path))
    return path


def _relabelled_head_runs(tmp_path: Path, swap: tuple[int, int]) -> list[Path]:
    """The demo's head folders with the head index recorded by heads ``swap``'s configs exchanged: head 0's SAE
    then says it is head 1's and the reverse (checkpoints whose configs name the wrong head)."""
    from sparsedecomp.demo.world import head_sae_sources

    sources = head_sae_sources()
    runs = [sources[h] for h in sorted(sources)]
    for h, other in (swap, swap[::-1]):
        copy = tmp_path / "heads" / runs[h].name
        shutil.copytree(runs[h], copy)
        for cfg_path in copy.rglob("cfg.json"):
            cfg = json.loads(cfg_path.read_text())
            assert cfg["metadata"]["hook_head_index"] == h  # SAELens 6, as train-heads writes it
            cfg["metadata"]["hook_head_index"] = other
            cfg_path.write_text(json.dumps(cfg))
        runs[h] = copy
    return runs


def _demo_request(head_runs, tokens_file):
    from sparsedecomp.demo import ARTIFACTS_DIR
    from sparsedecomp.demo.world import concat_sae_path
    from sparsedecomp.jobs.inputs import InputRequest, ModelRequest, SAERequest, TokenRequest

    folder, version = concat_sae_path()
    return InputRequest(saes=SAERequest(concat=str(folder), heads=tuple(map(str, head_runs)),
                                        concat_version=version),
                        model=ModelRequest(str(ARTIFACTS_DIR / "model")),
                        tokens=TokenRequest(tokens_file=tokens_file))


def test_head_saes_out_of_place_are_refused(demo_eval_tokens, tmp_path, capsys, no_work):
    from sparsedecomp.demo import ARTIFACTS_DIR
    from sparsedecomp.demo.world import concat_sae_path

    folder, version = concat_sae_path()
    runs = _relabelled_head_runs(tmp_path, (0, 1))
    argv = ["evaluate", "--concat-sae", str(folder), "--concat-version", version, "--head-saes", *map(str, runs),
            "--model", str(ARTIFACTS_DIR / "model"), "--tokens", str(demo_eval_tokens), "--methods", "pinv",
            "--no-progress", "--out", str(tmp_path / "o")]
    line = refused(capsys, argv, "the head SAEs look misplaced", "the SAE given for head 0 explains head 1's z",
                   "the SAE given for head 1 explains head 0's z")
    assert "head 2" not in line
    assert not (tmp_path / "o").exists()


def test_head_saes_listed_in_any_order_are_placed_by_their_recorded_heads(demo_eval_tokens):
    """`--head-saes HEAD1 HEAD0 HEAD2..7`: a list of checkpoints is keyed by the head each config records
    (documented for --head-saes / load_head_saes), so the swapped list is put in place, as the list in head order
    is; and the head-order check does not refuse the SAEs in their places."""
    from sparsedecomp.demo.world import head_sae_sources
    from sparsedecomp.jobs.inputs import load_saes, resolve_inputs

    sources = head_sae_sources()
    in_order = [sources[h] for h in sorted(sources)]
    swapped = [in_order[1], in_order[0], *in_order[2:]]
    request = _demo_request(swapped, demo_eval_tokens)
    _, placed = load_saes(request.saes, log=lambda message: None)
    assert [Path(str(sae.provenance["source"])).is_relative_to(run) for sae, run in zip(placed, in_order)] == \
        [True] * len(in_order)
    inputs = resolve_inputs(_demo_request(in_order, demo_eval_tokens), log=lambda message: None)
    assert list(inputs.head_saes.heads) == sorted(sources)


# -- 6: an evaluation of another concat SAE ----------------------------------------------------------------------------
def test_an_evaluation_of_another_concat_sae_is_refused(standin, evaluated, tmp_path, capsys, no_work):
    from sparsedecomp.loading import SAE, load_sae, save_kissane

    concat = load_sae(standin.concat_dir, version=standin.concat_version)
    other = SAE(W_enc=concat.W_enc.flip(1).contiguous(), b_enc=concat.b_enc.flip(0).contiguous(),
                W_dec=concat.W_dec.flip(0).contiguous(), b_dec=concat.b_dec, apply_b_dec_to_input=True,
                hook_name=concat.hook_name, layer=concat.layer, head="concatenated", model_name=concat.model_name)
    save_kissane(other, tmp_path / "other-concat", standin.concat_version, cfg_extra={"seq_len": TINY["n_ctx"]})
    argv = ["dashboard", *saes(standin, tmp_path / "other-concat"), *with_model(standin), "--n-contexts", "2",
            "--bos-token-id", "0", "--methods", "pinv", "--evaluation", str(evaluated), "--no-progress",
            "--out", str(tmp_path / "site")]
    refused(capsys, argv, "--evaluation", "evaluates another concat SAE")
    assert not (tmp_path / "site" / "index.html").exists()


# -- 7: demo flags without effect --------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, message", [
    (["--no-evaluate", "--eval-contexts", "8"], "--eval-contexts has no effect with --no-evaluate"),
    (["--no-dashboards", "--dashboard-split", "heldout"], "have no effect with --no-dashboards"),
    (["--no-dashboards", "--dashboard-contexts", "8"], "have no effect with --no-dashboards"),
])
def test_demo_flags_without_effect_are_refused(tmp_path, capsys, no_work, flags, message):
    refused(capsys, ["demo", *flags, "--no-progress", "--out", str(tmp_path / "o")], message)
    assert not (tmp_path / "o").exists()


# -- 8: a model of another shape ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def other_shape_model(tmp_path_factory):
    """The SAEs' model name with 4 heads of 16 dims instead of 8 of 8 (same d_model), weights that match."""
    return write_model_folder(tmp_path_factory.mktemp("other") / "model", {**TINY, "n_heads": 4, "d_head": 16})


@pytest.mark.parametrize("command", ["evaluate", "decompose"])
def test_a_model_of_another_shape_is_refused_by_name(standin, other_shape_model, tmp_path, capsys, no_work, command):
    if command == "evaluate":
        argv = evaluate_argv(standin, tmp_path / "o", model_dir=other_shape_model)
    else:
        argv = decompose_argv(standin, tmp_path / "o", "--space", "residual", *with_model(standin, other_shape_model))
    line = refused(capsys, argv, "the model's heads have d_head=16 but the SAEs read heads of width 8")
    assert "size mismatch" not in line
    assert not (tmp_path / "o").exists()


def test_weights_of_another_shape_than_the_config_are_named(standin, tmp_path, capsys, no_work):
    from safetensors.torch import load_file, save_file

    from sparsedecomp.loading import load_model
    from sparsedecomp.loading.errors import CheckpointError

    folder = tmp_path / "model"
    shutil.copytree(standin.model_dir, folder)
    state = load_file(str(folder / "model.safetensors"))
    expected = tuple(state["blocks.0.mlp.W_in"].shape)
    state["blocks.0.mlp.W_in"] = torch.zeros(TINY["d_model"], 2 * TINY["d_mlp"])
    save_file(state, str(folder / "model.safetensors"))
    got = (TINY["d_model"], 2 * TINY["d_mlp"])
    with pytest.raises(CheckpointError, match=re.escape(f"blocks.0.mlp.W_in has shape {got}")) as exc:
        load_model(folder)
    assert str(expected) in str(exc.value) and "model.safetensors" in str(exc.value)
    refused(capsys, decompose_argv(standin, tmp_path / "o", "--space", "residual", *with_model(standin, folder)),
            f"blocks.0.mlp.W_in has shape {got}", f"config.json gives {expected}")


# -- 9: a huge feature range -------------------------------------------------------------------------------------------
def test_a_huge_feature_range_is_refused_quickly(standin, tmp_path, capsys, no_work):
    t0 = time.time()
    refused(capsys, decompose_argv(standin, tmp_path / "o", "--features", "0-99999999999"),
            "features ['0-99999999999'] are out of range", f"the concat SAE has {CONCAT_D_SAE} features")
    assert time.time() - t0 < 20
    assert not (tmp_path / "o").exists()


# -- 10: memory budgets ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["inf", "nan", "0", "-1"])
def test_a_memory_budget_that_is_not_positive_and_finite_is_refused_by_the_parser(standin, tmp_path, capsys, value):
    parser_refuses(capsys, evaluate_argv(standin, tmp_path / "o", "--memory-budget-gb", value),
                   "argument --memory-budget-gb: must be a positive, finite number")


# -- 11: the meta device -----------------------------------------------------------------------------------------------
def test_the_meta_device_is_refused_by_name(standin, tmp_path, capsys, no_work):
    refused(capsys, evaluate_argv(standin, tmp_path / "o", "--device", "meta"), "device 'meta' holds no data")
    assert not (tmp_path / "o").exists()


# -- 12: --out a broken or looping link --------------------------------------------------------------------------------
def test_an_out_that_is_a_dangling_link_is_refused(standin, tmp_path, capsys, no_work):
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "gone")
    refused(capsys, decompose_argv(standin, link), f"the output folder {link} is a broken symbolic link")
    assert not (tmp_path / "gone").exists()


def test_an_out_that_is_a_looping_link_is_refused(standin, tmp_path, capsys, no_work):
    a, b = tmp_path / "a", tmp_path / "b"
    a.symlink_to(b)
    b.symlink_to(a)
    refused(capsys, decompose_argv(standin, a), f"the output folder {a} cannot be resolved")


# -- 13: top-k above the tokens ----------------------------------------------------------------------------------------
def test_a_top_k_above_the_tokens_is_refused_before_the_evaluation(standin, tmp_path, capsys, no_work):
    argv = evaluate_argv(standin, tmp_path / "o")
    argv[argv.index("--top-k") + 1] = "100000"
    n_tokens = N_CONTEXTS * TINY["n_ctx"]
    refused(capsys, argv, f"--top-k 100000 is more than the {n_tokens} tokens evaluated")
    assert not (tmp_path / "o" / "report.json").exists()


# -- 14: another command's folder --------------------------------------------------------------------------------------
def test_evaluate_into_a_decompose_folder_is_refused_and_leaves_it_untouched(standin, tmp_path, capsys):
    out = tmp_path / "dec"
    assert main(decompose_argv(standin, out)) == 0
    before = snapshot(out)
    assert {"summary.json", "index.html", "codes_z.safetensors", "manifest.json"} <= set(before)
    capsys.readouterr()
    refused(capsys, evaluate_argv(standin, out), f"the output folder {out} holds a `sparsedecomp decompose` run")
    assert snapshot(out) == before


def test_decompose_into_an_evaluate_folder_is_refused_and_leaves_it_untouched(standin, evaluated, tmp_path, capsys):
    before = snapshot(evaluated)
    assert {"report.json", "report.html", "manifest.json"} <= set(before)
    refused(capsys, decompose_argv(standin, evaluated), "holds a `sparsedecomp evaluate` run")
    assert snapshot(evaluated) == before


# -- 15: a dataset loading script --------------------------------------------------------------------------------------
def test_a_dataset_folder_with_a_loading_script_is_named(standin, tmp_path, capsys, no_work):
    folder = tmp_path / "myset"
    folder.mkdir()
    (folder / "myset.py").write_text(
        "import datasets\n\n"
        "class Myset(datasets.GeneratorBasedBuilder):\n"
        "    def _info(self):\n"
        "        return datasets.DatasetInfo(features=datasets.Features({'tokens': "
        "datasets.Sequence(datasets.Value('int64'))}))\n\n"
        "    def _split_generators(self, dl_manager):\n"
        "        return [datasets.SplitGenerator(name='train')]\n\n"
        "    def _generate_examples(self):\n"
        "        for i in range(4):\n"
        "            yield i, {'tokens': list(range(64))}\n")
    argv = ["decompose", *saes(standin), *with_model(standin), "--dataset", str(folder), "--bos-token-id", "0",
            "--n-contexts", "2", "--no-progress", "--out", str(tmp_path / "o")]
    refused(capsys, argv, f"dataset {str(folder)!r}", "loading script", "myset.py")


# -- 16: runs are reproducible -----------------------------------------------------------------------------------------
def test_identical_decompose_runs_write_identical_files(standin, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(decompose_argv(standin, a)) == 0
    assert main(decompose_argv(standin, b)) == 0
    summaries = [json.loads((out / "summary.json").read_text()) for out in (a, b)]
    assert without_keys(summaries[0]) == without_keys(summaries[1])
    # byte for byte, apart from the timing values
    timing = re.compile(r'"(timings_s|elapsed_s)":\s*(\{[^}]*\}|[0-9.eE+-]+)')
    texts = [timing.sub(r'"\1": T', (out / "summary.json").read_text()) for out in (a, b)]
    assert texts[0] == texts[1]
    assert (a / "codes_z.safetensors").read_bytes() == (b / "codes_z.safetensors").read_bytes()
    # the page, apart from the time it says the run took
    generated = re.compile(r"Generated by sparsedecomp in [0-9.]+ s\.")
    pages = [generated.sub("", (out / "index.html").read_text()) for out in (a, b)]
    assert pages[0] == pages[1]


def test_identical_evaluate_runs_write_identical_reports(standin, evaluated, tmp_path):
    again = tmp_path / "eval"
    assert main(evaluate_argv(standin, again)) == 0
    pages = [(out / "report.html").read_text() for out in (evaluated, again)]
    ids = [re.findall(r'id="([^"]+)" class="plotly-graph-div"', page) for page in pages]
    assert ids[0] and ids[0] == ids[1]
    timing = re.compile(r"Timings \(s\):[^<]*")
    assert timing.sub("", pages[0]) == timing.sub("", pages[1])
    reports = [json.loads((out / "report.json").read_text()) for out in (evaluated, again)]
    assert without_keys(reports[0]) == without_keys(reports[1])


# -- 17: a full disk ---------------------------------------------------------------------------------------------------
def test_a_full_disk_keeps_the_previous_complete_run(standin, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert main(decompose_argv(standin, out)) == 0
    before = snapshot(out)
    capsys.readouterr()

    def full(path, *args, **kwargs):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    from sparsedecomp import codes_file

    # every module of the package that writes codes files with it (the decompose job imports it by name)
    users = [module for name, module in list(sys.modules.items()) if name.split(".")[0] == "sparsedecomp"
             and getattr(module, "write_codes_file", None) is codes_file.write_codes_file]
    assert users
    for module in users:
        monkeypatch.setattr(module, "write_codes_file", full)
    line = refused(capsys, decompose_argv(standin, out, "--n-nonzero", "2"),
                   f"could not write {out / 'codes_z.safetensors'}", os.strerror(errno.ENOSPC),
                   "keeps its last complete run")
    assert snapshot(out) == before
    assert json.loads((out / "manifest.json").read_text())["complete"] is True
    assert "\n" not in line
