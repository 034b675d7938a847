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


def test_max_length_truncates():
    enc = TextEncoder.build(preset("t5-tiny"))
    ids, mask = enc.tokenize(["x" * 1000])
    assert ids.shape[1] == enc.config.max_length


def test_missing_pretrained_path_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not found locally"):
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
