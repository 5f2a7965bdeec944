"""The tuning API: ``tune(...)`` runs a registered method end to end; ``make_transferable(...)`` gives a method
for your own training loop.

    >>> report = tune("finetune", model="resnet18", dataset="digits", epochs=3, out="runs/ft")
    >>> report = tune("dann", ranking="runs/rank", top_k=1, dataset="imagefolder:A", target_dataset="imagefolder:B",
    ...               epochs=5, out="runs/dann", config="tune.yaml", trade_off=0.5)
    >>> report = tune("kd", ranking="runs/rank", dataset="digits", epochs=5, out="runs/kd")  # teacher: top-1, tuned
    >>> method = make_transferable(my_timm_model, "cdan", num_classes=10, seed=0)
    >>> terms = method.losses({"input": xs, "target": ys, "target_input": xt}); terms["total"].backward()

Settings are resolved as ``TrainConfig`` defaults <- ``config`` (a dict or a YAML file) <- explicit arguments.
A config may hold any :class:`~hubtune.tuning.engine.TrainConfig` field (``epochs``, ``batch_size``, ``lr``,
``optimizer``, ``seed``, ...), any of ``tune``'s own arguments (:data:`TUNE_KEYS`) and ``method_args:`` (a
mapping of the method's settings); any other key, and any setting the method does not declare
(:attr:`Method.settings <hubtune.tuning.method.Method>`), is an error that names it.

**No method is special here.** What a method takes is read from its declaration (:mod:`hubtune.tuning.method`):
``inputs`` (one dataset, or a labelled source and an unlabelled ``target_dataset``), ``models`` (one, or the
top-K), ``teachers`` (``teacher=`` fills the first), ``needs_index`` (the training set is wrapped in
:class:`~hubtune.tuning.teachers.IndexedDataset`), ``settings``; the method is built by its own
:meth:`~hubtune.tuning.method.Method.from_settings`.

**Reproducible.** ``seed`` (TrainConfig's) seeds Python's, NumPy's and torch's generators before the model is
loaded and the method built, so new heads, feature matchers, discriminators and gates are drawn from it, as
are the data order and the augmentation: the same call twice writes the same bytes.

**Data.** Training: ``dataset``'s train split, at most ``max_samples`` images (a stratified subsample; the
evaluation set is never subsampled). Evaluation: ``eval_dataset`` (its test split; an image folder: the whole
folder) or the test split of ``dataset`` (``target_dataset`` for dann/cdan). An image folder has no splits, so
when it is both the training and the evaluation set a seeded stratified :data:`EVAL_FRACTION` of it is held out
for evaluation and never trained on. A training set with fewer than two classes is refused.

**Augmentation.** On by default: the training images go through timm's training transform built from the
model's data config (:func:`hubtune.data.augment.train_transform_for`: random resized crop, flip, colour
jitter; ``auto_augment``, ``mixup``, ``cutmix``, ``label_smoothing``, ... as timm's options), deterministic per
(sample, epoch, seed); evaluation uses the evaluation transform. ``augment=False`` trains on the evaluation
transform; ``augment={"auto_augment": "rand-m9-mstd0.5-inc1", "mixup": 0.8}`` sets options.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import torch

from .._checks import check_count
from .._io import read_settings
from ..errors import ConfigError, OutputError, TooFewClassesError
from .engine import Engine, TrainConfig, prepare_out_dir
from .method import METHODS, Method, MethodContext, create_method, seed_everything

__all__ = ["tune", "make_transferable", "load_tune_config", "TransformedDataset", "TUNE_KEYS", "EVAL_FRACTION", "TASKS",
           "model_and_transform", "train_dataset", "eval_dataset_for", "augment_config", "seed_everything"]

TUNE_KEYS = ("method", "model", "ranking", "top_k", "teacher", "dataset", "target_dataset", "eval_dataset",
             "num_classes", "max_samples", "data_dir", "out", "resume", "overwrite", "augment", "method_args", "task")
TASKS = ("classification", "segmentation")
TRAIN_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig))
#: the share of an image folder held out (stratified, seeded) for evaluation when it has no test split
EVAL_FRACTION = 0.2


class TransformedDataset(torch.utils.data.Dataset):
    """An :class:`~hubtune.data.ImageDataset` seen through a model's transform: items ``(tensor, label)``."""

    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return self.transform(self.dataset.image(i)), int(self.dataset.labels[i])

    def set_epoch(self, epoch: int) -> None:
        """Passed on to the wrapped dataset when it has ``set_epoch`` (a deterministic transform needs none)."""
        fn = getattr(self.dataset, "set_epoch", None)
        if callable(fn):
            fn(epoch)


