"""Token sources: tensor files (safetensors, .pt; refused by name, never unpickled) and datasets read through
`datasets.load_dataset` from a local parquet folder (pre-tokenised rows and text with a tokenizer), with their
BOS handling, context size, skipped contexts and short rows recorded."""

import warnings

import pytest
import torch
from safetensors.torch import save_file

from sparsedecomp.errors import InputError
from sparsedecomp.loading.tokens import load_dataset_tokens, load_tokens_file

BOS = 0


# -- files ------------------------------------------------------------------------------------------------------------
def test_a_safetensors_file_gives_its_tokens_and_records_bos(tmp_path):
    tokens = torch.tensor([[BOS, 5, 6], [BOS, 7, 8]], dtype=torch.int32)
    path = tmp_path / "tokens.safetensors"
    save_file({"tokens": tokens, "other": torch.zeros(2)}, str(path))
    loaded = load_tokens_file(path, bos_token_id=BOS)
    assert loaded.tokens.dtype == torch.long and loaded.tokens.tolist() == tokens.tolist()
    assert loaded.bos_token_id == BOS and loaded.bos_added is False
    assert loaded.details == {"kind": "file", "path": str(path)}
    # BOS is recorded only when every context starts with it.
    save_file({"tokens": torch.tensor([[BOS, 5], [9, 7]])}, str(path))
    assert load_tokens_file(path, bos_token_id=BOS).bos_token_id is None


def test_a_pt_file_of_one_tensor_is_read(tmp_path):
    path = tmp_path / "tokens.pt"
    torch.save(torch.tensor([[1, 2, 3]]), path)
    assert load_tokens_file(path).tokens.tolist() == [[1, 2, 3]]
    torch.save({"ids": torch.tensor([[4, 5]])}, path)  # a file's only tensor, whatever its name
    assert load_tokens_file(path).tokens.tolist() == [[4, 5]]


