"""Ray core tasks for work that outgrows one process: the one place hubtune talks to Ray.

Ray is an optional extra (``pip install 'hubtune[ray]'``) and is imported only when asked for, so
``import hubtune`` never pays for it. Two functions carry everything the ranking needs:

- :func:`connect` joins a cluster (``"auto"``, ``"HOST:PORT"``, ``"ray://..."``) or starts a private local
  instance that listens on the loopback address only, and says whether it started it, so the caller shuts
  down only what it started.
- :func:`map_tasks` runs ``fn(item)`` as one Ray task per item with retries, reports each task as it
  finishes (progress) and returns the results in the order of the items, so the driver can merge
  accumulators in a fixed order and equal the single-process result exactly.

Why loopback needs work: Ray 2.60 rewrites ``ray.init(_node_ip_address="127.0.0.1")`` to the machine's
interface address (``services.resolve_ip_for_localhost``), and its servers (GCS, raylet, every worker) bind
all interfaces (``::``) unless the node address is loopback. The only switch that keeps the node address on
loopback on Linux is ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (what Ray itself does on laptops, where it
reads ``ray_constants.ENABLE_RAY_CLUSTER``). :func:`connect` sets it just for the start of its own local
instance (the processes it spawns inherit it) and then checks that the GCS address is loopback, so a Ray
upgrade that changes this fails loudly instead of listening on the network.
"""
from __future__ import annotations

import contextlib
import ipaddress
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal

from .errors import HubtuneError, InputError, MissingExtraError

__all__ = ["RayConnection", "TaskFailedError", "connect", "import_ray", "map_tasks"]

_NOTHING = object()


class TaskFailedError(HubtuneError, RuntimeError):
    """A Ray task still failed after its retries; ``item`` and ``index`` say which, ``cause`` why."""

    def __init__(self, item: Any, index: int, max_retries: int, cause: BaseException):
        self.item, self.index, self.max_retries, self.cause = item, index, max_retries, cause
        super().__init__(
            f"the Ray task for item {index} ({_short(item)}) failed and its retries are spent "
            f"(max_retries={max_retries}): "
            f"{type(cause).__name__}: {_first_line(cause)}. The work of the tasks that finished is kept "
            "(cached); fix the cause and run again, or allow more attempts (max_retries)."
        )


