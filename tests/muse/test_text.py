import io
import json
import os
import subprocess
import sys
import warnings
from dataclasses import replace

import pytest
import torch

from muse.config import preset
from muse.text import TextEncoder


def test_offline_default_builds_and_encodes():
    torch.manual_seed(0)
    enc = TextEncoder.build(preset("t5-tiny"))
    emb, mask = enc(["a red circle", "two blue squares on the left and a green triangle on the right", ""])
    assert emb.shape[0] == 3 and emb.shape[2] == enc.dim == 64
    assert mask.dtype == torch.bool and mask.shape == emb.shape[:2]
    assert mask[2].sum() == 1  # the empty prompt is just the end-of-sequence token
    assert (emb[~mask] == 0).all()  # padding carries nothing
    # Byte-level: different captions give different embeddings.
    assert not torch.allclose(emb[0, :5], emb[1, :5])


@pytest.mark.parametrize("feed_forward_proj", ["relu", "gated-gelu", "gelu", "gated-silu"])
def test_our_t5_encoder_equals_transformers_on_its_weights(feed_forward_proj):
    """muse.t5 has T5EncoderModel's module and weight names and its forward: the same weights give the
    same hidden states, padded keys included (three blocks, so the first block's position bias is shared)."""
    from transformers import T5Config, T5EncoderModel

    from muse.t5 import T5Encoder, T5EncoderConfig

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=300, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_heads=4,
                   feed_forward_proj=feed_forward_proj, dropout_rate=0.0)
    hf = T5EncoderModel(cfg).eval()
    ours = T5Encoder(T5EncoderConfig.from_dict(cfg.to_dict())).eval()
    ours.load_state_dict(hf.state_dict())  # strict: every name matches
    ids = torch.randint(0, 300, (3, 150))  # past max_distance, so the log-spaced buckets are used
    mask = torch.ones(3, 150, dtype=torch.bool)
    mask[1, 100:], mask[2, 5:] = False, False
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        torch.testing.assert_close(ours(ids, mask), ref, rtol=1e-5, atol=1e-5)
    assert T5Config.from_dict(ours.config.to_dict()).feed_forward_proj == feed_forward_proj


def test_loading_a_text_encoder_does_not_import_transformers(tmp_path):
    """Training workers and Serve replicas load the text encoder: transformers (its T5 modeling and its
    tokenizers, seconds to import) stays out of them, for a ByT5 and a fitted BPE vocabulary alike, and
    the ids and padding are transformers' own."""
    from muse import checkpoint
    from muse.checkpoint import component_uri, init_model_root

    root = str(tmp_path / "root")
    init_model_root("tiny", root, components=("text_encoder",))
    torch.manual_seed(0)
    built = {"byt5": TextEncoder.build(preset("t5-tiny")), "bpe": TextEncoder.build(preset("t5-tiny-bpe"), CAPTIONS)}
    checkpoint.save_component(built["bpe"], str(tmp_path / "bpe"))
    prompts = [CAPTIONS[0], "", "a hexagon, über Ünïcode 🙂", "x" * 1000]
    for name, uri in (("byt5", component_uri(root, "text_encoder")), ("bpe", str(tmp_path / "bpe"))):
        probe = f"""
import sys
from muse.checkpoint import load_component
enc = load_component({uri!r})
ids, mask = enc.tokenize({prompts!r})
print(ids.tolist(), mask.tolist())
emb, mask = enc(["a red circle"])
assert emb.shape[0] == 1 and mask.all()
assert "transformers" not in sys.modules and "torch._dynamo" not in sys.modules, [m for m in sys.modules if m.startswith("transformers")][:3]
"""
        out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout
        ids, mask = built[name].tokenize(prompts)  # transformers' tokenizer, padded by transformers
        reference = built[name].tokenizer(prompts, padding="longest", truncation=True,
                                          max_length=built[name].config.max_length, return_tensors="pt")
        assert torch.equal(ids, reference["input_ids"]) and torch.equal(mask, reference["attention_mask"].bool())
        assert out.strip() == f"{ids.tolist()} {mask.tolist()}", name
    # A loaded BPE encoder decodes as transformers does, and saves its tokenizer again as it found it.
    again = checkpoint.load_component(str(tmp_path / "bpe"))
    rows = [built["bpe"].tokenizer(p)["input_ids"] for p in prompts]
    assert again.tokenizer.batch_decode(rows, skip_special_tokens=True) == \
        built["bpe"].tokenizer.batch_decode(rows, skip_special_tokens=True)
    checkpoint.save_component(again, str(tmp_path / "bpe2"))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "bpe2" / f).read_text() == (tmp_path / "bpe" / f).read_text()
    assert torch.equal(checkpoint.load_component(str(tmp_path / "bpe2")).tokenize(prompts)[0], ids)


