"""The method contract, its registry and its front door: a method defines loss terms, the
:class:`~hubtune.tuning.engine.Engine` owns the loop, and a new method is one file.

A method says what it needs in class attributes, and :func:`hubtune.tune`, ``hubtune tune`` (its options, its
``--help``, ``--method-arg`` validation), :func:`create_method` and :func:`~hubtune.tuning.make_transferable`
read them; nothing inspects a constructor::

    from hubtune.tuning import Method, Setting, new_head, register_method

    @register_method("mymethod")          # in hubtune/tuning/methods/mymethod.py, or any module named by the
    class MyMethod(Method):               # HUBTUNE_PLUGINS variable or the `hubtune.methods` entry-point group
        inputs = "labeled"                # one labelled dataset ("paired": + unlabelled target images)
        settings = {"smoothing": Setting(0.0, "label smoothing of the cross-entropy", float)}
        regularizers = ("bss", "l2sp")    # optional: bss_eta=..., l2sp_alpha=... become settings too

        def __init__(self, model, num_classes, *, smoothing=0.0, **regularizers):
            super().__init__()
            nh = new_head(model, num_classes, who="mymethod")        # a copy of the model with a new head
            self.model, self.smoothing = nh.module, smoothing
            self.add_regularizers(self.model, nh.source_state, nh.head_names, **regularizers)

        def losses(self, batch):                                       # batch["input"], batch["target"]
            f = penultimate_features(self.model, batch["input"])
            ce = F.cross_entropy(self.model.get_classifier()(f), batch["target"], label_smoothing=self.smoothing)
            reg = self.regularize(f)                                   # {"bss": ..., "l2sp": ...} when enabled
            return {"total": ce + sum(reg.values()), "ce": ce.detach(), **{k: v.detach() for k, v in reg.items()}}

        def predict(self, x):
            return self.model(x)

        def model_to_save(self):
            return self.model

The default :meth:`Method.from_settings` builds it as ``cls(model, num_classes=..., **settings)`` (and sets
``data_config`` and ``model_name`` from the loaded model when the constructor did not); a method that needs more
(teachers, a ranking, a seed) overrides that classmethod. The declarative attributes:

* ``inputs``: ``"labeled"`` (one dataset, batches ``{"input", "target"}``) or ``"paired"`` (a labelled source and
  an unlabelled target; batches add ``"target_input"``; evaluated on the target's test split).
* ``needs_index``: batches carry ``"index"`` (the sample's position), for per-sample teacher caches; an instance
  may set it (``kd`` does when it reads a cache).
* ``models``: ``"one"`` (one hub model: ``model=`` or the ranking's best) or ``"many"`` (``model=`` a list, or the
  ranking's top-K).
* ``teachers``: the constructor arguments that are teachers (``("teacher",)`` for ``kd``); ``tune(teacher=)`` and
  ``--teacher`` fill the first; a method without teachers refuses one.
* ``settings``: the method's own arguments, ``{name: Setting(default, help, type)}``, declared once;
  ``regularizers`` adds the settings of the generic regularizers the method supports (:data:`REGULARIZERS`).
* ``train_defaults``: TrainConfig fields the method trains best with; ``sparse_parameters``: DDP needs
  ``find_unused_parameters``.
* ``task``: ``"classification"`` (default) or ``"segmentation"`` (``tune(task=...)``/``--task`` check it; the
  engine evaluates a segmentation method by Dice); ``finetunes_task``: the method ``finetune`` means for its
  task.

Registry: :data:`METHODS` imports every module of :mod:`hubtune.tuning.methods` (``pkgutil`` over the package's
``__path__``), the entry points of the group ``hubtune.methods`` and the modules named in ``HUBTUNE_PLUGINS``
(comma-separated) the first time it is read, and looks again for new modules on every later read.
"""
from __future__ import annotations

import importlib
import os
import pkgutil
import random
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from ..errors import ConfigError
from ..registry import Registry

__all__ = ["Method", "MultiModelMethod", "Setting", "MethodContext", "METHODS", "register_method", "create_method",
           "list_methods", "REGULARIZERS", "seed_everything", "PLUGINS_ENV", "ENTRY_POINT_GROUP"]

