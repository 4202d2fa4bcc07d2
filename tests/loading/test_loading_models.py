"""Model processing flags: explicit, recorded, and applied without mutating the caller's state dict; tokenizers
travel with models (a local folder's, an explicit one, refused by name when they are no tokenizer or do not fit)."""

import inspect

import pytest
import torch

from sparsedecomp.loading import (
    CheckpointError,
    CheckpointNotFoundError,
    LoadedModel,
    ModelNotFoundError,
    ProcessingFlags,
    load_model,
    process_state_dict,
)


def tiny_config():
    from transformer_lens import HookedTransformerConfig

    return HookedTransformerConfig(
        n_layers=2, d_model=16, n_heads=2, d_head=8, n_ctx=12, d_vocab=30, act_fn="gelu",
        normalization_type="LN", d_mlp=32, seed=0,
    )


def test_defaults_are_transformer_lens_from_pretrained_defaults():
    from transformer_lens import HookedTransformer

    signature = inspect.signature(HookedTransformer.from_pretrained)
    for name, value in ProcessingFlags().as_kwargs().items():
        assert signature.parameters[name].default == value, name
    assert not any(ProcessingFlags.none().as_kwargs().values())
    with pytest.raises(TypeError, match="fold_ln must be a bool"):
        ProcessingFlags(fold_ln=1)


def test_load_model_passes_every_flag_explicitly(monkeypatch):
    from transformer_lens import HookedTransformer

    seen = {}

    def fake_from_pretrained(name, **kwargs):
        seen.update(kwargs, name=name)
        return HookedTransformer(tiny_config())

    monkeypatch.setattr(HookedTransformer, "from_pretrained", fake_from_pretrained)
    flags = ProcessingFlags(fold_value_biases=False)
    loaded = load_model("gelu-2l", flags=flags)
    assert isinstance(loaded, LoadedModel) and loaded.flags is flags and loaded.name == "gelu-2l"
    for key, value in flags.as_kwargs().items():
        assert seen[key] is value
    assert seen["name"] == "gelu-2l" and seen["device"] == "cpu"
    with pytest.raises(ValueError, match="flags=ProcessingFlags"):
        load_model("gelu-2l", fold_ln=False)


def test_process_state_dict_copies_and_applies_the_flags():
    from transformer_lens import HookedTransformer

    source = HookedTransformer(tiny_config())
    with torch.no_grad():
        for block in source.blocks:
            block.attn.b_V.normal_()  # a non-zero value bias, so fold_value_biases visibly shifts z
    state = source.state_dict()
    before = {k: v.clone() for k, v in state.items()}
    tokens = torch.randint(0, 30, (2, 10), generator=torch.Generator().manual_seed(0))

    results = {}
    for flags in (ProcessingFlags(), ProcessingFlags(fold_value_biases=False), ProcessingFlags.none()):
        loaded = process_state_dict(HookedTransformer(tiny_config()), state, flags)
        assert loaded.flags == flags and loaded.describe().endswith(f"({flags.describe()})")
        logits, cache = loaded.model.run_with_cache(tokens)
        results[flags] = (logits.log_softmax(-1), cache["blocks.1.attn.hook_z"])
    assert state.keys() == before.keys() and all(torch.equal(state[k], before[k]) for k in state)

    default, no_fold_v, none = results[ProcessingFlags()], results[ProcessingFlags(fold_value_biases=False)], results[ProcessingFlags.none()]
    # processing never changes the model's predictions ...
    torch.testing.assert_close(default[0], none[0], rtol=1e-4, atol=1e-4)
    # ... but fold_value_biases shifts hook_z by each head's (processed) value bias
    shift = no_fold_v[1] - default[1]
    assert shift.abs().max() > 1e-3
    torch.testing.assert_close(shift, shift[:1, :1].expand_as(shift), rtol=1e-4, atol=1e-5)
    with pytest.raises(TypeError, match="flags must be ProcessingFlags"):
        process_state_dict(HookedTransformer(tiny_config()), state, {"fold_ln": True})


