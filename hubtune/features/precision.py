"""Precision policies for a candidate's forward pass, the error they put on a score, and tie bands.

Policies (``PRECISIONS``):

``fp32``
    Everything in float32; autocast is switched off even inside an outer autocast region.
``bf16``
    The whole ``Candidate.forward`` under bf16 autocast (hubtune's former default): the penultimate
    features come out rounded to bf16 (8 significant bits).
``bf16-trunk``
    bf16 autocast up to the last stage of the trunk; that stage, everything after it in
    ``forward_features`` (e.g. EfficientNet's ``conv_head``/``bn2``, ViT's ``norm``), pooling, pre-logits
    and the classifier run in float32 on a float32 copy of the stage's input. Measured: it removes the
    last bf16 roundings only, which is ~25% of the feature error of a random-init ResNet-18 but nothing
    on the pretrained EfficientNet-Lites, whose bf16 error is made in the first stages (BatchNorm after a
    bf16 convolution subtracts running means up to 8x the running std, amplifying the rounding).
``bf16-mid``
    ``bf16-trunk`` plus float32 for the stem and the stages of stride <= 8 (:func:`find_stem_end`): bf16
    only in the middle stages. Measured on EfficientNet-Lite: 4-14x smaller feature error than ``bf16``
    and LogME within ~1e-3 of fp32, but on a CPU without AMX as slow as ``fp32`` (the early,
    high-resolution stages are most of the time there).
``auto``
    :func:`resolve_precision`: ``fp32`` where bf16 is not supported and on CPUs without AMX (there
    ``bf16`` is 1.2-2.4x faster, but it moves LogME by 0.002-0.006 and its tie bands are wider than the
    gaps between the packaged EfficientNet-Lites, so it ties them all, and ``bf16-mid`` is no faster than
    fp32); ``bf16-mid`` on CPUs with AMX and on CUDA with bf16 (speed there not measured: no such device).

Where the fp32 tail starts (:func:`find_tail`): the module of the last entry of timm's ``feature_info``
(``blocks.6`` for EfficientNet, ``layer4`` for ResNet, ``blocks.11`` for ViT-S/Ti, ``stages.3`` for
ConvNeXt), else the last of ``layer4`` / ``stages`` / ``blocks`` / ``layers`` / ``features`` found as an
attribute, else none: then only ``forward_head`` and the classifier run in float32 (``tail="head"``).
The switch is a forward pre-hook on that module, registered for the duration of one call only (the
module is never modified): it casts the module's floating inputs to float32 and enters
``torch.autocast(enabled=False)``, which is left when ``forward_features`` returns. If the hook does not
fire (the module is not called through ``__call__``) the pass is still correct, with the trunk entirely
in bf16; ``forward.tail_fired`` says which happened on the last call.

The precision error of a score (:func:`probe_error`): a stratified probe of rows (256) is extracted in
the policy's precision and in float32 and scored on all its rows and on each half; the error is
:data:`PROBE_SAFETY` (4) × the largest |score difference| of the three. A score is a per-sample average
(LogME: of log evidence), but the difference a precision makes to it is not a per-sample average of
independent differences: it is a shift that depends on n (LogME's α, β are refitted on the rows given,
and the shift can grow with n) plus a part that depends on which rows are scored and flips sign from one
prefix to the next. So one probe difference can be 3x below the full-data one (bench, EfficientNet-Lite2
on digits: 0.0018 on 256 rows, 0.0059 on 1000); the halves sample the row-dependent part, and the factor
covers the growth with n. Bench (``bench/results/precision.json``, ``probe_rule``): the full-data
difference was at most 3.4x the probe's largest difference over 72 (model, dataset, precision, metric)
cases; ``4`` brackets all of them, ``2`` 65, a single probe difference × 4 only 67.

Ties (:func:`tie_groups`): candidates i and j are tied when their error intervals ``[s - e, s + e]``
overlap (``|s_i - s_j| <= e_i + e_j``); a tie group is a connected component of that relation, i.e. a
maximal run of candidates whose intervals chain together. Groups are contiguous in score order and every
member of a group scores above every member of the next, with disjoint intervals.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import InputError

PRECISIONS = ("auto", "fp32", "bf16", "bf16-trunk", "bf16-mid")
TAILS = ("stage", "block", "head")

#: error = PROBE_SAFETY * max |score(policy) - score(fp32)| over the probe and its halves. In the bench the
#: full-data difference was at most 3.4x that max (LogME; LEEP 1.05x), so 4 bracketed 72/72 cases, 2 only 65/72
PROBE_SAFETY = 4.0


# ----------------------------------------------------------------------------------------------- policy
def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles for bf16 (Sapphire Rapids and later): read from /proc/cpuinfo, or
    from torch's reported CPU capability elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "amx_bf16" in line.split()
    except OSError:
        pass
    try:
        return "AMX" in str(torch.backends.cpu.get_cpu_capability()).upper()
    except Exception:
        return False


def bf16_supported(device) -> bool:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def resolve_precision(precision: str, device) -> str:
    """The concrete policy (``fp32``, ``bf16`` or ``bf16-trunk``) for ``precision`` on ``device``.

    ``auto``: ``bf16-mid`` on CUDA with bf16 and on CPUs with AMX; ``fp32`` elsewhere (a CPU with
    avx512_bf16 but no AMX runs bf16 convolutions no faster than fp32, see the bench). An explicit
    ``bf16``/``bf16-trunk`` where bf16 is not supported raises :class:`InputError`."""
    if precision not in PRECISIONS:
        raise InputError(f"precision={precision!r} is not one of {', '.join(PRECISIONS)}")
    device = torch.device(device)
    if precision == "auto":
        if not bf16_supported(device):
            return "fp32"
        if device.type == "cuda" or (device.type == "cpu" and cpu_has_amx()):
            return "bf16-mid"
        return "fp32"
    if precision != "fp32" and not bf16_supported(device):
        raise InputError(f"precision={precision!r} needs bf16 support, which {device} lacks; use fp32 or auto")
    return precision


# -------------------------------------------------------------------------------------------- structure
def _last_child(m: torch.nn.Module, prefix: str) -> tuple[str, torch.nn.Module]:
    """Descend into the last child while ``m`` is a container (Sequential/ModuleList) of blocks."""
    while isinstance(m, (torch.nn.Sequential, torch.nn.ModuleList)) and len(m):
        i = len(m) - 1
        prefix, m = f"{prefix}.{i}", m[i]
    return prefix, m


def find_tail(module: torch.nn.Module, tail: str = "stage") -> tuple[str, torch.nn.Module] | None:
    """(name, submodule) where the float32 tail of ``bf16-trunk`` starts, or None when the structure is
    unknown (then only the head runs in float32).

    ``tail="stage"``: the last stage (timm's last ``feature_info`` module, else ``layer4``, the last of
    ``stages``/``blocks``/``layers``/``features``). ``tail="block"``: the last block of that stage (e.g.
    ``layer4.1`` of ResNet-18). ``tail="head"``: always None."""
    if tail not in TAILS:
        raise InputError(f"tail={tail!r} is not one of {', '.join(TAILS)}")
    if tail == "head":
        return None
    found = None
    entries = _feature_modules(module)
    if entries and entries[-1][0]:
        try:
            sub = module.get_submodule(entries[-1][0])
            if sub is not module:
                found = (entries[-1][0], sub)
        except AttributeError:
            found = None
    if found is None:
        layer4 = getattr(module, "layer4", None)
        if isinstance(layer4, torch.nn.Module):
            found = ("layer4", layer4)
        else:
            for attr in ("stages", "blocks", "layers", "features"):
                seq = getattr(module, attr, None)
                if isinstance(seq, (torch.nn.Sequential, torch.nn.ModuleList)) and len(seq):
                    found = (f"{attr}.{len(seq) - 1}", seq[len(seq) - 1])
                    break
    if found is None:
        return None
    return _last_child(found[1], found[0]) if tail == "block" else found


def _feature_modules(module) -> list[tuple[str, int]]:
    """(module name, reduction) of each entry of timm's ``feature_info``, [] when there is none."""
    info = getattr(module, "feature_info", None)
    if info is None:
        return []
    try:
        if hasattr(info, "module_name"):
            return [(info.module_name(i), int(info.reduction(i))) for i in range(len(info))]
        return [(e["module"], int(e.get("reduction", 0))) for e in info]
    except (AttributeError, KeyError, TypeError, ValueError):
        return []


