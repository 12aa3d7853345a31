"""``python -m lavis_xformer.models.llm_builders`` regenerates the tiny tokenizer files without touching the installed
package: into ``--out-dir``, by default the user's cache folder (it rewrote ``lavis_xformer/assets`` in place, and
ignored ``--help``). The files it writes are the shipped ones, byte for byte."""

import pytest

from lavis_xformer.models import llm_builders
from lavis_xformer.models.builders import ASSETS_DIR

FILES = ("tiny_opt-vocab.json", "tiny_opt-merges.txt", "tiny_t5-tokenizer.json")


def test_help_writes_nothing(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(SystemExit) as exit_:
        llm_builders.main(["--help"])
    assert exit_.value.code == 0 and "--out-dir" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_default_writes_to_the_user_cache_not_the_package(monkeypatch, tmp_path):
    package_assets = tmp_path / "package_assets"  # stands in for lavis_xformer/assets
    package_assets.mkdir()
    monkeypatch.setattr(llm_builders, "ASSETS_DIR", package_assets)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert llm_builders.main([]) == 0
    assert list(package_assets.iterdir()) == []
    written = tmp_path / "cache" / "lavis_xformer" / "tiny_tokenizers"
    for name in FILES:
        assert (written / name).read_bytes() == (ASSETS_DIR / name).read_bytes(), name


def test_out_dir_is_honoured(tmp_path):
    assert llm_builders.main(["--out-dir", str(tmp_path / "tok")]) == 0
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == sorted(FILES)