# -- local model folders and unknown names --------------------------------------------------------------------------
def write_folder(path, *, flags=None, config=None):
    """A model folder in the demo's layout: config.json (HookedTransformerConfig kwargs, processing flags) and the
    unprocessed state dict in model.safetensors."""
    import json

    from safetensors.torch import save_file
    from transformer_lens import HookedTransformer

    cfg = tiny_config()
    model = HookedTransformer(cfg)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.b_V.normal_()
    path.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith((".IGNORE", ".mask"))}
    save_file(state, str(path / "model.safetensors"))
    kwargs = config or {"n_layers": 2, "d_model": 16, "n_heads": 2, "d_head": 8, "n_ctx": 12, "d_vocab": 30,
                        "act_fn": "gelu", "normalization_type": "LN", "d_mlp": 32, "seed": 0, "model_name": "tiny"}
    meta = {"hooked_transformer_config": kwargs}
    if flags is not None:
        meta["processing_flags"] = flags.as_kwargs()
    (path / "config.json").write_text(json.dumps(meta))
    return model


def test_demo_model_folder_loads_like_the_demo_loads_it():
    from sparsedecomp.demo.layout import ARTIFACTS_DIR, MODEL_DIR
    from sparsedecomp.demo.model import load_model as demo_load_model

    folder = ARTIFACTS_DIR / MODEL_DIR
    loaded = load_model(str(folder))  # a string path, as the CLI's --model passes it
    reference, flags = demo_load_model(folder)
    assert loaded.flags == ProcessingFlags(**flags) and loaded.name == "sparsedecomp-demo-2l"
    assert loaded.source == str(folder) and str(folder) in loaded.describe()
    tokens = torch.randint(0, 2048, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(tokens), reference(tokens))


