"""File helpers: every file hubtune writes goes to a temporary name first and is renamed into place, and
every array file it reads is checked and read in blocks (:func:`open_array`) rather than whole."""
from __future__ import annotations

import contextlib
import errno
import json
import mmap
import os
import re
import shutil
import tempfile
import threading
import zipfile
import zlib
from pathlib import Path

import numpy as np

from .errors import FeatureFileError, InputError, OutputError

_UMASK_LOCK = threading.Lock()


def default_cache_dir() -> Path:
    """``$HUBTUNE_CACHE``, else ``$XDG_CACHE_HOME/hubtune``, else ``~/.cache/hubtune``."""
    if os.environ.get("HUBTUNE_CACHE"):
        return Path(os.environ["HUBTUNE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hubtune"


def _umask() -> int:
    """The process umask, read now (it may change after import). Linux reports it in /proc/self/status;
    elsewhere it is read by setting and restoring it, under a lock."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; on a clean exit it is flushed to disk (fsync) and renamed onto
    ``path``, on any error (a full disk, an interrupt) it is removed, so nothing half-written is ever left
    under either name.

    The final file gets the mode an ordinary ``open()`` would give it (0666 less the umask), not the 0600 of
    a temporary file. A write that fails for lack of space or permission raises :class:`OutputError`
    naming the file and the cure."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise _output_error(path, e) from None
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        _fsync(tmp)  # a full disk may only show here (delayed allocation, NFS), before the rename, not after
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        cause = _as_oserror(e, tmp)
        if cause is not None:
            raise _output_error(path, cause) from None
        raise


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _as_oserror(e: BaseException, tmp: Path) -> OSError | None:
    """The OSError behind a failed write: itself, the one a writer recorded, or the ``os error N`` that
    writers in Rust or C++ (safetensors, torch) put in their messages."""
    if isinstance(e, OSError):
        if e.filename is not None and os.fspath(e.filename) != os.fspath(tmp):
            return None  # about another file (an input read inside the block): not this write's failure
        return e
    recorded = getattr(e, "__hubtune_oserror__", None)
    if isinstance(recorded, OSError):
        return recorded
    m = re.search(r"os error (\d+)", str(e))
    if m and isinstance(e, Exception):
        code = int(m.group(1))
        return OSError(code, os.strerror(code))
    return None


def _output_error(path: Path, e: OSError) -> OutputError:
    why = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
           errno.EFBIG: "the file is larger than this process may write (ulimit -f)",
           errno.EACCES: "permission denied", errno.EPERM: "permission denied",
           errno.EROFS: "the file system is read-only",
           errno.ENOTDIR: "a part of the path is a file, not a folder",
           errno.EEXIST: "a part of the path is a file, not a folder"}.get(e.errno, e.strerror or str(e))
    return OutputError(f"could not write {path}: {why}; free space or choose a writable location "
                       "(--out / --cache-dir), then run the same command again")


def check_writable(folder: str | os.PathLike, need_bytes: int = 0, file_bytes: int = 0) -> Path:
    """Fail early, before any work, when ``folder`` (created if missing) cannot be written, has less than
    ``need_bytes`` free, or when a single file of ``file_bytes`` would exceed this process's file-size limit
    (``ulimit -f``): raises :class:`OutputError` naming the folder and the cure."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".hubtune-write-check.", suffix=".tmp")
        try:
            os.write(fd, b"\0")  # a file system that accepts the name but no data (full, quota) fails here
        finally:
            os.close(fd)
            os.unlink(tmp)
    except OSError as e:
        raise _output_error(folder, e) from None
    if need_bytes:
        free = shutil.disk_usage(folder).free
        if free < need_bytes:
            raise OutputError(f"{folder} has {free / 1e6:.1f} MB free but this run needs about "
                              f"{need_bytes / 1e6:.1f} MB; free space or choose another location")
    if file_bytes:
        try:
            import resource

            limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
            limit = None if limit == resource.RLIM_INFINITY else limit
        except (ImportError, OSError, ValueError):
            limit = None
        if limit is not None and 0 <= limit < file_bytes:
            raise OutputError(f"this process may write files of at most {limit / 1e6:.1f} MB (ulimit -f) but "
                              f"{folder} needs one of about {file_bytes / 1e6:.1f} MB; raise the limit "
                              "(ulimit -f unlimited) or write less")
    return folder


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def atomic_torch_save(obj, path: str | os.PathLike) -> Path:
    import torch

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        writer = _RecordingWriter(f)
        try:
            torch.save(obj, writer)
        except RuntimeError as e:  # torch reports a failed write as RuntimeError("unexpected pos ...")
            e.__hubtune_oserror__ = writer.error
            raise
    return Path(path)


class _RecordingWriter:
    """A binary file that remembers the first OSError of a write, for writers that re-raise it as
    something else."""

    def __init__(self, f):
        self._f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self._f.flush()


def atomic_savez(path: str | os.PathLike, **arrays) -> Path:
    """``np.savez`` to ``path`` atomically (the name is kept as given; numpy does not append ``.npz``)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return Path(path)


def write_json(path: str | os.PathLike, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, default=_jsonable) + "\n")


def _jsonable(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def json_safe(d: dict) -> dict:
    """The entries of ``d`` that JSON can hold (tuples as lists); others are dropped."""
    out = {}
    for k, v in d.items():
        v = list(v) if isinstance(v, tuple) else v
        try:
            json.dumps(v)
        except (TypeError, ValueError):
            continue
        out[k] = v
    return out


def save_state_dict(module, path: str | os.PathLike) -> Path:
    """``module.state_dict()`` (on CPU, contiguous) to a ``.safetensors`` file, atomically."""
    from safetensors.torch import save_file

    sd = {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(sd, str(tmp), metadata={"format": "pt"})
    return Path(path)


# ------------------------------------------------------------------------------------------ reading arrays
#: rows are read in blocks of about this many bytes when the caller names no block size
READ_BLOCK_BYTES = 16 << 20


class ArrayFile:
    """One array in a file, read in row blocks so that it never has to sit in memory whole.

    ``shape``, ``dtype`` and ``len()`` describe it; ``blocks(rows)`` yields ``(slice, block)`` with each block a
    fresh array of at most ``rows`` rows; ``read()`` returns the whole array. Made by :func:`open_array`."""

    def __init__(self, path: Path, shape: tuple, dtype: np.dtype):
        self.path, self.shape, self.dtype = path, tuple(int(d) for d in shape), np.dtype(dtype)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def default_rows(self) -> int:
        return max(1, READ_BLOCK_BYTES // max(self.row_bytes, 1))

    def blocks(self, rows: int | None = None):
        raise NotImplementedError

    def _slices(self, rows: int | None):
        """The row slices of blocks of at most ``rows`` rows (default: :meth:`default_rows`)."""
        rows = rows or self.default_rows()
        return [slice(start, min(start + rows, len(self))) for start in range(0, len(self), rows)]

    def read(self) -> np.ndarray:
        parts = [b for _, b in self.blocks()]
        return np.concatenate(parts) if parts else np.zeros(self.shape, self.dtype)

    def _damaged(self, what: str) -> FeatureFileError:
        return FeatureFileError(f"{self.path} is damaged: {what}; save the array again (np.save / np.savez / "
                                "torch.save)")


class _InMemory(ArrayFile):
    """An array already in memory, behind the same interface (blocks are views)."""

    def __init__(self, array: np.ndarray, path: Path | None = None):
        super().__init__(path or Path("<array>"), array.shape, array.dtype)
        self._a = array

    def blocks(self, rows=None):
        for sl in self._slices(rows):
            yield sl, self._a[sl]

    def read(self):
        return self._a


class _Mapped(ArrayFile):
    """An array stored raw at ``offset`` of a file (.npy, or an uncompressed .npz member), memory-mapped.
    Each block is copied out and its pages are then released (``MADV_DONTNEED``), so the resident set holds
    one block, not the file. ``crc`` = (start, header_end, expected CRC-32) checks a zip member's CRC when
    the blocks are read through to the end."""

    def __init__(self, path, shape, dtype, offset: int, fortran: bool, crc=None):
        super().__init__(path, shape, dtype)
        self.offset, self.fortran, self.crc = offset, fortran, crc

    def blocks(self, rows=None):
        nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        if nbytes == 0:
            for sl in self._slices(rows):
                yield sl, np.zeros((sl.stop - sl.start,) + self.shape[1:], self.dtype)
            return
        with open(self.path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            view = np.ndarray(self.shape, self.dtype, buffer=mm, offset=self.offset,
                              order="F" if self.fortran else "C")
            crc = None
            if self.crc is not None and not self.fortran:
                crc = zlib.crc32(mm[self.crc[0]:self.crc[1]])
            page, released = mmap.PAGESIZE, 0
            for sl in self._slices(rows):
                block = np.array(view[sl])
                if crc is not None:
                    crc = zlib.crc32(block.data, crc)
                if not self.fortran and hasattr(mm, "madvise"):
                    end = (self.offset + sl.stop * self.row_bytes) // page * page
                    if end > released:
                        mm.madvise(mmap.MADV_DONTNEED, released, end - released)
                        released = end
                yield sl, block
            if crc is not None and crc != self.crc[2]:
                raise self._damaged("its CRC-32 does not match the archive's record")
            del view
        finally:
            with contextlib.suppress(BufferError):
                mm.close()


class _Stream(ArrayFile):
    """A compressed .npz member, decompressed as a stream one block at a time (zipfile checks its CRC at the
    end). Arrays saved in Fortran order cannot be cut into rows from a stream and are read whole."""

    def __init__(self, path, shape, dtype, member: str, fortran: bool):
        super().__init__(path, shape, dtype)
        self.member, self.fortran = member, fortran

    def blocks(self, rows=None):
        rows = rows or self.default_rows()
        try:
            with zipfile.ZipFile(self.path) as zf, zf.open(self.member) as f:
                _read_npy_header(f)
                if self.fortran:
                    whole = np.lib.format.read_array(f, allow_pickle=False)  # noqa: rows are not contiguous
                    yield from _InMemory(whole).blocks(rows)
                    return
                for sl in self._slices(rows):
                    want = (sl.stop - sl.start) * self.row_bytes
                    data = f.read(want)
                    if len(data) != want:
                        raise self._damaged(f"member {self.member} ends after row {sl.start}")
                    yield sl, np.frombuffer(data, self.dtype).reshape((sl.stop - sl.start,) + self.shape[1:]).copy()
        except FeatureFileError:
            raise
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as e:
            raise self._damaged(str(e)) from None


class _Tensor(ArrayFile):
    """A tensor from a .pt file (memory-mapped where the file allows it); bfloat16/float16 become float32
    one block at a time."""

    def __init__(self, path, tensor):
        import torch

        dtype = torch.float32 if tensor.dtype in (torch.bfloat16, torch.float16) else tensor.dtype
        super().__init__(path, tuple(tensor.shape), torch.empty(0, dtype=dtype).numpy().dtype)
        self._t, self._dtype = tensor, dtype

    def blocks(self, rows=None):
        for sl in self._slices(rows):
            yield sl, self._t[sl].detach().to(self._dtype).numpy().copy()


def open_array(path: str | os.PathLike, key: str | None = None, default_keys=("features",)) -> ArrayFile:
    """Open one array of a .npy, .npz or .pt file (a tensor, or a dict of tensors, loaded weights_only) for
    reading in row blocks. The header is checked now: a missing, empty, truncated or damaged file, a
    directory, a pickle (object array) or an unknown suffix raises :class:`FeatureFileError` naming the file
    and what to do. ``.npy`` files and uncompressed ``.npz`` members are memory-mapped; compressed ``.npz``
    members are decompressed as a stream; ``.pt`` files are memory-mapped by torch where their format allows."""
    path = Path(path)
    if not path.exists():
        raise FeatureFileError(f"{path} does not exist; pass the path of a .npy, .npz or .pt file")
    if path.is_dir():
        raise FeatureFileError(f"{path} is a folder, not a file; pass the .npy, .npz or .pt file inside it")
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".npz", ".pt", ".pth"):
        raise FeatureFileError(f"{path}: unsupported file type {suffix!r}; save the array as .npy, .npz or .pt")
    try:
        size = path.stat().st_size
        if size == 0:
            raise FeatureFileError(f"{path} is empty (0 bytes), probably an interrupted save; save the array "
                                   "again")
        if suffix == ".npy":
            return _open_npy(path, size)
        if suffix == ".npz":
            return _open_npz(path, key, default_keys)
        return _open_pt(path, key, default_keys)
    except OSError as e:
        raise FeatureFileError(f"{path} could not be read ({e.strerror or e}); check that it exists and is "
                               "readable") from None


def load_array(path: str | os.PathLike, key: str | None = None, default_keys=("features",)) -> np.ndarray:
    """Read one array from .npy, .npz or .pt whole (see :func:`open_array` for the checks)."""
    return open_array(path, key, default_keys).read()


_PICKLE_CURE = ("hubtune does not unpickle data files (pickles can run code); save a numeric array, e.g. "
                "np.save(path, np.asarray(x, dtype=np.float32))")


def _read_npy_header(f) -> tuple[tuple, bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        shape, fortran, dtype = np.lib.format._read_array_header(f, version)
    return shape, fortran, dtype


def _check_header(path: Path, shape, dtype, what: str = "") -> None:
    if dtype.hasobject:
        raise FeatureFileError(f"{path}{what} holds Python objects (a pickled object array); {_PICKLE_CURE}")
    if len(shape) == 0:
        raise FeatureFileError(f"{path}{what} holds a single number, not an array of rows; save an (n,) or "
                               "(n, D) array")


def _open_npy(path: Path, size: int) -> ArrayFile:
    try:
        with open(path, "rb") as f:
            shape, fortran, dtype = _read_npy_header(f)
            offset = f.tell()
    except (ValueError, EOFError) as e:
        raise FeatureFileError(f"{path} is not a readable .npy file ({e}); it is truncated or not written by "
                               "np.save: save the array again") from None
    _check_header(path, shape, dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if size < offset + nbytes:
        raise FeatureFileError(f"{path} is truncated: its header promises {nbytes} bytes of data for shape "
                               f"{shape} but the file holds {size - offset}; save the array again")
    return _Mapped(path, shape, dtype, offset, fortran)


def _open_npz(path: Path, key, default_keys) -> ArrayFile:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, EOFError, ValueError) as e:
        raise FeatureFileError(f"{path} is not a readable .npz archive ({e}); it is truncated or damaged: save "
                               "it again with np.savez") from None
    with zf:
        members = {n[:-4]: n for n in zf.namelist() if n.endswith(".npy")}
        if not members:
            raise FeatureFileError(f"{path} holds no arrays; save it with np.savez(path, features=..., labels=...)")
        name = _pick_key(path, list(members), key, default_keys)
        info = zf.getinfo(members[name])
        what = f" (array {name!r})"
        try:
            with zf.open(info) as f:
                shape, fortran, dtype = _read_npy_header(f)
                header_len = f.tell()
            _check_header(path, shape, dtype, what)
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if info.file_size < header_len + nbytes:
                raise FeatureFileError(f"{path}{what} is truncated; save the archive again")
            if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 1:
                return _Stream(path, shape, dtype, info.filename, fortran)
            with open(path, "rb") as raw:  # the member's data starts after its local header
                raw.seek(info.header_offset)
                local = raw.read(30)
            if len(local) != 30 or local[:4] != b"PK\x03\x04":
                raise FeatureFileError(f"{path}{what}: the archive is damaged; save it again")
            start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + \
                int.from_bytes(local[28:30], "little")
            return _Mapped(path, shape, dtype, start + header_len, fortran,
                           crc=(start, start + header_len, info.CRC))
        except FeatureFileError:
            raise
        except (zipfile.BadZipFile, zlib.error, EOFError, ValueError) as e:
            raise FeatureFileError(f"{path}{what} cannot be read ({e}); the archive is truncated or damaged: "
                                   "save it again") from None


def _open_pt(path: Path, key, default_keys) -> ArrayFile:
    import pickle
    import warnings

    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = _torch_load(torch, path)
    except pickle.UnpicklingError:
        raise FeatureFileError(f"{path} holds objects other than tensors; hubtune loads .pt files with "
                               "weights_only=True for safety: torch.save a tensor or a dict of tensors") from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as e:
        first = str(e).splitlines()[0].split(". ")[0] if str(e) else type(e).__name__
        raise FeatureFileError(f"{path} is not a readable PyTorch file ({first}); it is truncated or damaged: "
                               "save it again with torch.save") from None
    if isinstance(obj, dict):
        obj = obj[_pick_key(path, [str(k) for k in obj], key, default_keys)]
    if not isinstance(obj, torch.Tensor):
        raise FeatureFileError(f"{path} holds a {type(obj).__name__}, not a tensor; save a tensor or a dict "
                               "of tensors")
    if obj.ndim == 0:
        raise FeatureFileError(f"{path} holds a single number, not an array of rows; save an (n,) or (n, D) "
                               "tensor")
    return _Tensor(path, obj)


def _torch_load(torch, path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)  # the legacy format cannot be mapped


def _pick_key(path: Path, keys: list[str], key: str | None, default_keys) -> str:
    if key is not None:
        if key not in keys:
            raise InputError(f"{path} has no array {key!r}; it holds {', '.join(keys)}")
        return key
    for k in default_keys:
        if k in keys:
            return k
    if len(keys) == 1:
        return keys[0]
    raise InputError(f"{path} holds several arrays ({', '.join(keys)}); name one with --features-key/--labels-key")


def read_settings(config, allowed, what: str, allowed_text: str | None = None) -> dict:
    """``None``, a dict, or a path to a YAML (or JSON) file of ``what`` settings -> a dict whose keys (``-`` read as
    ``_``) are all in ``allowed``; anything else is a :class:`~hubtune.errors.ConfigError` naming the file and the
    unknown keys (and ``allowed_text``, default: the allowed keys). ``hubtune tune --config`` and ``hubtune
    autodistill --config`` read their files with it."""
    from .errors import ConfigError

    if config is None:
        return {}
    if isinstance(config, (str, Path)):
        path = Path(config)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist; pass a YAML file of {what} settings")
        import yaml

        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        where = str(path)
    else:
        data, where = config, "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping of settings, got {type(data).__name__}")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(unknown)}; allowed: "
                          f"{allowed_text or ', '.join(allowed)}")
    return data


def pyplot(what: str):
    """``matplotlib.pyplot`` on the non-interactive Agg backend, or :class:`~hubtune.errors.MissingExtraError`
    naming the ``plot`` extra and ``what`` needed it."""
    from .errors import MissingExtraError

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingExtraError("matplotlib", "plot", what) from None
    return plt


def save_png(fig, path, dpi: int = 100) -> Path:
    """Write the matplotlib figure ``fig`` to ``path`` as a PNG through :func:`atomic_path`, and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        plt.close(fig)
    return path
