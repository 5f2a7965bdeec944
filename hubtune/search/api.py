"""``autodistill(...)``: search a student architecture by distillation against accuracy and measured latency.

    >>> res = autodistill(teacher="local-dir:runs/teacher", space="space.yaml", dataset="fashion-mnist",
    ...                   trials=16, sampler="tpe", objectives=["accuracy:max", "latency_ms:min"],
    ...                   constraints=["params<=2M"], out="runs/search")
    >>> res["front"][0]["loadable"]        # 'local-dir:runs/search/front/trial_7'

Settings: the defaults <- ``config`` (a YAML file or dict of any of this function's keyword names) <- the
explicit arguments. Output folder ``out``: ``study.db`` (the Optuna study, SQLite; ``storage=`` puts it
elsewhere), ``trials/<hash>/`` (one folder per distinct trained student: its stages' runs, ``result.json``),
``trials.csv``, ``trials.json``, ``pareto.json``, ``pareto.png`` and ``front/trial_<n>/`` (each front member as a
timm folder, loadable as ``local-dir:``). A folder that holds a search is refused unless ``resume`` (continue
it) or ``overwrite`` (start again: the study and the outputs are removed, trained trial folders kept and
reused when their work is the same).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path

import torch

from .._io import check_writable, write_json
from ..errors import ConfigError, OutputError
from .space import load_space
from .study import CHEAP_METRICS, front_of, plot_front, run_study, trial_records, write_tables
from .trial import TrialConfig, run_trial, trial_folder_name

__all__ = ["autodistill", "AUTODISTILL_KEYS", "load_search_data"]

SEARCH_KEYS = ("teacher", "space", "dataset", "trials", "sampler", "objectives", "constraints", "storage",
               "study_name", "out", "resume", "overwrite", "seed", "max_samples", "eval_samples", "input_size",
               "data_dir", "trials_dir", "startup_trials", "population_size", "max_proposals", "verbose")
TRIAL_KEYS = tuple(f.name for f in dataclasses.fields(TrialConfig) if f.name != "seed")
AUTODISTILL_KEYS = SEARCH_KEYS + TRIAL_KEYS
OUTPUTS = ("trials.csv", "trials.json", "pareto.json", "pareto.png", "study.db")


def _load_config(config) -> dict:
    from .._io import read_settings

    return read_settings(config, AUTODISTILL_KEYS, "autodistill")


#: a transformed dataset up to this size is decoded once into memory; a larger one is decoded per epoch
MATERIALIZE_BYTES = 1 << 30


def _materialize(ds):
    """Every ``(tensor, label)`` of ``ds`` decoded once into memory (each trial reads the same tensors), when it
    fits in :data:`MATERIALIZE_BYTES`; otherwise ``ds`` itself."""
    if len(ds) == 0:
        return ds
    x0, _ = ds[0]
    if x0.numel() * x0.element_size() * len(ds) > MATERIALIZE_BYTES:
        return ds
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return torch.utils.data.TensorDataset(torch.stack(xs), torch.tensor(ys, dtype=torch.long))


def load_search_data(dataset, data_config: dict, *, max_samples=None, eval_samples=None, seed: int = 0,
                     data_dir=None):
    """``(train TensorDataset, eval TensorDataset, num_classes)``: ``dataset``'s train split (a stratified
    ``max_samples`` subsample) and its test split (a stratified ``eval_samples`` subsample), through the
    evaluation transform of ``data_config``, decoded once."""
    from ..data import stratified_subsample, transform_for
    from ..tuning.api import TransformedDataset, eval_dataset_for, train_dataset

    tf = transform_for(data_config)
    src, train = train_dataset(dataset, tf, data_dir=data_dir, max_samples=max_samples, seed=seed)
    ev_src, _ = eval_dataset_for(dataset, tf, data_dir=data_dir, seed=seed)
    if eval_samples:
        ev_src = stratified_subsample(ev_src, max_samples=int(eval_samples), seed=seed)
    return _materialize(train), _materialize(TransformedDataset(ev_src, tf)), int(src.num_classes)


def _copy_folder(src: Path, dst: Path) -> None:
    """``src``'s files to ``dst``, replacing it, through a temporary folder renamed into place."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in ("model.safetensors", "config.json"):
        if (src / f).is_file():
            shutil.copy2(src / f, tmp / f)
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)


