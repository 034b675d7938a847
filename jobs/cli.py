"""`muse train <stage>`: argv[0] names a stage of the registry (`jobs.stages`) or `all`; the rest goes
to that stage's command line, the same one `python -m jobs.<stage>` runs."""

from __future__ import annotations

import sys

from jobs import stages

ALL = "vqgan -> tokenize -> base + superres -> decoder, skipping finished stages"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    known = stages.names()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in known + ("all",):
        print("usage: muse train <stage> [options]   (muse train <stage> --help for each)\n\nstages:")
        for name in known:
            print(f"  {name:<9} {stages.get(name).summary}")
        print(f"  {'all':<9} {ALL}")
        print("\nRay: set RAY_ADDRESS to use a running cluster (Ray 2.60 token auth: RAY_AUTH_MODE=token for "
              "`ray job submit`); otherwise a local Ray is started.")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nmuse train: unknown stage {argv[0]!r}", file=sys.stderr)
            raise SystemExit(2)
        return
    if argv[0] == "all":
        from jobs import all as train_all

        train_all.main(argv[1:])
    else:
        stages.get(argv[0]).main(argv[1:])


if __name__ == "__main__":
    main()
