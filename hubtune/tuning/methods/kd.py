"""Knowledge distillation: ``@register_method("kd")``.

The student learns from a frozen teacher with :class:`~hubtune.tuning.losses.DistillationLoss`:

    total = alpha_hard * CE(s, y) + alpha_soft * L_soft(s, t) [+ layer_weight * L_layers]

``L_soft`` is temperature KL (Hinton et al., 2015), Jensen-Shannon, PaddleClas's symmetric KL (``skl``, what SSLD
calls "JS"), or logit MSE (``kind``). Batches without ``"target"`` are distilled label-free (``total = alpha_soft *
soft [+ layers]``, ``"hard"`` is 0); ``use_labels=False`` distils every batch label-free, ignoring the targets it
carries (SSLD: the labelled images and the teacher-selected pool are distilled alike).

* **Models.** Teacher and student are timm modules (any ``nn.Module`` that maps inputs to logits works) or
  hub specs loaded by :func:`hubtune.hub.load_candidate`, possibly from different hubs. The teacher is a
  classifier *for the target task* (e.g. a fine-tuned model): its logits and the student's must have the same
  number of classes, else :class:`~hubtune.errors.ConfigError`. ``num_classes=`` gives the student a new
  head (``reset_classifier``) when its own head differs; the teacher is never changed. A spec teacher is
  always loaded with its weights; ``pretrained=`` applies to a spec student only.
* **Frozen teacher.** ``requires_grad=False`` on every teacher parameter, the teacher forward runs under
  ``torch.no_grad()``, and :meth:`KnowledgeDistillation.param_groups` holds only the student and the
  feature matchers.
* **teacher_bn.** ``"eval"`` (default): the teacher is always in eval mode (running BN statistics, no
  dropout). ``"train"``: SSLD style, the teacher's BatchNorm layers use (and update) the statistics of the
  current batch while training; dropout stays off, and the teacher still gets no gradient.
* **Intermediate layers.** ``layers={student_path: teacher_path}`` adds FitNets-style hints through
  :class:`~hubtune.tuning.losses.IntermediateDistillation` (``layer_loss="mse"|"kl"``, weight
  ``layer_weight``). Its learned :class:`~hubtune.tuning.losses.FeatureMatcher` s are built from one probe pass
  (``sample_input``, or zeros of the student's ``pretrained_cfg["input_size"]``) and are in ``param_groups``.
* **The teacher's own input view.** Batches are prepared for the student (its data config: input size,
  mean, std). The teacher is fed them through an :class:`~hubtune.tuning.models.InputAdapter`: un-normalise with
  the student's mean/std, resize (bilinear, antialiased) to the teacher's ``input_size``, re-normalise with the
  teacher's mean/std; the identity when the two configs agree. The configs come from the hub (a spec or a
  Candidate), from a timm module's ``pretrained_cfg``, or from ``data_config=`` (the batches' config) and
  ``teacher_data_config=``; a bare module without a config is fed the batch as it comes.
* **Teacher cache.** :func:`cache_teacher_outputs` runs the teacher (eval mode, fp32, through its input view)
  once over a dataset in index order, for ``epochs`` epochs: before epoch ``e`` it calls
  ``dataset.set_epoch(e)`` when the dataset has it (:class:`~hubtune.data.augment.AugmentedDataset`, whose
  items are deterministic per sample, epoch and seed), so the teacher outputs of an augmented run are
  computed once and replayed. It writes a float32 ``(E, n, C)`` ``.npy`` (row ``[e, i]`` = the teacher's
  logits for ``dataset[i]`` in epoch ``e``), a float64 ``(E, n, 2)`` ``.fp.npy`` of per-sample input
  fingerprints, and a ``.json`` with the cache key, all atomically (the ``.json`` last). With
  ``cache_teacher=True`` the method reads row ``[epoch, index]`` (the engine calls
  :meth:`~hubtune.tuning.method.Method.on_epoch_start`; wrap the training set in :class:`IndexedDataset`)
  instead of calling the teacher. Every batch's inputs are fingerprinted and compared with the stored
  fingerprints (``verify_cache=True``), so a dataset that augments differently, reorders or changed since the
  cache was written raises :class:`~hubtune.errors.TeacherCacheError` instead of silently distilling wrong
  targets; so does an epoch beyond the cache's ``E`` when the dataset is epoch-dependent (a dataset without
  ``set_epoch`` replays its one epoch every epoch). The cache is keyed by
  :func:`~hubtune.tuning.teachers.teacher_view_key`: the teacher identity (the candidate's identity hash for a
  spec, :func:`~hubtune.tuning.models.module_identity` for a module) and its input view. It cannot be combined
  with ``teacher_bn="train"`` (batch-dependent teacher) or ``layers`` (needs teacher features). Under bf16
  autocast a live teacher gives bf16-rounded logits while the cache holds fp32 ones. Batch-mixing
  augmentations (mixup, cutmix) make a teacher's input depend on the batch and cannot be cached per sample.
* **Frozen, and out of the checkpoint.** :meth:`KnowledgeDistillation.frozen_modules` names the teacher, so the
  engine leaves it out of ``checkpoint.pt`` (it records its identity). With ``cache_teacher=True`` the method
  keeps no teacher module at all (only its identity and view): nothing to move to the GPU or checkpoint.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from ...errors import ConfigError, InputError
from ..losses.distillation import DistillationLoss
from ..losses.hints import IntermediateDistillation
from ..method import Method, MethodContext, Setting, register_method
from ..models import InputAdapter, module_identity
from ..teachers import (
    SERVE_PREFIX, ServedTeacherModule, load_teacher, served_teacher, teacher_source, teacher_view_key,
)

__all__ = ["KnowledgeDistillation"]

TEACHER_BN_MODES = ("eval", "train")


def _num_classes(module) -> int | None:
    n = getattr(module, "num_classes", None)
    return int(n) if isinstance(n, int) and not isinstance(n, bool) else None


# ---------------------------------------------------------------------------------------------- teacher from a ranking
def pair_from_ranking(ctx: MethodContext, max_student) -> tuple:
    """``(student, teacher)`` for distillation given ``ctx.ranking``: the teacher is ``ctx.teachers["teacher"]`` or
    else the ranking's top-1 fine-tuned on the dataset (``ctx.tune_teacher``); the student is ``ctx.model`` or
    else the best-ranked model other than that teacher's source, with at most ``max_student`` parameters when
    given. Adds ``ranking``, ``teacher`` (and ``teacher_source``) to ``ctx.report``."""
    from ...ranking import Ranking

    folder = Path(ctx.ranking)
    if not (folder / "ranking.json").is_file():
        raise ConfigError(f"ranking={str(folder)!r} is not a `hubtune rank --out` folder (no ranking.json); run "
                          "`hubtune rank --out DIR` first")
    if ctx.top_k not in (None, 1):
        raise ConfigError(f"method {ctx.method!r} distils from one teacher, the ranking's top-1 fine-tuned on the "
                          f"dataset; top_k={ctx.top_k!r} has no meaning here: drop it (--top-k)")
    cands = list(Ranking.load(folder).candidates)
    if not cands:
        raise ConfigError(f"the ranking in {folder} holds no candidates; rank some models first")
    ctx.report["ranking"] = str(folder)
    teacher, teacher_source_spec = ctx.teachers.get("teacher"), None
    if teacher is not None:
        ctx.report["teacher"] = str(teacher)
    else:
        if ctx.tune_teacher is None:
            raise ConfigError(f"method {ctx.method!r} given a ranking and no teacher fine-tunes the ranking's top-1 "
                              "first, which hubtune.tune() does; here pass teacher= (a model tuned on this dataset)")
        teacher_source_spec = cands[0].spec
        teacher = ctx.tune_teacher(teacher_source_spec)
        ctx.report.update(teacher=teacher, teacher_source=teacher_source_spec)
    if ctx.model is not None:
        return ctx.model, teacher
    pool = [c for c in cands if c.spec != teacher_source_spec]
    if max_student is not None:
        sized = []
        for c in pool:
            n = int(c.num_params or 0)
            if n <= 0:  # an older ranking without sizes: count them
                from ...hub import load_candidate

                n = int(load_candidate(c.spec).num_params)
            sized.append((c, n))
        fits = [c for c, n in sized if n <= max_student]
        if not fits:
            sizes = ", ".join(f"{c.spec} ({n / 1e6:.2f}M)" for c, n in sized) or "none"
            raise ConfigError(f"no ranked model other than the teacher has at most max_student_params={max_student} "
                              f"parameters (candidates: {sizes}); raise max_student_params or pass model=")
        pool = fits
    if not pool:
        raise ConfigError(f"the ranking in {folder} holds only the teacher's model ({teacher_source_spec}); pass the "
                          "student with model= (--model), or rank more models")
    return pool[0].spec, teacher


# ---------------------------------------------------------------------------------------------- the method
@register_method("kd")
class KnowledgeDistillation(Method):
    """Distil a frozen ``teacher`` into ``student``; see the module docstring for every option.

    ``losses(batch)`` returns ``{"total", "hard", "soft"}`` and ``"layers"`` when ``layers`` is given.
    ``predict(x)`` is the student's logits; ``model_to_save()`` the student. ``data_config``: the data config
    the batches are prepared with (default: the student's); ``teacher_data_config``: the teacher's (default:
    its own). ``self.teacher`` is None with ``cache_teacher=True``.
    """

    teachers = ("teacher",)
    settings = {
        "kind": Setting("kl", "soft loss: kl (temperature KL), js (Jensen-Shannon), skl (symmetric KL, SSLD's "
                              "'JS') or mse (logits)", str),
        "use_labels": Setting(True, "false: distil label-free, ignoring the batches' targets (SSLD)", bool),
        "temperature": Setting(4.0, "softmax temperature of the soft loss", float),
        "alpha_hard": Setting(0.5, "weight of the cross-entropy with the labels", float),
        "alpha_soft": Setting(0.5, "weight of the soft (teacher) loss", float),
        "layers": Setting(None, "intermediate-layer hints {student_layer: teacher_layer}", dict),
        "layer_loss": Setting("mse", "loss of the hints: mse or kl", str),
        "layer_weight": Setting(1.0, "weight of the hints", float),
        "layer_temperature": Setting(1.0, "temperature of kl hints", float),
        "sample_input": Setting(None, "a small input batch to size the feature matchers (Python API)"),
        "teacher_bn": Setting("eval", "eval (running BN statistics) or train (SSLD: batch statistics)", str),
        "cache_teacher": Setting(False, "read the teacher's outputs from a cache (`hubtune cache-teacher`)", bool),
        "cache_dir": Setting(None, "where the teacher cache is (with cache_teacher)", (str, Path)),
        "cache_path": Setting(None, "the teacher cache file itself", (str, Path)),
        "verify_cache": Setting(True, "check every batch's inputs against the cache's fingerprints", bool),
        "teacher_data_config": Setting(None, "the teacher's data config (default: its own)", dict),
        "max_student_params": Setting(None, "with a ranking and no model: the largest student to pick", int),
        "pretrained": Setting(True, "load a spec student's pretrained weights", bool),
        "serve_window": Setting(4, "teacher=serve:NAME: requests kept in flight ahead of training", int),
        "serve_timeout": Setting(30.0, "teacher=serve:NAME: seconds without an answer before a request stalls",
                                 float),
        "serve_on_stall": Setting("fail", "teacher=serve:NAME: when no replica answers: fail, wait, or local "
                                          "(compute with the teacher loaded here)", str),
    }

    @classmethod
    def from_settings(cls, ctx: MethodContext) -> "KnowledgeDistillation":
        """Student ``ctx.model``, teacher ``ctx.teachers["teacher"]``; with a ranking, :func:`pair_from_ranking`."""
        s = dict(ctx.settings)
        max_student = s.pop("max_student_params", None)
        if max_student is not None and (isinstance(max_student, bool) or not isinstance(max_student, int)
                                        or max_student < 1):
            raise ConfigError(f"max_student_params={max_student!r} is invalid: give a whole number of parameters "
                              ">= 1")
        if ctx.ranking is not None:
            student, teacher = pair_from_ranking(ctx, max_student)
        else:
            student, teacher = ctx.model, ctx.teachers.get("teacher")
        if teacher is None:
            raise ConfigError(f"method {ctx.method!r} needs a teacher: pass teacher= (--teacher SPEC, e.g. local-dir: "
                              "of a model tuned on this dataset), or ranking= (--ranking DIR: its top-1 is fine-tuned "
                              "on the dataset and becomes the teacher)")
        if student is None:
            raise ConfigError("no model given; pass model= (the student: a spec such as 'resnet18' or "
                              "'local-dir:PATH') or ranking= (a `hubtune rank --out` folder)")
        return cls(student, teacher, num_classes=ctx.num_classes, data_config=ctx.data_config, **s)

    def __init__(self, student, teacher, *, num_classes: int | None = None, kind: str = "kl",
                 temperature: float = 4.0, alpha_hard: float = 0.5, alpha_soft: float = 0.5,
                 layers: dict | None = None, layer_loss: str = "mse", layer_weight: float = 1.0,
                 layer_temperature: float = 1.0, sample_input: torch.Tensor | None = None,
                 teacher_bn: str = "eval", cache_teacher: bool = False, cache_dir=None, cache_path=None,
                 verify_cache: bool = True, pretrained: bool = True, data_config: dict | None = None,
                 teacher_data_config: dict | None = None, serve_window: int = 4, serve_timeout: float = 30.0,
                 serve_on_stall: str = "fail", use_labels: bool = True):
        super().__init__()
        if isinstance(teacher, str) and teacher.startswith(SERVE_PREFIX):  # a teacher service (Ray Serve)
            if cache_teacher or cache_path is not None or teacher_bn == "train" or layers:
                raise ConfigError(f"teacher={teacher!r} is a service: it answers logits only, in eval mode; drop "
                                  "cache_teacher/cache_path, teacher_bn='train' and layers=")
            teacher = served_teacher(teacher, window=serve_window, timeout=serve_timeout, on_stall=serve_on_stall)
        s_hm, s_cfg = load_teacher(student, "student", pretrained)
        student = s_hm.module
        if num_classes is not None:
            if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
                raise ConfigError(f"KnowledgeDistillation num_classes={num_classes!r} is invalid: give a whole "
                                  "number >= 1")
            if _num_classes(student) != num_classes:
                if not hasattr(student, "reset_classifier"):
                    raise ConfigError(f"num_classes={num_classes} needs a new student head, but the student "
                                      f"({type(student).__name__}) has no reset_classifier(); build it with "
                                      f"{num_classes} outputs")
                student.reset_classifier(num_classes)
        # the teacher is loaded after the student's new head is drawn, so the student starts the same whatever
        # the teacher is (a local model, whose construction draws from the RNG, or a service, which does not)
        t_hm, t_cfg = load_teacher(teacher, "teacher", True)  # a teacher always has its weights
        teacher = t_hm.module
        if student is teacher:
            raise ConfigError("KnowledgeDistillation got the same module as student and teacher; pass a copy "
                              "(copy.deepcopy) or a fresh student")
        s_c, t_c = _num_classes(student), _num_classes(teacher)
        if s_c is not None and t_c is not None and s_c != t_c:
            raise ConfigError(self._class_msg(s_c, t_c))
        if teacher_bn not in TEACHER_BN_MODES:
            raise ConfigError(f"KnowledgeDistillation teacher_bn={teacher_bn!r} is invalid: choose 'eval' "
                              "(running statistics) or 'train' (SSLD: batch statistics, still no gradient)")
        if not isinstance(layer_weight, (int, float)) or not math.isfinite(layer_weight) or layer_weight < 0:
            raise ConfigError(f"KnowledgeDistillation layer_weight={layer_weight!r} is invalid: give a number >= 0")
        for nm, cfg in (("data_config", data_config), ("teacher_data_config", teacher_data_config)):
            if cfg is not None and not isinstance(cfg, dict):
                raise ConfigError(f"KnowledgeDistillation {nm}={cfg!r} is invalid: give a timm data config dict "
                                  "(input_size, mean, std)")
        try:
            self.distill = DistillationLoss(kind=kind, temperature=temperature, alpha_hard=alpha_hard,
                                            alpha_soft=alpha_soft)
        except InputError as e:
            raise ConfigError(f"KnowledgeDistillation: {e}") from None

        # ---- the teacher's own input view: batches come prepared for the student
        self.data_config = dict(data_config) if data_config is not None else s_cfg
        self.teacher_data_config = dict(teacher_data_config) if teacher_data_config is not None else t_cfg
        src = self.data_config if self.data_config is not None else self.teacher_data_config
        self.teacher_adapter = (InputAdapter(src, self.teacher_data_config)
                                if self.teacher_data_config is not None else None)

        self.student = student.train()
        for p in teacher.parameters():
            p.requires_grad_(False)
        teacher.eval()
        self.teacher_bn = teacher_bn
        self.use_labels = bool(use_labels)
        self.num_classes = s_c if s_c is not None else t_c
        self.layer_weight = float(layer_weight)
        self.layer_loss = layer_loss
        self.layers = None
        if layers:
            if sample_input is None:
                size = (getattr(student, "pretrained_cfg", None) or {}).get("input_size")
                if not size:
                    raise ConfigError("layers= needs sample_input= (a small input batch) to learn the feature "
                                      "shapes: the student has no pretrained_cfg['input_size']")
                sample_input = torch.zeros(2, *size)
            try:
                self.layers = IntermediateDistillation(layers, student, teacher, loss=layer_loss,
                                                       temperature=layer_temperature)
                # the probe feeds the teacher its own view, as every training step does
                hook = teacher.register_forward_pre_hook(lambda mod, args: (self._view(args[0]),) + args[1:])
                try:
                    self.layers.probe(sample_input)
                finally:
                    hook.remove()
            except InputError as e:
                raise ConfigError(f"KnowledgeDistillation layers: {e}") from None

        # ---- the teacher source: the live module through its view, or its cached outputs (no module kept)
        self.teacher_identity = t_hm.identity
        self.verify_cache = bool(verify_cache)
        self.model_name = s_hm.name
        if (cache_teacher or cache_path is not None) and teacher_bn == "train":
            raise ConfigError("cache_teacher=True cannot be combined with teacher_bn='train': a teacher "
                              "with batch statistics gives batch-dependent outputs; use teacher_bn='eval'")
        if (cache_teacher or cache_path is not None) and self.layers is not None:
            raise ConfigError("cache_teacher=True cannot be combined with layers=: intermediate-layer KD "
                              "needs the teacher's features on every batch; drop one of them")

        def key():
            self.teacher_identity = t_hm.identity or module_identity(teacher)
            return teacher_view_key(self.teacher_identity, self.teacher_data_config, self.data_config)

        self.teacher_source = teacher_source(teacher, key, adapter=self.teacher_adapter,
                                             cache_teacher=cache_teacher, cache_dir=cache_dir, cache_path=cache_path,
                                             verify_cache=verify_cache, num_classes=self.num_classes,
                                             class_msg=self._class_msg)
        self.needs_index = self.teacher_source.needs_index
        if self.teacher_source.cached:
            self.cache_path, self.cache_key = self.teacher_source.path, self.teacher_source.cache.key
            self.teacher = None  # neither moved to a device nor checkpointed: its outputs are on disk
        else:
            self.cache_path, self.cache_key = None, None
            self.teacher = teacher
        self.train()

    def batches(self, batches):
        """With a served teacher, its outputs for the next ``serve_window`` batches are requested while the
        student trains on this one (EDL's reader); otherwise the batches as they come."""
        if isinstance(self.teacher, ServedTeacherModule):
            return self.teacher.pipeline(batches, adapter=self.teacher_adapter)
        return batches

    @staticmethod
    def _class_msg(s_c, t_c) -> str:
        return (f"the student predicts {s_c} classes but the teacher {t_c}: KD needs a teacher for the target "
                "task with the same classes (e.g. a fine-tuned model); give num_classes= to re-head the "
                "student, or fine-tune the teacher first")

    def _view(self, x: torch.Tensor) -> torch.Tensor:
        """The batch as the teacher's own transform would have prepared it (see the module docstring)."""
        return self.teacher_adapter(x) if self.teacher_adapter is not None else x

    # ------------------------------------------------------------------ modes
    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
            if mode and self.teacher_bn == "train":
                for m in self.teacher.modules():
                    if isinstance(m, _BatchNorm):
                        m.train()
        return self

    def frozen_modules(self) -> dict[str, torch.nn.Module]:
        """``{"teacher": teacher}``: frozen, never trained; the engine keeps it out of ``checkpoint.pt``. Empty
        with ``cache_teacher=True`` (no teacher module is held). With ``teacher_bn="train"`` the teacher's BN
        statistics do change, so it is then checkpointed like any state."""
        if self.teacher is None or self.teacher_bn == "train":
            return {}
        return {"teacher": self.teacher}

    def on_epoch_start(self, epoch: int, total_epochs: int) -> None:
        """Remember the epoch (the cache row of augmented runs); a run longer than the cache fails here, at
        its start, with the cure."""
        self.teacher_source.on_epoch_start(epoch, total_epochs)

    def param_groups(self, lr: float) -> list[dict]:
        groups = [{"params": [p for p in self.student.parameters() if p.requires_grad], "lr": lr,
                   "name": "student"}]
        if self.layers is not None:
            ps = [p for p in self.layers.parameters() if p.requires_grad]
            if ps:
                groups.append({"params": ps, "lr": lr, "name": "matchers"})
        return groups

    # ------------------------------------------------------------------ losses
    def teacher_logits(self, batch: dict) -> torch.Tensor:
        return self.teacher_source(batch)

    def losses(self, batch: dict) -> dict[str, torch.Tensor]:
        x = batch["input"]
        y_s = self.student(x).float()
        y_t = self.teacher_logits(batch).float().detach()
        if y_s.dim() != 2 or y_s.shape != y_t.shape:
            if y_s.dim() == 2 and y_t.dim() == 2 and y_s.shape[0] == y_t.shape[0]:
                raise ConfigError(self._class_msg(y_s.shape[1], y_t.shape[1]))
            raise ConfigError(f"student logits {tuple(y_s.shape)} and teacher logits {tuple(y_t.shape)} do not "
                              "match: both models must map the batch to (B, num_classes) logits")
        target = batch.get("target") if self.use_labels else None
        terms = self.distill(y_s, y_t, target)
        total = terms["total"]
        out = {"hard": terms["hard"].detach(), "soft": terms["soft"].detach()}
        if self.layers is not None:
            lay = self.layers().float()
            total = total + self.layer_weight * lay
            out["layers"] = lay.detach()
        out["total"] = total
        return out

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x)

    def model_to_save(self) -> torch.nn.Module:
        return self.student

    def hparams(self) -> dict:
        d = self.distill
        return {"kind": d.kind, "temperature": d.temperature, "alpha_hard": d.alpha_hard,
                "alpha_soft": d.alpha_soft, "num_classes": self.num_classes, "teacher_bn": self.teacher_bn,
                "use_labels": self.use_labels,
                "layers": dict(self.layers.mapping) if self.layers is not None else None,
                "layer_loss": self.layer_loss if self.layers is not None else None,
                "layer_weight": self.layer_weight if self.layers is not None else None,
                "cache_path": str(self.cache_path) if self.cache_path is not None else None,
                "teacher_identity": self.teacher_identity,
                "teacher_view": (None if self.teacher_adapter is None or self.teacher_adapter.identity else
                                 {"input_size": self.teacher_data_config.get("input_size"),
                                  "mean": self.teacher_data_config.get("mean"),
                                  "std": self.teacher_data_config.get("std")})}
