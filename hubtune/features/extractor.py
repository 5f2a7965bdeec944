"""Batched, cached feature extraction for many candidates over one dataset.

Candidates that share a transform (timm data config) share the decoded images: each chunk of the dataset
is decoded and transformed once and fed to every candidate of the group that still needs it. Inference
runs under ``torch.inference_mode``, channels-last, with bf16 autocast where the CPU or GPU supports it,
and ``torch.compile`` when the dataset is large enough to repay compilation. A progress bar per
candidate and one for the whole hub show on a terminal (``progress=True`` forces them). Each chunk of
(features, source logits, labels) is written to the cache and handed to ``on_chunk`` as it is produced,
so scorers stream and memory stays bounded; a complete cache entry is replayed without a forward pass.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import InputError
from .cache import FeatureCache

PRECISIONS = ("auto", "bf16", "fp32")


@dataclass
class ExtractOptions:
    batch_size: int = 64
    chunk_size: int = 512            # rows decoded at once and written per cache file
    device: str | None = None        # None: cuda when available, else cpu
    precision: str = "auto"          # "auto": bf16 autocast where supported, else fp32
    channels_last: bool = True
    compile: str | bool = "auto"     # "auto": compile when the dataset has >= compile_min_samples rows
    compile_min_samples: int = 20000
    cache_dir: str | None = None
    use_cache: bool = True
    progress: bool | None = None     # None: show progress when stderr is a terminal

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise InputError(f"precision={self.precision!r} is not one of {', '.join(PRECISIONS)}")
        for name in ("batch_size", "chunk_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"{name}={v!r} (--{name.replace('_', '-')}) must be a positive integer")


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


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def transform_key(data_config: dict) -> str:
    return json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in sorted(data_config.items())})


class _Runner:
    """One candidate prepared for inference: device, memory format, autocast, optional compile."""

    def __init__(self, candidate, options: ExtractOptions, device: torch.device, n: int):
        self.candidate = candidate
        self.device = device
        module = candidate.module.to(device).eval()
        if options.channels_last:
            module = module.to(memory_format=torch.channels_last)
        self.bf16 = options.precision == "bf16" or (options.precision == "auto" and bf16_supported(device))
        self.channels_last = options.channels_last
        compile_ = options.compile
        if compile_ == "auto":
            compile_ = n >= options.compile_min_samples
        self.compiled = bool(compile_)
        self.forward = torch.compile(candidate.forward) if compile_ else candidate.forward

    def __call__(self, x: torch.Tensor):
        x = x.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            feats, logits = self.forward(x)
        return feats.float().cpu().numpy(), None if logits is None else logits.float().cpu().numpy()


def extract(candidates, dataset, options: ExtractOptions | None = None, on_chunk=None,
            rows: int | None = None, on_error: str = "raise") -> dict[str, ExtractStats]:
    """Extract (features, logits, labels) of every candidate over the first ``rows`` rows of ``dataset``
    (all rows by default).

    ``on_chunk(spec, features, logits, labels)`` is called for each chunk in row order, whether it came
    from the (verified) cache or from a forward pass. Returns per-candidate statistics.

    A candidate whose forward pass fails or gives NaN/Inf, or whose chunk ``on_chunk`` refuses with an
    :class:`~hubtune.errors.InputError`, raises :class:`CandidateFailed` naming it (``on_error="raise"``);
    with ``on_error="skip"`` it is dropped, the reason is left in its ``stats[spec].error`` and the other
    candidates carry on. Non-finite outputs are never written to the cache.
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
    stats = {c.spec: ExtractStats(spec=c.spec, n=n, num_classes=c.num_classes, feature_dim=c.num_features)
             for c in candidates}
    groups: dict[str, list] = {}
    for c in candidates:
        groups.setdefault(transform_key(c.data_config), []).append(c)
    user_emit = on_chunk or (lambda *a: None)
    hub_bar = _progress(n * len(candidates), f"hub ({len(candidates)} models)", progress, position=0)
    bars = {c.spec: _progress(n, c.spec, progress, position=i + 1) for i, c in enumerate(candidates)}

    def emit(spec, feats, logits, labels):
        try:
            user_emit(spec, feats, logits, labels)
        except CandidateFailed:
            raise
        except InputError as e:
            raise CandidateFailed(f"{spec}: {e}") from e
        bars[spec].update(len(labels))
        hub_bar.update(len(labels))

    def fail(spec, e):
        if on_error == "raise":
            raise e
        stats[spec].error = str(e)

    precision = options.precision if options.precision != "auto" else ("bf16" if bf16_supported(device) else "fp32")
    try:
        for tkey, group in groups.items():
            _extract_group(group, dataset, n, total, options, device, cache, tkey, precision, stats, emit, fail)
    finally:
        for bar in [*bars.values(), hub_bar]:
            bar.close()
    return stats