def find_stem_end(module: torch.nn.Module, max_reduction: int = 8) -> tuple[str, torch.nn.Module] | None:
    """(name, submodule) after whose output ``bf16-mid`` switches bf16 on: the last ``feature_info`` stage
    of stride <= ``max_reduction`` (EfficientNet ``blocks.2``, ResNet ``layer2``, ConvNeXt ``stages.1``);
    None when there is none before the last stage (ViT: every block has stride 16) or no ``feature_info``."""
    entries = _feature_modules(module)
    early = [i for i, (_, r) in enumerate(entries[:-1]) if 0 < r <= max_reduction]
    if not early:
        return None
    name = entries[early[-1]][0]
    try:
        return name, module.get_submodule(name)
    except AttributeError:
        return None


# ---------------------------------------------------------------------------------------------- forward
@contextlib.contextmanager
def _no_tf32(device_type: str):
    """On CUDA, float32 convolutions and matmuls default to TF32 (10-bit mantissa): switch that off for the
    call, so that ``fp32`` (the reference of the probe) and the float32 parts of a split are float32."""
    if device_type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _to_float(v):
    if torch.is_tensor(v) and v.is_floating_point() and v.dtype != torch.float32:
        return v.float()
    if isinstance(v, tuple):
        return tuple(_to_float(a) for a in v)
    if isinstance(v, list):
        return [_to_float(a) for a in v]
    return v


