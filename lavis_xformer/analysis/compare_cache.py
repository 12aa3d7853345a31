"""The comparison's cache: one file per finished (model, benchmark), with what produced it.

    <out>/cache/<model label>/<benchmark>.json = {"fingerprint": ..., "predictions" | "result": ...}

A fingerprint holds the model (architecture, type, checkpoint path, size and time), the build seed, the benchmark
and its questions (their ids' digest), and the protocol; an entry is read back only under the same fingerprint, so an
interrupted comparison resumes where it stopped and a changed setting is recomputed.
"""

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional

from lavis_xformer.analysis.vqa_benchmarks import PreparedBenchmark

CACHE_FORMAT = 1


DIVERSITY = "query_diversity"  # the cache entry of the query-diversity analysis


def cache_path(out_dir, spec, name: str) -> Path:
    return Path(out_dir) / "cache" / spec.slug / f"{name}.json"


def prediction_fingerprint(spec, prepared: PreparedBenchmark, protocol, seed: int) -> dict:
    return {
        "format": CACHE_FORMAT,
        "model": spec.identity(),
        "build_seed": seed,
        "benchmark": prepared.benchmark.name,
        "builder": prepared.benchmark.builder,
        "split": prepared.benchmark.split,
        "protocol": asdict(protocol),
        "num_questions": len(prepared.question_ids),
        "question_ids_sha1": prepared.question_ids_digest(),
    }


def diversity_fingerprint(spec, source: PreparedBenchmark, indices: List[int], seed: int) -> dict:
    images = [source.dataset.annotation[i]["image"] for i in indices]
    return {
        "format": CACHE_FORMAT,
        "model": spec.identity(),
        "build_seed": seed,
        "benchmark": source.benchmark.name,
        "images_sha1": hashlib.sha1(json.dumps(images).encode()).hexdigest(),
    }


def read_cache(path: Path, fingerprint: dict) -> Optional[dict]:
    """The cached entry if it was produced by exactly these settings, else None."""
    if not path.is_file():
        return None
    try:
        entry = json.loads(path.read_text())
    except json.JSONDecodeError:
        logging.warning("%s is unreadable; recomputing", path)
        return None
    if entry.get("fingerprint") != fingerprint:
        logging.warning("%s was produced with other settings; recomputing", path)
        return None
    return entry
