"""The search: an Optuna study over a :class:`~hubtune.search.space.SearchSpace`, multi-objective, seeded,
resumable, with constraints; its outputs (trials table, Pareto front, plot, front members as timm folders).

* **True multi-objective.** Each objective (``accuracy:max``, ``latency_ms:min``, ...) is one of the study's
  ``directions``; the result is the Pareto front (``study.best_trials``), never a sum of metrics of different
  scales.
* **Samplers**: ``tpe`` (:class:`optuna.samplers.TPESampler`, multivariate), ``nsga2``, ``gp``, ``random``,
  ``grid`` (every value of every parameter; the space must be discrete). **Seeded**, and seeded per
  proposal: proposal ``n`` is drawn by a sampler built with a seed derived from ``(seed, n)``, so what the
  sampler proposes depends only on the seed and on the recorded trials, never on how many processes the search
  took (a resumed search proposes what an uninterrupted one would have).
* **A proposal already evaluated is answered from the record**: it is told the recorded values (and marked
  ``duplicate_of``) without training, and does not consume the budget ``n_trials`` (the number of distinct
  students trained). A search stops early when the space is exhausted or after ``max_proposals`` proposals.
* **Constraints** (``params<=5M``, ``latency_ms<=2``, ``accuracy>=0.8``): a constraint on a metric known
  before training (``params``, ``flops``: the ``cheap`` metrics) rejects a proposal before it is trained (the
  trial fails with ``infeasible``; it does not consume the budget); the others are passed to the samplers that
  support them (TPE, NSGA-II, GP: ``constraints_func``) and the front holds feasible trials only.
* **Resumable.** The study lives in a storage (an SQLite file): a killed search continues where it stopped.
  A trial the kill left ``RUNNING`` is evaluated again (its own folder resumes from its checkpoints) and told
  under its own number, so the record is the one an uninterrupted search writes.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from .._io import atomic_write_text, write_json
from ..errors import ConfigError, MissingExtraError
from .space import SearchSpace, params_key

__all__ = ["Objective", "Constraint", "parse_objective", "parse_constraint", "import_optuna", "make_sampler",
           "run_study", "SearchResult", "pareto_indices", "hypervolume_2d", "SAMPLERS", "CHEAP_METRICS"]

SAMPLERS = ("tpe", "nsga2", "gp", "random", "grid")
#: metrics a trial knows before it trains (from the architecture alone)
CHEAP_METRICS = ("params", "flops")


def import_optuna():
    """Optuna, or :class:`MissingExtraError` naming ``pip install 'hubtune[search]'``."""
    try:
        import optuna
    except ImportError:
        raise MissingExtraError("optuna", "search", "hubtune autodistill (the architecture search)") from None
    return optuna


# ---------------------------------------------------------------------------------------------- objectives
@dataclass(frozen=True)
class Objective:
    metric: str
    direction: str  # "maximize" | "minimize"

    def __str__(self):
        return f"{self.metric}:{'max' if self.direction == 'maximize' else 'min'}"


def parse_objective(text) -> Objective:
    """``"accuracy:max"`` / ``"latency_ms:min"`` (also ``maximize``/``minimize``) -> :class:`Objective`."""
    if isinstance(text, Objective):
        return text
    m = re.fullmatch(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*:\s*(max|min|maximize|minimize)\s*", str(text))
    if not m:
        raise ConfigError(f"objective {text!r} is invalid; write METRIC:max or METRIC:min, e.g. accuracy:max, "
                          "latency_ms:min")
    return Objective(m.group(1), "maximize" if m.group(2).startswith("max") else "minimize")


_SUFFIX = {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9}


@dataclass(frozen=True)
class Constraint:
    metric: str
    op: str  # "<=" | ">="
    bound: float

    def violation(self, value: float) -> float:
        """Optuna's convention: <= 0 is feasible."""
        return value - self.bound if self.op == "<=" else self.bound - value

    def __str__(self):
        return f"{self.metric}{self.op}{self.bound:g}"