CAPTIONS = ["two red squares on the left and a blue circle on the right", "a green triangle",
            "three yellow circles at the top and a red square at the bottom", "a purple square"] * 20


def test_bpe_encoder_fits_the_captions_and_round_trips_through_a_checkpoint(tmp_path):
    from muse import checkpoint

    torch.manual_seed(0)
    enc = TextEncoder.build(preset("t5-tiny-bpe"), CAPTIONS)
    caption = CAPTIONS[0]
    ids, mask = enc.tokenize([caption, "a hexagon, über Ünïcode 🙂", ""])
    assert int(mask[0].sum()) == len(caption.split()) + 1  # a token per word, then end of sequence
    assert len(enc.tokenizer) <= enc.config.vocab_size == enc.model.config.vocab_size
    tok = enc.tokenizer
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)  # T5's special ids
    assert int(mask[2].sum()) == 1 and ids[2, 0] == 1  # the empty prompt is end of sequence alone
    assert not (ids[1][mask[1]] == tok.unk_token_id).any()  # byte-level: unseen words come as pieces
    assert tok.decode(ids[1][mask[1]], skip_special_tokens=True).strip() == "a hexagon, über Ünïcode 🙂"
    checkpoint.save_component(enc, str(tmp_path / "te"))
    again = checkpoint.load_component(str(tmp_path / "te"))
    assert torch.equal(again.tokenize([caption])[0], enc.tokenize([caption])[0])
    assert torch.allclose(again([caption])[0], enc([caption])[0])


def test_bpe_encoder_needs_captions_and_room_for_the_bytes():
    with pytest.raises(ValueError, match="fits its vocabulary to the corpus's captions"):
        TextEncoder.build(preset("t5-tiny-bpe"))
    from muse.config import TextEncoderConfig

    with pytest.raises(ValueError, match="vocab_size must be >= 259"):
        TextEncoderConfig(tokenizer="bpe", vocab_size=100)
    with pytest.raises(ValueError, match="'byt5' or 'bpe'"):
        TextEncoderConfig(tokenizer="sentencepiece")


def test_max_length_truncates_and_says_so():
    enc = TextEncoder.build(preset("t5-tiny"))
    with pytest.warns(UserWarning, match=f"longer than the text encoder's {enc.config.max_length} tokens are cut"):
        ids, mask = enc.tokenize(["a red circle", "x" * 1000])
    assert ids.shape[1] == enc.config.max_length
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a prompt that fits says nothing, even one near the limit
        enc.tokenize(["a red circle", "y" * (enc.config.max_length - 1)])


def test_missing_pretrained_path_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="neither a local directory nor in the local Hugging Face cache"):
        TextEncoder.load_pretrained(str(tmp_path / "nope"))


def test_loads_a_hugging_face_t5_directory(tmp_path):
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    torch.manual_seed(0)
    hf = T5EncoderModel(T5Config(vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4))
    hf.save_pretrained(tmp_path / "t5")
    ByT5Tokenizer().save_pretrained(tmp_path / "t5")
    enc = TextEncoder.load_pretrained(str(tmp_path / "t5"))
    assert enc.dim == 32 and enc.config.d_model == 32
    emb, _ = enc(["hello"])
    ids, mask = enc.tokenize(["hello"])
    ref = hf.eval()(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    assert torch.allclose(emb, ref, atol=1e-6)


def _t5_folder(path, full: bool = False, weights: str = "bin", d_model: int = 32):
    """A Hugging Face T5 folder as official ones ship: config.json, a tokenizer, and only
    pytorch_model.bin (or model.safetensors); `full` = an encoder-decoder checkpoint."""
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=384, d_model=d_model, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=4,
                   feed_forward_proj="gated-gelu")
    hf = (T5ForConditionalGeneration if full else T5EncoderModel)(cfg).eval()
    path.mkdir()
    cfg.save_pretrained(path)
    ByT5Tokenizer().save_pretrained(path)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    if weights == "bin":
        torch.save(state, path / "pytorch_model.bin")  # the legacy format, as an official folder holds it
    else:
        from safetensors.torch import save_file

        save_file({k: v.clone() for k, v in state.items()}, str(path / "model.safetensors"))
    return hf.encoder if full else hf