def load_tune_config(config) -> dict:
    """``None``, a dict, or a path to a YAML (or JSON) file -> a dict, its keys checked (see the module doc)."""
    data = read_settings(config, TRAIN_KEYS + TUNE_KEYS, "tune",
                         f"training {', '.join(TRAIN_KEYS)}; tune {', '.join(TUNE_KEYS)} (method_args: a mapping of "
                         "the method's own arguments)")
    where = str(config) if isinstance(config, (str, Path)) else "config"
    if data.get("method_args") is not None and not isinstance(data["method_args"], dict):
        raise ConfigError(f"{where}: method_args must be a mapping, got {type(data['method_args']).__name__}")
    return data


def make_transferable(model, method: str, **kwargs) -> Method:
    """The registered method ``method`` built around ``model`` (a timm model or a spec), for your own training
    loop: call ``m.losses(batch)`` to get ``{"total": ..., term: ...}`` and back-propagate ``"total"``;
    ``m.predict(x)`` gives logits, ``m.param_groups(lr)`` the optimizer groups (discriminators, feature
    matchers and heads included), ``m.model_to_save()`` the tuned timm model. ``kwargs`` as
    :func:`~hubtune.tuning.method.create_method` takes them (``num_classes``, ``teacher``, ``seed``, and the
    method's settings such as ``trade_off``); a setting the method does not declare is a :class:`ConfigError`
    listing those it takes. ``seed=N`` seeds every generator first, so the new head and the other new parts are
    reproducible."""
    return create_method(method, model=model, **kwargs)


# ---------------------------------------------------------------------------------------------- data
def _is_folder(spec) -> bool:
    return isinstance(spec, str) and spec.split(":", 1)[0] == "imagefolder"


def _same_spec(a, b) -> bool:
    return a is not None and b is not None and str(a) == str(b)


def _check_max_samples(value) -> int | None:
    return check_count("max_samples", value, flag="--max-samples", error=ConfigError,
                       cure="give the training images to keep, or leave it out to train on the whole dataset")


def _base_dataset(spec, split: str, data_dir, seed: int, hold_out: bool):
    """``spec``'s ``split`` as an ImageDataset. An image folder has no splits: with ``hold_out`` its train split
    is the folder less a seeded stratified :data:`EVAL_FRACTION`, its test split that fraction; without, the
    whole folder either way."""
    from ..data import create_dataset

    if not _is_folder(spec):
        return create_dataset(spec, split=split, data_dir=data_dir)
    ds = create_dataset(spec, split="train", data_dir=data_dir)
    if not hold_out:
        return ds
    from ..data import stratified_split

    train_idx, test_idx = stratified_split(np.asarray(ds.labels), EVAL_FRACTION, seed=seed)
    idx = train_idx if split == "train" else test_idx
    if len(idx) == 0:
        raise ConfigError(f"{spec!r} is too small to hold out {EVAL_FRACTION:.0%} of each class for evaluation "
                          f"({len(ds)} images); add images or pass eval_dataset= (--eval-dataset) as a separate "
                          "folder")
    return ds.subset(idx)


def _holds_out(spec, eval_spec) -> bool:
    """An image folder trained on is split when it is also the evaluation set (no separate one given)."""
    return _is_folder(spec) and (eval_spec is None or _same_spec(eval_spec, spec))


def _wrap(ds, transform, seed: int):
    from ..data.augment import AugmentedDataset, TrainTransform

    if isinstance(transform, TrainTransform) and transform.config.enabled:
        return AugmentedDataset(ds, transform, seed=seed)
    return TransformedDataset(ds, transform)