def _check_finite(spec: str, feats: np.ndarray, logits, start: int) -> None:
    for what, a in (("features", feats), ("source logits", logits)):
        if a is not None and not np.isfinite(a).all():
            bad = int(np.flatnonzero(~np.isfinite(a).all(axis=tuple(range(1, a.ndim))))[0]) + start
            raise CandidateFailed(
                f"{spec}: its {what} are NaN or Inf (first at row {bad}); its weights are damaged or "
                "overflow at this precision: check the checkpoint, or try --precision fp32")


def _extract_group(group, dataset, n, total, options, device, cache, tkey, precision, stats, emit, fail) -> None:
    """Candidates sharing one transform: replay what the (verified) cache holds, then decode each chunk once
    for all."""
    from ..data import transform_for

    entries, done, alive = {}, {}, []
    for c in group:
        entry = cache.entry(spec=c.spec, identity=c.identity, dataset=dataset.fingerprint,
                            transform=tkey, precision=precision) if cache else None
        entries[c.spec] = entry
        done[c.spec] = 0
        if entry is not None:
            try:
                done[c.spec] = entry.replay(lambda f, l, y, s=c.spec: emit(s, f, l, y), stop=n, total=total,
                                            labels=dataset.labels)
            except CandidateFailed as e:
                fail(c.spec, e)
                continue
            stats[c.spec].cached = done[c.spec]
            stats[c.spec].cache_seconds = entry.read_seconds
        stats[c.spec].cache_hit = done[c.spec] >= n
        alive.append(c)
    pending = [c for c in alive if done[c.spec] < n]
    if not pending:
        return
    transform = transform_for(group[0].data_config)
    runners = {}
    for c in pending:
        try:
            runners[c.spec] = _Runner(c, options, device, n)
        except Exception as e:  # a module that cannot be moved, converted or compiled
            fail(c.spec, CandidateFailed(f"{c.spec}: could not prepare it for inference ({type(e).__name__}: {e})"))
    pending = [c for c in pending if c.spec in runners]
    for spec, r in runners.items():
        stats[spec].extra = {"device": str(device), "bf16": r.bf16, "compiled": r.compiled}
    if not pending:
        return
    start_row = min(done[c.spec] for c in pending)
    for start in range(start_row, n, options.chunk_size):
        stop = min(start + options.chunk_size, n)
        need = [c for c in pending if done[c.spec] < stop]
        if not need:
            continue
        images = torch.stack([transform(dataset.image(i)) for i in range(start, stop)])
        labels = np.asarray(dataset.labels[start:stop])
        for c in need:
            skip = max(0, done[c.spec] - start)  # rows this candidate already has (resumed mid-chunk)
            t0 = time.perf_counter()
            try:
                try:
                    outs = [runners[c.spec](images[b:b + options.batch_size])
                            for b in range(skip, len(images), options.batch_size)]
                except Exception as e:
                    raise CandidateFailed(f"{c.spec}: its forward pass failed on rows {start + skip}..{stop - 1} "
                                          f"({type(e).__name__}: {' '.join(str(e).split())[:400]})") from e
                stats[c.spec].seconds += time.perf_counter() - t0
                stats[c.spec].computed += len(images) - skip
                feats = np.concatenate([o[0] for o in outs])
                logits = None if outs[0][1] is None else np.concatenate([o[1] for o in outs])
                _check_finite(c.spec, feats, logits, start + skip)
                if entries[c.spec] is not None:
                    entries[c.spec].write_chunk(start + skip, feats, logits, labels[skip:], total=total)
                emit(c.spec, feats, logits, labels[skip:])
            except CandidateFailed as e:
                fail(c.spec, e)
                pending.remove(c)
                continue
            done[c.spec] = stop
            stats[c.spec].feature_dim = feats.shape[1]


class _progress:
    """A tqdm bar when tqdm is installed and progress is wanted; otherwise silent."""

    def __init__(self, total: int, desc: str, enabled: bool, position: int = 0):
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc=desc, unit="img", leave=False, position=position)
            except ImportError:
                pass

    def update(self, k: int) -> None:
        if self.bar is not None:
            self.bar.update(k)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