@pytest.mark.parametrize("full", [False, True])
def test_a_t5_folder_with_only_pytorch_model_bin_loads(tmp_path, full):
    hf = _t5_folder(tmp_path / "t5", full=full)
    enc = TextEncoder.load_pretrained(str(tmp_path / "t5"))
    assert enc.dim == 32 and not any(p.is_meta for p in enc.parameters())
    ids, mask = enc.tokenize(["hello there"])
    emb, _ = enc(["hello there"])
    ref = hf(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    torch.testing.assert_close(emb, ref * mask[..., None], rtol=0, atol=1e-6)


def test_bin_loading_never_unpickles_code(tmp_path, monkeypatch):
    _t5_folder(tmp_path / "t5")
    seen = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: seen.append(k.get("weights_only")) or real_load(*a, **k))
    TextEncoder.load_pretrained(str(tmp_path / "t5"))
    assert seen == [True]


def test_dtype_option(tmp_path):

    from muse.text import resolve_dtype

    _t5_folder(tmp_path / "t5", weights="safetensors")
    enc = TextEncoder.load_pretrained(str(tmp_path / "t5"), replace(preset("t5-tiny"), dtype="bfloat16"))
    assert {p.dtype for p in enc.parameters()} == {torch.bfloat16}
    emb, _ = enc(["hello"])
    assert emb.dtype == torch.bfloat16 and torch.isfinite(emb).all()
    assert resolve_dtype("auto", "cpu") == torch.float32 and resolve_dtype("auto", "cuda:0") == torch.bfloat16
    with pytest.raises(ValueError, match="float16 is not offered"):
        resolve_dtype("float16", "cpu")


def test_a_folder_without_weights_says_so(tmp_path):
    from transformers import T5Config

    T5Config(d_model=32).save_pretrained(tmp_path / "t5")
    with pytest.raises(ValueError, match="no weights in .*pytorch_model.bin"):
        TextEncoder.load_pretrained(str(tmp_path / "t5"))


def test_a_folder_of_another_architecture_is_a_clear_error(tmp_path):
    _t5_folder(tmp_path / "t5")
    config = json.loads((tmp_path / "t5" / "config.json").read_text())
    (tmp_path / "t5" / "config.json").write_text(json.dumps(config | {"model_type": "umt5"}))
    with pytest.raises(ValueError, match="holds a 'umt5' model"):
        TextEncoder.load_pretrained(str(tmp_path / "t5"))


