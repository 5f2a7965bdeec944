"""One AutoDistillation trial: build a student, train it by **flash distillation** then **regular
distillation** through hubtune's :class:`~hubtune.tuning.engine.Engine` and ``kd`` method, evaluate it, measure
its latency.

**Flash distillation** (stage by stage). The layer pairs ``student_path -> teacher_path`` (from the two models'
``feature_info``, :func:`layer_mapping`, or given) cut the student into consecutive stages: stage ``k`` is every
parameter-holding module that runs after the end of pair ``k-1``'s student module and up to the end of pair
``k``'s (stage 0 includes the stem). For each stage in order, only that stage's parameters are trained (every
other student parameter has ``requires_grad=False`` and is outside the optimiser; the other modules stay in
eval mode, so their BatchNorm statistics do not move), for ``flash_steps`` optimiser steps, on the
intermediate-layer loss of that one pair through a new learned :class:`~hubtune.tuning.losses.FeatureMatcher`
(FitNets), whose parameters are in the optimiser with the stage's. Parameters are selected by **exact module
path**: a parameter belongs to module ``blocks.1`` when its name is ``blocks.1.<rest>``, so ``blocks.1``
never selects ``blocks.10`` (:func:`parameters_under`). The head (what runs after the last pair) is trained by
the regular stage only.

**Regular distillation**: ``kd`` with ``alpha_hard * CE(s, y) + alpha_soft * T^2 KL(softmax(t/T) ||
softmax(s/T))`` (batch mean), every student parameter trainable, evaluated on the evaluation set; its final
``eval_acc`` is the trial's ``accuracy``.

Every stage is one Engine run in its own folder under the trial's folder (``flash0/``, ``flash1/``, ...,
``student/``), so each is checkpointed and a killed trial resumes (a finished stage is loaded from its
``student.safetensors``; an unfinished one resumes from its ``checkpoint.pt``). The generators are seeded
before each stage from the trial's seed, so a resumed trial equals an uninterrupted one. The trial's figures
are written last to ``result.json``: a folder holding it is a finished trial, answered from the record.

The student of the regular stage is saved as a timm folder (``student/``: ``model.safetensors``, and a
``config.json`` with the searched constructor arguments as ``model_args``), loadable as ``local-dir:``.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .._io import save_state_dict, write_json
from ..errors import ConfigError
from ..tuning.methods.kd import KnowledgeDistillation
from .space import SearchSpace, params_key

__all__ = ["TrialConfig", "parameters_under", "layer_mapping", "flash_stages", "FlashStage", "RegularStage",
           "run_trial", "trial_folder_name"]


# ---------------------------------------------------------------------------------------------- config
@dataclass
class TrialConfig:
    """How each trial is trained and measured (validated at construction; :class:`ConfigError` names the value).

    ``flash_steps``: optimiser steps per flash stage (0: no flash distillation). ``epochs``: of regular
    distillation. ``latency_process``: ``"same"`` (this process) or ``"fresh"`` (a new one per trial).
    """
    flash_steps: int = 20
    flash_lr: float = 0.01
    layer_loss: str = "mse"
    layer_temperature: float = 1.0
    epochs: int = 2
    batch_size: int = 64
    lr: float = 0.05
    optimizer: str = "sgd"
    weight_decay: float = 0.0
    temperature: float = 4.0
    alpha_hard: float = 0.5
    alpha_soft: float = 0.5
    precision: str = "fp32"
    device: str | None = None
    seed: int = 0
    latency_batch_size: int = 32
    latency_threads: int = 1
    latency_channels_last: bool = True
    latency_dtype: str = "float32"
    latency_min_run_time: float = 0.5
    latency_process: str = "same"
    latency_clock: str = "wall"

    def __post_init__(self):
        def bad(name, value, want):
            raise ConfigError(f"autodistill {name}={value!r} is invalid: {want}")

        def whole(name, v, lo):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                bad(name, v, f"give a whole number >= {lo}")

        whole("flash_steps", self.flash_steps, 0)
        whole("epochs", self.epochs, 1)
        whole("batch_size", self.batch_size, 1)
        whole("latency_batch_size", self.latency_batch_size, 1)
        whole("latency_threads", self.latency_threads, 1)
        whole("seed", self.seed, -2**62)
        for name in ("flash_lr", "lr", "temperature", "layer_temperature", "latency_min_run_time"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                bad(name, v, "give a finite number > 0")
        for name in ("alpha_hard", "alpha_soft", "weight_decay"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                bad(name, v, "give a finite number >= 0")
        if self.layer_loss not in ("mse", "kl"):
            bad("layer_loss", self.layer_loss, "choose mse or kl")
        if self.latency_clock not in ("wall", "cpu"):
            bad("latency_clock", self.latency_clock, "choose wall (elapsed) or cpu (the timing thread's CPU time)")
        if self.latency_clock == "cpu" and self.latency_threads != 1:
            bad("latency_clock", self.latency_clock, "clock 'cpu' needs latency_threads=1")
        if self.latency_process not in ("same", "fresh"):
            bad("latency_process", self.latency_process, "choose same (this process) or fresh (a new process)")

    def training_key(self) -> dict:
        """The fields that change a trial's training (latency settings excluded)."""
        return {k: v for k, v in asdict(self).items() if not k.startswith("latency_") and k != "device"}


