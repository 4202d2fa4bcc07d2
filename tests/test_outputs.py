"""The run writer: atomic files, strict JSON, a manifest, and one run per folder."""

import json
import math

import pytest
import torch

from sparsedecomp.errors import InputError
from sparsedecomp.outputs import MANIFEST_NAME, RunWriter, dumps_strict


def test_strict_json_turns_non_finite_numbers_into_null():
    text = dumps_strict({"a": float("nan"), "b": [1.0, float("inf")], "t": torch.tensor([0.5, float("-inf")])})
    assert json.loads(text) == {"a": None, "b": [1.0, None], "t": [0.5, None]}
    assert "NaN" not in text and "Infinity" not in text
    with pytest.raises(TypeError, match="not JSON serialisable: object"):
        dumps_strict({"x": object()})


def test_manifest_lists_files_and_a_later_run_removes_stale_ones(tmp_path):
    out = tmp_path / "run"
    with RunWriter(out, command="test") as w:
        w.write_text("codes_z.txt", "z")
        w.write_text("codes_residual.txt", "r")
        w.write_json("summary.json", {"spaces": ["z", "residual"]})
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["complete"] and set(manifest["files"]) == {"codes_z.txt", "codes_residual.txt", "summary.json"}
    with RunWriter(out, command="test") as w:
        w.write_text("codes_z.txt", "z2")
        w.write_json("summary.json", {"spaces": ["z"]})
    assert not (out / "codes_residual.txt").exists()  # the earlier run's file would contradict the summary
    assert sorted(p.name for p in out.iterdir()) == ["codes_z.txt", MANIFEST_NAME, "summary.json"]


def test_interrupted_write_keeps_the_old_file_and_marks_the_run_incomplete(tmp_path):
    out = tmp_path / "run"
    with RunWriter(out, command="test") as w:
        w.write_json("summary.json", {"old": True})

    def half_then_crash(path):
        path.write_text('{"new": tr')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        with RunWriter(out, command="test") as w:
            w.write_with("summary.json", half_then_crash)
    assert json.loads((out / "summary.json").read_text()) == {"old": True}
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME, "summary.json"]  # no temporary left behind
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["complete"] is False and "summary.json" in manifest["files"]


def test_refuses_foreign_folders_files_and_bad_names(tmp_path):
    (tmp_path / "theirs.txt").write_text("x")
    with pytest.raises(InputError, match="not empty"):
        RunWriter(tmp_path, command="test")
    with pytest.raises(InputError, match="existing file"):
        RunWriter(tmp_path / "theirs.txt", command="test")
    with RunWriter(tmp_path / "new", command="test") as w:
        with pytest.raises(InputError, match="plain file name"):
            w.write_text("../escape.txt", "x")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(InputError, match="not a readable sparsedecomp manifest"):
        RunWriter(tmp_path / "bad", command="test")


def test_json_numbers_survive_exactly():
    value = {"x": 0.1 + 0.2, "n": 2**40, "neg": -1e-300}
    back = json.loads(dumps_strict(value))
    assert back["x"] == 0.1 + 0.2 and back["n"] == 2**40 and math.isclose(back["neg"], -1e-300)


def test_files_of_an_interrupted_run_are_cleaned_by_the_next_complete_run(tmp_path):
    """Run 1 writes z; run 2 writes residual codes, then dies; run 3 writes z only: no residual codes remain."""
    out = tmp_path / "run"
    with RunWriter(out, command="test") as w:
        w.write_text("codes_z.txt", "z")
    with pytest.raises(KeyboardInterrupt):
        with RunWriter(out, command="test") as w:
            w.write_text("codes_residual.txt", "r")
            (out / ".summary.json.abc.sparsedecomp-tmp").write_text("half")  # what a kill mid-write leaves
            raise KeyboardInterrupt
    assert "codes_residual.txt" in json.loads((out / MANIFEST_NAME).read_text())["files"]
    with RunWriter(out, command="test") as w:
        w.write_text("codes_z.txt", "z3")
    assert sorted(p.name for p in out.iterdir()) == ["codes_z.txt", MANIFEST_NAME]


def test_an_unwritable_output_folder_is_refused_before_any_work(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(InputError, match="is a file, not a folder"):
        RunWriter(tmp_path / "afile" / "sub", command="test")
