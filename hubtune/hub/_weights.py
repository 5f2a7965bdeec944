"""Safe loading, content hashes and Hugging Face cache look-ups shared by the sources."""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch

from ..errors import InputError, ModelNotFoundError, WeightsNotAvailableError

_TRUE = {"1", "on", "yes", "true"}


def hf_offline() -> bool:
    """``HF_HUB_OFFLINE`` as set now (huggingface_hub reads it once at import; this reads it on every call)."""
    value = os.environ.get("HF_HUB_OFFLINE")
    if value is not None:
        return value.strip().lower() in _TRUE
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache as set now: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else the default."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def cure_text(local_hint: str = "local-dir:PATH or file:PATH::ARCH") -> str:
    return (
        "Cure: run once with network access to fill the cache (unset HF_HUB_OFFLINE or set HF_HUB_OFFLINE=0), "
        f"point HF_HUB_CACHE at a cache that holds it, or use {local_hint} with a local copy"
    )


def hf_cached_file(repo_id: str, filenames: list[str], revision: str | None = None) -> Path | None:
    """The first of ``filenames`` present in the HF cache for ``repo_id``, without touching the network."""
    from huggingface_hub import try_to_load_from_cache

    for filename in filenames:
        hit = try_to_load_from_cache(repo_id, filename, cache_dir=str(hf_cache_dir()), revision=revision)
        if isinstance(hit, str):
            return Path(hit)
    return None


def hf_file(spec: str, repo_id: str, filenames: list[str], revision: str | None = None, what: str = "weights") -> Path:
    """Resolve one of ``filenames`` from ``repo_id``: the cache first, then (unless offline) the Hub."""
    hit = hf_cached_file(repo_id, filenames, revision)
    if hit is not None:
        return hit
    cache = hf_cache_dir()
    tried = f"{' / '.join(filenames)} of {repo_id}" + (f"@{revision}" if revision else "")
    if hf_offline():
        raise WeightsNotAvailableError(
            f"{spec}: {what} not available offline: looked for {tried} in the Hugging Face cache {cache} "
            f"and HF_HUB_OFFLINE is set. {cure_text()}"
        )
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    for filename in filenames:
        try:
            return Path(huggingface_hub.hf_hub_download(repo_id, filename, revision=revision, cache_dir=str(cache)))
        except Exception as e:
            # a failed connection raises LocalEntryNotFoundError, a subclass of EntryNotFoundError: test it first,
            # so "could not reach the Hub" is never reported as "the repository lacks the file"
            if is_network_error(e):
                raise WeightsNotAvailableError(
                    f"{spec}: could not reach the Hugging Face Hub to fetch {filename} of {repo_id} (the network is "
                    f"unreachable: {type(e).__name__}: {' '.join(str(e).split())[:200]}), and it is not in the "
                    f"Hugging Face cache {cache}; this does not mean the repository lacks the file. Cure: connect "
                    "to the network and run again, set HF_HUB_OFFLINE=1 to work from the cache only, or use "
                    "local-dir:PATH or file:PATH::ARCH with a local copy"
                ) from None
            if isinstance(e, (RepositoryNotFoundError, RevisionNotFoundError)):
                raise ModelNotFoundError(
                    f"{spec}: the Hugging Face Hub has no repository {repo_id!r}"
                    + (f" at revision {revision!r}" if revision else "")
                    + f" ({type(e).__name__}); check the spelling, or log in (hf auth login) if it is private"
                ) from None
            if isinstance(e, EntryNotFoundError):
                continue
            raise WeightsNotAvailableError(  # HTTP 5xx and the like
                f"{spec}: could not fetch {filename} of {repo_id} ({type(e).__name__}: {e}); "
                f"looked in the Hugging Face cache {cache} first. {cure_text()}"
            ) from None
    raise WeightsNotAvailableError(
        f"{spec}: the repository {repo_id} has none of {', '.join(filenames)}; a timm-format repo holds "
        "config.json and model.safetensors (or pytorch_model.bin)"
    )


def is_network_error(e: BaseException) -> bool:
    """True when ``e`` says the Hub (or any host) could not be reached, rather than that a file is absent."""
    import socket
    import urllib.error

    from huggingface_hub.errors import LocalEntryNotFoundError

    if isinstance(e, (LocalEntryNotFoundError, ConnectionError, TimeoutError, socket.gaierror, socket.timeout)):
        return True
    if isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError):
        return True
    for cls in type(e).__mro__:  # httpx(2) / requests transport errors, without importing them
        root, name = cls.__module__.split(".")[0], cls.__name__
        if (root in ("httpx", "httpx2") and name in ("TransportError", "TimeoutException")) or \
                (root == "requests" and name in ("ConnectionError", "Timeout")):
            return True
    return False


