"""A teacher as a Ray Serve application: the service side of :mod:`hubtune.serving.client`.

Importing this module needs Ray Serve (``pip install 'hubtune[ray]'``); :mod:`hubtune.serving` imports it only
when one of its names is used.

* :class:`TeacherDeployment` is a plain ``@serve.deployment``: ``TeacherDeployment.bind(spec)`` and
  ``serve.run(...)`` work as for any Serve deployment. Each replica loads the teacher once (a hub spec, or the
  folder ``hubtune tune`` wrote), puts it in eval mode and answers float32 batches that are *already in the
  teacher's input view* (the client adapts them with an :class:`~hubtune.tuning.models.InputAdapter` built from
  the published data config) with ``{"logits": float32 (n, C), "identity": str, "replica": str}``; its
  ``features`` method answers the penultimate features the same way (``{"features": float32 (n, D), ...}``,
  :func:`~hubtune.tuning.models.penultimate_features`, exactly what ``hubtune rank`` extracts), which B-Tuning
  projects and SSLD deduplicates with. Requests are batched by ``@serve.batch`` (``max_batch`` rows' worth of requests per forward pass), run under
  ``torch.inference_mode``, in bf16 autocast only on a CUDA device that supports bf16 (``precision="auto"``;
  fp32 on CPU). ``identity`` is :func:`~hubtune.tuning.teachers.teacher_view_key` of the weights identity and
  the data config: what a student pins, and what a cache of the same teacher is keyed by.
* :func:`serve_teacher`, :func:`list_teachers`, :func:`scale_teacher`, :func:`stop_teacher` manage such
  applications; :class:`RayServeTransport` is the client's :class:`~hubtune.serving.client.Transport` over a
  Serve ``DeploymentHandle``.

Loopback and HTTP: teachers are reached through deployment handles only, so Serve is started with
``proxy_location="Disabled"`` (no HTTP or gRPC proxy, so no port at all) and every application with
``route_prefix=None``. With ``address=None`` the Ray instance is a private one on 127.0.0.1
(:func:`hubtune._ray.connect`): the application then lives as long as this process. On a cluster where Serve
already runs, its own proxy settings are kept (Serve's options are cluster-wide).

Scaling, to zero included: ``Deployment.options(num_replicas=0)`` is refused by Serve 2.60 ("num_replicas is
expected to larger than 0"), but Serve's *external scaler* accepts any count >= 0 for an application deployed
with ``external_scaler_enabled=True``. :func:`serve_teacher` deploys that way and :func:`scale_teacher` makes
the call Serve's REST endpoint ``POST /api/v1/applications/{app}/deployments/{dep}/scale`` makes (the
controller's ``update_deployment_replicas``), so it needs no dashboard and no redeploy (the replicas that stay
are not restarted). At 0 replicas requests queue until a replica is back; the students' stall policy
(``on_stall``) decides what they do meanwhile.

Test hook (tests only; do not set it in production): ``HUBTUNE_TEST_SERVE_EXIT_AFTER=N`` in a replica's
environment makes it ``os._exit(1)`` when a batch of requests arrives that would take it past ``N`` answered
requests (those requests are lost with it, as in a real crash; counted per request, not per merged batch, so a
replica answers at most ``N`` whatever the batching). With ``HUBTUNE_TEST_SERVE_EXIT_ONCE=PATH`` also set, only the first replica
to get there (the one that creates ``PATH``) exits, so a test can kill one replica of two. Set them for a
deployment with ``serve_teacher(..., env={...})`` (Serve's ``ray_actor_options["runtime_env"]["env_vars"]``).
"""
from __future__ import annotations

import contextlib
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .._ray import RayConnection, _first_line, connect
from ..errors import InputError, MissingExtraError, TeacherServiceError
from .client import ReplicaError

try:
    import ray
    from ray import serve
except ImportError:  # the 'ray' extra is missing (Serve's own dependencies included)
    raise MissingExtraError("ray[serve]", "ray", "serving teachers on Ray Serve") from None

__all__ = ["TeacherDeployment", "serve_teacher", "list_teachers", "scale_teacher", "stop_teacher",
           "RayServeTransport", "ServedTeacher", "DEPLOYMENT_NAME", "teacher_spec", "default_name"]

