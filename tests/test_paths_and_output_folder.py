"""Image paths stay inside the dataset root and name regular files; the output folder and the values that failed
inside torch/numpy are checked before anything is built; 16/32-bit images keep their brightness."""

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
from lavis.datasets.datasets.caption_datasets import CaptionDataset
from PIL import Image

import lavis_xformer  # noqa: F401  (applies compat)
from lavis_xformer import processors
from lavis_xformer.common import jobs
from lavis_xformer.compat import AnnotationFileError
from lavis_xformer.datasets.robust import RobustDataset
from lavis_xformer.processors import to_rgb
from lavis_xformer.run_config import max_workers, run_value_problems


def _annotations(root, *names):
    path = root / "ann.json"
    path.write_text(json.dumps([{"image": name, "image_id": i, "caption": "a shape"} for i, name in enumerate(names)]))
    return str(path)


@pytest.mark.parametrize("name", ["../../outside/x.png", "/proc/self/environ", "a/../../x.png"])
def test_paths_leaving_the_root_are_refused_at_build_naming_the_entry(tmp_path, name):
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(AnnotationFileError, match=r"entry 1: 'image' .*(absolute path|leads out)") as err:
        CaptionDataset(None, None, str(root), [_annotations(root, "ok.png", name)])
    assert "run.allow_outside_image_paths=True" in str(err.value)


def test_the_switch_allows_outside_paths(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    processors.allow_outside_image_paths(True)
    try:
        dataset = CaptionDataset(None, None, str(root), [_annotations(root, "../x.png")])
        assert dataset.annotation[0]["image"] == "../x.png"
    finally:
        processors.allow_outside_image_paths(False)


def _robust_dataset(root, names):
    class Images(CaptionDataset):
        opened = []

        def __getitem__(self, index):
            path = os.path.join(self.vis_root, self.annotation[index]["image"])
            Images.opened.append(path)
            return {"image": np.asarray(Image.open(path)), "text_input": "a shape"}

    dataset = Images(None, None, str(root), [_annotations(root, *names)])
    return RobustDataset(dataset, max_bad_fraction=0.9), Images.opened


def test_symlinks_leaving_the_root_and_fifos_are_never_opened(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir(), outside.mkdir()
    Image.new("RGB", (4, 4)).save(root / "ok.png")
    Image.new("RGB", (4, 4)).save(outside / "secret.png")
    os.symlink(outside / "secret.png", root / "link.png")
    os.mkfifo(root / "fifo.png")  # opening it would block the run forever
    dataset, opened = _robust_dataset(root, ["link.png", "fifo.png", "ok.png"])
    dataset.start_epoch()
    dataset[0]
    assert opened == [str(root / "ok.png")]  # the symlink and the FIFO were refused before any open
    assert dataset.stats()["bad"] == 2


def test_output_folder_shadowed_by_a_file_or_full_is_reported(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    (problem,) = jobs.output_dir_problems(tmp_path / "file" / "runs")
    assert "has a file in its way" in problem and str(tmp_path / "file") in problem
    (problem,) = jobs.output_dir_problems(tmp_path / "file")
    assert "is a file" in problem
    assert jobs.output_dir_problems(tmp_path / "new" / "runs") == []  # creatable
    monkeypatch.setattr("shutil.disk_usage", lambda path: SimpleNamespace(free=2 ** 20, total=2 ** 30, used=0))
    (problem,) = jobs.output_dir_problems(tmp_path, need_bytes=2 ** 30)
    assert "GiB free" in problem and "1.00 GiB" in problem


def test_unwritable_output_folder_is_reported(tmp_path, monkeypatch):
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)  # root ignores permission bits; a read-only mount does not
    (problem,) = jobs.output_dir_problems(tmp_path)
    assert "is not writable" in problem and "Read-only file system" in problem


def test_check_reports_the_output_folder_before_building_anything(tmp_path):
    from lavis_xformer.check import check
    from helpers import DEMO_TRAIN

    (tmp_path / "blocker").write_text("x")
    findings = check(DEMO_TRAIN, [f"run.output_dir={tmp_path / 'blocker'}"], memory=False)
    assert any(f.level == "ERROR" and "is a file, not a folder" in f.message for f in findings)


@pytest.mark.parametrize("key, value, message", [
    ("beta2", 1.5, r"run.beta2=1.5 must lie in \[0, 1\)"),
    ("seed", -1, r"run.seed=-1 must lie in"),
    ("seed", 2 ** 32, r"run.seed=4294967296 must lie in"),
    ("device", "tpu", r"run.device='tpu' is not a device"),
    ("num_workers", 100000, r"run.num_workers=100000 is more than this machine can run"),
])
def test_values_that_failed_inside_torch_or_numpy_are_refused(key, value, message):
    problems = run_value_problems({key: value})
    assert len(problems) == 1 and __import__("re").search(message, problems[0])


def test_good_values_pass():
    assert run_value_problems({"beta2": 0.999, "seed": 42, "device": "cuda:1", "num_workers": 4}) == []
    assert max_workers() >= 8


def test_uniform_mid_grey_16_bit_stays_mid_grey_not_black():
    grey = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))
    assert np.asarray(to_rgb(grey)).max() == 128 and np.asarray(to_rgb(grey)).min() == 128
    white = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert np.asarray(to_rgb(white)).min() == 255
    as_float = Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32))
    assert np.asarray(to_rgb(as_float)).min() == 128
