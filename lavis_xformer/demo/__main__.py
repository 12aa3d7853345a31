"""``python -m lavis_xformer.demo`` (``make demo``): set up, run both pipelines, report (see the package docstring)."""

import argparse
import sys
import time
from pathlib import Path

from lavis_xformer.demo.pipeline import (
    DEFAULT_CONFIG_DIR,
    MODELS,
    SMOKE_SEEDS,
    Console,
    DemoError,
    DemoSettings,
    prepare_data,
    run_pipelines,
)
from lavis_xformer.demo.report import parameter_counts, write_report
from lavis_xformer.demo.standins import pretrain_clip, pretrain_llm, pretrain_mae


def run_demo(settings: DemoSettings) -> dict:
    """Set up (data, stand-ins, parameter counts), run both models' pipelines, write the report."""
    settings.out_dir = Path(settings.out_dir).resolve()
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    console = Console(settings.verbose)
    start = time.time()
    console.header(
        f"X-Former vs BLIP-2 demo{' (smoke size)' if settings.smoke else ''}: configs {settings.config_dir}, "
        f"output {settings.out_dir}"
    )
    if not settings.config_dir.is_dir():
        raise DemoError(f"no demo configs in {settings.config_dir}: run from a checkout of the repository or pass "
                        "--config-dir projects/xformer/demo")

    console.header("Setup: shapes data, the frozen CLIP-ViT, MAE and OPT stand-ins, parameter counts")
    prepare_data(settings, console)
    clip_standin = pretrain_clip(settings, console) if settings.pretrain_clip else None
    mae_standin = pretrain_mae(settings, console) if settings.pretrain_mae else None
    llm_standin = pretrain_llm(settings, console) if settings.pretrain_llm else None
    counts = parameter_counts(settings)
    for model in MODELS:
        c = counts[model.key]
        console.say(f"{model.label}: stage 1 {c['params_stage1_trainable']:,} trainable / "
                    f"{c['params_stage1_total']:,} total; stage 2 {c['params_stage2_trainable']:,} trainable / "
                    f"{c['params_stage2_total']:,} total")

    parallel = "side by side" if settings.jobs >= 2 else "one after the other"
    console.header(f"Training and evaluation through LAVIS's runner: {len(settings.seeds)} seeds, the two models "
                   f"{parallel}; per-run logs in {settings.out_dir / 'logs'}")
    results = run_pipelines(settings, console)

    console.header("Report")
    standins = {"clip_standin": clip_standin, "mae_standin": mae_standin, "llm_standin": llm_standin}
    return write_report(settings, results, counts, standins, console, start)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m lavis_xformer.demo",
        description="Train and evaluate X-Former and BLIP-2 side by side on the shapes data (see module docstring).",
    )
    parser.add_argument("--out", default="output/demo", help="output folder (default: output/demo)")
    parser.add_argument("--size", choices=("demo", "small"), default="demo",
                        help="demo: the yamls as they are; small: a few images and epochs (the test suite's)")
    parser.add_argument("--smoke", action="store_true", help="same as --size small")
    parser.add_argument("--device", default=None, help="run.device for every run (default: the yamls', cpu)")
    parser.add_argument("--jobs", type=int, choices=(1, 2), default=None,
                        help="2: both models' pipelines at once (CPU default); 1: one after the other (GPU default)")
    parser.add_argument("--config-dir", default=str(DEFAULT_CONFIG_DIR), help="folder of the demo yamls")
    parser.add_argument("--data-root", default=None, help="shapes data root for every run (default: the yamls')")
    parser.add_argument("--options", nargs="+", default=[], metavar="KEY=VALUE",
                        help="LAVIS --options applied to every run, e.g. run.batch_size_train=64")
    parser.add_argument("--seeds", type=int, default=None, metavar="N",
                        help=f"seeds 0..N-1, each a full retraining of both models (default 3; --smoke: {SMOKE_SEEDS})")
    parser.add_argument("--verbose", action="store_true", help="stream every line of the runs' output")
    parser.add_argument("--random-clip", action="store_true",
                        help="give both models the tiny type's random frozen CLIP-ViT instead of pretraining one first")
    parser.add_argument("--random-mae", action="store_true",
                        help="give X-Former the tiny type's random frozen MAE instead of pretraining one first")
    parser.add_argument("--random-llm", action="store_true",
                        help="give stage 2 the tiny type's random frozen OPT instead of pretraining one first")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = args.device
    smoke = args.smoke or args.size == "small"
    num_seeds = args.seeds if args.seeds is not None else (SMOKE_SEEDS if smoke else 3)
    if num_seeds < 1:
        raise SystemExit(f"--seeds must be at least 1, got {num_seeds}")
    jobs = args.jobs or (2 if (device or "cpu") == "cpu" else 1)
    settings = DemoSettings(
        out_dir=Path(args.out), config_dir=Path(args.config_dir).resolve(), smoke=smoke, device=device, jobs=jobs,
        data_root=args.data_root, options=list(args.options), verbose=args.verbose, seeds=list(range(num_seeds)),
        pretrain_clip=not args.random_clip, pretrain_mae=not args.random_mae, pretrain_llm=not args.random_llm,
    )
    import lavis_xformer  # noqa: F401  (registers the plugin: models for the parameter counts, processors, builders)

    try:
        return run_demo(settings)
    except DemoError as error:
        print(f"\ndemo failed: {error}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
