"""`muse import amused`: diffusers' AmusedPipeline with random weights, saved with `save_pretrained`,
imported, and checked number for number against diffusers. Nothing is downloaded: the CLIP
tokenizer's vocabulary (bytes only, no merges) is written here.

The architectures are amused-256's and amused-512's, shrunk for CI time in width and depth only
(ARCH below): U-ViT hidden 1024 -> 64, 22 -> 2 layers, 16 -> 4 heads, MLP 2816 -> 176, conv stages
768 -> 48 channels (12 -> 4 heads), token embedding 768 -> 32; CLIP 768 -> 32 wide, 12 -> 2 layers;
VQ level widths (128, 256, 256, 512, 768) -> (8, 16, 16, 32, 32), GroupNorm 32 -> 4 groups. Kept as
released: 3 res blocks per conv stage, micro-conditioning (5 x 256), 8192 codes (8256 embedding rows,
[MASK] last), 64 latent channels, 5 VQ levels (f16), 2 res blocks per level, 77 text tokens, the
16x16 (256) / 32x32 with down+upsample (512) token grids.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from muse import checkpoint  # noqa: E402
from muse.amused import AmusedImportError, import_amused, main as import_main  # noqa: E402
from muse.context import ContextStack  # noqa: E402
from muse.data.images import pil_to_tensor  # noqa: E402
from muse.pipeline import MusePipeline  # noqa: E402

WIDTH = 32  # CLIP width = the U-ViT's text width and pooled width
ARCH = {
    "amused-256": dict(sample_size=16, downsample=False, upsample=False),
    "amused-512": dict(sample_size=32, downsample=True, upsample=True),
}
UVIT_SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=176,
                  in_channels=32, block_out_channels=48, block_num_heads=4, num_res_blocks=3,
                  cond_embed_dim=WIDTH, encoder_hidden_size=WIDTH, micro_cond_encode_dim=256,
                  micro_cond_embed_dim=1280, codebook_size=8192, vocab_size=8256, use_bias=False)
VQ_SMALL = dict(act_fn="silu", block_out_channels=(8, 16, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 5,
                up_block_types=("UpDecoderBlock2D",) * 5, in_channels=3, out_channels=3, latent_channels=64,
                layers_per_block=2, norm_num_groups=4, num_vq_embeddings=8192, mid_block_add_attention=False,
                lookup_from_codebook=True, force_upcast=True)
PROMPTS = ["a red circle on a blue field", "two cats"]


def byte_tokenizer():
    """A CLIP tokenizer whose vocabulary is the 256 byte symbols (alone and word-final) and no merges."""
    from transformers import CLIPTokenizer

    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    extra = [b for b in range(256) if b not in printable]
    symbols = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Perturb every parameter, so zero-initialised ones (GRN, biases) take part in the comparison."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def build_amused(arch: str):
    from diffusers import AmusedPipeline, AmusedScheduler, UVit2DModel, VQModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(0)
    tokenizer = byte_tokenizer()
    clip = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=WIDTH,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    transformer = UVit2DModel(**UVIT_SMALL, **ARCH[arch])
    vqvae = VQModel(**VQ_SMALL)
    for i, m in enumerate((clip, transformer, vqvae)):
        randomise(m, i)
    pipe = AmusedPipeline(vqvae=vqvae, tokenizer=tokenizer, text_encoder=clip, transformer=transformer,
                          scheduler=AmusedScheduler(mask_token_id=UVIT_SMALL["vocab_size"] - 1))
    return pipe.to(torch.float32).set_progress_bar_config(disable=True) or pipe


@pytest.fixture(scope="module", params=list(ARCH))
def imported(request, tmp_path_factory):
    """(arch, diffusers pipeline, our pipeline loaded from the imported root, root)."""
    tmp = tmp_path_factory.mktemp(request.param)
    pipe = build_amused(request.param)
    pipe.save_pretrained(tmp / "src")
    root = str(tmp / "root")
    assert import_main(["amused", "--source", str(tmp / "src"), "--out", root]) == 0
    return request.param, pipe, MusePipeline.from_pretrained(root), root


def diffusers_text(pipe, prompts):
    ids = pipe.tokenizer(prompts, return_tensors="pt", padding="max_length", truncation=True,
                         max_length=pipe.tokenizer.model_max_length).input_ids
    out = pipe.text_encoder(ids, output_hidden_states=True)
    return out.text_embeds, out.hidden_states[-2]


def test_root_is_our_format_with_explicit_kinds(imported):
    _, _, ours, root = imported
    kinds = {name: checkpoint.read_component_config(checkpoint.component_uri(root, name))[0]
             for name in ("text_encoder", "vqgan_lo", "base")}
    assert kinds == {"text_encoder": "clip_text", "vqgan_lo": "vq", "base": "uvit"}
    files = [p.name for p in __import__("pathlib").Path(root).rglob("*")]
    assert not any(f.endswith((".bin", ".pt", ".pkl", ".ckpt")) for f in files)
    assert not checkpoint.has_component(root, "superres")


@torch.no_grad()
def test_clip_hidden_states_and_pooled_equal(imported):
    _, pipe, ours, _ = imported
    pooled, hidden = diffusers_text(pipe, PROMPTS)
    emb, mask = ours.encode_prompts(PROMPTS).embeddings, ours.encode_prompts(PROMPTS).mask
    assert emb.shape == (2, 78, WIDTH) and bool(mask.all())
    torch.testing.assert_close(emb[:, 1:], hidden, rtol=0, atol=1e-6)
    torch.testing.assert_close(emb[:, 0], pooled, rtol=0, atol=1e-6)


def test_the_text_encoder_loads_from_one_meta_build(imported, monkeypatch):
    """CLIP's unsaved position ids are computed again on the meta-built model: no second, randomly
    initialised build (seconds and a second copy of the weights for CLIP-L)."""
    from muse.clip import CLIPTextEncoder

    _, _, ours, root = imported
    built, from_saved = [], CLIPTextEncoder.from_saved.__func__
    monkeypatch.setattr(CLIPTextEncoder, "from_saved",
                        classmethod(lambda cls, config, folder: built.append(1) or from_saved(cls, config, folder)))
    encoder = checkpoint.load_component(checkpoint.component_uri(root, "text_encoder"))
    assert len(built) == 1
    positions = encoder.model.text_model.embeddings.position_ids
    assert torch.equal(positions, ours.text_encoder.model.text_model.embeddings.position_ids)
    assert positions.tolist()[0] == list(range(positions.shape[1]))


def test_a_long_prompt_gets_one_warning_that_says_it_is_cut(imported, capfd, caplog):
    """Ours says the end of the prompt is not read; transformers' own notice ("will result in indexing
    errors") would be wrong here, as the ids are cut to the encoder's length."""
    _, _, _, root = imported
    encoder = checkpoint.load_component(checkpoint.component_uri(root, "text_encoder"))
    encoder.tokenizer.model_max_length = encoder.config.max_length  # as CLIP-L's tokenizer says (77)
    with pytest.warns(UserWarning, match="are cut"):
        ids, _ = encoder.tokenize(["a red circle " * 60])
    assert ids.shape[1] == encoder.config.max_length
    assert "indexing errors" not in capfd.readouterr().err + caplog.text


