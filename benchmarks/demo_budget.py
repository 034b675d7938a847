"""Judge accuracy against training budget for the demo's recipe (configs/demo.yaml): the tokenizer
ceiling, the base stage alone and the full chain, at several budgets, so the choice is visible.

    python benchmarks/demo_budget.py --out bench_budget                 # budgets 0.25, 0.5, 1.0
    python benchmarks/demo_budget.py --out bench_budget --budgets 0.5,1

A budget b scales every stage's steps of configs/demo.yaml (both tokenizers, their autoencoder
warm-up, base, super-res) by b; everything else is the demo as `make demo` runs it: Ray Train stages,
Ray Data tokenization, Ray Serve, HTTP requests, the attribute judge. Each budget writes a whole demo output
under OUT/budget_<b>/, and a budget whose output exists is only served and judged again, so an
interrupted run resumes. The table reports each stage's training seconds as measured in that run.
"""

from __future__ import annotations

import argparse
import json
import os

import yaml

from jobs.demo import DEFAULT_CONFIG, run_demo
from machine import describe  # benchmarks/machine.py

# The tokenizers' autoencoder warm-up scales with their steps: unscaled, a quarter budget's 250 low-res
# steps would end inside the 400-step warm-up, before the codebook is seeded.
STEP_KEYS = ("vqgan.run.max_steps", "vqgan.hi_max_steps", "vqgan.quantizer_warmup_steps", "base.run.max_steps",
             "superres.run.max_steps")


def scaled_overrides(config: str, budget: float) -> list[str]:
    """`--set` overrides that scale the recipe's steps (and its checkpoint/sample periods) by `budget`."""
    with open(config) as f:
        cfg = yaml.safe_load(f)
    out = []
    for key in STEP_KEYS:
        section, *path = key.split(".")
        node = cfg[section]
        for part in path[:-1]:
            node = node[part]
        steps = max(10, round(node[path[-1]] * budget))
        out.append(f"{key}={steps}")
        if key.endswith("run.max_steps"):
            out += [f"{section}.run.checkpoint_every={steps}", f"{section}.run.sample_every={steps}"]
    return out


def row(budget: float, report: dict) -> dict:
    stages = dict(report.get("stages", {}))  # stage -> "trained in Ns" or "skipped (...)"
    ceiling = report.get("tokenizer_ceiling", {})

    def judged(key: str, subset: str, attr: str) -> float:
        return report.get(key, {}).get(subset, {}).get(attr, float("nan"))

    return {
        "budget": budget,
        "stages": stages,
        "ceiling_lo": ceiling.get("vqgan_lo", {}).get("reconstructions", {}).get("correct", float("nan")),
        "ceiling_hi": ceiling.get("vqgan_hi", {}).get("reconstructions", {}).get("correct", float("nan")),
        "base_seen": judged("judge_base", "seen", "correct"),
        "base_seen_color": judged("judge_base", "seen", "color"),
        "base_held": judged("judge_base", "held_out", "correct"),
        "full_seen": judged("judge", "seen", "correct"),
        "full_seen_color": judged("judge", "seen", "color"),
        "full_held": judged("judge", "held_out", "correct"),
        "chance_full_seen": report.get("judge", {}).get("chance", {}).get("seen", {}).get("correct", float("nan")),
        # A budget whose stages were all finished before is only served and judged: no training time.
        "training_s": (float("nan") if all(str(v).startswith("skipped") for v in stages.values())
                       else report.get("timings_s", {}).get("training_s", float("nan"))),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for one demo output per budget")
    parser.add_argument("--budgets", default="0.25,0.5,1", help="comma-separated step multipliers (default 0.25,0.5,1)")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="the recipe (default configs/demo.yaml)")
    args = parser.parse_args(argv)
    print(f"machine: {describe()}", flush=True)
    rows = []
    for budget in (float(b) for b in args.budgets.split(",")):
        out = os.path.join(args.out, f"budget_{budget:g}")
        report = run_demo(out, config=args.config, overrides=tuple(scaled_overrides(args.config, budget)))
        rows.append(row(budget, report))
        with open(os.path.join(args.out, "budget.json"), "w") as f:
            json.dump(rows, f, indent=1)
    print("\nwhole-scene accuracy of the attribute judge (seen prompts unless held-out; chance for the full chain)")
    print(f"{'budget':>6} {'train s':>8} {'ceiling lo':>10} {'ceiling hi':>10} {'base':>6} {'base col':>8} "
          f"{'base held':>9} {'full':>6} {'full col':>8} {'full held':>9} {'chance':>6}")
    for r in rows:
        print(f"{r['budget']:>6g} {r['training_s']:>8.0f} {r['ceiling_lo']:>10.2f} {r['ceiling_hi']:>10.2f} "
              f"{r['base_seen']:>6.2f} {r['base_seen_color']:>8.2f} {r['base_held']:>9.2f} {r['full_seen']:>6.2f} "
              f"{r['full_seen_color']:>8.2f} {r['full_held']:>9.2f} {r['chance_full_seen']:>6.2f}")
        print(f"{'':>6} stages: {json.dumps(r['stages'])}")


if __name__ == "__main__":
    main()
