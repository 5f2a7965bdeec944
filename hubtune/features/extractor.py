"""Batched, cached feature extraction for many candidates over one dataset, in bounded memory.

Candidates are references (:class:`~hubtune.hub.CandidateRef`): their identity and transform are known
without loading the weights, so a candidate whose cache entry is complete is replayed without constructing
the model. The others are loaded when their turn comes, at most ``max_resident`` at once, and freed after:
peak memory is about the largest model plus a chunk of decoded images, whatever the hub's size.

Candidates that share a transform (timm data config) share the decoded images. A ``DataLoader`` with
worker processes decodes and transforms them (pinned memory and non-blocking copies on a GPU), so decode
overlaps inference; the decoded chunks are kept for the next candidates of the group in a bounded store
(memory, then a temporary folder on disk, then decoded again). Inference runs under
``torch.inference_mode``, channels-last, with bf16 autocast where the CPU or GPU supports it, and
``torch.compile`` when the dataset is large enough to repay compilation. Each chunk of (features, source
logits, labels) is written to the cache and handed to ``on_chunk`` as it is produced, so scorers stream.

One progress display for the hub: a bar over all (candidate, row) pairs and one line per finished
candidate, on a terminal (``progress=True`` forces it, ``False`` silences it).
"""
from __future__ import annotations

import gc
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import InputError
from .cache import FeatureCache

from .precision import PRECISIONS, bf16_supported, make_forward, resolve_precision  # noqa: F401 (re-exported)