def test_folder_flags_default_to_the_recorded_ones_and_a_mismatch_warns(tmp_path):
    source = write_folder(tmp_path / "m", flags=ProcessingFlags.none())
    loaded = load_model(tmp_path / "m")
    assert loaded.flags == ProcessingFlags.none() and loaded.name == "tiny"
    tokens = torch.randint(0, 30, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, cache = loaded.model.run_with_cache(tokens)
        _, expected = source.run_with_cache(tokens)
    torch.testing.assert_close(cache["blocks.1.attn.hook_z"], expected["blocks.1.attn.hook_z"])  # no processing
    with pytest.warns(UserWarning, match=r"records processing flags \(fold_ln=False.*loaded with \(fold_ln=True"):
        processed = load_model(tmp_path / "m", flags=ProcessingFlags())
    assert processed.flags == ProcessingFlags()
    write_folder(tmp_path / "unrecorded")
    assert load_model(tmp_path / "unrecorded").flags == ProcessingFlags()  # from_pretrained's defaults
    with pytest.raises(ValueError, match=r"\['checkpoint_index'\] only apply to hub models"):
        load_model(tmp_path / "m", checkpoint_index=3)


def test_bad_model_folders_name_the_problem(tmp_path):
    write_folder(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text('{"n_layers": 2}')
    with pytest.raises(CheckpointError, match=r"config\.json has no 'hooked_transformer_config' object"):
        load_model(tmp_path / "m")
    write_folder(tmp_path / "small", config={"n_layers": 1, "d_model": 16, "n_heads": 2, "d_head": 8, "n_ctx": 12,
                                             "d_vocab": 30, "act_fn": "gelu", "normalization_type": "LN", "d_mlp": 32})
    with pytest.raises(CheckpointError, match=r"model\.safetensors does not match .*config\.json: missing \[\], unexpected \['blocks\.1\."):
        load_model(tmp_path / "small")
    with pytest.raises(ModelNotFoundError, match="model folder not found"):
        load_model(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "name, message",
    [
        ("gelu2l", r"unknown model 'gelu2l': not a TransformerLens model name or alias; close matches: \['gelu-2l'"),
        ("./models/missing", r"not a TransformerLens model name or alias and no local model folder ./models/missing exists"),
        ("zzzz-not-a-model-zzzz", r"^unknown model 'zzzz-not-a-model-zzzz': not a TransformerLens model name or alias$"),
    ],
)
def test_unknown_names_get_a_short_error(name, message):
    with pytest.raises(ModelNotFoundError, match=message) as info:
        load_model(name)
    assert len(str(info.value)) < 300  # not TransformerLens's list of every supported model


# -- tokenizers travel with models ------------------------------------------------------------------------------------
WORDS = ["<go>", "<stop>", "<unk>", "the", "cat", "sat", "on", "mat", "a", "dog"]


def word_tokenizer(words=WORDS, specials=()):
    """A whitespace word-level ``tokenizers.Tokenizer`` over ``words`` (ids in order), ``specials`` added as special."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer.add_special_tokens([AddedToken(s, special=True) for s in specials])
    return tokenizer


def save_pretrained_tokenizer(folder, **special_tokens):
    """``PreTrainedTokenizerFast(...).save_pretrained(folder)``: the files transformers itself writes."""
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=word_tokenizer(), **special_tokens).save_pretrained(str(folder))


def test_a_folder_with_a_save_pretrained_tokenizer_loads_with_it(tmp_path):
    write_folder(tmp_path / "m")
    # BOS / EOS named only in tokenizer_config.json (<go> / <stop> are names the fallback rule would not pick).
    save_pretrained_tokenizer(tmp_path / "m", bos_token="<go>", eos_token="<stop>", unk_token="<unk>")
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in (tmp_path / "m").iterdir()}
    loaded = load_model(tmp_path / "m")
    tokenizer = loaded.tokenizer
    assert tokenizer is loaded.model.tokenizer and loaded.tokenizer_source == str(tmp_path / "m")
    assert (loaded.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert loaded.special_token_ids == (0, 1, 2)
    assert f"tokenizer {tmp_path / 'm'}" in loaded.describe()
    # TransformerLens uses it: BOS prepended once, text decoded, no padding surprises.
    assert loaded.model.to_tokens("the cat sat").tolist() == [[0, 3, 4, 5]]
    assert loaded.model.to_string(torch.tensor([3, 4, 5, 6, 8, 7])) == "the cat sat on a mat"
    assert loaded.model.to_str_tokens("a dog") == ["<go>", "a", "dog"]
    assert tokenizer.encode("the cat", add_special_tokens=False) == [3, 4]


def test_a_bare_tokenizer_json_gets_its_special_tokens_from_their_names(tmp_path):
    write_folder(tmp_path / "m")
    word_tokenizer(WORDS[3:], specials=["<s>", "</s>", "<pad>"]).save(str(tmp_path / "m" / "tokenizer.json"))
    loaded = load_model(tmp_path / "m")
    t = loaded.tokenizer
    ids = {w: t.convert_tokens_to_ids(w) for w in ("<s>", "</s>", "<pad>")}
    assert (t.bos_token, t.eos_token, t.pad_token) == ("<s>", "</s>", "<pad>")
    assert loaded.bos_token_id == ids["<s>"] == 7 and loaded.special_token_ids == (7, 8, 9)
    assert loaded.model.to_tokens("cat").tolist() == [[7, 1]]
    # Only <|endoftext|>: EOS by name; TransformerLens makes it BOS and pad too (GPT-2's convention, gelu-2l's).
    write_folder(tmp_path / "gpt2like")
    word_tokenizer(WORDS[3:], specials=["<|endoftext|>"]).save(str(tmp_path / "gpt2like" / "tokenizer.json"))
    gpt2like = load_model(tmp_path / "gpt2like")
    assert gpt2like.tokenizer.eos_token_id == gpt2like.bos_token_id == gpt2like.tokenizer.pad_token_id == 7
    assert gpt2like.special_token_ids == (7,)


def test_the_demo_model_folder_carries_its_tokenizer():
    from tokenizers import Tokenizer

    from sparsedecomp.demo.layout import ARTIFACTS_DIR, HELDOUT_FILE, MODEL_DIR, TOKENIZER_FILE, load_heldout_tokens

    folder = ARTIFACTS_DIR / MODEL_DIR
    assert (ARTIFACTS_DIR / TOKENIZER_FILE).parent == folder and not (ARTIFACTS_DIR / "tokenizer.json").exists()
    loaded = load_model(str(folder))
    assert loaded.tokenizer_source == str(folder) and loaded.bos_token_id == 0 and loaded.special_token_ids == (0, 1)
    tokenizer = loaded.tokenizer
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|bos|>", "<|endoftext|>")
    assert tokenizer.decode([450]) == "def" and tokenizer.convert_ids_to_tokens(1) == "<|endoftext|>"
    raw = Tokenizer.from_file(str(ARTIFACTS_DIR / TOKENIZER_FILE))
    context = load_heldout_tokens(ARTIFACTS_DIR / HELDOUT_FILE)[0].tolist()
    assert context[0] == 0 and tokenizer.decode(context) == raw.decode(context, skip_special_tokens=False)
    text = "def f(x):\n    return x + 12"
    assert loaded.model.to_tokens(text)[0].tolist() == [0] + raw.encode(text, add_special_tokens=False).ids
    assert loaded.model.to_string(loaded.model.to_tokens(text)[0, 1:]) == text


def test_an_explicit_tokenizer_overrides_the_folders(tmp_path):
    write_folder(tmp_path / "m")
    save_pretrained_tokenizer(tmp_path / "m", bos_token="<go>", eos_token="<stop>")
    other = tmp_path / "other.json"  # a bare file: roles from the special tokens' names
    word_tokenizer(["a", "b", "<unk>"], specials=["<|bos|>"]).save(str(other))
    for given in (other, str(other)):
        loaded = load_model(tmp_path / "m", tokenizer=given)
        assert loaded.tokenizer_source == str(other) and loaded.bos_token_id == 3
        assert loaded.model.to_tokens("b a").tolist() == [[3, 1, 0]]
    # A folder (save_pretrained's files), and its tokenizer.json named directly (the config beside it is read).
    save_pretrained_tokenizer(tmp_path / "tok", bos_token="<stop>", eos_token="<go>")
    for given in (tmp_path / "tok", tmp_path / "tok" / "tokenizer.json"):
        loaded = load_model(tmp_path / "m", tokenizer=given)
        assert loaded.tokenizer_source == str(tmp_path / "tok") and loaded.bos_token_id == 1
    # A tokenizer object is used as it is.
    from transformers import PreTrainedTokenizerFast

    mine = PreTrainedTokenizerFast(tokenizer_object=word_tokenizer(), bos_token="<go>", add_bos_token=True)
    assert load_model(tmp_path / "m", tokenizer=mine).tokenizer is mine


def test_a_tokenizer_name_that_is_no_path_goes_to_the_hub(tmp_path, monkeypatch):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    asked = []

    def fake_auto(name, **kwargs):
        asked.append(name)
        if name == "nobody/nothing":
            raise OSError("nobody/nothing is not a local folder and is not a valid model identifier")
        return PreTrainedTokenizerFast(tokenizer_object=word_tokenizer(), bos_token="<go>")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", fake_auto)
    write_folder(tmp_path / "m")
    loaded = load_model(tmp_path / "m", tokenizer="someone/tok")
    assert asked == ["someone/tok"] and loaded.tokenizer_source == "someone/tok (Hugging Face hub)"
    assert loaded.bos_token_id == 0 and loaded.tokenizer.add_bos_token
    with pytest.raises(CheckpointError, match=r"tokenizer 'nobody/nothing' is neither a local file or folder nor a "
                                              r"Hugging Face tokenizer that could be loaded \(OSError: nobody"):
        load_model(tmp_path / "m", tokenizer="nobody/nothing")


def test_a_hub_model_takes_an_explicit_tokenizer_in_place_of_transformer_lens_default(tmp_path, monkeypatch):
    from transformer_lens import HookedTransformer

    seen = {}

    def fake_from_pretrained(name, **kwargs):
        seen.update(kwargs)
        return HookedTransformer(tiny_config(), tokenizer=kwargs.get("tokenizer"))

    monkeypatch.setattr(HookedTransformer, "from_pretrained", fake_from_pretrained)
    path = tmp_path / "tokenizer.json"
    word_tokenizer(specials=["<|bos|>"]).save(str(path))
    loaded = load_model("gelu-2l", tokenizer=path)
    assert seen["tokenizer"] is loaded.tokenizer and loaded.tokenizer_source == str(path)
    assert loaded.bos_token_id == 10 and f"tokenizer {path}" in loaded.describe()
    seen.clear()
    plain = load_model("gelu-2l")  # TransformerLens's own tokenizer (none for this stand-in) is left alone
    assert "tokenizer" not in seen
    assert plain.tokenizer is None and plain.tokenizer_source is None and plain.special_token_ids == ()
    big = tmp_path / "big.json"
    word_tokenizer([f"w{i}" for i in range(40)] + ["<unk>"]).save(str(big))
    with pytest.raises(CheckpointError, match=r"has token ids up to 40 but model gelu-2l has d_vocab=30"):
        load_model("gelu-2l", tokenizer=big)
    # TransformerLens's own tokenizer is recorded as such.
    from sparsedecomp.loading.models import load_tokenizer

    default = load_tokenizer(path)[0]
    monkeypatch.setattr(HookedTransformer, "from_pretrained",
                        lambda name, **kwargs: HookedTransformer(tiny_config(), tokenizer=default))
    own = load_model("gelu-2l")
    assert own.tokenizer_source == "gelu-2l (TransformerLens's default)" and own.bos_token_id == 10


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda d: d / "missing.json", CheckpointNotFoundError,
         r"tokenizer not found: no file or folder .*missing\.json$"),
        (lambda d: (d / "empty").mkdir() or d / "empty", CheckpointNotFoundError,
         r"tokenizer folder .*empty holds no tokenizer\.json"),
        (lambda d: (d / "t.json").write_text("not json {") and d / "t.json", CheckpointError,
         r"tokenizer file .*t\.json is not JSON"),
        (lambda d: (d / "t.json").write_text('{"hooked_transformer_config": {}}') and d / "t.json", CheckpointError,
         r"t\.json is not a Hugging Face tokenizers file \(tokenizer\.json\): it has no 'model' \(found "
         r"\['hooked_transformer_config'\]\)"),
        (lambda d: (d / "t.json").write_text('{"model": {"type": "Nope"}}') and d / "t.json", CheckpointError,
         r"t\.json is not a readable Hugging Face tokenizers file: "),
        (lambda d: word_tokenizer([f"w{i}" for i in range(40)] + ["<unk>"]).save(str(d / "big.json")) or d / "big.json",
         CheckpointError, r"tokenizer .*big\.json has token ids up to 40 but model .*m has d_vocab=30: it is not this "
                          r"model's tokenizer"),
    ],
    ids=["missing", "folder-without-tokenizer", "not-json", "json-not-a-tokenizer", "malformed", "vocab-too-large"],
)
def test_bad_tokenizers_are_refused_by_name(tmp_path, make, error, message):
    write_folder(tmp_path / "m")
    with pytest.raises(error, match=message) as info:
        load_model(tmp_path / "m", tokenizer=make(tmp_path))
    assert "\n" not in str(info.value)


def test_a_folder_whose_own_tokenizer_does_not_fit_is_refused_and_a_lone_config_warns(tmp_path):
    write_folder(tmp_path / "m")
    word_tokenizer([f"w{i}" for i in range(40)] + ["<unk>"]).save(str(tmp_path / "m" / "tokenizer.json"))
    with pytest.raises(CheckpointError, match=r"tokenizer .*m has token ids up to 40 but model .*m has d_vocab=30"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / "tokenizer.json").write_text('{"version": "1.0"}')
    with pytest.raises(CheckpointError, match=r"tokenizer\.json is not a Hugging Face tokenizers file"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / "tokenizer.json").unlink()
    (tmp_path / "m" / "tokenizer_config.json").write_text('{"bos_token": "<s>"}')
    with pytest.warns(UserWarning, match=r"holds tokenizer_config\.json but no tokenizer\.json"):
        assert load_model(tmp_path / "m").tokenizer is None
    with pytest.raises(TypeError, match="tokenizer must be a tokenizer.json file, a folder holding one"):
        load_model(tmp_path / "m", tokenizer=3)
