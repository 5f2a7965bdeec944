"""Knowledge distillation: ``@register_method("kd")``.

The student learns from a frozen teacher with :class:`~hubtune.tuning.losses.DistillationLoss`:

    total = alpha_hard * CE(s, y) + alpha_soft * L_soft(s, t) [+ layer_weight * L_layers]

``L_soft`` is temperature KL (Hinton et al., 2015), Jensen-Shannon, or logit MSE (``kind``). Batches without
``"target"`` are distilled label-free (``total = alpha_soft * soft [+ layers]``, ``"hard"`` is 0).

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
  mean, std). The teacher is fed them through an :class:`~hubtune.tuning.multi.InputAdapter`: un-normalise with
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
  :func:`~hubtune.tuning.multi.teacher_view_key`: the teacher identity (the candidate's identity hash for a
  spec, :func:`~hubtune.tuning.multi.module_identity` for a module) and its input view. It cannot be combined
  with ``teacher_bn="train"`` (batch-dependent teacher) or ``layers`` (needs teacher features). Under bf16
  autocast a live teacher gives bf16-rounded logits while the cache holds fp32 ones. Batch-mixing
  augmentations (mixup, cutmix) make a teacher's input depend on the batch and cannot be cached per sample.
* **Frozen, and out of the checkpoint.** :meth:`KnowledgeDistillation.frozen_modules` names the teacher, so the
  engine leaves it out of ``checkpoint.pt`` (it records its identity). With ``cache_teacher=True`` the method
  keeps no teacher module at all (only its identity and view): nothing to move to the GPU or checkpoint.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from .._io import atomic_path, write_json
from ..errors import ConfigError, InputError, TeacherCacheError
from .losses import DistillationLoss, IntermediateDistillation
from .method import Method, register_method
from .multi import InputAdapter, has_data_config, load_model, module_identity, teacher_view_key

__all__ = ["KnowledgeDistillation", "IndexedDataset", "TeacherCache", "cache_teacher_outputs",
           "teacher_cache_path", "teacher_cache_key", "module_identity", "input_fingerprint"]

TEACHER_BN_MODES = ("eval", "train")
CACHE_FORMAT = "hubtune-teacher-cache-v2"


# ---------------------------------------------------------------------------------------------- helpers
def _load_model(model, role: str, pretrained: bool):
    """``(HubModel, data config or None)`` from an nn.Module, a Candidate, a HubModel or a hub spec; the data
    config is None for a bare module that carries none (it is fed batches as they come)."""
    if not (isinstance(model, (str, torch.nn.Module)) or hasattr(model, "identity")):
        raise ConfigError(f"KnowledgeDistillation {role}={model!r} is invalid: give a timm model (nn.Module), "
                          "a Candidate or a hub spec such as 'resnet18' or 'hf-hub:ORG/NAME'")
    hm = load_model(model, pretrained=pretrained, role=role)
    known = not isinstance(model, torch.nn.Module) or has_data_config(hm.module)
    return hm, (dict(hm.data_config) if known else None)


def input_fingerprint(x: torch.Tensor) -> torch.Tensor:
    """Two float64 numbers per sample, ``(B, 2)``: the sum of the input and a cosine-weighted sum. Any
    augmentation, reordering or change of the data moves them; used to prove a cached row fits the input."""
    f = x.detach().reshape(x.shape[0], -1).double()
    w = torch.cos(torch.arange(f.shape[1], device=f.device, dtype=torch.float64) * 0.6180339887)
    return torch.stack([f.sum(1), f @ w], dim=1)


def _num_classes(module) -> int | None:
    n = getattr(module, "num_classes", None)
    return int(n) if isinstance(n, int) and not isinstance(n, bool) else None


def teacher_cache_key(teacher, input_config: dict | None = None, teacher_config: dict | None = None) -> str:
    """The key a teacher's cache is stored under: :func:`~hubtune.tuning.multi.teacher_view_key` of its
    identity and view. ``teacher``: a spec, Candidate or module (configs as :class:`KnowledgeDistillation`
    resolves them), or an object with ``cache_identity()`` (B-Tuning's ensemble, which adapts its own inputs)."""
    if hasattr(teacher, "cache_identity"):
        return teacher.cache_identity()
    hm, cfg = _load_model(teacher, "teacher", True)
    cfg = teacher_config if teacher_config is not None else cfg
    return teacher_view_key(hm.identity or module_identity(hm.module), cfg, input_config)


def teacher_cache_path(cache_dir, key: str) -> Path:
    """Where the cache stored under ``key`` (:func:`teacher_cache_key`) lives in ``cache_dir``:
    ``teacher-<key[:16]>.npy``."""
    return Path(cache_dir) / f"teacher-{key[:16]}.npy"


def _meta_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _fp_path(path: Path) -> Path:
    return path.with_name(path.name[:-4] + ".fp.npy" if path.name.endswith(".npy") else path.name + ".fp.npy")


def _save_npy_atomic(arr: np.ndarray, path: Path) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, arr, allow_pickle=False)


