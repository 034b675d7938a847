"""`muse`: one command for every stage. Each subcommand is a thin front for a module's `main(argv)`,
so `muse tokenize ...` and `python -m pipelines.tokenize ...` are the same program."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module with main(argv), one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "presets": ("muse.cli", "list every preset with its parameter count"),
    "init": ("muse.cli", "write a randomly initialised model root from a preset"),
    "import": ("muse.amused", "import pretrained weights as a model root (aMUSEd, diffusers format)"),
    "synth": ("muse.data.synthetic", "write the built-in synthetic captioned-shapes corpus"),
    "tokenize": ("pipelines.tokenize", "tokenize an image-caption corpus into Parquet token shards (Ray Data)"),
    "train": ("jobs.cli", "train a stage (vqgan, base, superres, decoder) or all of them (Ray Train)"),
    "generate": ("muse.generate_cli", "text to image, writing PNGs"),
    "inpaint": ("muse.generate_cli", "regenerate the masked part of an image"),
    "outpaint": ("muse.generate_cli", "extend an image beyond its borders"),
    "edit": ("muse.generate_cli", "mask-free editing of an image toward a new prompt"),
    "serve": ("serve.cli", "serve a model root over HTTP (Ray Serve)"),
    "eval": ("muse.evaluate", "evaluate a model root: attribute judge, PSNR, token accuracy; corpus FID, CLIP score"),
}


def presets_main(argv: list[str] | None = None) -> None:
    """Print every component preset and model preset, by family, with parameter counts (meta device)."""
    argparse.ArgumentParser(prog="muse presets", description=presets_main.__doc__).parse_args(argv)
    from muse.checkpoint import KINDS, kind_of_config, parameter_count
    from muse.config import AMUSED_MODELS, MODEL_PRESETS, PRESETS

    counts: dict[str, int | None] = {}
    w = max(len(name) for name in PRESETS)
    print(f"{'preset':<{w}} {'family':<7} {'kind':<13} {'parameters':>14}")
    for name, cfg in PRESETS.items():
        kind = kind_of_config(cfg)
        family, role = KINDS[kind].family, KINDS[kind].role
        if role == "text_encoder" and cfg.name_or_path:
            counts[name] = None  # pretrained: size comes from its files
            print(f"{name:<{w}} {family:<7} {kind:<13} {'(pretrained)':>14}")
            continue
        counts[name] = parameter_count("vqgan_lo" if role == "vqgan" else role, cfg)
        print(f"{name:<{w}} {family:<7} {kind:<13} {counts[name]:>14,}")
    print()
    for name, parts in MODEL_PRESETS.items():
        known = [counts[p] for p in parts.values() if counts[p] is not None]
        print(f"model {name:<{w - 6}} muse    {' + '.join(parts.values())}  "
              f"({sum(known):,} trainable-from-scratch parameters)")
    for name, parts in AMUSED_MODELS.items():
        known = [counts[p] for p in parts.values() if counts[p] is not None]
        print(f"model {name:<{w - 6}} amused  {' + '.join(parts.values())}  ({sum(known):,} parameters besides CLIP; "
              f"`muse import amused --source DIR --out ROOT` loads the released weights)")


def init_main(argv: list[str] | None = None) -> None:
    """Write a randomly initialised model root, to try the plumbing before anything is trained."""
    from muse.config import MODEL_PRESETS

    parser = argparse.ArgumentParser(prog="muse init", description=init_main.__doc__)
    parser.add_argument("--preset", default="tiny", choices=sorted(MODEL_PRESETS))
    parser.add_argument("--out", required=True, help="model root to write (local path or s3://)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="overwrite the components a model root at --out holds")
    parser.add_argument("--text-encoder", metavar="DIR",
                        help="a Hugging Face T5 folder (local or s3://, e.g. a copy of google/t5-v1_1-xxl) for the "
                             "root to reference instead of the preset's text encoder: nothing is copied or "
                             "loaded, and every node reads it from there (nothing is downloaded at run time)")
    parser.add_argument("--components", metavar="NAME,...",
                        help="write only these components (default: all), e.g. text_encoder to add the reference "
                             "--text-encoder names to a root that holds the others")
    args = parser.parse_args(argv)
    from muse.checkpoint import COMPONENTS, has_component, init_model_root

    chosen = tuple(n for n in args.components.split(",") if n.strip()) if args.components is not None else COMPONENTS
    if not chosen:
        parser.error("--components names no component: give NAME,... or leave it out for all of them")
    unknown = sorted(set(chosen) - set(COMPONENTS))
    if unknown:
        parser.error(f"--components: no component {', '.join(unknown)}; a root holds {', '.join(COMPONENTS)}")
    held = [name for name in chosen if has_component(args.out, name)]
    if held and not args.force:  # a trained root is hours of work: never replaced by accident
        parser.error(f"{args.out} already holds a model root ({', '.join(held)}); pass --force to overwrite it")
    try:
        init_model_root(args.preset, args.out, seed=args.seed, components=chosen, text_encoder=args.text_encoder)
    except ValueError as e:  # a bad preset, folder or width: a refusal, as argparse's are
        parser.exit(2, f"muse init: error: {e}\n")
    except OSError as e:
        parser.exit(1, f"muse init: error: {e}\n")
    referenced = args.text_encoder is not None and "text_encoder" in chosen
    built = [name for name in chosen if not (referenced and name == "text_encoder")]
    what = "model root" if set(chosen) == set(COMPONENTS) and not referenced else ", ".join(built)
    line = f"wrote a random {args.preset} {what}" if built else "wrote"
    if referenced:
        line += f"{' and' if built else ''} a text_encoder that references {args.text_encoder} (nothing copied)"
    print(f"{line} to {args.out}")


def main(argv: list[str] | None = None) -> int | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        print("usage: muse <command> [options]   (muse <command> --help for each)\n\ncommands:")
        for name, (_, text) in SUBCOMMANDS.items():
            print(f"  {name:<10} {text}")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nmuse: unknown command {argv[0]!r}", file=sys.stderr)
            raise SystemExit(2)
        return
    name, rest = argv[0], argv[1:]
    if name == "presets":
        return presets_main(rest)
    if name == "init":
        return init_main(rest)
    module = importlib.import_module(SUBCOMMANDS[name][0])
    # Modules serving several subcommands take the subcommand as their first argument.
    if SUBCOMMANDS[name][0] == "muse.generate_cli":
        return module.main([name, *rest])
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
