"""`muse import amused --source DIR --out ROOT`: an aMUSEd checkpoint (diffusers format) as a model root.

DIR is laid out as on the hub (amused-256 / amused-512): model_index.json, transformer/, vqvae/,
text_encoder/, tokenizer/, scheduler/. ROOT gets three components in our format (config.json +
model.safetensors; never pickle), each naming its kind:

    text_encoder/  clip_text   muse.clip.CLIPTextEncoder   (+ clip_config.json, tokenizer files)
    vqgan_lo/      vq          muse.vq.VQModel
    base/          uvit        muse.uvit.UViT               (+ the empty prompt's encoding)

Weights are renamed onto our modules and loaded strictly: a key missing or left over is an error.
diffusers itself is not needed: its configs are JSON and its weights safetensors (or a `.bin`,
read with `weights_only=True`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import torch
from safetensors.torch import load_file
from torch import nn

from muse import checkpoint, storage
from muse.clip import CLIPTextEncoder
from muse.config import UViTConfig, VQConfig
from muse.uvit import UViT
from muse.vq import VQModel

# (diffusers pattern, ours), applied in order to every key.
UVIT_KEYS = [
    (r"^encoder_proj_layer_norm\.", "text_norm."), (r"^encoder_proj\.", "text_proj."),
    (r"^embed\.embeddings\.", "embed."), (r"^embed\.layer_norm\.", "embed_norm."), (r"^embed\.conv\.", "embed_proj."),
    (r"^cond_embed\.linear_1\.", "cond_embed.0."), (r"^cond_embed\.linear_2\.", "cond_embed.2."),
    (r"^down_block\.", "stage_in."), (r"^up_block\.", "stage_out."),
    (r"\.downsample\.norm\.", ".down_norm."), (r"\.downsample\.conv\.", ".down."),
    (r"\.upsample\.norm\.", ".up_norm."), (r"\.upsample\.conv\.", ".up."),
    (r"\.res_blocks\.", ".blocks."), (r"\.channelwise_linear_1\.", ".up."), (r"\.channelwise_linear_2\.", ".down."),
    (r"\.channelwise_norm\.", ".grn."), (r"\.cond_embeds_mapper\.", ".mod."),
    (r"\.attention_blocks\.", ".attns."), (r"\.kv_mapper\.", ".kv_map."),
    (r"^project_to_hidden_norm\.", "in_norm."), (r"^project_to_hidden\.", "in_proj."),
    (r"^project_from_hidden_norm\.", "out_norm."), (r"^project_from_hidden\.", "out_proj."),
    (r"^transformer_layers\.(\d+)\.attn1\.", r"layers.\1.attn."),
    (r"^transformer_layers\.(\d+)\.attn2\.", r"layers.\1.cross."), (r"^transformer_layers\.", "layers."),
    (r"\.norm(\d)\.linear\.", r".norm\1.mod."), (r"\.ff\.net\.0\.proj\.", ".ff.proj."), (r"\.ff\.net\.2\.", ".ff.out."),
    (r"^mlm_layer\.conv1\.", "head_proj."), (r"^mlm_layer\.layer_norm\.", "head_norm."),
    (r"^mlm_layer\.conv2\.", "head."),
    (r"\.to_q\.", ".q."), (r"\.to_k\.", ".k."), (r"\.to_v\.", ".v."), (r"\.to_out\.0\.", ".out."),
]
VQ_KEYS = [
    (r"\.down_blocks\.(\d+)\.resnets\.", r".levels.\1.blocks."),
    (r"\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.", r".levels.\1.conv."),
    (r"\.up_blocks\.(\d+)\.resnets\.", r".levels.\1.blocks."),
    (r"\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.", r".levels.\1.conv."),
    (r"\.mid_block\.resnets\.0\.", ".mid.res1."), (r"\.mid_block\.resnets\.1\.", ".mid.res2."),
    (r"\.mid_block\.attentions\.0\.group_norm\.", ".mid.attn.norm."), (r"\.mid_block\.attentions\.0\.", ".mid.attn."),
    (r"\.conv_shortcut\.", ".skip."), (r"\.conv_norm_out\.", ".norm_out."), (r"^quantize\.embedding\.", "codebook."),
    (r"\.to_q\.", ".q."), (r"\.to_k\.", ".k."), (r"\.to_v\.", ".v."), (r"\.to_out\.0\.", ".out."),
]


class AmusedImportError(ValueError):
    """The source is not an aMUSEd checkpoint this importer understands."""


def read_json(path: str) -> dict:
    if not os.path.exists(path):
        raise AmusedImportError(f"missing {path}: expected a diffusers-format aMUSEd directory "
                           "(model_index.json, transformer/, vqvae/, text_encoder/, tokenizer/, scheduler/)")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise AmusedImportError(f"{path} is not valid JSON: {e}") from None


def read_weights(folder: str) -> dict[str, torch.Tensor]:
    """A diffusers folder's state dict (one safetensors file, a sharded one, or a .bin, sharded or
    not), in float32. Plain files come before a variant's (model.fp16.safetensors, or its sharded
    index); a folder holding only a variant uses that."""
    names = sorted(os.listdir(folder), key=lambda n: (n.count("."), n))  # plain names have fewest dots
    for kind in (".safetensors", ".bin"):
        index = [n for n in names if kind + ".index" in n and n.endswith(".json")]
        single = [n for n in names if n.endswith(kind)]
        if index:  # sharded: the index names the shards
            shards = sorted(set(read_json(os.path.join(folder, index[0]))["weight_map"].values()))
            files = [os.path.join(folder, shard) for shard in shards]
        elif single:
            files = [os.path.join(folder, single[0])]
        else:
            continue
        state: dict[str, torch.Tensor] = {}
        for path in files:
            state.update(load_file(path) if kind == ".safetensors"
                         else torch.load(path, map_location="cpu", weights_only=True))
        return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    raise AmusedImportError(f"no weights in {folder} (.safetensors or .bin)")


def renamed(state: dict[str, torch.Tensor], rules: list[tuple[str, str]], model: nn.Module) -> dict[str, torch.Tensor]:
    """`state` under our key names, 1x1 conv kernels reshaped for our linear layers; strict."""
    ours = model.state_dict()
    out = {}
    for key, value in state.items():
        new = key
        for pattern, repl in rules:
            new = re.sub(pattern, repl, new)
        target = ours.get(new)
        if target is not None and target.shape != value.shape and target.numel() == value.numel():
            value = value.reshape(target.shape)
        out[new] = value
    missing = sorted(set(ours) - set(out) - {"null_text"})
    unexpected = sorted(set(out) - set(ours))
    wrong = sorted(k for k in set(out) & set(ours) if out[k].shape != ours[k].shape)
    if missing or unexpected or wrong:
        raise AmusedImportError(f"{type(model).__name__}: weights do not fit (missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}, wrong shape {wrong[:5]})")
    return out


def uvit_config(cfg: dict, resolution: int, text_len: int, mask_token_id: int | None) -> UViTConfig:
    pooled, text = cfg.get("cond_embed_dim", 768), cfg.get("encoder_hidden_size", 768)
    encode = cfg.get("micro_cond_encode_dim", 256)
    if pooled != text:
        raise AmusedImportError(f"cond_embed_dim {pooled} != encoder_hidden_size {text}: not a CLIP-conditioned aMUSEd")
    if cfg.get("micro_cond_embed_dim", 1280) != 5 * encode:
        raise AmusedImportError("micro_cond_embed_dim must be 5 x micro_cond_encode_dim (five micro-conditions)")
    vocab = cfg.get("vocab_size", 8256)
    return UViTConfig(
        codebook_size=cfg.get("codebook_size", 8192), vocab_size=vocab,
        mask_token_id=vocab - 1 if mask_token_id is None else mask_token_id,
        tokens_per_side=cfg.get("sample_size", 64), hidden=cfg.get("hidden_size", 1024),
        layers=cfg.get("num_hidden_layers", 22), heads=cfg.get("num_attention_heads", 16),
        mlp=cfg.get("intermediate_size", 2816), embed_dim=cfg.get("in_channels", 768),
        conv_channels=cfg.get("block_out_channels", 768), res_blocks=cfg.get("num_res_blocks", 3),
        conv_heads=cfg.get("block_num_heads", 12), downsample=cfg.get("downsample", False),
        upsample=cfg.get("upsample", False), text_dim=text, text_len=text_len, micro_cond_dim=encode,
        micro_conds=(resolution, resolution, 0, 0, 6), bias=cfg.get("use_bias", False),
        eps=cfg.get("layer_norm_eps", 1e-6), affine=cfg.get("ln_elementwise_affine", True),
        dropout=cfg.get("hidden_dropout", 0.0),
    )


def vq_config(cfg: dict, tokens_per_side: int) -> VQConfig:
    channels = tuple(cfg.get("block_out_channels", (64,)))
    checks = {"act_fn": "silu", "norm_type": "group"}
    for key, want in checks.items():
        if cfg.get(key, want) != want:
            raise AmusedImportError(f"vqvae {key}={cfg[key]!r} is not supported (only {want!r})")
    blocks = set(cfg.get("down_block_types", ())) | set(cfg.get("up_block_types", ()))
    if not blocks <= {"DownEncoderBlock2D", "UpDecoderBlock2D"}:
        raise AmusedImportError(f"vqvae block types {sorted(blocks)} are not supported")
    return VQConfig(
        resolution=tokens_per_side * 2 ** (len(channels) - 1), in_channels=cfg.get("in_channels", 3),
        out_channels=cfg.get("out_channels", 3), channels=channels, layers_per_block=cfg.get("layers_per_block", 1),
        groups=cfg.get("norm_num_groups", 32), latent_channels=cfg.get("latent_channels", 3),
        codebook_size=cfg.get("num_vq_embeddings", 256), codebook_dim=cfg.get("vq_embed_dim"),
        mid_attention=cfg.get("mid_block_add_attention", True),
    )


def load_amused(source: str) -> dict[str, nn.Module]:
    """The three components of the aMUSEd checkpoint at `source`, as our modules (float32, eval)."""
    index = read_json(os.path.join(source, "model_index.json"))
    if index.get("_class_name") not in ("AmusedPipeline", "AmusedImg2ImgPipeline", "AmusedInpaintPipeline"):
        raise AmusedImportError(f"{source}/model_index.json is a {index.get('_class_name')!r}, not an aMUSEd pipeline")
    text_encoder = CLIPTextEncoder.load_pretrained(os.path.join(source, "text_encoder"),
                                                   os.path.join(source, "tokenizer"))
    t_cfg = read_json(os.path.join(source, "transformer", "config.json"))
    v_cfg = read_json(os.path.join(source, "vqvae", "config.json"))
    sched = os.path.join(source, "scheduler", "scheduler_config.json")
    mask_id = read_json(sched).get("mask_token_id") if os.path.exists(sched) else None

    vq = VQModel(vq_config(v_cfg, t_cfg.get("sample_size", 64)))
    vq.load_state_dict(renamed(read_weights(os.path.join(source, "vqvae")), VQ_KEYS, vq))
    cfg = uvit_config(t_cfg, vq.config.resolution, text_encoder.config.max_length, mask_id)
    if cfg.text_dim != text_encoder.dim:
        raise AmusedImportError(f"the transformer reads {cfg.text_dim}-wide text, the CLIP encoder gives "
                                f"{text_encoder.dim}")
    if cfg.codebook_size != vq.config.codebook_size:
        raise AmusedImportError(f"transformer codebook {cfg.codebook_size} != vqvae codebook {vq.config.codebook_size}")
    uvit = UViT(cfg)
    uvit.load_state_dict(renamed(read_weights(os.path.join(source, "transformer")), UVIT_KEYS, uvit), strict=False)
    with torch.no_grad():
        uvit.null_text.copy_(text_encoder([""])[0])  # aMUSEd's unconditional branch: the empty prompt
    return {"text_encoder": text_encoder.eval(), "vqgan_lo": vq.eval(), "base": uvit.eval()}


LAYOUT = ("model_index.json", "transformer", "vqvae", "text_encoder", "tokenizer")


def check_layout(source: str) -> None:
    """AmusedImportError unless `source` is a local folder laid out as a diffusers aMUSEd download."""
    if "://" in source:
        raise AmusedImportError(f"--source {source}: give a local copy of the aMUSEd folder (it is read with "
                                "local files only)")
    if not os.path.isdir(source):
        raise AmusedImportError(f"--source {source} is not a folder")
    missing = [name for name in LAYOUT if not os.path.exists(os.path.join(source, name))]
    if missing:
        raise AmusedImportError(f"{source} lacks {', '.join(missing)}: expected a diffusers-format aMUSEd "
                                f"directory ({', '.join(LAYOUT)}, scheduler/)")


def import_amused(source: str, out: str, force: bool = False) -> dict[str, nn.Module]:
    """Convert the checkpoint at `source` and write it as a model root at `out` (local or s3://). A root
    that already holds components is refused (the old vqgan_hi / superres beside the new ones would be
    a root of two families, which nothing loads); `force` replaces it whole, the components the import
    does not write deleted."""
    check_layout(source)  # everything below is checked before minutes of conversion
    if not storage.is_s3(out) and os.path.isfile(out):
        raise ValueError(f"--out {out} is a file: name a folder for the model root")
    held = [name for name in checkpoint.COMPONENTS if checkpoint.has_component(out, name)]
    if held and not force:
        raise ValueError(f"{out} already holds a model root ({', '.join(held)}); pass --force to replace it")
    parts = load_amused(source)
    for name in held:  # only once the source has converted: a bad one leaves the root as it was
        if name not in parts:
            storage.delete(checkpoint.component_uri(out, name))
    for name, model in parts.items():
        checkpoint.save_component(model, checkpoint.component_uri(out, name),
                                  extra={"imported_from": os.path.abspath(source), "format": "diffusers"})
    return parts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="muse import", description="Import pretrained weights as a model root (no downloads: give a local copy).")
    parser.add_argument("family", choices=["amused"],
                        help="amused: a diffusers-format aMUSEd directory (amused-256 or amused-512)")
    parser.add_argument("--source", required=True,
                        help="directory with model_index.json, transformer/, vqvae/, text_encoder/, tokenizer/")
    parser.add_argument("--out", required=True, help="model root to write (local path or s3://)")
    parser.add_argument("--force", action="store_true",
                        help="replace the model root at --out: its components the import does not write "
                             "(vqgan_hi, superres) are deleted")
    args = parser.parse_args(argv)
    try:
        parts = import_amused(args.source, args.out, force=args.force)
    except (ValueError, OSError) as e:  # AmusedImportError and CheckpointError are ValueErrors
        print(f"muse import: error: {e}", file=sys.stderr)
        return 2
    base = parts["base"].config
    side = base.tokens_per_side * parts["vqgan_lo"].config.downsample_factor
    print(f"wrote an aMUSEd model root ({side}x{side} px, {base.tokens_per_side}x{base.tokens_per_side} tokens) "
          f"to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