@dataclass
class ExtractOptions:
    batch_size: int = 64
    chunk_size: int = 512            # rows decoded at once and written per cache file
    device: str | None = None        # None: cuda when available, else cpu
    precision: str = "auto"          # see hubtune.features.precision: "auto" is fp32 on CPUs without AMX
    channels_last: bool = True
    compile: str | bool = "auto"     # "auto": compile when the dataset has >= compile_min_samples rows
    compile_min_samples: int = 20000
    cache_dir: str | None = None
    use_cache: bool = True
    progress: bool | None = None     # None: show progress when stderr is a terminal
    max_resident: int | None = None  # models loaded at once; None: 1
    num_workers: int | str = "auto"  # decode processes; "auto": 0 for small jobs, else up to 4 (half the cores)
    decoded_memory_mb: int = 1024    # decoded images kept in memory for the next candidates of a transform group
    decoded_disk_mb: int = 8192      # and beyond that in a temporary folder (0: decode again instead)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise InputError(f"precision={self.precision!r} is not one of {', '.join(PRECISIONS)}")
        for name in ("batch_size", "chunk_size") + (("max_resident",) if self.max_resident is not None else ()):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"{name}={v!r} (--{name.replace('_', '-')}) must be a positive integer")
        for name in ("decoded_memory_mb", "decoded_disk_mb"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise InputError(f"{name}={v!r} must be an integer >= 0 (megabytes)")
        w = self.num_workers
        if w != "auto" and (isinstance(w, bool) or not isinstance(w, int) or w < 0):
            raise InputError(f"num_workers={w!r} (--num-workers) must be 'auto' or an integer >= 0")

    def workers_for(self, rows: int) -> int:
        """Decode processes for ``rows`` images: below 256 rows the start-up of a worker does not repay."""
        if self.num_workers != "auto":
            return int(self.num_workers)
        return 0 if rows < 256 else max(1, min(4, (os.cpu_count() or 2) // 2))


@dataclass
class ExtractStats:
    spec: str
    n: int = 0
    feature_dim: int = 0
    num_classes: int = 0
    seconds: float = 0.0             # forward passes only (decode is shared and counted apart)
    computed: int = 0                # rows that went through a forward pass (the rest came from the cache)
    cached: int = 0                  # rows read (and verified) from the cache
    cache_seconds: float = 0.0       # reading and verifying cached chunks
    cache_hit: bool = False          # every row came from the cache
    error: str | None = None         # why this candidate was dropped (on_error="skip"), else None
    loaded: bool = False             # the model was constructed in this run (False: answered from the cache)
    num_params: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def compute_throughput(self) -> float:
        """Images per second of the rows that went through a forward pass (0 when none did)."""
        if not self.computed:
            return 0.0
        return self.computed / self.seconds if self.seconds > 0 else float("inf")

    @property
    def throughput(self) -> float:
        """Images per second over all ``n`` rows: cached rows (read and verified) and recomputed ones."""
        total = self.seconds + self.cache_seconds
        return self.n / total if total > 0 else float("inf")


class CandidateFailed(InputError):
    """One candidate could not be extracted or scored (non-finite outputs, a forward pass that fails, a
    scorer that refuses its chunk); with ``on_error="skip"`` it is dropped and the rest carry on."""


def resolve_device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def transform_key(data_config: dict) -> str:
    return json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in sorted(data_config.items())})


class _Runner:
    """One candidate prepared for inference: device, memory format, precision policy, optional compile."""

    def __init__(self, candidate, options: ExtractOptions, device: torch.device, n: int, precision: str):
        self.candidate = candidate
        self.device = device
        module = candidate.module.to(device).eval()
        if options.channels_last:
            module = module.to(memory_format=torch.channels_last)
        self.channels_last = options.channels_last
        compile_ = options.compile
        if compile_ == "auto":
            compile_ = n >= options.compile_min_samples
        # compile the plain forward of the whole-model policies; the split policies switch precision with
        # hooks, which a compiled graph would not see
        self.compiled = bool(compile_) and precision in ("fp32", "bf16")
        target = candidate
        if self.compiled:
            target = _Compiled(candidate, torch.compile(candidate.forward))
        self.forward = make_forward(target, precision, device)

    def __call__(self, x: torch.Tensor):
        x = x.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            feats, logits = self.forward(x)
        return feats.float().cpu().numpy(), None if logits is None else logits.float().cpu().numpy()


class _Compiled:
    """A candidate whose ``forward`` is compiled (the rest is the candidate's)."""

    def __init__(self, candidate, forward):
        self._candidate, self.forward = candidate, forward

    def __getattr__(self, name):
        return getattr(self._candidate, name)


def extract(candidates, dataset, options: ExtractOptions | None = None, on_chunk=None,
            rows: int | None = None, on_error: str = "raise", on_done=None) -> dict[str, ExtractStats]:
    """Extract (features, logits, labels) of every candidate over the first ``rows`` rows of ``dataset``
    (all rows by default).

    ``candidates``: specs, :class:`~hubtune.hub.CandidateRef` (loaded at their turn) or loaded
    :class:`~hubtune.hub.Candidate` objects (used as they are; the caller keeps them resident).
    ``on_chunk(spec, features, logits, labels)`` is called for each chunk in row order, whether it came
    from the (verified) cache or from a forward pass. ``on_done(spec, stats)`` is called when a candidate is
    finished (or dropped) and may return a line for the progress display. Returns per-candidate statistics.

    A candidate that cannot be loaded, whose forward pass fails or gives NaN/Inf, or whose chunk ``on_chunk``
    refuses with an :class:`~hubtune.errors.InputError`, raises :class:`CandidateFailed` naming it
    (``on_error="raise"``); with ``on_error="skip"`` it is dropped, the reason is left in its
    ``stats[spec].error`` and the other candidates carry on. Non-finite outputs are never written to the cache.
    """
    if on_error not in ("raise", "skip"):
        raise InputError(f"on_error={on_error!r} must be 'raise' or 'skip'")
    options = options or ExtractOptions()
    device = resolve_device(options.device)
    cache = FeatureCache(options.cache_dir) if options.use_cache else None
    total = len(dataset)
    n = total if rows is None else min(int(rows), total)
    if n == 0:
        raise InputError(f"dataset {dataset.name} is empty; nothing to extract")
    progress = options.progress if options.progress is not None else sys.stderr.isatty()
    refs = [_as_ref(c) for c in candidates]
    stats = {r.spec: ExtractStats(spec=r.spec, n=n, num_classes=r.num_classes or 0, num_params=r.num_params or 0)
             for r in refs}
    display = _Display(n * len(refs), f"hub ({len(refs)} models)", progress)

    def fail(spec, e):
        if on_error == "raise":
            raise e
        stats[spec].error = str(e)

    def done(spec):
        line = on_done(spec, stats[spec]) if on_done is not None else _default_line(stats[spec])
        if line:
            display.write(line)

    precision = resolve_precision(options.precision, device)
    ctx = _Context(dataset, n, total, options, device, cache, precision, stats, on_chunk, fail, done, display)
    try:
        groups: dict[str, list] = {}
        for r in refs:
            if r.data_config is None:  # identity and transform are known only once loaded: load, note, free
                try:
                    _identify_by_loading(r)
                except CandidateFailed as e:
                    fail(r.spec, e)
                    done(r.spec)
                    continue
            groups.setdefault(transform_key(r.data_config), []).append(r)
        for tkey, group in groups.items():
            _extract_group(ctx, tkey, group)
    finally:
        display.close()
    return stats


@dataclass
class _Context:
    dataset: object
    n: int
    total: int
    options: ExtractOptions
    device: torch.device
    cache: FeatureCache | None
    precision: str
    stats: dict
    on_chunk: object
    fail: object
    done: object
    display: object

    def emit(self, spec, feats, logits, labels):
        st = self.stats[spec]
        st.feature_dim = int(feats.shape[1])
        if logits is not None:
            st.num_classes = int(logits.shape[1])
        if self.on_chunk is not None:
            try:
                self.on_chunk(spec, feats, logits, labels)
            except CandidateFailed:
                raise
            except InputError as e:
                raise CandidateFailed(f"{spec}: {e}") from e
        self.display.update(len(labels))


class _LoadedRef:
    """A candidate the caller loaded: used as it is (the caller keeps it resident)."""

    def __init__(self, candidate):
        self.candidate = candidate
        self.spec, self.identity, self.data_config = candidate.spec, candidate.identity, candidate.data_config
        self.num_params = getattr(candidate, "num_params", 0)
        self.num_classes = getattr(candidate, "num_classes", 0)

    def load(self):
        return self.candidate


def _as_ref(c):
    """A spec, a reference (anything with ``spec`` and ``load()``) or a loaded candidate (anything with
    ``spec``, ``module`` and ``forward``, like :class:`~hubtune.hub.Candidate`)."""
    from ..hub import identify_candidate

    if isinstance(c, str):
        return identify_candidate(c)
    if hasattr(c, "load") and hasattr(c, "spec"):
        return c
    if all(hasattr(c, a) for a in ("spec", "module", "forward", "data_config", "identity")):
        return _LoadedRef(c)
    raise InputError(f"cannot extract from a {type(c).__name__}; pass specs, CandidateRef or Candidate objects")


def _load(ref):
    """The candidate, or :class:`CandidateFailed` naming why it could not be loaded."""
    from ..errors import HubtuneError

    try:
        return ref.load()
    except HubtuneError as e:
        raise CandidateFailed(str(e)) from e
    except Exception as e:  # one bad candidate never sinks the hub
        raise CandidateFailed(f"{ref.spec}: could not be loaded ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:400]})") from e


def _identify_by_loading(ref) -> None:
    c = _load(ref)
    ref.identity, ref.data_config = c.identity, dict(c.data_config)
    ref.num_params, ref.num_classes = c.num_params, c.num_classes
    del c
    gc.collect()


def _check_finite(spec: str, feats: np.ndarray, logits, start: int) -> None:
    for what, a in (("features", feats), ("source logits", logits)):
        if a is not None and not np.isfinite(a).all():
            bad = int(np.flatnonzero(~np.isfinite(a).all(axis=tuple(range(1, a.ndim))))[0]) + start
            raise CandidateFailed(
                f"{spec}: its {what} are NaN or Inf (first at row {bad}); its weights are damaged or "
                "overflow at this precision: check the checkpoint, or try --precision fp32")


def _extract_group(ctx: _Context, tkey: str, group: list) -> None:
    """Candidates sharing one transform: replay what the (verified) cache holds without loading anything,
    then load the others in waves of ``max_resident`` and stream the decoded chunks through each wave."""
    from ..data import transform_for

    n, stats = ctx.n, ctx.stats
    entries, done, pending = {}, {}, []
    for r in group:
        entry = ctx.cache.entry(spec=r.spec, identity=r.identity, dataset=ctx.dataset.fingerprint,
                                transform=tkey, precision=ctx.precision) if ctx.cache else None
        entries[r.spec] = entry
        done[r.spec] = 0
        if entry is not None:
            try:
                done[r.spec] = entry.replay(lambda f, l, y, s=r.spec: ctx.emit(s, f, l, y), stop=n, total=ctx.total,
                                            labels=ctx.dataset.labels)
            except CandidateFailed as e:
                ctx.fail(r.spec, e)
                ctx.done(r.spec)
                continue
            stats[r.spec].cached = done[r.spec]
            stats[r.spec].cache_seconds = entry.read_seconds
        stats[r.spec].cache_hit = done[r.spec] >= n
        if done[r.spec] >= n:
            ctx.done(r.spec)
        else:
            pending.append(r)
    if not pending:
        return
    resident = ctx.options.max_resident or 1
    waves = [pending[i:i + resident] for i in range(0, len(pending), resident)]
    store = _DecodedStore(ctx.dataset, transform_for(group[0].data_config), n, ctx.options, ctx.device,
                          keep=len(waves) > 1)
    try:
        for i, wave in enumerate(waves):
            _run_wave(ctx, wave, store, entries, done, last=i == len(waves) - 1)
    finally:
        store.close()


def _run_wave(ctx: _Context, wave: list, store, entries: dict, done: dict, last: bool) -> None:
    options, stats, n = ctx.options, ctx.stats, ctx.n
    runners = {}
    for r in wave:
        try:
            candidate = _load(r)
            stats[r.spec].loaded = True
            stats[r.spec].num_params = candidate.num_params
            runners[r.spec] = _Runner(candidate, options, ctx.device, n, ctx.precision)
        except CandidateFailed as e:
            ctx.fail(r.spec, e)
            ctx.done(r.spec)
        except Exception as e:  # a module that cannot be moved, converted or compiled
            ctx.fail(r.spec, CandidateFailed(f"{r.spec}: could not prepare it for inference "
                                             f"({type(e).__name__}: {e})"))
            ctx.done(r.spec)
    for spec, runner in runners.items():
        stats[spec].extra = {"device": str(ctx.device), "precision": ctx.precision, "compiled": runner.compiled}
    live = list(runners)
    try:
        if live:
            start_row = min(done[s] for s in live)
            for start, images, labels in store.chunks(start_row, keep=not last):
                stop = start + len(labels)
                for spec in [s for s in live if done[s] < stop]:
                    try:
                        _forward_chunk(ctx, spec, runners[spec], entries[spec], images, labels, start, done)
                    except CandidateFailed as e:
                        ctx.fail(spec, e)
                        live.remove(spec)
                        ctx.done(spec)
                if not live:
                    break
        for spec in live:
            ctx.done(spec)
    finally:
        runners.clear()
        _release_memory(ctx.device)


def _release_memory(device: torch.device) -> None:
    """Give the freed models' memory back: collect, then ask glibc to return freed heap pages to the system
    (without it the peak RSS of a long hub creeps up with fragmentation), and empty the CUDA cache."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _forward_chunk(ctx: _Context, spec, runner, entry, images, labels, start, done) -> None:
    bs, st = ctx.options.batch_size, ctx.stats[spec]
    skip = max(0, done[spec] - start)  # rows this candidate already has (resumed mid-chunk)
    stop = start + len(labels)
    t0 = time.perf_counter()
    try:
        outs = [runner(images[b:b + bs]) for b in range(skip, len(images), bs)]
    except Exception as e:
        raise CandidateFailed(f"{spec}: its forward pass failed on rows {start + skip}..{stop - 1} "
                              f"({type(e).__name__}: {' '.join(str(e).split())[:400]})") from e
    st.seconds += time.perf_counter() - t0
    st.computed += len(images) - skip
    feats = np.concatenate([o[0] for o in outs])
    logits = None if outs[0][1] is None else np.concatenate([o[1] for o in outs])
    _check_finite(spec, feats, logits, start + skip)
    if entry is not None:
        entry.write_chunk(start + skip, feats, logits, labels[skip:], total=ctx.total)
    ctx.emit(spec, feats, logits, labels[skip:])
    done[spec] = stop


# ----------------------------------------------------------------------------------------- decoding
class _Rows(torch.utils.data.Dataset):
    """Row i of the dataset, decoded and transformed: what a DataLoader worker computes. A decode error is
    returned, not raised, so the main process raises it as it is (a typed error naming the image) rather
    than as a worker traceback."""

    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        try:
            return self.transform(self.dataset.image(i))
        except InputError as e:
            return e
        except Exception as e:  # noqa: BLE001 - a file that cannot be decoded
            return InputError(f"{self.dataset.name}[{i}] could not be decoded ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:300]}); fix or remove that image")


def _collate(items):
    for x in items:
        if isinstance(x, Exception):
            return x
    return torch.stack(items)


class _Batches:
    """The batches of row indices to decode; changed between passes (the loader's workers persist)."""

    def __init__(self):
        self.batches: list[list[int]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


class _DecodedStore:
    """The decoded chunks of one transform group: produced by a DataLoader (workers, pinned memory on a GPU)
    and, when later candidates of the group need them again (``keep``), kept in memory up to
    ``decoded_memory_mb`` and beyond that in a temporary folder up to ``decoded_disk_mb``; what fits nowhere
    is decoded again. Exactly the same float32 tensors either way, so every candidate sees the same input."""

    def __init__(self, dataset, transform, n: int, options: ExtractOptions, device: torch.device, keep: bool):
        self.dataset, self.n, self.options = dataset, n, options
        self.chunk = options.chunk_size
        self.keep = keep
        self.memory: dict[int, torch.Tensor] = {}
        self.disk: dict[int, str] = {}
        self.mem_bytes = self.disk_bytes = 0
        self.folder: str | None = None
        self.batch_sampler = _Batches()
        workers = options.workers_for(n)
        self.loader = torch.utils.data.DataLoader(
            _Rows(dataset, transform), batch_sampler=self.batch_sampler, num_workers=workers,
            collate_fn=_collate, pin_memory=device.type == "cuda", persistent_workers=workers > 0,
            prefetch_factor=4 if workers else None)
        self.decoded_rows = 0  # rows decoded (a row decoded twice counts twice)

    def chunks(self, start_row: int, keep: bool):
        """Yield (start, images, labels) for the chunks from the one holding ``start_row`` to the end; chunks
        start at multiples of ``chunk_size``, so every wave of the group shares them."""
        first = start_row - start_row % self.chunk
        bounds = [(a, min(a + self.chunk, self.n)) for a in range(first, self.n, self.chunk)]
        missing = [(a, b) for a, b in bounds if a not in self.memory and a not in self.disk]
        bs = self.options.batch_size
        self.batch_sampler.batches = [list(range(i, min(i + bs, b))) for a, b in missing for i in range(a, b, bs)]
        it = iter(self.loader) if missing else None
        for a, b in bounds:
            if a in self.memory:
                images = self.memory[a]
            elif a in self.disk:
                images = torch.from_numpy(np.load(self.disk[a]))
            else:
                parts, got = [], 0
                while got < b - a:
                    x = next(it)
                    if isinstance(x, Exception):
                        raise x
                    parts.append(x)
                    got += len(x)
                images = parts[0] if len(parts) == 1 else torch.cat(parts)
                self.decoded_rows += b - a
                if keep and self.keep:
                    self._put(a, images)
            yield a, images, np.asarray(self.dataset.labels[a:b])

    def _put(self, start: int, images: torch.Tensor) -> None:
        size = images.numel() * images.element_size()
        if self.mem_bytes + size <= self.options.decoded_memory_mb * 2**20:
            self.memory[start] = images
            self.mem_bytes += size
        elif self.disk_bytes + size <= self.options.decoded_disk_mb * 2**20:
            if self.folder is None:
                self.folder = tempfile.mkdtemp(prefix="hubtune-decoded-")
            path = os.path.join(self.folder, f"{start:09d}.npy")
            np.save(path, images.numpy())
            self.disk[start] = path
            self.disk_bytes += size

    def close(self) -> None:
        self.memory.clear()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
        self.loader = None  # stops persistent workers


# ----------------------------------------------------------------------------------------- progress
def _default_line(st: ExtractStats) -> str:
    if st.error:
        return f"skipped {st.spec}: {st.error}"
    rate = f"{st.compute_throughput:.0f} img/s" if st.computed else "cache hit"
    return f"{st.spec}: {st.n} rows, {rate}"


class _Display:
    """One bar for the hub (a tqdm bar when tqdm is installed) and one line per finished candidate."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.enabled, self.bar = enabled, None
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc=desc, unit="img", leave=False, dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, k: int) -> None:
        if self.bar is not None:
            self.bar.update(k)

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        elif self.enabled:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