@torch.no_grad()
def test_transformer_logits_equal_diffusers(imported):
    arch, pipe, ours, _ = imported
    side = ARCH[arch]["sample_size"]
    res = side * 16
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 8192, (2, side * side), generator=g)
    ids[torch.rand(ids.shape, generator=g) < 0.6] = 8255  # [MASK]
    pooled, hidden = diffusers_text(pipe, PROMPTS)
    micro = torch.tensor([[res, res, 0, 0, 6]] * 2, dtype=torch.float32)
    ref = pipe.transformer(ids.view(2, side, side), micro_conds=micro, pooled_text_emb=pooled,
                           encoder_hidden_states=hidden)  # (B, K, s, s)
    ref = ref.permute(0, 2, 3, 1).reshape(2, side * side, -1)

    cond = ours.encode_prompts(PROMPTS)
    ctx = ours.base.encode_context(cond.embeddings, cond.mask)
    logits = ours.base(ids, ctx)
    assert logits.shape == ref.shape == (2, side * side, 8192)
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
    select = ids == 8255
    torch.testing.assert_close(ours.base(ids, ctx, select=select), logits[select], rtol=1e-5, atol=1e-5)

    # The unconditional branch is the empty prompt, and the guided forward is one batch of [cond ; uncond].
    null_pooled, null_hidden = diffusers_text(pipe, [""])
    ref_u = pipe.transformer(ids.view(2, side, side), micro_conds=micro, pooled_text_emb=null_pooled.expand(2, -1),
                             encoder_hidden_states=null_hidden.expand(2, -1, -1))
    ref_u = ref_u.permute(0, 2, 3, 1).reshape(2, side * side, -1)
    both = ours.base(torch.cat([ids, ids]), ContextStack([ctx, ours.base.null_context()], [2, 2]))
    torch.testing.assert_close(both[:2], ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(both[2:], ref_u, rtol=1e-4, atol=1e-4)
    dropped = ours.base.encode_context(cond.embeddings, torch.zeros_like(cond.mask))  # the pipeline's null()
    torch.testing.assert_close(ours.base(ids, dropped), ref_u, rtol=1e-4, atol=1e-4)
    placeholder = ours.base.encode_context(torch.zeros(2, 1, WIDTH), torch.zeros(2, 1, dtype=torch.bool))  # serving's
    torch.testing.assert_close(ours.base(ids, placeholder), ref_u, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_vq_encode_ids_identical_and_decode_equal(imported):
    _, pipe, ours, _ = imported
    g = torch.Generator().manual_seed(2)
    images = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1  # ours take [-1, 1]; aMUSEd's VQ [0, 1]
    latents = pipe.vqvae.encode((images + 1) / 2).latents
    ref_ids = pipe.vqvae.quantize(latents)[2][2].reshape(2, 4, 4)
    ids = ours.vqgan_lo.encode(images)
    assert torch.equal(ids, ref_ids)

    codes = torch.randint(0, 8192, (2, 4, 4), generator=g)
    ref = pipe.vqvae.decode(codes.flatten(), force_not_quantize=True, shape=(2, 4, 4, 64)).sample
    torch.testing.assert_close(ours.vqgan_lo.decode_codes(codes), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.vqgan_lo.decode(codes), ref.clip(0, 1) * 2 - 1, rtol=0, atol=5e-5)


def test_pipeline_generates_at_the_released_size(imported, tmp_path):
    arch, _, ours, root = imported
    res = ARCH[arch]["sample_size"] * 16
    images = ours(["a red circle", "two cats"], steps=3, guidance_scale=3.0, seed=0, superres=False)
    assert [im.size for im in images] == [(res, res)] * 2
    first = ours(["a red circle"], steps=3, guidance_scale=3.0, seed=0, superres=False, output="tokens")
    again = ours(["a red circle"], steps=3, guidance_scale=3.0, seed=0, superres=False, output="tokens")
    assert torch.equal(first, again) and first.shape == (1, res // 16, res // 16)
    with pytest.raises(ValueError, match="overflows in float16: use bfloat16 or float32"):
        MusePipeline.from_pretrained(root).to(dtype=torch.float16)
    with pytest.raises(ValueError, match="overflows in float16"):
        MusePipeline.from_pretrained(root, dtype=torch.float16)
    if arch == "amused-256":
        from muse.generate_cli import main as generate_main

        out = tmp_path / "out"
        assert generate_main(["generate", "--checkpoint", root, "--prompt", "a cat", "--steps", "2",
                              "--out", str(out)]) == 0
        assert (out / "generate_00.png").exists()


def test_editing_runs_on_the_imported_root(imported):
    """Inpainting keeps the tokens outside the mask; outpainting and mask-free editing run."""
    arch, _, ours, _ = imported
    res = ARCH[arch]["sample_size"] * 16
    image = ours(["a red circle"], steps=2, guidance_scale=3.0, seed=0, superres=False)[0]
    mask = torch.zeros(res, res)
    mask[:, : res // 2] = 1
    source = ours.vqgan_lo.encode(pil_to_tensor(image, res)[None])
    ids = ours.inpaint(image, mask, "a blue square", steps=2, seed=1, superres=False, output="tokens")
    half = res // 32
    assert torch.equal(ids[0, :, half:], source[0, :, half:])
    assert ours.outpaint(image, "a field", steps=2, seed=1, superres=False)[0].size == (res, res)
    assert ours.edit(image, "a green circle", iterations=2, seed=1, superres=False)[0].size == (res, res)


def test_a_muse_component_cannot_join_an_amused_root(imported):
    _, _, ours, _ = imported
    muse_tiny = MusePipeline.from_preset("tiny")
    with pytest.raises(ValueError, match="family|text_dim|tokens"):
        MusePipeline(muse_tiny.text_encoder, ours.vqgan_lo, ours.base)


def test_not_an_amused_directory_is_a_clear_error(tmp_path, capsys):
    """Each found before any weights are read: another pipeline, a folder missing a part, a file that
    is not JSON, an S3 source, and an --out that is a file."""
    for part in ("transformer", "vqvae", "text_encoder", "tokenizer"):
        (tmp_path / part).mkdir()
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(AmusedImportError, match="not an aMUSEd pipeline"):
        import_amused(str(tmp_path), str(tmp_path / "root"))
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(AmusedImportError, match="model_index.json is not valid JSON"):
        import_amused(str(tmp_path), str(tmp_path / "root"))
    (tmp_path / "tokenizer").rmdir()
    with pytest.raises(AmusedImportError, match="lacks tokenizer"):
        import_amused(str(tmp_path), str(tmp_path / "root"))
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "a-file").write_text("")
    for source, out, said in (("nowhere", "r", "is not a folder"), ("s3://bucket/amused", "r", "give a local copy"),
                              (str(tmp_path), str(tmp_path / "a-file"), "is a file: name a folder")):
        source = source if "/" in source else str(tmp_path / source)
        assert import_main(["amused", "--source", source, "--out", str(tmp_path / out)]) == 2
        assert said in capsys.readouterr().err


@pytest.mark.parametrize("imported", ["amused-256"], indirect=True)  # one architecture covers the root's files
def test_import_over_a_model_root_is_refused_unless_forced_and_force_leaves_one_family(imported, tmp_path, capsys):
    """Importing over a Muse root would keep its vqgan_hi and superres beside the aMUSEd parts, a root
    that refuses to load: refused, the root untouched; with --force the root is aMUSEd alone."""
    _, _, ours, root = imported
    src = str(Path(root).parent / "src")
    target = str(tmp_path / "root")
    MusePipeline.from_preset("tiny").save_pretrained(target)
    before = {p: p.read_bytes() for p in Path(target).rglob("*") if p.is_file()}
    assert import_main(["amused", "--source", src, "--out", target]) == 2
    err = capsys.readouterr().err
    assert "--force" in err and "already holds" in err and "Traceback" not in err
    assert {p: p.read_bytes() for p in Path(target).rglob("*") if p.is_file()} == before

    assert import_main(["amused", "--source", src, "--out", target, "--force"]) == 0
    assert [n for n in checkpoint.COMPONENTS if checkpoint.has_component(target, n)] == \
        ["text_encoder", "vqgan_lo", "base"]
    again = MusePipeline.from_pretrained(target)
    assert again.superres is None and type(again.base) is type(ours.base)
    ids = torch.randint(0, 8192, (1, 256))
    cond = ours.encode_prompts(["a cat"])
    assert torch.equal(again.base(ids, again.base.encode_context(cond.embeddings, cond.mask)),
                       ours.base(ids, ours.base.encode_context(cond.embeddings, cond.mask)))


@pytest.mark.parametrize("imported", ["amused-256"], indirect=True)  # the U-ViT's token embedding is one kind
def test_eval_of_the_imported_root_writes_every_section(imported, tmp_path, monkeypatch):
    """`muse eval`'s sections on a U-ViT (a plain embedding, no code classes: its token accuracy
    scores the ids themselves), to the end and report.json; the 256 px VQ reads no upsampled image."""
    import muse.evaluate as ev
    from muse.data.synthetic import write_corpus
    from muse.evaluate import evaluate, pipeline_generator

    _, _, ours, _ = imported
    sizes = []  # (image side, the side a tokenizer reads it at)
    monkeypatch.setattr(ev, "pil_to_tensor",
                        lambda im, size: sizes.append((im.size[0], size)) or pil_to_tensor(im, size))
    write_corpus(str(tmp_path / "corpus"), n=4, size=64, holdout_fraction=0.2)
    gen = pipeline_generator(ours, steps=2, superres_steps=2, guidance_scale=3.0, superres=False)
    with torch.no_grad():
        report = evaluate(gen, ours, str(tmp_path / "corpus"), str(tmp_path / "out"), n_seen=2, n_held_out=1,
                          reference_images=2, ceiling_images=2)
    accuracy = report["masked_token_accuracy"]
    assert set(accuracy) == {"mask_rate", "base"} and 0.0 <= accuracy["base"] <= 1.0
    assert set(report["psnr_db"]) == {"vqgan_lo"} and report["judge"]["seen"]["n"] == 2
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == json.loads(json.dumps(report))
    assert sizes and not [s for s in sizes if s[0] < s[1]], sizes


def test_serving_deployments_run_the_imported_root(imported):
    """The Serve deployments' methods without Serve: text -> tokens -> PNG at the root's size."""
    import asyncio
    import io

    from PIL import Image

    from serve.config import Batching
    from serve.deployments import BaseGenerator, Decode, Decoder, TextEncoder

    arch, _, _, root = imported
    res = ARCH[arch]["sample_size"] * 16
    text, base, decoder = TextEncoder(root), BaseGenerator(root, "cpu", Batching(), 4.5, 2), Decoder(root)

    async def both():
        return await asyncio.gather(base.generate(text.encode("a red circle"), Decode(1, 2, 3.0, 0)),
                                    base.generate(text.encode("two cats", "blurry"), Decode(2, 2, 3.0, 1)))

    pipe = MusePipeline.from_pretrained(root)
    want = [pipe("a red circle", steps=2, guidance_scale=3.0, seed=0, choice_temperature=4.5, output="tokens"),
            pipe("two cats", negative_prompt="blurry", num_images=2, steps=2, guidance_scale=3.0, seed=1,
                 choice_temperature=4.5, output="tokens")]
    for tokens, n, expected in zip(asyncio.run(both()), (1, 2), want):
        assert torch.equal(tokens.ids, expected)  # the request's own images, as the library draws them
        pngs = decoder.decode(tokens, "lo")
        assert [Image.open(io.BytesIO(png)).size for png in pngs] == [(res, res)] * n


@pytest.mark.parametrize("imported", ["amused-256"], indirect=True)  # one architecture: a Serve app costs ~20 s
def test_imported_root_serves_over_http(imported, ray_session):
    """`muse serve` on the imported root: the OpenAI images API answers with the root's images at its
    size, and a size the root cannot produce is a 400 with a message."""
    import base64
    import io

    import httpx
    from PIL import Image
    from ray import serve

    from jobs.demo import wait_healthy
    from serve.app import unused_port
    from serve.app import build_app
    from serve.config import AppArgs, Deployment, Generator, Sampling

    _, _, _, root = imported
    port = unused_port()
    serve.shutdown()  # another test's Serve may still be up, on its own port
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    small, gen = Deployment(num_cpus=0.25), Generator(num_cpus=0.5)
    args = AppArgs(checkpoint=root, api_key="k", sampling={"steps": 2}, text_encoder=small, decoder=small,
                   ingress=AppArgs.model_fields["ingress"].default.model_copy(update={"num_cpus": 0.25}),
                   base=gen, superres=gen)
    serve.run(build_app(args), name="amused", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, timeout=120)
        with httpx.Client(base_url=url, timeout=120, headers={"Authorization": "Bearer k"}) as client:
            ok = client.post("/v1/images/generations", json={"prompt": "a red circle", "n": 2, "seed": 3,
                                                               "response_format": "b64_json"})
            assert ok.status_code == 200, ok.text
            got = [np.asarray(Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))).convert("RGB"))
                   for d in ok.json()["data"]]
            sampling = Sampling(steps=2)
            want = MusePipeline.from_pretrained(root)(
                "a red circle", num_images=2, steps=2, guidance_scale=sampling.guidance_scale, seed=3,
                choice_temperature=sampling.choice_temperature)
            for image, expected in zip(got, want, strict=True):  # a pixel may round one step apart
                assert np.abs(image.astype(np.int16) - np.asarray(expected, np.int16)).max() <= 2
            models = client.get("/v1/models").json()
            assert "256x256" in models["data"][0]["sizes"], models
            bad = client.post("/v1/images/generations", json={"prompt": "a red circle", "size": "7x7"})
            assert bad.status_code == 400 and bad.json()["error"]["message"], bad.text
    finally:
        serve.shutdown()