def parse_constraint(text) -> Constraint:
    """``"params<=5M"``, ``"latency_ms<=2.5"``, ``"accuracy>=0.8"`` (suffixes k, M, G) -> :class:`Constraint`."""
    if isinstance(text, Constraint):
        return text
    m = re.fullmatch(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(<=|>=)\s*([0-9.eE+-]+)\s*([kKMG]?)\s*", str(text))
    try:
        bound = float(m.group(3)) * _SUFFIX[m.group(4)] if m else None
    except ValueError:
        bound = None
    if not m or bound is None or not math.isfinite(bound):
        raise ConfigError(f"constraint {text!r} is invalid; write METRIC<=VALUE or METRIC>=VALUE, e.g. params<=5M, "
                          "latency_ms<=2, accuracy>=0.8 (suffixes k, M, G)")
    return Constraint(m.group(1), m.group(2), bound)


# ---------------------------------------------------------------------------------------------- samplers
def _proposal_seed(seed: int, n: int) -> int:
    return (int(seed) * 1_000_003 + 7919 * int(n) + 17) % (2**31 - 1)


def make_sampler(name: str, seed: int, space: SearchSpace, *, constraints_func=None, startup_trials: int = 10,
                 population_size: int = 8):
    """The Optuna sampler ``name`` (see :data:`SAMPLERS`), seeded with ``seed``."""
    optuna = import_optuna()
    S = optuna.samplers
    if name == "tpe":
        return S.TPESampler(seed=seed, n_startup_trials=startup_trials, multivariate=True,
                            constraints_func=constraints_func)
    if name == "nsga2":
        return S.NSGAIISampler(seed=seed, population_size=population_size, constraints_func=constraints_func)
    if name == "gp":
        return S.GPSampler(seed=seed, n_startup_trials=startup_trials, constraints_func=constraints_func)
    if name == "random":
        return S.RandomSampler(seed=seed)
    if name == "grid":
        class Grid(S.GridSampler):
            """Optuna's grid sampler without its ``study.stop()`` at exhaustion (it is for ``optimize``;
            :func:`run_study` asks and tells, and stops itself when every student is evaluated)."""

            def after_trial(self, study, trial, state, values):
                pass

        return Grid(space.grid(), seed=seed)
    raise ConfigError(f"sampler {name!r} is unknown; choose one of {', '.join(SAMPLERS)}")


# ---------------------------------------------------------------------------------------------- fronts
def _dominates(a, b, signs) -> bool:
    return all(s * x >= s * y for x, y, s in zip(a, b, signs)) and any(s * x > s * y for x, y, s in zip(a, b, signs))


def pareto_indices(points: Sequence[Sequence[float]], directions: Sequence[str]) -> list[int]:
    """Indices of the non-dominated points (``directions``: ``maximize``/``minimize`` per coordinate)."""
    signs = [1 if d == "maximize" else -1 for d in directions]
    return [i for i, p in enumerate(points) if not any(_dominates(q, p, signs) for j, q in enumerate(points) if j != i)]


def hypervolume_2d(points: Sequence[Sequence[float]], directions: Sequence[str], reference: Sequence[float]) -> float:
    """The area dominated by ``points`` and bounded by ``reference`` (two objectives, any directions); points
    that do not improve on the reference in both coordinates add nothing."""
    if len(directions) != 2 or len(reference) != 2:
        raise ConfigError("hypervolume_2d needs exactly two objectives and a 2-D reference point")
    signs = [1 if d == "maximize" else -1 for d in directions]
    # to minimisation of both, relative to the reference
    pts = [(-(signs[0] * (p[0] - reference[0])), -(signs[1] * (p[1] - reference[1]))) for p in points]
    pts = sorted((x, y) for x, y in pts if x < 0 and y < 0)
    area, best_y = 0.0, 0.0
    for x, y in pts:
        if y < best_y:
            area += (-x) * (best_y - y)
            best_y = y
    return area


# ---------------------------------------------------------------------------------------------- the loop
@dataclass
class SearchResult:
    """What :func:`run_study` returns: the study, the trial records (one dict per trial, in number order), the
    front (records), and how many students were trained."""
    study: object
    records: list
    front: list
    evaluated: int
    proposals: int
    stopped: str


def _fault_hook(count: int) -> None:
    """Test hook: ``HUBTUNE_TEST_KILL_AFTER_AUTODISTILL_TRIALS=N`` SIGKILLs the process once N trials are told."""
    want = os.environ.get("HUBTUNE_TEST_KILL_AFTER_AUTODISTILL_TRIALS")
    if want and count == int(want):
        os.kill(os.getpid(), signal.SIGKILL)


def _jsonable(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        try:
            json.dumps(v)
            out[k] = v
        except (TypeError, ValueError):
            out[k] = str(v)
    return out


def _study_meta(space, objectives, constraints, sampler, seed) -> dict:
    return {"space": space.fingerprint(), "objectives": [str(o) for o in objectives],
            "constraints": [str(c) for c in constraints], "sampler": sampler, "seed": int(seed)}


def run_study(space: SearchSpace, evaluate: Callable[[dict, int], dict], *, objectives=("accuracy:max",
              "latency_ms:min"), n_trials: int = 12, sampler: str = "tpe", seed: int = 0, storage=None,
              study_name: str = "autodistill", constraints=(), cheap: Callable[[dict], dict] | None = None,
              max_proposals: int | None = None, startup_trials: int | None = None,
              population_size: int | None = None, resume: bool = True, context: dict | None = None,
              log=None) -> SearchResult:
    """Search ``space``: ``evaluate(params, trial_number) -> {metric: value}`` trains and measures one proposal
    (it must return every objective's and every constraint's metric). ``storage``: an Optuna storage URL or an
    SQLite file path (None: in memory). An existing study of that name is continued when ``resume`` (it must
    have the same space, objectives, constraints, sampler and seed); otherwise it is an error. ``cheap(params)``
    gives the metrics known before training (:data:`CHEAP_METRICS`) for early constraint checks. ``context``: what
    else the trials depend on (training settings, teacher, data); a study resumes only with the same."""
    optuna = import_optuna()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    objectives = [parse_objective(o) for o in (objectives if not isinstance(objectives, str) else [objectives])]
    if not objectives:
        raise ConfigError("give at least one objective, e.g. accuracy:max")
    if len({o.metric for o in objectives}) != len(objectives):
        raise ConfigError(f"objectives {[str(o) for o in objectives]} name a metric twice")
    constraints = [parse_constraint(c) for c in (constraints if not isinstance(constraints, str) else [constraints])]
    if sampler not in SAMPLERS:
        raise ConfigError(f"sampler {sampler!r} is unknown; choose one of {', '.join(SAMPLERS)}")
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
        raise ConfigError(f"trials={n_trials!r} is invalid: give the number of students to train (>= 1)")
    if sampler == "grid":
        space.grid()  # a continuous parameter fails here, before any work
    size = space.size()
    if max_proposals is None:
        max_proposals = max(10 * n_trials, 100)
    if startup_trials is None:
        startup_trials = min(10, max(3, n_trials // 3))
    if population_size is None:
        population_size = min(50, max(4, n_trials // 3))
    if isinstance(storage, (str, os.PathLike)) and "://" not in str(storage):
        path = Path(storage).expanduser().resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        storage = f"sqlite:///{path}"
    directions = [o.direction for o in objectives]
    meta = _study_meta(space, objectives, constraints, sampler, seed)
    if context:
        meta["context"] = json.loads(json.dumps(context, sort_keys=True, default=str))
    exists = False
    if storage is not None:
        try:
            exists = study_name in optuna.study.get_all_study_names(storage)
        except Exception as e:  # a file that is not an Optuna database
            raise ConfigError(f"storage {storage} cannot be opened as an Optuna study database ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]}); give another --storage file") from None
    if exists and not resume:
        raise ConfigError(f"storage {storage} already holds the study {study_name!r}; pass --resume (resume=True) to "
                          "continue it, or choose another --storage / --out")
    study = optuna.create_study(storage=storage, study_name=study_name, directions=directions, load_if_exists=True)
    if exists:
        old = study.user_attrs.get("hubtune")
        if old != meta:
            raise ConfigError(f"the study {study_name!r} in {storage} was made with {old}, not {meta}; resume it with "
                              "the same space, objectives, constraints, sampler, seed and training settings, or start "
                              "a new storage")
    else:
        study.set_user_attr("hubtune", meta)

    soft = [c for c in constraints if c.metric not in CHEAP_METRICS or cheap is None]
    hard = [c for c in constraints if c.metric in CHEAP_METRICS and cheap is not None]

    def constraints_func(ft):
        return ft.user_attrs.get("constraints") or [0.0] * len(soft)

    def sampler_for(n):
        return make_sampler(sampler, _proposal_seed(seed, n), space,
                            constraints_func=constraints_func if soft else None,
                            startup_trials=startup_trials, population_size=population_size)

    say = log or (lambda s: None)
    TS = optuna.trial.TrialState

    def record_of():
        rec, infeasible, evaluated = {}, set(), 0
        for t in study.get_trials(deepcopy=False):
            if t.state == TS.COMPLETE and t.user_attrs.get("duplicate_of") is None:
                rec[params_key(t.params)] = t
                evaluated += 1
            elif t.state == TS.FAIL and t.user_attrs.get("infeasible"):
                infeasible.add(params_key(t.params))
        return rec, infeasible, evaluated

    def finish(trial, params, metrics):
        missing = [m for m in [o.metric for o in objectives] + [c.metric for c in soft] if m not in metrics]
        if missing:
            raise ConfigError(f"the trial's metrics lack {missing}; it gave {sorted(metrics)}: choose objectives and "
                              "constraints among them")
        values = [metrics[o.metric] for o in objectives]
        attrs = {"metrics": _jsonable(metrics), "constraints": [c.violation(float(metrics[c.metric])) for c in soft],
                 "evaluated": True}
        for k, v in attrs.items():
            trial.set_user_attr(k, v)
        if any(v is None or not math.isfinite(float(v)) for v in values):
            study.tell(trial, state=TS.FAIL)
            say(f"  trial {trial.number}: not finite ({values}); failed")
        else:
            study.tell(trial, [float(v) for v in values])

    # ---- a kill left trials RUNNING: evaluate them again under their own number
    told = 0
    for t in study.get_trials(deepcopy=False, states=(TS.RUNNING,)):
        if set(t.params) == set(space.params):
            say(f"  trial {t.number}: interrupted; resuming it")
            finish(optuna.trial.Trial(study, t._trial_id), t.params, evaluate(dict(t.params), t.number))
        else:
            study.tell(t.number, state=TS.FAIL)
        told += 1

    record, infeasible, evaluated = record_of()
    proposals = len(study.trials)
    stopped = "budget"
    while evaluated < n_trials:
        if size is not None and len(record) + len(infeasible) >= size:
            stopped = "space exhausted"
            break
        if proposals >= max_proposals:
            stopped = "max_proposals"
            break
        study.sampler = sampler_for(proposals)
        trial = study.ask()
        proposals += 1
        params = space.suggest(trial)
        key = params_key(params)
        if key in record:
            prev = record[key]
            trial.set_user_attr("duplicate_of", prev.number)
            trial.set_user_attr("metrics", prev.user_attrs.get("metrics"))
            trial.set_user_attr("constraints", prev.user_attrs.get("constraints"))
            study.tell(trial, list(prev.values))
            say(f"  trial {trial.number}: {params} was trial {prev.number}; answered from the record")
        elif key in infeasible:
            trial.set_user_attr("infeasible", "same as an earlier infeasible proposal")
            study.tell(trial, state=TS.FAIL)
        elif hard and any(c.violation(float(cheap(params)[c.metric])) > 0 for c in hard):
            vals = cheap(params)
            why = ", ".join(f"{c.metric}={vals[c.metric]:g} violates {c}" for c in hard
                            if c.violation(float(vals[c.metric])) > 0)
            trial.set_user_attr("infeasible", why)
            trial.set_user_attr("metrics", _jsonable(vals))
            study.tell(trial, state=TS.FAIL)
            infeasible.add(key)
            say(f"  trial {trial.number}: {params} infeasible before training ({why})")
        else:
            say(f"  trial {trial.number}: {params}")
            metrics = evaluate(dict(params), trial.number)
            finish(trial, params, metrics)
            record, infeasible, evaluated = record_of()
        told += 1
        _fault_hook(told)
    records = trial_records(study, objectives, constraints)
    front = front_of(study, records, objectives, constraints)
    return SearchResult(study, records, front, evaluated, proposals, stopped)


def trial_records(study, objectives, constraints) -> list[dict]:
    """One dict per trial: number, state, params, objective values, metrics, feasibility, duplicate_of."""
    out = []
    for t in study.get_trials(deepcopy=False):
        m = dict(t.user_attrs.get("metrics") or {})
        feas = t.state.name == "COMPLETE" and all(
            m.get(c.metric) is not None and c.violation(float(m[c.metric])) <= 0 for c in constraints)
        out.append({"number": t.number, "state": t.state.name, "params": dict(t.params),
                    "values": {str(o): (t.values[i] if t.values else None) for i, o in enumerate(objectives)},
                    "feasible": bool(feas), "duplicate_of": t.user_attrs.get("duplicate_of"),
                    "infeasible": t.user_attrs.get("infeasible"), "metrics": m})
    return out


def front_of(study, records, objectives, constraints) -> list[dict]:
    """The Pareto front: ``study.best_trials`` (feasible ones, non-dominated among the feasible when there are
    constraints), one record per distinct student (duplicates dropped), best first objective first."""
    by_num = {r["number"]: r for r in records}
    cands = [r for r in records if r["state"] == "COMPLETE" and r["duplicate_of"] is None and r["feasible"]]
    if constraints:
        pts = [[r["values"][str(o)] for o in objectives] for r in cands]
        front = [cands[i] for i in pareto_indices(pts, [o.direction for o in objectives])]
    else:
        front = [by_num[t.number] for t in study.best_trials if by_num[t.number]["duplicate_of"] is None]
    o0 = objectives[0]
    front.sort(key=lambda r: r["values"][str(o0)] * (-1 if o0.direction == "maximize" else 1))
    return front


# ---------------------------------------------------------------------------------------------- outputs
def write_tables(out: Path, records: list, objectives) -> None:
    """``trials.json`` and ``trials.csv`` (params and metrics flattened to columns)."""
    write_json(out / "trials.json", {"objectives": [str(o) for o in objectives], "trials": records})
    pkeys = sorted({k for r in records for k in r["params"]})
    mkeys = sorted({k for r in records for k, v in r["metrics"].items() if isinstance(v, (int, float, str, type(None)))
                    and not isinstance(v, bool)})
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["number", "state", "feasible", "duplicate_of", "infeasible"] + [f"param_{k}" for k in pkeys]
               + [str(o) for o in objectives] + mkeys)
    for r in records:
        w.writerow([r["number"], r["state"], r["feasible"], r["duplicate_of"], r["infeasible"] or ""]
                   + [r["params"].get(k) for k in pkeys] + [r["values"][str(o)] for o in objectives]
                   + [r["metrics"].get(k) for k in mkeys])
    atomic_write_text(out / "trials.csv", buf.getvalue())


def plot_front(path: Path, records: list, front: list, objectives, title: str = "") -> None:
    """Scatter of the first two objectives (x: the second, e.g. latency; y: the first, e.g. accuracy), every
    distinct trained student in grey, the front highlighted and joined."""
    from .._io import pyplot, save_png

    plt = pyplot("the Pareto front plot")
    if len(objectives) < 2:
        return
    a, b = str(objectives[0]), str(objectives[1])
    pts = [r for r in records if r["state"] == "COMPLETE" and r["duplicate_of"] is None]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.scatter([r["values"][b] for r in pts], [r["values"][a] for r in pts], c="0.6", s=22, label="trials")
    fr = sorted(front, key=lambda r: r["values"][b])
    ax.plot([r["values"][b] for r in fr], [r["values"][a] for r in fr], "o-", c="tab:red", ms=6, label="Pareto front")
    for r in fr:
        ax.annotate(str(r["number"]), (r["values"][b], r["values"][a]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xlabel(objectives[1].metric)
    ax.set_ylabel(objectives[0].metric)
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path, dpi=110)
