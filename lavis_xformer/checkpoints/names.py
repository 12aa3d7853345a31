"""What every checkpoint module names: the files of an exported folder and the one error type."""

PRETRAINED_CONFIG, PRETRAINED_WEIGHTS, PRETRAINED_CARD = "config.json", "model.safetensors", "README.md"
PRETRAINED_INDEX = "model.safetensors.index.json"  # a sharded folder: weight name -> shard file (as transformers)


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used: unsafe, corrupt, or not matching the model."""