PLUGINS_ENV = "HUBTUNE_PLUGINS"
ENTRY_POINT_GROUP = "hubtune.methods"
INPUTS = ("labeled", "paired")
MODELS = ("one", "many")


# ---------------------------------------------------------------------------------------------- settings
_MISSING = object()


@dataclass(frozen=True)
class Setting:
    """One argument of a method: its default, a line of help (``hubtune tune --help`` prints it) and the type(s)
    a value must have (None: any; ``None`` is always accepted when the default is None; an int is a float)."""
    default: Any = None
    help: str = ""
    type: Any = None

    def check(self, method: str, name: str, value):
        if self.type is None or (value is None and self.default is None):
            return value
        types = self.type if isinstance(self.type, tuple) else (self.type,)
        if float in types and isinstance(value, int) and not isinstance(value, bool):
            return value
        if bool not in types and isinstance(value, bool):
            ok = False
        else:
            ok = isinstance(value, types)
        if not ok:
            want = " or ".join(t.__name__ for t in types)
            raise ConfigError(f"method {method!r}: {name}={value!r} is invalid (--method-arg / method_args): give "
                              f"a {want}" + (" or null" if self.default is None else ""))
        return value

    def describe(self, name: str) -> str:
        return f"{name}={self.default!r}" + (f": {self.help}" if self.help else "")


#: the generic regularizers a method may declare in ``regularizers`` (their settings join the method's own);
#: built by :meth:`Method.add_regularizers`, applied by :meth:`Method.regularize`
REGULARIZERS = {
    "bss": {"bss_eta": Setting(0.0, "weight of Batch Spectral Shrinkage (BSS, Chen et al. 2019) on the "
                                    "features; 0 = off, the paper uses 0.001", float),
            "bss_k": Setting(1, "BSS: how many of the smallest singular values are shrunk", int)},
    "l2sp": {"l2sp_alpha": Setting(0.0, "L2-SP (Li et al. 2018): weight pulling the backbone toward its "
                                        "pretrained weights; 0 = off, the paper uses 0.01", float),
             "l2sp_beta": Setting(0.0, "L2-SP: weight decay of the new head; 0 = off, the paper uses 0.01", float)},
}


# ---------------------------------------------------------------------------------------------- the context
@dataclass
class MethodContext:
    """What :meth:`Method.from_settings` builds a method from. ``model``: one spec, Candidate, HubModel or timm
    module (``models = "one"``), or a list of them (``"many"``); None to take it from ``ranking``. ``teachers``:
    ``{constructor argument: teacher}`` for the names in ``cls.teachers``. ``dataset``: the training set (an
    :class:`~hubtune.data.ImageDataset` before any transform), for checks (a ranking made on another dataset)
    and fits. ``data_config``: the data config the batches are prepared with when it is not the model's.
    ``settings``: the method's settings, validated, defaults filled. ``tune_teacher(spec) -> spec``: given by
    :func:`hubtune.tune` only, fine-tunes ``spec`` on the dataset (into ``OUT/teacher``, reused when complete)
    and returns the tuned model's spec. ``report``: what the method adds to ``report.json`` (e.g. the teacher
    it chose)."""
    method: str
    model: Any = None
    num_classes: int | None = None
    teachers: dict = field(default_factory=dict)
    ranking: Any = None
    top_k: int | None = None
    dataset: Any = None
    seed: int = 0
    data_config: dict | None = None
    settings: dict = field(default_factory=dict)
    tune_teacher: Callable[[str], str] | None = None
    report: dict = field(default_factory=dict)

    def best_of_ranking(self) -> str:
        """The ranking's best spec (``top_k`` is how many a many-model method takes; one model is the top-1)."""
        from .models import ranking_top

        return ranking_top(self.ranking, 1, self.method)[1][0]