def _epoch_dependent(dataset, depth: int = 0) -> bool:
    """Whether the dataset's items change with the epoch: an
    :class:`~hubtune.data.augment.AugmentedDataset`, a wrapper (``.dataset``) around one, a dataset that says so
    (``epoch_dependent = True``), or one with ``set_epoch`` that wraps nothing. A wrapper that merely passes
    ``set_epoch`` on to an epoch-independent dataset (``TransformedDataset``) is not."""
    flag = getattr(dataset, "epoch_dependent", None)
    if isinstance(flag, bool):
        return flag
    try:
        from ..data.augment import AugmentedDataset
    except ImportError:  # pragma: no cover
        AugmentedDataset = ()
    if isinstance(dataset, AugmentedDataset):
        return True
    inner = getattr(dataset, "dataset", None)
    if inner is not None and depth < 16:
        return _epoch_dependent(inner, depth + 1)
    return callable(getattr(dataset, "set_epoch", None))


def _epoch_setter(dataset):
    """``dataset.set_epoch`` when the dataset's items depend on the epoch (augmentation), else None."""
    fn = getattr(dataset, "set_epoch", None)
    return fn if callable(fn) and _epoch_dependent(dataset) else None


class IndexedDataset(torch.utils.data.Dataset):
    """Wraps a dataset so every item is a dict with ``"index"`` (its position), as the teacher cache needs.

    ``(input, target)`` becomes ``{"input", "target", "index"}``, a bare input ``{"input", "index"}``, and a
    dict gets ``"index"`` added. The engine collates dicts as they are, so ``batch["index"]`` reaches
    :meth:`KnowledgeDistillation.losses`. ``set_epoch`` reaches the wrapped dataset (when it has one).
    """

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        """Passed on to the wrapped dataset when it has ``set_epoch`` (an augmented one)."""
        fn = getattr(self.dataset, "set_epoch", None)
        if callable(fn):
            fn(epoch)

    def __getitem__(self, i: int) -> dict:
        item = self.dataset[i]
        if isinstance(item, dict):
            out = dict(item)
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            out = {"input": item[0], "target": item[1]}
        elif isinstance(item, (tuple, list)) and len(item) == 1:
            out = {"input": item[0]}
        elif torch.is_tensor(item):
            out = {"input": item}
        else:
            raise InputError(f"dataset item {i} is a {type(item).__name__}; yield (input, target), a dict with "
                             "'input' or a bare input tensor")
        out["index"] = int(i)
        return out


def _positive_int(name: str, v) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ConfigError(f"cache_teacher_outputs {name}={v!r} is invalid: give a whole number >= 1")
    return v