def import_ray():
    """The ``ray`` module, or :class:`MissingExtraError` naming the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise MissingExtraError("ray", "ray", "the Ray backend") from None
    return ray


@dataclass
class RayConnection:
    """What :func:`connect` joined. ``started`` is true when hubtune started this instance itself, so
    :meth:`shutdown` (and leaving a ``with`` block) stops it; a cluster that was there already is left alone."""

    started: bool
    address: str

    def shutdown(self) -> None:
        if self.started:
            import_ray().shutdown()
            self.started = False

    def __enter__(self) -> RayConnection:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


@contextlib.contextmanager
def _loopback_start():
    """Make a starting local instance take 127.0.0.1 as its node address (see the module docstring).

    The environment variable reaches the processes Ray spawns (GCS, raylet, agents, workers); the constant is
    patched because this process read the variable when it imported ray. Both are restored afterwards so a
    later connection to a real cluster from this process advertises the interface address again."""
    from ray._private import ray_constants

    env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_USAGE_STATS_ENABLED": os.environ.get("RAY_USAGE_STATS_ENABLED", "0")}
    saved_env = {k: os.environ.get(k) for k in env}
    saved_flag = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)  # gone in a later Ray: connect() says so
    os.environ.update(env)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if saved_flag is None:
            del ray_constants.ENABLE_RAY_CLUSTER
        else:
            ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def connect(address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None,
            temp_dir: str | None = None, runtime_env: dict | None = None, **init_kwargs) -> RayConnection:
    """Join Ray: the instance this process already has, a cluster, or a new private local instance.

    ``address`` None starts a local instance bound to 127.0.0.1 only (no dashboard, no usage stats), even when
    ``RAY_ADDRESS`` is set or another local cluster runs: ``hubtune rank --backend ray`` on a laptop must not
    open ports on the network or borrow someone else's cluster. ``"auto"`` finds a running cluster the Ray way
    (``RAY_ADDRESS``, then the last ``ray start`` on this machine); ``"HOST:PORT"`` or ``"ray://HOST:PORT"``
    names one. ``num_cpus``, ``num_gpus``, ``temp_dir`` (keep it short: Ray's socket paths have a length
    limit) and ``init_kwargs`` apply to a local start only; ``runtime_env`` to both.
    """
    ray = import_ray()
    if ray.is_initialized():
        return RayConnection(started=False, address=_gcs_address(ray, address))
    if address is not None:
        try:
            ray.init(address=address, runtime_env=runtime_env)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise InputError(
                f"cannot connect to the Ray cluster at {address!r}: {_first_line(exc)}. Start one with "
                "`ray start --head`, give its address (HOST:PORT or ray://HOST:PORT), or leave the address "
                "out to run a local instance."
            ) from exc
        return RayConnection(started=False, address=_gcs_address(ray, address))

    if temp_dir is not None:
        init_kwargs["_temp_dir"] = str(temp_dir)
    with _loopback_start():
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, runtime_env=runtime_env,
                 include_dashboard=False, **init_kwargs)
    gcs = ray.get_runtime_context().gcs_address
    if not _is_loopback(gcs.rsplit(":", 1)[0]):
        ray.shutdown()
        raise HubtuneError(
            f"the local Ray instance came up on {gcs}, not on the loopback address: this Ray version ignores "
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0. Install ray==2.60.*, or start a cluster yourself "
            "(`ray start --head --node-ip-address ...`) and pass its address."
        )
    return RayConnection(started=True, address=gcs)


def map_tasks(fn: Callable, items: Iterable, *, shared: Any = _NOTHING, max_retries: int = 2,
              num_cpus: float = 1, num_gpus: float = 0, runtime_env: dict | None = None,
              on_result: Callable[[int, Any], None] | None = None,
              on_error: Literal["raise", "collect"] = "raise") -> list:
    """Run ``fn(item)`` (or ``fn(shared, item)``) as one Ray task per item; results in the order of ``items``.

    - ``fn`` must be a module-level function in a module the workers can import (hubtune itself: it is
      installed in the same environment; on a remote cluster ship it with ``runtime_env``).
    - ``shared`` (a dataset, a config) is put in the object store once and every task receives the value, not
      one copy per task.
    - A task whose worker dies (killed, out of memory) or whose ``fn`` raises is run again, up to
      ``max_retries`` more times, so ``fn`` must be safe to repeat (write through the cache, atomically).
    - ``on_result(index, result)`` is called in the driver as each task finishes, in completion order: it is
      for progress. The returned list is in item order whatever the completion order, so merging it is
      deterministic.
    - A task that fails every attempt raises :class:`TaskFailedError` naming the item and cancels the tasks
      not yet finished; with ``on_error="collect"`` its slot holds that error instead (and ``on_result`` sees
      it), and the other tasks carry on.

    Ray must be connected first (:func:`connect`): an implicit ``ray.init`` would listen on every interface.
    """
    if on_error not in ("raise", "collect"):
        raise InputError(f"on_error must be 'raise' or 'collect', not {on_error!r}")
    if max_retries < 0:
        raise InputError(f"max_retries must be 0 or more, not {max_retries}")
    ray = import_ray()
    if not ray.is_initialized():
        raise HubtuneError("Ray is not connected: call hubtune._ray.connect() (or ray.init) before map_tasks.")
    items = list(items)
    task = ray.remote(fn).options(max_retries=max_retries, retry_exceptions=True, num_cpus=num_cpus,
                                  num_gpus=num_gpus, runtime_env=runtime_env)
    args = () if shared is _NOTHING else (ray.put(shared),)
    pending = {task.remote(*args, item): i for i, item in enumerate(items)}
    results: list = [None] * len(items)
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(done[0])
            try:
                results[i] = ray.get(done[0])
            except ray.exceptions.RayError as exc:
                cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) and exc.cause else exc
                error = TaskFailedError(items[i], i, max_retries, cause)
                if on_error == "raise":
                    raise error from cause
                results[i] = error
            if on_result is not None:
                on_result(i, results[i])
    finally:
        for ref in pending:  # an error, Ctrl-C or a failing callback: do not leave work running
            with contextlib.suppress(Exception):  # never hide the error that brought us here
                ray.cancel(ref)
    return results


def _gcs_address(ray, fallback: str | None) -> str:
    try:
        return ray.get_runtime_context().gcs_address
    except Exception:  # a Ray Client (ray://) session may not expose it
        return fallback or ""


def _is_loopback(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return host == "localhost"
    return ip.is_loopback or bool(getattr(ip, "ipv4_mapped", None) and ip.ipv4_mapped.is_loopback)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "(no message)"


def _short(item: Any, width: int = 120) -> str:
    text = repr(item)
    return text if len(text) <= width else text[: width - 3] + "..."