# ---------------------------------------------------------------------------------------------- blocks
def parameters_under(model: torch.nn.Module, paths) -> list[tuple[str, torch.nn.Parameter]]:
    """``(name, parameter)`` of ``model`` held by the modules at ``paths`` (exact module paths; ``""`` is the
    whole model). A parameter is under ``p`` when its name is ``p.<rest>``: ``blocks.1`` does not select
    ``blocks.10``. An unknown path is a :class:`ConfigError`."""
    paths = list(paths)
    modules = dict(model.named_modules())
    for p in paths:
        if p not in modules:
            raise ConfigError(f"module path {p!r} is not in the model ({type(model).__name__}); paths look like "
                              f"{[n for n in list(modules)[1:6]]}")
    out = []
    for name, param in model.named_parameters():
        if any(p == "" or name.startswith(p + ".") for p in paths):
            out.append((name, param))
    return out


def _feature_levels(model, who: str) -> list[tuple[str, int]]:
    info = getattr(model, "feature_info", None)
    levels = []
    try:
        for f in info:
            levels.append((str(f["module"]), int(f["reduction"])))
    except (TypeError, KeyError, ValueError):
        levels = []
    if not levels:
        raise ConfigError(f"the {who} ({type(model).__name__}) has no timm feature_info to derive layer pairs from; "
                          "give the space's layers: {student_path: teacher_path, ...} explicitly")
    return levels


def layer_mapping(student: torch.nn.Module, teacher: torch.nn.Module) -> dict[str, str]:
    """``{student_path: teacher_path}``: the student's feature levels (timm ``feature_info``) paired with the
    teacher's level of the same reduction (output stride), in the student's order. Levels without a partner
    are left out; no pair at all is a :class:`ConfigError`."""
    s_levels, t_levels = _feature_levels(student, "student"), _feature_levels(teacher, "teacher")
    by_red = {}
    for path, red in t_levels:
        by_red.setdefault(red, path)  # the first teacher module at that stride
    out = {path: by_red[red] for path, red in s_levels if red in by_red}
    if not out:
        raise ConfigError(f"no feature level of the student {s_levels} has the reduction of one of the teacher's "
                          f"{t_levels}; give the space's layers: explicitly")
    return out