@dataclass
class PrecisionForward:
    """``forward(x) -> (features float32 (B, D), logits float32 (B, C) or None)`` under one policy.

    Sets its own autocast state (an outer autocast region does not leak into ``fp32`` or the float32
    parts); gradients and ``inference_mode`` are the caller's. Attributes: ``precision`` (concrete),
    ``tail`` (the module name where float32 resumes, ``"head"`` when only the head is float32, None for
    ``fp32``/``bf16``), ``start`` (``bf16-mid``: the module after whose output bf16 starts; None: bf16 from
    the input), ``tail_fired`` (the float32 switch fired on the last call; None when there is none)."""

    candidate: object
    precision: str
    device_type: str
    tail: str | None = None
    tail_module: torch.nn.Module | None = field(default=None, repr=False)
    start: str | None = None
    start_module: torch.nn.Module | None = field(default=None, repr=False)
    tail_fired: bool | None = None
    _warned: bool = field(default=False, repr=False)

    def __call__(self, x: torch.Tensor):
        with _no_tf32(self.device_type):
            return self._call(x)

    def _call(self, x: torch.Tensor):
        if self.precision == "fp32":
            with torch.autocast(self.device_type, enabled=False):
                feats, logits = self.candidate.forward(x)
            return feats.float(), None if logits is None else logits.float()
        if self.precision == "bf16":
            with torch.autocast(self.device_type, dtype=torch.bfloat16):
                feats, logits = self.candidate.forward(x)
            return feats.float(), None if logits is None else logits.float()
        return self._split(x)

    def _split(self, x):
        m = self.candidate.module
        dev = self.device_type
        entered = []  # autocast contexts entered by the hooks, exited in reverse order
        state = {"off": False}

        def to_bf16(_mod, _args, _out):  # after the stem: bf16 from here on
            if not state["off"] and not entered:
                ctx = torch.autocast(dev, dtype=torch.bfloat16)
                ctx.__enter__()
                entered.append(ctx)

        def to_fp32(_mod, args, kwargs):  # the last stage and all after it: float32
            if state["off"]:
                return None
            ctx = torch.autocast(dev, enabled=False)
            ctx.__enter__()
            entered.append(ctx)
            state["off"] = True
            return _to_float(args), _to_float(kwargs)

        handles = []
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=self.start_module is None):
            try:
                if self.start_module is not None:
                    handles.append(self.start_module.register_forward_hook(to_bf16))
                if self.tail_module is not None:
                    handles.append(self.tail_module.register_forward_pre_hook(to_fp32, with_kwargs=True))
                h = m.forward_features(x)
            finally:
                for handle in handles:
                    handle.remove()
                for ctx in reversed(entered):
                    ctx.__exit__(None, None, None)
        if self.tail_module is not None:
            self.tail_fired = state["off"]
            if not state["off"] and not self._warned:
                self._warned = True
                warnings.warn(f"{getattr(self.candidate, 'spec', '?')}: {self.tail} was not called through "
                              "__call__, so the float32 switch did not fire: the rest of the trunk ran in "
                              "bf16 (the head is still float32)", stacklevel=3)
        with torch.autocast(dev, enabled=False):
            feats = m.forward_head(_to_float(h), pre_logits=True)
            feats = feats.reshape(feats.shape[0], -1)
            logits = m.get_classifier()(feats) if getattr(self.candidate, "num_classes", 0) else None
        return feats, logits