def autodistill(teacher=None, space=None, dataset=None, *, trials: int | None = None, sampler: str | None = None,
                objectives=None, constraints=None, storage=None, study_name: str | None = None, out=None,
                resume: bool | None = None, overwrite: bool | None = None, seed: int | None = None,
                max_samples: int | None = None, eval_samples: int | None = None, input_size: int | None = None,
                data_dir=None, trials_dir=None, build=None, config=None, verbose: bool | None = None,
                **trial_kwargs) -> dict:
    """Search a student architecture for ``teacher`` (a spec, e.g. ``local-dir:`` of a model fine-tuned on the
    dataset, or a tuned folder) over ``space`` (a YAML/JSON file, dict or :class:`SearchSpace`; ``build`` a
    Python ``build(params) -> nn.Module``) on ``dataset``: ``trials`` students are trained by flash + regular
    distillation (:mod:`hubtune.search.trial`; ``trial_kwargs`` are :class:`TrialConfig` fields such as
    ``epochs``, ``flash_steps``, ``batch_size``, ``lr``, ``latency_process``), proposed by ``sampler``, scored on
    ``objectives`` (default ``accuracy:max``, ``latency_ms:min``) under ``constraints``. ``input_size``: the
    side the students see (default: the teacher's). Returns a dict: ``front`` (the Pareto front's records with
    ``loadable`` specs), ``trials`` (every record), ``evaluated``, ``stopped``, ``out``; the same in
    ``OUT/pareto.json``."""
    from .study import import_optuna

    import_optuna()  # the extra is checked before any work
    cfg = _load_config(config)
    explicit = {"teacher": teacher, "space": space, "dataset": dataset, "trials": trials, "sampler": sampler,
                "objectives": objectives, "constraints": constraints, "storage": storage, "study_name": study_name,
                "out": out, "resume": resume, "overwrite": overwrite, "seed": seed, "max_samples": max_samples,
                "eval_samples": eval_samples, "input_size": input_size, "data_dir": data_dir,
                "trials_dir": trials_dir, "verbose": verbose}
    unknown = sorted(set(trial_kwargs) - set(TRIAL_KEYS))
    if unknown:
        raise ConfigError(f"autodistill: unknown argument(s) {', '.join(unknown)}; allowed: "
                          f"{', '.join(AUTODISTILL_KEYS)}")
    cfg.update({k: v for k, v in explicit.items() if v is not None})
    cfg.update(trial_kwargs)
    s = {k: cfg.get(k) for k in SEARCH_KEYS}
    for need in ("teacher", "space", "dataset"):
        if not s[need]:
            raise ConfigError(f"autodistill needs {need}= (--{need.replace('_', '-')})")
    s["trials"] = 12 if s["trials"] is None else s["trials"]
    s["sampler"] = s["sampler"] or "tpe"
    s["objectives"] = s["objectives"] or ["accuracy:max", "latency_ms:min"]
    s["constraints"] = s["constraints"] or []
    s["seed"] = 0 if s["seed"] is None else s["seed"]
    s["study_name"] = s["study_name"] or "autodistill"
    if isinstance(s["seed"], bool) or not isinstance(s["seed"], int):
        raise ConfigError(f"seed={s['seed']!r} is invalid: give a whole number")
    if s["resume"] and s["overwrite"]:
        raise ConfigError("resume=True continues the search in out and overwrite=True replaces it; choose one")
    tc = TrialConfig(seed=s["seed"], **{k: cfg[k] for k in TRIAL_KEYS if k in cfg})
    sp = load_space(s["space"], build=build)
    say = print if s["verbose"] in (None, True) else (lambda *a, **k: None)

    # ---- output folder and storage: refused when they hold a search, unless resume / overwrite
    outp = check_writable(s["out"]) if s["out"] else None
    storage = s["storage"] or (str(outp / "study.db") if outp is not None else None)
    if storage is None:
        raise ConfigError("autodistill needs out= (--out DIR) or storage= (--storage FILE) to keep the study")
    is_file = "://" not in str(storage)
    if outp is not None:
        held = [n for n in OUTPUTS if (outp / n).exists()]
        if held and not (s["resume"] or s["overwrite"]):
            raise OutputError(f"{outp} already holds a search ({', '.join(held)}); pass --resume (resume=True) to "
                              "continue it, --overwrite (overwrite=True) to start again, or choose a new --out")
        if s["overwrite"]:
            for n in OUTPUTS:
                (outp / n).unlink(missing_ok=True)
            shutil.rmtree(outp / "front", ignore_errors=True)
    if s["overwrite"] and is_file and Path(storage).exists() and s["storage"]:
        Path(storage).unlink()
    trials_root = Path(s["trials_dir"]) if s["trials_dir"] else (outp / "trials" if outp else None)
    if trials_root is None:
        raise ConfigError("autodistill needs out= (--out DIR) or trials_dir= to keep the trained students")

    # ---- teacher, data config, data
    from ..tuning.method import seed_everything
    from ..tuning.models import load_model

    tspec = s["teacher"]
    if isinstance(tspec, (str, Path)) and ":" not in str(tspec) and Path(tspec).is_dir():
        tspec = f"local-dir:{tspec}"
    t_hm = load_model(tspec, role="teacher")
    data_config = dict(t_hm.data_config)
    if s["input_size"] is not None:
        side = s["input_size"]
        if isinstance(side, bool) or not isinstance(side, int) or not 8 <= side <= 4096:
            raise ConfigError(f"input_size={side!r} is invalid: give the image side in pixels (8..4096)")
        data_config["input_size"] = (int(data_config["input_size"][0]), side, side)
    seed_everything(s["seed"])
    train_set, eval_set, num_classes = load_search_data(
        s["dataset"], data_config, max_samples=s["max_samples"], eval_samples=s["eval_samples"], seed=s["seed"],
        data_dir=s["data_dir"])
    context = {"teacher": t_hm.identity or t_hm.name, "dataset": str(s["dataset"]), "max_samples": s["max_samples"],
               "eval_samples": s["eval_samples"], "input_size": list(data_config["input_size"]),
               "space_build": sp.describe().get("build")}

    def evaluate(params: dict, number: int) -> dict:
        folder = trials_root / trial_folder_name(params, tc, context)
        rec = run_trial(sp, params, teacher=t_hm, train_set=train_set, eval_set=eval_set, num_classes=num_classes,
                        data_config=data_config, cfg=tc, folder=folder, log=say if s["verbose"] else None)
        say(f"    -> accuracy {rec['accuracy']:.4f}  latency {rec['latency_ms']:.3f} ms  params {rec['params']:,}"
            f"{'  (from the record)' if rec.get('from_record') else ''}")
        return rec

    def cheap(params: dict) -> dict:
        from .latency import count_flops, count_params

        m = sp.build_student(params, num_classes)
        return {"params": count_params(m), "flops": count_flops(m, tuple(data_config["input_size"]))}

    from .study import parse_constraint

    cons = s["constraints"] if not isinstance(s["constraints"], str) else [s["constraints"]]
    needs_cheap = any(parse_constraint(c).metric in CHEAP_METRICS for c in cons)
    t0 = time.perf_counter()
    res = run_study(sp, evaluate, objectives=s["objectives"], n_trials=s["trials"], sampler=s["sampler"],
                    seed=s["seed"], storage=storage, study_name=s["study_name"], constraints=s["constraints"],
                    cheap=cheap if needs_cheap else None, max_proposals=s["max_proposals"],
                    startup_trials=s["startup_trials"], population_size=s["population_size"],
                    resume=bool(s["resume"]) or False, context={"trial": tc.training_key(), **context}, log=say)
    objs = [o for o in res.study.user_attrs["hubtune"]["objectives"]]
    from .study import parse_objective

    objectives_p = [parse_objective(o) for o in objs]
    constraints_p = [parse_constraint(c) for c in cons]
    records = trial_records(res.study, objectives_p, constraints_p)
    front = front_of(res.study, records, objectives_p, constraints_p)
    summary = {"teacher": str(tspec), "dataset": str(s["dataset"]), "space": sp.describe(),
               "sampler": s["sampler"], "seed": s["seed"], "objectives": objs,
               "constraints": [str(c) for c in constraints_p], "trials_asked": s["trials"],
               "evaluated": res.evaluated, "proposals": res.proposals, "stopped": res.stopped,
               "data_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in data_config.items()
                               if k in ("input_size", "mean", "std", "interpolation", "crop_pct")},
               "trial_config": dataclasses.asdict(tc), "storage": str(storage), "seconds": time.perf_counter() - t0}
    if outp is not None:
        (outp / "front").mkdir(exist_ok=True)
        for r in front:
            src = r["metrics"].get("folder")
            dst = outp / "front" / f"trial_{r['number']}"
            _copy_folder(Path(src), dst)
            r["folder"] = str(dst)
            # a timm student loads back as local-dir:; a builder's student is model.safetensors for build(params)
            r["loadable"] = f"local-dir:{dst}" if r["metrics"].get("loadable") else None
        write_tables(outp, records, objectives_p)
        write_json(outp / "pareto.json", dict(summary, front=front))
        if len(objectives_p) >= 2:
            plot_front(outp / "pareto.png", records, front, objectives_p,
                       title=f"autodistill {s['sampler']}, {res.evaluated} students, seed {s['seed']}")
    return dict(summary, front=front, trials=records, out=str(outp) if outp else None)
