"""The image tokenizer: a convolutional VQGAN (Esser et al. 2021) with a factorised, l2-normalised
codebook (ViT-VQGAN, Yu et al. 2022), as Muse uses it (arXiv 2301.00704 §2.1, §2.5).

    images (B, 3, H, W) ──Encoder──▶ z (B, z_channels, h, w)          h = H / f, f = 2**(levels-1)
        ──project to codebook_dim, l2-normalise──▶ nearest code by cosine ──▶ ids (B, h, w)
        ──unit-norm codes (B, codebook_dim, h, w)──Decoder──▶ images (B, 3, H, W)

Encoder and decoder are ResNet stacks (GroupNorm + SiLU) with one 2x down/upsample between the levels
of `channel_mult` and self-attention at the lowest resolution; the tiny presets use plain strided
conv stacks instead (`num_res_blocks=0`, `mid_block=False`), which train faster on CPU, or read each
f x f patch on its own (`form="patch"`: a patchifying conv and 1x1 layers, no spatial mixing), so
that content aligned with the token grid maps to one code whatever its neighbours are. The
low-dimensional cosine lookup keeps every code reachable; on top of it each code's usage is tracked
as an EMA and, in training, codes that fall under `dead_code_threshold` are restarted from encoder
outputs of the current batch.

A trainer may first run the model as a plain autoencoder (`forward(images, quantize=False)`: the
decoder reads the unit-norm projected encoder outputs), then seed the codebook from those outputs
by k-means++ (`VectorQuantizer.seed`): the codes then start where the data is and no early collapse
onto a few codes has to be undone by restarts.

Losses from `forward`: the trainer adds `reconstruction + codebook_loss + commitment_loss` (the
commitment term is already scaled by `commitment_weight`) plus the adversarial term from
`PatchDiscriminator`, weighted adaptively through `decoder_last_layer_weight()`.

Decoder fine-tune (§2.5): `widen_decoder` builds a VQGAN with a wider/deeper decoder that tokenizes
exactly like the old one, and `freeze_for_decoder_finetune` leaves only the decoder trainable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from muse.config import VQGANConfig


@dataclass
class VQGANOutput:
    recon: torch.Tensor  # (B, 3, H, W), not clamped
    ids: torch.Tensor  # (B, h, w) long
    codebook_loss: torch.Tensor  # scalar: pulls codes towards encoder outputs
    commitment_loss: torch.Tensor  # scalar, already times commitment_weight: pulls encoder to codes
    perplexity: torch.Tensor  # scalar: exp(entropy) of this batch's code histogram
    latents: torch.Tensor  # (B, h, w, codebook_dim) unit-norm projected encoder outputs, detached


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1 = group_norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = group_norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions of a (small) feature map."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).view(B, 3, 1, C, H * W).transpose(-1, -2).unbind(1)  # (B, 1, HW, C)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C)
        return x + self.out(y.transpose(-1, -2).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, channels: int, out_channels: int | None = None):
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    def __init__(self, channels: int, out_channels: int | None = None):
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


def mid_block(channels: int) -> nn.Module:
    return nn.Sequential(ResBlock(channels, channels), AttnBlock(channels), ResBlock(channels, channels))


class Encoder(nn.Module):
    def __init__(self, c: VQGANConfig):
        super().__init__()
        widths = [c.base_channels * m for m in c.channel_mult]
        self.conv_in = nn.Conv2d(c.in_channels, widths[0], 3, padding=1)
        layers: list[nn.Module] = []
        prev = widths[0]
        for level, width in enumerate(widths):
            for _ in range(c.num_res_blocks):
                layers.append(ResBlock(prev, width))
                prev = width
            if level < len(widths) - 1:
                # Without residual blocks (num_res_blocks=0) the strided conv also changes the width.
                layers.append(Downsample(prev, prev if c.num_res_blocks else widths[level + 1]))
                prev = layers[-1].conv.out_channels
                if not c.num_res_blocks:
                    layers += [group_norm(prev), nn.SiLU()]
        self.down = nn.Sequential(*layers)
        self.mid = mid_block(prev) if c.mid_block else nn.Identity()
        self.norm_out = group_norm(prev)
        self.conv_out = nn.Conv2d(prev, c.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.down(self.conv_in(x)))  # (B, C_top, h, w)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, z_channels, h, w)


class Decoder(nn.Module):
    """Mirror of the encoder; width and depth come from the decoder_* fields when they are set."""

    def __init__(self, c: VQGANConfig):
        super().__init__()
        base = c.decoder_base_channels or c.base_channels
        depth = c.decoder_num_res_blocks or c.num_res_blocks
        widths = [base * m for m in c.channel_mult]
        prev = widths[-1]
        self.conv_in = nn.Conv2d(c.codebook_dim, prev, 3, padding=1)
        self.mid = mid_block(prev) if c.mid_block else nn.Identity()
        layers: list[nn.Module] = []
        for level in reversed(range(len(widths))):
            for _ in range(depth):
                layers.append(ResBlock(prev, widths[level]))
                prev = widths[level]
            if level > 0:
                layers.append(Upsample(prev, prev if depth else widths[level - 1]))
                prev = layers[-1].conv.out_channels
                if not depth:
                    layers += [group_norm(prev), nn.SiLU()]
        self.up = nn.Sequential(*layers)
        self.norm_out = group_norm(prev)
        self.conv_out = nn.Conv2d(prev, c.in_channels, 3, padding=1)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        h = self.up(self.mid(self.conv_in(codes)))  # (B, C_0, H, W)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 3, H, W)


class PatchEncoder(nn.Module):
    """Each f x f patch on its own: a patchifying conv (kernel = stride = f), then 1x1 layers."""

    def __init__(self, c: VQGANConfig):
        super().__init__()
        width, f = c.base_channels, c.downsample_factor
        layers: list[nn.Module] = [nn.Conv2d(c.in_channels, width, f, stride=f)]
        for _ in range(c.num_res_blocks):
            layers += [nn.GELU(), nn.Conv2d(width, width, 1)]
        self.net = nn.Sequential(*layers, nn.GELU(), nn.Conv2d(width, c.z_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, z_channels, H/f, W/f)


class PatchDecoder(nn.Module):
    """Each code back to its f x f patch: 1x1 layers, then an unpatchifying transposed conv."""

    def __init__(self, c: VQGANConfig):
        super().__init__()
        width = c.decoder_base_channels or c.base_channels
        depth = c.decoder_num_res_blocks or c.num_res_blocks
        f = c.downsample_factor
        self.conv_in = nn.Conv2d(c.codebook_dim, width, 1)
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.GELU(), nn.Conv2d(width, width, 1)]
        self.hidden = nn.Sequential(*layers, nn.GELU())
        self.conv_out = nn.ConvTranspose2d(width, c.in_channels, f, stride=f)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.hidden(self.conv_in(codes)))  # (B, 3, h*f, w*f)


class VectorQuantizer(nn.Module):
    """Factorised cosine-similarity lookup with EMA usage tracking and dead-code restarts.

    `usage[k]` is an EMA of code k's share of the assignments, scaled by codebook_size so that uniform
    use reads 1.0; it starts at 0, so the first training batch seeds every code from encoder outputs.
    A restarted code's usage is reset to 1.0, which gives it ~ln(1/threshold)/(1-decay) steps to be
    picked. Restarts run only in training mode and only while the codebook is trainable. Under
    torch.distributed the histogram is summed over ranks and new codes come from rank 0, so every
    rank keeps the same codebook.
    """

    def __init__(self, in_dim: int, codebook_size: int, codebook_dim: int, commitment_weight: float,
                 dead_code_threshold: float, decay: float = 0.99):
        super().__init__()
        self.codebook_size, self.codebook_dim = codebook_size, codebook_dim
        self.commitment_weight, self.dead_code_threshold, self.decay = commitment_weight, dead_code_threshold, decay
        self.proj = nn.Linear(in_dim, codebook_dim)
        self.codebook = nn.Parameter(torch.empty(codebook_size, codebook_dim))
        self.register_buffer("usage", torch.zeros(codebook_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.codebook)
        nn.init.zeros_(self.usage)

    def project(self, z: torch.Tensor) -> torch.Tensor:
        """Encoder output (B, C, h, w) -> unit vectors (B, h, w, codebook_dim) in float32."""
        with torch.autocast(z.device.type, enabled=False):  # the code search needs float32
            return F.normalize(self.proj(z.permute(0, 2, 3, 1).to(self.proj.weight.dtype)).float(), dim=-1)

    def codes(self) -> torch.Tensor:
        return F.normalize(self.codebook.float(), dim=-1)  # (K, d)

    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """Unit vectors (B, h, w, d) -> ids (B, h, w) of the nearest code by cosine similarity."""
        with torch.autocast(z.device.type, enabled=False):  # bf16 scores would pick other codes
            return (z.float() @ self.codes().t()).argmax(dim=-1)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, h, w) -> unit-norm codes (B, d, h, w), the decoder's input."""
        return F.embedding(ids, self.codes()).permute(0, 3, 1, 2)

    def forward(self, z: torch.Tensor, quantize: bool = True) -> tuple[torch.Tensor, ...]:
        """z (B, C, h, w) -> (codes (B, d, h, w) with straight-through gradient, ids (B, h, w),
        codebook_loss, commitment_loss, perplexity, unit-norm latents (B, h, w, d) detached).
        quantize=False passes the unit-norm latents on instead of codes (an autoencoder warm-up): no
        code losses, no usage update, no restarts; ids and perplexity still say where they would go."""
        learning = quantize and self.training and self.codebook.requires_grad
        zn = self.project(z)  # (B, h, w, d)
        if learning:
            self.restart_dead_codes(zn.detach().flatten(0, 2))
        ids = self.lookup(zn.detach())  # (B, h, w)
        counts = torch.bincount(ids.flatten(), minlength=self.codebook_size).float()  # (K,)
        p = counts / counts.sum()
        perplexity = torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())
        if not quantize:
            zero = zn.new_zeros(())
            return zn.permute(0, 3, 1, 2).to(z.dtype), ids, zero, zero, perplexity, zn.detach()
        q = F.embedding(ids, self.codes())  # (B, h, w, d)
        codebook_loss = F.mse_loss(q, zn.detach())
        commitment_loss = self.commitment_weight * F.mse_loss(zn, q.detach())
        if learning:
            self.update_usage(counts)
        q = zn + (q - zn).detach()  # straight-through estimator
        return q.permute(0, 3, 1, 2).to(z.dtype), ids, codebook_loss, commitment_loss, perplexity, zn.detach()

    @torch.no_grad()
    def seed(self, candidates: torch.Tensor) -> None:
        """Set every code by k-means++ seeding over candidates (N, d), unit-norm encoder outputs:
        each next code is drawn with probability proportional to 1 - its best cosine to the codes
        so far, so every distinct kind of patch gets a code before any kind gets a second one.
        Usage restarts at 1.0 (uniform). Under torch.distributed rank 0's codes are broadcast."""
        candidates = F.normalize(candidates.float(), dim=-1)
        gen = torch.Generator(device=candidates.device).manual_seed(0)
        first = torch.randint(candidates.shape[0], (1,), generator=gen, device=candidates.device)
        codes = candidates.new_empty(self.codebook_size, self.codebook_dim)
        codes[0] = candidates[first[0]]
        best = candidates @ codes[0]  # (N,) best cosine to the codes so far
        for k in range(1, self.codebook_size):
            pick = torch.multinomial((1.0 - best).clamp_min(0.0) + 1e-6, 1, generator=gen)[0]
            codes[k] = candidates[pick]
            best = torch.maximum(best, candidates @ codes[k])
        codes += 1e-3 * torch.randn(codes.shape, generator=gen, device=codes.device)  # splits repeats
        if dist.is_available() and dist.is_initialized():
            dist.broadcast(codes, src=0)
        self.codebook.data.copy_(F.normalize(codes, dim=-1).to(self.codebook.dtype))
        self.usage.fill_(1.0)

    @torch.no_grad()
    def update_usage(self, counts: torch.Tensor) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)
        share = counts * (self.codebook_size / counts.sum().clamp_min(1.0))  # uniform use = 1.0
        self.usage.mul_(self.decay).add_(share, alpha=1.0 - self.decay)

    @torch.no_grad()
    def restart_dead_codes(self, candidates: torch.Tensor) -> int:
        """Re-initialise codes whose usage is under the threshold from rows of candidates (N, d),
        typically this batch's projected encoder outputs, drawn with probability proportional to how
        badly the current codebook fits them (1 - best cosine, as in k-means++ seeding): on images
        that are mostly background, uniform draws would spend the new codes on the background again.
        Returns how many were restarted."""
        dead = (self.usage < self.dead_code_threshold).nonzero().squeeze(1)  # (n,)
        if dead.numel() == 0:
            return 0
        misfit = 1.0 - (candidates @ self.codes().t()).amax(dim=-1)  # (N,) in [0, 2]
        pick = torch.multinomial(misfit.clamp_min(0.0) + 1e-6, dead.numel(), replacement=True)
        fresh = candidates[pick] + 1e-3 * torch.randn_like(candidates[pick])  # noise splits repeats
        if dist.is_available() and dist.is_initialized():
            dist.broadcast(fresh, src=0)
        # In place on .data: a graph from an earlier forward that is not yet backpropagated stays
        # valid (a dead code was not picked in it, so its rows carry no gradient there).
        self.codebook.data[dead] = F.normalize(fresh, dim=-1).to(self.codebook.dtype)
        self.usage[dead] = 1.0
        return dead.numel()


