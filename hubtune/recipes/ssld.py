"""SSLD: distil on teacher-selected unlabelled data, then fine-tune (PaddleClas's semi-supervised label
distillation).

    >>> report = hubtune.ssld(teacher="local-dir:runs/teacher", student="mobilenetv3_small_100",
    ...                       dataset="fashion-mnist", max_samples=1000, unlabeled="fashion-mnist",
    ...                       per_class=500, distill_epochs=10, finetune_epochs=2, out="runs/ssld")

Cui et al., *Beyond Self-Supervision: A Simple Yet Effective Network Distillation Alternative to Improve
Backbones* (PaddleClas SSLD), arXiv:2103.05959, 2021. Their ablation credits unlabelled data selected by the
teacher with +1.4 top-1 on ImageNet, the final fine-tune on the labelled set with +0.4.

**Stages.** Each is a resumable step whose outputs are files under ``out`` (:data:`SSLD_STAGES`, in order):

1. ``scores/``: the teacher (eval mode, fp32, its own evaluation transform) over the pool, through hubtune's teacher
   cache (:func:`~hubtune.tuning.teachers.cache_teacher_outputs`): ``pool-logits.npy`` (float32 ``(1, n, C)``),
   ``pool-logits.fp.npy``, ``pool-logits.npy.json``; read back with :class:`~hubtune.tuning.teachers.TeacherCache`
   (which checks the teacher's identity). ``summary.json``: per-class counts of the teacher's argmax.
2. ``dedup/``: the pool rows removed, each with its reason (:func:`dedup_pool`): ``report.json`` (one entry per
   removed image: ``pool_index``, ``reason`` = ``exact-eval`` | ``near-eval`` | ``exact-labeled`` | ``exact-pool``,
   the matched index and the cosine), ``keep.npy`` (bool, one per pool row) and ``nearest.npz`` (for every pool row
   its nearest evaluation image in the teacher's embedding space and the cosine).
3. ``selection/``: ``selection.json``: ``per_class`` (k), the policies, ``counts`` (images per class),
   ``entries`` (``pool_index``, ``label``: the class it is trained under, ``classes``: every class whose top-k it is
   in, ``score``: the teacher's probability of ``label``), and ``selection.csv``, the same entries for a reader.
   :func:`select_top_k` makes it.
4. ``distill/``: a ``hubtune tune --method kd`` run (``model.safetensors``, ``config.json``, ``checkpoint.pt``,
   ``metrics.jsonl``, ``report.json``) on the labelled images plus the selected pool, **label-free**
   (``use_labels=False``: the loss is the soft term alone, on every image), loss ``skl`` | ``js`` | ``kl``,
   ``teacher_bn`` eval | train. With ``cache_teacher=True`` the teacher's outputs for the augmented training images
   are written first to ``distill-teacher/`` and replayed (refused with ``teacher_bn="train"``: batch statistics
   make the teacher's outputs depend on the batch, so they cannot be cached per image).
5. ``final/``: a ``hubtune tune --method kd`` run of the distilled model on the labelled set with the labels
   (``alpha_hard=1``, ``alpha_soft=finetune_alpha_soft``, default 0: plain cross-entropy; kd rather than
   ``finetune`` because ``finetune`` draws a new classifier, which would throw the distilled one away),
   ``finetune_epochs`` at ``finetune_lr`` (default ``lr / 10``); skipped with ``finetune_epochs=0``.

Every stage directory holds ``stage.json``, written last: the identity of the stage's inputs (settings, dataset
fingerprints, the teacher's cache key, the sha256 of the upstream files it read) and the sha256 of its outputs.
With ``resume=True`` a stage whose recorded inputs equal the current ones is skipped; its outputs are used as they
are on disk, so a user may replace ``selection/selection.json`` (say) by hand, and the stages after it, whose inputs
then differ, run again. A stage whose inputs changed runs again; a training stage interrupted mid-run continues
from its ``checkpoint.pt`` when its recorded inputs (``pending.json``) are the current ones. Every file is written
to a temporary name and renamed. ``out`` holding a run (``ssld.json`` or a stage directory) is refused unless
``resume`` or ``overwrite`` (which removes the stage directories and ``ssld.json``, nothing else).

**Choices the paper left open** (their selection and dedup code was never published):

* ``per_class`` (k) default: ``len(pool after dedup) // C``, a class-balanced selection about as large as the pool.
* ``candidates="all"`` (default): every pool image is a candidate for every class, ranked by the teacher's
  probability of that class (PaddleClas: "top-k per class"); ``"predicted"``: only the images the teacher predicts
  as that class (argmax, ties to the lower class), so a class the teacher predicts for fewer than k images gets all
  of them and no image can be in two classes' top-k.
* Ties: within a class, equal probabilities are ranked by pool index (lower first); the order is total, so the
  selection is a function of the scores alone.
* k larger than what a class can get: the class gets every candidate it has; it is not topped up from elsewhere.
* ``multi_assign`` (an image in the top-k of several classes): ``"first"`` (default): greedy in the order of the
  scores over all (image, class) pairs (ties: lower pool index, then lower class), each image goes to the first
  class that claims it and every class fills up to k from the images still free (disjoint, each class exactly
  ``min(k, candidates left)``); ``"all"``: independent top-k per class, the image is trained on once (under its
  most probable selecting class) and counted in every class that selected it; ``"drop"``: independent top-k per
  class, an image selected by two or more classes is left out (ambiguous), with no top-up.
* Dedup: an exact duplicate has the same decoded pixels (mode, size, bytes); near duplicates are found by cosine
  similarity of the teacher's penultimate features (:func:`~hubtune.tuning.models.penultimate_features`, evaluation
  transform) after subtracting the mean feature of the evaluation set (post-ReLU features are all positive, so raw
  cosines of unrelated images are high), at ``dedup_threshold`` (default 0.95); a brute-force blockwise search, no
  approximate index (exact, O(n_pool x n_eval x D)). The pool is also cleared of exact copies of the labelled
  training images (they are in the training set already) and of its own exact repeats (the first is kept).
* The distillation set is the labelled training images plus the selection, all distilled label-free (SSLD);
  temperature 1 (PaddleClas's DMLLoss has none). The final fine-tune is cross-entropy on the labelled set with the
  distilled classifier kept, at a tenth of the distillation learning rate.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import torch

from .._io import atomic_path, atomic_write_text, check_writable, write_json
from ..errors import ConfigError, InputError, OutputError

__all__ = ["ssld", "select_top_k", "dedup_pool", "SSLD_STAGES", "MULTI_ASSIGN", "CANDIDATES", "LOSSES"]

SSLD_STAGES = ("scores", "dedup", "selection", "distill", "final")
MULTI_ASSIGN = ("first", "all", "drop")
CANDIDATES = ("all", "predicted")
LOSSES = ("skl", "js", "kl")
STAGE_FORMAT = "hubtune-ssld-stage-v1"


# ---------------------------------------------------------------------------------------------- selection
def _check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"per_class={k!r} is invalid: give the number of pool images to select per class (>= 1)")
    return int(k)


def select_top_k(probs, k: int, multi_assign: str = "first", candidates: str = "all") -> dict:
    """Top-``k`` per class of a score matrix ``probs`` ``(n, C)`` (row i: the teacher's class probabilities for
    pool image i; rows of NaN are never selected). See the module docstring for the policies and the ties.

    Returns ``{"rows": int64 (m,), "labels": int64 (m,), "classes": [list of classes per row], "scores": float64
    (m,), "counts": int64 (C,)}``: the selected rows in increasing order, the class each is trained under, every
    class that selected it, the probability of ``labels``, and the images per class (``"all"``: memberships)."""
    P = np.asarray(probs, dtype=np.float64)
    if P.ndim != 2 or P.shape[1] < 1:
        raise InputError(f"probs must be a 2-D (n, C) score matrix, got shape {P.shape}")
    if multi_assign not in MULTI_ASSIGN:
        raise ConfigError(f"multi_assign={multi_assign!r} is invalid: choose one of {', '.join(MULTI_ASSIGN)}")
    if candidates not in CANDIDATES:
        raise ConfigError(f"candidates={candidates!r} is invalid: choose one of {', '.join(CANDIDATES)}")
    k = _check_k(k)
    n, C = P.shape
    valid = np.isfinite(P).all(axis=1)
    eligible = np.repeat(valid[:, None], C, axis=1)
    if candidates == "predicted" and n:
        arg = np.argmax(np.where(valid[:, None], P, -np.inf), axis=1)  # ties: the lower class
        eligible &= np.eye(C, dtype=bool)[arg]
    rows_idx = np.arange(n)
    member = np.zeros((n, C), dtype=bool)
    if multi_assign == "first":
        r, c = np.nonzero(eligible)
        order = np.lexsort((c, r, -P[r, c]))  # score descending, then pool index, then class
        taken = np.zeros(n, dtype=bool)
        counts = np.zeros(C, dtype=np.int64)
        full = 0
        for j in order:
            ri, ci = r[j], c[j]
            if taken[ri] or counts[ci] >= k:
                continue
            taken[ri], member[ri, ci] = True, True
            counts[ci] += 1
            if counts[ci] == k:
                full += 1
                if full == C:
                    break
    else:
        for ci in range(C):
            cand = rows_idx[eligible[:, ci]]
            order = np.lexsort((cand, -P[cand, ci]))  # score descending, then pool index
            member[cand[order[:k]], ci] = True
    n_sel = member.sum(axis=1)
    keep = n_sel == 1 if multi_assign == "drop" else n_sel >= 1
    rows = rows_idx[keep]
    Pm = np.where(member[rows], P[rows], -np.inf)
    labels = np.argmax(Pm, axis=1).astype(np.int64) if rows.size else np.zeros(0, dtype=np.int64)
    classes = [np.flatnonzero(member[i]).tolist() for i in rows]
    counts = member[keep].sum(axis=0).astype(np.int64)
    return {"rows": rows.astype(np.int64), "labels": labels, "classes": classes,
            "scores": P[rows, labels] if rows.size else np.zeros(0), "counts": counts}


# ---------------------------------------------------------------------------------------------- dedup
def _hashes(images, n: int) -> list[str]:
    from ..data.pool import image_hash

    return [image_hash(images.image(i)) for i in range(n)]


def _cosine_nearest(pool_f: np.ndarray, eval_f: np.ndarray, center: np.ndarray, block: int = 4096):
    """For each pool row, the index of its nearest evaluation row by cosine of the centred features, and the
    cosine (float64). Blockwise brute force."""
    def unit(f):
        f = f.astype(np.float64) - center
        nrm = np.linalg.norm(f, axis=1, keepdims=True)
        return f / np.where(nrm > 0, nrm, 1.0)

    e = unit(eval_f)
    idx = np.zeros(len(pool_f), dtype=np.int64)
    cos = np.full(len(pool_f), -np.inf)
    for s in range(0, len(pool_f), block):
        sim = unit(pool_f[s:s + block]) @ e.T
        idx[s:s + block] = np.argmax(sim, axis=1)
        cos[s:s + block] = sim[np.arange(sim.shape[0]), idx[s:s + block]]
    return idx, cos


def dedup_pool(pool_hashes, eval_hashes=(), labeled_hashes=(), pool_features=None, eval_features=None,
               threshold: float | None = 0.95) -> dict:
    """Which pool rows to drop, and why (the rule of the module docstring; the first matching reason wins, in
    the order exact-eval, exact-labeled, exact-pool, near-eval).

    ``*_hashes``: per-image content hashes (:func:`hubtune.data.pool.image_hash`); ``pool_features`` /
    ``eval_features``: the teacher's penultimate features ``(n, D)`` (None, or ``threshold=None``: exact
    duplicates only). Returns ``{"keep": bool (n_pool,), "removed": [{"pool_index", "reason", "match",
    "cosine"}], "nearest": int64 (n_pool,) or None, "cosine": float64 (n_pool,) or None, "counts": {...}}``."""
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not -1.0 <= float(threshold) <= 1.0):
        raise ConfigError(f"dedup_threshold={threshold!r} is invalid: give a cosine in [-1, 1] (e.g. 0.95), or "
                          "None for exact duplicates only")
    n = len(pool_hashes)
    keep = np.ones(n, dtype=bool)
    removed = []
    first_eval = {}
    for j, h in enumerate(eval_hashes):
        first_eval.setdefault(h, j)
    first_lab = {}
    for j, h in enumerate(labeled_hashes):
        first_lab.setdefault(h, j)
    seen = {}
    for i, h in enumerate(pool_hashes):
        if h in first_eval:
            keep[i] = False
            removed.append({"pool_index": i, "reason": "exact-eval", "match": int(first_eval[h]), "cosine": 1.0})
        elif h in first_lab:
            keep[i] = False
            removed.append({"pool_index": i, "reason": "exact-labeled", "match": int(first_lab[h]), "cosine": 1.0})
        elif h in seen:
            keep[i] = False
            removed.append({"pool_index": i, "reason": "exact-pool", "match": int(seen[h]), "cosine": 1.0})
        else:
            seen[h] = i
    nearest = cosine = None
    if threshold is not None and pool_features is not None and eval_features is not None and len(eval_features):
        pf, ef = np.asarray(pool_features), np.asarray(eval_features)
        if pf.ndim != 2 or ef.ndim != 2 or pf.shape[1] != ef.shape[1] or len(pf) != n:
            raise InputError(f"pool features {pf.shape} and eval features {ef.shape} must be (n_pool={n}, D) and "
                             "(n_eval, D) with the same D")
        nearest, cosine = _cosine_nearest(pf, ef, ef.astype(np.float64).mean(axis=0))
        for i in np.flatnonzero(keep & (cosine >= float(threshold))):
            keep[i] = False
            removed.append({"pool_index": int(i), "reason": "near-eval", "match": int(nearest[i]),
                            "cosine": float(cosine[i])})
    removed.sort(key=lambda r: r["pool_index"])
    counts = {r: sum(1 for x in removed if x["reason"] == r)
              for r in ("exact-eval", "near-eval", "exact-labeled", "exact-pool")}
    counts.update(pool=n, kept=int(keep.sum()), removed=len(removed))
    return {"keep": keep, "removed": removed, "nearest": nearest, "cosine": cosine, "counts": counts}


# ---------------------------------------------------------------------------------------------- stage files
def _sha_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _identity(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, arr, allow_pickle=False)


def _save_npz(path: Path, **arrays) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(buf.getvalue())


def _stage_fault(name: str) -> None:
    """Fault injection for the test suite: ``HUBTUNE_TEST_KILL_AFTER_SSLD_STAGE=NAME`` SIGKILLs this process right
    after stage NAME's ``stage.json`` is written (between two stages)."""
    if os.environ.get("HUBTUNE_TEST_KILL_AFTER_SSLD_STAGE") == name:
        os.kill(os.getpid(), signal.SIGKILL)


