"""Caption ids without torch: which tokenizer a text encoder uses, loaded without building the encoder.

Tokenization stores ids (`text_storage: ids`) made in processes that never run the encoder (its
caption-id tasks, its VQGAN actors, the API front end's usage count); none of them imports torch or,
for the offline default ByT5, transformers. `muse.text` holds the encoder itself.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from typing import Any

from muse import storage
from muse.components import KINDS, CheckpointError, parse_config, read_meta
from muse.config import TextEncoderConfig


def text_encoder_config(uri: str):
    """The config of a muse text-encoder component (T5, or an imported aMUSEd root's CLIP), or None for
    a Hugging Face directory/name."""
    return text_component(uri)[0]


def text_component(uri: str) -> tuple[Any, dict[str, Any] | None]:
    """(`text_encoder_config`, its config.json), from one read of the file; (None, None) for a Hugging
    Face directory/name."""
    try:
        meta = read_meta(uri)
        cfg = parse_config(meta, uri)
    except (CheckpointError, OSError, ValueError):
        return None, None
    if KINDS[meta["kind"]].role != "text_encoder":
        raise ValueError(f"{uri} holds a {meta['kind']!r} component, not a text encoder")
    return cfg, meta


BYT5_SPECIALS = ("<pad>", "</s>", "<unk>", *(f"<extra_id_{i}>" for i in range(125)))


class ByT5Ids:
    """ByT5Tokenizer's ids for the calls that tokenization and serving make (`tok(text_or_texts,
    truncation=True, max_length=L)["input_ids"]`), without importing transformers (~0.7 s and 24 MB
    in every tokenization actor) and ~20x faster per caption (2 us against 39).

    A caption is its UTF-8 bytes + 3, cut to max_length - 1, then end of sequence (1): exactly what
    ByT5Tokenizer gives unless the caption holds one of its special-token strings ("</s>", "<pad>",
    "<unk>", "<extra_id_N>"), whose rules (stripping the whitespace around some, no second end token)
    are its own; such a caption, and any other kind of call, goes to ByT5Tokenizer itself."""

    pad_token_id = 0

    def __init__(self):
        self._hf = None

    def __call__(self, text, truncation: bool = False, max_length: int | None = None, **kwargs):
        texts = [text] if isinstance(text, str) else list(text)
        if kwargs or (max_length is not None and max_length < 1) or any(
                "<" in t and any(s in t for s in BYT5_SPECIALS) for t in texts):
            return self.hf(text, truncation=truncation, max_length=max_length, **kwargs)
        keep = max_length - 1 if truncation and max_length is not None else None
        return _encoded(text, [[b + 3 for b in t.encode("utf-8")[:keep]] + [1] for t in texts])

    @property
    def hf(self):
        if self._hf is None:
            from transformers import ByT5Tokenizer

            self._hf = ByT5Tokenizer()
        return self._hf

    def save_pretrained(self, directory: str) -> None:
        self.hf.save_pretrained(directory)

    def batch_decode(self, ids: list[list[int]], skip_special_tokens: bool = False) -> list[str]:
        return self.hf.batch_decode(ids, skip_special_tokens=skip_special_tokens)


# tokenizer_config.json's classes whose ids are their tokenizer.json's and nothing else: what
# `fit_bpe_tokenizer` saves (transformers 5 writes the first name, earlier versions the second), and
# T5's fast tokenizer (every setting of it lives in the tokenizer.json: tested, legacy or not).
TOKENIZER_JSON_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast", "T5Tokenizer", "T5TokenizerFast")
TOKENIZER_JSON = "tokenizer.json"


class TokenizerJsonIds:
    """Ids from a tokenizer.json through the `tokenizers` library, which is what transformers' fast
    tokenizer calls for them, without importing transformers (1.6 s in a fresh process, torch
    included). For the BPE vocabulary that `fit_bpe_tokenizer` fits and for T5 folders that ship a
    tokenizer.json; same call as `ByT5Ids`."""

    def __init__(self, tokenizer_json: str, files: dict[str, str] | None = None):
        self.tokenizer_json = tokenizer_json
        self.files = files or {TOKENIZER_JSON: tokenizer_json}  # what `save_pretrained` writes back
        self._backends: dict[int | None, Any] = {}  # one per truncation length: settings are per object

    @property
    def pad_token_id(self) -> int:
        return self._backend(None).token_to_id("<pad>") or 0

    def batch_decode(self, ids: list[list[int]], skip_special_tokens: bool = False) -> list[str]:
        return self._backend(None).decode_batch(ids, skip_special_tokens=skip_special_tokens)

    def save_pretrained(self, directory: str) -> None:
        for name, text in self.files.items():
            storage.write_text(storage.join(directory, name), text)

    def __call__(self, text, truncation: bool = False, max_length: int | None = None, **kwargs):
        if kwargs:
            raise TypeError(f"caption ids take truncation and max_length only, not {sorted(kwargs)}")
        backend = self._backend(max_length if truncation else None)
        return _encoded(text, [e.ids for e in backend.encode_batch([text] if isinstance(text, str) else list(text))])

    def _backend(self, length: int | None):
        backend = self._backends.get(length)
        if backend is None:
            from tokenizers import Tokenizer

            backend = Tokenizer.from_str(self.tokenizer_json)
            backend.no_padding()
            if length is None:
                backend.no_truncation()
            else:
                backend.enable_truncation(length)
            self._backends[length] = backend
        return backend


def _encoded(text, ids: list[list[int]]) -> dict:
    """A tokenizer call's result, as transformers shapes it: one sequence for a string, a list for a list
    (no padding, so every attention mask is all ones)."""
    mask = [[1] * len(x) for x in ids]
    return {"input_ids": ids[0], "attention_mask": mask[0]} if isinstance(text, str) else \
        {"input_ids": ids, "attention_mask": mask}


def load_tokenizer(uri: str):
    """(tokenizer, max_length) of a text encoder, without building the encoder (ids need no model).
    `uri`: a muse text_encoder component, or a Hugging Face directory or cache name; local or s3://. A
    component that references its weights (T5-XXL, `checkpoint.save_reference`) has its tokenizer
    with them, in the directory it names, or converted beside its config (`write_tokenizer_json`).
    Most load without transformers: muse's ByT5 (the offline default) as `ByT5Ids`, a fitted BPE and
    a T5 folder with a tokenizer.json (its own or converted) as `TokenizerJsonIds`."""
    cfg, meta = text_component(uri)
    max_length = (cfg or TextEncoderConfig()).max_length
    if meta is not None and meta.get("reference"):
        converted = storage.join(uri, TOKENIZER_JSON)
        if storage.exists(converted):
            return TokenizerJsonIds(storage.read_text(converted)), max_length
        uri, cfg = cfg.name_or_path, None
    # A Hugging Face ByT5 folder keeps its own settings: only muse's ByT5 is the default ByT5Ids copies.
    return load_saved_tokenizer(uri, byt5_ids=cfg is not None), max_length


# The files a tokenizer saves beside a text encoder's weights (transformers' `save_pretrained`).
SAVED_TOKENIZER_FILES = (TOKENIZER_JSON, "tokenizer_config.json", "special_tokens_map.json")


def load_saved_tokenizer(directory: str, byt5_ids: bool = True):
    """The tokenizer saved in `directory` (local or s3://), as `TextEncoder` calls it: ByT5 (as
    `ByT5Ids` when `byt5_ids`) and a tokenizer.json without importing transformers (~1.5 s in every
    process that loads a text encoder: Serve's replica, each training worker), anything else through
    transformers. Each file is read once."""
    files = {}
    for name in SAVED_TOKENIZER_FILES:
        try:
            files[name] = storage.read_text(storage.join(directory, name))
        except FileNotFoundError:
            pass
    tok_class = json.loads(files["tokenizer_config.json"]).get("tokenizer_class", "") \
        if "tokenizer_config.json" in files else ""
    if byt5_ids and tok_class.startswith("ByT5"):
        return ByT5Ids()  # byte-level: no vocabulary files
    if tok_class in TOKENIZER_JSON_CLASSES and TOKENIZER_JSON in files:
        return TokenizerJsonIds(files[TOKENIZER_JSON], files)
    return _transformers_tokenizer(directory)


def write_tokenizer_json(folder: str, out: str) -> bool:
    """Write the tokenizer.json that transformers converts from a T5 `folder` shipping only its
    sentencepiece model (t5-v1_1-xxl does) into `out`, a component that references the folder, so
    that caption ids from it need neither transformers nor torch (`load_tokenizer`). Returns whether
    one was written: not for folders that have a tokenizer.json or hold another kind of tokenizer, nor
    where the conversion cannot run (no sentencepiece), which then loads through transformers."""
    if _tokenizer_class(folder) not in TOKENIZER_JSON_CLASSES or storage.exists(storage.join(folder, TOKENIZER_JSON)):
        return False
    try:
        backend = _transformers_tokenizer(folder).backend_tokenizer
    except (ValueError, AttributeError):
        return False
    storage.write_text(storage.join(out, TOKENIZER_JSON), backend.to_str())
    return True


def _tokenizer_class(uri: str) -> str:
    """tokenizer_config.json's tokenizer_class, "" without one."""
    tok_config = storage.join(uri, "tokenizer_config.json")
    return json.loads(storage.read_text(tok_config)).get("tokenizer_class", "") if storage.exists(tok_config) else ""


def _transformers_tokenizer(uri: str):
    """AutoTokenizer of a Hugging Face directory (local, s3:// or a cache name); ValueError if it does not load."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        local = uri
        if storage.is_s3(uri):  # the tokenizer files only, not the weights
            for f in storage.list_files(uri, recursive=False):
                if not f.endswith((".safetensors", ".bin")):
                    storage.write_bytes(os.path.join(tmp, f.rsplit("/", 1)[-1]), storage.read_bytes(f))
            local = tmp
        try:
            return AutoTokenizer.from_pretrained(local, local_files_only=True)
        except (OSError, ValueError, ImportError) as e:
            raise ValueError(f"text encoder {uri!r}: its tokenizer does not load (T5's own tokenizer needs "
                             f"sentencepiece): {e}") from e


# T5's special ids: padding 0, end of sequence 1, unknown 2 (ByT5 keeps them too).
BPE_SPECIALS = ("<pad>", "</s>", "<unk>")


def fit_bpe_tokenizer(captions: Iterable[str], vocab_size: int):
    """A byte-level BPE tokenizer (Hugging Face `tokenizers`) fitted to `captions`, at most
    `vocab_size` tokens, with T5's special ids and an end-of-sequence token after every caption.
    Byte-level: any text encodes, words it never saw as pieces or bytes, so nothing maps to <unk>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(BPE_SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(captions, trainer)
    eos = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", eos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=1 << 20)
