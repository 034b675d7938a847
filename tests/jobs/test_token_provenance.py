"""Which token shards and which --model a transformer stage takes into a model root, decided on the
driver before any work (`jobs.masked.build`): tokens made by another root's tokenizer of the same grid,
a preset of another model family, a grid the root's tokenizer does not make. Each of these trained and
left a root that samples wrongly or no longer loads. No Ray: the dataset and the run are faked."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from jobs_helpers import tiny_config

from jobs import masked, root_fit
from jobs.base import BaseWorker
from jobs.preflight import RunRefused
from jobs.superres import SuperResWorker
from muse import checkpoint, storage
from muse.components import CONFIG_FILE, FINGERPRINT
from muse.config import CLIPTextConfig, UViTConfig, VQConfig, to_dict

INFO = {"tokens_lo_side": 8, "tokens_hi_side": 16, "text_dim": 64, "text_storage": "ids"}


@pytest.fixture
def fake_run(monkeypatch):
    """masked.build with the dataset and the run faked: the jobs it hands fit_stage."""
    import jobs.data

    monkeypatch.setattr(jobs.data, "token_dataset", lambda *a, **k: ("dataset", INFO))
    from jobs.progress import say

    calls = []

    def fit_stage(worker, section, job, dataset, rows=None):  # says the stage's notes, as fit_stage does
        calls.append(job)
        for note in job.notes:
            say(note)

    monkeypatch.setattr(masked, "fit_stage", fit_stage)
    return calls


def tokens_made_by(tiny_data, out: str, **models: str) -> str:
    """A copy of the session's token shards whose _job.json says `models` (Models fields) made them."""
    from pipelines.config import load_config
    from pipelines.job_spec import job_spec
    from pipelines.shards import JOB_FILE
    from pipelines.tokenize import Models

    shutil.copytree(tiny_data.tokens, out)
    spec = job_spec(tiny_data.corpus, load_config(None), Models(**models))
    with open(os.path.join(out, JOB_FILE), "w") as f:
        json.dump(spec, f)
    return out


def uri(root: str, name: str) -> str:
    return checkpoint.component_uri(root, name)


def amused_root(path: str, tokens_per_side: int = 8) -> str:
    """A root of aMUSEd's kinds (CLIP, VQ, U-ViT) sized like the tiny tokens, as config.json files
    alone: the driver's checks read nothing else."""
    parts = {"text_encoder": ("clip_text", CLIPTextConfig(name_or_path="openai/clip-vit-large-patch14", hidden=64)),
             "vqgan_lo": ("vq", VQConfig(resolution=16 * tokens_per_side, codebook_size=512)),
             "base": ("uvit", UViTConfig(tokens_per_side=tokens_per_side, codebook_size=512, text_dim=64))}
    for name, (kind, cfg) in parts.items():
        storage.write_text(storage.join(path, name, CONFIG_FILE), json.dumps(
            {"kind": kind, "format_version": 1, "config": to_dict(cfg),
             FINGERPRINT: {"tokenizer.json": "0" * 64}}))
    return path


def test_tokens_of_another_roots_tokenizer_of_the_same_grid_are_refused(tiny_data, tmp_path, fake_run, capsys):
    """Another root's vqgan_lo (same grid and codebook, other weights) made the tokens: refused, naming
    that root, where the stage warned that the root's vqgan_lo was trained again and trained over its base."""
    other = str(tmp_path / "other")
    checkpoint.init_model_root("tiny", other, seed=3)
    tokens = tokens_made_by(tiny_data, str(tmp_path / "tokens"), vqgan_lo=uri(tiny_data.root, "vqgan_lo"),
                            text_encoder=uri(other, "text_encoder"))
    with pytest.raises(RunRefused) as refused:
        masked.build("base", BaseWorker, tiny_config(), tokens, other)
    message = str(refused.value)
    assert f"model root {tiny_data.root}" in message and "tokenize the corpus with this root" in message
    assert "trained again" not in message and "\n" not in message
    assert fake_run == [] and capsys.readouterr().out == ""  # nothing said or run before the refusal


def test_train_all_refuses_another_roots_tokens_as_another_tokenizers_not_as_retrained(tiny_data, tmp_path):
    """`train all --tokens T` over tokens another root made: the refusal names that root, not "trained
    again" (this root's tokenizer was never trained)."""
    from jobs.all import replace_stale_tokens

    other = str(tmp_path / "other")
    checkpoint.init_model_root("tiny", other, seed=3)
    tokens = tokens_made_by(tiny_data, str(tmp_path / "tokens"), vqgan_lo=uri(tiny_data.root, "vqgan_lo"),
                            text_encoder=uri(other, "text_encoder"))
    with pytest.raises(RunRefused) as refused:
        replace_stale_tokens(tokens, other, owned=False)
    message = str(refused.value)
    assert f"made by another tokenizer than the model root {other}'s (vqgan_lo of model root {tiny_data.root})" \
        in message and "trained again" not in message, message
    assert os.path.exists(tokens)  # the user's folder is never deleted
    replace_stale_tokens(tokens, tiny_data.root, owned=False)  # the root that made them: nothing to say