class _Stage:
    """One stage's folder: ``stage.json`` (inputs, identity, outputs' sha256) written last."""

    def __init__(self, out: Path, name: str, inputs: dict, outputs: tuple):
        self.name, self.dir, self.inputs, self.outputs = name, out / name, inputs, outputs
        self.identity = _identity(inputs)

    def record(self) -> dict | None:
        p = self.dir / "stage.json"
        if not p.is_file():
            return None
        try:
            rec = json.loads(p.read_text())
        except (OSError, ValueError):
            return None
        return rec if isinstance(rec, dict) and rec.get("format") == STAGE_FORMAT else None

    def done(self) -> bool:
        """Recorded with the current inputs and every output present (outputs edited by hand are accepted)."""
        rec = self.record()
        return (rec is not None and rec.get("identity") == self.identity
                and all((self.dir / f).is_file() for f in self.outputs))

    def output_hashes(self) -> dict:
        return {f: _sha_file(self.dir / f) for f in self.outputs}

    def finish(self, extra: dict | None = None) -> dict:
        rec = {"format": STAGE_FORMAT, "stage": self.name, "identity": self.identity, "inputs": self.inputs,
               "outputs": self.output_hashes(), "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        rec.update(extra or {})
        write_json(self.dir / "stage.json", rec)
        _stage_fault(self.name)
        return rec

    def start(self) -> None:
        """A stage about to (re)run: its old record goes first, so a half-redone stage is never taken as done."""
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "stage.json").unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- the recipe
def _teacher(teacher, device):
    """``(HubModel, data config, cache key)`` of the teacher, loaded exactly as ``kd`` loads it (a hub spec, a
    ``local-dir:`` of a tuned folder, a module, or ``serve:NAME`` through :func:`served_teacher`)."""
    from ..tuning.models import module_identity
    from ..tuning.teachers import SERVE_PREFIX, load_teacher, served_teacher, teacher_view_key

    src = served_teacher(teacher) if isinstance(teacher, str) and teacher.startswith(SERVE_PREFIX) else teacher
    hm, cfg = load_teacher(src, "teacher", True)
    if cfg is None:
        raise ConfigError(f"teacher {teacher!r} carries no data config (input size, mean, std), so its pool images "
                          "cannot be prepared: give a hub spec or a timm model")
    if device is not None and any(True for _ in hm.module.parameters()):
        hm.module.to(device)
    key = teacher_view_key(hm.identity or module_identity(hm.module), cfg, None)
    return hm, cfg, key


