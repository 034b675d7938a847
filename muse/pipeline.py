"""Text to image in one process: text encoder -> base transformer -> super-res transformer -> VQGAN.

    prompts ──T5──▶ TextCondition ──base_tokens──▶ lo ids (B·n, h, w) ──superres_tokens──▶ hi ids
                                                                           ──VQGAN_hi.decode──▶ PIL

`MusePipeline` holds the five components of a model root and adds prompts, seeds, editing (inpaint /
outpaint / mask-free edit) and PIL in and out around the two token stages (`muse.token_stages`, which
the serving layer calls per deployment). Image i of prompt p of a call with seed s draws from its own
generator, seeded `sampling.image_seed(s, i, p)`, in both stages, so it does not depend on the other
images, and no two seeds share an image. One caveat in bf16 and fp16: prompts of a call are padded to
the longest, and padding changes the text's encoding and attention by rounding, which can flip a few
sampled tokens; ask for one prompt per call there (as the serving layer encodes each request alone)
to get the image a single-prompt call gives. In float32 the images are the same.
"""

from __future__ import annotations

import math
import numbers
import operator
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from PIL import Image

from muse import checkpoint, editing, sampling, storage
from muse.components import check_fit
from muse.config import SAMPLING
from muse.root_sampling import RootSampling, read_root_sampling, write_root_sampling
from muse.data.images import centre_square, pil_to_tensor, tensor_to_pil
from muse.image_inputs import letterbox, load_image, load_mask
from muse.token_stages import TextCondition, base_tokens, stage_contexts, superres_tokens
from muse.transformer import MaskedTransformer, SuperResTransformer

OUTPUTS = ("pil", "tokens")
StageCallback = Callable[[str, int, torch.Tensor], None]  # (stage, step, ids)


