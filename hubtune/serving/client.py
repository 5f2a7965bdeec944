"""The student side of a served teacher: :class:`TeacherClient`, EDL's reader.

A teacher runs as an inference service (Ray Serve, :mod:`hubtune.serving.deployment`); the student sends it
batches already seen through the teacher's input view and gets its logits back (or, with
``output="features"``, its penultimate features: what B-Tuning projects and SSLD deduplicates with). This module imports no Ray: it
speaks to the service through a :class:`Transport` (the deployment side provides one over a Serve handle; the
tests script a fake one), so it costs nothing to import and is tested without a cluster.

**Transport protocol.** ``transport.submit(x)`` sends a float32 batch and returns at once with a
:class:`Pending`; ``pending.result(timeout)`` blocks up to ``timeout`` seconds and returns
``{"logits": float32 (n, C) array, "identity": str, "replica": str}`` (``"features"``, (n, D), instead of
``"logits"`` from a transport built for features), or raises :class:`ReplicaError` (the
replica that held the request died; teacher inference is idempotent, so it is resubmitted) or ``TimeoutError``
(no answer yet; ``result`` may be called again, as on a ``concurrent.futures.Future``). ``pending.cancel()`` is
optional (called, when present, on a request the client abandons). ``transport.replicas()`` is the number of
replicas alive now. ``transport.name`` names the service in messages.

**How the client works.** No threads of its own: the concurrency is the transport's (futures). The
:meth:`TeacherClient.pipeline` generator keeps a FIFO of at most ``window`` requests in flight: it submits the
next batches' requests before yielding the current one, so they run while the student trains, and it waits only
on the oldest request, so outputs come back in the input order, each batch once. Waiting happens in steps of
``poll`` seconds, checking ``transport.replicas()`` after a step that brought no answer (never on the fast path:
it may be an RPC), so a dead service is noticed within ``poll`` seconds rather than ``timeout``.

* **Failover.** A :class:`ReplicaError` resubmits the same batch (the transport routes it to a live replica), up
  to ``retries`` times per batch, then :class:`~hubtune.errors.TeacherServiceError`. When no replica is left,
  the stall policy decides instead.
* **Identity.** Every answer carries the teacher's identity (weights hash + preprocessing). The first answer pins
  it (or ``identity=`` up front); another identity later raises :class:`~hubtune.errors.TeacherMismatchError`:
  a run never mixes two teachers.
* **Stalls** (no answer within ``timeout``, or no replica alive), by ``on_stall``: ``"fail"`` raises
  :class:`~hubtune.errors.TeacherServiceError` with the cures; ``"wait"`` waits (resubmitting after each
  timeout or once replicas are back), with one line on stderr when the stall starts and one when it ends;
  ``"local"`` computes that batch with ``local`` (the teacher loaded here) and goes on.

A client is used from one thread at a time.
"""
from __future__ import annotations

import collections
import concurrent.futures
import math
import sys
import time
from typing import Any, Callable, Iterable, Iterator, Protocol, runtime_checkable

import numpy as np
import torch

from ..errors import InputError, TeacherMismatchError, TeacherServiceError

__all__ = ["TeacherClient", "Transport", "Pending", "ReplicaError", "STALL_POLICIES", "OUTPUTS"]

STALL_POLICIES = ("fail", "wait", "local")
#: what a served teacher answers: its logits (kd) or its penultimate features (btuning, SSLD's dedup)
OUTPUTS = ("logits", "features")
_TIMEOUTS = (TimeoutError, concurrent.futures.TimeoutError)  # one class since Python 3.11; two before


class ReplicaError(Exception):
    """The replica that held a request died before answering. Retryable: teacher inference is idempotent, so
    the client resubmits the batch (a transport routes it to a live replica)."""