#: the deployment's name inside each teacher application (Serve's default: the class name)
DEPLOYMENT_NAME = "TeacherDeployment"
EXIT_AFTER_ENV = "HUBTUNE_TEST_SERVE_EXIT_AFTER"
EXIT_ONCE_ENV = "HUBTUNE_TEST_SERVE_EXIT_ONCE"
PRECISIONS = ("auto", "fp32", "bf16")
_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def teacher_spec(spec) -> str:
    """The hub spec of a teacher given as a spec or as a folder (``hubtune tune --out``, timm format):
    a folder becomes ``local-dir:ABS``; ``local-dir:``/``file:`` paths are made absolute, so every replica
    (whatever its working directory) loads the same model and reports the same identity."""
    from ..hub import ModelSpec

    text = str(spec)
    if not text.strip():
        raise InputError("the teacher spec is empty: give a hub spec (resnet18, hf-hub:ORG/NAME, local-dir:PATH) "
                         "or the folder `hubtune tune --out` wrote")
    if isinstance(spec, Path) or (":" not in text.split("?")[0] and (os.sep in text or Path(text).is_dir())):
        if not Path(text).is_dir():
            raise InputError(f"teacher {text!r} is not a folder: give the folder `hubtune tune --out` wrote "
                             "(model.safetensors + config.json) or a hub spec")
        text = f"local-dir:{text}"
    return str(ModelSpec.parse(text).resolved())


def default_name(spec: str) -> str:
    """The application name a spec gets by default: the model's (or folder's) last name, in the characters
    Serve names and ``serve:NAME`` allow."""
    from ..hub import ModelSpec

    s = ModelSpec.parse(spec)
    base = s.arch if s.kind == "file" and getattr(s, "arch", None) else s.name
    base = re.split(r"[/\\]", str(base).rstrip("/\\"))[-1].split("@")[0]
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-.") or "teacher"
    return name[:100]


def _check_name(name) -> str:
    if not isinstance(name, str) or not _NAME_OK.match(name):
        raise InputError(f"teacher service name {name!r} is invalid: use letters, digits, '.', '_' and '-' "
                         "(at most 100, starting with a letter or digit)")
    return name


def _check_count(what: str, v, low: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) < low:
        raise InputError(f"{what}={v!r} is invalid: give a whole number >= {low}")
    return int(v)


# ----------------------------------------------------------------------------------------------- deployment
def _keep_replica_grpc_on_loopback() -> None:
    """On a loopback-only Ray, make this replica's inter-deployment gRPC server listen on 127.0.0.1.

    A Serve 2.60 replica starts that server on ``[::]:0`` (every interface; ``replica.py``, ``_on_initialized``,
    hard-coded) right after the deployment's ``__init__`` returns, whatever the node address, so a private
    loopback Ray would get a port open to the network. Called from ``__init__``, this rewrites the bind address
    of that one call to 127.0.0.1 when the node address is loopback (peers reach the replica at the node
    address, so nothing else changes); on a cluster with a real node address Serve's behaviour is kept. The
    tests check every socket of the replicas."""
    from .._ray import _is_loopback

    if not _is_loopback(ray.util.get_node_ip_address()):
        return
    from ray.serve._private import replica as serve_replica

    add_port = getattr(serve_replica, "add_port_to_grpc_server", None)
    if add_port is None or getattr(add_port, "hubtune_loopback", False):
        return

    def add_port_on_loopback(server, address):
        if isinstance(address, str) and address.startswith("[::]:"):
            address = "127.0.0.1:" + address[len("[::]:"):]
        return add_port(server, address)

    add_port_on_loopback.hubtune_loopback = True
    serve_replica.add_port_to_grpc_server = add_port_on_loopback


