"""The peer for `benchmarks/sampling.py --peer`: diffusers' `AmusedPipeline` (aMUSEd, the open Muse
reproduction) built from its configs with random weights, nothing downloaded, and our pipeline at the
same token grid (16x16 tokens of 8192 codes, 256 px), so the two can be timed in one run.

"equal": aMUSEd-256's U-ViT (diffusers' `UVit2DModel` defaults are its config; 604M parameters)
against our `base-632m` (651M). "small": a ~13M U-ViT against a ~8M base of ours. Both decode with
a 256 px f16 VQ model (aMUSEd's VQ-GAN config; our `vqgan-f16-8192`). Text encoding is left out on
both sides: random embeddings of the right widths stand in (CLIP-L 77x768 for aMUSEd, 77x4096 for ours).
diffusers is a benchmark-only dependency (`pip install -e .[bench]`).
"""

from __future__ import annotations

import dataclasses

import torch

from muse import sampling
from muse.checkpoint import build_component
from muse.config import preset
from muse.token_stages import TextCondition, base_tokens

SIDE, CODES, TEXT_LEN = 16, 8192, 77
SMALL_UVIT = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=704,
                  block_out_channels=128, in_channels=128, block_num_heads=4, num_res_blocks=1)
SMALL_BASE = dict(hidden=256, layers=4, heads=4, mlp=1024)