def train_dataset(spec, transform, *, data_dir=None, max_samples=None, seed: int = 0, split: str = "train",
                  eval_dataset=None, hold_out: bool | None = None):
    """``(ImageDataset, training Dataset)``: the training images exactly as :func:`tune` builds them (the same
    held-out split of an image folder unless ``eval_dataset`` is another set, the same stratified subsample for
    ``max_samples`` and ``seed``, the same order). ``transform``: an evaluation transform gives a
    :class:`TransformedDataset`; an enabled training transform (:func:`hubtune.data.augment.train_transform_for`)
    an :class:`~hubtune.data.augment.AugmentedDataset` seeded with ``seed``; None only the ImageDataset.
    ``hold_out`` overrides whether an image folder's evaluation share is held out (default: when the folder is
    also the evaluation set)."""
    from ..data import stratified_subsample

    max_samples = _check_max_samples(max_samples)
    if hold_out is None:
        hold_out = _holds_out(spec, eval_dataset)
    ds = _base_dataset(spec, split, data_dir, seed, hold_out=hold_out)
    if max_samples:
        ds = stratified_subsample(ds, max_samples=max_samples, seed=seed)
    return ds, (None if transform is None else _wrap(ds, transform, seed))


def eval_dataset_for(spec, transform, *, data_dir=None, seed: int = 0, eval_dataset=None):
    """``(ImageDataset, TransformedDataset)``: the evaluation set :func:`tune` uses for training set ``spec``:
    ``eval_dataset`` (its test split; an image folder other than ``spec``: the whole folder) or ``spec``'s test
    split (an image folder: its held-out share). Never subsampled."""
    ev = eval_dataset if eval_dataset is not None else spec
    ds = _base_dataset(ev, "test", data_dir, seed, hold_out=_holds_out(spec, eval_dataset) and _same_spec(ev, spec))
    return ds, TransformedDataset(ds, transform)


def _check_classes(ds, spec) -> None:
    present = np.unique(np.asarray(ds.labels))
    if present.size < 2:
        names = getattr(ds, "classes", None)
        which = ", ".join(str(names[c]) if names is not None and c < len(names) else str(c) for c in present)
        raise TooFewClassesError(f"training set {str(spec)!r} holds {present.size} class ({which or 'none'}); "
                                 "training a classifier needs at least two classes: check the dataset (an image "
                                 "folder needs one subfolder per class) or --max-samples")


# ---------------------------------------------------------------------------------------------- models
def model_and_transform(spec) -> tuple:
    """``(module, transform, spec_name)`` for a spec or a timm module: the candidate's evaluation transform
    (``transform_for(data_config)``), the one :func:`tune` evaluates with."""
    from ..data import transform_for
    from .models import load_model

    hm = load_model(spec)
    return hm.module, transform_for(hm.data_config), hm.name


def augment_config(augment=None):
    """``augment`` (None or True: the defaults; False: off; a dict of
    :class:`~hubtune.data.augment.AugmentConfig` options; an AugmentConfig) -> an AugmentConfig."""
    from ..data.augment import AugmentConfig

    if augment is None or augment is True:
        return AugmentConfig()
    if augment is False:
        return AugmentConfig(enabled=False)
    if isinstance(augment, AugmentConfig):
        return augment
    if isinstance(augment, dict):
        opts = {str(k).replace("-", "_"): (tuple(v) if isinstance(v, list) else v) for k, v in augment.items()}
        names = [f.name for f in dataclasses.fields(AugmentConfig)]
        unknown = sorted(set(opts) - set(names))
        if unknown:
            raise ConfigError(f"augment: unknown option(s) {', '.join(unknown)}; options: {', '.join(names)}")
        return AugmentConfig(**opts)
    raise ConfigError(f"augment={augment!r} is invalid: give True, False or a mapping of augmentation options")


def _mixer(aug, num_classes: int, seed: int):
    if not aug.mixing and aug.label_smoothing == 0:
        return None
    from ..data.augment import BatchMixer

    return BatchMixer(aug, num_classes=int(num_classes), seed=seed)


