"""The per-head training benchmark (benchmarks/train_heads_speed.py): settings at equal work, the equal-work check,
and a tiny end-to-end run of both tools in fresh processes."""

from __future__ import annotations

import json

import pytest

from benchmarks import train_heads_speed as bench
from benchmarks.train_heads_speed import Settings


def test_demo_defaults_are_the_issue_settings():
    settings = bench.settings_from_args(bench.parse_args(["--size", "demo", "--threads", "2"]))
    assert (settings.architecture, settings.d_sae, settings.k, settings.batch_size, settings.lr) == (
        "batchtopk", 256, 8, 4096, 3e-4)
    assert settings.context_size == 128 and settings.heads is None and settings.threads == 2
    gelu = bench.settings_from_args(bench.parse_args(["--size", "gelu-2l", "--training-tokens", "8192"]))
    assert (gelu.d_sae, gelu.context_size, gelu.training_tokens, gelu.warmup_tokens) == (2048, 1024, 8192, 8192)
    # k only goes to the architectures that take it
    standard = bench.settings_from_args(bench.parse_args(["--size", "demo", "--architecture", "standard"]))
    assert standard.k is None


def test_saelens_buffer_holds_as_many_rows_as_ours():
    settings = Settings(size="demo", batch_size=4096, buffer_batches=16, context_size=128)
    # SAELens 6: buffer rows = n_batches_in_buffer * training_context_size
    assert settings.saelens_buffer_contexts * settings.context_size == settings.buffer_rows == 65536
    assert settings.saelens_buffer_contexts == 512
    with pytest.raises(SystemExit, match="multiple of the context size"):
        Settings(size="demo", batch_size=100, buffer_batches=1, context_size=128).check()


def test_norm_batches_follow_train_head_saes():
    from sparsedecomp.training import HeadTrainingSpec

    # SAELens's runs get the number of norm-estimate batches ours uses (its trainer config's).
    for tokens in (4096, 5 * 4096, 30 * 4096, 10**7):
        ours = HeadTrainingSpec("batchtopk", d_sae=256, k=8, training_tokens=tokens, batch_size=4096)
        assert Settings(size="demo", training_tokens=tokens).norm_batches == ours.trainer_config(
            device="cpu").n_batches_for_norm_estimate
    assert Settings(size="demo", training_tokens=10**7).norm_batches == 10
    assert Settings(size="demo", training_tokens=4096).norm_batches == 1


def test_enough_contexts_that_neither_tool_starts_over():
    settings = Settings(size="demo", training_tokens=30 * 4096, batch_size=4096, buffer_batches=16, context_size=128)
    n = bench.contexts_needed(settings, forward_contexts=372)
    assert n * 128 >= 30 * 4096 + 10 * 4096 + 65536 + 2 * 372 * 128


def _record(tokens: int, shape: list[int], norm: int = 8, head: str = "head_0") -> dict:
    return {"tokens_per_head": {head: tokens}, "norm_batches": norm,
            "saes": {head: {"weights": {"W_enc": shape, "W_dec": shape[::-1]}}}}


def test_equal_work_check_refuses_unequal_runs():
    settings = Settings(size="tiny", training_tokens=2048, batch_size=256, buffer_batches=4, context_size=64)
    same = {"saelens": {"head_0": _record(2048, [8, 16])}, "ours": [_record(2048, [8, 16])]}
    assert bench.equal_work(settings, same)["ok"]
    fewer_tokens = {"saelens": {"head_0": _record(1792, [8, 16])}, "ours": [_record(2048, [8, 16])]}
    assert not bench.equal_work(settings, fewer_tokens)["ok"]
    other_shape = {"saelens": {"head_0": _record(2048, [8, 32])}, "ours": [_record(2048, [8, 16])]}
    assert "shapes differ" in " ".join(bench.equal_work(settings, other_shape)["problems"])
    other_norm = {"saelens": {"head_0": _record(2048, [8, 16], norm=1000)}, "ours": [_record(2048, [8, 16])]}
    assert not bench.equal_work(settings, other_norm)["ok"]


@pytest.mark.slow
def test_tiny_run_trains_the_same_tokens_into_the_same_shapes(tmp_path):
    """Both tools for real (3 fresh processes, about 40 s on 2 cores): 2 heads of the tiny model."""
    settings = Settings(size="tiny", d_sae=16, k=4, training_tokens=2048, batch_size=256, buffer_batches=4,
                        context_size=64, heads=(0, 1), threads=2)
    report = bench.run_benchmark(settings, "both", tmp_path / "results", ours_repeats=1, log=lambda *_: None)
    summary = report["summary"]
    equal = summary["equal_work"]
    assert equal["ok"], equal["problems"]
    for tool in ("saelens", "ours"):
        assert equal[tool]["tokens_per_head"] == {"head_0": 2048, "head_1": 2048}
        assert equal[tool]["norm_batches"] == [8]
        assert equal[tool]["shapes"]["head_0"]["W_enc"] == [8, 16]
        assert equal[tool]["shapes"]["head_1"]["W_dec"] == [16, 8]
    assert equal["saelens"]["shapes"] == equal["ours"]["shapes"]
    # the folders say which head and hook each SAE reads, on both sides
    saelens_runs, ours_run = report["runs"]["saelens"], report["runs"]["ours"][0]
    for h in (0, 1):
        for saes in (saelens_runs[f"head_{h}"]["saes"], ours_run["saes"]):
            assert saes[f"head_{h}"]["hook_head_index"] == h
            assert saes[f"head_{h}"]["hook_name"] == "blocks.1.attn.hook_z"
            assert saes[f"head_{h}"]["d_sae"] == 16
    # the one pass of ours forwards the training tokens (whole blocks of contexts), no more than one SAELens run does
    assert 2 * 2048 >= ours_run["tokens_forwarded"] >= 2048
    assert all(r["tokens_forwarded"] >= ours_run["tokens_forwarded"] for r in saelens_runs.values())
    assert summary["ratio_wall"]["vs_mean_ours"] > 0
    assert summary["saelens"]["runs"] == 2 and summary["ours"]["runs"] == 1
    written = json.loads((tmp_path / "results").glob("train_heads_speed-tiny-*.json").__next__().read_text())
    assert written["summary"]["equal_work"]["ok"] and written["environment"]["torch_threads_per_process"] == 2
