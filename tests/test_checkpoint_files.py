"""Reading checkpoint files safely: pickled code refused, torn files and shape mismatches named, safetensors round trip."""

import pickle

import pytest
import torch
from lavis.models import load_model

from lavis_xformer.checkpoints import CheckpointError, export_safetensors, load_model_weights, read_checkpoint


# ------------------------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------------------------
class _Payload:
    """Unpickling this would call os.system: a stand-in for a malicious checkpoint."""

    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /dev/null",))


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as handle:
        torch.save({"model": {}, "extra": _Payload()}, handle)
    with pytest.raises(CheckpointError, match="refused: it holds objects other than tensors"):
        read_checkpoint(str(path))
    plain = tmp_path / "evil.pkl"
    plain.write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(CheckpointError, match=str(plain)):
        read_checkpoint(str(plain))


def test_truncated_checkpoint_and_shape_mismatch_name_file_and_keys(tmp_path):
    model = load_model("xformer", "tiny")
    path = tmp_path / "ckpt.pth"
    torch.save({"model": model.state_dict()}, path)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.pth.*truncated or corrupt"):
        load_model_weights(model, str(truncated))

    bad = dict(model.state_dict())
    bad["query_tokens"] = torch.zeros(1, 3, 32)
    torch.save({"model": bad}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"bad.pth.*shape mismatch in query_tokens: checkpoint \(1, 3, 32\)"):
        load_model_weights(model, str(tmp_path / "bad.pth"))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model_weights(model, str(tmp_path / "missing.pth"))


def test_safetensors_export_round_trips(tmp_path):
    source = load_model("xformer", "tiny")
    target = load_model("xformer", "tiny")
    path = export_safetensors(source, str(tmp_path / "xformer.safetensors"))
    result = load_model_weights(target, path, strict_unexpected=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