def test_presets_list_both_families(capsys):
    from muse.cli import main

    main(["presets"])
    out = capsys.readouterr().out
    assert "uvit-amused-256" in out and "603,537,664" in out  # aMUSEd-256's U-ViT as released
    assert "model amused-512" in out and "model muse-632m" in out


@pytest.mark.parametrize("imported", ["amused-256"], indirect=True)  # one architecture covers storage
def test_import_writes_to_s3_and_loads_back(imported, s3_bucket):
    arch, _, ours, root = imported
    src = str(__import__("pathlib").Path(root).parent / "src")
    remote = f"{s3_bucket}/roots/{arch}"
    assert import_main(["amused", "--source", src, "--out", remote]) == 0
    again = MusePipeline.from_pretrained(remote)
    ids = torch.randint(0, 8192, (1, 256))
    cond = ours.encode_prompts(["a cat"])
    a = ours.base(ids, ours.base.encode_context(cond.embeddings, cond.mask))
    b = again.base(ids, again.base.encode_context(cond.embeddings, cond.mask))
    assert torch.equal(a, b)


@pytest.mark.parametrize("imported", ["amused-256"], indirect=True)  # one architecture covers the training path
def test_base_stage_fine_tunes_the_imported_uvit_with_lora(imported):
    """`muse train base --lora-rank r` on an imported root: the worker adapts the U-ViT from shard-style
    rows (VQ ids, CLIP ids trimmed to their length), only the adapters move, the export is merged."""
    from jobs.config import load_config
    from jobs.root_fit import transformer_config
    from jobs.parallel import WorkerEnv
    from jobs.stages import get as stage
    from jobs.train_job import TrainJob
    from muse import checkpoint
    from muse.config import to_dict

    _, _, ours, root = imported
    text = ours.text_encoder
    images = torch.rand(2, 3, ours.resolution, ours.resolution) * 2 - 1
    ids = ours.vqgan_lo.encode(images).flatten(1)  # what `muse tokenize` stores with the imported VQ
    full, _ = text.tokenize(PROMPTS)
    lengths = (full != text.tokenizer.pad_token_id).sum(1).tolist()
    trimmed = torch.zeros(2, max(lengths), dtype=torch.long)
    mask = torch.zeros(2, max(lengths), dtype=torch.bool)
    for i, n in enumerate(lengths):
        trimmed[i, :n], mask[i, :n] = full[i, :n], True
    side = int(round(ids.shape[1] ** 0.5))
    info = {"tokens_lo_side": side, "tokens_hi_side": None, "text_dim": text.dim, "text_storage": "ids"}
    copy = str(Path(root).parent / "finetune")
    shutil.copytree(root, copy)
    model_cfg, init_from = transformer_config("base", None, copy, None, info)
    cfg = load_config(None, ["base.lora_rank=2", "base.optim.warmup_steps=0", "base.optim.lr=1e-2",
                             "base.optim.ema_decay=0", "base.run.max_steps=3"])
    job = TrainJob(root=copy, component="base", stage="base", model_config=to_dict(model_cfg), data_meta=info,
                   run_name="lora", init_from=init_from, model_kind=checkpoint.kind_of_config(model_cfg))
    worker = stage("base").worker(cfg.base, job, WorkerEnv())
    worker.reseed(0)
    before = {k: v.clone() for k, v in checkpoint.load_component(init_from).state_dict().items()}
    batch = {"tokens_lo": ids, "text_ids": trimmed, "text_mask": mask}
    emb, emb_mask = worker.text_condition(batch)
    torch.testing.assert_close(emb, text.encode_ids(full))  # trimmed ids padded back as sampling pads them
    assert emb_mask.all()
    losses = [float(worker.train_step(batch, step)["loss"]) for step in range(3)]
    assert all(np.isfinite(losses))
    worker.export(3)
    after = checkpoint.load_component(checkpoint.component_uri(copy, "base")).state_dict()
    assert set(after) == set(before)
    changed = [k for k in before if not torch.equal(after[k], before[k])]
    assert changed and all(k.endswith(("q.weight", "k.weight", "v.weight", "out.weight")) for k in changed)
    again = MusePipeline.from_pretrained(copy)
    assert again(PROMPTS[0], steps=2, seed=0, superres=False)[0].size == (ours.resolution, ours.resolution)