def test_a_text_encoder_of_the_wrong_width_is_a_clear_error(tmp_path):
    from muse.pipeline import MusePipeline

    _t5_folder(tmp_path / "t5")
    tiny = MusePipeline.from_preset("tiny")  # its transformers read 64-wide text
    wrong = TextEncoder.load_pretrained(str(tmp_path / "t5"))  # 32 wide
    with pytest.raises(ValueError, match="32-wide embeddings but base reads text_dim 64"):
        MusePipeline(wrong, tiny.vqgan_lo, tiny.base, tiny.vqgan_hi, tiny.superres)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_root_may_reference_its_text_encoder(tmp_path, where, request):
    """The root's text_encoder/ holds only config.json naming a T5 folder (local or on S3)."""

    from muse import storage
    from muse.checkpoint import WEIGHTS_FILE, component_uri, load_component, save_reference
    from muse.tokenizer import load_tokenizer

    hf = _t5_folder(tmp_path / "t5")
    folder = str(tmp_path / "t5")
    if where == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        for f in (tmp_path / "t5").iterdir():
            storage.write_bytes(f"{bucket}/encoders/t5/{f.name}", f.read_bytes())
        folder = f"{bucket}/encoders/t5"
    root = str(tmp_path / "root")
    save_reference(replace(preset("t5-tiny"), name_or_path=folder, d_model=32), component_uri(root, "text_encoder"))
    assert not (tmp_path / "root" / "text_encoder" / WEIGHTS_FILE).exists()
    enc = load_component(component_uri(root, "text_encoder"), expect_kind="text_encoder")
    ids, mask = enc.tokenize(["hello"])
    ref = hf(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    torch.testing.assert_close(enc(["hello"])[0], ref, rtol=0, atol=1e-6)
    # The tokenizer alone (what tokenization and the API's usage count need) comes from the named folder.
    tokenizer, max_length = load_tokenizer(component_uri(root, "text_encoder"))
    assert tokenizer(["hello"])["input_ids"][0] == ids[0][mask[0]].tolist() and max_length == enc.config.max_length
    with pytest.raises(ValueError, match="reference"):
        save_reference(preset("t5-tiny"), str(tmp_path / "other"))
    # A folder that is not there is refused when the reference is written, not at its first load.
    with pytest.raises(ValueError, match="neither a local directory"):
        save_reference(replace(preset("t5-tiny"), name_or_path=str(tmp_path / "nowhere")), str(tmp_path / "other"))
    assert not (tmp_path / "other").exists()


def test_byt5_ids_match_the_byt5_tokenizer_without_importing_transformers():
    import random

    from transformers import ByT5Tokenizer

    from muse.tokenizer import ByT5Ids

    rng = random.Random(0)
    alphabet = "ab <>/éß漢🙂\t\n\u00a0sunkpadextra_id0123456789"
    captions = ["two red squares on the left", "", " ", "é🙂", "x</s>y", "x </s> y", "ab</s>", "<pad>", "\t<unk>\n",
                "a <extra_id_0> b", "<extra_id_124>", "<extra_id_125>", "<extra_id_007>", "<extra_id_<pad>", "a" * 300]
    captions += ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40))) for _ in range(300)]
    ours, theirs = ByT5Ids(), ByT5Tokenizer()
    for max_length in (1, 2, 5, 128):
        assert ours(captions, truncation=True, max_length=max_length)["input_ids"] == \
            theirs(captions, truncation=True, max_length=max_length)["input_ids"]
    for caption in captions[:20]:  # one string, as the API's usage count calls it
        assert ours(caption, truncation=True, max_length=16)["input_ids"] == \
            theirs(caption, truncation=True, max_length=16)["input_ids"]
    probe = ("import sys; from muse.tokenizer import ByT5Ids; ids = ByT5Ids()(['a red circle'], truncation=True, "
             "max_length=8)['input_ids']; assert ids == [[100, 35, 117, 104, 103, 35, 102, 1]], ids; "
             "assert 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", probe], check=True)


def test_a_fitted_bpe_loads_for_ids_without_transformers_and_gives_its_ids(tmp_path):

    from transformers import AutoTokenizer

    from muse import checkpoint
    from muse.tokenizer import TokenizerJsonIds, load_tokenizer

    enc = TextEncoder.build(preset("t5-tiny-bpe"), CAPTIONS)
    uri = str(tmp_path / "te")
    checkpoint.save_component(enc, uri)
    ours, max_length = load_tokenizer(uri)
    assert isinstance(ours, TokenizerJsonIds) and max_length == enc.config.max_length
    theirs = AutoTokenizer.from_pretrained(uri, local_files_only=True)
    captions = CAPTIONS[:4] + ["", " ", "a hexagon, über Ünïcode 🙂", "</s> <pad> <unk>", "red " * 200]
    for length in (1, 3, 16, max_length):
        assert ours(captions, truncation=True, max_length=length)["input_ids"] == \
            theirs(captions, truncation=True, max_length=length)["input_ids"]
    assert ours(captions[0], truncation=True, max_length=8)["input_ids"] == \
        theirs(captions[0], truncation=True, max_length=8)["input_ids"]
    assert ours(captions)["input_ids"] == theirs(captions)["input_ids"]  # no truncation
    probe = (f"import sys; from muse.tokenizer import load_tokenizer; tok, n = load_tokenizer({uri!r}); "
             "ids = tok(['a green triangle'], truncation=True, max_length=n)['input_ids']; "
             "assert ids[0][-1] == 1, ids; assert 'transformers' not in sys.modules and 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", probe], check=True)


