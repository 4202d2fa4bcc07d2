"""`sparsedecomp train-heads`: every head of a layer trained in one pass from a model folder and a tokens file, written
as SAELens folders that SAELens and the package load, evaluated per head, checkpointed, resumed after a kill on the
batches an uninterrupted run sees, and bad input refused before any training."""

import json

import pytest
import torch
from safetensors.torch import save_file

from sparsedecomp.cli import main
from sparsedecomp.errors import InputError
from sparsedecomp.training import HeadTrainingSpec, completed_checkpoints, train_layer_saes
from sparsedecomp.training.stream import HeadBatchStream

pytestmark = pytest.mark.filterwarnings(r"ignore:\s*This SAE has non-empty model_from_pretrained_kwargs:UserWarning")
LAYER = 1
SPEC = HeadTrainingSpec("topk", d_sae=32, k=4, training_tokens=640, batch_size=64, lr=1e-2, buffer_batches=2)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, tiny_model):
    from sparsedecomp.demo.model import save_model

    folder = tmp_path_factory.mktemp("train_heads") / "model"
    cfg = tiny_model.cfg
    config = {"model_name": "tiny-2l", "n_layers": 2, "d_model": cfg.d_model, "n_heads": cfg.n_heads,
              "d_head": cfg.d_head, "d_mlp": cfg.d_mlp, "d_vocab": cfg.d_vocab, "n_ctx": cfg.n_ctx, "act_fn": "gelu",
              "normalization_type": "LN"}
    save_model(tiny_model, folder, config, {"fold_ln": True, "center_writing_weights": True, "center_unembed": True,
                                            "fold_value_biases": True, "refactor_factored_attn_matrices": False})
    return folder


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("train_heads_tokens") / "tokens.safetensors"
    save_file({"tokens": torch.randint(0, 50, (120, 16), generator=torch.Generator().manual_seed(9))}, str(path))
    return path


def command(model_folder, tokens_file, out, *extra):
    return ["train-heads", "--model", str(model_folder), "--layer", str(LAYER), "--tokens", str(tokens_file),
            "--architecture", "topk", "--d-sae", "32", "--k", "4", "--training-tokens", "640", "--batch-size", "64",
            "--lr", "1e-2", "--buffer-batches", "2", "--eval-contexts", "8", "--checkpoint-every", "3",
            "--out", str(out), *extra]


def test_train_heads_writes_saelens_folders_with_per_head_evals(model_folder, tokens_file, tmp_path, capsys):
    from sae_lens import SAE as LensSAE

    from sparsedecomp.loading import load_head_saes

    out = tmp_path / "run"
    assert main(command(model_folder, tokens_file, out)) == 0
    printed = capsys.readouterr()
    assert "L0 4.0 4.0 4.0 4.0 | EV" in printed.err  # the progress bar: L0 and explained variance per head
    heads = load_head_saes([out / f"head_{h}" for h in range(4)])
    assert heads.heads == (0, 1, 2, 3) and heads.hook_name == f"blocks.{LAYER}.attn.hook_z"
    assert heads.model_from_pretrained_kwargs["fold_value_biases"] is True
    for h in range(4):
        lens = LensSAE.load_from_disk(out / f"head_{h}")
        assert lens.cfg.metadata.hook_head_index == h and lens.cfg.metadata.model_name == "tiny-2l"
        x = torch.randn(5, 8)
        torch.testing.assert_close(heads[h].encode(x), lens.encode(x).detach(), rtol=1e-5, atol=1e-5)
    report = json.loads((out / "report.json").read_text())
    assert report["training"]["steps"] == 10 and report["tokens"]["eval_contexts"] == 8
    for h in range(4):
        evals = report["evals"][f"head_{h}"]
        assert evals["l0"] == pytest.approx(4.0) and -1 < evals["explained_variance"] < 1
        assert evals["ce_loss_score"] is not None and evals["n_tokens"] == 8 * 16
    assert [p.name for p in completed_checkpoints(out / "checkpoints")] == ["640"]  # only the latest is kept


def test_running_again_on_a_finished_folder_resumes_without_training(model_folder, tokens_file, tmp_path,
                                                                     monkeypatch):
    out = tmp_path / "run"
    assert main(command(model_folder, tokens_file, out, "--no-progress")) == 0
    first = (out / "head_2" / "sae_weights.safetensors").read_bytes()
    steps = []
    original = HeadBatchStream.__next__
    monkeypatch.setattr(HeadBatchStream, "__next__", lambda self: steps.append(1) or original(self))
    assert main(command(model_folder, tokens_file, out, "--no-progress")) == 0
    assert steps == []  # every step was done: nothing is read, nothing trained
    assert (out / "head_2" / "sae_weights.safetensors").read_bytes() == first