# ---------------------------------------------------------------------------------------------- the registry
class MethodRegistry(Registry):
    """:class:`~hubtune.registry.Registry` that finds its methods itself (see the module docstring)."""

    def __init__(self, kind: str, package: str):
        super().__init__(kind)
        self.package = package
        self._entry_points_loaded = False
        self._scanning = False

    def discover(self) -> None:
        """Import what is not imported yet: the modules of the methods package, the ``hubtune.methods`` entry
        points (once), the ``HUBTUNE_PLUGINS`` modules."""
        if self._scanning:
            return
        self._scanning = True
        try:
            pkg = importlib.import_module(self.package)
            for info in pkgutil.iter_modules(pkg.__path__):
                if not info.name.startswith("_"):
                    importlib.import_module(f"{self.package}.{info.name}")
            if not self._entry_points_loaded:
                self._entry_points_loaded = True
                from importlib.metadata import entry_points

                for ep in entry_points(group=ENTRY_POINT_GROUP):
                    try:
                        ep.load()
                    except Exception as e:  # a broken third-party package must not break hubtune
                        warnings.warn(f"the {ENTRY_POINT_GROUP} entry point {ep.name!r} ({ep.value}) failed to load "
                                      f"({type(e).__name__}: {e}); its methods are not registered")
            for name in (n.strip() for n in os.environ.get(PLUGINS_ENV, "").split(",")):
                if name:
                    try:
                        importlib.import_module(name)
                    except ImportError as e:
                        raise ConfigError(f"{PLUGINS_ENV} names the module {name!r}, which cannot be imported "
                                          f"({e}); put its folder on PYTHONPATH, or fix {PLUGINS_ENV} "
                                          "(comma-separated module names)") from None
        finally:
            self._scanning = False

    def get(self, name: str):
        self.discover()
        return super().get(name)

    def names(self) -> list[str]:
        self.discover()
        return super().names()

    def __contains__(self, name: object) -> bool:
        self.discover()
        return super().__contains__(name)


METHODS: MethodRegistry = MethodRegistry("tuning method", __name__.rpartition(".")[0] + ".methods")


def register_method(name: str):
    """Class decorator: registers a :class:`Method` subclass under ``name`` and sets ``cls.name``. Its
    declarative attributes are checked here, so a mistake shows when the file is imported."""

    def decorator(cls):
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"@register_method({name!r}) decorates a Method subclass, not {cls!r}")
        if cls.inputs not in INPUTS:
            raise TypeError(f"method {name!r}: inputs={cls.inputs!r}; choose one of {INPUTS}")
        if cls.models not in MODELS:
            raise TypeError(f"method {name!r}: models={cls.models!r}; choose one of {MODELS}")
        unknown = [r for r in cls.regularizers if r not in REGULARIZERS]
        if unknown:
            raise TypeError(f"method {name!r}: unknown regularizers {unknown}; known: {list(REGULARIZERS)}")
        cls.name = name
        return METHODS.register(name)(cls)

    return decorator


