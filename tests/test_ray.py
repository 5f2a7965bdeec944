"""The Ray layer (hubtune._ray): a real local Ray from the session fixture ``ray_local``, loopback only.

The task functions live in this module, which the workers cannot import (pytest puts tests/ on the driver's
sys.path only), so the ``ray_here`` fixture has Ray pickle this module by value. Nothing imports Ray at
collection time.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from hubtune._ray import TaskFailedError, _is_loopback, connect, import_ray, map_tasks
from hubtune.errors import HubtuneError, InputError, MissingExtraError


@pytest.fixture
def ray_here(ray_local):
    """The session's Ray, able to run this module's functions."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    return ray_local


def _slow_square(x):
    time.sleep(x[1])
    return x[0] ** 2


def _scale(shared, x):
    return shared["factor"] * x


def _first_attempt(marker: Path) -> bool:
    """True once per marker: the first attempt of a task creates it, its retries find it."""
    try:
        marker.touch(exist_ok=False)
        return True
    except FileExistsError:
        return False


def _die_once(args):
    marker, x = args
    if _first_attempt(Path(marker)):
        os.kill(os.getpid(), signal.SIGKILL)
    return x * 10, os.getpid()


def _raise_once(args):
    marker, x = args
    if _first_attempt(Path(marker)):
        raise OSError("flaky disk")
    return x + 1


def _fail_on(x):
    if x == "bad":
        raise ValueError(f"cannot handle {x}")
    return x.upper()


def test_ray_listens_on_loopback_only(ray_here):
    """Checked at start by the fixture; again once workers started for tasks (they come and go)."""
    assert map_tasks(_slow_square, [(i, 0) for i in range(4)]) == [0, 1, 4, 9]
    ray_here.assert_loopback()
    assert ray_here.connection.address.startswith("127.0.0.1:")
    print(f"Ray started in {ray_here.start_seconds:.1f} s")


def test_loopback_check_itself():
    assert all(map(_is_loopback, ["127.0.0.1", "::1", "::ffff:127.0.0.1", "127.0.0.2", "[::1]", "localhost"]))
    assert not any(map(_is_loopback, ["0.0.0.0", "::", "192.0.2.2", "::ffff:192.0.2.2", "10.0.0.1", "example.org"]))


def test_connect_reuses_a_running_instance_and_leaves_it_up(ray_here):
    import ray

    with connect() as again:
        assert not again.started and again.address == ray_here.connection.address
    assert ray.is_initialized()


def test_results_in_item_order_and_progress_in_completion_order(ray_here):
    seen = []
    items = [(1, 1.0), (2, 0.0), (3, 0.5), (4, 0.0)]  # the first item finishes last
    out = map_tasks(_slow_square, items, on_result=lambda i, r: seen.append((i, r)))
    assert out == [1, 4, 9, 16]
    assert sorted(seen) == [(0, 1), (1, 4), (2, 9), (3, 16)]
    assert seen[-1] == (0, 1)


def test_shared_object_reaches_every_task(ray_here):
    assert map_tasks(_scale, [1, 2, 3], shared={"factor": 7}) == [7, 14, 21]


def test_task_killed_on_first_attempt_is_retried(ray_here, tmp_path):
    items = [(str(tmp_path / f"m{i}"), i) for i in range(3)]
    out = map_tasks(_die_once, items, max_retries=1)
    assert [r[0] for r in out] == [0, 10, 20]
    assert all((tmp_path / f"m{i}").exists() for i in range(3))  # every first attempt did die


def test_application_error_is_retried(ray_here, tmp_path):
    assert map_tasks(_raise_once, [(str(tmp_path / "m"), 1)], max_retries=1) == [2]


def test_task_failing_every_attempt_names_its_item(ray_here):
    with pytest.raises(TaskFailedError, match=r"item 1 \('bad'\).*ValueError: cannot handle bad") as info:
        map_tasks(_fail_on, ["ok", "bad", "fine"], max_retries=1)
    assert isinstance(info.value, HubtuneError) and info.value.index == 1
    assert isinstance(info.value.cause, ValueError)


def test_collect_keeps_the_other_results(ray_here):
    seen = []
    out = map_tasks(_fail_on, ["ok", "bad", "fine"], max_retries=0, on_error="collect",
                    on_result=lambda i, r: seen.append(i))
    assert out[0] == "OK" and out[2] == "FINE"
    assert isinstance(out[1], TaskFailedError) and out[1].item == "bad"
    assert sorted(seen) == [0, 1, 2]


def test_bad_on_error_is_named(ray_here):
    with pytest.raises(InputError, match="'ignore'"):
        map_tasks(_fail_on, ["ok"], on_error="ignore")


def test_missing_ray_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'hubtune\[ray\]'"):
        import_ray()
    with pytest.raises(MissingExtraError):
        map_tasks(_fail_on, ["ok"])