@torch.no_grad()
def cache_teacher_outputs(teacher, dataset, path=None, batch_size: int = 64, device=None, *, epochs: int = 1,
                          input_config: dict | None = None, teacher_config: dict | None = None,
                          cache_dir=None) -> Path:
    """Run ``teacher`` (eval mode, fp32, no grad, through its input view) over ``dataset`` in index order for
    ``epochs`` epochs and write its logits; returns the path of the ``.npy``.

    ``teacher``: a module, a Candidate or a hub spec, or a module with ``cache_identity()`` that adapts its own
    inputs (B-Tuning's :class:`~hubtune.tuning.btuning.TeacherEnsemble`). ``input_config``: the data config the
    dataset's tensors are prepared with (the student's; default: the teacher's own, i.e. no adaptation);
    ``teacher_config`` overrides the teacher's. Before epoch ``e`` the dataset's ``set_epoch(e)`` is called
    when it has one; a dataset without it is epoch-independent and ``epochs`` must be 1.

    Files: ``path`` (default ``teacher_cache_path(cache_dir, key)``): float32 ``(E, n, C)``; beside it
    ``*.fp.npy``: float64 ``(E, n, 2)`` input fingerprints; ``path + ".json"``: ``{"format", "teacher_identity"
    (the cache key), "epochs", "epoch_dependent", "n", "num_classes"}``. Each is written to a temporary name and
    renamed, the ``.json`` last."""
    batch_size, epochs = _positive_int("batch_size", batch_size), _positive_int("epochs", epochs)
    from .engine import _as_batch

    setter = _epoch_setter(dataset)
    if setter is None and epochs != 1:
        raise ConfigError(f"cache_teacher_outputs epochs={epochs} but the dataset ({type(dataset).__name__}) has no "
                          "set_epoch(): it gives the same items every epoch, so one epoch is cached and replayed; "
                          "pass epochs=1, or an augmented dataset (hubtune.data.augment.AugmentedDataset)")
    if hasattr(teacher, "cache_identity"):
        module, key, adapter = teacher, teacher.cache_identity(), None
    else:
        hm, cfg = _load_model(teacher, "teacher", True)
        module, cfg = hm.module, (teacher_config if teacher_config is not None else cfg)
        key = teacher_view_key(hm.identity or module_identity(module), cfg, input_config)
        adapter = InputAdapter(input_config or cfg, cfg) if cfg is not None else None
    if path is None:
        if cache_dir is None:
            raise ConfigError("cache_teacher_outputs needs path= or cache_dir=: where to write the teacher outputs")
        path = teacher_cache_path(cache_dir, key)
    path = Path(path)
    dev = torch.device(device) if device is not None else next(
        (p.device for p in module.parameters()), torch.device("cpu"))
    if adapter is not None:
        adapter = adapter.to(dev)
    was_training = module.training
    module.eval()
    epochs_rows, epochs_fps = [], []
    try:
        for e in range(epochs):
            if setter is not None:
                setter(e)
            rows, fps = [], []
            for raw in torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False):
                x = _as_batch(raw)["input"].to(dev)
                rows.append(module(adapter(x) if adapter is not None else x).float().cpu())
                fps.append(input_fingerprint(x).cpu())
            if not rows:
                raise InputError("cache_teacher_outputs got an empty dataset")
            epochs_rows.append(torch.cat(rows))
            epochs_fps.append(torch.cat(fps))
    finally:
        module.train(was_training)
        if setter is not None:
            setter(0)
    logits = torch.stack(epochs_rows).numpy().astype(np.float32)
    if logits.ndim != 3:
        raise InputError(f"the teacher returned outputs of shape {logits.shape[2:]} per sample, not logits (C,)")
    _save_npy_atomic(logits, path)
    _save_npy_atomic(torch.stack(epochs_fps).numpy(), _fp_path(path))
    write_json(_meta_path(path), {"format": CACHE_FORMAT, "teacher_identity": key, "epochs": int(epochs),
                                  "epoch_dependent": setter is not None, "n": int(logits.shape[1]),
                                  "num_classes": int(logits.shape[2])})
    return path