def make_forward(candidate, precision: str, device="cpu", tail: str = "stage") -> PrecisionForward:
    """The forward pass of ``candidate`` (a :class:`~hubtune.hub.Candidate`: ``.module`` with timm's
    ``forward_features``/``forward_head``/``get_classifier``, ``.num_classes``, ``.forward``) under
    ``precision`` (one of :data:`PRECISIONS`; ``auto`` is resolved for ``device``). ``tail`` (for
    ``bf16-trunk``/``bf16-mid``): where float32 resumes, see :func:`find_tail`. The module is neither moved
    nor modified (hooks live for one call); move it to ``device`` (and channels-last) yourself."""
    device = torch.device(device)
    concrete = resolve_precision(precision, device)
    fwd = PrecisionForward(candidate=candidate, precision=concrete, device_type=device.type)
    if concrete in ("bf16-trunk", "bf16-mid"):
        found = find_tail(candidate.module, tail)
        if found is None:
            fwd.tail = "head"
        else:
            fwd.tail, fwd.tail_module = found
        if concrete == "bf16-mid":
            stem = find_stem_end(candidate.module)
            if stem is not None and stem[1] is not fwd.tail_module:
                fwd.start, fwd.start_module = stem
    return fwd


# ------------------------------------------------------------------------------------------ probe error
def score_chunk(metrics, feats, logits, labels) -> dict[str, float]:
    """Score one block of rows with fresh estimators, feeding each what it takes (as ``rank`` does)."""
    from ..scoring import ESTIMATORS, create_estimator
    from ..scoring.leep import softmax

    out = {}
    for m in metrics:
        acc = create_estimator(m)
        kind = ESTIMATORS.get(m).input_kind
        if kind == "features":
            acc.update(feats, labels)
        else:
            if logits is None:
                raise InputError(f"{m} needs source logits and this candidate has no classifier head")
            acc.update(softmax(logits) if kind == "probs" else logits, labels)
        out[m] = float(acc.result().score)
    return out


@dataclass
class ProbeError:
    """``diffs[m]``: signed score differences (policy - fp32) on the whole probe (``"all"``) and on its
    first and second halves; ``diff[m]``: the largest of their absolute values; ``error[m]`` =
    ``safety`` × ``diff[m]``, the tie-band half-width for the full-data score; ``score``/``score_fp32``:
    the whole probe's scores; ``rows``: probe rows."""

    precision: str
    rows: int
    diff: dict[str, float]
    error: dict[str, float]
    score: dict[str, float]
    score_fp32: dict[str, float]
    diffs: dict[str, dict[str, float]] = field(default_factory=dict)


def _run(forward, images, batch_size, device):
    feats, logits = [], []
    with torch.inference_mode():
        for b in range(0, len(images), batch_size):
            x = images[b:b + batch_size].to(device)
            if x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            f, lg = forward(x)
            feats.append(f.float().cpu().numpy())
            if lg is not None:
                logits.append(lg.float().cpu().numpy())
    return np.concatenate(feats), (np.concatenate(logits) if logits else None)


def score_error(diff: float, safety: float = PROBE_SAFETY) -> float:
    """The tie-band half-width for a full-data score from the probe's largest |score difference|."""
    return float(safety) * abs(float(diff))


def band_from_diffs(diffs: dict, safety: float = PROBE_SAFETY) -> tuple[dict, dict]:
    """From :func:`probe_diffs`: per metric the largest |difference| over the probe and its halves, and the
    tie-band half-width :func:`score_error` makes of it."""
    diff = {m: max(abs(v) for v in d.values()) for m, d in diffs.items()}
    return diff, {m: score_error(d, safety) for m, d in diff.items()}