class VQGAN(nn.Module):
    def __init__(self, config: VQGANConfig):
        super().__init__()
        c = config
        if c.num_res_blocks < 0 or (c.decoder_num_res_blocks or 0) < 0:
            raise ValueError("num_res_blocks and decoder_num_res_blocks must be >= 0")
        if c.resolution % c.downsample_factor:
            raise ValueError(f"resolution {c.resolution} is not a multiple of f={c.downsample_factor}")
        if c.form not in ("conv", "patch"):
            raise ValueError(f"form must be 'conv' or 'patch', got {c.form!r}")
        self.config = c
        patch = c.form == "patch"
        self.encoder = PatchEncoder(c) if patch else Encoder(c)
        self.quantizer = VectorQuantizer(c.z_channels, c.codebook_size, c.codebook_dim, c.commitment_weight,
                                         c.dead_code_threshold)
        self.decoder = PatchDecoder(c) if patch else Decoder(c)
        # The patch form keeps PyTorch's default (fan-in uniform) initialisation: measured to learn
        # the demo's corpus faster than the conv stacks' Kaiming-normal one.
        for module in (self.quantizer,) if patch else (self,):
            module.apply(_init_weights)

    def _check_images(self, images: torch.Tensor) -> None:
        f = self.config.downsample_factor
        if images.ndim != 4 or images.shape[1] != self.config.in_channels or images.shape[2] % f or images.shape[3] % f:
            raise ValueError(f"images must be (B, {self.config.in_channels}, H, W) with H, W multiples of {f}, "
                             f"got {tuple(images.shape)}")

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> token ids (B, H/f, W/f) long. No side effects."""
        self._check_images(images)
        return self.quantizer.lookup(self.quantizer.project(self.encoder(images)))

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """token ids (B, h, w) -> images (B, 3, h*f, w*f) clamped to [-1, 1]."""
        if ids.ndim != 3:
            raise ValueError(f"ids must be (B, h, w), got {tuple(ids.shape)}")
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.config.codebook_size):
            raise ValueError(f"ids must lie in [0, {self.config.codebook_size})")
        codes = self.quantizer.embed(ids).to(self.decoder.conv_in.weight.dtype)  # (B, d, h, w)
        return self.decoder(codes).clamp(-1.0, 1.0)

    @torch.no_grad()
    def code_pixels(self) -> torch.Tensor:
        """(codebook_size, in_channels * f * f): the patch each code decodes to, flattened. Only the patch
        form decodes a code on its own; a conv decoder's output for one code depends on its neighbours."""
        if self.config.form != "patch":
            raise ValueError(f"code pixels need a patch-form tokenizer (each code decoded on its own); this "
                             f"one is {self.config.form!r}")
        K, f, ch = self.config.codebook_size, self.config.downsample_factor, self.config.in_channels
        patches = self.decode(torch.arange(K, device=self.quantizer.codebook.device).view(1, 1, K))  # (1, ch, f, K*f)
        return patches[0].view(ch, f, K, f).permute(2, 0, 1, 3).reshape(K, ch * f * f).float()

    def forward(self, images: torch.Tensor, quantize: bool = True) -> VQGANOutput:
        """Training pass: reconstruction (unclamped) and the quantizer's losses and statistics.
        quantize=False decodes the unit-norm latents instead of codes (an autoencoder warm-up)."""
        self._check_images(images)
        codes, ids, codebook_loss, commitment_loss, perplexity, latents = self.quantizer(self.encoder(images), quantize)
        return VQGANOutput(self.decoder(codes), ids, codebook_loss, commitment_loss, perplexity, latents)

    def decoder_last_layer_weight(self) -> torch.Tensor:
        """The decoder's output conv weight, for the adaptive adversarial weight (Esser et al. eq. 7)."""
        return self.decoder.conv_out.weight


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al.) with GroupNorm instead of BatchNorm: images (B, 3, H, W) -> logits
    (B, 1, h', w'), one real/fake score per overlapping patch, for hinge losses."""

    def __init__(self, config: VQGANConfig):
        super().__init__()
        ch = config.disc_channels
        layers: list[nn.Module] = [nn.Conv2d(config.in_channels, ch, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        prev = ch
        for n in range(1, config.disc_layers + 1):
            width = ch * min(2**n, 8)
            stride = 2 if n < config.disc_layers else 1
            layers += [nn.Conv2d(prev, width, 4, stride=stride, padding=1, bias=False), group_norm(width),
                       nn.LeakyReLU(0.2)]
            prev = width
        layers.append(nn.Conv2d(prev, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)
        self.config = config
        self.apply(_init_weights)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)  # (B, 1, h', w')


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.kaiming_normal_(module.weight, nonlinearity="linear")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.GroupNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def widen_decoder(vqgan: VQGAN, decoder_base_channels: int, decoder_num_res_blocks: int) -> VQGAN:
    """A new VQGAN with a freshly initialised wider/deeper decoder and copies of the encoder and the
    quantizer (codebook, projection, usage), so it maps images to exactly the same ids (Muse §2.5)."""
    config = replace(vqgan.config, decoder_base_channels=decoder_base_channels,
                     decoder_num_res_blocks=decoder_num_res_blocks)
    ref = vqgan.quantizer.codebook
    wide = VQGAN(config).to(device=ref.device, dtype=ref.dtype)
    wide.encoder.load_state_dict(vqgan.encoder.state_dict())
    wide.quantizer.load_state_dict(vqgan.quantizer.state_dict())
    return wide


def freeze_for_decoder_finetune(vqgan: VQGAN) -> VQGAN:
    """Freeze everything but the decoder; a frozen codebook is also never restarted."""
    for p in vqgan.parameters():
        p.requires_grad_(False)
    for p in vqgan.decoder.parameters():
        p.requires_grad_(True)
    return vqgan


def grown_config(lo: VQGANConfig) -> VQGANConfig:
    """`lo` at twice the resolution with the same token grid: one more level, as wide as lo's first."""
    if lo.form != "conv":
        raise ValueError("only a conv-form VQGAN can be grown by a level (a patch-form one is trained at its size)")
    return replace(lo, resolution=2 * lo.resolution, channel_mult=(lo.channel_mult[0],) + tuple(lo.channel_mult))