@pytest.mark.parametrize(
    "content, message",
    [
        ({"tokens": torch.tensor([1, 2, 3])}, "found shape (3,)"),
        ({"tokens": torch.rand(2, 4)}, "torch.float32 values; token ids must be integers"),
        ({"tokens": torch.tensor([[1, -2]])}, "negative token ids (min -2)"),
        ({"tokens": torch.zeros(2, 1, dtype=torch.long)}, "at least one context of at least two positions"),
        ({"a": torch.zeros(2, 2, dtype=torch.long), "b": torch.zeros(2, 2, dtype=torch.long)}, "found NoneType"),
    ],
)
def test_bad_token_tensors_are_refused_by_name(tmp_path, content, message):
    path = tmp_path / "tokens.safetensors"
    save_file(content, str(path))
    with pytest.raises(InputError) as err:
        load_tokens_file(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_a_missing_or_corrupt_file_is_refused(tmp_path):
    with pytest.raises(InputError, match="no tokens file at"):
        load_tokens_file(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file" * 4)
    with pytest.raises(InputError, match="is not a valid safetensors file"):
        load_tokens_file(bad)


@pytest.mark.parametrize("torch_format", [True, False])
def test_a_pickled_object_is_refused_without_unpickling(tmp_path, poison, torch_format):
    path, marker = tmp_path / "tokens.pt", tmp_path / "unpickled"
    poison(path, marker, torch_format=torch_format)
    with pytest.raises(InputError, match="which this package never does"):
        load_tokens_file(path)
    assert not marker.exists()


# -- datasets -----------------------------------------------------------------------------------------------------------
# Pre-tokenised rows (BOS = 0) and their texts: row 0 starts with BOS, row 1 does not, rows 2 and 3 are too short for
# contexts of 4 (with or without a BOS prepended), row 4 is exactly one context.
ROWS = [[BOS, 5, 6, 7, 8], [9, 10, 11, 12, 13], [BOS, 1], [14, 15], [BOS, 16, 17, 18]]
TEXTS = ["a b c d", "e f g", "", "h", "a a"]
WORDS = {"<|bos|>": BOS, "<unk>": 1, "a": 2, "b": 3, "c": 4, "d": 5, "e": 6, "f": 7, "g": 8, "h": 9}


@pytest.fixture(scope="module")
def parquet_dataset(tmp_path_factory):
    """A dataset folder as the hub lays one out (``data/train-*.parquet``), read offline by `datasets`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("dataset")
    (root / "data").mkdir()
    pq.write_table(pa.table({"tokens": ROWS[:3], "text": TEXTS[:3]}), root / "data" / "train-00000-of-00002.parquet")
    pq.write_table(pa.table({"tokens": ROWS[3:], "text": TEXTS[3:]}), root / "data" / "train-00001-of-00002.parquet")
    return root


@pytest.fixture(scope="module")
def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel(WORDS, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer


def test_pretokenised_rows_get_bos_once_and_short_rows_are_skipped_and_counted(parquet_dataset):
    with pytest.warns(UserWarning, match="gave only 3 of the 10 contexts"):
        got = load_dataset_tokens(parquet_dataset, context_size=4, n_contexts=10, bos_token_id=BOS)
    assert got.tokens.tolist() == [[BOS, 5, 6, 7], [BOS, 9, 10, 11], [BOS, 16, 17, 18]]
    assert got.bos_token_id == BOS and got.bos_added is True  # row 1's BOS was added here; rows 0 and 4 had theirs
    assert got.details["column"] == "tokens" and got.details["pretokenized"] is True
    assert got.details["rows_too_short"] == 2 and got.details["contexts_with_bos_prepended"] == 1


def test_skipped_contexts_are_not_taken_and_bos_is_recorded_for_those_taken(parquet_dataset):
    second = load_dataset_tokens(parquet_dataset, context_size=4, n_contexts=1, bos_token_id=BOS, skip_contexts=1)
    assert second.tokens.tolist() == [[BOS, 9, 10, 11]] and second.bos_added is True
    third = load_dataset_tokens(parquet_dataset, context_size=4, n_contexts=1, bos_token_id=BOS, skip_contexts=2)
    # Row 4 had its BOS; the rows skipped on the way (too short) are still counted.
    assert third.tokens.tolist() == [[BOS, 16, 17, 18]] and third.bos_added is False
    assert third.details["skip_contexts"] == 2 and third.details["rows_too_short"] == 2


def test_without_prepend_bos_rows_are_cut_as_they_are(parquet_dataset):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fewer contexts than asked for
        got = load_dataset_tokens(parquet_dataset, context_size=4, n_contexts=10, prepend_bos=False,
                                  bos_token_id=BOS)
    assert got.tokens.tolist() == [[BOS, 5, 6, 7], [9, 10, 11, 12], [BOS, 16, 17, 18]]
    assert got.bos_token_id is None and got.bos_added is False  # not every context starts with BOS


def test_text_is_tokenised_packed_with_bos_and_cut(parquet_dataset, word_tokenizer):
    got = load_dataset_tokens(parquet_dataset, context_size=4, n_contexts=3, column="text", tokenizer=word_tokenizer,
                              bos_token_id=BOS)
    # "a b c d" "e f g" "" "h" "a a" -> 2 3 4 5 | 6 7 8 | | 9 | 2 2, concatenated and cut into contexts of BOS + 3
    # tokens (the last, partial one dropped).
    assert got.tokens.tolist() == [[BOS, 2, 3, 4], [BOS, 5, 6, 7], [BOS, 8, 9, 2]]
    assert got.bos_token_id == BOS and got.bos_added is True and got.details["pretokenized"] is False
    assert got.details["contexts_with_bos_prepended"] == 3 and got.context_size == 4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"column": "nope"}, "has no column 'nope' (columns: ['tokens', 'text'])"),
        ({"column": "text"}, "column 'text' holds text: pass tokenizer="),
        ({"bos_token_id": None}, "prepend_bos needs the BOS token id"),
        ({"context_size": 1}, "context_size must be at least 2"),
        ({"n_contexts": 0}, "n_contexts must be a positive int"),
        ({"skip_contexts": -1}, "skip_contexts must be a non-negative int"),
        ({"split": "test"}, "could not be loaded with split='test'"),
        ({"context_size": 64}, "gave no context of 64 tokens (after skipping 0; 5 rows were too short)"),
    ],
)
def test_dataset_errors_are_named(parquet_dataset, kwargs, message):
    settings = {"context_size": 4, "n_contexts": 2, "bos_token_id": BOS, **kwargs}
    with pytest.raises(InputError) as err:
        load_dataset_tokens(parquet_dataset, **settings)
    assert message in str(err.value)


def test_a_missing_dataset_folder_is_refused(tmp_path):
    with pytest.raises(InputError, match="could not be found"):
        load_dataset_tokens(tmp_path / "no-such-dataset", context_size=4, n_contexts=1, bos_token_id=BOS)


def test_a_tokenizers_tokenizer_without_bos_id_asks_for_one(parquet_dataset, word_tokenizer):
    with pytest.raises(InputError, match="does not say which token is BOS"):
        load_dataset_tokens(parquet_dataset, context_size=4, n_contexts=1, column="text", tokenizer=word_tokenizer)


def test_an_empty_dataset_is_refused_by_name(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "data").mkdir()
    pq.write_table(pa.table({"tokens": pa.array([], type=pa.list_(pa.int64()))}),
                   tmp_path / "data" / "train-00000-of-00001.parquet")
    with pytest.raises(InputError, match="could not be read|gave no context"):
        load_dataset_tokens(tmp_path, context_size=4, n_contexts=2, bos_token_id=0)


# -- BOS and text from the model's tokenizer ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_model():
    """The demo model, loaded from its folder with the tokenizer that travels in it (BOS <|bos|> = 0)."""
    from sparsedecomp.demo.layout import ARTIFACTS_DIR, MODEL_DIR
    from sparsedecomp.loading import load_model

    return load_model(ARTIFACTS_DIR / MODEL_DIR)


def test_text_is_tokenised_with_the_models_tokenizer_and_its_bos(parquet_dataset, demo_model):
    from tokenizers import Tokenizer

    from sparsedecomp.demo.layout import ARTIFACTS_DIR, TOKENIZER_FILE

    raw = Tokenizer.from_file(str(ARTIFACTS_DIR / TOKENIZER_FILE))
    stream = [i for text in TEXTS for i in raw.encode(text, add_special_tokens=False).ids]
    assert len(stream) >= 6 and 0 not in stream
    expected = [[0] + stream[:3], [0] + stream[3:6]]
    # No bos_token_id given: it is the tokenizer's, whichever way the tokenizer is handed over (a raw
    # tokenizers.Tokenizer names it by its special <|bos|> token).
    for tokenizer in (demo_model, demo_model.model, demo_model.tokenizer, raw):
        got = load_dataset_tokens(parquet_dataset, context_size=4, n_contexts=2, column="text", tokenizer=tokenizer)
        assert got.tokens.tolist() == expected and got.bos_token_id == 0 and got.bos_added is True
    # A pre-tokenised column takes only the BOS id from it.
    ids = load_dataset_tokens(parquet_dataset, context_size=4, n_contexts=1, tokenizer=demo_model)
    assert ids.tokens.tolist() == [[BOS, 5, 6, 7]] and ids.bos_token_id == 0


def test_a_tokens_file_takes_its_bos_from_the_tokenizer(tmp_path, demo_model):
    path = tmp_path / "tokens.safetensors"
    save_file({"tokens": torch.tensor([[0, 5, 6], [0, 7, 8]])}, str(path))
    assert load_tokens_file(path, tokenizer=demo_model).bos_token_id == 0
    assert load_tokens_file(path, tokenizer=demo_model.tokenizer).bos_token_id == 0
    assert load_tokens_file(path, tokenizer=demo_model, bos_token_id=5).bos_token_id is None  # the argument wins
    assert load_tokens_file(path).bos_token_id is None


def test_a_model_without_a_tokenizer_is_named(parquet_dataset):
    from types import SimpleNamespace

    from sparsedecomp.loading import LoadedModel, ProcessingFlags

    bare = LoadedModel(model=SimpleNamespace(tokenizer=None), flags=ProcessingFlags(), name="tiny")
    assert bare.tokenizer is None and bare.bos_token_id is None and bare.special_token_ids == ()
    with pytest.raises(InputError, match=r"the model tiny has no tokenizer: load it with one"):
        load_dataset_tokens(parquet_dataset, context_size=4, n_contexts=1, column="text", tokenizer=bare)


def test_without_the_datasets_package_the_error_names_it(parquet_dataset, monkeypatch):
    import sys

    from sparsedecomp.loading.tokens import MissingPackageError

    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    with pytest.raises(MissingPackageError, match=r"needs the Hugging Face 'datasets' package, which is not") as info:
        load_dataset_tokens(parquet_dataset, context_size=4, n_contexts=1, bos_token_id=BOS)
    assert isinstance(info.value, ImportError) and isinstance(info.value, InputError)
