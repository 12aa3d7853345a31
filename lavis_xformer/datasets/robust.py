"""A wrapper that keeps a long run alive through bad samples, around any LAVIS dataset.

A sample that cannot be used (missing, truncated or undecodable image, zero-size image, an image over
``max_image_pixels`` (PIL's decompression-bomb limit unless set), empty or non-UTF-8 caption)
is replaced by the next usable sample of the dataset, so every batch keeps its size and every DDP rank its step
count. Each bad file is logged with the reason and counted once per epoch (a bad file met again, as the
replacement of its bad neighbour, is neither logged nor counted again). The run stops with
``BadSampleLimitExceeded``, a clear error rather than a silently shrinking dataset, when an epoch has more than
``max_bad_samples`` bad files (an absolute count; None = no such limit), or when the fraction of bad files among the
samples loaded passes ``max_bad_fraction`` (1% by default): checked as samples load once ``min_samples_before_limit``
have loaded, and by the runner at the end of every epoch over all ranks (``check_bad_sample_limits``), so the
fraction also applies to an epoch of fewer samples. The counts live in shared memory, so DataLoader workers add to
them.
"""

import contextlib
import ctypes
import logging
import multiprocessing
import warnings
from typing import Optional

import torch
from PIL import Image, ImageFile

logger = logging.getLogger(__name__)

TEXT_KEYS = ("text_input", "caption", "text_output", "question")
ANSWER_KEYS = ("answers", "answer", "text_output")  # lists of answers (LAVIS's VQA samples: "answers", "weights")


@contextlib.contextmanager
def _truncated_images_raise(accept: bool):
    """LAVIS sets PIL's process-wide ``ImageFile.LOAD_TRUNCATED_IMAGES = True``, which silently pads a truncated
    file with grey; while a wrapped sample loads, a truncated file raises instead (unless accepted)."""
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = accept
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