# ---------------------------------------------------------------------------------------------- tune
def tune(method: str | None = None, *, model=None, ranking=None, top_k: int | None = None, teacher=None,
         dataset=None, target_dataset=None, eval_dataset=None, num_classes: int | None = None,
         epochs: int | None = None, out=None, config=None, resume: bool | None = None,
         overwrite: bool | None = None, max_samples: int | None = None, data_dir=None,
         batch_size: int | None = None, lr: float | None = None, device: str | None = None,
         precision: str | None = None, seed: int | None = None, augment=None, train: dict | None = None,
         task: str | None = None, **method_kwargs) -> dict:
    """Tune a model with a registered method and return the Engine's report (also ``OUT/report.json``).

    The model is ``model`` (a spec or a timm model; a list for a method of several models) or, with ``ranking``
    (a ``hubtune rank --out`` folder), the ranking's best (its top ``top_k`` for a method of several models). A
    method with a teacher (``kd``) given ``ranking``: the teacher is ``teacher=`` (e.g. ``local-dir:`` of a tuned
    folder) or else the ranking's top-1 **fine-tuned on** ``dataset`` first (a ``finetune`` run in
    ``OUT/teacher/``, reused when that folder holds a complete run of the same model and dataset); the student
    is ``model=`` or else the best-ranked model other than that teacher's source, and no larger than
    ``max_student_params`` (a setting) when given. Data, seeding and augmentation: see the module docstring.
    Output: ``out`` must not hold a run unless ``resume`` (continue it) or ``overwrite`` (replace hubtune's files
    in it); it is checked to be writable before any model is loaded. Settings: TrainConfig defaults <-
    ``config`` <- ``train`` (a dict of TrainConfig fields) <- the explicit arguments; ``method_kwargs`` (over
    ``config["method_args"]``) are the method's settings.

    ``task="segmentation"`` (or a segmentation method such as ``seg-adversarial``; ``finetune`` then means
    ``seg-finetune``): the datasets are segmentation datasets (:func:`hubtune.data.segmentation.create_seg_dataset`:
    ``synth2d-source``, ``segfolder:PATH``, a torch Dataset of (image, mask) pairs), the model a segmentation
    network (``basicunet``, ``dynunet``, ``local-dir:PATH``, a module), evaluation is Dice (``eval_dice``) and
    HD95, and a 2D run writes ``target_panel.png`` (predictions on the evaluation images before and after
    training); see :func:`_tune_segmentation`."""
    cfg = load_tune_config(config)
    explicit = {"method": method, "model": model, "ranking": ranking, "top_k": top_k, "teacher": teacher,
                "dataset": dataset, "target_dataset": target_dataset, "eval_dataset": eval_dataset,
                "num_classes": num_classes, "max_samples": max_samples, "data_dir": data_dir, "out": out,
                "resume": resume, "overwrite": overwrite, "augment": augment, "task": task}
    s = {k: cfg.get(k) for k in TUNE_KEYS}
    s.update({k: v for k, v in explicit.items() if v is not None})
    if model is not None and ranking is None:  # an explicit choice of model replaces the config's
        s["ranking"] = None
    if ranking is not None and model is None:
        s["model"] = None
    margs = dict(cfg.get("method_args") or {})
    margs.update(method_kwargs)
    if not s["method"]:
        raise ConfigError(f"no method given; choose one of: {', '.join(METHODS.names())}")
    if s["task"] is not None and s["task"] not in TASKS:
        raise ConfigError(f"task={s['task']!r} is invalid: choose one of {', '.join(TASKS)}")
    if s["task"] not in (None, "classification") and s["method"] == "finetune":
        s["method"] = _task_finetune(s["task"])
    cls = METHODS.get(s["method"])
    method_task = cls.task
    if s["task"] is not None and s["task"] != method_task:
        raise ConfigError(f"method {s['method']!r} is a {method_task} method but task={s['task']!r}; choose a "
                          f"{s['task']} method or drop task=")
    s["task"] = method_task
    tcfg = dict(cls.train_defaults)
    tcfg.update({k: cfg[k] for k in TRAIN_KEYS if k in cfg})
    tcfg.update(train or {})
    tcfg.update({k: v for k, v in {"epochs": epochs, "batch_size": batch_size, "lr": lr, "device": device,
                                   "precision": precision, "seed": seed}.items() if v is not None})

    if not s["dataset"]:
        raise ConfigError("no dataset given; pass dataset= (a registered name or 'imagefolder:PATH')")
    s["max_samples"] = _check_max_samples(s["max_samples"])
    paired = cls.inputs == "paired"
    if paired and not s["target_dataset"]:
        raise ConfigError(f"method {s['method']!r} adapts to a target domain: pass target_dataset= "
                          "(its train split gives unlabelled images, its test split the evaluation)")
    if not paired and s["target_dataset"]:
        raise ConfigError(f"method {s['method']!r} does not adapt between domains; drop target_dataset=")
    if s["teacher"] is not None and not cls.teachers:
        raise ConfigError(f"method {s['method']!r} takes no teacher; drop teacher= or use a distillation method")
    settings = cls.resolve_settings(margs)  # validated before anything heavy is loaded
    if s["out"]:
        tcfg["out_dir"] = str(s["out"])
    if s["resume"] is not None:
        tcfg["resume"] = bool(s["resume"])
    if s["overwrite"] is not None:
        tcfg["overwrite"] = bool(s["overwrite"])
    if s["task"] == "segmentation":
        if s["augment"] not in (None, False):
            raise ConfigError("augmentation (augment=, --auto-augment, --mixup, ...) is for classification; a "
                              "segmentation run trains on the images as they are: drop it")
        if s["ranking"] is not None or s["teacher"] is not None:
            raise ConfigError("a segmentation method takes its network from model= (basicunet, dynunet, "
                              "local-dir:PATH); drop ranking= / teacher=")
        train_config = TrainConfig(**tcfg)
        if train_config.out_dir and int(os.environ.get("RANK", "0")) == 0:
            prepare_out_dir(train_config.out_dir, resume=train_config.resume, overwrite=train_config.overwrite)
        return _tune_segmentation(s, cls, settings, train_config, paired)
    aug = augment_config(s["augment"])
    train_config = TrainConfig(**tcfg)
    if train_config.out_dir and int(os.environ.get("RANK", "0")) == 0:
        prepare_out_dir(train_config.out_dir, resume=train_config.resume, overwrite=train_config.overwrite)
    seed = train_config.seed

    # ---- the images, before any transform (the method's data config decides those)
    src_ds, _ = train_dataset(s["dataset"], None, data_dir=s["data_dir"], max_samples=s["max_samples"], seed=seed,
                              eval_dataset=s["eval_dataset"], hold_out=False if paired else None)
    _check_classes(src_ds, s["dataset"])
    tgt_ds = None
    if paired:  # a source domain is not evaluated, so nothing of it is held out
        tgt_ds, _ = train_dataset(s["target_dataset"], None, data_dir=s["data_dir"], max_samples=s["max_samples"],
                                  seed=seed, eval_dataset=s["eval_dataset"])
        if tgt_ds.num_classes != src_ds.num_classes:
            raise ConfigError(
                f"source {s['dataset']!r} has {src_ds.num_classes} classes but target {s['target_dataset']!r} has "
                f"{tgt_ds.num_classes}; domain adaptation needs the same label set in both domains")
    n_classes = int(s["num_classes"] or src_ds.num_classes)

    # ---- the method, built by itself from the declared settings
    ctx = MethodContext(method=s["method"], model=s["model"], num_classes=n_classes, ranking=s["ranking"],
                        top_k=s["top_k"], dataset=src_ds, seed=seed, settings=settings,
                        teachers={cls.teachers[0]: s["teacher"]} if cls.teachers and s["teacher"] is not None
                        else {},
                        tune_teacher=lambda spec: _tune_teacher(s, spec, train_config, aug))
    seed_everything(seed)  # before the model is loaded and the method built: heads, matchers, ... are seeded
    m = cls.from_settings(ctx)
    if not isinstance(m, Method):
        raise ConfigError(f"method {s['method']!r}: from_settings returned {type(m).__name__}, not a Method")
    if not m.data_config:
        raise ConfigError(f"method {s['method']!r} did not set data_config (the data config its batches are "
                          "prepared with), so no transform can be built for it")

    # ---- transforms from the method's data config, then the datasets the engine reads
    from ..data import transform_for
    from ..data.augment import train_transform_for

    eval_transform = transform_for(m.data_config)
    train_transform = train_transform_for(m.data_config, aug)  # with augmentation off: the eval transform
    train_ds = _wrap(src_ds, train_transform, seed)
    if paired:
        from .methods.adaptation import PairedDataset

        train_ds = PairedDataset(train_ds, _wrap(tgt_ds, train_transform, seed), seed=seed)
    _, eval_ds = eval_dataset_for(s["target_dataset"] if paired else s["dataset"], eval_transform,
                                  data_dir=s["data_dir"], seed=seed, eval_dataset=s["eval_dataset"])
    m.prepare(train_ds, device=train_config.device)
    mixer = _mixer(aug, n_classes, seed)
    if mixer is not None and m.needs_index and aug.mixing:
        raise ConfigError("mixup/cutmix mix images across a batch, so teacher outputs cached per image cannot be "
                          "replayed: run the teacher live (cache_teacher=false) or drop mixup/cutmix")
    extra = {"model": m.model_name or type(m).__name__, "dataset": str(s["dataset"]),
             "augment": json.loads(aug.key())}
    if s["ranking"]:
        extra["ranking"] = str(s["ranking"])
    if paired:
        extra["target_dataset"] = str(s["target_dataset"])
    extra.update(ctx.report)
    return _fit(m, train_ds, eval_ds, train_config, extra, mixer=mixer)