def _feature_module(hm, teacher):
    """The module whose penultimate features embed images for dedup: the teacher (a served teacher answers them
    from its service's ``features`` endpoint)."""
    module = hm.module
    if not (hasattr(module, "forward_features") and hasattr(module, "forward_head")):
        raise ConfigError(f"teacher {teacher!r} ({type(module).__name__}) is not a timm model, so it has no "
                          "penultimate features for near-duplicate dedup; pass dedup_threshold=None (exact "
                          "duplicates only)")
    return module


@torch.no_grad()
def _features(module, images, transform, batch_size: int, device) -> np.ndarray:
    from ..data.pool import PoolView
    from ..tuning.models import penultimate_features

    was = module.training
    module.eval()
    dev = torch.device(device) if device is not None else next(
        (p.device for p in module.parameters()), torch.device("cpu"))
    out = []
    try:
        for x in torch.utils.data.DataLoader(PoolView(images, transform), batch_size=batch_size, shuffle=False):
            out.append(penultimate_features(module, x.to(dev)).float().cpu())
    finally:
        module.train(was)
    return torch.cat(out).numpy() if out else np.zeros((0, 0), dtype=np.float32)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _prepare_out(out, resume: bool, overwrite: bool) -> Path:
    if resume and overwrite:
        raise ConfigError("resume=True continues the recipe in out and overwrite=True replaces it; choose one")
    out = check_writable(out)
    held = [p for p in ("ssld.json",) + SSLD_STAGES + ("distill-teacher",) if (out / p).exists()]
    if held and not resume and not overwrite:
        raise OutputError(f"{out} already holds an SSLD run ({', '.join(held)}); pass --resume (resume=True) to "
                          "continue it, --overwrite (overwrite=True) to replace it, or choose a new --out")
    if overwrite:
        for p in held:
            try:
                if (out / p).is_dir():
                    shutil.rmtree(out / p)
                else:
                    (out / p).unlink()
            except OSError as e:
                raise OutputError(f"could not remove {out / p} to overwrite the run: {e.strerror}; remove it "
                                  "yourself or choose a new --out") from None
    return out