@serve.deployment(name=DEPLOYMENT_NAME, max_ongoing_requests=64)
class TeacherDeployment:
    """One replica of a served teacher (see the module docstring). ``spec``: a hub spec (resolved: use
    :func:`teacher_spec`); ``max_batch``: requests merged into one forward pass (``@serve.batch``);
    ``batch_wait_s``: how long the first request of a batch waits for others; ``precision``: ``auto`` (bf16
    autocast on CUDA with bf16 support, else fp32), ``fp32`` or ``bf16`` (refused where unsupported)."""

    def __init__(self, spec: str, max_batch: int = 32, batch_wait_s: float = 0.002, precision: str = "auto"):
        from ..tuning.models import module_identity
        from ..tuning.teachers import load_teacher, teacher_view_key

        _keep_replica_grpc_on_loopback()
        hm, cfg = load_teacher(spec, "teacher")
        self.spec = spec
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        bf16_ok = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        if precision == "bf16" and not bf16_ok:
            raise InputError(f"precision='bf16' needs a CUDA device with bf16; this replica runs on {self.device}")
        self.precision = "bf16" if (precision == "bf16" or (precision == "auto" and bf16_ok)) else "fp32"
        self.module = hm.module.eval().requires_grad_(False).to(self.device)
        self.data_config = dict(cfg) if cfg is not None else None
        self.identity = teacher_view_key(hm.identity or module_identity(hm.module), self.data_config)
        n = getattr(hm.module, "num_classes", None)
        self.num_classes = int(n) if isinstance(n, int) and not isinstance(n, bool) else None
        ctx = serve.get_replica_context()
        self.replica = str(ctx.replica_id.unique_id)
        self.max_batch = int(max_batch)
        for batcher in (self._batched, self._batched_features):
            batcher.set_max_batch_size(self.max_batch)
            batcher.set_batch_wait_timeout_s(float(batch_wait_s))
        self.model_identity = hm.identity
        width = getattr(hm.module, "head_hidden_size", None) or getattr(hm.module, "num_features", None)
        self.num_features = int(width) if isinstance(width, int) and not isinstance(width, bool) else None
        self._served = 0
        self._exit_after = int(os.environ.get(EXIT_AFTER_ENV) or 0)

    def info(self) -> dict:
        """What a student needs to use this teacher: ``identity``, ``data_config`` (build the input adapter
        from it), ``num_classes``, ``num_features`` (the penultimate width; None when the model does not say),
        ``spec``, ``model_identity`` (the weights identity alone); and ``replica``, ``device``, ``precision``, ``max_batch``."""
        return {"identity": self.identity, "data_config": self.data_config, "num_classes": self.num_classes,
                "spec": self.spec, "replica": self.replica, "device": str(self.device),
                "precision": self.precision, "max_batch": self.max_batch, "model_identity": self.model_identity,
                "num_features": self.num_features}

    async def __call__(self, x) -> dict:
        """``x``: a float32 (n, ...) batch in the teacher's input view (numpy or tensor); returns
        ``{"logits": float32 (n, C) numpy, "identity", "replica"}``."""
        logits = await self._batched(self._check_batch(x))
        return {"logits": logits, "identity": self.identity, "replica": self.replica}

    async def features(self, x) -> dict:
        """As ``__call__``, with the penultimate features: ``{"features": float32 (n, D) numpy, "identity",
        "replica"}``."""
        feats = await self._batched_features(self._check_batch(x))
        return {"features": feats, "identity": self.identity, "replica": self.replica}

    def _check_batch(self, x) -> torch.Tensor:
        if not torch.is_tensor(x):  # arrays from the object store are read-only: torch wants a writable one
            x = np.asarray(x)
            x = torch.from_numpy(x if x.flags.writeable else x.copy())
        if x.ndim < 2 or x.shape[0] == 0 or not x.is_floating_point():
            raise InputError(f"teacher {self.spec!r} got a {x.dtype} batch of shape {tuple(x.shape)}: send a "
                             "non-empty float32 (n, C, H, W) batch in the teacher's input view")
        want = (self.data_config or {}).get("input_size")
        if want is not None and x.ndim == 4 and tuple(x.shape[1:]) != tuple(int(v) for v in want):
            raise InputError(f"teacher {self.spec!r} expects inputs of shape {tuple(want)} (its data config) "
                             f"but got {tuple(x.shape[1:])}: adapt the batch to the teacher's input view first "
                             "(hubtune.tuning.models.InputAdapter(student_config, info()['data_config']))")
        return x.to(torch.float32)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def _batched(self, xs: list) -> list:
        return self._forward(xs, self.module)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def _batched_features(self, xs: list) -> list:
        from ..tuning.models import penultimate_features

        return self._forward(xs, lambda x: penultimate_features(self.module, x))

    def _forward(self, xs: list, fn) -> list:
        """``fn`` over the requests ``xs``, one forward pass per input shape; one float32 array per request."""
        self._maybe_exit(len(xs))
        self._served += len(xs)
        out: list = [None] * len(xs)
        groups: dict = {}
        for i, x in enumerate(xs):  # one forward pass per input shape
            groups.setdefault(tuple(x.shape[1:]), []).append(i)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16,
                                                    enabled=self.precision == "bf16"):
            for idx in groups.values():
                y = fn(torch.cat([xs[i] for i in idx]).to(self.device)).float().cpu().numpy()
                start = 0
                for i in idx:
                    n = xs[i].shape[0]
                    out[i], start = np.ascontiguousarray(y[start:start + n], dtype=np.float32), start + n
        return out

    def _maybe_exit(self, arriving: int) -> None:
        """The test hook (module docstring): die like a crashed replica when the ``arriving`` requests would take
        it past ``N`` answered ones."""
        if not self._exit_after or self._served + arriving <= self._exit_after:
            return
        marker = os.environ.get(EXIT_ONCE_ENV)
        if marker:
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:  # another replica was the one to die
                self._exit_after = 0
                return
        os._exit(1)