@runtime_checkable
class Pending(Protocol):
    """One request in flight (what :meth:`Transport.submit` returns)."""

    def result(self, timeout: float) -> dict:
        """Block up to ``timeout`` seconds (0: just look) for ``{"logits": np.ndarray float32 (n, C),
        "identity": str, "replica": str}``. Raises :class:`ReplicaError` when the replica holding the request
        died, ``TimeoutError`` when no answer came within ``timeout`` (the request stays pending and ``result``
        may be called again). An optional ``cancel()`` is called when the client abandons the request."""
        ...


@runtime_checkable
class Transport(Protocol):
    """How a :class:`TeacherClient` reaches a teacher service. ``name``: the service name, for messages."""

    name: str

    def submit(self, x: torch.Tensor) -> Pending:
        """Send a float32 batch (already in the teacher's input view); returns at once."""
        ...

    def replicas(self) -> int:
        """The number of replicas alive now (0: none), for the stall policy."""
        ...


class _Request:
    __slots__ = ("index", "x", "pending", "t_submit", "failures")

    def __init__(self, index: int, x: torch.Tensor):
        self.index, self.x, self.pending, self.t_submit, self.failures = index, x, None, 0.0, 0


def _check_number(name: str, v, *, low: float, strict: bool, integer: bool, cure: str):
    bad = isinstance(v, bool) or not isinstance(v, (int, float) if not integer else int)
    if not bad and not integer:
        bad = not math.isfinite(v)
    if not bad:
        bad = v <= low if strict else v < low
    if bad:
        kind = "a whole number" if integer else "a finite number"
        raise InputError(f"TeacherClient {name}={v!r} is invalid: give {kind} {'>' if strict else '>='} {low:g}; "
                         f"{cure}")
    return int(v) if integer else float(v)