def _fit(m: Method, train_ds, eval_ds, train_config: TrainConfig, extra: dict, mixer=None) -> dict:
    """Run the Engine and return its report with ``extra`` added (rewritten to ``OUT/report.json``). A method
    that ``needs_index`` (reads per-sample teacher outputs) gets ``batch["index"]``."""
    if m.needs_index:
        from .teachers import IndexedDataset

        train_ds = IndexedDataset(train_ds)
    report = Engine(train_config).fit(m, train_ds, eval_ds, mixer=mixer)
    report.update(extra)
    if train_config.out_dir and int(os.environ.get("RANK", "0")) == 0:
        from .._io import write_json

        write_json(Path(train_config.out_dir) / "report.json", report)
    return report


def _tune_teacher(s: dict, source_spec: str, train_config: TrainConfig, aug) -> str:
    """``local-dir:OUT/teacher``: ``source_spec`` fine-tuned on the dataset, reused when that folder holds a
    complete run of the same model and dataset (``overwrite`` retrains it). The context service
    :attr:`MethodContext.tune_teacher`; every generator is seeded again afterwards, so the method is built from
    the same state whether the teacher was trained now or reused."""
    if not train_config.out_dir:
        raise ConfigError("the teacher is the ranking's top-1 fine-tuned first, into OUT/teacher: pass out= "
                          "(--out), or give the tuned teacher with teacher= (--teacher local-dir:PATH)")
    tdir = Path(train_config.out_dir) / "teacher"
    done = all((tdir / f).is_file() for f in ("report.json", "model.safetensors", "config.json"))
    try:
        if done and not train_config.overwrite:
            try:
                rep = json.loads((tdir / "report.json").read_text())
            except (OSError, ValueError):
                rep = {}
            if rep.get("model") == source_spec and rep.get("dataset") == str(s["dataset"]):
                return f"local-dir:{tdir}"
            raise OutputError(f"{tdir} holds a teacher tuned from {rep.get('model')!r} on {rep.get('dataset')!r}, "
                              f"not {source_spec!r} on {str(s['dataset'])!r}; pass --overwrite (overwrite=True) to "
                              "retrain it, or choose a new --out")
        resume = (tdir / "checkpoint.pt").is_file() and not train_config.overwrite
        train = {k: v for k, v in dataclasses.asdict(train_config).items()
                 if k not in ("out_dir", "resume", "overwrite")}
        tune("finetune", model=source_spec, dataset=s["dataset"], eval_dataset=s["eval_dataset"],
             num_classes=s["num_classes"], max_samples=s["max_samples"], data_dir=s["data_dir"], out=tdir,
             resume=resume, overwrite=bool(train_config.overwrite) and not resume,
             augment=dataclasses.asdict(aug), train=train)
        return f"local-dir:{tdir}"
    finally:
        seed_everything(train_config.seed)