def test_a_killed_run_resumes_on_the_batches_an_uninterrupted_run_sees(tiny_model, tmp_path, monkeypatch):
    tokens = torch.randint(0, 50, (100, 16), generator=torch.Generator().manual_seed(5))
    whole, _ = train_layer_saes(tiny_model, tokens, layer=LAYER, spec=SPEC)

    original = HeadBatchStream.__next__

    calls = []

    def killed_at_step_7(self):  # after the norm estimate's 10 batches (the stream is rewound) and 7 steps
        calls.append(self.position)
        if len(calls) == 10 + 7 + 1:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(HeadBatchStream, "__next__", killed_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        train_layer_saes(tiny_model, tokens, layer=LAYER, spec=SPEC, checkpoint_dir=tmp_path, checkpoint_every=3)
    assert [p.name for p in completed_checkpoints(tmp_path)] == [str(6 * 64)]

    served = []
    monkeypatch.setattr(HeadBatchStream, "__next__", lambda self: served.append(self.position) or original(self))
    resumed, history = train_layer_saes(tiny_model, tokens, layer=LAYER, spec=SPEC, checkpoint_dir=tmp_path,
                                        checkpoint_every=3)
    assert served == [6, 7, 8, 9]  # only the steps not done, on the batches the uninterrupted run had there
    for name, sae in whole.items():
        for key, value in sae.state_dict().items():
            torch.testing.assert_close(resumed[name].state_dict()[key], value, rtol=1e-5, atol=1e-6)
    assert history[-1]["step"] == 10


def test_a_checkpoint_folder_of_another_run_is_refused(tiny_model, tmp_path):
    tokens = torch.randint(0, 50, (100, 16), generator=torch.Generator().manual_seed(5))
    train_layer_saes(tiny_model, tokens, layer=LAYER, spec=SPEC, heads=(0,), checkpoint_dir=tmp_path,
                     checkpoint_every=5)
    with pytest.raises(InputError, match=r"holds checkpoints of another training run \(it differs in \['heads'\]\)"):
        train_layer_saes(tiny_model, tokens, layer=LAYER, spec=SPEC, heads=(1,), checkpoint_dir=tmp_path)


def test_the_stream_serves_every_head_the_same_rows_and_seeks_exactly(tiny_model):
    tokens = torch.randint(0, 50, (30, 16), generator=torch.Generator().manual_seed(2))
    tokens[:, 0] = torch.arange(30)  # position 0 reads only itself: distinct first tokens make every row distinct
    stream = HeadBatchStream(tiny_model, tokens, layer=LAYER, heads=(0, 3), batch_size=40, buffer_batches=3, seed=1,
                             concat=True)
    assert stream.contexts_per_block == 8 and stream.batches_per_epoch == 3 * (8 * 16 // 40) + 6 * 16 // 40
    batches = [next(stream) for _ in range(stream.batches_per_epoch + 2)]  # into the second epoch
    for batch in batches:
        torch.testing.assert_close(batch["concat"][:, :8], batch["head_0"])
        torch.testing.assert_close(batch["concat"][:, 24:], batch["head_3"])
    rows = torch.cat([b["concat"] for b in batches[: stream.batches_per_epoch]])
    assert len({tuple(r.tolist()) for r in rows}) == len(rows)  # one epoch serves each position once
    stream.seek(4)
    torch.testing.assert_close(next(stream)["head_3"], batches[4]["head_3"])


@pytest.mark.parametrize("change, message", [
    ({"--layer": "7"}, r"--layer 7 does not exist: tiny-2l has layers 0\.\.1"),
    ({"--heads": "1,9"}, r"--heads \[9\] do not exist: layer 1 of tiny-2l has heads 0\.\.3"),
    ({"--hook": "blocks.1.hook_resid_pre"}, r"--hook blocks\.1\.hook_resid_pre has no head dimension"),
    ({"--k": "40"}, r"a topk SAE needs k in 1\.\.d_sae=32, got k=40"),
    ({"--l1-coefficient": "2"}, r"l1_coefficient applies to standard SAEs, not to 'topk'"),
    ({"--training-tokens": "100000"}, r"100,032 training tokens \(1563 batches of 64\) asked for but the tokens hold"),
    ({"--eval-contexts": "500"}, r"the tokens hold 120 contexts: fewer than --eval-contexts 500"),
])
def test_bad_requests_are_refused_in_one_line_before_training(model_folder, tokens_file, tmp_path, capsys, change,
                                                              message):
    argv = command(model_folder, tokens_file, tmp_path / "run")
    for flag, value in change.items():
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    assert main(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("sparsedecomp train-heads: error: ")
    assert __import__("re").search(message, error), error
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_an_output_folder_holding_another_run_is_refused(model_folder, tokens_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(command(model_folder, tokens_file, out, "--no-progress")) == 0
    capsys.readouterr()
    argv = command(model_folder, tokens_file, out, "--no-progress")
    argv[argv.index("--d-sae") + 1] = "16"
    assert main(argv) == 2
    assert "holds another train-heads run (it differs in ['spec'])" in capsys.readouterr().err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(command(model_folder, tokens_file, foreign)) == 2
    assert "is not empty and holds no manifest.json" in capsys.readouterr().err


def test_train_heads_reads_just_enough_dataset_contexts(model_folder, tmp_path):
    from benchmarks.standins import BOS, write_token_dataset

    dataset = tmp_path / "dataset"
    write_token_dataset(dataset, n_rows=60, row_length=64, d_vocab=50, gen=torch.Generator().manual_seed(3))
    argv = command(model_folder, "unused", tmp_path / "run", "--no-progress", "--bos-token-id", str(BOS))
    at = argv.index("--tokens")
    argv[at: at + 2] = ["--dataset", str(dataset)]
    assert main(argv) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    # 10 steps of 64 rows from blocks of 8 contexts of 16 tokens (2 batches a block): 5 blocks, then 8 held out
    assert report["tokens"] == {"source": str(dataset), "training_contexts": 40, "eval_contexts": 8,
                                "context_size": 16}
    cfg = json.loads((tmp_path / "run" / "head_0" / "cfg.json").read_text())["metadata"]
    assert (cfg["dataset_path"], cfg["context_size"], cfg["prepend_bos"]) == (str(dataset), 16, True)
