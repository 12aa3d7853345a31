"""A benchmark whose data is not where LAVIS's dataset config points is refused before anything is built, with one
error naming the missing files and how to fix it (VQA, captioning and retrieval alike)."""

import pytest
from lavis.common.registry import registry

import lavis_xformer  # noqa: F401  (registers the plugin's builders)
from lavis_xformer.analysis.vqa_benchmarks import BENCHMARKS, dataset_config, require_inputs


@pytest.mark.parametrize("name", ["vqav2", "coco_caption", "coco_retrieval"])
def test_missing_data_is_one_error_naming_the_files_and_the_fix(name, tmp_path, monkeypatch):
    monkeypatch.setitem(registry.mapping["paths"], "cache_root", str(tmp_path))
    benchmark = BENCHMARKS[name]
    with pytest.raises(FileNotFoundError) as raised:
        require_inputs(benchmark, dataset_config(benchmark))
    message = str(raised.value)
    assert message.startswith(f"{name}: not found: {tmp_path}")
    assert f"--options {name}.<config key>=<path>" in message
