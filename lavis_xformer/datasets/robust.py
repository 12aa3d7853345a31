"""A wrapper that keeps a long run alive through bad samples, around any LAVIS dataset.

A sample that cannot be used (missing, truncated or undecodable image, zero-size image, an image over
``max_image_pixels`` (PIL's decompression-bomb limit unless set), empty or non-UTF-8 caption)
is replaced by the next usable sample of the dataset, so every batch keeps its size and every DDP rank its step
count. Each replacement is logged with the file and the reason and counted; when the fraction of bad samples in
an epoch passes ``max_bad_fraction`` (1% by default) the run stops with ``BadSampleLimitExceeded``, a clear error
rather than a silently shrinking dataset. The counts live in shared memory, so DataLoader workers add to them.
"""

import contextlib
import logging
import multiprocessing
import warnings
from typing import Optional

import torch
from PIL import Image, ImageFile

logger = logging.getLogger(__name__)

TEXT_KEYS = ("text_input", "caption", "text_output", "question")


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


def _sample_file(dataset, index: int) -> str:
    annotation = getattr(dataset, "annotation", None)
    if annotation is not None and 0 <= index < len(annotation):
        entry = annotation[index]
        if isinstance(entry, dict):
            for key in ("image", "image_path", "video", "file_name"):
                if key in entry:
                    return str(entry[key])
    return f"sample #{index}"


def check_sample(sample) -> None:
    """Raise ``ValueError`` for a loaded sample the models cannot use (texts that are empty or not UTF-8)."""
    if sample is None:
        raise ValueError("dataset returned None")
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


class RobustDataset(torch.utils.data.Dataset):
    """``dataset`` with unusable samples replaced and counted (see the module docstring)."""

    def __init__(
        self,
        dataset,
        max_bad_fraction: float = 0.01,
        min_samples_before_limit: int = 100,
        accept_truncated_images: bool = False,
        max_image_pixels: Optional[int] = None,
    ):
        self.dataset = dataset
        self.configure(max_bad_fraction, min_samples_before_limit, max_image_pixels)
        self.accept_truncated_images = accept_truncated_images
        # Shared with forked DataLoader workers: attempted and bad samples in the current epoch.
        self._attempted = multiprocessing.Value("q", 0)
        self._bad = multiprocessing.Value("q", 0)
        self._bad_total = multiprocessing.Value("q", 0)

    def __len__(self):
        return len(self.dataset)

    def __getattr__(self, name):
        # LAVIS's runner and evaluation code read dataset attributes (collater, annotation, text, img2txt, ...).
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def collater(self, samples):
        return self.dataset.collater(samples)

    def configure(self, max_bad_fraction: float = 0.01, min_samples_before_limit: int = 100,
                  max_image_pixels: Optional[int] = None) -> None:
        """Set the limits (the runner applies ``run.max_bad_fraction`` etc. to datasets a builder wrapped)."""
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

    def stats(self) -> dict:
        return {"attempted": self._attempted.value, "bad": self._bad.value, "bad_total": self._bad_total.value}

    def load_stats(self, stats: dict) -> None:
        """Put back counts saved with ``stats()`` (a run resumed inside an epoch keeps counting that epoch)."""
        for value, key in ((self._attempted, "attempted"), (self._bad, "bad"), (self._bad_total, "bad_total")):
            with value.get_lock():
                value.value = int(stats.get(key, 0))

    def _record_bad(self, index: int, error: BaseException):
        with self._bad.get_lock():
            self._bad.value += 1
        with self._bad_total.get_lock():
            self._bad_total.value += 1
        logger.warning(
            "skipping unusable sample %s (%s: %s); replaced by the next usable one",
            _sample_file(self.dataset, index),
            type(error).__name__,
            error,
        )
        attempted, bad = self._attempted.value, self._bad.value
        if attempted >= self.min_samples_before_limit and bad / attempted > self.max_bad_fraction:
            raise BadSampleLimitExceeded(
                f"{bad} of {attempted} samples this epoch were unusable ({100.0 * bad / attempted:.1f}% > "
                f"max_bad_fraction {100.0 * self.max_bad_fraction:.1f}%); last: {_sample_file(self.dataset, index)} "
                f"({type(error).__name__}: {error}). Fix the data or raise `max_bad_fraction` in the run config."
            )

    def __getitem__(self, index: int):
        size = len(self.dataset)
        last_error: Optional[BaseException] = None
        for offset in range(size):
            current = (index + offset) % size
            with self._attempted.get_lock():
                self._attempted.value += 1
            try:
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