def list_methods() -> list[str]:
    """The registered method names (built-in, ``HUBTUNE_PLUGINS`` and entry points)."""
    return METHODS.names()


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch's generators (CPU and CUDA) from ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------- the contract
class Method(torch.nn.Module):
    """Defines loss terms only; the Engine owns the loop. See the module docstring for the declarative
    attributes.

    ``forward(batch)`` is ``losses(batch)`` so that a ``DistributedDataParallel`` wrapper (which hooks
    ``forward``) synchronises the gradients of every term.
    """

    name = ""
    inputs = "labeled"
    needs_index = False
    models = "one"
    teachers: tuple = ()
    settings: dict = {}
    regularizers: tuple = ()
    #: TrainConfig fields this method trains best with (e.g. the authors' optimiser); :func:`hubtune.tune`
    #: applies them beneath any config file or explicit argument
    train_defaults: dict = {}
    #: some parameters get no gradient in a step (routing): DDP then needs ``find_unused_parameters``
    sparse_parameters = False
    #: the data config the batches are prepared with (:func:`hubtune.tune` builds the transforms from it)
    data_config: dict | None = None
    #: the model(s) tuned, for the report
    model_name: str = ""
    #: what the method learns: "classification" (evaluated by accuracy) or "segmentation" (by Dice and HD95; the
    #: datasets are (image, mask) pairs, :mod:`hubtune.data.segmentation`)
    task = "classification"
    #: the method ``method="finetune"`` means for a task other than classification (``seg-finetune``)
    finetunes_task = False

    # ------------------------------------------------------------------ declared settings
    @classmethod
    def all_settings(cls) -> dict:
        """``{name: Setting}``: the method's own settings and those of its regularizers."""
        out = dict(cls.settings)
        for r in cls.regularizers:
            out.update(REGULARIZERS[r])
        return out

    @classmethod
    def resolve_settings(cls, given: dict) -> dict:
        """``given`` checked against :meth:`all_settings` (an unknown name or a value of the wrong type is a
        :class:`ConfigError` that lists what the method accepts), defaults filled."""
        declared = cls.all_settings()
        given = {str(k).replace("-", "_"): v for k, v in (given or {}).items()}
        unknown = sorted(set(given) - set(declared))
        if unknown:
            accepts = ", ".join(declared) or "no arguments"
            raise ConfigError(f"method {cls.name!r} has no argument {', '.join(repr(u) for u in unknown)} "
                              f"(--method-arg / method_args); it accepts: {accepts}")
        return {n: (s.check(cls.name, n, given[n]) if n in given else s.default) for n, s in declared.items()}

    @classmethod
    def from_settings(cls, ctx: MethodContext) -> "Method":
        """Build the method: ``cls(model, num_classes=..., **teachers, **settings)`` with ``model`` the context's
        (loaded once, ``pretrained`` as the settings say) or the ranking's best; ``data_config`` and
        ``model_name`` are taken from the loaded model when the constructor did not set them. Override it when
        the method is built otherwise."""
        from .models import load_model

        model = ctx.model
        if model is None and ctx.ranking is not None:
            model = ctx.best_of_ranking()
        elif model is not None and ctx.ranking is not None and not cls.teachers:
            raise ConfigError("give either model= or ranking=, not both")
        if model is None:
            raise ConfigError("no model given; pass model= (a spec such as 'resnet18' or 'local-dir:PATH') or "
                              "ranking= (a `hubtune rank --out` folder) with top_k=")
        hm = load_model(model, pretrained=bool(ctx.settings.get("pretrained", True)))
        m = cls(hm, num_classes=ctx.num_classes, **ctx.teachers, **ctx.settings)
        if m.data_config is None:
            m.data_config = dict(hm.data_config)
        if not m.model_name:
            m.model_name = hm.name
        return m

    # ------------------------------------------------------------------ losses
    def losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """Loss terms of one batch; must include ``"total"`` (the one that is back-propagated).

        ``batch`` has ``"input"`` and, except for label-free methods, ``"target"``."""
        raise NotImplementedError

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        return self.losses(batch)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)``, used for evaluation."""
        raise NotImplementedError

    # ------------------------------------------------------------------ generic regularizers
    def add_regularizers(self, model: torch.nn.Module, source_state: dict | None = None, head_names=(),
                         **values) -> None:
        """Build the regularizers this class declares from their settings (``bss_eta``, ``bss_k``,
        ``l2sp_alpha``, ``l2sp_beta``; see :data:`REGULARIZERS`): BSS on the features :meth:`regularize` is
        given, L2-SP of ``model`` toward ``source_state`` (the pretrained weights) with ``head_names`` (the new
        head) decayed toward 0 instead. A weight of 0 builds nothing."""
        from .losses.regularizers import BatchSpectralShrinkage, L2Regularization, SPRegularization

        declared = {n: s for r in self.regularizers for n, s in REGULARIZERS[r].items()}
        unknown = sorted(set(values) - set(declared))
        if unknown:
            raise ConfigError(f"method {self.name or type(self).__name__!r} has no argument "
                              f"{', '.join(repr(u) for u in unknown)}; it accepts: "
                              f"{', '.join(type(self).all_settings())}")
        v = {n: values.get(n, s.default) for n, s in declared.items()}
        for n in ("bss_eta", "l2sp_alpha", "l2sp_beta"):
            if n in v and (isinstance(v[n], bool) or not isinstance(v[n], (int, float)) or not v[n] >= 0):
                raise ConfigError(f"{type(self).__name__} {n}={v[n]!r} is invalid: give a number >= 0 (0 disables it)")
        if "bss_k" in v and (isinstance(v["bss_k"], bool) or not isinstance(v["bss_k"], int) or v["bss_k"] < 1):
            raise ConfigError(f"{type(self).__name__} bss_k={v['bss_k']!r} is invalid: give a whole number >= 1")
        self.regularizer_weights = {n: (float(x) if n != "bss_k" else int(x)) for n, x in v.items()}
        self.regularizer_modules = torch.nn.ModuleDict()
        if v.get("bss_eta", 0) > 0:
            self.regularizer_modules["bss"] = BatchSpectralShrinkage(v["bss_k"])
        if v.get("l2sp_alpha", 0) > 0:
            if source_state is None:
                raise ConfigError(f"{type(self).__name__}: l2sp_alpha needs the pretrained weights (source_state)")
            self.regularizer_modules["l2sp"] = SPRegularization(source_state, model, skip=set(head_names))
        if v.get("l2sp_beta", 0) > 0:
            params = dict(model.named_parameters())
            self.regularizer_modules["l2_head"] = L2Regularization([params[n] for n in sorted(head_names)
                                                                    if n in params])

    def regularize(self, features: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The weighted terms of the regularizers that are on: ``"bss"`` (``bss_eta`` x BSS of ``features``)
        and ``"l2sp"`` (``l2sp_alpha`` x SP + ``l2sp_beta`` x L2 of the head). Empty when none is on."""
        mods = getattr(self, "regularizer_modules", None)
        if not mods:
            return {}
        w = self.regularizer_weights
        out = {}
        if "l2sp" in mods or "l2_head" in mods:
            terms = []
            if "l2sp" in mods:
                terms.append(w["l2sp_alpha"] * mods["l2sp"]())
            if "l2_head" in mods:
                terms.append(w["l2sp_beta"] * mods["l2_head"]())
            out["l2sp"] = sum(terms)
        if "bss" in mods and features is not None:
            out["bss"] = w["bss_eta"] * mods["bss"](features)
        return out

    # ------------------------------------------------------------------ optimisation, saving, hooks
    def param_groups(self, lr: float) -> list[dict]:
        """Optimizer parameter groups; the default is one group of every trainable parameter at ``lr``.

        A group's ``lr`` is its starting learning rate: the engine's scheduler scales every group by the
        same factor, so per-group multipliers are kept throughout."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": lr}]

    def model_to_save(self) -> torch.nn.Module:
        """The tuned model (a timm model), saved as ``model.safetensors`` + ``config.json``."""
        raise NotImplementedError

    def prepare(self, train_dataset, device=None) -> None:
        """Called by :func:`hubtune.tune` once before training, with the transformed training set; a method
        that needs a pass over the data first (B-Tuning fitting its student projection) does it here."""

    def save(self, out_dir) -> None:
        """Write the tuned model to ``out_dir``; the default saves :meth:`model_to_save` as a timm folder
        (``model.safetensors`` + ``config.json``, loadable as ``local-dir:OUT``). A method whose result is not
        one timm model (a pathway over several models, say) overrides this."""
        from ._save import save_timm_folder

        save_timm_folder(self.model_to_save(), out_dir, data_config=self.data_config)

    def on_train_start(self, total_steps: int) -> None:
        """Called by the engine once before the first step (after a resumed checkpoint is restored) with the
        run's total number of optimizer steps (epochs x steps per epoch); schedules measured in fractions of
        the run (the GRL warm-up of DANN/CDAN) use it."""

    def on_epoch_start(self, epoch: int, total_epochs: int) -> None:
        """Called by the engine before each epoch (0-based)."""

    def batches(self, batches):
        """The epoch's training batches (dicts, on the host, in order) as the engine consumes them. The default
        passes them through; a method whose teacher is a service (``serve:NAME``) wraps them so the teacher's
        outputs for the next batches are requested while the student trains on this one
        (:meth:`hubtune.serving.TeacherClient.pipeline`)."""
        return batches

    def frozen_modules(self) -> dict[str, torch.nn.Module]:
        """Frozen, never-trained submodules (teachers), by attribute path (``{"teacher": self.teacher}``).

        The engine keeps their tensors out of ``checkpoint.pt`` (it records each one's identity instead); on
        resume the method rebuilds them itself (from its spec, as at the start) and the engine checks that the
        rebuilt module has the recorded identity. Default: none."""
        return {}

    def hparams(self) -> dict:
        """The method's hyper-parameters, written to ``report.json``."""
        return {}


class MultiModelMethod(Method):
    """Base of the methods that hold several hub models (``models = "many"``): built from ``model=`` as a list or
    from the top-K of ``ranking`` (:meth:`from_ranking`)."""

    models = "many"
    model_names: list = []  # the specs (or class names) of the models it holds

    @classmethod
    def from_ranking(cls, ranking, top_k: int, num_classes: int, *, dataset=None, **kwargs):
        """``cls(top-K specs of ranking, num_classes, **kwargs)``. ``dataset`` (the training set) is accepted
        so that every multi-model method is built the same way; the ranking only chooses the models here, so
        it is not checked against it (B-Tuning, which uses the ranking's LogME weights, does check)."""
        from .models import ranking_top

        _, specs = ranking_top(ranking, top_k, cls.name)
        return cls(specs, num_classes, **kwargs)

    @classmethod
    def from_settings(cls, ctx: MethodContext) -> "Method":
        if ctx.ranking is not None:
            if ctx.model is not None:
                raise ConfigError(f"method {cls.name!r} takes its models from ranking= (top_k=) or from model= (a "
                                  "list of specs), not both")
            m = cls.from_ranking(ctx.ranking, int(ctx.top_k or 2), ctx.num_classes, dataset=ctx.dataset,
                                 **ctx.settings)
        elif ctx.model is not None:
            models = ctx.model if isinstance(ctx.model, (list, tuple)) else [ctx.model]
            m = cls(list(models), ctx.num_classes, **ctx.settings)
        else:
            raise ConfigError(f"method {cls.name!r} needs several models: pass ranking= (a `hubtune rank --out` "
                              "folder) with top_k=, or model= as a list of specs")
        if not m.model_name:
            m.model_name = " + ".join(m.model_names)
        return m


# ---------------------------------------------------------------------------------------------- the front door
#: :func:`create_method` arguments that are not settings: what the method is built around
CONTEXT_KEYS = ("model", "num_classes", "ranking", "top_k", "dataset", "seed", "data_config")


def create_method(name: str, **kwargs) -> Method:
    """The registered method ``name``, built from ``kwargs`` (the timm way: one door over a registry).

    ``model`` (a spec, Candidate or timm model; a list for a many-model method), ``num_classes``, ``ranking``
    and ``top_k``, ``dataset`` (the training set, for checks), ``data_config`` (the batches' data config) and
    ``seed`` describe what the method is built around; the names in the method's ``teachers`` (``teacher=``
    for ``kd``) are its teachers; every other keyword is one of its declared settings, validated (an unknown
    one is a :class:`ConfigError` listing those it accepts). ``seed=N`` seeds every generator first, so new
    heads, discriminators, gates and matchers are reproducible."""
    cls = METHODS.get(name)
    seed = kwargs.pop("seed", None)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ConfigError(f"seed={seed!r} is invalid: give a whole number")
    ctx_args = {k: kwargs.pop(k) for k in CONTEXT_KEYS if k in kwargs}
    teachers = {k: kwargs.pop(k) for k in cls.teachers if k in kwargs}
    settings = cls.resolve_settings(kwargs)
    if seed is not None:
        seed_everything(seed)
    ctx = MethodContext(method=name, teachers=teachers, settings=settings, seed=0 if seed is None else seed,
                        **ctx_args)
    return cls.from_settings(ctx)