def flash_stages(student: torch.nn.Module, student_paths, input_size) -> list[list[str]]:
    """The stages of flash distillation: for each path in ``student_paths`` (in order), the paths of the
    parameter-holding modules that finish running after the previous path's module and no later than this one's
    (one probe forward pass in eval mode on zeros of ``input_size``). Stage 0 includes the stem. A stage with no
    parameter is kept (empty) and skipped by :func:`run_trial`."""
    student_paths = list(student_paths)
    modules = dict(student.named_modules())
    for p in student_paths:
        if p not in modules:
            raise ConfigError(f"layer path {p!r} is not a module of the student; it has e.g. {list(modules)[1:8]}")
    leaves = [n for n, m in modules.items() if n and any(True for _ in m.parameters(recurse=False))]
    events: list[tuple[str, str]] = []
    handles = []
    for n in leaves:
        handles.append(modules[n].register_forward_hook(lambda m, i, o, n=n: events.append(("leaf", n))))
    for p in student_paths:
        handles.append(modules[p].register_forward_hook(lambda m, i, o, p=p: events.append(("mark", p))))
    was = student.training
    student.eval()
    try:
        with torch.no_grad():
            student(torch.zeros(1, *input_size))
    finally:
        for h in handles:
            h.remove()
        student.train(was)
    stages, current, seen = [], [], set()
    want = iter(student_paths)
    nxt = next(want)
    for kind, name in events:
        if kind == "leaf":
            if name not in seen:
                seen.add(name)
                current.append(name)
        elif name == nxt:
            stages.append(current)
            current = []
            nxt = next(want, None)
            if nxt is None:
                break
    if len(stages) != len(student_paths):
        raise ConfigError(f"the layer paths {student_paths} do not run in this order in the student's forward pass; "
                          "list the layers in execution order")
    return stages


# ---------------------------------------------------------------------------------------------- methods
class FlashStage(KnowledgeDistillation):
    """One flash-distillation stage: the ``kd`` method with one layer pair, trained on the intermediate loss
    alone, with only ``trainable`` (module paths) of the student and the pair's feature matcher in the
    optimiser. Not a registered method: :func:`run_trial` drives it."""

    name = "autodistill_flash"

    def __init__(self, student, teacher, *, pair: tuple[str, str], trainable, sample_input, layer_loss="mse",
                 layer_temperature=1.0, data_config=None, num_classes=None):
        self.trainable = list(trainable)
        chosen = {id(p) for _, p in parameters_under(student, self.trainable)}
        for p in student.parameters():
            p.requires_grad_(id(p) in chosen)
        super().__init__(student, teacher, num_classes=num_classes, layers={pair[0]: pair[1]},
                         layer_loss=layer_loss, layer_temperature=layer_temperature, layer_weight=1.0,
                         sample_input=sample_input, data_config=data_config)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and getattr(self, "trainable", None) is not None:
            self.student.eval()  # frozen modules keep their BatchNorm statistics
            for path in self.trainable:
                self.student.get_submodule(path).train()
        return self

    def param_groups(self, lr: float) -> list[dict]:
        groups = [{"params": [p for _, p in parameters_under(self.student, self.trainable)], "lr": lr,
                   "name": "stage"}]
        if self.layers is not None:
            groups.append({"params": list(self.layers.parameters()), "lr": lr, "name": "matchers"})
        return groups

    def losses(self, batch: dict) -> dict[str, torch.Tensor]:
        self.student(batch["input"])  # the hooks capture the pair's features
        self.teacher_logits(batch)
        lay = self.layers().float()
        return {"total": lay, "layers": lay.detach()}

    def save(self, out_dir) -> None:
        save_state_dict(self.student, Path(out_dir) / "student.safetensors")


class RegularStage(KnowledgeDistillation):
    """Regular distillation (the ``kd`` method: CE + T^2 KL, every student parameter trainable) whose saved
    folder records the searched constructor arguments (``model_args``), so it loads back as ``local-dir:``."""

    name = "autodistill_kd"

    def __init__(self, student, teacher, *, model_args: dict | None, **kwargs):
        for p in student.parameters():
            p.requires_grad_(True)
        super().__init__(student, teacher, **kwargs)
        self.model_args = model_args

    def save(self, out_dir) -> None:
        save_student(self.student, out_dir, self.data_config, self.model_args)


def save_student(student, out_dir, data_config, model_args: dict | None) -> None:
    """A timm folder (``model.safetensors`` + ``config.json`` with ``model_args``), or, for a student that is not
    a timm model (a user's builder; ``model_args`` None), ``model.safetensors`` alone."""
    out = Path(out_dir)
    if model_args is None:
        save_state_dict(student, out / "model.safetensors")
        return
    from ..tuning._save import save_timm_folder

    save_timm_folder(student, out, data_config=data_config)
    cfg = json.loads((out / "config.json").read_text())
    margs = {k: v for k, v in model_args.items() if k not in ("num_classes", "pretrained")}
    if margs:
        cfg["model_args"] = margs
        write_json(out / "config.json", cfg)