class TeacherClient:
    """Requests teacher logits from a served teacher through ``transport`` (a :class:`Transport`).

    ``window``: requests kept in flight ahead of the consumer by :meth:`pipeline` (>= 1). ``timeout``: seconds
    without an answer before a request counts as stalled. ``retries``: resubmissions of one batch after
    :class:`ReplicaError` before giving up. ``on_stall``: ``"fail"``, ``"wait"`` or ``"local"`` (see the module
    docstring). ``local``: a callable ``x -> logits`` (the teacher module loaded here), required by
    ``on_stall="local"``; its ``identity`` attribute, when it has one, must match the service's. ``identity``:
    the teacher identity to insist on (default: the first answer's). ``poll``: seconds between checks of
    ``transport.replicas()`` while waiting. ``output``: the answer's field the client reads, ``"logits"`` or
    ``"features"`` (the transport must ask the service for the same; ``local`` then returns features too).
    """

    def __init__(self, transport: Transport, *, window: int = 4, timeout: float = 30.0, retries: int = 3,
                 on_stall: str = "fail", local: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 identity: str | None = None, poll: float = 0.5, output: str = "logits"):
        for attr in ("submit", "replicas"):
            if not callable(getattr(transport, attr, None)):
                raise InputError(f"TeacherClient transport={transport!r} has no {attr}() method: give a "
                                 "hubtune.serving.Transport (submit(x) -> Pending, replicas() -> int, name)")
        self.transport = transport
        self.name = str(getattr(transport, "name", type(transport).__name__))
        self.window = _check_number("window", window, low=1, strict=False, integer=True,
                                    cure="it bounds the requests kept in flight (4 is a good start)")
        self.timeout = _check_number("timeout", timeout, low=0, strict=True, integer=False,
                                     cure="seconds to wait for one answer, e.g. 30")
        self.retries = _check_number("retries", retries, low=0, strict=False, integer=True,
                                     cure="resubmissions of a batch whose replica died (0: none), e.g. 3")
        self.poll = _check_number("poll", poll, low=0, strict=True, integer=False,
                                  cure="seconds between checks of the live replicas, e.g. 0.5")
        if output not in OUTPUTS:
            raise InputError(f"TeacherClient output={output!r} is unknown: give one of {', '.join(OUTPUTS)}")
        self.output = output
        if on_stall not in STALL_POLICIES:
            raise InputError(f"TeacherClient on_stall={on_stall!r} is unknown: give one of {', '.join(STALL_POLICIES)}"
                             " ('fail': raise, 'wait': wait for replicas, 'local': compute with a local teacher)")
        if local is not None and not callable(local):
            raise InputError(f"TeacherClient local={local!r} is not callable: give the teacher module (x -> logits)")
        if on_stall == "local" and local is None:
            raise InputError("TeacherClient on_stall='local' needs local=: the teacher loaded here (a callable "
                             "x -> logits) to compute the batches the service does not answer; or use "
                             "on_stall='fail' or 'wait'")
        if identity is not None and not isinstance(identity, str):
            raise InputError(f"TeacherClient identity={identity!r} is not a string: give the teacher identity "
                             "(weights hash + preprocessing) the service must report, or None to pin the first")
        self.on_stall, self.local = on_stall, local
        self.identity = identity
        self._pinned_by = "given as identity=" if identity is not None else None
        local_id = getattr(local, "identity", None) if local is not None else None
        if identity is not None and local_id is not None and local_id != identity:
            self._mismatch(str(local_id), "the local teacher (local=)")
        self._inflight: collections.deque[_Request] = collections.deque()
        self._closed = False
        self._n, self._last_alive = 0, None
        self._replicas_seen: set[str] = set()
        self._stats = {"requests": 0, "answered": 0, "retries": 0, "failovers": 0, "local": 0, "stalls": 0,
                       "stall_seconds": 0.0, "wait_seconds": 0.0, "latencies": []}

    # ------------------------------------------------------------------------------------------------ API
    def pipeline(self, batches: Iterable[Any], inputs: Callable[[Any], torch.Tensor] = lambda b: b["input"]
                 ) -> Iterator[tuple[Any, torch.Tensor]]:
        """Yield ``(batch, teacher logits)`` for every batch of ``batches``, in their order, each once; the
        logits are a float32 tensor on the device of ``inputs(batch)`` (the batch in the teacher's input view).
        Up to ``window`` requests are in flight: those for the next batches are submitted before the current
        batch is yielded, so they run while the consumer works on it. Closing the generator (or breaking out of
        the loop, or :meth:`close`) cancels what is still in flight."""
        self._check_open()
        it = iter(batches)
        queue: collections.deque[tuple[Any, _Request]] = collections.deque()
        exhausted = False

        def fill():
            nonlocal exhausted
            while not exhausted and len(queue) < self.window:
                try:
                    b = next(it)
                except StopIteration:
                    exhausted = True
                    return
                queue.append((b, self._start(inputs(b))))

        try:
            fill()
            while queue:
                b, req = queue[0]
                t_wait = time.perf_counter()
                out = self._resolve(req)
                self._stats["wait_seconds"] += time.perf_counter() - t_wait  # the consumer blocked on the teacher
                queue.popleft()
                self._forget(req)
                fill()
                yield b, out
        finally:
            for _, req in queue:
                self._cancel(req)
                self._forget(req)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's logits for one batch ``x``, synchronously (same failover, stall and identity rules)."""
        self._check_open()
        req = self._start(x)
        try:
            return self._resolve(req)
        except BaseException:
            self._cancel(req)
            raise
        finally:
            self._forget(req)

    @property
    def stats(self) -> dict:
        """``requests`` (submissions, resubmissions included), ``answered`` (by the service), ``retries``
        (resubmissions), ``failovers`` (replica deaths survived), ``local`` (batches computed by ``local``),
        ``stalls``, ``stall_seconds`` (from noticing a stall to its end), ``wait_seconds`` (time :meth:`pipeline`'s
        consumer waited for the oldest answer: the teacher time training did not hide), ``latencies`` (seconds from submit to
        answer, per answered request), ``replicas_seen`` (sorted replica ids), ``identity`` (pinned, or None)."""
        s = dict(self._stats)
        s["latencies"] = list(s["latencies"])
        s["replicas_seen"] = sorted(self._replicas_seen)
        s["identity"] = self.identity
        return s

    def summary(self) -> str:
        """One line: requests, retries, failovers, local batches, latency median/p95, stall time, identity."""
        s = self.stats
        lat = np.asarray(s["latencies"]) * 1e3
        lat_txt = (f"latency p50 {np.percentile(lat, 50):.1f} ms, p95 {np.percentile(lat, 95):.1f} ms"
                   if lat.size else "no answers")
        ident = (s["identity"][:16] if s["identity"] else "not pinned")
        return (f"teacher service {self.name!r}: {s['requests']} requests ({s['answered']} answered, "
                f"{s['retries']} retries, {s['failovers']} failovers), {s['local']} batches computed locally, "
                f"{lat_txt}, {s['stalls']} stalls ({s['stall_seconds']:.1f} s), "
                f"{len(s['replicas_seen'])} replicas seen, identity {ident}")

    def close(self) -> None:
        """Cancel (when the transport allows) and forget every request in flight; the client cannot be used
        afterwards. The transport itself is not closed (it may be shared)."""
        self._closed = True
        while self._inflight:
            self._cancel(self._inflight.popleft())

    def __enter__(self) -> "TeacherClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------------------------------------- internals
    def _check_open(self) -> None:
        if self._closed:
            raise TeacherServiceError(f"the TeacherClient of service {self.name!r} is closed: make a new one")

    def _start(self, x) -> _Request:
        if not torch.is_tensor(x):
            raise InputError(f"TeacherClient got a {type(x).__name__} as the teacher input: give a tensor batch "
                             "(pipeline(..., inputs=) picks it out of a batch)")
        req = _Request(self._n, x.detach().to(torch.float32))
        self._n += 1
        self._submit(req)
        self._inflight.append(req)
        return req

    def _submit(self, req: _Request) -> None:
        req.pending = self.transport.submit(req.x)
        req.t_submit = time.monotonic()
        self._stats["requests"] += 1

    def _resubmit(self, req: _Request) -> None:
        self._cancel(req)
        self._stats["retries"] += 1
        self._submit(req)

    def _cancel(self, req: _Request) -> None:
        cancel = getattr(req.pending, "cancel", None)
        if callable(cancel):
            try:
                cancel()
            except Exception:  # best effort: the request is forgotten either way
                pass

    def _forget(self, req: _Request) -> None:
        try:
            self._inflight.remove(req)
        except ValueError:
            pass

    def _alive(self) -> int:
        self._last_alive = int(self.transport.replicas())
        return self._last_alive

    def _resolve(self, req: _Request) -> torch.Tensor:
        """Wait for ``req``'s answer, applying failover, the stall policy and the identity check."""
        stall_t0 = None
        try:
            while True:
                deadline = time.monotonic() + self.timeout
                reason = None
                while reason is None:
                    try:
                        # replicas() is asked only when no answer came within a step (it may be an RPC); when
                        # the last answer was "none alive", only look (an answer may already be there)
                        step = 0.0 if self._last_alive == 0 else max(0.0, min(self.poll, deadline - time.monotonic()))
                        answer = req.pending.result(step)
                    except _TIMEOUTS:
                        if self._alive() == 0:
                            reason = "no replica alive"
                        elif time.monotonic() >= deadline:
                            reason = f"no answer within timeout={self.timeout:g} s"
                        continue
                    except ReplicaError as err:
                        self._stats["failovers"] += 1
                        if self._alive() == 0:
                            reason = f"the replica holding it died ({err}) and no replica is alive"
                            continue
                        req.failures += 1
                        if req.failures > self.retries:
                            raise TeacherServiceError(
                                f"teacher service {self.name!r}: the replica holding request {req.index} died "
                                f"{req.failures} times (last: {err}); retries={self.retries} is spent. The service's "
                                "replicas keep crashing: check its logs and the teacher's memory, or raise retries="
                            ) from err
                        self._resubmit(req)
                        deadline = time.monotonic() + self.timeout
                        continue
                    out = self._accept(req, answer)
                    if stall_t0 is not None:
                        print(f"hubtune: teacher service {self.name!r} answered again after "
                              f"{time.monotonic() - stall_t0:.1f} s stalled ({self._alive()} replicas alive)",
                              file=sys.stderr, flush=True)
                    return out
                # stalled
                waited = time.monotonic() - req.t_submit
                if self.on_stall == "fail":
                    self._cancel(req)
                    raise TeacherServiceError(
                        f"teacher service {self.name!r} stalled: {reason} (request {req.index} waited {waited:.1f} s, "
                        f"{self._alive()} replicas alive). Scale the service up with `hubtune serve-teacher "
                        f"--scale {self.name} N`, or run with on_stall='wait' (wait for replicas) or on_stall='local' "
                        "(compute the stalled batches with the teacher loaded locally)")
                if self.on_stall == "local":
                    self._cancel(req)
                    return self._compute_local(req)
                if stall_t0 is None:  # "wait"
                    stall_t0 = time.monotonic()
                    self._stats["stalls"] += 1
                    print(f"hubtune: teacher service {self.name!r} stalled ({reason}; request {req.index} waited "
                          f"{waited:.1f} s): waiting for a replica to answer, checking every {self.poll:g} s "
                          f"(on_stall='wait'). Scale it up with `hubtune serve-teacher --scale {self.name} N`, or "
                          "stop with Ctrl-C", file=sys.stderr, flush=True)
                while self._alive() == 0:
                    time.sleep(self.poll)
                self._resubmit(req)
        finally:
            if stall_t0 is not None:
                self._stats["stall_seconds"] += time.monotonic() - stall_t0

    def _accept(self, req: _Request, answer: dict) -> torch.Tensor:
        try:
            logits, ident, replica = answer[self.output], answer["identity"], answer["replica"]
        except (KeyError, TypeError):
            raise TeacherServiceError(f"teacher service {self.name!r} answered {type(answer).__name__} without "
                                      f"'{self.output}', 'identity' and 'replica': the service and this hubtune "
                                      "disagree on the protocol; redeploy it with this hubtune "
                                      "(`hubtune serve-teacher`)")
        self._stats["latencies"].append(time.monotonic() - req.t_submit)
        self._stats["answered"] += 1
        self._replicas_seen.add(str(replica))
        self._check_identity(str(ident), f"replica {replica}")
        out = torch.from_numpy(np.array(logits, dtype=np.float32, copy=True))
        if out.ndim != 2 or out.shape[0] != req.x.shape[0]:
            raise TeacherServiceError(f"teacher service {self.name!r} (replica {replica}) answered {self.output} of "
                                      f"shape {tuple(out.shape)} for a batch of {req.x.shape[0]}: expected (n, "
                                      f"{'classes' if self.output == 'logits' else 'width'})")
        return out.to(req.x.device)

    def _compute_local(self, req: _Request) -> torch.Tensor:
        ident = getattr(self.local, "identity", None)
        if ident is not None:
            self._check_identity(str(ident), "the local teacher (local=)")
        with torch.no_grad():
            out = self.local(req.x)
        self._stats["local"] += 1
        return out.detach().to(device=req.x.device, dtype=torch.float32)

    def _check_identity(self, ident: str, source: str) -> None:
        if self.identity is None:
            self.identity, self._pinned_by = ident, f"pinned by the first answer, from {source}"
        elif ident != self.identity:
            self._mismatch(ident, source)

    def _mismatch(self, ident: str, source: str):
        raise TeacherMismatchError(
            f"teacher service {self.name!r}: {source} has teacher identity {ident} but this run uses "
            f"{self.identity} ({self._pinned_by}): two different teachers would be mixed in one run. Serve one "
            "teacher per service name (every replica with the same weights and preprocessing), or start a new run "
            "for the new teacher")