def amused(kind: str, device: str, dtype: torch.dtype):
    from diffusers import AmusedPipeline, AmusedScheduler, UVit2DModel, VQModel

    torch.manual_seed(0)
    transformer = UVit2DModel(sample_size=SIDE, **(SMALL_UVIT if kind == "small" else {}))
    vqvae = VQModel(
        act_fn="silu", block_out_channels=(128, 256, 256, 512, 768), down_block_types=("DownEncoderBlock2D",) * 5,
        up_block_types=("UpDecoderBlock2D",) * 5, in_channels=3, out_channels=3, latent_channels=64,
        layers_per_block=2, norm_num_groups=32, num_vq_embeddings=CODES, sample_size=32,
        mid_block_add_attention=False, lookup_from_codebook=True, force_upcast=False,
    )
    scheduler = AmusedScheduler(mask_token_id=transformer.config.vocab_size - 1)
    pipe = AmusedPipeline(vqvae=vqvae, tokenizer=None, text_encoder=None, transformer=transformer,
                          scheduler=scheduler).to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def amused_runner(pipe, steps: int, guidance: float, device: str, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    text = dict(prompt_embeds=torch.randn(1, 768, generator=g), encoder_hidden_states=torch.randn(1, TEXT_LEN, 768, generator=g),
                negative_prompt_embeds=torch.randn(1, 768, generator=g),
                negative_encoder_hidden_states=torch.randn(1, TEXT_LEN, 768, generator=g))
    text = {k: v.to(device, dtype) for k, v in text.items()}

    def run():
        with torch.inference_mode():
            return pipe(num_inference_steps=steps, guidance_scale=guidance, output_type="pt",
                        generator=torch.Generator(device).manual_seed(0), **text).images
    return run


def compiled_amused(pipe):
    """The same pipeline (shared modules) with its transformer through `torch.compile`."""
    from diffusers import AmusedPipeline

    twin = AmusedPipeline(vqvae=pipe.vqvae, tokenizer=None, text_encoder=None,
                          transformer=torch.compile(pipe.transformer), scheduler=pipe.scheduler)
    twin.set_progress_bar_config(disable=True)
    return twin


def ours(kind: str, device: str, dtype: torch.dtype):
    torch.manual_seed(0)
    cfg = preset("base-632m")
    if kind == "small":
        cfg = dataclasses.replace(cfg, **SMALL_BASE)
    base = build_component("base", cfg).to(device, dtype).eval()
    vqgan = build_component("vqgan_lo", preset("vqgan-f16-8192")).to(device, dtype).eval()
    return base, vqgan


def ours_runner(base, vqgan, steps: int, guidance: float, device: str, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    cond = TextCondition(torch.randn(1, TEXT_LEN, base.config.text_dim, generator=g).to(device, dtype),
                         torch.ones(1, TEXT_LEN, dtype=torch.bool, device=device))

    def run():
        with torch.inference_mode():
            ids = base_tokens(base, cond, steps=steps, guidance_scale=guidance,
                              generator=sampling.image_generators(0, 1, device))
            return vqgan.decode(ids)
    return run


def flops_per_step(kind: str, pipe, base) -> tuple[float, float]:
    """GFLOP of one guided step (2 rows: cond + uncond) of each transformer, counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    dev, dtype = base.head.weight.device, base.head.weight.dtype
    t = pipe.transformer
    ids = torch.full((2, SIDE, SIDE), t.config.vocab_size - 1, device=dev)
    with torch.inference_mode(), FlopCounterMode(display=False) as peer:
        t(ids, encoder_hidden_states=torch.randn(2, TEXT_LEN, 768, device=dev, dtype=dtype),
          pooled_text_emb=torch.randn(2, 768, device=dev, dtype=dtype),
          micro_conds=torch.tensor([[256, 256, 0, 0, 6]] * 2, device=dev, dtype=dtype))
    ctx = base.encode_context(torch.randn(1, TEXT_LEN, base.config.text_dim, device=dev, dtype=dtype),
                              torch.ones(1, TEXT_LEN, dtype=torch.bool, device=dev))
    joint = sampling.cfg_context(ctx, base.null_context())
    with torch.inference_mode(), FlopCounterMode(display=False) as mine:
        base(torch.full((2, SIDE * SIDE), base.mask_token_id, device=dev), joint)
    return peer.get_total_flops() / 1e9, mine.get_total_flops() / 1e9


def imported(pipe, device: str, dtype: torch.dtype):
    """The peer's own transformer and VQ converted by `muse.amused` (what `muse import amused` writes,
    without the files): the same weights, run by our modules and our sampler."""
    from muse.amused import UVIT_KEYS, VQ_KEYS, renamed, uvit_config, vq_config
    from muse.uvit import UViT
    from muse.vq import VQModel

    vq = VQModel(vq_config(dict(pipe.vqvae.config), SIDE))
    vq.load_state_dict(renamed({k: v.float() for k, v in pipe.vqvae.state_dict().items()}, VQ_KEYS, vq))
    uvit = UViT(uvit_config(dict(pipe.transformer.config), vq.config.resolution, TEXT_LEN,
                            pipe.scheduler.config.mask_token_id))
    state = renamed({k: v.float() for k, v in pipe.transformer.state_dict().items()}, UVIT_KEYS, uvit)
    uvit.load_state_dict(state, strict=False)
    return uvit.to(device, dtype).eval(), vq.to(device, dtype).eval()


def amused_batch_runner(pipe, batch: int, steps: int, guidance: float, device: str, dtype: torch.dtype):
    """diffusers' pipeline from text embeddings (CLIP-L widths), `batch` images of one prompt."""
    g = torch.Generator().manual_seed(0)
    text = dict(prompt_embeds=torch.randn(1, 768, generator=g), encoder_hidden_states=torch.randn(1, TEXT_LEN, 768, generator=g),
                negative_prompt_embeds=torch.randn(1, 768, generator=g),
                negative_encoder_hidden_states=torch.randn(1, TEXT_LEN, 768, generator=g))
    text = {k: v.to(device, dtype) for k, v in text.items()}

    def run():
        with torch.inference_mode():
            return pipe(num_inference_steps=steps, guidance_scale=guidance, output_type="pt", num_images_per_prompt=batch,
                        generator=torch.Generator(device).manual_seed(0), **text).images
    return run


def imported_runner(uvit, vq, batch: int, steps: int, guidance: float, device: str, dtype: torch.dtype):
    """Our pipeline's stages on the imported modules: one prompt's [pooled ; hidden states], `batch`
    images, the empty prompt's context as the unconditional branch. aMUSEd's guidance g is our t = g - 1."""
    g = torch.Generator().manual_seed(0)
    cond = TextCondition(torch.randn(1, 1 + TEXT_LEN, 768, generator=g).to(device, dtype),
                         torch.ones(1, 1 + TEXT_LEN, dtype=torch.bool, device=device))

    def run():
        with torch.inference_mode():
            ids = base_tokens(uvit, cond, num_images=batch, steps=steps, guidance_scale=guidance - 1,
                              generator=sampling.image_generators(0, batch, device))
            return vq.decode(ids)
    return run
