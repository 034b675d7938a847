"""`muse generate | inpaint | outpaint | edit`: sample from a model root and write PNGs.

    muse generate --prompt "a red circle" --preset tiny --seed 0 --out out/
    muse inpaint  --image in.png --mask mask.png --prompt "a blue square" --checkpoint ROOT --out out/
    muse outpaint --image in.png --direction left --scale 0.75 --prompt "..." --checkpoint ROOT --out out/
    muse edit     --image in.png --prompt "a green circle" --checkpoint s3://bucket/model --out out/

Each writes <name>_<i>.png per image (prompt-major), numbered on from what the folder holds (an
earlier run's images are never overwritten), and for several images their grid, <name>_<first>-<last>.png
(of the first 64). `--n` images are decoded and written `--batch-size` at a time, so memory holds one
batch (and the grid's images) however many are asked for. The inputs are checked before the model loads.
`main(argv)` takes the subcommand first: `python -m muse.generate_cli generate --help`.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import re
import sys
from typing import Any, Callable

from PIL import Image

from muse.config import SAMPLING

COMMANDS = ("generate", "inpaint", "outpaint", "edit")


def _common(parser: argparse.ArgumentParser, steps: bool = True) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="ROOT",
                     help="model root to load (local path or s3://) holding text_encoder/, vqgan_lo/, base/ "
                          "and optionally vqgan_hi/ + superres/")
    src.add_argument("--preset", choices=["tiny"], help="random weights of a preset instead, the same as `muse init --preset tiny` writes "
                          "(tries the plumbing)")
    parser.add_argument("--prompt", required=True, help="what the image should show")
    parser.add_argument("--negative-prompt", default=None,
                        help="what to steer away from (replaces the unconditional branch of guidance)")
    parser.add_argument("--n", type=int, default=1, help="images to write (default 1)")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="images decoded at once (default 8): memory holds one batch, and --n images come "
                             "in batches with the same tokens as in one (a pixel may differ by 1/255: the "
                             "decoder's float arithmetic depends on the batch size)")
    if steps:
        parser.add_argument("--steps", type=int, default=None,
                            help=f"base decoding steps (default: the root's sampling.json, else {SAMPLING.steps})")
    parser.add_argument("--superres-steps", type=int, default=None,
                        help=f"super-res decoding steps (default: the root's sampling.json, else "
                             f"{SAMPLING.superres_steps})")
    parser.add_argument("--superres-top-k", type=int, default=None,
                        help="super-res draws each code among its k likeliest (1: the likeliest; default: the "
                             "root's sampling.json, else the whole codebook)")
    parser.add_argument("--guidance", type=float, default=None,
                        help=f"classifier-free guidance scale (default: the root's sampling.json, else "
                             f"{SAMPLING.guidance_scale:g}); the root records what its recipe measured to draw well")
    parser.add_argument("--seed", type=int, default=0, help="seed of the request: image i draws from a generator seeded from (seed, i), so no two seeds share "
                        "an image and the same seed and settings give the same images (default 0)")
    parser.add_argument("--no-superres", action="store_true",
                        help="stop at the base resolution (a root without a super-res stage always does)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--out", required=True, help="directory to write PNGs into (created if missing)")


def _keep_pixels_arg(parser: argparse.ArgumentParser, where: str) -> None:
    parser.add_argument("--keep-pixels", action="store_true",
                        help=f"put the input's own pixels back {where}, blended over a thin band at the edge "
                             "(default: the tokenizer's decoding of its kept tokens, as close to the input as "
                             "a round trip through the tokenizer)")


def build_parser(command: str) -> argparse.ArgumentParser:
    if command == "generate":
        p = argparse.ArgumentParser(prog="muse generate", description="Text to image: write PNGs for a prompt.")
        _common(p)
    elif command == "inpaint":
        p = argparse.ArgumentParser(
            prog="muse inpaint",
            description="Regenerate the masked part of an image under a prompt. Outside the mask the image's "
                        "tokens are kept, not its pixels: the output there is the tokenizer's decoding of "
                        "those tokens (beside the new ones), unless --keep-pixels puts the input's own pixels back.")
        p.add_argument("--image", required=True, help="input image file (local path or s3://)")
        p.add_argument("--mask", required=True,
                       help="mask image of the same size: white = regenerate, black = keep its tokens (the "
                            "output there is their decoding, or with --keep-pixels the input's pixels); in a mask "
                            "with transparency, the transparent pixels are regenerated (as the HTTP API reads one)")
        _keep_pixels_arg(p, "outside the mask")
        _common(p)
    elif command == "outpaint":
        p = argparse.ArgumentParser(prog="muse outpaint", description="Extend an image beyond its borders.")
        p.add_argument("--image", required=True, help="input image file (local path or s3://)")
        p.add_argument("--direction", default="all", choices=["all", "left", "right", "up", "down"],
                       help="where new content goes: 'all' shrinks the image into the centre; a side shifts "
                            "the image away from it (default all)")
        p.add_argument("--scale", type=float, default=0.5,
                       help="share of the output side the original image still covers, in (0, 1) (default 0.5)")
        _keep_pixels_arg(p, "where the canvas holds the image")
        _common(p)
    elif command == "edit":
        p = argparse.ArgumentParser(
            prog="muse edit",
            description="Mask-free editing: repeatedly resample a random share of the image's tokens under "
                        "the new prompt, keeping its layout.")
        p.add_argument("--image", required=True, help="input image file (local path or s3://)")
        p.add_argument("--iterations", type=int, default=SAMPLING.edit_iterations,
                       help=f"resampling iterations (default {SAMPLING.edit_iterations})")
        p.add_argument("--fraction", type=float, default=SAMPLING.edit_fraction,
                       help=f"share of tokens resampled per iteration (default {SAMPLING.edit_fraction:g})")
        p.add_argument("--top-k", type=int, default=3,
                       help="sample among the k likeliest tokens (default 3; 0: the whole codebook)")
        _common(p, steps=False)
    else:
        raise ValueError(f"unknown command {command!r}; commands are {COMMANDS}")
    return p


def run(command: str, args: argparse.Namespace) -> list[str]:
    """Run a parsed command; returns the paths written."""
    from muse.devices import checked_device
    from muse.pipeline import MusePipeline

    _check_out(args.out)  # before minutes of sampling, not after
    inputs = _checked_inputs(command, args)  # and before a model root that may take minutes to load
    checked_device(args.device)
    if args.checkpoint:
        pipe = MusePipeline.from_pretrained(args.checkpoint, device=args.device)
    else:
        # Weights seeded 0, as `muse init --preset tiny` writes them; --seed is for sampling.
        pipe = MusePipeline.from_preset(args.preset, seed=0, device=args.device)
    # Through super-res when the root has it (an imported aMUSEd root stops at the base resolution).
    superres = pipe.superres is not None and not args.no_superres
    recorded = pipe.root_sampling.recorded()

    def setting(flag: str | None, name: str) -> Any:
        """The flag's value, else the root's recorded setting, else the built-in default."""
        given = getattr(args, flag, None) if flag else None
        return given if given is not None else recorded.get(name, getattr(SAMPLING, name, None))

    if not superres and (args.superres_steps is not None or args.superres_top_k is not None):
        skipped = "--no-superres skips it" if args.no_superres else f"{args.checkpoint or args.preset} has none"
        raise ValueError(f"--superres-steps and --superres-top-k set the super-res stage, and {skipped}: drop them")
    negative = args.negative_prompt if args.negative_prompt and args.negative_prompt.strip() else None  # "": none
    guidance = setting("guidance", "guidance_scale")
    if negative is not None and guidance == 0:
        print(f"muse {command}: warning: --negative-prompt has no effect with --guidance 0 (only guidance reads it)",
              file=sys.stderr)
        negative = None
    common = dict(negative_prompt=negative, guidance_scale=guidance, seed=args.seed, superres=superres,
                  choice_temperature=setting(None, "choice_temperature"))
    if superres:  # (the super-res settings of a root drawn at the base resolution are left out)
        common |= dict(superres_steps=setting("superres_steps", "superres_steps"),
                       superres_top_k=setting("superres_top_k", "superres_top_k"))
    steps = setting("steps", "steps")
    if command == "generate":
        draw = functools.partial(pipe, args.prompt, steps=steps, **common)
    elif command == "inpaint":
        draw = functools.partial(pipe.inpaint, *inputs, args.prompt, steps=steps, keep_pixels=args.keep_pixels,
                                 **common)
    elif command == "outpaint":
        draw = functools.partial(pipe.outpaint, *inputs, args.prompt, direction=args.direction, scale=args.scale,
                                 steps=steps, keep_pixels=args.keep_pixels, **common)
    else:
        draw = functools.partial(pipe.edit, *inputs, args.prompt, iterations=args.iterations,
                                 fraction=args.fraction, top_k=args.top_k or None, **common)
    writer = ImageWriter(args.out, command)
    writer.add(draw(num_images=min(args.n, args.batch_size)))  # the first batch checks every argument
    for first in range(args.batch_size, args.n, args.batch_size):
        writer.add(draw(num_images=min(args.batch_size, args.n - first), first_image=first))
    return writer.finish()


def _checked_inputs(command: str, args: argparse.Namespace) -> tuple:
    """What can be checked without the model, read once: the flags, and the image (and mask) files,
    handed on to the pipeline decoded."""
    from muse.image_inputs import load_image, load_mask

    if not args.prompt.strip():
        raise ValueError("--prompt is empty: say what the image should show")
    for flag, value, least in (("--n", args.n, 1), ("--batch-size", args.batch_size, 1), ("--seed", args.seed, 0),
                               ("--top-k", getattr(args, "top_k", 0), 0)):
        if value < least:
            raise ValueError(f"{flag} must be >= {least}, got {value}")
    if command == "outpaint" and not 0 < args.scale < 1:
        raise ValueError(f"--scale must be in (0, 1), got {args.scale}")
    if command == "generate":
        return ()
    image = load_image(args.image, "--image")
    if command != "inpaint":
        return (image,)
    mask = load_image(args.mask, "--mask", keep_mode=True)
    load_mask(mask, image.size)  # its size and that it marks something
    return image, mask


def _check_out(out: str) -> None:
    """--out is a directory this process can write into (made if missing)."""
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot make the directory ({e.strerror or e})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: the directory is not writable")


GRID_MAX = 64  # images in a run's grid: the first ones; past that a grid is too large to look at


class ImageWriter:
    """<out>/<name>_<i>.png for each image as it comes, i counting on from the highest already in
    `out`, and at `finish` the grid of the first GRID_MAX, <out>/<name>_<first>-<last>.png, when there
    are several. Holds no image but the grid's."""

    def __init__(self, out: str, name: str):
        os.makedirs(out, exist_ok=True)
        taken = [int(m.group(1)) for f in os.listdir(out) if (m := re.fullmatch(rf"{re.escape(name)}_(\d+)\.png", f))]
        self.out, self.name, self.first = out, name, max(taken, default=-1) + 1
        self.paths: list[str] = []
        self.shown: list[Image.Image] = []

    def add(self, images: list[Image.Image]) -> None:
        for img in images:
            self.paths.append(os.path.join(self.out, f"{self.name}_{self.first + len(self.paths):02d}.png"))
            _save(img, self.paths[-1])
            if len(self.shown) < GRID_MAX:
                self.shown.append(img)

    def finish(self) -> list[str]:
        """The paths written, the grid's last."""
        if len(self.shown) > 1:
            last = self.first + len(self.shown) - 1
            self.paths.append(os.path.join(self.out, f"{self.name}_{self.first:02d}-{last:02d}.png"))
            _save(grid(self.shown), self.paths[-1])
        return self.paths


