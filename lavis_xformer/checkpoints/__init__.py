"""Checkpoints: reading them safely, writing them atomically, finding where to resume, exporting them, and selecting
a model's trainable weights (what a checkpoint holds: frozen encoders are not saved, as in LAVIS).

One module a duty: ``files`` (reading, loading into a model, writing, trainable weights), ``resume`` (finding the
checkpoint to resume from), ``export`` (safetensors files, shareable folders and their model card, ``inspect``),
``cli`` (the command line). Every public name is re-exported here: ``from lavis_xformer.checkpoints import X``.

* Reading -- ``torch.load(weights_only=True)``: a file that carries pickled code is refused, never run. Truncated
  files and shape mismatches raise errors naming the file and the keys; a file that matches no tensor of the model
  is refused; ``check_required_keys`` refuses a file lacking tensors the caller requires (the models' strict
  ``pretrained`` / ``finetuned`` loads). Every load logs one summary line of missing and unexpected keys, grouped by
  module.
* Writing -- ``save_checkpoint_atomically``: temporary file ``NAME.tmp-HOST-PID``, fsync, ``os.replace``; a process
  killed mid-save leaves the previous file intact.
* Resuming -- ``find_resume_checkpoint``: in the run (job folder) that saved last, the furthest-progressed readable
  training checkpoint (``checkpoint_{epoch}.pth``, ``checkpoint_{epoch}_iter{k}.pth``); ``remove_interrupted_saves``
  clears the temporary files of killed saves, never those of a live writer.
* Trainable weights -- ``trainable_state_dict`` of a model, ``trainable_parameter_names`` of a model config.

This module imports nothing of the plugin's models (they import it to load their weights); a model is found by
its registered ``arch`` name.

Command line (weights for sharing, and a check of a file before trusting it)::

    lavis-xformer export IN.pth OUT.safetensors [--trainable-only]
    lavis-xformer export IN.pth OUT_FOLDER [--trainable-only] [--max-shard-size 2GB] [--push-to-hub OWNER/NAME]
    lavis-xformer inspect IN.pth

Shareable folders, as a Hugging Face model's (docs/sharing.md) -- ``save_pretrained(model, folder)`` (a model in
memory) or ``export_pretrained(checkpoint, folder)`` (the ``export`` command when OUT is not a ``.safetensors``
file) writes ``config.json`` (``arch``, ``model_type`` and every field of the model's typed config),
``model.safetensors`` (every weight, or with ``trainable_only`` the trained ones only; sharded past
``max_shard_size``, with ``model.safetensors.index.json``) and ``README.md``, a ``huggingface_hub`` model card with
licence, base models, datasets and citation, and from a checkpoint the run's stage, data, steps and metrics.
``from_pretrained(folder or owner/name)`` builds the model from ``config.json`` and loads every weight, bit for bit;
``push_to_hub(model or folder, owner/name)`` uploads one; a yaml's ``model.pretrained: FOLDER`` (or ``finetuned:``)
loads the folder's weights into the model the yaml describes.
"""

from lavis_xformer.checkpoints.export import (
    describe_checkpoint,
    export_checkpoint,
    export_pretrained,
    from_pretrained,
    push_to_hub,
    save_pretrained,
    shareable_state_dict,
)
from lavis_xformer.checkpoints.files import (
    PRETRAINED_CARD,
    PRETRAINED_CONFIG,
    PRETRAINED_INDEX,
    PRETRAINED_WEIGHTS,
    TEST_SAVE_DELAY_ENV,
    CHECKSUM_KEY,
    CheckpointError,
    check_finite_trainable,
    check_required_keys,
    export_safetensors,
    extract_state_dict,
    load_model_weights,
    load_state_dict_checked,
    load_trainable_state_dict,
    offline,
    read_checkpoint,
    read_sharded_weights,
    readable_by_all,
    save_checkpoint_atomically,
    tensor_checksums,
    trainable_parameter_names,
    trainable_state_dict,
    verify_checksums,
)
from lavis_xformer.checkpoints.resume import (
    checkpoint_progress,
    find_resume_checkpoint,
    remove_interrupted_saves,
)
from lavis_xformer.checkpoints.cli import main  # noqa: E402  (after the modules it uses)

__all__ = [
    "CHECKSUM_KEY", "CheckpointError", "PRETRAINED_CARD", "PRETRAINED_CONFIG", "PRETRAINED_INDEX", "PRETRAINED_WEIGHTS", "TEST_SAVE_DELAY_ENV",
    "check_finite_trainable", "check_required_keys", "checkpoint_progress", "describe_checkpoint", "export_checkpoint", "export_pretrained",
    "export_safetensors", "extract_state_dict", "find_resume_checkpoint", "from_pretrained", "load_model_weights",
    "load_state_dict_checked", "load_trainable_state_dict", "main", "offline", "push_to_hub", "read_checkpoint",
    "read_sharded_weights", "readable_by_all", "remove_interrupted_saves", "save_checkpoint_atomically", "save_pretrained",
    "shareable_state_dict", "tensor_checksums", "trainable_parameter_names", "trainable_state_dict",
    "verify_checksums",
]
