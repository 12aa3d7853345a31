"""``python -m lavis_xformer.checkpoints export|inspect``: the command line of the checkpoints package."""

from lavis_xformer.checkpoints.export import describe_checkpoint, export_checkpoint, export_pretrained
from lavis_xformer.checkpoints.files import CheckpointError


def main(argv=None) -> int:
    import argparse
    import json
    import sys

    parser = argparse.ArgumentParser(prog="python -m lavis_xformer.checkpoints", description="Export or inspect a checkpoint (read safely).")
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="write a checkpoint's model weights as safetensors")
    export.add_argument("src", help="a .pth checkpoint (read with weights_only=True) or .safetensors file")
    export.add_argument("dst", help="the .safetensors file to write, or a folder: the shareable format "
                                    "(config.json, model.safetensors, README.md model card)")
    export.add_argument("--trainable-only", action="store_true",
                        help="keep only trainable parameters (found from the checkpoint's model config)")
    export.add_argument("--allow-downloads", action="store_true",
                        help="fetch URLs named in the checkpoint's embedded config (off: a file's content is data)")
    inspect = commands.add_parser("inspect", help="read a checkpoint safely and summarise it")
    inspect.add_argument("src")
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            # (``python -m lavis_xformer.checkpoints`` has imported the package first, which registers its models)
            if args.dst.endswith(".safetensors"):
                summary = export_checkpoint(args.src, args.dst, trainable_only=args.trainable_only)
            elif args.trainable_only:
                parser.error("--trainable-only applies to a .safetensors file; a folder holds every weight")
            else:
                summary = export_pretrained(args.src, args.dst, allow_downloads=args.allow_downloads)
        else:
            summary = describe_checkpoint(args.src)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=1, default=str))
    return 0
