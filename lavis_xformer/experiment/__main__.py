"""``python -m lavis_xformer.experiment`` (``make demo``): the controlled probe experiment (see the package docstring)."""

import argparse
from pathlib import Path

from lavis_xformer.experiment.design import DEFAULT_SEEDS, SIZES


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m lavis_xformer.experiment",
        description="How much of a planted visual fact each arm's frozen queries carry (docs/experiment.md).")
    parser.add_argument("--seeds", type=int, default=DEFAULT_SEEDS, metavar="N", help="seeds 0..N-1 (default 6)")
    parser.add_argument("--first-seed", type=int, default=0, help="start the seeds here (the verdict must hold "
                        "when the seeds change: --first-seed 100)")
    parser.add_argument("--size", choices=tuple(SIZES), default="full",
                        help="full: the design's sizes; reduced: every stage at a tenth of the work; smoke: a few "
                             "images and steps (the tests')")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes, one thread each (default 2)")
    parser.add_argument("--out", default="output/experiment", help="output folder (default output/experiment)")
    parser.add_argument("--standins", default="~/.cache/lavis_xformer/experiment_standins",
                        help="where the frozen stand-ins are trained once and reused by later runs of the same size "
                             "(the hub weights' place; default ~/.cache/lavis_xformer/experiment_standins)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.seeds < 2:
        raise SystemExit(f"--seeds must be at least 2 (paired t intervals over seeds), got {args.seeds}")
    import lavis_xformer  # noqa: F401  (registers the plugin's models and processors)
    from lavis_xformer.experiment.run import run_experiment

    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    return run_experiment(seeds, SIZES[args.size], Path(args.out), jobs=args.jobs, standin_dir=Path(args.standins))


if __name__ == "__main__":
    main()
