import os

import numpy as np
import pytest
import torch


@pytest.fixture(params=["numpy", "numba"])
def backend(request):
    return request.param


def make_classification(n, d, classes, seed=0, gaps=False, dtype=np.float64):
    """Features with class signal in a few directions; ``gaps`` relabels classes to 0, 3, 6, ..."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    F = rng.standard_normal((n, d))
    F[:, : min(classes, d)] += 1.5 * np.eye(classes)[y][:, : min(classes, d)]
    if gaps:
        y = y * 3
    return F.astype(dtype), y


@pytest.fixture
def one_thread():
    """Tiny models train fastest on one thread; two threads on a busy 2-core box are ~100x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def separable(n=48, classes=3, size=16, seed=0):
    """Images whose class is the channel that is bright: trivially separable."""
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = 0.3 * torch.randn(n, 3, size, size, generator=g)
    x[torch.arange(n), y] += 1.5
    return TensorDataset(x, y)


def vectors(n=48, d=8, classes=3, seed=0):
    """Vectors whose class is the coordinate that is large: trivially separable."""
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randn(n, d, generator=g)
    x[torch.arange(n), y] += 3.0
    return TensorDataset(x, y)


def tiny_timm(num_classes=10, seed=0, size=32):
    """A seeded random-init timm ``test_resnet`` whose data config says ``size`` px and no crop."""
    import timm

    torch.manual_seed(seed)
    return timm.create_model("test_resnet", num_classes=num_classes,
                             pretrained_cfg_overlay={"input_size": (3, size, size), "crop_pct": 1.0})


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """:func:`tiny_timm` in timm's folder format (model.safetensors + config.json), for ``local-dir:`` specs."""
    from hubtune.tuning import save_timm_folder

    d = tmp_path_factory.mktemp("tiny-model")
    save_timm_folder(tiny_timm(), d)
    return d


# --- Ray -------------------------------------------------------------------------------------------------------
class RayLocal:
    """The session's local Ray instance, and the check that everything it runs stays on the loopback address."""

    def __init__(self, connection, temp_dir, start_seconds, driver_baseline):
        self.connection, self.temp_dir, self.start_seconds = connection, temp_dir, start_seconds
        self._driver_baseline = driver_baseline  # the pytest process's own sockets from before Ray started

    def processes(self):
        """The Ray processes: the driver's children that run Ray (GCS, raylet, log monitor), their descendants
        (workers, agents) and anything else whose command line names this instance's temp dir."""
        import psutil
        import ray

        mine = [(p, (os.path.dirname(ray.__file__), self.temp_dir)) for p in psutil.Process().children()]
        elsewhere = [(p, (self.temp_dir,)) for p in psutil.process_iter()]  # not other people's Ray
        found = {}
        for proc, marks in mine + elsewhere:
            try:
                if proc.pid not in found and any(m in " ".join(proc.cmdline()) for m in marks):
                    found[proc.pid] = proc
                    found.update((p.pid, p) for p in proc.children(recursive=True))
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
        found.pop(os.getpid(), None)
        return list(found.values())

    def sockets(self):
        """``(pid, process name, socket)`` for every inet socket of the Ray processes, and for the sockets the
        driver (this process, whose core worker serves Ray) opened since Ray started."""
        import psutil

        out = []
        for proc in [psutil.Process(), *self.processes()]:
            try:
                conns = _inet_sockets(proc)
                name = proc.name()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            if proc.pid == os.getpid():
                conns = [c for c in conns if _socket_key(c) not in self._driver_baseline]
            out += [(proc.pid, name, c) for c in conns]
        return out

    def assert_loopback(self):
        """Every socket of Ray is bound to, and talks to, 127.0.0.1 / ::1 only; lists the offenders otherwise."""
        from hubtune._ray import _is_loopback

        names = {p.name() for p in self.processes()}
        assert {"gcs_server", "raylet"} <= names, f"Ray processes not found (saw {sorted(names)})"
        socks = self.sockets()
        assert any(c.status == "LISTEN" for _, _, c in socks), "no listening socket found: the check saw nothing"
        bad = [f"{name} (pid {pid}): {c.type.name} {c.status or ''} local {c.laddr.ip}:{c.laddr.port}"
               + (f" remote {c.raddr.ip}:{c.raddr.port}" if c.raddr else "")
               for pid, name, c in socks
               if (c.laddr and c.laddr.port and not _is_loopback(c.laddr.ip))
               or (c.raddr and not _is_loopback(c.raddr.ip))]
        assert not bad, "Ray sockets off the loopback address:\n  " + "\n  ".join(bad)


def _inet_sockets(proc):
    return (proc.net_connections if hasattr(proc, "net_connections") else proc.connections)(kind="inet")


def _socket_key(c):
    return c.fd, c.type, tuple(c.laddr or ()), tuple(c.raddr or ())


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray for the whole session (starting one costs seconds): 2 CPUs, no usage stats, no
    dashboard, a temp dir of its own (short: Ray's socket paths have a length limit), an auth token kept in
    the environment rather than ~/.ray, and every socket on the loopback address, checked right after start."""
    pytest.importorskip("ray", reason="the Ray backend needs the 'ray' extra: pip install 'hubtune[ray]'")
    import shutil
    import tempfile
    import time

    import psutil

    from hubtune import _ray

    mp = pytest.MonkeyPatch()
    mp.delenv("RAY_ADDRESS", raising=False)
    mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
    mp.setenv("RAY_AUTH_TOKEN", os.urandom(32).hex())  # Ray turns token auth on (RAY_AUTH_MODE) by itself
    auth_mode = os.environ.get("RAY_AUTH_MODE")
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    baseline = {_socket_key(c) for c in _inet_sockets(psutil.Process())}
    connection = None
    try:
        start = time.perf_counter()
        connection = _ray.connect(num_cpus=2, temp_dir=temp_dir, object_store_memory=256 * 2**20)
        assert connection.started, "a Ray instance was already running in this process"
        local = RayLocal(connection, temp_dir, time.perf_counter() - start, baseline)
        local.assert_loopback()
        yield local
    finally:
        if connection is not None:
            connection.shutdown()
        mp.undo()
        if auth_mode is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        shutil.rmtree(temp_dir, ignore_errors=True)
