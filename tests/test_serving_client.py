"""TeacherClient (hubtune.serving.client) against a scripted fake transport: threads and futures simulate the
latency, replica deaths, outages, lost requests and identity changes of a served teacher. No Ray."""
from __future__ import annotations

import concurrent.futures
import random
import threading
import time
from collections import Counter

import pytest
import torch

from hubtune.errors import InputError, TeacherMismatchError, TeacherServiceError
from hubtune.serving import ReplicaError, TeacherClient, Transport

W = torch.randn(8, 5, generator=torch.Generator().manual_seed(0))
NAME = "fake-teacher"


def ref(x: torch.Tensor) -> torch.Tensor:
    """The teacher the fake serves."""
    return x @ W


def make_batch(i: int, n: int = 3) -> dict:
    x = torch.randn(n, 8, generator=torch.Generator().manual_seed(100 + i))
    x[:, 0] = i  # the fake reads the batch number from here
    return {"input": x, "i": i}


class FakePending:
    def __init__(self, transport, key):
        self.t, self.key, self.future = transport, key, concurrent.futures.Future()

    def result(self, timeout):
        try:
            out = self.future.result(timeout)
        except ReplicaError:
            self.t._collected(self)
            raise
        self.t._collected(self)
        return out

    def cancel(self):
        self.t._collected(self)


class FakeTransport:
    """``latency(k)``: seconds for the k-th submission. ``die_after``: replica r0 dies when handed its
    ``die_after``-th request (that one and whatever else it holds fail with ReplicaError).
    ``fail(key, attempt)`` / ``hang(key, attempt)``:
    that attempt of batch ``key`` fails with ReplicaError / is never answered. ``identity(n)``: the identity of
    the n-th answer. :meth:`outage`: no replica alive (held requests fail, new ones queue) for ``duration`` s."""

    name = NAME

    def __init__(self, latency=lambda k: 0.005, n_replicas=2, die_after=None, fail=None, hang=None,
                 identity=lambda n: "teacherA", output="logits"):
        self.latency, self.die_after, self.identity, self.output = latency, die_after, identity, output
        self.fail, self.hang = fail or (lambda key, a: False), hang or (lambda key, a: False)
        self.alive = [f"r{j}" for j in range(n_replicas)]
        self.cond = threading.Condition()
        self.outage_on = self.stopped = False
        self.k = self.n_answered = self.max_live = self.replica_errors = self.replicas_calls = 0
        self.live, self.submits, self.attempts, self.served, self.routed = set(), [], Counter(), Counter(), Counter()

    # the protocol
    def replicas(self):
        with self.cond:
            self.replicas_calls += 1
            return 0 if self.outage_on else len(self.alive)

    def submit(self, x):
        key = int(x[0, 0])
        with self.cond:
            p = FakePending(self, key)
            attempt, k = self.attempts[key], self.k
            self.attempts[key] += 1
            self.k += 1
            self.submits.append(key)
            self.live.add(p)
            self.max_live = max(self.max_live, len(self.live))
        threading.Thread(target=self._serve, args=(p, x.clone(), attempt, k), daemon=True).start()
        return p

    # scripting
    def outage(self, duration=None):
        with self.cond:
            self.outage_on = True
        if duration is not None:
            t = threading.Timer(duration, self._end_outage)
            t.daemon = True
            t.start()

    def _end_outage(self):
        with self.cond:
            self.outage_on = False
            self.cond.notify_all()

    def stop(self):
        with self.cond:
            self.stopped = True
            self.cond.notify_all()

    def _collected(self, p):
        with self.cond:
            self.live.discard(p)

    def _serve(self, p, x, attempt, k):
        with self.cond:  # a request sent while no replica is alive waits in the queue for one
            if not self.cond.wait_for(lambda: not self.outage_on or self.stopped, timeout=10) or self.stopped:
                return
            replica = self.alive[k % len(self.alive)]
            self.routed[replica] += 1
            if self.die_after is not None and replica == "r0" and self.routed[replica] == self.die_after:
                self.alive.remove("r0")
        time.sleep(self.latency(k))
        with self.cond:
            if self.stopped or self.hang(p.key, attempt):
                return  # lost: never answered
            if self.outage_on or replica not in self.alive or self.fail(p.key, attempt):
                self.replica_errors += 1
                err = ReplicaError(f"replica {replica} died")
            else:
                err = None
                self.served[replica] += 1
                ident = self.identity(self.n_answered)
                self.n_answered += 1
        if err is not None:
            p.future.set_exception(err)
        else:
            p.future.set_result({self.output: ref(x).numpy(), "identity": ident, "replica": replica})