# ---------------------------------------------------------------------------------------------- a trial
def trial_folder_name(params: dict, cfg: TrialConfig, context: dict) -> str:
    """The folder of a trial: a hash of the proposal, the training settings and the context (teacher identity,
    data, input size), so equal work shares a folder and different work never does."""
    blob = json.dumps({"params": params_key(params), "train": cfg.training_key(), "context": context},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _load_into(module, path: Path) -> None:
    from safetensors.torch import load_file

    module.load_state_dict(load_file(str(path)), strict=True)


def _stage_config(cfg: TrialConfig, out: Path, epochs: int, lr: float, seed: int):
    from ..tuning.engine import TrainConfig

    resume = (out / "checkpoint.pt").is_file()
    return TrainConfig(epochs=epochs, batch_size=cfg.batch_size, optimizer=cfg.optimizer, lr=lr,
                       weight_decay=cfg.weight_decay, scheduler="cosine", precision=cfg.precision,
                       device=cfg.device, seed=seed, out_dir=str(out), resume=resume, overwrite=not resume,
                       verbose=False, progress=False)


def run_trial(space: SearchSpace, params: dict, *, teacher, train_set, eval_set, num_classes: int,
              data_config: dict, cfg: TrialConfig, folder, log=None) -> dict:
    """Train and measure the student ``params`` describes (see the module docstring) in ``folder``; returns the
    trial's figures (also ``folder/result.json``): ``accuracy``, ``eval_loss``, ``latency_ms``,
    ``latency_iqr_ms``, ``throughput_ips``, ``params``, ``flops``, ``train_seconds`` and the stages. A folder
    holding ``result.json`` is answered from it. ``teacher``: a :class:`~hubtune.tuning.models.HubModel` (or
    spec/module) of a classifier for the task; ``train_set``/``eval_set``: datasets of ``(tensor, label)``."""
    import time

    from ..tuning.engine import Engine
    from ..tuning.method import seed_everything

    folder = Path(folder)
    done = folder / "result.json"
    if done.is_file():
        rec = json.loads(done.read_text())
        if _setup_of(rec.get("latency_setup") or {}) != _wanted_setup(cfg, data_config, bool(rec.get("loadable"))):
            # trained with the same settings, timed with others: time it again, the training is the record's
            seed_everything(cfg.seed)
            student = space.build_student(params, num_classes)
            kdir = folder / "student"
            _load_into(student, kdir / "model.safetensors")
            rec.update(measure(student, kdir if rec.get("loadable") else None,
                               tuple(int(s) for s in data_config["input_size"]), cfg))
            write_json(done, rec)
        rec["from_record"] = True
        return rec
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "params.json", {"params": params, "trial_config": asdict(cfg)})
    t0 = time.perf_counter()
    input_size = tuple(int(s) for s in data_config["input_size"])
    seed_everything(cfg.seed)
    student = space.build_student(params, num_classes)
    from ..tuning.models import load_model

    t_hm = load_model(teacher, role="teacher") if not hasattr(teacher, "identity") else teacher
    mapping = space.layers if isinstance(space.layers, dict) else layer_mapping(student, t_hm.module)
    stages = flash_stages(student, list(mapping), input_size) if cfg.flash_steps > 0 else []
    g = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(train_set), generator=g).tolist()
    per_stage = cfg.flash_steps * cfg.batch_size
    sample = torch.zeros(2, *input_size)
    stage_log = []
    for k, ((s_path, t_path), trainable) in enumerate(zip(mapping.items(), stages)):
        sdir = folder / f"flash{k}"
        if not parameters_under(student, trainable):
            stage_log.append({"stage": k, "pair": [s_path, t_path], "modules": trainable, "skipped": "no parameters"})
            continue
        if (sdir / "report.json").is_file() and (sdir / "student.safetensors").is_file():
            _load_into(student, sdir / "student.safetensors")
            rep = json.loads((sdir / "report.json").read_text())
        else:
            seed_everything(cfg.seed + 1 + k)  # the matcher is drawn from here, resumed or not
            m = FlashStage(student, t_hm, pair=(s_path, t_path), trainable=trainable, sample_input=sample,
                           layer_loss=cfg.layer_loss, layer_temperature=cfg.layer_temperature,
                           data_config=data_config, num_classes=num_classes)
            idx = [order[(k * per_stage + i) % len(order)] for i in range(per_stage)]
            try:
                rep = Engine(_stage_config(cfg, sdir, 1, cfg.flash_lr, cfg.seed + 1 + k)).fit(
                    m, torch.utils.data.Subset(train_set, idx), None)
            finally:
                m.layers.remove_hooks()  # the teacher is shared by every stage and trial
        stage_log.append({"stage": k, "pair": [s_path, t_path], "modules": trainable,
                          "layer_loss": rep["final"].get("train_layers")})
        if log:
            log(f"    flash stage {k} ({s_path} -> {t_path}): layer loss {rep['final'].get('train_layers', 0):.4g}")
    arch, kwargs = space.arch_and_kwargs(params)
    model_args = None if space.build is not None else kwargs
    kdir = folder / "student"
    if (kdir / "report.json").is_file():
        rep = json.loads((kdir / "report.json").read_text())
        _load_into(student, kdir / "model.safetensors")
    else:
        seed_everything(cfg.seed + 1000)
        m = RegularStage(student, t_hm, model_args=model_args, num_classes=num_classes, kind="kl",
                         temperature=cfg.temperature, alpha_hard=cfg.alpha_hard, alpha_soft=cfg.alpha_soft,
                         data_config=data_config)
        rep = Engine(_stage_config(cfg, kdir, cfg.epochs, cfg.lr, cfg.seed + 1000)).fit(m, train_set, eval_set)
    final = rep["final"]
    train_seconds = time.perf_counter() - t0
    lat = measure(student, kdir if model_args is not None else None, input_size, cfg)
    rec = {"accuracy": final.get("eval_acc"), "eval_loss": final.get("eval_loss"),
           "train_loss": final.get("train_total"), "train_seconds": train_seconds, **lat,
           "arch": arch, "model_args": kwargs, "stages": stage_log, "layers": dict(mapping),
           "folder": str(kdir), "loadable": (f"local-dir:{kdir}" if model_args is not None else None)}
    write_json(done, rec)
    rec["from_record"] = False
    return rec


