"""`muse train <stage>`: argv[0] names the stage (vqgan, base, superres, decoder, all); the rest goes
to that stage's own `main`, the same one `python -m jobs.<stage>` runs."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "vqgan": "train the low-res and high-res VQGAN tokenizers on raw images",
    "base": "train the base transformer on token shards",
    "superres": "train the super-res transformer on token shards with tokens_hi",
    "decoder": "fine-tune a wider/deeper VQGAN decoder (encoder, codebook, transformers frozen)",
    "all": "vqgan -> tokenize -> base + superres -> decoder, skipping finished stages",
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: muse train <stage> [options]   (muse train <stage> --help for each)\n\nstages:")
        for name, text in COMMANDS.items():
            print(f"  {name:<9} {text}")
        print("\nRay: set RAY_ADDRESS to use a running cluster (Ray 2.60 token auth: RAY_AUTH_MODE=token for "
              "`ray job submit`); otherwise a local Ray is started.")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nmuse train: unknown stage {argv[0]!r}", file=sys.stderr)
            raise SystemExit(2)
        return
    importlib.import_module(f"jobs.{argv[0]}").main(argv[1:])


if __name__ == "__main__":
    main()