def _run_tune(stage: _Stage, log, **kwargs) -> dict:
    """A training stage through :func:`hubtune.tune`: continued from its checkpoint when ``pending.json`` holds
    the current inputs, else started afresh (hubtune's run files in the stage folder replaced)."""
    from ..tuning.api import tune

    pend = stage.dir / "pending.json"
    same = False
    if pend.is_file():
        try:
            same = json.loads(pend.read_text()).get("identity") == stage.identity
        except (OSError, ValueError):
            same = False
    resume = same and (stage.dir / "checkpoint.pt").is_file()
    if not resume:
        stage.start()
        write_json(pend, {"format": STAGE_FORMAT, "stage": stage.name, "identity": stage.identity,
                          "inputs": stage.inputs})
    log(f"{stage.name}: {'resuming from checkpoint.pt' if resume else 'training'} -> {stage.dir}")
    return tune(out=stage.dir, resume=resume or None, overwrite=(not resume) or None, **kwargs)


def _selection_entries(path: Path, n_pool: int, C: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        sel = json.loads(path.read_text())
        entries = sel["entries"]
        rows = np.asarray([int(e["pool_index"]) for e in entries], dtype=np.int64)
        labels = np.asarray([int(e["label"]) for e in entries], dtype=np.int64)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{path} is not a readable selection ({type(e).__name__}: {e}); it needs "
                         "{'entries': [{'pool_index': i, 'label': c}, ...]}: repair it, or rerun with --overwrite") \
            from None
    if rows.size and (rows.min() < 0 or rows.max() >= n_pool or labels.min() < 0 or labels.max() >= C):
        raise InputError(f"{path} selects pool index {int(rows.max())} / class {int(labels.max())}, outside the pool "
                         f"of {n_pool} images or the {C} classes: repair it, or rerun with --overwrite")
    return rows, labels


