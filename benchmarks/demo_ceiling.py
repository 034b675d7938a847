"""The ceiling a model root's tokenizers put on what its transformers can draw: the attribute judge
(`muse.judge`) on each tokenizer's reconstructions (encode, then decode), next to the same images
resized to that tokenizer's resolution without it.

    python benchmarks/demo_ceiling.py --checkpoint demo_output/checkpoint
    python benchmarks/demo_ceiling.py --checkpoint ROOT --n 400

No transformer trained on a tokenizer's ids can beat its reconstructions, so this is the first
number to look at before tuning anything downstream (`make demo` reports it too, as
report.json "tokenizer_ceiling"). Images are fresh synthetic scenes (all pairings, a seed no corpus
uses), rendered at 128 px like the demo's corpus.
"""

from __future__ import annotations

import argparse
import time

import torch

from muse import checkpoint
from muse.evaluate import heldout_images, read_holdout, tokenizer_ceiling, training_pairs
from machine import describe  # benchmarks/machine.py

ATTRS = ("color", "shape", "count", "placement", "correct")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="model root with vqgan_lo/ (and vqgan_hi/)")
    parser.add_argument("--n", type=int, default=200, help="images to judge (default 200)")
    parser.add_argument("--size", type=int, default=128, help="render size of the scenes (default 128, as the demo)")
    parser.add_argument("--seed", type=int, default=55)
    parser.add_argument("--corpus", help="judge only scenes of the pairings this corpus trains on (its holdout.json); "
                                         "default: every pairing")
    parser.add_argument("--grid", type=int, default=8,
                        help="scene layout: shapes on a GRID x GRID lattice as in the demo's corpus (default 8), "
                             "0 placed freely")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    print(f"machine: {describe()}")
    pairs = training_pairs(read_holdout(args.corpus)) if args.corpus else None
    samples = heldout_images(args.n, args.size, seed=args.seed, grid=args.grid, pairs=pairs)
    print(f"{'':<34}" + "".join(f"{a:>11}" for a in ATTRS))
    for name in ("vqgan_lo", "vqgan_hi"):
        if not checkpoint.has_component(args.checkpoint, name):
            continue
        vq = checkpoint.load_component(checkpoint.component_uri(args.checkpoint, name), expect_kind="vqgan").eval()
        start = time.time()
        result = tokenizer_ceiling(vq, samples)
        side = vq.config.tokens_per_side
        for label, key in (("originals", "originals"), ("reconstructions", "reconstructions")):
            row = result[key]
            title = f"{name} {vq.config.resolution}px ({side}x{side}) {label}"
            print(f"{title:<34}" + "".join(f"{row[a]:>11.2f}" for a in ATTRS))
        print(f"  ({args.n} images in {time.time() - start:.1f}s)")


if __name__ == "__main__":
    main()