@pytest.fixture
def fakes():
    made = []

    def make(**kw):
        made.append(FakeTransport(**kw))
        return made[-1]

    yield make
    for f in made:
        f.stop()


def within(seconds, fn):
    """``fn()`` in a daemon thread; fail (rather than hang the suite) when it takes longer than ``seconds``."""
    box = {}

    def run():
        try:
            box["out"] = fn()
        except BaseException as e:  # handed back to the test
            box["err"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"the client hung for more than {seconds} s"
    if "err" in box:
        raise box["err"]
    return box["out"]


def check_outputs(out, n):
    assert [b["i"] for b, _ in out] == list(range(n))
    for b, logits in out:
        assert logits.dtype == torch.float32
        torch.testing.assert_close(logits, ref(b["input"]))


def test_fake_is_a_transport(fakes):
    assert isinstance(fakes(), Transport)


def test_order_and_exactly_once_with_random_latency(fakes):
    rng = random.Random(0)
    lat = [rng.uniform(0, 0.02) for _ in range(40)]
    fake = fakes(latency=lambda k: lat[k])
    client = TeacherClient(fake, window=4, timeout=5)
    out = list(client.pipeline(make_batch(i) for i in range(40)))
    check_outputs(out, 40)
    assert sorted(fake.submits) == list(range(40))
    assert fake.replicas_calls == 0  # not asked on the fast path (on Ray Serve it is a controller RPC)
    s = client.stats
    assert s["requests"] == s["answered"] == 40 and s["retries"] == s["failovers"] == 0
    assert len(s["latencies"]) == 40 and all(t > 0 for t in s["latencies"])
    assert s["identity"] == "teacherA" and s["replicas_seen"] == ["r0", "r1"]
    assert NAME in client.summary() and "40 requests" in client.summary()


@pytest.mark.parametrize("window", [1, 3])
def test_window_bounds_in_flight_and_prefetches(fakes, window):
    fake = fakes(latency=lambda k: 0.005)
    client = TeacherClient(fake, window=window, timeout=5)
    n, seen = 8, []
    for b, _ in client.pipeline(make_batch(i) for i in range(n)):
        time.sleep(0.03)  # the student trains on batch i ...
        seen.append(max(fake.submits))  # ... while the next batches' requests are already out
    assert fake.max_live == window  # reached, never exceeded
    for i, last in enumerate(seen):
        assert last >= min(i + window - 1, n - 1)
    assert fake.live == set()


def test_failover_when_a_replica_dies(fakes):
    rng = random.Random(1)
    lat = [rng.uniform(0.002, 0.02) for _ in range(100)]
    fake = fakes(latency=lambda k: lat[k], die_after=5)
    client = TeacherClient(fake, window=4, timeout=5, retries=3)
    out = list(client.pipeline(make_batch(i) for i in range(20)))
    check_outputs(out, 20)
    s = client.stats
    assert fake.replica_errors >= 1 and s["failovers"] == fake.replica_errors == s["retries"]
    assert s["requests"] == 20 + s["retries"] and s["answered"] == 20
    assert s["replicas_seen"] == ["r0", "r1"] and "r0" not in fake.alive


def test_too_many_failures_of_one_batch(fakes):
    fake = fakes(fail=lambda key, attempt: key == 2)
    client = TeacherClient(fake, window=3, timeout=5, retries=2)
    got = []
    with pytest.raises(TeacherServiceError, match=r"died 3 times.*retries=2") as e:
        for b, _ in client.pipeline(make_batch(i) for i in range(6)):
            got.append(b["i"])
    assert NAME in str(e.value) and got == [0, 1]
    assert fake.attempts[2] == 3  # the first try and `retries` resubmissions


def test_identity_mismatch(fakes):
    fake = fakes(identity=lambda n: "teacherA" if n < 3 else "teacherB")
    client = TeacherClient(fake, window=2, timeout=5)
    with pytest.raises(TeacherMismatchError) as e:
        list(client.pipeline(make_batch(i) for i in range(6)))
    msg = str(e.value)
    assert "teacherA" in msg and "teacherB" in msg and NAME in msg
    # the synchronous call: same rules; an identity given up front is enforced from the first answer
    x = make_batch(0)["input"]
    torch.testing.assert_close(TeacherClient(fakes(), timeout=5)(x), ref(x))
    with pytest.raises(TeacherMismatchError, match="teacherA.*teacherZ"):
        TeacherClient(fakes(), timeout=5, identity="teacherZ")(x)


def test_stall_fail_when_no_replica(fakes):
    fake = fakes(latency=lambda k: 0.02)
    client = TeacherClient(fake, window=3, timeout=30, poll=0.02)
    t0, got = time.monotonic(), []

    def consume():
        for b, _ in client.pipeline(make_batch(i) for i in range(8)):
            got.append(b["i"])
            if b["i"] == 2:
                fake.outage()

    with pytest.raises(TeacherServiceError) as e:
        within(5, consume)
    assert time.monotonic() - t0 < 2  # noticed by polling replicas(), not after timeout=30
    msg = str(e.value)
    for part in (NAME, "0 replicas alive", "waited", "hubtune serve-teacher --scale fake-teacher N",
                 "on_stall='wait'", "on_stall='local'"):
        assert part in msg
    assert got == [0, 1, 2]


def test_stall_fail_on_timeout(fakes):
    fake = fakes(hang=lambda key, attempt: key == 1)
    with pytest.raises(TeacherServiceError, match=r"timeout=0.2 s.*waited 0\.[2-9] s, 2 replicas alive"):
        within(5, lambda: list(TeacherClient(fake, window=2, timeout=0.2, poll=0.05)
                               .pipeline(make_batch(i) for i in range(4))))


def test_stall_wait_resumes_when_replicas_return(fakes, capsys):
    fake = fakes(latency=lambda k: 0.05)
    client = TeacherClient(fake, window=3, timeout=30, poll=0.02, on_stall="wait")
    out = []

    def consume():
        for b, logits in client.pipeline(make_batch(i) for i in range(8)):
            out.append((b, logits))
            if b["i"] == 2:
                fake.outage(duration=0.3)

    within(5, consume)
    check_outputs(out, 8)
    s = client.stats
    assert s["stalls"] == 1 and 0.2 < s["stall_seconds"] < 2 and s["local"] == 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2
    assert NAME in lines[0] and "waiting for a replica" in lines[0] and "Ctrl-C" in lines[0] and "--scale" in lines[0]
    assert NAME in lines[1] and "answered again" in lines[1]


def test_stall_wait_resubmits_a_lost_request(fakes, capsys):
    fake = fakes(hang=lambda key, attempt: key == 1 and attempt == 0)
    client = TeacherClient(fake, window=2, timeout=0.2, poll=0.05, on_stall="wait")
    check_outputs(within(5, lambda: list(client.pipeline(make_batch(i) for i in range(4)))), 4)
    assert fake.attempts[1] == 2 and client.stats["retries"] == 1 and client.stats["stall_seconds"] > 0
    assert len(capsys.readouterr().err.strip().splitlines()) == 2


class LocalTeacher:
    def __init__(self, identity="teacherA"):
        self.identity, self.calls = identity, 0

    def __call__(self, x):
        self.calls += 1
        return ref(x)


def test_stall_local_computes_stalled_batches(fakes):
    fake = fakes(latency=lambda k: 0.02)
    local = LocalTeacher()
    client = TeacherClient(fake, window=3, timeout=30, poll=0.02, on_stall="local", local=local)
    out, t0 = [], time.monotonic()

    def consume():
        for b, logits in client.pipeline(make_batch(i) for i in range(10)):
            out.append((b, logits))
            if b["i"] == 2:
                fake.outage()  # for good

    within(5, consume)
    assert time.monotonic() - t0 < 3
    check_outputs(out, 10)
    assert client.stats["local"] == local.calls >= 7 and client.stats["answered"] == 10 - local.calls
    # a local teacher that is another teacher is refused like a replica would be: at construction when the
    # identity is given, else when it first stands in for the service
    with pytest.raises(TeacherMismatchError, match="local teacher.*teacherZ.*teacherA"):
        TeacherClient(fakes(), on_stall="local", local=LocalTeacher("teacherZ"), identity="teacherA")
    fake2 = fakes()
    client2 = TeacherClient(fake2, window=1, timeout=30, poll=0.02, on_stall="local", local=LocalTeacher("teacherZ"))
    x0, x1 = make_batch(0)["input"], make_batch(1)["input"]
    torch.testing.assert_close(client2(x0), ref(x0))  # pins teacherA
    fake2.outage()
    with pytest.raises(TeacherMismatchError, match="local teacher.*teacherZ.*teacherA"):
        within(5, lambda: client2(x1))


def test_close_cancels_in_flight(fakes):
    fake = fakes(latency=lambda k: 0.01)
    with TeacherClient(fake, window=4, timeout=5) as client:
        for b, _ in client.pipeline(make_batch(i) for i in range(10)):
            if b["i"] == 1:
                break
        assert fake.live == set()  # leaving the loop cancelled the requests still out
        assert len(fake.submits) <= 1 + 1 + 4
    with pytest.raises(TeacherServiceError, match="closed"):
        client(make_batch(0)["input"])


@pytest.mark.parametrize("kw, bad", [
    ({"window": 0}, "window=0"), ({"window": 2.5}, "window=2.5"), ({"window": True}, "window=True"),
    ({"timeout": 0}, "timeout=0"), ({"timeout": -1.0}, "timeout=-1.0"), ({"timeout": float("nan")}, "timeout=nan"),
    ({"retries": -1}, "retries=-1"), ({"poll": 0}, "poll=0"), ({"on_stall": "retry"}, "on_stall='retry'"),
    ({"on_stall": "local"}, "local="), ({"local": 3}, "local=3"), ({"identity": 5}, "identity=5"),
])
def test_argument_errors(fakes, kw, bad):
    with pytest.raises(InputError) as e:
        TeacherClient(fakes(), **kw)
    assert bad in str(e.value) and ("give" in str(e.value) or "use" in str(e.value))


def test_transport_must_have_the_protocol():
    with pytest.raises(InputError, match="submit"):
        TeacherClient(object())


def test_features_output_reads_the_features_field(fakes):
    """A client for features (btuning, SSLD's dedup) reads the answer's "features"; one that expects logits
    from a service answering features is a protocol error naming the field, not a wrong tensor."""
    t = fakes(output="features")
    client = TeacherClient(t, window=3, output="features")
    got = [(b["i"], out) for b, out in client.pipeline(make_batch(i) for i in range(5))]
    assert [i for i, _ in got] == list(range(5))
    for i, out in got:
        torch.testing.assert_close(out, ref(make_batch(i)["input"]))
    with pytest.raises(TeacherServiceError, match="without 'logits'"):
        TeacherClient(fakes(output="features"))(make_batch(0)["input"])
    with pytest.raises(InputError, match="output='probs'"):
        TeacherClient(fakes(), output="probs")
