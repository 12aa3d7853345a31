"""No network from a file's content: a URL in a checkpoint's embedded config is data (``export`` refuses it unless
``--allow-downloads``), a URL checkpoint is refused in offline mode, and ``export``'s smaller traps name themselves."""

import json
import socket

import pytest
import torch

from lavis_xformer.checkpoints import CheckpointError, from_pretrained, read_checkpoint
from lavis_xformer.checkpoints import main as checkpoints_main


@pytest.fixture
def no_connections(monkeypatch):
    """Any attempt to open a connection fails the test."""
    attempts = []

    def connect(self, address):
        attempts.append(address)
        raise AssertionError(f"a connection to {address} was attempted")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "create_connection", lambda address, *a, **k: connect(None, address))
    return attempts


def test_export_does_not_fetch_a_url_named_in_the_files_config(tmp_path, capsys, no_connections, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # even online, a file's content opens no connection
    path = tmp_path / "untrusted.pth"
    config = {"model": {"arch": "xformer", "model_type": "tiny", "pretrained": "http://198.51.100.7/x.pth"}}
    torch.save({"model": {"query_tokens": torch.zeros(1)}, "optimizer": {}, "config": config, "epoch": 0}, path)
    assert checkpoints_main(["export", str(path), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "config.model.pretrained='http://198.51.100.7/x.pth'" in err and "--allow-downloads" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert no_connections == [] and not (tmp_path / "out").exists()


def test_a_url_checkpoint_is_refused_in_offline_mode(monkeypatch, no_connections):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match=r"offline mode"):
        read_checkpoint("https://198.51.100.7/weights.pth")
    assert no_connections == []


def test_export_to_a_pth_name_is_refused_instead_of_making_a_folder(tmp_path, capsys):
    path = tmp_path / "in.pth"
    torch.save({"model": {"w": torch.zeros(1)}}, path)
    assert checkpoints_main(["export", str(path), str(tmp_path / "OUT.pth")]) == 1
    assert "looks like a file" in capsys.readouterr().err and not (tmp_path / "OUT.pth").exists()


def test_a_malformed_config_json_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text('{"arch": "xformer",')
    with pytest.raises(CheckpointError, match=r"config.json is not valid JSON"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(["xformer"]))
    with pytest.raises(CheckpointError, match=r"not a JSON object"):
        from_pretrained(tmp_path)


class _Typed(torch.nn.Module):
    """A model with a typed config (what ``check_model_config`` compares a folder's config.json with)."""

    class config:
        @staticmethod
        def to_dict():
            return {"num_query_token": 4}

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2))


@pytest.mark.parametrize("content", ['{"arch": "xformer",', "\xff\xfe not text", '["xformer"]'])
def test_a_malformed_config_json_is_named_when_a_yaml_loads_the_folder(tmp_path, content):
    """``model.pretrained: FOLDER`` (``load_model_weights``) reads the folder's config.json too: it was a bare
    JSONDecodeError naming no file."""
    from safetensors.torch import save_file

    from lavis_xformer.checkpoints import load_model_weights

    save_file({"w": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_bytes(content.encode("latin-1"))
    with pytest.raises(CheckpointError, match=r"config.json (is not valid JSON|holds a list)") as err:
        load_model_weights(_Typed(), str(tmp_path))
    assert str(tmp_path / "config.json") in str(err.value) and "\n" not in str(err.value)
