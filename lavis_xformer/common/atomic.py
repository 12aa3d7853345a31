"""Atomic file writes: a reader sees the old file or the complete new one, never a torn one, even after a crash.

    atomic_write(path, write)            # write(handle) fills a temporary file beside ``path``, which then replaces it
    atomic_write_text(path, text) / atomic_write_json(path, data)

The bytes go to a temporary file in the same folder, are flushed and fsync'ed, then ``os.replace`` swaps the file in
(atomic on POSIX and Windows); the folder is fsync'ed so that the rename survives a power cut. A write that fails
removes its temporary file.
"""

import json
import os
from pathlib import Path
from typing import Callable, IO, Optional, Union

PathLike = Union[str, os.PathLike]


def atomic_write(path: PathLike, write: Callable[[IO], None], *, binary: bool = True,
                 tmp_path: Optional[PathLike] = None) -> Path:
    """Fill ``path`` through ``write(handle)`` atomically; ``tmp_path`` names the temporary file (default: a hidden
    ``.NAME.tmp-PID`` beside it). Returns ``path``."""
    path = Path(path)
    tmp_path = Path(tmp_path) if tmp_path is not None else path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp_path, "wb" if binary else "w") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if tmp_path.exists():
            tmp_path.unlink()
        raise
    fsync_directory(path.parent)
    return path


def atomic_write_text(path: PathLike, text: str) -> Path:
    """``text`` into ``path`` atomically, creating its folder."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda handle: handle.write(text), binary=False)


def atomic_write_json(path: PathLike, data) -> Path:
    """``data`` as indented JSON into ``path`` atomically, creating its folder."""
    return atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def fsync_directory(directory: PathLike) -> None:
    """Make a rename inside ``directory`` durable, where the platform and filesystem allow it."""
    try:
        fd = os.open(os.fspath(directory) or ".", os.O_RDONLY)
    except OSError:  # e.g. Windows, where folders cannot be opened; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems do not support fsync on folders
    finally:
        os.close(fd)