# ---------------------------------------------------------------------------------------------- segmentation
def _task_finetune(task: str) -> str:
    """The registered method that ``method="finetune"`` means for ``task``: the one whose class says
    ``task = TASK`` and ``finetunes_task = True``."""
    for name in METHODS.names():
        cls = METHODS.get(name)
        if cls.task == task and cls.finetunes_task:
            return name
    raise ConfigError(f"no registered method fine-tunes for task={task!r}; choose a method with --method")


#: how many evaluation images the 2D panel shows
PANEL_IMAGES = 4


def _seg_subset(ds, max_samples, seed: int):
    """A seeded random ``max_samples`` of ``ds`` (all of it when None or larger), in index order."""
    if not max_samples or max_samples >= len(ds):
        return ds
    idx = np.sort(np.random.RandomState(seed).permutation(len(ds))[:max_samples])
    return torch.utils.data.Subset(ds, idx.tolist())


def _seg_check_pair(a, b, what_a: str, what_b: str) -> None:
    for attr in ("spatial_dims", "in_channels"):
        if getattr(a, attr) != getattr(b, attr):
            raise ConfigError(f"{what_a} has {attr}={getattr(a, attr)} but {what_b} has {getattr(b, attr)}; both "
                              "domains must be images of the same kind")


def _tune_segmentation(s: dict, cls, settings: dict, train_config: TrainConfig, paired: bool) -> dict:
    """The segmentation branch of :func:`tune`. Training: ``dataset``'s train split (``max_samples``: a seeded
    random subset); paired methods add ``target_dataset``'s train split as unlabelled target images (its masks
    are read in training only for the first N images when the method's ``target_labeled=N``, in the order of
    the seeded subset). Evaluation: ``eval_dataset``'s test split, else the target's (paired) or the dataset's
    test split. Classes: ``num_classes``, else the evaluation set's; the source's labels reach them through the
    method's ``class_map``. Volumes with ``roi_size``: training crops of that side. A 2D run with an output
    folder writes ``target_panel.png``: evaluation images, their masks and the predictions before and after
    training (needs matplotlib, ``hubtune[plot]``)."""
    from ..data.segmentation import RandomPatches, create_seg_dataset

    seed = train_config.seed
    src = create_seg_dataset(s["dataset"], "train", s["data_dir"])
    tgt = create_seg_dataset(s["target_dataset"], "train", s["data_dir"]) if paired else None
    ev_spec = s["eval_dataset"] or (s["target_dataset"] if paired else s["dataset"])
    ev = create_seg_dataset(ev_spec, "test", s["data_dir"])
    if not src.has_masks:
        raise ConfigError(f"training set {str(s['dataset'])!r} has no masks; a segmentation method needs labelled "
                          "source images (images/ and masks/)")
    if tgt is not None:
        _seg_check_pair(src, tgt, f"source {s['dataset']!r}", f"target {s['target_dataset']!r}")
    _seg_check_pair(src, ev, f"training set {s['dataset']!r}", f"evaluation set {ev_spec!r}")
    n_classes = int(s["num_classes"] or (ev.num_classes if ev.has_masks else src.num_classes))
    ctx = MethodContext(method=s["method"], model=s["model"], num_classes=n_classes, dataset=src, seed=seed,
                        settings=settings)
    seed_everything(seed)
    m = cls.from_settings(ctx)
    if not isinstance(m, Method):
        raise ConfigError(f"method {s['method']!r}: from_settings returned {type(m).__name__}, not a Method")
    roi = getattr(m, "roi_size", None)
    train_src = _seg_subset(src, s["max_samples"], seed)
    train_tgt = _seg_subset(tgt, s["max_samples"], seed + 1) if tgt is not None else None
    if roi is not None and src.spatial_dims == 3:
        train_src = RandomPatches(train_src, roi, seed=seed)
        train_tgt = RandomPatches(train_tgt, roi, seed=seed + 1) if train_tgt is not None else None
    n_lab = int(getattr(m, "target_labeled", 0) or 0)
    if n_lab and not tgt.has_masks:
        raise ConfigError(f"target_labeled={n_lab} needs masks in the target {s['target_dataset']!r}; it has none")
    if paired:
        from .methods.seg_adversarial import SegPairedDataset

        train_ds = SegPairedDataset(train_src, train_tgt, seed=seed, labelled=n_lab)
    else:
        train_ds = train_src
    out = Path(train_config.out_dir) if train_config.out_dir else None
    panel_idx = list(range(min(PANEL_IMAGES, len(ev)))) if ev.has_masks else []
    before = _seg_predict(m, ev, panel_idx, train_config) if out is not None and src.spatial_dims == 2 else None
    extra = {"task": "segmentation", "model": m.model_name or type(m).__name__, "dataset": str(s["dataset"]),
             "eval_dataset": str(ev_spec), "datasets": {"train": src.describe(), "eval": ev.describe()}}
    if paired:
        extra["target_dataset"] = str(s["target_dataset"])
        extra["datasets"]["target"] = tgt.describe()
    report = _fit(m, train_ds, ev, train_config, extra)
    report["target_dice_per_epoch" if paired or s["eval_dataset"] else "eval_dice_per_epoch"] = [
        h.get("eval_dice") for h in report["history"]]
    if out is not None and int(os.environ.get("RANK", "0")) == 0:
        if before is not None and panel_idx:
            after = _seg_predict(m, ev, panel_idx, train_config)
            try:
                _write_panel(out / "target_panel.png", ev, panel_idx, before, after,
                             title=f"{m.name} on {ev_spec}: before / after training")
                report["panel"] = "target_panel.png"
            except Exception as e:  # the model and report are written; a missing matplotlib must not lose them
                report["panel_error"] = f"{type(e).__name__}: {e}"
        from .._io import write_json

        write_json(out / "report.json", report)
    return report