_SETUP_KEYS = ("input_size", "batch_size", "threads", "channels_last", "dtype", "min_run_time", "clock")


def _setup_of(setup: dict) -> dict:
    return {k: setup.get(k, "wall" if k == "clock" else None) for k in _SETUP_KEYS} | {
        "fresh_process": bool(setup.get("fresh_process"))}


def _wanted_setup(cfg: TrialConfig, data_config: dict, fresh_possible: bool = True) -> dict:
    return {"input_size": [int(s) for s in data_config["input_size"]], "batch_size": cfg.latency_batch_size,
            "threads": cfg.latency_threads, "channels_last": cfg.latency_channels_last, "dtype": cfg.latency_dtype,
            "min_run_time": float(cfg.latency_min_run_time), "clock": cfg.latency_clock,
            "fresh_process": cfg.latency_process == "fresh" and fresh_possible}


def measure(student, folder, input_size, cfg: TrialConfig) -> dict:
    """The latency figures of ``student`` per ``cfg`` (a fresh process needs the saved timm ``folder``)."""
    from .latency import measure_latency, measure_latency_fresh

    opts = dict(batch_size=cfg.latency_batch_size, threads=cfg.latency_threads,
                channels_last=cfg.latency_channels_last, dtype=cfg.latency_dtype,
                min_run_time=cfg.latency_min_run_time, clock=cfg.latency_clock)
    if cfg.latency_process == "fresh" and folder is not None:
        return measure_latency_fresh(f"local-dir:{folder}", input_size, **opts)
    return measure_latency(student, input_size, **opts)