class TeacherCache:
    """Reads the rows written by :func:`cache_teacher_outputs` for a batch, after checking that the cache is
    stored under ``key`` (:func:`teacher_cache_key`; and has ``num_classes`` columns, if given) and, with
    ``verify``, that every input matches the fingerprint stored for its (epoch, index). The file is ``path``,
    else ``teacher_cache_path(cache_dir, key)``. Shared by ``kd`` and ``btuning``."""

    def __init__(self, path, key: str, num_classes: int | None = None, verify: bool = True,
                 class_msg=None, cache_dir=None):
        if path is None:
            if cache_dir is None:
                raise ConfigError("cache_teacher=True needs cache_dir= (or cache_path=): where the teacher "
                                  "outputs written by cache_teacher_outputs() are")
            path = teacher_cache_path(cache_dir, key)
        self.path, self.verify = Path(path), bool(verify)
        meta_p, fp_p = _meta_path(self.path), _fp_path(self.path)
        if not self.path.is_file() or not meta_p.is_file() or not fp_p.is_file():
            raise TeacherCacheError(
                f"no teacher cache at {self.path} (with {meta_p.name} and {fp_p.name}): write it first with "
                "`hubtune cache-teacher` or hubtune.tuning.kd.cache_teacher_outputs(teacher, train_dataset, "
                f"{str(self.path)!r}, input_config=<the student's data config>), or set cache_teacher=False")
        try:
            meta = json.loads(meta_p.read_text())
        except (OSError, ValueError) as e:
            raise TeacherCacheError(f"{meta_p} is unreadable ({e}); rewrite the cache with cache_teacher_outputs()")
        if meta.get("format") != CACHE_FORMAT:
            raise TeacherCacheError(f"{meta_p} is not a hubtune teacher cache of this version "
                                    f"({meta.get('format')!r}, expected {CACHE_FORMAT!r}); rewrite it with "
                                    "`hubtune cache-teacher` or cache_teacher_outputs()")
        if meta.get("teacher_identity") != key:
            raise TeacherCacheError(
                f"{self.path} was written for teacher {str(meta.get('teacher_identity'))[:16]} but this teacher "
                f"(seen through its input view) is {key[:16]}: rewrite the cache with cache_teacher_outputs() "
                "for this teacher and this student's data config")
        arr = np.load(self.path, mmap_mode="r", allow_pickle=False)
        fps = np.load(fp_p, allow_pickle=False)
        E, n = meta.get("epochs"), meta.get("n")
        if arr.ndim != 3 or arr.shape[:2] != (E, n) or fps.shape != (E, n, 2):
            raise TeacherCacheError(f"{self.path} holds arrays of shape {arr.shape} and {fps.shape}, not "
                                    f"(epochs={E}, n={n}, C) and ({E}, {n}, 2) as its .json says (an interrupted "
                                    "write?); rewrite it with cache_teacher_outputs()")
        if num_classes is not None and arr.shape[2] != num_classes:
            raise ConfigError(class_msg(num_classes, arr.shape[2]) if class_msg else
                              f"{self.path} holds {arr.shape[2]} columns per sample, not {num_classes}; "
                              "rewrite it for this task")
        self.rows, self.epochs, self.epoch_dependent = arr, int(E), bool(meta.get("epoch_dependent"))
        self.fingerprints = torch.from_numpy(np.ascontiguousarray(fps, dtype=np.float64))

    def check_epochs(self, epoch: int, total_epochs: int | None = None) -> int:
        """The cache row for training epoch ``epoch`` (0-based): ``epoch`` itself for an epoch-dependent
        (augmented) dataset, else 0. Raises :class:`TeacherCacheError` when the run is longer than the cache."""
        if not self.epoch_dependent:
            return 0
        need = max(int(epoch) + 1, int(total_epochs or 0))
        if need > self.epochs:
            raise TeacherCacheError(
                f"the teacher cache {self.path} holds {self.epochs} epoch(s) of augmented teacher outputs but "
                f"training needs {need}: rewrite it with `hubtune cache-teacher ... --epochs {need}` "
                f"(cache_teacher_outputs(..., epochs={need})), train for at most {self.epochs} epoch(s), or set "
                "cache_teacher=False")
        return int(epoch)

    def lookup(self, batch: dict, x: torch.Tensor, epoch: int = 0) -> torch.Tensor:
        """The cached rows of ``batch["index"]`` in epoch ``epoch`` as a float32 tensor on ``x``'s device."""
        e = self.check_epochs(epoch)
        idx = batch.get("index")
        if idx is None:
            raise TeacherCacheError("cache_teacher=True needs the sample index in every batch: wrap the training "
                                    "set in hubtune.tuning.kd.IndexedDataset(train_dataset)")
        idx = torch.as_tensor(idx).reshape(-1).cpu().long()
        n = self.rows.shape[1]
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise TeacherCacheError(f"sample index {int(idx.max())} is outside the teacher cache {self.path} "
                                    f"of {n} rows: the cache was written for another dataset; rewrite it")
        if self.verify:
            got = input_fingerprint(x).cpu()
            want = self.fingerprints[e][idx]
            if not torch.allclose(got, want, rtol=1e-5, atol=1e-4 * (1 + float(want.abs().max()))):
                bad = int(idx[(got - want).abs().amax(1).argmax()])
                raise TeacherCacheError(
                    f"the input of sample {bad} in epoch {epoch} differs from the one the teacher cache "
                    f"{self.path} was written for: the dataset augments differently (another seed, or an "
                    "augmentation that is not deterministic per sample and epoch), or changed. Rewrite the cache "
                    "with the same dataset, augmentation and seed as training (`hubtune cache-teacher --epochs E`), "
                    "or set cache_teacher=False")
        rows = np.asarray(self.rows[e][idx.numpy()], dtype=np.float32)
        return torch.from_numpy(rows).to(x.device)


