"""On-disk cache of extracted features and source logits, keyed by content.

An entry is a folder named by the sha256 of its key (candidate identity including the weights hash,
dataset fingerprint, transform, precision). It holds ``key.json``, chunk files ``chunk-<start>.npz``
(features, logits, labels for rows [start, start + len)) and, once every row is there, ``done.json``.
Every file is written under a temporary name and renamed, so an interrupted extraction leaves only whole
chunks behind and resumes after the last one.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .._io import atomic_write_text


def default_cache_dir() -> Path:
    """``$HUBTUNE_CACHE``, else ``$XDG_CACHE_HOME/hubtune``, else ``~/.cache/hubtune``."""
    if os.environ.get("HUBTUNE_CACHE"):
        return Path(os.environ["HUBTUNE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hubtune"


class CacheEntry:
    def __init__(self, root: Path, key: dict):
        self.key = key
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        self.path = root / "features" / digest[:32]

    @property
    def complete(self) -> bool:
        return (self.path / "done.json").exists()

    def _chunk_files(self) -> list[tuple[int, Path]]:
        if not self.path.exists():
            return []
        return sorted((int(p.stem.split("-")[1]), p) for p in self.path.glob("chunk-*.npz"))

    def rows_done(self) -> int:
        """Rows covered by whole chunks contiguous from row 0 (a gap ends the count)."""
        done = 0
        for start, p in self._chunk_files():
            if start != done:
                break
            with np.load(p) as z:
                done += len(z["labels"])
        return done

    def read(self, stop: int | None = None):
        """Yield (features, logits or None, labels) chunk by chunk, in row order, up to row ``stop``."""
        done = 0
        for start, p in self._chunk_files():
            if start != done or (stop is not None and start >= stop):
                break
            with np.load(p) as z:
                keep = len(z["labels"]) if stop is None else min(len(z["labels"]), stop - start)
                logits = z["logits"][:keep] if z["logits"].size else None
                yield z["features"][:keep], logits, z["labels"][:keep]
                done += len(z["labels"])

    def write_chunk(self, start: int, features, logits, labels) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        if not (self.path / "key.json").exists():
            atomic_write_text(self.path / "key.json", json.dumps(self.key, indent=2, sort_keys=True))
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=".chunk-", suffix=".npz.tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, features=features, labels=labels,
                         logits=logits if logits is not None else np.zeros((0,), np.float32))
            os.replace(tmp, self.path / f"chunk-{start:09d}.npz")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def mark_complete(self, info: dict) -> None:
        atomic_write_text(self.path / "done.json", json.dumps(info, indent=2))


class FeatureCache:
    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else default_cache_dir()

    def entry(self, **key) -> CacheEntry:
        return CacheEntry(self.root, key)

    def ls(self) -> list[dict]:
        out = []
        for d in sorted((self.root / "features").glob("*")) if (self.root / "features").exists() else []:
            key = json.loads((d / "key.json").read_text()) if (d / "key.json").exists() else {}
            size = sum(p.stat().st_size for p in d.iterdir() if p.is_file())
            out.append({"path": str(d), "model": key.get("spec"), "dataset": key.get("dataset"),
                        "complete": (d / "done.json").exists(), "bytes": size})
        return out

    def clear(self) -> int:
        """Remove every cached entry; returns how many were removed."""
        entries = self.ls()
        shutil.rmtree(self.root / "features", ignore_errors=True)
        return len(entries)