# ----------------------------------------------------------------------------------------------- management
@dataclass
class ServedTeacher:
    """What :func:`serve_teacher` deployed: the application ``name``, the teacher's ``info()`` and the Ray
    ``connection`` (``connection.started``: a private local Ray this process started, which ends with it;
    :meth:`stop` deletes the application and shuts such a Ray down)."""

    name: str
    info: dict
    connection: RayConnection
    replicas: int = 1
    extra: dict = field(default_factory=dict)

    def transport(self) -> "RayServeTransport":
        return RayServeTransport(self.name)

    def stop(self) -> None:
        stop_teacher(self.name)
        self.connection.shutdown()


def _connect(address):
    if address is not None and not isinstance(address, str):
        raise InputError(f"address={address!r} is invalid: give 'auto', HOST:PORT or ray://HOST:PORT, or None "
                         "for a private local Ray on 127.0.0.1")
    return connect(address)


def _start_serve() -> None:
    """Start Serve without proxies (handles only: nothing listens for HTTP/gRPC); keep a running Serve as is."""
    from ray.serve.context import _get_global_client

    if _get_global_client(raise_if_no_controller_running=False) is None:
        serve.start(proxy_location="Disabled")


def _status():
    """``{app name: ApplicationStatusOverview}`` of the teacher applications (those holding a
    ``TeacherDeployment``); empty when Serve does not run."""
    apps = serve.status().applications
    return {name: app for name, app in apps.items() if DEPLOYMENT_NAME in app.deployments}


def _running(app) -> int:
    states = app.deployments[DEPLOYMENT_NAME].replica_states
    return sum(int(n) for s, n in states.items() if str(getattr(s, "value", s)) == "RUNNING")


def _missing(name: str) -> TeacherServiceError:
    running = sorted(_status())
    listed = ", ".join(running) if running else "none"
    return TeacherServiceError(
        f"no teacher service named {name!r} on this Ray cluster (running teachers: {listed}). Start it with "
        f"`hubtune serve-teacher SPEC --name {name} --ray-address ...`, or give one of the running names")


