"""Search spaces of student architectures: a YAML/JSON file or a dict, read into a :class:`SearchSpace`.

A space names a timm architecture (or lets the search choose among several, with the parameter ``arch``) and the
constructor arguments the search varies; every other constructor argument is ``fixed``::

    # space.yaml: MobileNetV3-Small, width from the architecture name, depth and head width as kwargs
    arch:
      choices: [mobilenetv3_small_050, mobilenetv3_small_075, mobilenetv3_small_100]
    params:
      depth_multiplier: {choices: [0.5, 0.75, 1.0]}
      num_features: {choices: [256, 512, 1024]}
    fixed: {drop_rate: 0.0}
    layers: auto          # or {student_path: teacher_path, ...}

A parameter is ``{choices: [...]}`` (categorical), ``{low: L, high: H, step: S}`` (integers, or floats when
any of them is a float; ``step`` makes it discrete, so the grid sampler can enumerate it) or
``{low: L, high: H, log: true}``. ``arch`` is either a name or a parameter. A student is
``timm.create_model(arch, pretrained=False, num_classes=C, **fixed, **params)``, or ``build(params)`` when a
Python callable is given instead (``SearchSpace(params=..., build=fn)``; then ``arch`` is not needed).

``layers``: ``auto`` derives the student-teacher layer pairs of flash distillation from the two models'
``feature_info`` (see :func:`hubtune.search.trial.layer_mapping`); a mapping gives them explicitly.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError

__all__ = ["Param", "SearchSpace", "load_space", "params_key"]

SPACE_KEYS = ("arch", "params", "fixed", "layers", "family")


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class Param:
    """One searched argument: ``choices`` (categorical) or a numeric range ``low..high`` (``step``, ``log``)."""
    name: str
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False

    @classmethod
    def from_dict(cls, name: str, spec, where: str = "space") -> "Param":
        if isinstance(spec, (list, tuple)):
            spec = {"choices": list(spec)}
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: parameter {name!r} is {spec!r}; give {{choices: [...]}} or "
                              "{low: L, high: H[, step: S][, log: true]}")
        unknown = sorted(set(spec) - {"choices", "low", "high", "step", "log"})
        if unknown:
            raise ConfigError(f"{where}: parameter {name!r} has unknown key(s) {unknown}; use choices, or low/high "
                              "with step or log")
        if "choices" in spec:
            ch = spec["choices"]
            if set(spec) != {"choices"}:
                raise ConfigError(f"{where}: parameter {name!r} gives choices and a range; give one of them")
            if not isinstance(ch, (list, tuple)) or not ch:
                raise ConfigError(f"{where}: parameter {name!r} choices={ch!r}; give a non-empty list")
            for c in ch:
                if not (c is None or isinstance(c, (bool, int, float, str))):
                    raise ConfigError(f"{where}: parameter {name!r} choice {c!r} is a {type(c).__name__}; choices "
                                      "must be numbers, strings, booleans or null")
            if len({json.dumps(c) for c in ch}) != len(ch):
                raise ConfigError(f"{where}: parameter {name!r} choices={list(ch)!r} repeat a value; list each once")
            return cls(name, choices=tuple(ch))
        lo, hi, step, log = spec.get("low"), spec.get("high"), spec.get("step"), bool(spec.get("log", False))
        if not (_num(lo) and _num(hi)) or not lo <= hi:
            raise ConfigError(f"{where}: parameter {name!r} low={lo!r} high={hi!r}; give two numbers with low <= high")
        if step is not None and (not _num(step) or step <= 0):
            raise ConfigError(f"{where}: parameter {name!r} step={step!r}; give a number > 0")
        if log and (step is not None or lo <= 0):
            raise ConfigError(f"{where}: parameter {name!r} log=true needs low > 0 and no step")
        return cls(name, low=lo, high=hi, step=step, log=log)

    @property
    def is_int(self) -> bool:
        return self.choices is None and all(isinstance(v, int) for v in (self.low, self.high, self.step or 1))

    def grid(self) -> list:
        """Every value (for the grid sampler); a continuous range has none: :class:`ConfigError`."""
        if self.choices is not None:
            return list(self.choices)
        if self.step is None:
            if self.is_int and not self.log:
                return list(range(int(self.low), int(self.high) + 1))
            raise ConfigError(f"parameter {self.name!r} is continuous ({self.low}..{self.high}); the grid sampler "
                              "needs a step: (step: S) or choices")
        n = int(math.floor((self.high - self.low) / self.step + 1e-9))
        vals = [self.low + i * self.step for i in range(n + 1)]
        return [int(v) for v in vals] if self.is_int else [round(v, 12) for v in vals]

    def suggest(self, trial):
        """The value of this parameter for an Optuna trial."""
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.is_int:
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1),
                                     log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), step=self.step, log=self.log)

    def describe(self) -> dict:
        if self.choices is not None:
            return {"choices": list(self.choices)}
        d = {"low": self.low, "high": self.high}
        if self.step is not None:
            d["step"] = self.step
        if self.log:
            d["log"] = True
        return d


def params_key(params: dict) -> str:
    """A canonical text of a parameter dict (sorted keys, JSON): equal proposals have equal keys."""
    return json.dumps({k: params[k] for k in sorted(params)}, sort_keys=True, separators=(",", ":"))


@dataclass
class SearchSpace:
    """The searched arguments (``params``, including ``arch`` when the architecture is searched), the ``fixed``
    ones, the architecture when it is fixed, the layer mapping (``"auto"`` or a dict), and optionally
    ``build(params) -> nn.Module`` (a user's builder; it receives the sampled params plus ``num_classes``)."""
    params: dict[str, Param] = field(default_factory=dict)
    arch: str | None = None
    fixed: dict = field(default_factory=dict)
    layers: Any = "auto"
    build: Callable | None = None
    family: str | None = None

    def __post_init__(self):
        if isinstance(self.params, dict):
            self.params = {n: (p if isinstance(p, Param) else Param.from_dict(n, p)) for n, p in self.params.items()}
        else:
            raise ConfigError(f"space params={self.params!r}; give a mapping {{name: {{choices: [...]}}}}")
        if not self.params:
            raise ConfigError("the search space has no parameters: give at least one under 'params' (or 'arch' "
                              "with choices)")
        if self.build is None and self.arch is None and "arch" not in self.params:
            raise ConfigError("the search space names no architecture: give 'arch: NAME' (or arch: {choices: "
                              "[...]}) or a build(params) function")
        if self.build is not None and not callable(self.build):
            raise ConfigError(f"space build={self.build!r} is not callable; give a function params -> nn.Module")
        if not isinstance(self.fixed, dict):
            raise ConfigError(f"space fixed={self.fixed!r}; give a mapping of constructor arguments")
        clash = sorted(set(self.fixed) & set(self.params))
        if clash:
            raise ConfigError(f"space: {clash} are both fixed and searched; keep each in one place")
        for bad in ("pretrained", "num_classes"):
            if bad in self.fixed or bad in self.params:
                raise ConfigError(f"space: {bad!r} is set by the search (students are built from scratch for the "
                                  "dataset's classes); remove it from the space")
        if not (self.layers == "auto" or (isinstance(self.layers, dict) and self.layers
                                          and all(isinstance(k, str) and isinstance(v, str)
                                                  for k, v in self.layers.items()))):
            raise ConfigError(f"space layers={self.layers!r}; give 'auto' or a mapping {{student_path: teacher_path}}")
        if self.build is None:
            import timm

            for a in ([self.arch] if self.arch else list(self.params["arch"].choices or ())):
                if not isinstance(a, str) or not timm.is_model(a):
                    raise ConfigError(f"space arch {a!r} is not a timm architecture; see timm.list_models()")
            if "arch" in self.params and self.params["arch"].choices is None:
                raise ConfigError("space: 'arch' must be a list of choices")

    # ------------------------------------------------------------------ use
    def grid(self) -> dict[str, list]:
        """``{name: values}`` for Optuna's GridSampler."""
        return {n: p.grid() for n, p in self.params.items()}

    def size(self) -> int | None:
        """How many distinct students the space holds (None when a parameter is continuous)."""
        try:
            return math.prod(len(v) for v in self.grid().values())
        except ConfigError:
            return None

    def suggest(self, trial) -> dict:
        return {n: p.suggest(trial) for n, p in self.params.items()}

    def arch_and_kwargs(self, params: dict) -> tuple[str | None, dict]:
        """``(architecture, constructor kwargs)`` of the student ``params`` describes (builder spaces: arch None)."""
        kwargs = dict(self.fixed)
        kwargs.update({k: v for k, v in params.items() if k != "arch"})
        return params.get("arch", self.arch), kwargs

    def build_student(self, params: dict, num_classes: int):
        """The student for ``params``, untrained (``pretrained=False``)."""
        arch, kwargs = self.arch_and_kwargs(params)
        if self.build is not None:
            model = self.build(dict(params, num_classes=num_classes))
        else:
            import timm

            try:
                model = timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)
            except (TypeError, ValueError, RuntimeError, AssertionError, KeyError) as e:
                raise ConfigError(f"timm could not build {arch} with {kwargs} ({type(e).__name__}: "
                                  f"{' '.join(str(e).split())[:200]}); fix the space's params/fixed") from None
        import torch

        if not isinstance(model, torch.nn.Module):
            raise ConfigError(f"the space's build(params) returned {type(model).__name__}, not an nn.Module")
        return model

    def describe(self) -> dict:
        d = {"params": {n: p.describe() for n, p in self.params.items()}, "fixed": dict(self.fixed),
             "layers": self.layers if self.layers == "auto" else dict(self.layers)}
        if "arch" in self.params:
            d["arch"] = {"choices": list(self.params["arch"].choices)}
        elif self.arch:
            d["arch"] = self.arch
        if self.build is not None:
            d["build"] = getattr(self.build, "__qualname__", repr(self.build))
        if self.family:
            d["family"] = self.family
        return d

    def fingerprint(self) -> str:
        """A hash of what the space describes (a study refuses to resume with another space). A ``build``
        function is not part of it (only its parameters are): changing the function between runs is on you."""
        d = {k: v for k, v in self.describe().items() if k != "build"}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def load_space(space, build: Callable | None = None) -> SearchSpace:
    """A :class:`SearchSpace` from itself, a dict, or a YAML/JSON file (see the module docstring)."""
    if isinstance(space, SearchSpace):
        return space
    where = "space"
    if isinstance(space, (str, Path)):
        path = Path(space)
        if not path.is_file():
            raise ConfigError(f"search space file {str(path)!r} does not exist; give a YAML or JSON file "
                              "(params:, arch:, fixed:, layers:)")
        import yaml

        try:
            space = yaml.safe_load(path.read_text())  # JSON is YAML
        except yaml.YAMLError as e:
            raise ConfigError(f"search space file {path} is not valid YAML/JSON: {e}") from None
        where = str(path)
    if not isinstance(space, dict):
        raise ConfigError(f"{where}: a search space is a mapping (params:, arch:, fixed:, layers:), got "
                          f"{type(space).__name__}")
    unknown = sorted(set(space) - set(SPACE_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; a space has {', '.join(SPACE_KEYS)}")
    params = dict(space.get("params") or {})
    arch = space.get("arch")
    if isinstance(arch, (dict, list)):
        if "arch" in params:
            raise ConfigError(f"{where}: 'arch' is given twice (top level and under params)")
        params["arch"] = arch
        arch = None
    try:
        params = {n: Param.from_dict(n, p, where) for n, p in params.items()}
        return SearchSpace(params=params, arch=arch, fixed=dict(space.get("fixed") or {}),
                           layers=space.get("layers", "auto") or "auto", build=build, family=space.get("family"))
    except ConfigError as e:
        if str(e).startswith(where):
            raise
        raise ConfigError(f"{where}: {e}") from None
