"""``lavis-xformer export|inspect`` (``python -m lavis_xformer.checkpoints``): the command line of the checkpoints
package."""

from lavis_xformer.checkpoints.export import describe_checkpoint, export_checkpoint, export_pretrained, push_to_hub
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
                                    "(config.json, model.safetensors or shards, README.md model card)")
    weights = export.add_mutually_exclusive_group()
    weights.add_argument("--trainable-only", action="store_true",
                         help="keep only the trainable weights: the frozen ViT, MAE and LLM load from their own "
                              "sources (the default with --push-to-hub)")
    weights.add_argument("--all-weights", action="store_true",
                         help="keep every weight, frozen ones included (the default of a folder: self-contained)")
    export.add_argument("--max-shard-size", default=None, metavar="SIZE",
                        help="a folder's weights in safetensors shards of at most SIZE (e.g. 2GB, 500MB), with "
                             "model.safetensors.index.json, as transformers writes them")
    export.add_argument("--push-to-hub", default=None, metavar="OWNER/NAME",
                        help="upload the folder to this Hugging Face hub repository (created if absent; needs a "
                             "token: huggingface-cli login)")
    export.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    export.add_argument("--allow-downloads", action="store_true",
                        help="fetch URLs named in the checkpoint's embedded config (off: a file's content is data)")
    inspect = commands.add_parser("inspect", help="read a checkpoint safely and summarise it")
    inspect.add_argument("src")
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            # (``python -m lavis_xformer.checkpoints`` has imported the package first, which registers its models)
            if args.dst.endswith(".safetensors"):
                if args.max_shard_size or args.push_to_hub:
                    parser.error("--max-shard-size and --push-to-hub apply to a folder, not a .safetensors file")
                summary = export_checkpoint(args.src, args.dst, trainable_only=args.trainable_only)
            else:
                trainable_only = args.trainable_only or (bool(args.push_to_hub) and not args.all_weights)
                summary = export_pretrained(args.src, args.dst, allow_downloads=args.allow_downloads,
                                            trainable_only=trainable_only,
                                            max_shard_size=int(args.max_shard_size)
                                            if str(args.max_shard_size).isdigit() else args.max_shard_size)
                if args.push_to_hub:
                    commit = push_to_hub(args.dst, args.push_to_hub, private=args.private or None)
                    summary["pushed"] = getattr(commit, "commit_url", None) or str(commit)
        else:
            summary = describe_checkpoint(args.src)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=1, default=str))
    return 0