def serve_teacher(spec, name: str | None = None, replicas: int = 1, max_batch: int = 32, address: str | None = None,
                  *, num_cpus: float = 1, num_gpus: float = 0, precision: str = "auto", batch_wait_s: float = 0.002,
                  env: dict | None = None) -> ServedTeacher:
    """Deploy ``spec`` (a hub spec or a ``hubtune tune`` output folder) as the Serve application ``name``
    (default: :func:`default_name`) with ``replicas`` replicas, each merging up to ``max_batch`` requests per
    forward pass and holding ``num_cpus``/``num_gpus``; returns once the replicas are up.

    ``address``: ``"auto"`` or ``HOST:PORT`` joins a running cluster (the application stays after this process
    exits; stop it with :func:`stop_teacher`); None uses this process's Ray or starts a private one on
    127.0.0.1, and the application then ends with this process. Deploying again under the same name replaces
    the application (Serve's rolling update). ``env``: environment variables for the replicas."""
    spec = teacher_spec(spec)
    name = _check_name(default_name(spec) if name is None else name)
    replicas = _check_count("replicas", replicas, 1)
    max_batch = _check_count("max_batch", max_batch, 1)
    if precision not in PRECISIONS:
        raise InputError(f"precision={precision!r} is unknown: give one of {', '.join(PRECISIONS)}")
    for what, v in (("num_cpus", num_cpus), ("num_gpus", num_gpus), ("batch_wait_s", batch_wait_s)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
            raise InputError(f"{what}={v!r} is invalid: give a number >= 0")
    if env is not None and not (isinstance(env, dict) and all(isinstance(k, str) and isinstance(v, str)
                                                               for k, v in env.items())):
        raise InputError(f"env={env!r} is invalid: give a dict of str -> str")
    conn = _connect(address)
    _start_serve()
    actor = {"num_cpus": num_cpus, "num_gpus": num_gpus}
    if env:
        actor["runtime_env"] = {"env_vars": dict(env)}
    app = TeacherDeployment.options(num_replicas=replicas, ray_actor_options=actor).bind(
        spec, max_batch=max_batch, batch_wait_s=batch_wait_s, precision=precision)
    try:
        handle = serve.run(app, name=name, route_prefix=None, external_scaler_enabled=True)
    except (RuntimeError, serve.exceptions.RayServeException) as exc:  # a replica failed to start
        with contextlib.suppress(Exception):  # leave no failed application behind
            serve.delete(name)
        raise TeacherServiceError(f"teacher service {name!r} ({spec}) did not start: {_first_line(exc)}. Check "
                                  "that the teacher loads here (`hubtune hub info SPEC`) and that the cluster has "
                                  "the CPUs/GPUs asked for (`ray status`)") from exc
    info = handle.info.remote().result(timeout_s=120)
    return ServedTeacher(name, info, conn, replicas)


def list_teachers(address: str | None = None) -> list[dict]:
    """The teacher applications on the cluster: ``[{"name", "status", "replicas" (running), "message"}]``,
    by name."""
    _connect(address)
    return [{"name": name, "status": str(getattr(app.status, "value", app.status)), "replicas": _running(app),
             "message": app.deployments[DEPLOYMENT_NAME].message or app.message}
            for name, app in sorted(_status().items())]


def scale_teacher(name: str, n: int, address: str | None = None, *, timeout_s: float | None = 120.0) -> int:
    """Set the number of replicas of teacher ``name`` to ``n`` (0 allowed: requests then wait, and students
    apply their stall policy) and wait up to ``timeout_s`` (None: do not wait) until that many run; returns the
    number running. See the module docstring for the Serve mechanism (the external scaler)."""
    n = _check_count("replicas", n, 0)
    _connect(address)
    if name not in _status():
        raise _missing(name)
    from ray.serve._private.common import DeploymentID
    from ray.serve.context import _get_global_client

    controller = getattr(_get_global_client(), "_controller", None)
    if controller is None or not hasattr(controller, "update_deployment_replicas"):  # pragma: no cover
        raise TeacherServiceError("this Ray Serve has no external scaling API (update_deployment_replicas): "
                                  "install ray[serve]==2.60.*")
    try:
        ray.get(controller.update_deployment_replicas.remote(DeploymentID(name=DEPLOYMENT_NAME, app_name=name), n))
    except ray.exceptions.RayTaskError as exc:
        raise TeacherServiceError(f"teacher service {name!r} cannot be scaled to {n}: "
                                  f"{_first_line(exc.cause or exc)}. Redeploy it with `hubtune serve-teacher`, "
                                  "which enables Serve's external scaler") from exc
    deadline = None if timeout_s is None else time.monotonic() + float(timeout_s)
    while True:
        app = _status().get(name)
        running = _running(app) if app is not None else 0
        if deadline is None or running == n:
            return running
        if time.monotonic() > deadline:
            raise TeacherServiceError(f"teacher service {name!r}: {running} replicas run {timeout_s:g} s after "
                                      f"asking for {n}; Serve keeps trying (are there enough CPUs/GPUs on the "
                                      "cluster? `ray status` says)")
        time.sleep(0.2)


def stop_teacher(name: str, address: str | None = None) -> None:
    """Delete the teacher application ``name`` (its replicas stop); a missing one is a
    :class:`~hubtune.errors.TeacherServiceError` listing the running teachers."""
    _connect(address)
    if name not in _status():
        raise _missing(name)
    serve.delete(name)


# ----------------------------------------------------------------------------------------------- transport
_REPLICA_DEATHS = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                   ray.exceptions.ObjectLostError, ray.exceptions.LocalRayletDiedError)