@torch.no_grad()
def _seg_predict(m: Method, ds, idx: list[int], train_config: TrainConfig) -> list[np.ndarray]:
    if not idx:
        return []
    dev = torch.device(train_config.device) if train_config.device else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    was = m.training
    m.to(dev).eval()
    try:
        x = torch.stack([ds[i]["input"] for i in idx]).to(dev)
        return list(m.predict(x).float().argmax(1).cpu().numpy())
    finally:
        m.train(was)


def _write_panel(path: Path, ds, idx, before, after, title: str = "") -> None:
    """A PNG grid, one row per image: the image, its mask, the prediction before and after training (with
    each prediction's Dice), written atomically."""
    from .._io import pyplot, save_png
    from .engine import dice_per_class

    plt = pyplot("the segmentation panel")

    rows = len(idx)
    fig, axes = plt.subplots(rows, 4, figsize=(8, 2.1 * rows + 0.4), squeeze=False)
    for r, i in enumerate(idx):
        item = ds[i]
        img, mask = item["input"][0].numpy(), item["target"].numpy()
        c = int(max(mask.max(), before[r].max(), after[r].max(), 1)) + 1
        cols = [(img, "image", "gray"), (mask, "mask", "viridis")]
        for name, pred in (("before", before[r]), ("after", after[r])):
            d, v = dice_per_class(torch.as_tensor(pred)[None], torch.as_tensor(mask)[None], c)
            dice = float(d[v].mean()) if v.any() else float("nan")
            cols.append((pred, f"{name}: Dice {dice:.3f}", "viridis"))
        for ax, (a, t, cmap) in zip(axes[r], cols):
            ax.imshow(a, cmap=cmap, interpolation="nearest", vmin=None if cmap == "gray" else 0,
                      vmax=None if cmap == "gray" else c - 1)
            ax.set_title(t, fontsize=8)
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_png(fig, path, dpi=80)
