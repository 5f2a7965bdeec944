"""On-disk cache of extracted features and source logits, keyed by content, verified on every read.

An entry is a folder named by the sha256 of its key (candidate identity including the weights hash,
dataset fingerprint, transform, precision). It holds:

- ``key.json``: the key itself;
- chunk files ``chunk-<start>.npz`` (features, logits, labels for rows [start, start + rows));
- ``index.json``: what the entry promises: the format, the dataset's row count (``total_rows``) and, per
  chunk, its file, ``start``, ``rows``, ``bytes`` and the ``sha256`` of the file.

Every file is written under a temporary name and renamed (``hubtune._io``); a chunk and its index record
are written under one lock on the entry folder, so the index never names a chunk that is not whole.
Reading an entry verifies it: the key matches, the index is well formed, the chunks are contiguous from
row 0, each file is present with its size and checksum, and it holds the rows, labels and widths the index
promises. The first chunk that fails ends the trusted part: a :class:`CacheDamageWarning` names the entry
and what is wrong, the damaged records are dropped, and only the rows after the last good chunk are
recomputed. A damaged entry is never used. ``FeatureCache.clear`` deletes only what hubtune wrote.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import time
import warnings
from pathlib import Path

import numpy as np

from .._io import atomic_write_bytes, atomic_write_text, default_cache_dir
from ..errors import CacheCorruptError

FORMAT = "hubtune-feature-cache-v2"
_ENTRY_NAME = re.compile(r"^[0-9a-f]{32}$")
_CHUNK_NAME = re.compile(r"^chunk-(\d{9})\.npz$")
# files hubtune writes in an entry (older versions wrote done.json); temporaries of the atomic writers
_OWN_FILE = re.compile(r"^(key\.json|index\.json|done\.json|chunk-\d{9}\.npz|\.[^/]+\.tmp)$")
_KEY_FIELDS = {"spec", "identity", "dataset", "transform", "precision"}


class CacheDamageWarning(UserWarning):
    """A cache entry failed verification; it is named in the message and its damaged part is recomputed."""


def _key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _read_json(path: Path):
    """(object, None) or (None, what is wrong)."""
    if not path.exists() and not path.is_symlink():
        return None, f"{path.name} is missing"
    if not path.is_file():
        return None, f"{path.name} is not a regular file"
    try:
        return json.loads(path.read_text()), None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return None, f"{path.name} is not readable JSON ({type(e).__name__}: {e})"


def _check_records(records, total) -> tuple[list[dict], str | None]:
    """The records contiguous from row 0, each well formed; and what ended them (None if nothing did)."""
    good, done = [], 0
    if not isinstance(records, list):
        return [], "index.json has no list of chunks"
    for r in sorted((r for r in records if isinstance(r, dict) and isinstance(r.get("start"), int)),
                    key=lambda r: r["start"]):
        if not (isinstance(r.get("rows"), int) and r["rows"] > 0 and isinstance(r.get("bytes"), int)
                and isinstance(r.get("sha256"), str) and isinstance(r.get("file"), str)
                and _CHUNK_NAME.match(r["file"]) and int(_CHUNK_NAME.match(r["file"]).group(1)) == r["start"]):
            return good, f"index.json has a malformed record for the chunk at row {r['start']}"
        if r["start"] != done:
            return good, f"rows {done}..{r['start'] - 1} are missing (no chunk starts at row {done})"
        if total is not None and r["start"] + r["rows"] > total:
            return good, f"the chunk at row {r['start']} runs past the {total} rows of the dataset"
        good.append(r)
        done += r["rows"]
    if len(good) != len(records):
        return good, "index.json has malformed chunk records"
    return good, None


class CacheEntry:
    def __init__(self, root: Path, key: dict):
        self.key = key
        self.digest = _key_digest(key)
        self.path = Path(root) / "features" / self.digest[:32]
        self.read_seconds = 0.0  # time spent reading and verifying chunks (for throughput reports)
        self._claims_complete = False

    # -- what is there --------------------------------------------------------------------------------
    def _label(self) -> str:
        return f"feature cache entry {self.path} ({self.key.get('spec', '?')})"

    def _warn(self, what: str, action: str) -> None:
        warnings.warn(f"{self._label()} is damaged: {what}; {action}", CacheDamageWarning, stacklevel=4)

    def _index(self, total: int | None) -> tuple[list[dict], str | None, bool]:
        """(trusted records contiguous from row 0, what is wrong or None, whether the whole entry is void)."""
        if not self.path.exists():
            return [], None, False
        key, why = _read_json(self.path / "key.json")
        if why is not None and why.endswith("is missing") and not (self.path / "index.json").exists() \
                and not any(self.path.glob("chunk-*.npz")):
            return [], None, False  # a folder with nothing in it yet (or being written by another rank)
        if why is None and key != self.key:
            why = "key.json does not hold this entry's key"
        if why is not None:
            return [], why, True
        idx, why = _read_json(self.path / "index.json")
        if why is not None:
            if why.endswith("is missing"):
                chunks = [p.name for p in self.path.glob("chunk-*.npz")]
                if not chunks:
                    return [], None, False  # a key written, no chunk yet: nothing to verify
                why = "index.json is missing, so its chunks cannot be verified (written by an older hubtune, " \
                      "or the index was lost)"
            return [], why, True
        if not isinstance(idx, dict) or idx.get("format") != FORMAT:
            return [], f"index.json is not a {FORMAT} index", True
        if idx.get("key_sha256") != self.digest:
            return [], "index.json belongs to another key", True
        promised = idx.get("total_rows")
        if not isinstance(promised, int) or (total is not None and promised != total):
            return [], f"index.json promises {promised!r} rows, the dataset has {total}", True
        good, why = _check_records(idx.get("chunks"), promised)
        self._claims_complete = bool(idx.get("complete"))
        return good, why, False

    # -- reading -----------------------------------------------------------------------------------------
    def _load_chunk(self, r: dict, labels, width: int | None):
        """The arrays of chunk record ``r``, or raise ValueError saying what is wrong with it."""
        p = self.path / r["file"]
        if not p.is_file():
            raise ValueError(f"{r['file']} is missing")
        data = p.read_bytes()
        if len(data) != r["bytes"]:
            raise ValueError(f"{r['file']} holds {len(data)} bytes, the index recorded {r['bytes']} (truncated?)")
        if hashlib.sha256(data).hexdigest() != r["sha256"]:
            raise ValueError(f"{r['file']} fails its sha256 checksum")
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                feats, logits, labs = z["features"], z["logits"], z["labels"]
        except Exception as e:  # a file that checksums but does not parse: written by something else
            raise ValueError(f"{r['file']} is not a readable chunk ({type(e).__name__}: {e})") from None
        rows = r["rows"]
        if feats.ndim != 2 or feats.shape[0] != rows or labs.shape != (rows,):
            raise ValueError(f"{r['file']} holds {feats.shape[0] if feats.ndim else 0} rows, the index promised {rows}")
        if width is not None and feats.shape[1] != width:
            raise ValueError(f"{r['file']} has {feats.shape[1]} features per row, earlier chunks {width}")
        if labels is not None and not np.array_equal(labs, np.asarray(labels[r["start"]:r["start"] + rows])):
            raise ValueError(f"{r['file']} holds labels that are not the dataset's rows {r['start']}..")
        if logits.size and (logits.ndim != 2 or logits.shape[0] != rows):
            raise ValueError(f"{r['file']} holds logits of shape {logits.shape} for {rows} rows")
        return feats, (logits if logits.size else None), labs

    def replay(self, emit, stop: int | None = None, total: int | None = None, labels=None) -> int:
        """Verify the entry and hand its rows ``[0, stop)`` to ``emit(features, logits, labels)`` chunk by
        chunk, in row order. Returns the number of verified rows emitted. ``total`` (the dataset's row count)
        and ``labels`` (its labels) are checked against the index and the chunks when given.

        A damaged entry or chunk is reported (:class:`CacheDamageWarning`, naming the entry and the fault);
        its damaged part is dropped from the index, so the caller recomputes from the rows returned."""
        self.read_seconds = 0.0
        self._claims_complete = False
        records, why, void = self._index(total)
        if why is not None:
            if void:
                self._warn(why, "recomputing the whole entry")
                self.reset()
                return 0
            self._warn(why, f"recomputing from row {sum(r['rows'] for r in records)}")
            self._truncate(len(records))
        done, width, warned = 0, None, why is not None
        for i, r in enumerate(records):
            if stop is not None and r["start"] >= stop:
                break
            t0 = time.perf_counter()
            try:
                feats, logits, labs = self._load_chunk(r, labels, width)
            except ValueError as e:
                self._warn(str(e), f"recomputing from row {r['start']}")
                self._truncate(i)
                warned = True
                break
            finally:
                self.read_seconds += time.perf_counter() - t0
            width = feats.shape[1]
            keep = r["rows"] if stop is None else min(r["rows"], stop - r["start"])
            emit(feats[:keep], None if logits is None else logits[:keep], labs[:keep])
            done += keep
        held = sum(r["rows"] for r in records)
        if self._claims_complete and not warned and total is not None and held < total:
            self._warn(f"index.json says complete but its chunks hold {held} of {total} rows",
                       f"recomputing from row {held}")
        return done

    # -- writing -------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self):
        """An exclusive lock on the entry folder (flock on its descriptor), so concurrent ranks on one cache
        never interleave a chunk and its index record."""
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            yield
            return
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _raw_index(self, total: int | None) -> dict:
        idx, why = _read_json(self.path / "index.json")
        if why is None and isinstance(idx, dict) and idx.get("format") == FORMAT \
                and idx.get("key_sha256") == self.digest:
            good, _ = _check_records(idx.get("chunks"), idx.get("total_rows"))
            idx["chunks"] = good
            return idx
        return {"format": FORMAT, "key_sha256": self.digest, "total_rows": total, "chunks": []}

    def _write_index(self, idx: dict) -> None:
        recs = idx["chunks"]
        idx["complete"] = bool(idx.get("total_rows")) and sum(r["rows"] for r in recs) == idx["total_rows"]
        atomic_write_text(self.path / "index.json", json.dumps(idx, indent=1, sort_keys=True) + "\n")

    def _own_files(self) -> list[Path]:
        return [p for p in self.path.iterdir() if _OWN_FILE.match(p.name) and not p.is_dir()] \
            if self.path.is_dir() else []

    def _truncate(self, keep: int) -> None:
        """Keep the first ``keep`` trusted records; remove the files of every other chunk."""
        with self._locked():
            idx = self._raw_index(None)
            idx["chunks"] = idx["chunks"][:keep]
            names = {r["file"] for r in idx["chunks"]}
            for p in self.path.glob("chunk-*.npz"):
                if p.name not in names:
                    p.unlink(missing_ok=True)
            if (self.path / "index.json").is_file():
                self._write_index(idx)

    def reset(self) -> None:
        """Remove every file hubtune wrote in the entry (files of others are left)."""
        with self._locked():
            if (self.path / "index.json").is_dir() or (self.path / "key.json").is_dir():
                raise CacheCorruptError(
                    f"{self._label()} holds a folder named index.json or key.json, so it cannot be repaired; "
                    f"delete {self.path} (or run `hubtune cache clear --cache-dir {self.path.parent.parent}`)")
            for p in self._own_files():
                p.unlink(missing_ok=True)

    def write_chunk(self, start: int, features, logits, labels, total: int | None = None) -> None:
        """Write rows [start, start + len(labels)) and record them (file, rows, bytes, sha256) in the index.
        ``total`` is the dataset's row count (what the entry promises once complete)."""
        buf = io.BytesIO()
        np.savez(buf, features=features, labels=labels,
                 logits=logits if logits is not None else np.zeros((0,), np.float32))
        data = buf.getvalue()
        rows = int(len(labels))
        name = f"chunk-{start:09d}.npz"
        with self._locked():
            if not (self.path / "key.json").is_file():
                atomic_write_text(self.path / "key.json", json.dumps(self.key, indent=2, sort_keys=True))
            idx = self._raw_index(total)
            if total is not None:
                idx["total_rows"] = int(total)
            stale = [r for r in idx["chunks"] if r["start"] < start + rows and start < r["start"] + r["rows"]]
            idx["chunks"] = [r for r in idx["chunks"] if r not in stale]
            for r in stale:
                if r["file"] != name:
                    (self.path / r["file"]).unlink(missing_ok=True)
            atomic_write_bytes(self.path / name, data)
            idx["chunks"].append({"file": name, "start": int(start), "rows": rows, "bytes": len(data),
                                  "sha256": hashlib.sha256(data).hexdigest()})
            idx["chunks"].sort(key=lambda r: r["start"])
            idx["feature_dim"] = int(np.shape(features)[1]) if np.ndim(features) == 2 else None
            self._write_index(idx)

class FeatureCache:
    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else default_cache_dir()

    @property
    def folder(self) -> Path:
        return self.root / "features"

    def entry(self, **key) -> CacheEntry:
        return CacheEntry(self.root, key)

    def _scan(self) -> tuple[list[Path], list[Path]]:
        """(entry folders hubtune wrote, other items) directly under ``root/features``."""
        if not self.folder.is_dir():
            return [], []
        entries, foreign = [], []
        for p in sorted(self.folder.iterdir()):
            ours = (_ENTRY_NAME.match(p.name) and p.is_dir() and not p.is_symlink()
                    and ((p / "key.json").is_file() or (p / "index.json").is_file()))
            if ours:
                key, why = _read_json(p / "key.json")
                if why is None and isinstance(key, dict) and _key_digest(key)[:32] != p.name:
                    ours = False  # a key.json that does not name its folder: not an entry hubtune wrote
            (entries if ours else foreign).append(p)
        return entries, foreign

    def ls(self, verify: bool = False) -> list[dict]:
        """One dict per entry: path, model, dataset, status (``complete``, ``partial`` or ``damaged``),
        problem (what is wrong, for a damaged entry), rows, total_rows, bytes. ``verify`` also checksums
        every chunk (reads the whole cache). Items under ``root/features`` that hubtune did not write are
        listed by :meth:`foreign`."""
        out = []
        entries, _ = self._scan()
        for d in entries:
            key, why = _read_json(d / "key.json")
            key = key if isinstance(key, dict) else {}
            entry = CacheEntry(self.root, key) if why is None else None
            rows, total, problem = 0, None, why
            if entry is not None:
                records, problem, _ = entry._index(None)
                rows = sum(r["rows"] for r in records)
                idx, _ = _read_json(d / "index.json")
                total = idx.get("total_rows") if isinstance(idx, dict) else None
                if problem is None:
                    for r in records:
                        p = d / r["file"]
                        if not p.is_file() or p.stat().st_size != r["bytes"]:
                            problem = f"{r['file']} is missing or has the wrong size"
                            break
                        if verify:
                            try:
                                entry._load_chunk(r, None, None)
                            except ValueError as e:
                                problem = str(e)
                                break
            size = sum(p.stat().st_size for p in d.iterdir() if p.is_file() and not p.is_symlink())
            status = "damaged" if problem else ("complete" if total and rows == total else "partial")
            out.append({"path": str(d), "model": key.get("spec"), "dataset": key.get("dataset"),
                        "status": status, "complete": status == "complete", "problem": problem,
                        "rows": rows, "total_rows": total, "bytes": size})
        return out

    def foreign(self) -> list[str]:
        """Paths under ``root/features`` that hubtune did not write (left alone by :meth:`clear`)."""
        entries, foreign = self._scan()
        out = [str(p) for p in foreign]
        for d in entries:
            out += [str(p) for p in sorted(d.iterdir()) if not _OWN_FILE.match(p.name) or p.is_dir()]
        return out

    def clear(self) -> tuple[int, list[str]]:
        """Delete the entries hubtune wrote (recognised by their key/index files), and nothing else.

        Returns (entries removed, paths skipped because hubtune did not write them). A folder left with
        only others' files in it is kept; ``root/features`` is removed only when it ends up empty."""
        entries, foreign = self._scan()
        skipped = [str(p) for p in foreign]
        for d in entries:
            for p in sorted(d.iterdir()):
                if _OWN_FILE.match(p.name) and (p.is_file() or p.is_symlink()):
                    p.unlink(missing_ok=True)
                else:
                    skipped.append(str(p))
            with contextlib.suppress(OSError):
                d.rmdir()  # only when empty
        with contextlib.suppress(OSError):
            self.folder.rmdir()
        return len(entries), skipped