class _RayPending:
    """A request in flight: a Serve ``DeploymentResponse``; ``result`` may be called again after a timeout."""

    def __init__(self, response, name: str):
        self.response, self.name = response, name

    def result(self, timeout: float) -> dict:
        try:
            return self.response.result(timeout_s=max(0.0, float(timeout)))
        except TimeoutError:  # Serve's own, and ray.exceptions.GetTimeoutError (a TimeoutError)
            raise TimeoutError(f"no answer from teacher service {self.name!r} within {timeout:g} s") from None
        except _REPLICA_DEATHS as exc:
            raise ReplicaError(f"a replica of teacher service {self.name!r} died: {type(exc).__name__}: "
                               f"{_first_line(exc)}") from exc
        except ray.exceptions.RayTaskError as exc:  # the teacher raised (a bad batch): not retryable
            cause = exc.cause if exc.cause is not None else exc
            raise TeacherServiceError(f"teacher service {self.name!r} failed on a request: "
                                      f"{type(cause).__name__}: {_first_line(cause)}") from exc

    def cancel(self) -> None:
        self.response.cancel()


class RayServeTransport:
    """The :class:`~hubtune.serving.client.Transport` of a teacher served by :func:`serve_teacher`, over
    ``serve.get_app_handle(name)``. ``address``: ``"auto"`` or ``HOST:PORT``; None: the Ray this process has
    joined already, else ``"auto"`` (the cluster of ``RAY_ADDRESS`` or of the local ``ray start``, where
    ``hubtune serve-teacher`` deploys). ``output``: ``"logits"`` (the deployment's ``__call__``) or
    ``"features"`` (its ``features`` method). A missing service is a :class:`~hubtune.errors.TeacherServiceError`
    naming it and listing the running teachers."""

    def __init__(self, name: str, address: str | None = None, output: str = "logits"):
        from .client import OUTPUTS

        if output not in OUTPUTS:
            raise InputError(f"output={output!r} is unknown: give one of {', '.join(OUTPUTS)}")
        self.name, self.output = str(name), output
        self.connection = _connect(address if address is not None or ray.is_initialized() else "auto")
        if self.name not in _status():
            raise _missing(self.name)
        self.handle = serve.get_app_handle(self.name)

    def info(self, timeout: float = 120.0) -> dict:
        """The teacher's ``info()`` from one replica (identity, data_config, num_classes, spec, ...); a
        :class:`~hubtune.errors.TeacherServiceError` when no replica answers within ``timeout`` seconds."""
        try:
            return self.handle.info.remote().result(timeout_s=timeout)
        except TimeoutError:
            raise TeacherServiceError(
                f"teacher service {self.name!r} did not answer within {timeout:g} s ({self.replicas()} replicas "
                f"running): scale it up with `hubtune serve-teacher --scale {self.name} N`") from None
        except _REPLICA_DEATHS as exc:
            raise TeacherServiceError(f"a replica of teacher service {self.name!r} died while asked for its "
                                      f"info: {type(exc).__name__}: {_first_line(exc)}; try again") from exc

    def submit(self, x) -> _RayPending:
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy() if torch.is_tensor(x) else \
            np.ascontiguousarray(x, dtype=np.float32)
        call = self.handle.features if self.output == "features" else self.handle
        return _RayPending(call.remote(arr), self.name)

    def replicas(self) -> int:
        app = _status().get(self.name)
        return _running(app) if app is not None else 0