@pytest.mark.parametrize("imported", ["amused-256"], indirect=True)  # one architecture covers the tokenization path
def test_tokenize_a_corpus_with_the_imported_root(imported, ray_session, tmp_path):
    """`muse tokenize --checkpoint ROOT` with an imported root: the VQ writes the token grid, CLIP's
    tokenizer the caption ids, and the shards say the CLIP width."""
    from muse.data.synthetic import write_corpus
    from pipelines import shards, tokenize
    from pipelines.config import TokenizeConfig

    _, _, ours, root = imported
    write_corpus(str(tmp_path / "corpus"), 12, size=64, holdout_fraction=0.0)
    tokenize.run(str(tmp_path / "corpus"), str(tmp_path / "tokens"), tokenize.resolve_models(root),
                 TokenizeConfig(), "auto", progress=False)
    table = shards.load_token_shards(str(tmp_path / "tokens"))
    info = shards.shard_info(str(tmp_path / "tokens"))
    side = ours.vqgan_lo.config.tokens_per_side
    assert table.num_rows == 12 and info["tokens_lo_side"] == side and info["text_dim"] == ours.text_encoder.dim
    row = table.slice(0, 1).to_pylist()[0]
    assert len(row["tokens_lo"]) == side * side
    decoded = ours.text_encoder.tokenizer.decode(row["text_ids"], skip_special_tokens=True)
    assert decoded.replace(" ", "") == row["caption"].replace(" ", "")

    # Embeddings store T5 outputs: a CLIP root is refused in the driver, before any actor loads it.
    from pipelines.job_spec import ModelRefused

    with pytest.raises(ModelRefused, match="tokenize with text_storage 'ids'"):
        tokenize.run(str(tmp_path / "corpus"), str(tmp_path / "embedded"), tokenize.resolve_models(root),
                     TokenizeConfig(text_storage="embeddings"), "auto", progress=False)
    assert not (tmp_path / "embedded" / shards.JOB_FILE).exists()
