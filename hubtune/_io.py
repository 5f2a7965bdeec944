"""File helpers: every file hubtune writes goes to a temporary name first and is renamed into place."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .errors import InputError, OutputError


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once, at import: os.umask can only be read by setting it


def _umask() -> int:
    return _UMASK


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; on a clean exit it is renamed onto ``path``, on any error
    (a full disk, an interrupt) it is removed, so nothing half-written is ever left under either name.

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
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise _output_error(path, e) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _output_error(path: Path, e: OSError) -> OutputError:
    why = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
           errno.EFBIG: "the file is larger than this process may write (ulimit -f)",
           errno.EACCES: "permission denied", errno.EPERM: "permission denied",
           errno.EROFS: "the file system is read-only"}.get(e.errno, e.strerror or str(e))
    return OutputError(f"could not write {path}: {why}; free space or choose a writable location "
                       "(--out / --cache-dir), then run the same command again")


def check_writable(folder: str | os.PathLike, need_bytes: int = 0) -> Path:
    """Fail early, before any work, when ``folder`` (created if missing) cannot take a file of
    ``need_bytes``: raises :class:`OutputError` naming the folder and the cure."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".hubtune-write-check.", suffix=".tmp")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise _output_error(folder, e) from None
    if need_bytes:
        free = shutil.disk_usage(folder).free
        if free < need_bytes:
            raise OutputError(f"{folder} has {free / 1e6:.1f} MB free but this run needs about "
                              f"{need_bytes / 1e6:.1f} MB; free space or choose another location")
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

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


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


def load_array(path: str | os.PathLike, key: str | None = None, default_keys=("features",)) -> np.ndarray:
    """Read one array from .npy, .npz or .pt (a tensor, or a dict of tensors, loaded weights_only)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist; pass the path of a .npy, .npz or .pt file")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            return np.asarray(z[_pick_key(path, list(z.keys()), key, default_keys)])
    if suffix in (".pt", ".pth"):
        import torch

        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, dict):
            obj = obj[_pick_key(path, list(obj), key, default_keys)]
        if not hasattr(obj, "numpy"):
            raise InputError(f"{path} holds a {type(obj).__name__}, not a tensor; save a tensor or a dict of tensors")
        obj = obj.detach().cpu()
        return (obj.float() if obj.dtype in (torch.bfloat16, torch.float16) else obj).numpy()
    raise InputError(f"{path}: unsupported file type {suffix!r}; use .npy, .npz or .pt")


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