def check_weights_file(path: str | os.PathLike, spec: str) -> None:
    """Refuse an empty or truncated ``.safetensors`` file before it is loaded: the 8-byte header length, a
    JSON header of that length, and data running to the end offset the header promises."""
    path = Path(path)
    if not path.is_file():
        raise WeightsNotAvailableError(f"{spec}: weights file {path} does not exist; give the path of a local file")
    size = path.stat().st_size
    if size == 0:
        raise InputError(f"{spec}: the weights file {path} is empty; save or download it again")
    if not (path.suffix == ".safetensors" or _is_safetensors(path)):
        return
    import json

    def damaged(why: str) -> InputError:
        return InputError(f"{spec}: {path} is not a whole safetensors file ({why}); it is truncated or damaged: "
                          "save or download it again")

    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise damaged(f"{size} bytes, shorter than the 8-byte header length")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise damaged(f"the header claims {n} bytes but the file holds {size - 8} after the length")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, ValueError) as e:
            raise damaged(f"the header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise damaged("the header is not a JSON object")
    end = 0
    for name, t in header.items():
        if name == "__metadata__":
            continue
        offs = t.get("data_offsets") if isinstance(t, dict) else None
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) for o in offs)):
            raise damaged(f"tensor {name!r} has no valid data_offsets")
        end = max(end, offs[1])
    if 8 + n + end > size:
        raise damaged(f"the tensors need {8 + n + end} bytes but the file holds {size}")


def load_state_dict(path: str | os.PathLike, spec: str) -> dict[str, torch.Tensor]:
    """Load a state dict safely: safetensors for ``.safetensors``, ``torch.load(weights_only=True)`` otherwise.

    A checkpoint that wraps the weights (``{"state_dict": ...}``, ``{"model": ...}``) is unwrapped and a
    DataParallel ``module.`` prefix is stripped.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsNotAvailableError(f"{spec}: weights file {path} does not exist; give the path of a local file")
    check_weights_file(path, spec)
    if path.suffix == ".safetensors" or _is_safetensors(path):
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # SafetensorError and friends: a damaged file
            raise InputError(f"{spec}: {path} could not be read as safetensors ({type(e).__name__}: "
                             f"{' '.join(str(e).split())[:300]}); it is truncated or damaged: save or download "
                             "it again") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError(
            f"{spec}: {path} could not be loaded safely with torch.load(weights_only=True) ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); hubtune never unpickles arbitrary objects. Cure: re-save "
            "it as a plain state dict, ideally with safetensors.torch.save_file"
        ) from None
    for key in ("state_dict", "model", "module", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(f"{spec}: {path} does not hold a state dict (a dict of tensors); save model.state_dict()")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _is_safetensors(path: Path) -> bool:
    # HF cache blobs have no suffix; a safetensors file starts with an 8-byte header length then '{'
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000


_HASHES: dict[tuple[str, int, int], str] = {}
_SHA = re.compile(r"^[0-9a-f]{64}$")
#: the memo file, under the hubtune cache root: {"<real path>": [size, mtime_ns, sha256], ...}
MEMO_NAME = "weights-sha256.json"


def memo_path() -> Path:
    from .._io import default_cache_dir

    return default_cache_dir() / MEMO_NAME


def _read_memo(path: Path) -> dict:
    try:
        memo = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return memo if isinstance(memo, dict) else {}


def _remember(real: Path, size: int, mtime_ns: int, digest: str) -> None:
    """Add one hash to the memo file (read, merge, atomic rewrite). A memo that cannot be written costs only
    a re-hash next time, so failures are ignored."""
    from .._io import atomic_write_text

    path = memo_path()
    try:
        memo = _read_memo(path)
        memo[str(real)] = [size, mtime_ns, digest]
        atomic_write_text(path, json.dumps(memo, indent=0, sort_keys=True))
    except Exception:  # noqa: BLE001 - a read-only or full cache folder: the memo is only an optimisation
        pass


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's content, memoised by (real path, size, mtime) in memory and in the memo file
    ``weights-sha256.json`` of the cache root, so a second ``hubtune rank`` of a large hub hashes nothing.
    An HF cache blob is named by that sha256 already (LFS), so it is reused."""
    real = Path(path).resolve()
    if real.parent.name == "blobs" and _SHA.match(real.name):
        return real.name
    st = real.stat()
    key = (str(real), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        got = _read_memo(memo_path()).get(str(real))
        if (isinstance(got, list) and len(got) == 3 and got[:2] == [st.st_size, st.st_mtime_ns]
                and isinstance(got[2], str) and _SHA.match(got[2])):
            _HASHES[key] = got[2]
        else:
            h = hashlib.sha256()
            with open(real, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            _HASHES[key] = h.hexdigest()
            _remember(real, st.st_size, st.st_mtime_ns, _HASHES[key])
    return _HASHES[key]


def state_dict_sha256(module: torch.nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a module's state dict (for weights not from a file)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