@contextlib.contextmanager
def _giant_images_raise(max_image_pixels: Optional[int]):
    """PIL only warns (``DecompressionBombWarning``) between ``MAX_IMAGE_PIXELS`` and twice that, and decodes the
    image; while a wrapped sample loads, anything over the limit (``max_image_pixels``, else PIL's) raises."""
    saved = Image.MAX_IMAGE_PIXELS
    if max_image_pixels is not None:
        Image.MAX_IMAGE_PIXELS = int(max_image_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


class BadSampleLimitExceeded(RuntimeError):
    """Too many unusable samples in one epoch: the data, not one file, is broken."""


def check_bad_sample_limits(bad: int, attempted: int, max_bad_fraction: float, max_bad_samples: Optional[int],
                            last: str = "", check_fraction: bool = True) -> None:
    """Raise ``BadSampleLimitExceeded`` when ``bad`` of ``attempted`` samples pass either limit of an epoch."""
    if max_bad_samples is not None and bad > max_bad_samples:
        reason = f"> max_bad_samples {max_bad_samples}"
    elif check_fraction and attempted and bad / attempted > max_bad_fraction:
        reason = f"{100.0 * bad / attempted:.1f}% > max_bad_fraction {100.0 * max_bad_fraction:.1f}%"
    else:
        return
    raise BadSampleLimitExceeded(
        f"{bad} of {attempted} samples this epoch were unusable ({reason}){'; last: ' + last if last else ''}. "
        f"Fix the data or raise `max_bad_fraction` / `max_bad_samples` in the run config."
    )


def _sample_file(dataset, index: int) -> str:
    annotation = getattr(dataset, "annotation", None)
    if annotation is not None and 0 <= index < len(annotation):
        entry = annotation[index]
        if isinstance(entry, dict):
            for key in ("image", "image_path", "video", "file_name"):
                if key in entry:
                    return str(entry[key])
    return f"sample #{index}"


def _check_image_file(dataset, index: int) -> None:
    """Before the dataset opens an entry's image: a path leaving the dataset's root (symlinks included) or naming
    something other than a regular file (a FIFO would hang the run) raises ``ValueError`` (a bad sample)."""
    from lavis_xformer.processors import resolved_image_problem

    annotation = getattr(dataset, "annotation", None)
    if annotation is None or not 0 <= index < len(annotation) or not isinstance(annotation[index], dict):
        return
    problem = resolved_image_problem(getattr(dataset, "vis_root", None), annotation[index].get("image"))
    if problem:
        raise ValueError(problem)


def _check_annotation_entry(dataset, index: int) -> None:
    """Before the dataset loads an entry: an empty question (named with its file when the dataset was built) raises
    ``ValueError`` (a bad sample), whatever the text processor would make of it."""
    from lavis_xformer.compat import empty_question

    annotation = getattr(dataset, "annotation", None)
    if annotation is not None and 0 <= index < len(annotation) and empty_question(annotation[index]):
        raise ValueError(f"annotation entry {index}: 'question' is empty")


def check_sample(sample) -> None:
    """Raise ``ValueError`` for a loaded sample the models cannot use (texts that are empty or not UTF-8, an empty
    list of answers)."""
    if sample is None:
        raise ValueError("dataset returned None")
    for key in ANSWER_KEYS:
        if isinstance(sample.get(key), (list, tuple)) and not sample[key]:
            raise ValueError(f"{key} is an empty list (a question needs at least one answer)")
    for key in TEXT_KEYS:
        if key not in sample:
            continue
        text = sample[key]
        if isinstance(text, bytes):
            raise ValueError(f"{key} is bytes, not decoded text")
        if isinstance(text, str):
            if not text.strip():
                raise ValueError(f"{key} is empty")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:
                raise ValueError(f"{key} is not valid UTF-8 ({err.reason})") from err


class DatasetWrapper(torch.utils.data.Dataset):
    """A dataset around another (``RobustDataset``, the runner's ``SeededSamples``): its length, ``collater`` and
    every attribute the wrapper does not set itself come from ``dataset`` (LAVIS's runner and evaluation code read
    ``collater``, ``annotation``, ``text``, ``img2txt``, ...)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getattr__(self, name):
        if name == "dataset":  # not set yet (unpickling in a DataLoader worker): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def collater(self, samples):
        return self.dataset.collater(samples)


class RobustDataset(DatasetWrapper):
    """``dataset`` with unusable samples replaced and counted (see the module docstring)."""

    def __init__(
        self,
        dataset,
        max_bad_fraction: float = 0.01,
        min_samples_before_limit: int = 100,
        accept_truncated_images: bool = False,
        max_image_pixels: Optional[int] = None,
        max_bad_samples: Optional[int] = None,
    ):
        super().__init__(dataset)
        self.configure(max_bad_fraction, min_samples_before_limit, max_image_pixels, max_bad_samples)
        self.accept_truncated_images = accept_truncated_images
        # Shared with forked DataLoader workers: attempted and bad samples in the current epoch, and one bit per
        # sample marking the bad ones met this epoch (each is counted once).
        self._attempted = multiprocessing.Value("q", 0)
        self._bad = multiprocessing.Value("q", 0)
        self._bad_total = multiprocessing.Value("q", 0)
        self._bad_seen = multiprocessing.Array("B", (len(dataset) + 7) // 8)

    def configure(self, max_bad_fraction: float = 0.01, min_samples_before_limit: int = 100,
                  max_image_pixels: Optional[int] = None, max_bad_samples: Optional[int] = None) -> None:
        """Set the limits (the runner applies ``run.max_bad_fraction`` etc. to datasets a builder wrapped)."""
        if max_bad_samples is not None and int(max_bad_samples) < 0:
            raise ValueError(f"max_bad_samples={max_bad_samples} must be >= 0")
        self.max_bad_samples = None if max_bad_samples is None else int(max_bad_samples)
        if not 0.0 <= float(max_bad_fraction) < 1.0:
            raise ValueError(f"max_bad_fraction={max_bad_fraction} must lie in [0, 1)")
        if int(min_samples_before_limit) < 0:
            raise ValueError(f"min_samples_before_limit={min_samples_before_limit} must be >= 0")
        if max_image_pixels is not None and int(max_image_pixels) < 1:
            raise ValueError(f"max_image_pixels={max_image_pixels} must be >= 1")
        self.max_bad_fraction = float(max_bad_fraction)
        self.min_samples_before_limit = int(min_samples_before_limit)
        self.max_image_pixels = None if max_image_pixels is None else int(max_image_pixels)

    # ---------------------------------------------------------------------------------------------------------
    def start_epoch(self):
        """Reset the per-epoch counts (the runner calls this at the start of every epoch)."""
        with self._attempted.get_lock():
            self._attempted.value = 0
        with self._bad.get_lock():
            self._bad.value = 0
        with self._bad_seen.get_lock():
            ctypes.memset(ctypes.addressof(self._bad_seen.get_obj()), 0, len(self._bad_seen))

    def stats(self) -> dict:
        return {"attempted": self._attempted.value, "bad": self._bad.value, "bad_total": self._bad_total.value}

    def load_stats(self, stats: dict) -> None:
        """Put back counts saved with ``stats()`` (a run resumed inside an epoch keeps counting that epoch; which
        files were bad is not saved, so a bad file met both before and after the resume counts twice)."""
        for value, key in ((self._attempted, "attempted"), (self._bad, "bad"), (self._bad_total, "bad_total")):
            with value.get_lock():
                value.value = int(stats.get(key, 0))

    def _first_time_bad(self, index: int) -> bool:
        """Mark sample ``index`` bad for this epoch; False when it already was."""
        byte, bit = divmod(index, 8)
        with self._bad_seen.get_lock():
            if self._bad_seen[byte] & (1 << bit):
                return False
            self._bad_seen[byte] |= 1 << bit
        return True

    def _record_bad(self, index: int, error: BaseException):
        if not self._first_time_bad(index):
            return
        with self._bad.get_lock():
            self._bad.value += 1
        with self._bad_total.get_lock():
            self._bad_total.value += 1
        last = f"{_sample_file(self.dataset, index)} ({type(error).__name__}: {error})"
        logger.warning("skipping unusable sample %s; replaced by the next usable one", last)
        attempted, bad = self._attempted.value, self._bad.value
        check_bad_sample_limits(bad, attempted, self.max_bad_fraction, self.max_bad_samples, last,
                                check_fraction=attempted >= self.min_samples_before_limit)

    def __getitem__(self, index: int):
        size = len(self.dataset)
        last_error: Optional[BaseException] = None
        for offset in range(size):
            current = (index + offset) % size
            with self._attempted.get_lock():
                self._attempted.value += 1
            try:
                _check_annotation_entry(self.dataset, current)
                _check_image_file(self.dataset, current)
                with _truncated_images_raise(self.accept_truncated_images), _giant_images_raise(self.max_image_pixels):
                    sample = self.dataset[current]
                check_sample(sample)
                return sample
            except BadSampleLimitExceeded:
                raise
            except Exception as error:  # any failure of one sample: missing file, PIL errors, bad text
                last_error = error
                self._record_bad(current, error)
        raise BadSampleLimitExceeded(f"no usable sample in the whole dataset; last error: {last_error}")