def probe_diffs(metrics, low, fp32, labels) -> dict[str, dict[str, float]]:
    """Signed score differences ``score(low) - score(fp32)`` per metric on all the probe rows (``"all"``)
    and on each half (``"first_half"``, ``"second_half"``); a half that cannot be scored (one class only)
    is left out. ``low``/``fp32``: (features, logits or None) of the same rows."""
    labels = np.asarray(labels)
    n = len(labels)
    parts = {"all": slice(0, n), "first_half": slice(0, n // 2), "second_half": slice(n // 2, n)}
    out = {m: {} for m in metrics}

    def cut(pair, sl):
        return pair[0][sl], None if pair[1] is None else pair[1][sl]

    for part, sl in parts.items():
        try:
            s_lo = score_chunk(metrics, *cut(low, sl), labels[sl])
            s_32 = score_chunk(metrics, *cut(fp32, sl), labels[sl])
        except InputError:
            if part == "all":
                raise
            continue
        for m in metrics:
            out[m][part] = s_lo[m] - s_32[m]
    return out


def probe_error(candidate, images: torch.Tensor, labels, precision: str, metrics=("logme",), device="cpu",
                batch_size: int = 64, low=None, safety: float = PROBE_SAFETY) -> ProbeError:
    """The precision error of each metric's score for ``candidate``.

    ``images`` (already transformed) and ``labels``: the probe, a *stratified* sample of the dataset (e.g.
    the first 256 rows of an order whose every prefix is stratified; the rows in file order of an image
    folder are sorted by class and will not do). They are passed through the model in float32 (and in
    ``precision``, unless ``low=(features, logits)`` gives the rows the extractor already computed) and
    scored: ``diff`` is the largest |score difference| over the whole probe and its two halves, ``error``
    = ``safety`` × ``diff``, the half-width of the tie band (rule and evidence: bench/results/precision.json).
    ``fp32`` has error 0 and costs nothing. Cost: one float32 pass over the probe."""
    device = torch.device(device)
    concrete = resolve_precision(precision, device)
    labels = np.asarray(labels)
    if len(labels) != len(images):
        raise InputError(f"probe_error: {len(images)} images but {len(labels)} labels")
    if concrete == "fp32":
        zero = {m: 0.0 for m in metrics}
        return ProbeError("fp32", len(labels), zero, dict(zero), {}, {})
    for m in metrics:  # refuse early, before any forward pass
        from ..scoring import ESTIMATORS

        if ESTIMATORS.get(m).input_kind != "features" and not getattr(candidate, "num_classes", 0):
            raise InputError(f"{m} needs source logits and this candidate has no classifier head")
    f32 = _run(make_forward(candidate, "fp32", device), images, batch_size, device)
    lo = low if low is not None else _run(make_forward(candidate, concrete, device), images, batch_size, device)
    diffs = probe_diffs(metrics, lo, f32, labels)
    diff, error = band_from_diffs(diffs, safety)
    s32 = score_chunk(metrics, f32[0], f32[1], labels)
    slo = {m: s32[m] + diffs[m]["all"] for m in metrics}
    return ProbeError(concrete, len(labels), diff, error, slo, s32, diffs)


# ------------------------------------------------------------------------------------------------- ties
def _check_band_inputs(scores: dict, errors: dict) -> None:
    missing = [k for k in scores if k not in errors]
    if missing:
        raise InputError(f"no precision error for {', '.join(map(str, missing))}")
    for k, s in scores.items():
        if not math.isfinite(float(s)):
            raise InputError(f"score of {k} is {s}; drop failed candidates before forming tie groups")
        e = float(errors[k])
        if math.isnan(e) or e < 0:
            raise InputError(f"precision error of {k} is {errors[k]}; it must be >= 0 (inf: unknown)")


def tie_groups(scores: dict[str, float], errors: dict[str, float]) -> list[list[str]]:
    """Candidates partitioned into tie groups, best group first, each best score first.

    i and j are tied when ``|s_i - s_j| <= e_i + e_j`` (their intervals ``[s - e, s + e]`` touch); the
    groups are the connected components of that relation (its transitive closure), so a group may hold two
    candidates that are not directly tied if a third bridges them. Consequences: groups are runs of the
    score order, and every interval of a group lies strictly above every interval of the next group, so an
    order between groups is never within the precision's error. ``errors`` must be >= 0 (``inf``: unknown,
    ties with everything); scores must be finite. Equal scores keep their insertion order."""
    _check_band_inputs(scores, errors)
    keys = list(scores)
    # sweep by the upper end of the interval, highest first; a new group starts when an interval's top is
    # below the lowest bottom of the group so far (then it is below every interval of the group).
    order = sorted(range(len(keys)), key=lambda i: -(float(scores[keys[i]]) + float(errors[keys[i]])))
    groups: list[list[str]] = []
    low = math.inf
    for i in order:
        k = keys[i]
        s, e = float(scores[k]), float(errors[k])
        if groups and s + e >= low:
            groups[-1].append(k)
            low = min(low, s - e)
        else:
            groups.append([k])
            low = s - e
    pos = {k: i for i, k in enumerate(keys)}
    return [sorted(g, key=lambda k: (-float(scores[k]), pos[k])) for g in groups]


def tie_labels(scores: dict[str, float], errors: dict[str, float]) -> dict[str, str]:
    """Per candidate, the ranks its tie group spans: ``"1"`` when it is alone, ``"2-4"`` when ranks 2..4
    are within the precision's error of each other (ranks by score, best = 1)."""
    out, start = {}, 1
    for g in tie_groups(scores, errors):
        label = str(start) if len(g) == 1 else f"{start}-{start + len(g) - 1}"
        out.update({k: label for k in g})
        start += len(g)
    return out