class MusePipeline:
    """The components of a model root and every way of sampling from them.

    text_encoder, vqgan_lo and base are required; vqgan_hi and superres come together or not at all.
    Images come out at vqgan_hi's resolution through super-res, else at vqgan_lo's.
    """

    def __init__(self, text_encoder: torch.nn.Module, vqgan_lo: torch.nn.Module, base: MaskedTransformer,
                 vqgan_hi: torch.nn.Module | None = None, superres: SuperResTransformer | None = None):
        if (vqgan_hi is None) != (superres is None):
            raise ValueError("vqgan_hi and superres go together: give both or neither")
        self.text_encoder, self.vqgan_lo, self.base = text_encoder, vqgan_lo, base
        self.vqgan_hi, self.superres = vqgan_hi, superres
        _check_compatible(text_encoder, vqgan_lo, base, vqgan_hi, superres)
        # What the root records it draws well with (`muse.root_sampling`): `pipe(p, **pipe.root_sampling.recorded())`.
        self.root_sampling = RootSampling()

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, root_uri: str, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> MusePipeline:
        """Load a model root (local path, file:// or s3://). vqgan_hi + superres are loaded when both
        are there; a root with only one of them (super-res still training) loads without super-res,
        with a warning. `dtype`: the transformers and VQGANs cast as `to(dtype=...)` casts them, each as
        it loads, so memory holds two copies of one component at most, not of the whole root."""
        def load(name: str) -> torch.nn.Module:
            model = checkpoint.load_component(checkpoint.component_uri(root_uri, name), device=device,
                                              expect_kind=checkpoint.slot_role(name))
            if dtype is not None and name != "text_encoder":
                _check_dtype(model, dtype)
                model.to(dtype=dtype)
            return model

        parts = {name: load(name) for name in checkpoint.REQUIRED_COMPONENTS}
        present = [name for name in ("vqgan_hi", "superres") if checkpoint.has_component(root_uri, name)]
        if len(present) == 2:
            parts.update({name: load(name) for name in present})
        elif present:
            warnings.warn(f"{root_uri} has {present[0]}/ but not {({'vqgan_hi', 'superres'} - set(present)).pop()}/: "
                          "loading it without the super-res stage", stacklevel=2)
        pipe = cls(**parts)
        pipe.root_sampling = read_root_sampling(root_uri)
        return pipe

    @classmethod
    def from_preset(cls, name: str = "tiny", seed: int = 0, device: str | torch.device = "cpu") -> MusePipeline:
        """Random weights for a model preset, identical to `checkpoint.init_model_root(name, root, seed)`
        (component i seeded seed + i). The global torch RNG is left as it was."""
        from muse.config import model_preset

        config = model_preset(name)
        parts = {}
        with torch.random.fork_rng(devices=[]):
            for i, part in enumerate(checkpoint.COMPONENTS):
                torch.manual_seed(seed + i)
                parts[part] = checkpoint.build_component(part, getattr(config, part)).to(device).eval()
        return cls(**parts)

    def save_pretrained(self, root_uri: str, remove_others: bool = False) -> None:
        """Write every component as a model root that `from_pretrained` loads. A root that already holds
        a component this pipeline lacks would load it beside the new ones (a base-only pipeline saved
        over a whole root: the new base with the old super-res), so that is refused, or with
        `remove_others` those components are deleted first. A text encoder loaded from a folder its root
        referenced is written as the same reference, not as a copy of its weights."""
        others = [name for name in checkpoint.COMPONENTS
                  if getattr(self, name) is None and checkpoint.has_component(root_uri, name)]
        if others and not remove_others:
            raise ValueError(f"{root_uri} holds {', '.join(others)}, which this pipeline does not: save into "
                             "another root, or pass remove_others=True to delete them")
        for name in others:
            storage.delete(checkpoint.component_uri(root_uri, name))
        for name in checkpoint.COMPONENTS:
            model = getattr(self, name)
            if getattr(model, "referenced", False):  # a folder the root named (T5-XXL): named again, not copied
                checkpoint.save_reference(model.config, checkpoint.component_uri(root_uri, name))
            elif model is not None:
                checkpoint.save_component(model, checkpoint.component_uri(root_uri, name))
        write_root_sampling(root_uri, self.root_sampling)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> MusePipeline:
        """Move every component (and cast the transformers and VQGANs to `dtype`). The text encoder
        takes the precision its config names for the device, as `from_pretrained(device=...)` gives
        it (T5's "auto": bfloat16 on a GPU); a stage casts its embeddings when it reads them."""
        for name in ("vqgan_lo", "vqgan_hi"):
            _check_dtype(getattr(self, name), dtype)
        for name in checkpoint.COMPONENTS:
            model = getattr(self, name)
            if model is None:
                continue
            if name != "text_encoder":
                model.to(device=device, dtype=dtype)
            elif device is not None and hasattr(model, "place"):
                model.place(device)
            else:
                model.to(device=device)
        return self

    def compile(self, mode: str | None = None) -> MusePipeline:
        """Compile the fixed-shape step of both transformers (`TokenTransformer.compile_step`): CUDA
        graphs on a GPU. The first decode at each batch size pays the compile; a failure falls back
        to the eager step with a warning."""
        for model in (self.base, self.superres):
            if model is not None:
                model.compile_step(mode)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.base.parameters()).device

    @property
    def resolution(self) -> int:
        """Side of the images this pipeline writes through super-res (or at base when it has none)."""
        return (self.vqgan_hi or self.vqgan_lo).config.resolution

    def encode_prompts(self, prompts: list[str]) -> TextCondition:
        with torch.no_grad():
            emb, mask = self.text_encoder(list(prompts))
        return TextCondition(emb, mask)

    # -- text to image -------------------------------------------------------------------------
    @torch.no_grad()  # inference: no autograd graph is kept (context encodings, VQGAN encodes)
    def __call__(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None,
                 num_images: int = 1, steps: int = SAMPLING.steps, superres_steps: int = SAMPLING.superres_steps,
                 guidance_scale: float = SAMPLING.guidance_scale, seed: int | Sequence[int] | None = None,
                 output: str = "pil", superres: bool | None = None,
                 callback: StageCallback | None = None, choice_temperature: float = SAMPLING.choice_temperature,
                 temperature: float | None = None, superres_top_k: int | None = None,
                 first_image: int = 0) -> list[Image.Image] | torch.Tensor:
        """Images for each prompt (prompt-major: all of prompt 0's images first).

        negative_prompt: one for all prompts or one per prompt; None = the unconditional branch.
        seed: image i of prompt p draws from `sampling.image_seed(seed, i, p)` in both stages, so the
            same seed and settings give the same images, and an image does not depend on how many
            images or prompts were asked for (in bf16 and fp16 other prompts can flip a few tokens: see
            the module's note) (None = a seed drawn from torch's global RNG). One seed per prompt: each
            prompt's images are those of a call for that prompt alone with its seed (a batch of several
            requests, or an evaluation whose images must not depend on how it is cut into calls).
        first_image: i of the first image (the same in `inpaint`, `outpaint` and `edit`): a long run is
            drawn in batches, `num_images` at a time from first_image 0, num_images, ..., and gives the
            images one call would.
        output "pil" -> list of PIL images; "tokens" -> the last stage's ids (B·n, side, side).
        superres: run the super-res stage; None = whenever the pipeline has it (the same in `inpaint`,
            `outpaint` and `edit`).
        callback(stage, step, ids), stage "base" or "superres", after each decoding step; ids (B·n, N) flat,
            where output="tokens" gives (B·n, side, side).
        choice_temperature: MaskGIT's re-masking noise (`temperature` is its old name).
        superres_top_k: super-res draws each code among its k likeliest (1: the likeliest, which keeps
            the low-res image's colours where sampling the whole codebook sometimes does not:
            benchmarks/RESULTS.md, "Super-res drawing the likeliest code"); None: the whole codebook.
        """
        superres = self._use_superres(superres)
        req = Request(num_images, steps, superres_steps, guidance_scale,
                      sampling.renamed_temperature(choice_temperature, temperature), seed, output, superres, callback,
                      superres_top_k=superres_top_k, first_image=first_image)
        prompts = _prompts(prompt)
        negatives = _negatives(negative_prompt, len(prompts))
        self._check(req)
        gens = self._generators(seed, req.num_images, prompts=len(prompts), first=req.first_image)
        cond, negative = self._conditions(prompts, negatives, req.guidance_scale)
        lo = base_tokens(self.base, cond, negative, num_images=req.num_images, steps=req.steps,
                         guidance_scale=req.guidance_scale, generator=gens, choice_temperature=req.choice_temperature,
                         callback=_stage(callback, "base"))
        if not superres:
            return lo if output == "tokens" else self._to_pil(self.vqgan_lo, lo)
        hi = superres_tokens(self.superres, cond, lo, negative, steps=req.superres_steps,
                             guidance_scale=req.guidance_scale, generator=gens, choice_temperature=req.choice_temperature,
                             top_k=req.superres_top_k, callback=_stage(callback, "superres"))
        return hi if output == "tokens" else self._to_pil(self.vqgan_hi, hi)

    # -- editing -------------------------------------------------------------------------------
    @torch.no_grad()
    def inpaint(self, image: Any, mask: Any, prompt: str, negative_prompt: str | None = None, num_images: int = 1,
                steps: int = SAMPLING.steps, superres_steps: int = SAMPLING.superres_steps,
                guidance_scale: float = SAMPLING.guidance_scale, seed: int | None = None, output: str = "pil",
                superres: bool | None = None, callback: StageCallback | None = None,
                choice_temperature: float = SAMPLING.choice_temperature, superres_top_k: int | None = None,
                first_image: int = 0, keep_pixels: bool = False) -> list[Image.Image] | torch.Tensor:
        """Regenerate the masked part of `image` under `prompt`.

        image: PIL image, encoded bytes, a path (local or s3://) or a (3, H, W) tensor in [-1, 1].
        mask: same size as the image (PIL image, image file/bytes, array or tensor (H, W)); non-zero =
            regenerate.
        A token is regenerated when any pixel of its patch is masked; the rest stay fixed, so outside the
        mask the image is the tokenizer's decoding of the input's tokens (beside the new ones), not its
        pixels, unless `keep_pixels` puts the input's pixels back there (`editing.keep_pixels`). The
        model sees the centre square of a non-square image (`muse.image_inputs`)."""
        superres = self._use_superres(superres)
        req = Request(num_images, steps, superres_steps, guidance_scale, choice_temperature, seed, output, superres,
                      callback, superres_top_k=superres_top_k, first_image=first_image)
        prompt_, negatives = self._checked(req, prompt, negative_prompt)
        img = load_image(image, "image")
        pixel_mask = load_mask(mask, img.size)
        lo_img, hi_img = self._image_tensors(img, superres)
        square = centre_square(pixel_mask)
        if not square.any():
            raise ValueError(f"the mask lies outside the centre {square.shape[0]}x{square.shape[0]} square of the "
                             f"{img.width}x{img.height} image, which is all the model sees of it: crop the image "
                             "to a square around what to repaint")
        regen = editing.token_mask_from_pixels(square[None], self.base.config.tokens_per_side)  # (1, h, w)
        return self._fill(lo_img, hi_img, regen, prompt_, negatives, req, square if keep_pixels else None)

    @torch.no_grad()
    def outpaint(self, image: Any, prompt: str, direction: str = "all", scale: float = 0.5,
                 negative_prompt: str | None = None, num_images: int = 1, steps: int = SAMPLING.steps,
                 superres_steps: int = SAMPLING.superres_steps, guidance_scale: float = SAMPLING.guidance_scale,
                 seed: int | None = None, output: str = "pil", superres: bool | None = None,
                 callback: StageCallback | None = None,
                 choice_temperature: float = SAMPLING.choice_temperature, superres_top_k: int | None = None,
                 first_image: int = 0, keep_pixels: bool = False) -> list[Image.Image] | torch.Tensor:
        """Extend `image` beyond its borders (see `editing.outpaint_canvas`): direction "all" shrinks it
        to `scale` of the side in the centre; "left"/"right"/"up"/"down" shift it so it covers `scale`
        of the canvas and the strip on that side is new. The output keeps the model's resolution. A
        non-square image is letterboxed into the square, and its bands are drawn as well. `keep_pixels`
        puts the (shrunk or shifted) image's own pixels back where the canvas holds it."""
        superres = self._use_superres(superres)
        req = Request(num_images, steps, superres_steps, guidance_scale, choice_temperature, seed, output, superres,
                      callback, superres_top_k=superres_top_k, first_image=first_image)
        prompt_, negatives = self._checked(req, prompt, negative_prompt)
        if direction not in editing.DIRECTIONS:
            raise ValueError(f"direction must be one of {editing.DIRECTIONS}, got {direction!r}")
        if not 0 < scale < 1:
            raise ValueError(f"scale must be in (0, 1), got {scale}")
        img = load_image(image, "image")
        pixels, inside = self._letterboxed(img, self.vqgan_lo)
        lo_canvas, new = editing.outpaint_canvas(pixels, direction, scale, known=inside)
        hi_canvas = None
        if superres and self.vqgan_hi is not None:  # placed as the low-res canvas is, pixel for pixel
            side = lo_canvas.shape[-1]
            pixels, inside = self._letterboxed(img, self.vqgan_hi, placed_at=side)
            hi_canvas = editing.outpaint_canvas(pixels, direction, scale, known=inside, placed_at=side)[0]
        side = self.base.config.tokens_per_side
        regen = editing.token_mask_from_pixels(new, side)
        if not regen.any() or regen.all():  # the image would come back alone, or not at all
            left = "no token of the canvas is new" if not regen.any() else "no token of the image is kept"
            raise ValueError(f"scale {scale:g} {direction}: {left} on the model's {side}x{side} tokens; take a scale "
                             f"{'further from 1' if not regen.any() else 'nearer 1'}")
        return self._fill(lo_canvas, hi_canvas, regen, prompt_, negatives, req, new[0] if keep_pixels else None)

    @torch.no_grad()
    def edit(self, image: Any, prompt: str, negative_prompt: str | None = None, num_images: int = 1,
             iterations: int = SAMPLING.edit_iterations, fraction: float = SAMPLING.edit_fraction,
             guidance_scale: float = SAMPLING.guidance_scale, top_k: int | None = 3,
             superres_steps: int = SAMPLING.superres_steps, seed: int | None = None, output: str = "pil",
             superres: bool | None = None,
             callback: StageCallback | None = None, choice_temperature: float = SAMPLING.choice_temperature,
             superres_top_k: int | None = None, first_image: int = 0) -> list[Image.Image] | torch.Tensor:
        """Mask-free editing: starting from the image's tokens, resample a random `fraction` of them
        `iterations` times under `prompt` (guidance, top-k). Through super-res, high-res tokens are
        regenerated where the low-res tokens changed and kept elsewhere; that fill takes
        `choice_temperature` and `superres_top_k` as `__call__` does. Stage names: "edit", "superres"."""
        superres = self._use_superres(superres)
        req = Request(num_images, iterations, superres_steps, guidance_scale, choice_temperature, seed, output,
                      superres, callback, steps_name="iterations", superres_top_k=superres_top_k,
                      first_image=first_image)
        prompt_, negatives = self._checked(req, prompt, negative_prompt)
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
        img = load_image(image, "image")
        lo_img, hi_img = self._image_tensors(img, superres)
        gens = self._generators(seed, req.num_images, first=req.first_image)
        cond, negative = self._conditions([prompt_], negatives, req.guidance_scale)
        source = self.vqgan_lo.encode(lo_img).repeat(req.num_images, 1, 1)  # (n, h, w)
        ctx, uncond = stage_contexts(self.base, cond, negative, guided=req.guidance_scale != 0, repeat=req.num_images)
        lo = editing.edit_tokens(self.base, ctx, uncond, source, iterations=req.steps, fraction=float(fraction),
                                 guidance_scale=req.guidance_scale, top_k=None if top_k is None else int(top_k),
                                 generator=gens,
                                 callback=_stage(callback, "edit"))
        if not superres:
            return lo if output == "tokens" else self._to_pil(self.vqgan_lo, lo)
        hi_side = self.superres.config.hi_tokens_per_side
        regen_hi = editing.upsample_token_mask(lo != source, hi_side)
        hi = self._superres_fill(cond, negative, lo, hi_img, regen_hi, req, gens)
        return hi if output == "tokens" else self._to_pil(self.vqgan_hi, hi)

    # -- internals -----------------------------------------------------------------------------
    def _conditions(self, prompts: list[str], negatives: list[str] | None,
                    guidance_scale: float) -> tuple[TextCondition, TextCondition | None]:
        """The prompts' text condition, and the negative prompts' where guidance reads them (not at 0)."""
        if negatives is not None and guidance_scale == 0:
            warnings.warn("negative_prompt has no effect at guidance_scale 0: only guidance reads it", stacklevel=3)
        guided = negatives is not None and guidance_scale != 0
        return self.encode_prompts(prompts), self.encode_prompts(negatives) if guided else None

    def _fill(self, lo_img, hi_img, regen: torch.Tensor, prompt_: str, negatives: list[str] | None, req: Request,
              kept_outside: torch.Tensor | None = None):
        """Inpainting on both stages: lo tokens decoded where `regen` (1, h, w); hi tokens where the
        upsampled mask says, conditioned on the new lo tokens; known tokens fixed on both. With
        `kept_outside`, a pixel mask, the images get the input's pixels back outside it. The caller
        has checked the request (`_checked`) before decoding any image."""
        n = req.num_images
        gens = self._generators(req.seed, n, first=req.first_image)
        cond, negative = self._conditions([prompt_], negatives, req.guidance_scale)
        source = self.vqgan_lo.encode(lo_img).repeat(n, 1, 1)  # (n, h, w)
        regen = regen.to(self.device).repeat(n, 1, 1)
        ctx, uncond = stage_contexts(self.base, cond, negative, guided=req.guidance_scale != 0, repeat=n)
        lo = editing.inpaint_tokens(self.base, ctx, uncond, source, regen, steps=req.steps,
                                    guidance_scale=req.guidance_scale, generator=gens,
                                    choice_temperature=req.choice_temperature, callback=_stage(req.callback, "base"))
        if not req.superres:
            return lo if req.output == "tokens" else self._to_pil(self.vqgan_lo, lo, lo_img, kept_outside)
        regen_hi = editing.upsample_token_mask(regen, self.superres.config.hi_tokens_per_side)
        hi = self._superres_fill(cond, negative, lo, hi_img, regen_hi, req, gens)
        return hi if req.output == "tokens" else self._to_pil(self.vqgan_hi, hi, hi_img, kept_outside)

    def _superres_fill(self, cond: TextCondition, negative: TextCondition | None, lo: torch.Tensor,
                       hi_img: torch.Tensor, regen_hi: torch.Tensor, req: Request, gens: list[torch.Generator]):
        n = lo.shape[0]
        source_hi = self.vqgan_hi.encode(hi_img).repeat(n, 1, 1)  # (n, H, W)
        ctx, uncond = stage_contexts(self.superres, cond, negative, guided=req.guidance_scale != 0, lo_ids=lo)
        return editing.inpaint_tokens(self.superres, ctx, uncond, source_hi, regen_hi, steps=req.superres_steps,
                                      guidance_scale=req.guidance_scale, generator=gens,
                                      choice_temperature=req.choice_temperature, top_k=req.superres_top_k,
                                      callback=_stage(req.callback, "superres"))

    def _image_tensors(self, img: Image.Image, superres: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(1, 3, r, r) at the base VQGAN's resolution, and at the high-res one when super-res runs."""
        def at(vqgan) -> torch.Tensor:
            dtype = next(vqgan.parameters()).dtype
            return pil_to_tensor(img, vqgan.config.resolution)[None].to(self.device, dtype)

        return at(self.vqgan_lo), (at(self.vqgan_hi) if superres and self.vqgan_hi is not None else None)

    def _letterboxed(self, img: Image.Image, vqgan, placed_at: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, 3, r, r) of the whole image letterboxed at vqgan's resolution, and (1, r, r) where it is."""
        pixels, inside = letterbox(img, vqgan.config.resolution, placed_at)
        return pixels[None].to(self.device, next(vqgan.parameters()).dtype), inside[None].to(self.device)

    def _to_pil(self, vqgan, ids: torch.Tensor, original: torch.Tensor | None = None,
                kept_outside: torch.Tensor | None = None) -> list[Image.Image]:
        with torch.no_grad():
            images = vqgan.decode(ids)
            if kept_outside is not None:
                images = editing.keep_pixels(images, original, kept_outside)
        return [tensor_to_pil(x) for x in images]

    def _generators(self, seed: int | Sequence[int] | None, n: int, prompts: int = 1,
                    first: int = 0) -> list[torch.Generator]:
        if isinstance(seed, (list, tuple)):  # one per prompt, each as its own request's
            if len(seed) != prompts:
                raise ValueError(f"seed must be one integer, or one per prompt ({prompts}), got {len(seed)}")
            return [g for s in seed for g in self._generators(s, n, first=first)]
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        try:
            value = operator.index(seed)  # ints and numpy ints; not floats or strings
        except TypeError:
            value = -1
        if value < 0 or isinstance(seed, bool):
            raise ValueError(f"seed must be a non-negative integer or None, got {seed!r}")
        return sampling.image_generators(value, n, self.device, prompts, first)

    def _checked(self, req: Request, prompt: str, negative_prompt: str | None) -> tuple[str, list[str] | None]:
        """The one prompt and its negative of an editing call, and its settings, checked before any
        image is read."""
        (prompt_,) = _prompts([prompt] if isinstance(prompt, str) else prompt, single=True)
        negatives = _negatives(negative_prompt, 1)
        self._check(req)
        return prompt_, negatives

    def _use_superres(self, superres: bool | None) -> bool:
        """Whether a call runs super-res: as asked, or (None) whenever the pipeline has the stage."""
        return self.superres is not None if superres is None else superres

    def _check(self, req: Request) -> None:
        for name, value, least in ((req.steps_name, req.steps, 1), ("num_images", req.num_images, 1),
                                   ("first_image", req.first_image, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        if req.superres and (not isinstance(req.superres_steps, int) or req.superres_steps < 1):
            raise ValueError(f"superres_steps must be an integer >= 1, got {req.superres_steps!r}")
        g = req.guidance_scale
        if not isinstance(g, (int, float)) or isinstance(g, bool) or not 0 <= g < math.inf:  # NaN fails too
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {g!r}")
        sampling.check_choice_temperature(req.choice_temperature)
        k = req.superres_top_k
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
            raise ValueError(f"superres_top_k must be an integer >= 1 or None, got {k!r}")
        if k is not None and not req.superres:
            raise ValueError("superres_top_k applies to the super-res stage, which this call skips (superres=False, "
                             "or a pipeline without it): leave it None")
        if req.output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {req.output!r}")
        if req.superres and self.superres is None:
            raise ValueError("superres=True but this pipeline has no super-res stage (vqgan_hi + superres); "
                             "pass superres=False or None")


@dataclass(frozen=True)
class Request:
    """The settings every way of sampling shares, checked in one place (`MusePipeline._check`)."""

    num_images: int = 1
    steps: int = SAMPLING.steps  # base decoding steps, or mask-free edit iterations (steps_name says which)
    superres_steps: int = SAMPLING.superres_steps
    guidance_scale: float = SAMPLING.guidance_scale
    choice_temperature: float = SAMPLING.choice_temperature
    seed: int | Sequence[int] | None = None  # one per prompt: each prompt as a request of its own
    output: str = "pil"
    superres: bool = True
    callback: StageCallback | None = None
    steps_name: str = "steps"
    superres_top_k: int | None = None
    first_image: int = 0

    def __post_init__(self):
        # NumPy's numbers (np.int64(2), np.float32(3.0)) as Python's, so `_check` reads them as numbers.
        for name in ("num_images", "steps", "superres_steps", "superres_top_k", "first_image"):
            value = getattr(self, name)
            if isinstance(value, numbers.Integral) and not isinstance(value, (int, bool)):
                object.__setattr__(self, name, int(value))
        for name in ("guidance_scale", "choice_temperature"):
            value = getattr(self, name)
            if isinstance(value, numbers.Real) and not isinstance(value, (int, float, bool)):
                object.__setattr__(self, name, float(value))


def _stage(callback: StageCallback | None, stage: str) -> Callable[[int, torch.Tensor], None] | None:
    if callback is None:
        return None
    return lambda step, ids: callback(stage, step, ids)


def _prompts(prompt: str | Sequence[str], single: bool = False) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else None
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError(f"prompt must be a non-empty string or a list of them, got {prompt!r}")
    if single and len(prompts) != 1:
        raise ValueError(f"prompt must be one string here, got {len(prompts)}")
    return prompts


def _negatives(negative_prompt: str | Sequence[str] | None, n: int) -> list[str] | None:
    if negative_prompt is None:
        return None
    negatives = [negative_prompt] * n if isinstance(negative_prompt, str) else list(negative_prompt)
    if len(negatives) != n or not all(isinstance(p, str) and p.strip() for p in negatives):
        raise ValueError(f"negative_prompt must be None, a non-empty string, or {n} non-empty strings "
                         f"(one per prompt), got {negative_prompt!r}")
    return negatives


def _check_dtype(model: torch.nn.Module | None, dtype: torch.dtype | None) -> None:
    from muse.vq import VQModel

    if dtype == torch.float16 and isinstance(model, VQModel):
        raise ValueError("aMUSEd's VQ tokenizer overflows in float16: use bfloat16 or float32")


def _check_compatible(text_encoder, vqgan_lo, base, vqgan_hi, superres) -> None:
    parts = {"text_encoder": text_encoder, "vqgan_lo": vqgan_lo, "base": base, "vqgan_hi": vqgan_hi,
             "superres": superres}
    width = getattr(text_encoder, "dim", None)
    check_fit({name: m.config for name, m in parts.items() if m is not None and hasattr(m, "config")},
              width if isinstance(width, int) else None)