def ssld(*, teacher, student, dataset, unlabeled, out, per_class: int | None = None, multi_assign: str = "first",
         candidates: str = "all", dedup_against=None, dedup_threshold: float | None = 0.95, loss: str = "skl",
         temperature: float = 1.0, teacher_bn: str = "eval", distill_epochs: int = 10, finetune_epochs: int = 2,
         eval_dataset=None, max_samples: int | None = None, data_dir=None, pool_split: str = "train",
         pool_key: str | None = None, batch_size: int = 32, lr: float = 0.01, finetune_lr: float | None = None,
         seed: int = 0, augment=None, cache_teacher: bool = False, student_pretrained: bool = True,
         device: str | None = None, train: dict | None = None, score_batch_size: int = 64,
         finetune_alpha_soft: float = 0.0, resume: bool = False, overwrite: bool = False, verbose: bool = False,
         progress: bool | None = None) -> dict:
    """Run the SSLD recipe (module docstring) and return its summary (also ``OUT/ssld.json``).

    ``teacher``: whatever ``hubtune tune --method kd --teacher`` takes (a hub spec, ``local-dir:`` of a tuned
    folder, ``serve:NAME``, a timm model), a classifier for ``dataset``'s classes. ``student``: a spec or timm
    model (``student_pretrained=False``: a spec built without its weights). ``dataset``: the labelled set (its
    train split, at most ``max_samples`` images, stratified, as ``tune`` takes it); evaluation: ``eval_dataset``
    or its test split, as ``tune``. ``unlabeled``: the pool (:func:`hubtune.data.pool.create_pool`: a registered
    dataset whose ``pool_split`` is read with labels ignored, ``images:PATH``, an ImageDataset or a torch
    Dataset). ``dedup_against``: the set the pool is cleared of (default: the evaluation set; ``False``: no
    evaluation dedup). ``train``: further TrainConfig fields for both training stages (e.g. ``weight_decay``).
    ``finetune_lr``: default ``lr / 10``; ``finetune_alpha_soft``: weight of the distillation term kept in the final
    fine-tune (default 0: cross-entropy alone)."""
    from ..data.augment import train_transform_for
    from ..data.pool import SelectionDataset, create_pool
    from ..data.transforms import transform_for
    from ..tuning.api import augment_config, eval_dataset_for, train_dataset
    from ..tuning.engine import TrainConfig
    from ..tuning.methods.kd import TEACHER_BN_MODES
    from ..tuning.teachers import TeacherCache, cache_teacher_outputs

    t_start = time.perf_counter()

    def log(msg):
        if verbose:
            print(f"ssld: {msg}", flush=True)

    # ---- settings, checked before anything heavy
    if multi_assign not in MULTI_ASSIGN:
        raise ConfigError(f"multi_assign={multi_assign!r} is invalid: choose one of {', '.join(MULTI_ASSIGN)}")
    if candidates not in CANDIDATES:
        raise ConfigError(f"candidates={candidates!r} is invalid: choose one of {', '.join(CANDIDATES)}")
    if loss not in LOSSES:
        raise ConfigError(f"loss={loss!r} is invalid: choose skl (PaddleClas's symmetric KL, SSLD's 'JS'), js (the "
                          "true Jensen-Shannon) or kl")
    if teacher_bn not in TEACHER_BN_MODES:
        raise ConfigError(f"teacher_bn={teacher_bn!r} is invalid: choose eval (running statistics) or train (SSLD: "
                          "batch statistics)")
    if cache_teacher and teacher_bn == "train":
        raise ConfigError("cache_teacher=True cannot be combined with teacher_bn='train': with batch statistics the "
                          "teacher's output for an image depends on the rest of its batch, so it cannot be cached "
                          "per image; use teacher_bn='eval' with the cache, or drop cache_teacher")
    if isinstance(teacher, str) and teacher.startswith("serve:") and (cache_teacher or teacher_bn == "train"):
        raise ConfigError(f"teacher={teacher!r} is a service: it answers logits in eval mode, live; drop "
                          "cache_teacher and teacher_bn='train' (or give the teacher's spec instead)")
    if per_class is not None:
        per_class = _check_k(per_class)
    for nm, v, lo in (("distill_epochs", distill_epochs, 1), ("finetune_epochs", finetune_epochs, 0),
                      ("score_batch_size", score_batch_size, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ConfigError(f"{nm}={v!r} is invalid: give a whole number >= {lo}")
    for nm, v, lo_ok in (("temperature", temperature, False), ("finetune_alpha_soft", finetune_alpha_soft, True)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v < 0 or (v == 0
                                                                                                    and not lo_ok):
            raise ConfigError(f"{nm}={v!r} is invalid: give a finite number {'>= 0' if lo_ok else '> 0'}")
    if dedup_threshold is not None:
        dedup_pool([], threshold=dedup_threshold)  # validates the threshold
    finetune_lr = float(finetune_lr) if finetune_lr is not None else float(lr) / 10
    train = dict(train or {})
    for k in ("epochs", "lr", "out_dir", "resume", "overwrite", "seed", "batch_size"):
        if k in train:
            raise ConfigError(f"train={{{k!r}: ...}}: give {k} as ssld's own argument (distill_epochs, "
                              "finetune_epochs, lr, finetune_lr, out, resume, overwrite, seed, batch_size)")
    TrainConfig(epochs=distill_epochs, lr=lr, batch_size=batch_size, seed=seed, device=device, **train)  # checks
    TrainConfig(epochs=max(finetune_epochs, 1), lr=finetune_lr, batch_size=batch_size, seed=seed, device=device,
                **train)
    aug = augment_config(augment)
    out = _prepare_out(out, bool(resume), bool(overwrite))

    # ---- the data: labelled train / eval exactly as tune builds them, the pool, the dedup set
    labeled, _ = train_dataset(dataset, None, data_dir=data_dir, max_samples=max_samples, seed=seed,
                               eval_dataset=eval_dataset)
    eval_ds, _ = eval_dataset_for(dataset, None, data_dir=data_dir, seed=seed, eval_dataset=eval_dataset)
    C = int(labeled.num_classes)
    pool = create_pool(unlabeled, split=pool_split, data_dir=data_dir, key=pool_key)
    if dedup_against is False or dedup_against == "none":
        dd_ds = None
    elif dedup_against is None:
        dd_ds = eval_ds
    else:
        from ..data import create_dataset

        dd_ds = create_dataset(dedup_against, split="test", data_dir=data_dir)
    hm, t_cfg, t_key = _teacher(teacher, device)
    t_transform = transform_for(t_cfg)
    log(f"labelled {len(labeled)} images ({C} classes), evaluation {len(eval_ds)}, pool {len(pool)}, "
        f"dedup against {len(dd_ds) if dd_ds is not None else 0}")
    summary = {"format": "hubtune-ssld-v1", "out": str(out), "stages": {}}
    stage_info = summary["stages"]

    def mark(stage, ran, t0, **extra):
        stage_info[stage.name] = {"ran": ran, "identity": stage.identity, "seconds": time.perf_counter() - t0,
                                  **extra}
        log(f"{stage.name}: {'done' if ran else 'skipped (inputs unchanged)'}")

    # ---- 1. scores
    t0 = time.perf_counter()
    st = _Stage(out, "scores", {"teacher": t_key, "pool": pool.fingerprint, "classes": C},
                ("pool-logits.npy", "pool-logits.fp.npy", "pool-logits.npy.json", "summary.json"))
    ran = not (resume and st.done())
    if ran:
        st.start()
        log(f"scores: the teacher over {len(pool)} pool images")
        from ..data.pool import PoolView

        cache_teacher_outputs(hm, PoolView(pool, t_transform), st.dir / "pool-logits.npy",
                              batch_size=score_batch_size, device=device)
    cache = TeacherCache(st.dir / "pool-logits.npy", t_key, verify=False)
    logits = np.asarray(cache.rows[0], dtype=np.float32)
    if logits.shape != (len(pool), C):
        raise ConfigError(f"the teacher gives {logits.shape[1]} scores per image but {dataset!r} has {C} classes: "
                          "SSLD needs a teacher for the labelled task (fine-tune it first: hubtune tune --method "
                          "finetune)")
    probs = _softmax(logits)
    if ran:
        pred = np.bincount(np.argmax(probs, 1), minlength=C)
        write_json(st.dir / "summary.json", {"n": len(pool), "num_classes": C, "teacher_cache_key": t_key,
                                             "predicted_per_class": pred.tolist(),
                                             "mean_max_probability": float(probs.max(1).mean())})
        st.finish()
    mark(st, ran, t0)
    scores_sha = _sha_file(st.dir / "pool-logits.npy")

    # ---- 2. dedup
    t0 = time.perf_counter()
    st = _Stage(out, "dedup", {"teacher": t_key, "pool": pool.fingerprint,
                               "against": dd_ds.fingerprint if dd_ds is not None else None,
                               "labeled": labeled.fingerprint, "threshold": dedup_threshold},
                ("report.json", "keep.npy", "nearest.npz"))
    ran = not (resume and st.done())
    if ran:
        st.start()
        log("dedup: content hashes" + (" and teacher embeddings" if dd_ds is not None and dedup_threshold
                                       is not None else ""))
        ph = _hashes(pool, len(pool))
        eh = _hashes(dd_ds, len(dd_ds)) if dd_ds is not None else []
        lh = _hashes(labeled, len(labeled))
        pf = ef = None
        if dd_ds is not None and dedup_threshold is not None:
            fm = _feature_module(hm, teacher)
            pf = _features(fm, pool, t_transform, score_batch_size, device)
            ef = _features(fm, dd_ds, t_transform, score_batch_size, device)
        res = dedup_pool(ph, eh, lh, pf, ef, dedup_threshold)
        _save_npy(st.dir / "keep.npy", res["keep"])
        _save_npz(st.dir / "nearest.npz",
                  eval_index=res["nearest"] if res["nearest"] is not None else np.zeros(0, np.int64),
                  cosine=res["cosine"] if res["cosine"] is not None else np.zeros(0))
        write_json(st.dir / "report.json", {"threshold": dedup_threshold, "counts": res["counts"],
                                            "against": getattr(dd_ds, "name", None), "removed": res["removed"]})
        st.finish({"counts": res["counts"]})
    keep = np.load(st.dir / "keep.npy", allow_pickle=False)
    if keep.shape != (len(pool),) or keep.dtype != bool:
        raise InputError(f"{st.dir / 'keep.npy'} holds {keep.dtype} {keep.shape}, not one bool per pool image "
                         f"({len(pool)}): repair it, or rerun with --overwrite")
    dd_counts = json.loads((st.dir / "report.json").read_text()).get("counts", {})
    mark(st, ran, t0, counts=dd_counts)
    keep_sha = _sha_file(st.dir / "keep.npy")

    # ---- 3. selection
    t0 = time.perf_counter()
    k = per_class if per_class is not None else max(1, int(keep.sum()) // C)
    st = _Stage(out, "selection", {"scores": scores_sha, "keep": keep_sha, "per_class": k,
                                   "multi_assign": multi_assign, "candidates": candidates},
                ("selection.json", "selection.csv"))
    ran = not (resume and st.done())
    if ran:
        st.start()
        P = probs.copy()
        P[~keep] = np.nan
        sel = select_top_k(P, k, multi_assign, candidates)
        entries = [{"pool_index": int(r), "label": int(lab), "classes": cl, "score": float(s)}
                   for r, lab, cl, s in zip(sel["rows"], sel["labels"], sel["classes"], sel["scores"])]
        names = labeled.classes or [str(c) for c in range(C)]
        write_json(st.dir / "selection.json", {
            "per_class": k, "multi_assign": multi_assign, "candidates": candidates, "n_selected": len(entries),
            "counts": {names[c]: int(sel["counts"][c]) for c in range(C)}, "entries": entries})
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["pool_index", "label", "class_name", "classes", "score"])
        for e in entries:
            w.writerow([e["pool_index"], e["label"], names[e["label"]], " ".join(map(str, e["classes"])),
                        f"{e['score']:.6g}"])
        atomic_write_text(st.dir / "selection.csv", buf.getvalue())
        st.finish()
    sel_json = json.loads((st.dir / "selection.json").read_text())
    rows, labels = _selection_entries(st.dir / "selection.json", len(pool), C)
    mark(st, ran, t0, per_class=k, n_selected=int(rows.size), counts=sel_json.get("counts"))
    sel_sha = _sha_file(st.dir / "selection.json")

    # ---- 4. distill (label-free kd on labelled + selected)
    t0 = time.perf_counter()
    train_ds = SelectionDataset(labeled, pool, rows, labels)
    if isinstance(student, torch.nn.Module):  # trained on a copy: the caller's module stays as it was given
        import copy

        from ..tuning.models import module_identity

        student_name = f"{type(student).__name__}:{module_identity(student)}"
        student = copy.deepcopy(student)
    else:
        student_name = student if isinstance(student, str) else type(student).__name__
    common = {"batch_size": batch_size, "seed": seed, "device": device, "augment": json.loads(aug.key()),
              "train": train}
    st = _Stage(out, "distill", {"selection": sel_sha, "labeled": labeled.fingerprint, "pool": pool.fingerprint,
                                 "eval": eval_ds.fingerprint, "teacher": t_key, "student": str(student_name),
                                 "student_pretrained": bool(student_pretrained), "loss": loss,
                                 "temperature": float(temperature), "teacher_bn": teacher_bn,
                                 "epochs": distill_epochs, "lr": float(lr), "cache_teacher": bool(cache_teacher),
                                 **common}, ("model.safetensors", "config.json", "report.json"))
    ran = not (resume and st.done())
    if ran:
        kd_args = {}
        if cache_teacher:  # the teacher's outputs for the augmented training images, written once and replayed
            from ..tuning.models import load_model

            s_cfg = load_model(student, pretrained=False, role="student").data_config
            _, cached_ds = train_dataset(train_ds, train_transform_for(s_cfg, aug), seed=seed)
            cst = _Stage(out, "distill-teacher", dict(st.inputs, student_view=repr(sorted(s_cfg.items()))),
                         ("teacher.npy",))
            if not (resume and cst.done()):
                cst.start()
                log(f"distill-teacher: caching the teacher's outputs for {len(train_ds)} images")
                cache_teacher_outputs(hm, cached_ds,
                                      cst.dir / "teacher.npy", batch_size=score_batch_size, device=device,
                                      epochs=distill_epochs if aug.enabled else 1, input_config=s_cfg)
                cst.finish()
            kd_args = {"cache_teacher": True, "cache_path": str(cst.dir / "teacher.npy")}
        rep = _run_tune(st, log, method="kd", model=student, teacher=teacher, dataset=train_ds, eval_dataset=eval_ds,
                        num_classes=C, epochs=distill_epochs, lr=lr, batch_size=batch_size, seed=seed,
                        device=device, augment=augment,
                        train=dict(train, verbose=verbose, progress=progress),
                        kind=loss, temperature=temperature, alpha_hard=0.0, alpha_soft=1.0, use_labels=False,
                        teacher_bn=teacher_bn, pretrained=bool(student_pretrained), **kd_args)
        st.finish({"eval_acc": rep.get("final", {}).get("eval_acc")})
    d_rep = json.loads((st.dir / "report.json").read_text())
    mark(st, ran, t0, eval_acc=d_rep.get("final", {}).get("eval_acc"), n_train=len(train_ds))
    distilled_sha = _sha_file(st.dir / "model.safetensors")
    summary.update(distill_eval_acc=d_rep.get("final", {}).get("eval_acc"), model=str(st.dir))

    # ---- 5. final fine-tune on the labelled set
    if finetune_epochs > 0:
        t0 = time.perf_counter()
        st = _Stage(out, "final", {"distilled": distilled_sha, "dataset": str(dataset) if isinstance(dataset, str)
                                   else labeled.fingerprint, "labeled": labeled.fingerprint,
                                   "eval": eval_ds.fingerprint, "epochs": finetune_epochs, "lr": finetune_lr,
                                   "alpha_soft": float(finetune_alpha_soft), "teacher": t_key,
                                   "max_samples": max_samples, **common},
                    ("model.safetensors", "config.json", "report.json"))
        ran = not (resume and st.done())
        if ran:
            # kd with the labels (alpha_hard=1, alpha_soft=finetune_alpha_soft): the `finetune` method would draw
            # a new head, throwing away the distilled classifier
            rep = _run_tune(st, log, method="kd", model=f"local-dir:{out / 'distill'}", teacher=teacher,
                            dataset=dataset, eval_dataset=eval_dataset if eval_dataset is not None else
                            (None if isinstance(dataset, str) else eval_ds),
                            max_samples=max_samples, data_dir=data_dir, num_classes=C, epochs=finetune_epochs,
                            lr=finetune_lr, batch_size=batch_size, seed=seed, device=device, augment=augment,
                            train=dict(train, verbose=verbose, progress=progress), kind=loss,
                            temperature=temperature, alpha_hard=1.0, alpha_soft=float(finetune_alpha_soft),
                            use_labels=True, teacher_bn="eval")
            st.finish({"eval_acc": rep.get("final", {}).get("eval_acc")})
        f_rep = json.loads((st.dir / "report.json").read_text())
        mark(st, ran, t0, eval_acc=f_rep.get("final", {}).get("eval_acc"))
        summary.update(final_eval_acc=f_rep.get("final", {}).get("eval_acc"), model=str(st.dir))
    summary.update(settings={"teacher": str(teacher if isinstance(teacher, str) else type(teacher).__name__),
                             "student": str(student_name)[:80], "dataset": str(dataset), "unlabeled": pool.name,
                             "per_class": k, "multi_assign": multi_assign, "candidates": candidates,
                             "dedup_threshold": dedup_threshold, "loss": loss, "temperature": float(temperature),
                             "teacher_bn": teacher_bn, "distill_epochs": distill_epochs,
                             "finetune_epochs": finetune_epochs, "lr": float(lr), "finetune_lr": finetune_lr,
                             "seed": seed, "max_samples": max_samples, "cache_teacher": bool(cache_teacher)},
                   n_labeled=len(labeled), n_pool=len(pool), n_selected=int(rows.size), dedup=dd_counts,
                   seconds=time.perf_counter() - t_start)
    write_json(out / "ssld.json", summary)
    return summary
