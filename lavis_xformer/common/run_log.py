"""The format of a job's ``log.txt`` (JSON lines; written by ``runners/logs.py``, whose docstring shows the kinds)
and its reading: ``read_log`` returns one series across resumes. Kept below the runners, as the model card
(``checkpoints/export.py``) reads it too.
"""

import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

LOG_NAME = "log.txt"
ITERATION_KIND, EPOCH_KIND, EVAL_KIND, RESUME_KIND = "iter", "epoch", "eval", "resume"
POSITION_KEYS = ("kind", "epoch", "iteration", "split")  # every line has the first three; evaluations the split


def json_value(value):
    """A logged value as JSON: numbers as numbers (also numeric strings, tensors and numpy scalars), a non-finite
    number as None, containers element-wise, anything else as its string."""
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        try:
            return json_value(float(value))  # LAVIS's loops log "{:.3f}" strings
        except ValueError:
            return value
    if isinstance(value, dict):
        return {str(key): json_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_value(item) for item in value]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # 0-d tensors, numpy scalars
        return json_value(value.item())
    return str(value)


def read_log(job_dir, kinds: Optional[Sequence[str]] = None, follow_resumes: bool = True) -> List[dict]:
    """The records of ``<job_dir>/log.txt`` in order, preceded (``follow_resumes``) by those of the runs it resumed,
    each up to the iteration its successor resumed after; ``kinds`` keeps those kinds only. [] without a log."""
    records = _read_chain(Path(job_dir), set()) if follow_resumes else _read_one(Path(job_dir))
    return [record for record in records if kinds is None or record["kind"] in kinds]


def read_iteration_log(job_dir) -> List[Dict[str, float]]:
    """The per-iteration lines (``kind`` removed), across resumes; [] when there are none."""
    return [_without_kind(record) for record in read_log(job_dir, (ITERATION_KIND,))]


def read_epoch_log(job_dir) -> List[dict]:
    """LAVIS's per-epoch training averages (``train_loss``, ...; ``kind`` removed), across resumes."""
    return [_without_kind(record) for record in read_log(job_dir, (EPOCH_KIND,))]


def _without_kind(record: dict) -> dict:
    return {key: value for key, value in record.items() if key != "kind"}


def _read_chain(job_dir: Path, seen: set) -> List[dict]:
    key = job_dir.resolve()
    if key in seen:  # a folder naming itself (or a loop) as its predecessor
        return []
    seen.add(key)
    own = _read_one(job_dir)
    resume = next((record for record in own if record["kind"] == RESUME_KIND), None)
    if resume is None or not resume.get("job_dir"):
        return own
    until = resume.get("iteration", 0)
    before = [record for record in _read_chain(Path(resume["job_dir"]), seen)
              if (record.get("iteration") or 0) <= until]
    return before + own


def _read_one(job_dir: Path) -> List[dict]:
    path = job_dir / LOG_NAME
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not (line.startswith("{") and line.endswith("}")):
            continue  # the lines of a config pretty-printed by LAVIS's log_config (older logs)
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(_with_kind(record))
    return records


def _with_kind(record: dict) -> dict:
    """Older logs: per-iteration lines had ``iter``, LAVIS's per-epoch lines no kind at all."""
    if "kind" in record:
        if "iter" in record and "iteration" not in record:
            record = {("iteration" if key == "iter" else key): value for key, value in record.items()}
        return record
    return {"kind": EPOCH_KIND if any(str(key).startswith("train_") for key in record) else EVAL_KIND, **record}