# ---------------------------------------------------------------------------------------------- the method
@register_method("kd")
class KnowledgeDistillation(Method):
    """Distil a frozen ``teacher`` into ``student``; see the module docstring for every option.

    ``losses(batch)`` returns ``{"total", "hard", "soft"}`` and ``"layers"`` when ``layers`` is given.
    ``predict(x)`` is the student's logits; ``model_to_save()`` the student. ``data_config``: the data config
    the batches are prepared with (default: the student's); ``teacher_data_config``: the teacher's (default:
    its own). ``self.teacher`` is None with ``cache_teacher=True``.
    """

    def __init__(self, student, teacher, *, num_classes: int | None = None, kind: str = "kl",
                 temperature: float = 4.0, alpha_hard: float = 0.5, alpha_soft: float = 0.5,
                 layers: dict | None = None, layer_loss: str = "mse", layer_weight: float = 1.0,
                 layer_temperature: float = 1.0, sample_input: torch.Tensor | None = None,
                 teacher_bn: str = "eval", cache_teacher: bool = False, cache_dir=None, cache_path=None,
                 verify_cache: bool = True, pretrained: bool = True, data_config: dict | None = None,
                 teacher_data_config: dict | None = None):
        super().__init__()
        s_hm, s_cfg = _load_model(student, "student", pretrained)
        t_hm, t_cfg = _load_model(teacher, "teacher", True)  # a teacher always has its weights
        student, teacher = s_hm.module, t_hm.module
        if student is teacher:
            raise ConfigError("KnowledgeDistillation got the same module as student and teacher; pass a copy "
                              "(copy.deepcopy) or a fresh student")
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

        # ---- teacher cache: then no teacher module is kept at all
        self.teacher_identity = t_hm.identity
        self.cache_path, self.cache_key = None, None
        self.verify_cache = bool(verify_cache)
        self._cache, self._epoch = None, 0
        if cache_teacher or cache_path is not None:
            if teacher_bn == "train":
                raise ConfigError("cache_teacher=True cannot be combined with teacher_bn='train': a teacher "
                                  "with batch statistics gives batch-dependent outputs; use teacher_bn='eval'")
            if self.layers is not None:
                raise ConfigError("cache_teacher=True cannot be combined with layers=: intermediate-layer KD "
                                  "needs the teacher's features on every batch; drop one of them")
            self.teacher_identity = t_hm.identity or module_identity(teacher)
            self.cache_key = teacher_view_key(self.teacher_identity, self.teacher_data_config, self.data_config)
            self._cache = TeacherCache(cache_path, self.cache_key, self.num_classes, self.verify_cache,
                                       self._class_msg, cache_dir=cache_dir)
            self.cache_path = self._cache.path
            self.teacher = None  # neither moved to a device nor checkpointed: its outputs are on disk
        else:
            self.teacher = teacher
        self.train()

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
        self._epoch = int(epoch)
        if self._cache is not None:
            self._cache.check_epochs(epoch, total_epochs)

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
        x = batch["input"]
        if self._cache is not None:
            return self._cache.lookup(batch, x, self._epoch)
        with torch.no_grad():
            return self.teacher(self._view(x))

    def losses(self, batch: dict) -> dict[str, torch.Tensor]:
        x = batch["input"]
        y_s = self.student(x).float()
        y_t = self.teacher_logits(batch).float().detach()
        if y_s.dim() != 2 or y_s.shape != y_t.shape:
            if y_s.dim() == 2 and y_t.dim() == 2 and y_s.shape[0] == y_t.shape[0]:
                raise ConfigError(self._class_msg(y_s.shape[1], y_t.shape[1]))
            raise ConfigError(f"student logits {tuple(y_s.shape)} and teacher logits {tuple(y_t.shape)} do not "
                              "match: both models must map the batch to (B, num_classes) logits")
        target = batch.get("target")
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
                "layers": dict(self.layers.mapping) if self.layers is not None else None,
                "layer_loss": self.layer_loss if self.layers is not None else None,
                "layer_weight": self.layer_weight if self.layers is not None else None,
                "cache_path": str(self.cache_path) if self.cache_path is not None else None,
                "teacher_identity": self.teacher_identity,
                "teacher_view": (None if self.teacher_adapter is None or self.teacher_adapter.identity else
                                 {"input_size": self.teacher_data_config.get("input_size"),
                                  "mean": self.teacher_data_config.get("mean"),
                                  "std": self.teacher_data_config.get("std")})}