def test_a_t5_folder_with_a_tokenizer_json_gives_t5s_ids_without_transformers(tmp_path):
    """T5 folders (flan-t5 and others) ship a tokenizer.json: its ids, legacy and not."""
    from transformers import AutoTokenizer

    for legacy in (True, False):
        folder = t5_tokenizer_folder(tmp_path, legacy)
        _assert_t5_ids_without_transformers(folder, AutoTokenizer.from_pretrained(folder, local_files_only=True))


def test_a_root_referencing_a_t5_folder_with_only_its_sentencepiece_model_gives_ids_without_transformers(tmp_path):
    """t5-v1_1-xxl ships spiece.model and no tokenizer.json. A root that references such a folder keeps
    the tokenizer.json that transformers converts from it, so its ids load without transformers and
    equal AutoTokenizer's on the folder."""
    from transformers import AutoTokenizer

    from muse.checkpoint import component_uri, save_reference

    for legacy in (True, False):
        folder = t5_tokenizer_folder(tmp_path, legacy, tokenizer_json=False)
        root = str(tmp_path / f"root-{legacy}")
        save_reference(replace(preset("t5-tiny"), name_or_path=folder), component_uri(root, "text_encoder"))
        assert os.path.exists(os.path.join(component_uri(root, "text_encoder"), "tokenizer.json"))
        _assert_t5_ids_without_transformers(component_uri(root, "text_encoder"),
                                            AutoTokenizer.from_pretrained(folder, local_files_only=True))