def grow(lo: VQGAN) -> VQGAN:
    """A tokenizer for twice `lo`'s resolution with the same token grid (f doubles): one new stride-2
    level at the full-resolution end of the encoder and of the decoder; every other layer and the
    quantizer (codebook, projection, usage) are copied from `lo`. Its codes start out meaning what
    `lo`'s mean, so fine-tuning it costs a fraction of training a high-res tokenizer from scratch."""
    big = VQGAN(grown_config(lo.config)).to(device=lo.quantizer.codebook.device, dtype=lo.quantizer.codebook.dtype)
    source = lo.state_dict()
    # The encoder's new level sits at its start: lo's down.i is big's down.(i + shift). The decoder's
    # new level sits at its end: up.i is the same module in both. Everything else keeps its name.
    shift = len(big.encoder.down) - len(lo.encoder.down)
    target = {}
    for name, tensor in source.items():
        if name.startswith("encoder.conv_in."):
            continue  # lo's input conv reads pixels at lo's resolution; big's reads them at twice that
        if name.startswith("encoder.down."):
            index, rest = name[len("encoder.down."):].split(".", 1)
            name = f"encoder.down.{int(index) + shift}.{rest}"
        target[name] = tensor
    own = big.state_dict()
    mismatched = [k for k, v in target.items() if k not in own or own[k].shape != v.shape]
    if mismatched:
        raise ValueError(f"cannot grow this VQGAN (layers that do not line up: {mismatched[:4]})")
    own.update(target)
    big.load_state_dict(own)
    return big
