"""The one writer: atomic files, strict JSON, a manifest with SHA-256, the last complete run kept until the next
completes, one run per folder at a time, no other command's results lost."""

import errno
import hashlib
import json
import math
import multiprocessing
import os

import pytest
import torch

from sparsedecomp.errors import InputError, OutputError
from sparsedecomp.jsonio import dumps_strict
from sparsedecomp.outputs import LOCK_NAME, MANIFEST_NAME, RunWriter, check_output_folder


def _listing(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_strict_json_turns_non_finite_numbers_into_null():
    text = dumps_strict({"a": float("nan"), "b": [1.0, float("inf")], "t": torch.tensor([0.5, float("-inf")])})
    assert json.loads(text) == {"a": None, "b": [1.0, None], "t": [0.5, None]}
    assert "NaN" not in text and "Infinity" not in text
    with pytest.raises(TypeError, match="value.x holds a object, which is not JSON-ready"):
        dumps_strict({"x": object()})


def test_json_numbers_survive_exactly():
    value = {"x": 0.1 + 0.2, "n": 2**40, "neg": -1e-300}
    back = json.loads(dumps_strict(value))
    assert back["x"] == 0.1 + 0.2 and back["n"] == 2**40 and math.isclose(back["neg"], -1e-300)


def test_the_manifest_records_each_file_with_its_true_size_and_sha256(tmp_path):
    out = tmp_path / "run"
    with RunWriter(out, command="test") as w:
        w.write_text("summary.json", '{"a": 1}\n')
        w.write_bytes("pages/f/1.html", b"<p>one</p>")
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["complete"] is True and set(manifest["files"]) == {"summary.json", "pages/f/1.html"}
    for name, meta in manifest["files"].items():
        data = (out / name).read_bytes()
        assert meta == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert not (out / LOCK_NAME).exists()  # released and removed when the run completes


def test_a_later_run_removes_stale_files_and_the_folders_they_leave_empty(tmp_path):
    out = tmp_path / "run"
    with RunWriter(out, command="test") as w:
        w.write_text("codes_z.txt", "z")
        w.write_text("codes_residual.txt", "r")
        w.write_text("sub/page.html", "p")
    with RunWriter(out, command="test") as w:
        w.write_text("codes_z.txt", "z2")
    assert _listing(out) == ["codes_z.txt", MANIFEST_NAME]


def test_a_failed_run_leaves_the_last_complete_run_as_it_was(tmp_path):
    out = tmp_path / "run"
    with RunWriter(out, command="test") as w:
        w.write_json("summary.json", {"old": True})
        w.write_text("page.html", "old page")
    before = {name: (out / name).read_bytes() for name in _listing(out)}

    def half_then_crash(path):
        path.write_text('{"new": tr')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        with RunWriter(out, command="test") as w:
            w.write_text("page.html", "new page")  # written, not yet committed
            w.write_with("summary.json", half_then_crash)
    assert {name: (out / name).read_bytes() for name in _listing(out)} == before  # no temporary left either


def test_a_full_disk_names_the_file_and_keeps_the_last_complete_run(tmp_path):
    out = tmp_path / "run"
    with RunWriter(out, command="test") as w:
        w.write_json("summary.json", {"old": True})
    before = {name: (out / name).read_bytes() for name in _listing(out)}

    def no_space(path):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OutputError, match=r"could not write .*codes_z.safetensors: No space left on device; the "
                                          "folder keeps its last complete run"):
        with RunWriter(out, command="test") as w:
            w.write_json("summary.json", {"new": True})
            w.write_with("codes_z.safetensors", no_space)
    assert {name: (out / name).read_bytes() for name in _listing(out)} == before


def test_committed_checkpoints_are_listed_so_an_interrupted_run_is_cleaned_by_the_next(tmp_path):
    """Run 1 writes z; run 2 commits residual codes, then dies; run 3 writes z only: no residual codes remain."""
    out = tmp_path / "run"
    with RunWriter(out, command="test") as w:
        w.write_text("codes_z.txt", "z")
    with pytest.raises(KeyboardInterrupt):
        with RunWriter(out, command="test") as w:
            w.write_text("codes_residual.txt", "r")
            w.commit()
            (out / ".summary.json.abc.sparsedecomp-tmp").write_text("half")  # what a kill mid-write leaves
            raise KeyboardInterrupt
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["complete"] is False and "codes_residual.txt" in manifest["files"]
    with RunWriter(out, command="test") as w:
        w.write_text("codes_z.txt", "z3")
    assert _listing(out) == ["codes_z.txt", MANIFEST_NAME]