def t5_tokenizer_folder(tmp_path, legacy: bool, tokenizer_json: bool = True) -> str:
    """A T5 tokenizer folder as the hub's are, over a sentencepiece model trained here on the corpus's
    captions in place of T5's: spiece.model and tokenizer_config.json (t5-v1_1-xxl ships these), plus
    the tokenizer.json that transformers converts from them when `tokenizer_json` (flan-t5 ships one)."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    folder = tmp_path / f"t5-legacy-{legacy}-json-{tokenizer_json}"
    folder.mkdir()
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CAPTIONS), model_writer=model, vocab_size=40,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)
    (folder / "spiece.model").write_bytes(model.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "T5Tokenizer", "extra_ids": 10, "legacy": legacy, "model_max_length": 512,
        "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}))
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert 2 not in tokenizer(CAPTIONS[0])["input_ids"]  # a real vocabulary: no <unk> in a corpus caption
    if tokenizer_json:
        tokenizer.save_pretrained(str(folder))
    assert (folder / "tokenizer.json").exists() == tokenizer_json
    return str(folder)


def _assert_t5_ids_without_transformers(uri: str, theirs) -> None:
    """`load_tokenizer(uri)` is a TokenizerJsonIds giving `theirs`'s ids at four lengths, hard strings
    included, and loads in a process that imports neither transformers nor torch."""
    from muse.tokenizer import TokenizerJsonIds, load_tokenizer

    captions = CAPTIONS[:4] + ["", " ", "RED  Squares!!", "über Ünïcode 🙂", "<extra_id_0> x", "a </s> b",
                              "  around  ", "a\u00a0b", "red " * 200]
    ours, max_length = load_tokenizer(uri)
    assert isinstance(ours, TokenizerJsonIds)
    for length in (1, 4, 16, max_length):
        assert ours(captions, truncation=True, max_length=length)["input_ids"] == \
            theirs(captions, truncation=True, max_length=length)["input_ids"]
    probe = (f"import sys; from muse.tokenizer import load_tokenizer; tok, n = load_tokenizer({uri!r}); "
             "ids = tok('a green triangle', truncation=True, max_length=n)['input_ids']; assert ids[-1] == 1, ids; "
             "assert 'transformers' not in sys.modules and 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", probe], check=True)


def test_muse_init_references_a_t5_folder_of_the_transformers_width(tmp_path, capsys):
    """On a cluster no node has a Hugging Face cache: `muse init --text-encoder DIR` makes the root
    reference a T5 copy every node reads (local or s3://), without loading it; a T5 of another width
    than the transformers read is refused at once, not at the first request."""
    from muse.checkpoint import component_uri, load_component, read_meta
    from muse.cli import init_main

    _t5_folder(tmp_path / "t5-32")
    fits = _t5_folder(tmp_path / "t5-64", d_model=64)
    root = str(tmp_path / "root")
    with pytest.raises(SystemExit) as exit_:
        init_main(["--preset", "tiny", "--out", root, "--text-encoder", str(tmp_path / "t5-32")])
    assert exit_.value.code == 2  # a refusal, as argparse's are
    assert "gives 32-wide embeddings, but base reads text_dim 64, superres reads text_dim 64" in capsys.readouterr().err
    init_main(["--preset", "tiny", "--out", root])
    base = (tmp_path / "root" / "base" / "model.safetensors").read_bytes()
    init_main(["--preset", "tiny", "--out", root, "--components", "text_encoder", "--force",
               "--text-encoder", str(tmp_path / "t5-64")])  # the rest of the root stays as it is
    assert f"wrote a text_encoder that references {tmp_path / 't5-64'} (nothing copied) to {root}" in \
        capsys.readouterr().out
    assert (tmp_path / "root" / "base" / "model.safetensors").read_bytes() == base
    meta = read_meta(component_uri(root, "text_encoder"))
    assert meta["reference"] and meta["config"]["name_or_path"] == str(tmp_path / "t5-64")
    # Components that would not work with what the root keeps are refused, and the root stays whole.
    xxl = tmp_path / "t5-xxl"
    xxl.mkdir()
    (xxl / "config.json").write_text(json.dumps({"d_model": 4096}))  # its width is all that is read
    capsys.readouterr()
    for argv, why in ((["--components", "text_encoder", "--text-encoder", str(xxl)],
                       "text_encoder would not fit the vqgan_lo, vqgan_hi, base, superres that"),
                      (["--components", "base"], "gives 64-wide embeddings but base reads text_dim 4096")):
        with pytest.raises(SystemExit) as exit_:
            init_main(["--preset", "muse-632m", *argv, "--out", root, "--force"])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and why in err, err
    assert read_meta(component_uri(root, "text_encoder")) == meta
    assert (tmp_path / "root" / "base" / "model.safetensors").read_bytes() == base
    encoder = load_component(component_uri(root, "text_encoder"))
    ids, mask = encoder.tokenize(["a red circle"])
    assert torch.allclose(encoder.encode_ids(ids, mask), fits(input_ids=ids, attention_mask=mask).last_hidden_state)


def test_a_referenced_text_encoder_is_saved_again_as_the_reference_not_a_copy(tmp_path):
    """`MusePipeline.save_pretrained` of a root whose T5 is referenced writes the reference again (into
    another root, or over the root itself): a copy would be ~19 GB of T5-XXL per root, in the dtype it
    was loaded in. A reference saved over a component that held weights replaces it whole."""
    from muse.checkpoint import component_uri, init_model_root, read_meta, save_component
    from muse.pipeline import MusePipeline

    _t5_folder(tmp_path / "t5-64", d_model=64)
    root, out = str(tmp_path / "root"), str(tmp_path / "out")
    init_model_root("tiny", root, text_encoder=str(tmp_path / "t5-64"))
    pipe = MusePipeline.from_pretrained(root)
    save_component(MusePipeline.from_preset("tiny").text_encoder, component_uri(out, "text_encoder"))  # a copy
    for target in (out, root):
        pipe.save_pretrained(target)
        meta = read_meta(component_uri(target, "text_encoder"))
        assert meta["reference"] and meta["config"]["name_or_path"] == str(tmp_path / "t5-64")
        assert not (tmp_path / target / "text_encoder" / "model.safetensors").exists()
    assert MusePipeline.from_pretrained(out).text_encoder.referenced
