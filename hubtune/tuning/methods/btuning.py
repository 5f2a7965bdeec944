"""B-Tuning, Bayesian tuning from a LogME-weighted ensemble of teachers: ``@register_method("btuning")``.

You et al., "Ranking and Tuning Pre-trained Models: A New Paradigm for Exploiting Model Hubs", JMLR 2022.

Teachers are the top-K models of a LogME ranking, frozen and in eval mode. Teacher k's penultimate features
``f_k(x)`` (width D_k) are projected into the target label space by its LogME posterior mean ``m_k`` (C x D_k,
saved by ``hubtune rank --out`` in ``logme/*.npz``), and the teachers are mixed by their LogME scores::

    p_k(x) = m_k f_k(x)                      (C,)
    pi     = softmax(LogME_k / T)            T = 0.1 by default
    p(x)   = sum_k pi_k p_k(x)

The student (backbone f_s, a new head h) is projected the same way by its own LogME weights ``m_s``, computed
on its *pretrained* features (taken from the ranking when the student was ranked, else fitted by
:meth:`BTuning.fit_projection` before training) and held fixed while its backbone trains::

    q(x) = m_s f_s(x)
    L    = CE(h(f_s(x)), y) + lambda * MSE(q(x), p(x))          lambda = 100 by default

Choices the paper leaves open, each a parameter or documented here:

* MSE is the mean over the batch and the C columns (``F.mse_loss``), so lambda does not scale with C.
* A batch without ``"target"`` trains on the MSE term alone (``ce`` is 0).
* Teachers see the student's input re-expressed for their own data config (:class:`~hubtune.tuning.models.
  InputAdapter`: resize and re-normalise), so one decoded image serves every model.
* A class missing from a ranking's LogME columns (a subsample without it) gets a zero projection row.
* Optimiser defaults from the authors' code (:attr:`BTuning.train_defaults`, applied by :func:`hubtune.tune`
  beneath any config): SGD, Nesterov momentum 0.9, weight decay 5e-4, backbone lr 1e-3; the head trains at
  ``head_lr_mult`` = 10x.
* ``cache_teacher=True`` reads ``p(x)`` per sample (and per epoch, for an augmented training set) from a cache
  written by :func:`~hubtune.tuning.teachers.cache_teacher_outputs` ``(method.ensemble, train_dataset, path,
  epochs=E)`` or ``hubtune cache-teacher --ranking DIR --epochs E``; the cache is keyed by
  :meth:`TeacherEnsemble.cache_identity` (teacher weights, projections, pi and every teacher's input view), and
  verified per batch exactly as KD's teacher cache is. The method then keeps no teacher module at all (only that
  identity), so nothing is moved to the GPU or checkpointed; otherwise :meth:`BTuning.frozen_modules` names the
  ensemble, which the engine leaves out of ``checkpoint.pt``.
* **Served teachers.** ``teachers`` may name services deployed by ``hubtune serve-teacher`` (``serve:NAME``,
  a list, or one string ``"serve:A,serve:B"``; ``--teacher serve:A,serve:B`` on the command line). With a
  ranking, each service's model (the spec it reports) must be one of the ranked models, whose LogME weights and
  score it gets; ``top_k`` is then not used. The services answer penultimate features (their ``features``
  endpoint), and when every teacher is served :meth:`BTuning.batches` requests them ``serve_window`` batches
  ahead of training, as ``kd`` does with logits; each answer carries the teacher's identity, pinned for the run.
  ``cache_teacher`` is refused with services (cache the local teachers instead: ``hubtune cache-teacher``).
* **The ranking's dataset is checked.** :meth:`BTuning.from_ranking` compares the ranking's ``dataset_info``
  with the dataset being tuned (``dataset=``) and refuses another dataset or another number of classes (the
  LogME weights would project onto another task's labels), naming both and the cure
  (:func:`~hubtune.tuning.models.check_ranking_dataset`); ``allow_foreign_ranking=True`` turns that into a
  warning. A ranking written before hubtune recorded its dataset gives a warning.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import ConfigError
from ..method import MethodContext, MultiModelMethod, Setting, register_method
from ..models import (HubModel, InputAdapter, check_ranking_dataset, load_models, module_identity,
                      penultimate_features, ranking_top, view_of)
from ..teachers import SERVE_PREFIX, ServedTeacherModule, served_teacher, teacher_source


def projection_matrix(weights, columns, num_classes: int, width: int, name: str) -> torch.Tensor:
    """LogME posterior means ``weights`` (one row per entry of ``columns``) -> a float32 ``(num_classes, width)``
    matrix whose row c projects onto class c; rows of classes absent from ``columns`` are zero."""
    w = np.asarray(weights, dtype=np.float64)
    cols = np.arange(len(w)) if columns is None else np.asarray(columns).reshape(-1)
    if w.ndim != 2 or len(cols) != w.shape[0]:
        raise ConfigError(f"the LogME weights of {name} have shape {w.shape} for {len(cols)} columns; expected "
                          "(columns, features): re-run `hubtune rank --out DIR`")
    if w.shape[1] != width:
        raise ConfigError(f"the LogME weights of {name} are for {w.shape[1]}-wide features but the model gives "
                          f"{width}: the ranking was made with another model or version; re-run `hubtune rank`")
    if cols.size and (not np.issubdtype(cols.dtype, np.integer) or cols.min() < 0 or cols.max() >= num_classes):
        raise ConfigError(f"the LogME weights of {name} are for target columns {cols.tolist()[:10]} but the task "
                          f"has {num_classes} classes: rank on the dataset you tune on")
    out = np.zeros((num_classes, width))
    out[cols.astype(np.int64)] = w
    missing = num_classes - len(set(cols.tolist()))
    if missing:
        warnings.warn(f"{name}: {missing} of {num_classes} classes have no LogME weights (absent from the ranked "
                      "subsample); their projection rows are zero")
    return torch.from_numpy(out).float()


def mixture_weights(scores, temperature: float) -> torch.Tensor:
    """``pi = softmax(scores / T)`` in float64, returned as float32."""
    s = torch.as_tensor(np.asarray(scores, dtype=np.float64)) / float(temperature)
    return torch.softmax(s, dim=0).float()


class TeacherEnsemble(torch.nn.Module):
    """``p(x) = sum_k pi_k m_k f_k(a_k(x))``: frozen teachers (eval mode, no gradient), their fixed LogME
    projections and mixture weights. A module so that it can be cached like any KD teacher."""

    def __init__(self, teachers: list[HubModel], projections: list[torch.Tensor], pi: torch.Tensor,
                 input_config: dict):
        super().__init__()
        self.teachers = torch.nn.ModuleList([t.module for t in teachers])
        self.adapters = torch.nn.ModuleList([InputAdapter(input_config, t.data_config) for t in teachers])
        self.views = {"input": view_of(input_config), "teachers": [view_of(t.data_config) for t in teachers]}
        for i, p in enumerate(projections):
            self.register_buffer(f"proj{i}", p)
        self.register_buffer("pi", pi)
        for p in self.teachers.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)  # always eval: running BN statistics, no dropout

    def cache_identity(self) -> str:
        """The teacher-cache key: :func:`~hubtune.tuning.models.module_identity` of the ensemble (teacher weights,
        projections, pi) and the input views (the batches' data config and each teacher's), which the state
        dict does not hold."""
        payload = json.dumps({"ensemble": module_identity(self), "views": self.views}, sort_keys=True)
        return hashlib.sha256(("hubtune-btuning-ensemble-v1\n" + payload).encode()).hexdigest()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix([penultimate_features(t, a(x)) for t, a in zip(self.teachers, self.adapters)])

    @torch.no_grad()
    def mix(self, features: list[torch.Tensor]) -> torch.Tensor:
        """``sum_k pi_k m_k f_k`` from the teachers' features ``f_k`` (one ``(B, D_k)`` tensor each), on their
        device."""
        out = 0.0
        for i, f in enumerate(features):
            f = f.float()
            out = out + self.pi[i].to(f.device) * (f @ getattr(self, f"proj{i}").to(f.device).T)
        return out

    def served(self) -> bool:
        """Every teacher is a service (``serve:NAME``)."""
        return all(isinstance(t, ServedTeacherModule) for t in self.teachers)


@register_method("btuning")
class BTuning(MultiModelMethod):
    """Tune ``student`` on ``num_classes`` classes with the LogME-weighted teachers; see the module docstring.

    ``teachers``: specs, Candidates or timm models; ``teacher_weights``: their LogME posterior means, one
    ``(C_k, D_k)`` array each (or ``{"weights", "columns"}`` dicts as :meth:`Ranking.load` gives them);
    ``logme_scores``: their LogME scores. ``student_weights``: the student's own (same forms), or None to fit
    them with :meth:`fit_projection` before training. :meth:`from_ranking` builds all of it from a ranking.
    """

    train_defaults = {"optimizer": "sgd", "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4, "lr": 1e-3}
    teachers = ("teachers",)
    settings = {
        "temperature": Setting(0.1, "T of the teachers' mixture weights softmax(LogME / T)", float),
        "trade_off": Setting(100.0, "lambda, the weight of the MSE to the teachers' projection", float),
        "head_lr_mult": Setting(10.0, "the new head's LR multiplier", float),
        "cache_teacher": Setting(False, "read p(x) from a cache (`hubtune cache-teacher --ranking`)", bool),
        "cache_dir": Setting(None, "where the teacher cache is", (str, Path)),
        "cache_path": Setting(None, "the teacher cache file itself", (str, Path)),
        "verify_cache": Setting(True, "check every batch's inputs against the cache's fingerprints", bool),
        "max_student_params": Setting(None, "without model=: the best-ranked student with at most this many "
                                            "parameters", int),
        "allow_foreign_ranking": Setting(False, "warn instead of refusing a ranking made on another dataset", bool),
        "teacher_weights": Setting(None, "without a ranking (Python API): the teachers' LogME posterior means"),
        "logme_scores": Setting(None, "without a ranking (Python API): the teachers' LogME scores"),
        "student_weights": Setting(None, "the student's LogME weights (default: from the ranking, else fitted)"),
        "pretrained": Setting(True, "load a spec student's pretrained weights", bool),
        "serve_window": Setting(4, "serve:NAME teachers: requests kept in flight ahead of training", int),
        "serve_timeout": Setting(30.0, "serve:NAME teachers: seconds without an answer before a request stalls",
                                 float),
        "serve_on_stall": Setting("fail", "serve:NAME teachers: when no replica answers: fail, wait, or local "
                                          "(compute with the teacher loaded here)", str),
    }

    @classmethod
    def from_settings(cls, ctx: MethodContext) -> "BTuning":
        """From the ranking (``ctx.ranking``, top ``ctx.top_k`` teachers; ``ctx.model`` names the student), or from
        ``teachers=`` with ``teacher_weights`` and ``logme_scores`` (Python API)."""
        s = dict(ctx.settings)
        teachers = served_specs(ctx.teachers.get("teachers"))
        if ctx.ranking is not None:
            if teachers is not None and not all(isinstance(t, str) and t.startswith(SERVE_PREFIX)
                                                for t in teachers):
                raise ConfigError(f"method 'btuning' with ranking= takes its teachers from the ranking (top_k=), or "
                                  f"from services of ranked models (teacher='serve:A,serve:B'); got "
                                  f"teacher={ctx.teachers.get('teachers')!r}")
            for k in ("teacher_weights", "logme_scores"):
                if s.pop(k) is not None:
                    raise ConfigError(f"btuning: {k}= comes from the ranking; drop it, or drop ranking=")
            m = cls.from_ranking(ctx.ranking, int(ctx.top_k or 2), ctx.num_classes, student=ctx.model,
                                 dataset=ctx.dataset, served=teachers, **s)
        else:
            if teachers is None or s.get("teacher_weights") is None or s.get("logme_scores") is None:
                raise ConfigError("method 'btuning' takes its teachers and their LogME weights from a ranking: pass "
                                  "ranking= (a `hubtune rank --out` folder) and top_k=")
            if ctx.model is None:
                raise ConfigError("btuning without a ranking needs the student: pass model=")
            s.pop("max_student_params")
            s.pop("allow_foreign_ranking")
            m = cls(ctx.model, teachers, ctx.num_classes, **s)
        return m

    def __init__(self, student, teachers, num_classes: int, *, teacher_weights, logme_scores,
                 student_weights=None, temperature: float = 0.1, trade_off: float = 100.0,
                 head_lr_mult: float = 10.0, cache_teacher: bool = False, cache_dir=None, cache_path=None,
                 verify_cache: bool = True, pretrained: bool = True, serve_window: int = 4,
                 serve_timeout: float = 30.0, serve_on_stall: str = "fail"):
        super().__init__()
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ConfigError(f"BTuning num_classes={num_classes!r} is invalid: give a whole number >= 1")
        for nm, v, strict in (("temperature", temperature, True), ("trade_off", trade_off, False),
                              ("head_lr_mult", head_lr_mult, False)):
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (strict and v == 0):
                raise ConfigError(f"BTuning {nm}={v!r} is invalid: give a finite number {'> 0' if strict else '>= 0'}")
        (stu,) = load_models([student], pretrained=pretrained, role="student")
        if not hasattr(stu.module, "reset_classifier"):
            raise ConfigError(f"BTuning needs a timm student (reset_classifier), got {type(stu.module).__name__}")
        # the new head is drawn before the teachers load, so the student starts the same whatever the teachers
        # are (local models, whose construction draws from the RNG, or services, which do not)
        stu.module.reset_classifier(num_classes)
        teachers = served_specs(teachers)
        if isinstance(teachers, (list, tuple)) and any(isinstance(t, str) and t.startswith(SERVE_PREFIX)
                                                       for t in teachers):
            if cache_teacher or cache_path is not None:
                raise ConfigError("btuning: cache_teacher/cache_path cannot be combined with served teachers "
                                  "(serve:NAME): cache the local teachers (`hubtune cache-teacher --ranking`) or "
                                  "drop the cache")
            serve = {"window": serve_window, "timeout": serve_timeout, "on_stall": serve_on_stall}
            teachers = [served_teacher(t, **serve) if isinstance(t, str) and t.startswith(SERVE_PREFIX) else t
                        for t in teachers]
        tea = load_models(teachers, role="teachers")
        if any(t.module is stu.module for t in tea):
            raise ConfigError("BTuning got the same module as student and teacher; pass a copy (copy.deepcopy) "
                              "or a spec, which is loaded afresh")
        tw, scores = list(teacher_weights), [float(s) for s in logme_scores]
        if not (len(tw) == len(scores) == len(tea)):
            raise ConfigError(f"BTuning got {len(tea)} teachers, {len(tw)} teacher_weights and {len(scores)} "
                              "logme_scores; give one of each per teacher")
        if not all(math.isfinite(s) for s in scores):
            raise ConfigError(f"BTuning logme_scores={scores} must be finite numbers")
        self.num_classes, self.temperature, self.trade_off = num_classes, float(temperature), float(trade_off)
        self.head_lr_mult = float(head_lr_mult)
        self.data_config = dict(stu.data_config)
        self.student_name, self.teacher_names, self.logme_scores = stu.name, [t.name for t in tea], scores
        self.model_names = [stu.name] + self.teacher_names
        projections = [self._projection(w, t.name, _width(t.module, t.data_config))
                       for w, t in zip(tw, tea)]
        self.ensemble = TeacherEnsemble(tea, projections, mixture_weights(scores, self.temperature),
                                        self.data_config)
        self.student = stu.module
        self.student.train()
        self.register_buffer("student_proj", torch.zeros(0))
        if student_weights is not None:
            self.set_student_weights(student_weights)

        self.pi = self.ensemble.pi.tolist()
        self.model_name = self.student_name
        # the ensemble adapts its own inputs (one adapter per teacher), so the source gets no adapter
        self.teacher_source = teacher_source(self.ensemble, self.ensemble.cache_identity,
                                             cache_teacher=cache_teacher, cache_dir=cache_dir, cache_path=cache_path,
                                             verify_cache=verify_cache, num_classes=num_classes)
        self.needs_index = self.teacher_source.needs_index
        self.teacher_identity, self.cache_path = None, None
        if self.teacher_source.cached:
            self.teacher_identity, self.cache_path = self.teacher_source.cache.key, self.teacher_source.path
            self.ensemble = None  # neither moved to a device nor checkpointed: its outputs are on disk

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_ranking(cls, ranking, top_k: int, num_classes: int, *, student=None,
                     max_student_params: int | None = None, models=None, dataset=None,
                     allow_foreign_ranking: bool = False, served=None, **kwargs) -> "BTuning":
        """Teachers: the top ``top_k`` of ``ranking`` (a ``hubtune rank --out`` folder or a Ranking) with their
        LogME weights and scores. Student: ``student`` (a spec; its weights come from the ranking when it was
        ranked, else :meth:`fit_projection` must run before training), or the best-ranked candidate with at
        most ``max_student_params`` parameters, or the top-1. ``models``: Candidates already loaded (the ones
        given to :func:`hubtune.rank`, data configs included), used instead of loading the specs again; the
        student is a copy. ``dataset``: the training set (an ImageDataset, or its fingerprint): a ranking made
        on another dataset is refused unless ``allow_foreign_ranking`` (see the module docstring). ``served``:
        teacher services (``serve:NAME`` specs) of ranked models, used as the teachers instead of the top
        ``top_k`` (see the module docstring)."""
        rk, specs = ranking_top(ranking, top_k, "btuning", need_weights=not served)
        check_ranking_dataset(ranking, dataset, "btuning", allow_foreign=bool(allow_foreign_ranking))
        if served:
            serve = {k[len("serve_"):]: kwargs[k] for k in ("serve_window", "serve_timeout", "serve_on_stall")
                     if k in kwargs}
            teachers = [served_teacher(t, **serve) for t in served_specs(served)]
            specs = [ranked_spec_of(t, rk) for t in teachers]
        else:
            teachers = None
        by_spec = {c.spec: c for c in rk.candidates}
        metric = "logme" if "logme" in rk.metrics else rk.metrics[0]
        if student is None:
            fits = [c for c in rk.candidates if max_student_params is None or 0 < c.num_params <= max_student_params]
            if not fits:
                raise ConfigError(f"btuning: no ranked model has at most max_student_params={max_student_params} "
                                  f"parameters (smallest: {min(c.num_params for c in rk.candidates):,}); raise the "
                                  "budget or pass student=")
            student = fits[0].spec
        sw = kwargs.pop("student_weights", None)
        if sw is None:
            sw = rk.weights.get(student) if isinstance(student, str) else None
        if isinstance(student, str) and student in by_spec and sw is None:
            raise ConfigError(f"btuning: the ranking has no LogME weights for the student {student}")
        loaded = {m.spec: m for m in (models or [])}
        if teachers is None:
            teachers = [loaded.get(s, s) for s in specs]
        if isinstance(student, str) and student in loaded:
            c = loaded[student]
            student = HubModel(copy.deepcopy(c.module), dict(c.data_config), c.spec, c.identity, c.num_params)
        return cls(student, teachers, num_classes, teacher_weights=[rk.weights[s] for s in specs],
                   logme_scores=[by_spec[s].scores[metric] for s in specs], student_weights=sw, **kwargs)

    def _projection(self, w, name: str, width: int) -> torch.Tensor:
        if isinstance(w, dict):
            return projection_matrix(w["weights"], w.get("columns"), self.num_classes, width, name)
        return projection_matrix(w, None, self.num_classes, width, name)

    def set_student_weights(self, w) -> None:
        """Set the fixed student projection ``m_s`` (an array ``(C, D_s)`` or a ``{"weights", "columns"}`` dict)."""
        width = _width(self.student, self.data_config)
        self.student_proj = self._projection(w, f"student {self.student_name}", width).to(self.student_proj.device)

    @torch.no_grad()
    def fit_projection(self, dataset, batch_size: int = 64, device=None) -> None:
        """Fit the student's LogME weights on its current (pretrained) features over ``dataset`` (items
        ``(input, label)``), as ``hubtune rank`` would, and hold them fixed. Call before training."""
        from ...scoring.logme import LogME
        from ..engine import _as_batch

        dev = torch.device(device) if device is not None else self.student_proj.device
        was = self.student.training
        self.student.eval()
        acc = LogME(task="classification")
        try:
            for raw in torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False):
                b = _as_batch(raw)
                acc.update(penultimate_features(self.student, b["input"].to(dev)).float().cpu().numpy(),
                           b["target"].numpy())
        finally:
            self.student.train(was)
        res = acc.result()
        self.set_student_weights({"weights": res.weights, "columns": res.columns})

    def prepare(self, train_dataset, device=None) -> None:
        """Fit the student projection on ``train_dataset`` unless it came with the model (the ranking)."""
        if self.student_proj.numel() == 0:
            if device is not None:
                self.to(device)
            self.fit_projection(train_dataset)

    # ------------------------------------------------------------------ training
    def train(self, mode: bool = True):
        super().train(mode)
        if self.ensemble is not None:
            self.ensemble.eval()
        return self

    def frozen_modules(self) -> dict[str, torch.nn.Module]:
        """``{"ensemble": the teacher ensemble}`` (frozen teachers, fixed projections and pi): the engine keeps
        it out of ``checkpoint.pt``. Empty with ``cache_teacher=True``: no teacher module is held."""
        return {} if self.ensemble is None else {"ensemble": self.ensemble}

    def batches(self, batches):
        """With every teacher served, the teachers' features for the next ``serve_window`` batches are requested
        (from every service at once) while the student trains on this one, and ``p(x)`` is mixed from them;
        otherwise the batches as they come."""
        if self.ensemble is None or not self.ensemble.served():
            return batches
        keys = [f"teacher_features{i}" for i in range(len(self.ensemble.teachers))]
        for t, a, key in zip(self.ensemble.teachers, self.ensemble.adapters, keys):
            batches = t.pipeline(batches, adapter=a, output="features", key=key)

        def mixed(batches):
            for batch in batches:
                batch["teacher_logits"] = self.ensemble.mix([batch.pop(k) for k in keys])
                yield batch

        return mixed(batches)

    def on_epoch_start(self, epoch: int, total_epochs: int) -> None:
        """Remember the epoch (the cache row of augmented runs); a run longer than the cache fails here."""
        self.teacher_source.on_epoch_start(epoch, total_epochs)

    def param_groups(self, lr: float) -> list[dict]:
        head = list(self.student.get_classifier().parameters())
        ids = {id(p) for p in head}
        backbone = [p for p in self.student.parameters() if p.requires_grad and id(p) not in ids]
        return [{"params": backbone, "lr": lr, "lr_mult": 1.0, "name": "backbone"},
                {"params": [p for p in head if p.requires_grad], "lr": lr * self.head_lr_mult,
                 "lr_mult": self.head_lr_mult, "name": "head"}]

    def teacher_projection(self, batch: dict) -> torch.Tensor:
        """``p(x)``, ``(B, C)``: from the cache when there is one, else from the live teachers."""
        return self.teacher_source(batch)

    def losses(self, batch: dict) -> dict[str, torch.Tensor]:
        if self.student_proj.numel() == 0:
            raise ConfigError("BTuning has no student projection yet: pass student_weights= (from a ranking) or "
                              "call method.fit_projection(train_dataset) before training")
        x = batch["input"]
        f = penultimate_features(self.student, x)
        logits = self.student.get_classifier()(f).float()
        q = f.float() @ self.student_proj.T
        p = self.teacher_projection(batch).float().detach()
        mse = F.mse_loss(q, p)
        y = batch.get("target")
        ce = F.cross_entropy(logits, y) if y is not None else logits.new_zeros(())
        return {"total": ce + self.trade_off * mse, "ce": ce.detach(), "mse": mse.detach()}

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x)

    def model_to_save(self) -> torch.nn.Module:
        return self.student

    def hparams(self) -> dict:
        return {"num_classes": self.num_classes, "student": self.student_name, "teachers": self.teacher_names,
                "logme_scores": self.logme_scores, "pi": self.pi,
                "temperature": self.temperature, "trade_off": self.trade_off, "head_lr_mult": self.head_lr_mult,
                "cache_path": str(self.cache_path) if self.cache_path is not None else None,
                "teacher_identity": self.teacher_identity}


def served_specs(teachers):
    """``"serve:A,serve:B"`` -> ``["serve:A", "serve:B"]`` (a service name holds no comma); anything else as is."""
    if isinstance(teachers, str) and teachers.startswith(SERVE_PREFIX) and "," in teachers:
        return [t.strip() for t in teachers.split(",") if t.strip()]
    if isinstance(teachers, str) and teachers.startswith(SERVE_PREFIX):
        return [teachers]
    return teachers


def ranked_spec_of(teacher: HubModel, ranking) -> str:
    """The ranked spec a served teacher serves (the spec its service reports, resolved as the ranking resolves
    them); a :class:`ConfigError` naming the ranked models when it is none of them, or when the ranking holds no
    LogME weights for it."""
    from ...hub import ModelSpec

    def resolved(spec):
        try:
            return str(ModelSpec.parse(spec).resolved())
        except Exception:  # noqa: BLE001 - a spec this hubtune cannot parse matches nothing
            return str(spec)

    served = resolved(teacher.module.info.get("spec"))
    for c in ranking.candidates:
        if resolved(c.spec) == served:
            if c.spec not in ranking.weights:
                raise ConfigError(f"btuning: the ranking has no LogME posterior weights for {c.spec}, which "
                                  f"{teacher.name} serves; re-run `hubtune rank --out DIR` with the logme metric")
            return c.spec
    raise ConfigError(f"btuning: teacher {teacher.name} serves {served}, which the ranking did not rank (ranked: "
                      f"{', '.join(c.spec for c in ranking.candidates)}); serve a ranked model, or rank this one "
                      "too")


def _width(module: torch.nn.Module, data_config: dict) -> int:
    """The model's penultimate width (``num_features``, else one probe forward pass)."""
    n = getattr(module, "head_hidden_size", None) or getattr(module, "num_features", None)
    if isinstance(n, int) and n > 0:
        return n
    size = tuple(data_config.get("input_size") or (3, 224, 224))
    was = module.training
    module.eval()
    with torch.no_grad():
        w = penultimate_features(module, torch.zeros(1, *size)).shape[1]
    module.train(was)
    return int(w)