def test_train_all_refuses_another_roots_tokens_before_any_stage_trains(tiny_data, tmp_path, monkeypatch):
    """Not after the tokenizer stages have trained for minutes: the tokens' makers are known at once."""
    from jobs import all as train_all_module

    other = str(tmp_path / "other")
    checkpoint.init_model_root("tiny", other, seed=3)
    tokens = tokens_made_by(tiny_data, str(tmp_path / "tokens"), vqgan_lo=uri(tiny_data.root, "vqgan_lo"),
                            text_encoder=uri(other, "text_encoder"))
    ran = []
    monkeypatch.setattr(train_all_module, "ensure_ray", lambda: None)
    monkeypatch.setattr(train_all_module, "run_stage", lambda *args, **kwargs: ran.append(args[0]))
    with pytest.raises(RunRefused, match=f"vqgan_lo of model root {tiny_data.root}"):
        train_all_module.train_all(tiny_config("stages=[vqgan,base]"), str(tmp_path / "corpus"), other, tokens=tokens)
    assert ran == []


def test_a_copy_of_the_root_is_accepted_and_its_own_retrained_tokenizer_is_refused(tiny_data, tmp_path, fake_run):
    """Tokens of the root's own tokenizer as it was before it was trained again are refused, as another
    root's are: its codes now draw other images. Tokens made again are taken, and the run learns (and
    records, `codes`) the new codes."""
    from jobs.loop import finished_extra

    copy = str(tmp_path / "copy")
    shutil.copytree(tiny_data.root, copy)
    tokens = tokens_made_by(tiny_data, str(tmp_path / "tokens"), vqgan_lo=uri(tiny_data.root, "vqgan_lo"),
                            text_encoder=uri(copy, "text_encoder"))
    masked.build("base", BaseWorker, tiny_config(), tokens, copy)  # the same weights elsewhere
    assert len(fake_run) == 1

    own = tokens_made_by(tiny_data, str(tmp_path / "own"), vqgan_lo=uri(copy, "vqgan_lo"),
                         text_encoder=uri(copy, "text_encoder"))
    checkpoint.save_component(checkpoint.load_component(uri(copy, "vqgan_lo")), uri(copy, "vqgan_lo"),
                              extra=finished_extra("vqgan", 1000, "vqgan_lo"))
    assert root_fit.foreign_tokens_problem("base", copy, own, root_fit._tokenize_spec(own)) is None
    with pytest.raises(RunRefused, match="codes of the model root's vqgan_lo as it was before it was trained again"):
        masked.build("base", BaseWorker, tiny_config(), own, copy)
    # Refused too: tokens from the root as it was, read by a root whose vqgan_lo moved on.
    with pytest.raises(RunRefused, match=f"model root {tiny_data.root}"):
        masked.build("base", BaseWorker, tiny_config(), tokens, copy)
    again = tokens_made_by(tiny_data, str(tmp_path / "again"), vqgan_lo=uri(copy, "vqgan_lo"),
                           text_encoder=uri(copy, "text_encoder"))
    masked.build("base", BaseWorker, tiny_config(), again, copy)
    assert len(fake_run) == 2 and fake_run[1].codes != fake_run[0].codes
    assert fake_run[1].codes == root_fit.codes_version("base", copy)


def test_a_transformer_is_not_finished_once_a_tokenizer_it_reads_was_trained_again(tiny_data, tmp_path):
    """`train all` skips a finished base or super-res; one that learnt a tokenizer's codes before that
    tokenizer was trained again is trained again instead of being kept beside it."""
    from jobs.loop import finished_extra
    from jobs.stage import transformer_finished

    root = str(tmp_path / "root")
    shutil.copytree(tiny_data.root, root)
    cfg = tiny_config()
    for stage in ("base", "superres"):
        extra = finished_extra(stage, getattr(cfg, stage).run.max_steps, stage, root_fit.codes_version(stage, root))
        checkpoint.save_component(checkpoint.load_component(uri(root, stage)), uri(root, stage), extra=extra)
    assert transformer_finished("base")(cfg, root) and transformer_finished("superres")(cfg, root)
    checkpoint.save_component(checkpoint.load_component(uri(root, "vqgan_hi")), uri(root, "vqgan_hi"),
                              extra=finished_extra("vqgan", 1000, "vqgan_hi"))
    assert transformer_finished("base")(cfg, root)  # base reads no vqgan_hi codes
    assert not transformer_finished("superres")(cfg, root)
    checkpoint.save_component(checkpoint.load_component(uri(root, "vqgan_lo")), uri(root, "vqgan_lo"),
                              extra=finished_extra("vqgan", 1000, "vqgan_lo"))
    assert not transformer_finished("base")(cfg, root)