def test_refuses_foreign_folders_files_links_and_bad_names(tmp_path):
    (tmp_path / "theirs.txt").write_text("x")
    with pytest.raises(InputError, match="not empty"):
        RunWriter(tmp_path, command="test")
    with pytest.raises(InputError, match="existing file"):
        RunWriter(tmp_path / "theirs.txt", command="test")
    with RunWriter(tmp_path / "new", command="test") as w:
        with pytest.raises(InputError, match="relative path inside the folder"):
            w.write_text("../escape.txt", "x")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(InputError, match="not a readable sparsedecomp manifest"):
        RunWriter(tmp_path / "bad", command="test")
    (tmp_path / "listed").mkdir()
    (tmp_path / "listed" / MANIFEST_NAME).write_text("[1, 2]")
    with pytest.raises(InputError, match="not a sparsedecomp run manifest"):
        RunWriter(tmp_path / "listed", command="test")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    with pytest.raises(InputError, match="broken symbolic link"):
        RunWriter(tmp_path / "dangling", command="test")
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    with pytest.raises(InputError, match="cannot be resolved"):
        RunWriter(tmp_path / "loop", command="test")


def test_another_commands_results_are_never_replaced(tmp_path):
    out = tmp_path / "run"
    with RunWriter(out, command="decompose") as w:
        w.write_json("summary.json", {"kept": True})
    with pytest.raises(InputError, match="holds a `sparsedecomp decompose` run, which `sparsedecomp evaluate` would "
                                         "replace"):
        check_output_folder(out, command="evaluate")
    with pytest.raises(InputError, match="holds a `sparsedecomp decompose` run"):
        RunWriter(out, command="evaluate")
    assert json.loads((out / "summary.json").read_text()) == {"kept": True}


def _hold(path, started, release):
    with RunWriter(path, command="first"):
        started.set()
        release.wait(30)


def test_a_folder_in_use_by_another_run_is_refused_by_name(tmp_path):
    out = tmp_path / "run"
    context = multiprocessing.get_context("fork")
    started, release = context.Event(), context.Event()
    holder = context.Process(target=_hold, args=(out, started, release))
    holder.start()
    try:
        assert started.wait(30)
        with pytest.raises(OutputError, match=r"in use by another sparsedecomp run \(pid \d+, sparsedecomp first\)"):
            RunWriter(out, command="first")
    finally:
        release.set()
        holder.join(30)
    with RunWriter(out, command="first") as w:  # free again once the first run ended
        w.write_text("a.txt", "a")
    assert (out / "a.txt").read_text() == "a"


def test_a_run_is_complete_only_with_its_parts(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(OutputError, match="is not complete"):
        with RunWriter(out, command="demo") as top:
            top.write_text("index.html", "front")
            with pytest.raises(KeyboardInterrupt):
                with RunWriter(out / "evaluation", command="evaluate") as part:
                    part.write_text("report.json", "{}")
                    part.commit()
                    raise KeyboardInterrupt
            top.add_part("evaluation")
    assert not (out / MANIFEST_NAME).exists() or json.loads((out / MANIFEST_NAME).read_text())["complete"] is False
    with RunWriter(out, command="demo") as top:
        top.write_text("index.html", "front")
        with RunWriter(out / "evaluation", command="evaluate") as part:
            part.write_text("report.json", "{}")
        top.add_part("evaluation")
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["complete"] is True and manifest["parts"]["evaluation"]["complete"] is True
    assert manifest["parts"]["evaluation"]["manifest_sha256"] == hashlib.sha256(
        (out / "evaluation" / MANIFEST_NAME).read_bytes()).hexdigest()


def test_an_unwritable_output_folder_is_refused_before_any_work(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(InputError, match="is a file, not a folder"):
        RunWriter(tmp_path / "afile" / "sub", command="test")


def test_a_site_written_before_the_one_writer_is_taken_over_and_its_stale_files_removed(tmp_path):
    out = tmp_path / "site"
    (out / "concat" / "f").mkdir(parents=True)
    (out / "concat" / "f" / "0.html").write_text("old page")
    (out / "manifest.json").write_text(json.dumps({"format": "sparsedecomp-dashboards/1", "complete": True,
                                                   "files": {"concat/f/0.html": 8}}))
    with RunWriter(out, command="dashboard") as w:
        w.write_text("index.html", "new site")
    assert _listing(out) == ["index.html", MANIFEST_NAME]
    assert json.loads((out / MANIFEST_NAME).read_text())["format"] == "sparsedecomp-run/1"