def _save(img: Image.Image, path: str) -> None:
    """Save a PNG; a failed write (a full disk) names the file, which PIL's error does not."""
    try:
        img.save(path)
    except OSError as e:
        raise OSError(e.errno, f"{e.strerror or e} writing {path}") from None


def grid(images: list[Image.Image]) -> Image.Image:
    """Images of one size tiled row-major in a near-square grid."""
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    out = Image.new("RGB", (cols * w, rows * h), (255, 255, 255))
    for i, img in enumerate(images):
        out.paste(img, ((i % cols) * w, (i // cols) * h))
    return out


# The library's argument names, as these commands' flags call them.
FLAGS = {"num_images": "--n", "top_k": "--top-k", "superres_top_k": "--superres-top-k", "guidance_scale": "--guidance",
         "steps": "--steps", "superres_steps": "--superres-steps", "iterations": "--iterations",
         "fraction": "--fraction", "negative_prompt": "--negative-prompt", "prompt": "--prompt", "scale": "--scale",
         "seed": "--seed"}


def as_flags(message: str) -> str:
    """A library error that starts with an argument's name, starting with its flag instead."""
    name, sep, rest = message.partition(" ")
    return f"{FLAGS[name]}{sep}{rest.replace(' or None', ' (or left out)')}" if name in FLAGS else message


def _command_main(command: str) -> Callable[[list[str] | None], int]:
    def main_(argv: list[str] | None = None) -> int:
        args = build_parser(command).parse_args(argv)
        try:
            paths = run(command, args)
        except ValueError as e:  # bad input: one clear line, not a traceback
            print(f"muse {command}: error: {as_flags(str(e))}", file=sys.stderr)
            return 2
        except OSError as e:  # e.g. the disk filled up while writing
            print(f"muse {command}: error: {e}", file=sys.stderr)
            return 1
        for path in paths:
            print(path)
        return 0

    main_.__name__ = f"{command}_main"
    main_.__doc__ = f"`muse {command}` with its arguments (no subcommand)."
    return main_


generate_main = _command_main("generate")
inpaint_main = _command_main("inpaint")
outpaint_main = _command_main("outpaint")
edit_main = _command_main("edit")
MAINS = {"generate": generate_main, "inpaint": inpaint_main, "outpaint": outpaint_main, "edit": edit_main}


def main(argv: list[str] | None = None) -> int:
    """argv = [command, *options], command one of generate / inpaint / outpaint / edit."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: muse {{{','.join(COMMANDS)}}} [options]   (--help after a command for its options)",
              file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    return MAINS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