def test_super_res_refuses_another_roots_high_res_tokens_that_base_does_not_read(tiny_data, tmp_path, fake_run,
                                                                                 capsys):
    other = str(tmp_path / "other")
    checkpoint.init_model_root("tiny", other, seed=3, components=("vqgan_hi",))
    tokens = tokens_made_by(tiny_data, str(tmp_path / "tokens"), vqgan_lo=uri(tiny_data.root, "vqgan_lo"),
                            vqgan_hi=uri(other, "vqgan_hi"), text_encoder=uri(tiny_data.root, "text_encoder"))
    masked.build("base", BaseWorker, tiny_config(), tokens, tiny_data.root)
    assert len(fake_run) == 1 and "trained again" not in capsys.readouterr().out  # base reads no tokens_hi
    with pytest.raises(RunRefused, match=f"vqgan_hi of model root {other}.*tokenize the corpus with this root"):
        masked.build("superres", SuperResWorker, tiny_config(), tokens, tiny_data.root)
    assert len(fake_run) == 1


def test_the_grid_mismatch_says_to_tokenize_first_and_offers_presets_of_the_roots_family(tiny_data, tmp_path):
    with pytest.raises(RunRefused) as muse_root:
        root_fit.transformer_config("base", None, tiny_data.root, tiny_data.tokens, {**INFO, "tokens_lo_side": 16})
    message = str(muse_root.value)
    assert message.index("tokenize the corpus with this root") < message.index("--model")
    assert "base-tiny" in message and "uvit-amused" not in message
    amused = amused_root(str(tmp_path / "amused"), tokens_per_side=16)  # 256's grid, the tokens 512's
    with pytest.raises(RunRefused) as amused_refusal:
        root_fit.transformer_config("base", None, amused, tiny_data.tokens, {**INFO, "tokens_lo_side": 32})
    message = str(amused_refusal.value)
    # --model takes Muse presets alone (jobs.config): none is of this root's family.
    assert "tokenize the corpus with this root" in message and "no --model preset is of the root's amused family" \
        in message and "base-tiny" not in message


def test_a_preset_of_another_family_is_refused_before_any_work(tiny_data, tmp_path, fake_run, capsys):
    """A Muse base preset into an aMUSEd root (or a U-ViT into a Muse root) exported a root that no
    longer loads ("a model root holds one model family")."""
    amused = amused_root(str(tmp_path / "amused"))
    with pytest.raises(RunRefused) as refused:
        masked.build("base", BaseWorker, tiny_config("base.model=base-tiny"), tiny_data.tokens, amused)
    message = str(refused.value)
    assert "--model base-tiny is of the muse model family" in message and "holds amused components" in message
    assert "continue the root's base (no --model" in message and "\n" not in message
    # --model takes no U-ViT preset (jobs.config), but a library caller may name one.
    with pytest.raises(RunRefused, match=r"uvit-amused-256 is of the amused model family.* holds muse components"):
        root_fit.transformer_config("base", "uvit-amused-256", tiny_data.root, tiny_data.tokens, INFO)
    # A preset of the root's family whose grid its tokenizer does not make: the root would not load either.
    with pytest.raises(RunRefused, match="unloadable: base expects 16x16 tokens"):
        root_fit.transformer_config("base", "base-tiny", tiny_data.root, tiny_data.tokens, {**INFO, "tokens_lo_side": 16})
    assert fake_run == [] and capsys.readouterr().out == ""
    # The root's own model still trains.
    masked.build("base", BaseWorker, tiny_config("base.model=null"), tiny_data.tokens, amused)
    assert fake_run[0].model_kind == "uvit" and fake_run[0].init_from == uri(amused, "base")


def test_lora_with_a_new_preset_says_nothing_before_its_refusal(tiny_data, tmp_path, fake_run, capsys):
    for root, model in ((tiny_data.root, "base-632m"), (amused_root(str(tmp_path / "amused")), "base-tiny")):
        with pytest.raises(RunRefused, match=f"LoRA adapts the component already in the model root, but --model / "
                                             f"base.model asks for a new {model}"):
            masked.build("base", BaseWorker, tiny_config("base.lora_rank=4", f"base.model={model}"),
                         tiny_data.tokens, root)
        assert capsys.readouterr().out == "", model  # no "trains ... from scratch; it replaces the root's base"
    assert fake_run == []


def test_caption_ids_of_another_kind_of_tokenizer_name_the_roots_tokenizer(tiny_data, tmp_path, fake_run):
    amused = amused_root(str(tmp_path / "amused"))
    tokens = tokens_made_by(tiny_data, str(tmp_path / "tokens"), vqgan_lo=uri(tiny_data.root, "vqgan_lo"),
                            text_encoder=uri(tiny_data.root, "text_encoder"))
    with pytest.raises(RunRefused, match="hold caption ids of another tokenizer") as refused:
        masked.build("base", BaseWorker, tiny_config(), tokens, amused)
    message = str(refused.value)
    assert "None" not in message and "byt5" in message and "CLIP's tokenizer" in message, message


def test_tokenize_help_names_no_text_encoder_family(capsys):
    from pipelines import tokenize

    with pytest.raises(SystemExit):
        tokenize.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "T5 ids" not in out and "the text encoder's token ids" in out
