"""Verification: briefly fine-tune the estimators' top K on a held-out split, by successive halving.

``hubtune rank --verify K [--verify-budget STEPS]``: after the transferability estimators have ordered the
candidates, :func:`verify` fine-tunes the first K (the *prior*) with the Engine, exactly as
``hubtune tune --method finetune --no-augment`` trains, and orders them by held-out accuracy;
:func:`reorder` puts that order into the ranking's entries.

**The split.** A seeded stratified split (:func:`holdout_split`, :func:`hubtune.data.stratified_split`) of the
dataset the ranking was made on (its training split): a ``holdout`` share of every class is held out and
measured, the rest is trained on. The dataset's test split is never touched. A class too small to give at
least one image to each side is a :class:`HoldoutError` naming the class, its count and the cure.

**Successive halving** (Jamieson & Talwalkar, AISTATS 2016; the inner loop of Li et al.'s Hyperband, JMLR
2018). Rung 0 trains all K candidates for ``r`` optimizer steps; the better ``ceil(n/eta)`` by held-out
accuracy (ties broken by the prior rank) continue, for ``eta * r`` more steps, from where they were; and so
on until one would remain. The rung sizes are ``n_0 = K``, ``n_(i+1) = ceil(n_i / eta)``, keeping every
``n_i >= 2`` (K = 1: one rung of one). Candidate steps of rung i are ``r * eta**i``, so the whole schedule
costs ``r * W`` steps with ``W = sum_i n_i * eta**i`` and, given ``budget_steps``,

    r = floor(budget_steps / W)              (refused when r < 1: the message gives W, the least budget)

(K = 4, eta = 2: rungs 4 x r and 2 x 2r, W = 8; K = 8: 8 x r, 4 x 2r, 2 x 4r, W = 24.) The steps used are
exactly ``r * W <= budget_steps`` (fewer only when a candidate is dropped). The default budget is
:data:`DEFAULT_EPOCHS_PER_CANDIDATE` (2) epochs of the training part per verified candidate,
``budget_steps = 2 * K * ceil(n_train / batch_size)``: the cost of fine-tuning each of the K for two epochs,
which successive halving spends unevenly (K = 4: one epoch each in rung 0, two more for the best two). Two
epochs is a fifth of ``hubtune tune``'s default ten; a pretrained backbone with a new head moves most of the way
to its final accuracy in the first epochs, which is what a verification needs to see (which candidate adapts,
not how far), at about a fifth of what fine-tuning every finalist fully would cost.

**Continuing, not restarting.** Each candidate trains in its own run folder under a temporary directory; rung
i is epoch i of that run, and a survivor's next rung is the Engine's exact resume (``resume=True``: model,
optimizer state, scheduler position, RNG and data-order states restored from ``checkpoint.pt``). Rung i's
training set is the next ``r * eta**i * batch_size`` items of one endless stream of seeded permutations of the
training part (the same stream for every candidate), so each step is a full batch and a survivor keeps reading
new passes of the data. **Learning rate:** constant (``scheduler="none"``) after an optional linear warm-up
over the first ``round(warmup * r)`` steps of rung 0 (``warmup``, a fraction of rung 0; default 0, as
``hubtune tune`` has none), so "continue for more steps" is the same as having trained longer, and candidates
at the same rung have had identical steps, data, learning rates and seeds.

**Memory.** One candidate is resident at a time (loaded at its turn, freed after); the survivors' states live
on disk in the run folders, and the temporary directory is removed when :func:`verify` returns or raises
(KeyboardInterrupt included). A candidate that fails to load, fails to train, or diverges (NaN/Inf loss) is
dropped with a warning naming it and the reason; it stays unverified and keeps its prior position.

**Augmentation is off by default** (``augment=False``: the model's evaluation transform, as
``--no-augment``): a verification of a few epochs is too short for augmentation to pay off, and without it
the measure has less noise and costs no decoding work beyond the evaluation transform. ``augment`` takes what
``hubtune.tune`` takes.

**Cost.** ``Verification.cost``: ``full_steps_per_candidate = full_epochs * ceil(len(dataset) / batch_size)``
(a ``hubtune tune`` of ``full_epochs``, default 10 as TrainConfig's, on the whole dataset given);
``steps_ratio = total_steps / (K * full_steps_per_candidate)`` (exact), and ``steps_ratio_all`` the same
against fine-tuning every one of the ``candidates`` given (the whole ranking), the issue's yardstick; ``reference_seconds = sum over the
candidates trained of (their measured training-loop seconds / their steps) * full_steps_per_candidate`` (an
estimate of fine-tuning every finalist fully, training loops only); ``seconds_ratio = seconds /
reference_seconds``, where ``seconds`` is verify's whole wall time (loading, evaluation and checkpoints
included, so the ratio, if anything, overstates verification's share).
"""
from __future__ import annotations

import gc
import math
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ._checks import check_count
from .errors import ConfigError, HoldoutError, InputError, OutputError

__all__ = ["verify", "reorder", "Verification", "VerifiedCandidate", "Rung", "Schedule", "schedule",
           "holdout_split", "finalist_order", "HoldoutError", "DEFAULT_EPOCHS_PER_CANDIDATE", "FULL_FINETUNE_EPOCHS",
           "ENTRY_FIELDS"]

#: the default budget: this many epochs of the training part per verified candidate
DEFAULT_EPOCHS_PER_CANDIDATE = 2
#: the fine-tune the cost is compared with: ``hubtune tune``'s default epochs (TrainConfig.epochs)
FULL_FINETUNE_EPOCHS = 10
#: the fields :func:`reorder` sets on each ranking entry, with their values for an unverified one
ENTRY_FIELDS = {"prior_rank": 0, "verified": False, "verify_accuracy": None, "verify_rung": None,
                "verify_steps": 0, "verify_dropped": ""}
#: TrainConfig fields verify decides itself (``train=`` may not set them)
_OWN_FIELDS = ("epochs", "batch_size", "lr", "optimizer", "scheduler", "warmup_epochs", "seed", "out_dir",
               "resume", "overwrite", "device", "precision", "num_workers", "verbose", "progress")



# ---------------------------------------------------------------------------------------------- results
@dataclass
class VerifiedCandidate:
    spec: str
    prior_rank: int                                     # 1-based position in the estimators' order
    accuracy: list[float] = field(default_factory=list)  # held-out accuracy after each rung trained
    loss: list[float] = field(default_factory=list)      # held-out cross-entropy after each rung trained
    steps: int = 0                                      # optimizer steps trained, all rungs
    rung: int = -1                                      # the last rung it was trained in (-1: none)
    seconds: float = 0.0                                # wall time: loading, training, evaluating, saving
    train_seconds: float = 0.0                          # the Engine's training loops only
    rank: int = 0                                       # position among the finalists (0: not verified)
    dropped: str = ""                                   # why it left verification (load failure, NaN loss)

    @property
    def verified(self) -> bool:
        return self.rung >= 0 and not self.dropped

    @property
    def final_accuracy(self) -> float | None:
        """The held-out accuracy at the rung it reached (None when not verified)."""
        return self.accuracy[self.rung] if self.verified else None


@dataclass
class Rung:
    index: int
    candidates: list[str]        # trained in this rung, prior order
    steps_each: int              # optimizer steps each trained in this rung
    start_step: int              # steps each had trained before it
    kept: list[str]              # continue to the next rung (best first); [] after the last
    seconds: float = 0.0


@dataclass
class Schedule:
    k: int
    eta: int
    r: int                       # steps of rung 0
    sizes: list[int]             # candidates per rung

    @property
    def steps(self) -> list[int]:
        """Steps each candidate trains in each rung: ``r * eta**i``."""
        return [self.r * self.eta ** i for i in range(len(self.sizes))]

    @property
    def total(self) -> int:
        return sum(n * s for n, s in zip(self.sizes, self.steps))


@dataclass
class Verification:
    candidates: list[VerifiedCandidate]   # the K verified, in prior order
    rungs: list[Rung]
    order: list[str]                      # the finalists, best first: (rung desc, accuracy desc, prior rank)
    total_steps: int
    images_trained: int
    seconds: float
    split: dict                           # seed, holdout fraction, sizes, fingerprints
    settings: dict                        # k, eta, budget, r, batch size, lr, optimizer, ...
    cost: dict                            # see the module docstring

    @property
    def dropped(self) -> dict[str, str]:
        return {c.spec: c.dropped for c in self.candidates if c.dropped}

    def candidate(self, spec: str) -> VerifiedCandidate:
        for c in self.candidates:
            if c.spec == spec:
                return c
        raise KeyError(spec)

    def to_dict(self) -> dict:
        d = asdict(self)
        for c, v in zip(d["candidates"], self.candidates):
            c["verified"], c["final_accuracy"] = v.verified, v.final_accuracy
        return d

    def table(self) -> str:
        """One line per verified candidate, best first, then the dropped ones, then the cost."""
        rows = [[str(c.rank), str(c.prior_rank), c.spec, f"{c.final_accuracy:.4f}", str(c.rung), str(c.steps),
                 f"{c.seconds:.1f}"] for c in sorted((c for c in self.candidates if c.verified),
                                                     key=lambda c: c.rank)]
        header = ["verified", "prior", "model", "held-out acc", "rung", "steps", "s"]
        widths = [max(len(x) for x in col) for col in zip(header, *rows)]
        lines = ["  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip()
                 for r in [header, ["-" * w for w in widths]] + rows]
        lines += [f"dropped {spec}: {why}" for spec, why in self.dropped.items()]
        c = self.cost
        lines.append(f"{self.total_steps} steps ({self.images_trained} images) in {self.seconds:.1f} s on "
                     f"{self.split['train']} training / {self.split['holdout']} held-out images; "
                     f"{c['steps_ratio']:.1%} of the steps"
                     + (f", about {c['seconds_ratio']:.1%} of the time" if c.get("seconds_ratio") else "")
                     + f" of fine-tuning each fully ({c['full_epochs']} epochs)")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- pieces
def schedule(k: int, eta: int, budget_steps: int) -> Schedule:
    """The successive-halving schedule of ``k`` candidates within ``budget_steps`` (see the module docstring):
    rung sizes ``n_0 = k, n_(i+1) = ceil(n_i / eta)`` while >= 2, ``r = floor(budget_steps / W)``,
    ``W = sum n_i eta**i``. An :class:`InputError` when the budget cannot give rung 0 one step."""
    sizes = [k]
    while sizes[-1] > 1 and math.ceil(sizes[-1] / eta) > 1:
        sizes.append(math.ceil(sizes[-1] / eta))
    w = sum(n * eta ** i for i, n in enumerate(sizes))
    r = budget_steps // w
    if r < 1:
        raise InputError(f"verify budget_steps={budget_steps} (--verify-budget) is too small for {k} candidates "
                         f"with eta={eta}: the rungs {' + '.join(f'{n}x{eta ** i}' for i, n in enumerate(sizes))} "
                         f"need at least {w} steps; raise it, or verify fewer (--verify)")
    return Schedule(k=k, eta=eta, r=r, sizes=sizes)


def _min_per_class(fraction: float) -> int:
    """The smallest class size that gives ``stratified_split`` one image on each side."""
    for c in range(2, 10**7):
        t = int(round(fraction * c))
        if 1 <= t <= c - 1:
            return c
    return 10**7  # pragma: no cover


def holdout_split(dataset, holdout: float = 0.2, seed: int = 0):
    """``(train part, held-out part)`` of an ImageDataset: :func:`hubtune.data.stratified_split` (per class, a
    seeded permutation, the first ``round(holdout * count)`` held out). Every class present must give at least
    one image to each part, else :class:`HoldoutError` naming the classes, their counts and the cure."""
    from .data import stratified_split

    if isinstance(holdout, bool) or not isinstance(holdout, (int, float)) or not 0 < holdout < 1:
        raise InputError(f"holdout={holdout!r} must be a fraction in (0, 1), e.g. 0.2")
    labels = np.asarray(dataset.labels)
    classes, counts = np.unique(labels, return_counts=True)
    held = [int(round(holdout * int(n))) for n in counts]  # as stratified_split rounds (half to even)
    bad = [(int(c), int(n)) for c, n, h in zip(classes, counts, held) if h < 1 or h > n - 1]
    if bad:
        names = getattr(dataset, "classes", None)
        what = ", ".join(f"class {names[c] if names and c < len(names) else c} has {n}" for c, n in bad[:8])
        need = _min_per_class(holdout)
        raise HoldoutError(
            f"the verification split holds out {holdout:g} of each class, which needs at least {need} images per "
            f"class (one held out, one trained on), but {what}{' ...' if len(bad) > 8 else ''} "
            f"({len(bad)} of {len(classes)} classes); rank on more images (--max-samples, --per-class), change "
            f"holdout, or leave out --verify")
    train_idx, held_idx = stratified_split(labels, holdout, seed=seed)
    return dataset.subset(train_idx), dataset.subset(held_idx)


class _StepView(torch.utils.data.Dataset):
    """Items ``[start, start + length)`` of an endless stream of seeded permutations of ``base`` (pass ``p`` is
    ``default_rng([seed, p]).permutation(len(base))``): one rung's training set. The Engine's ``set_epoch`` is
    passed on to ``base`` (seeded augmentation)."""

    def __init__(self, base, start: int, length: int, seed: int):
        self.base, self.start, self.length, self.seed = base, int(start), int(length), int(seed)
        self.n = len(base)
        self._perms: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.length

    def index(self, i: int) -> int:
        p, j = divmod(self.start + int(i), self.n)
        if p not in self._perms:
            self._perms[p] = np.random.default_rng([self.seed, p]).permutation(self.n)
        return int(self._perms[p][j])

    def __getitem__(self, i):
        if not 0 <= i < self.length:
            raise IndexError(i)
        return self.base[self.index(i)]

    def set_epoch(self, epoch: int) -> None:
        fn = getattr(self.base, "set_epoch", None)
        if callable(fn):
            fn(epoch)


class _Diverged(Exception):
    pass


class _LoadFailed(Exception):
    pass


def _spec_of(c) -> str:
    if isinstance(c, str):
        return c
    s = getattr(c, "spec", None) or getattr(c, "name", None)
    return str(s) if s else type(c).__name__


def _load(c):
    """A candidate ready for :func:`hubtune.tuning.models.load_model`: a spec is loaded, a not-yet-loaded
    CandidateRef is loaded (with its trust_remote_code), a ranking entry by its spec; Candidates, HubModels and
    modules as they are."""
    from .hub import load_candidate

    if isinstance(c, str):
        return load_candidate(c)
    if isinstance(c, torch.nn.Module) or hasattr(c, "module"):
        return c
    if callable(getattr(c, "load", None)):  # CandidateRef
        return c.load()
    if getattr(c, "spec", None):  # a CandidateResult
        return load_candidate(c.spec)
    raise ConfigError(f"verify: candidate {c!r} is not a spec, a Candidate or a timm model")


def _short(spec: str, n: int = 40) -> str:
    return spec if len(spec) <= n else "…" + spec[-(n - 1):]


# ---------------------------------------------------------------------------------------------- verify
def verify(candidates, dataset, *, k: int = 4, budget_steps: int | None = None, holdout: float = 0.2,
           seed: int = 0, batch_size: int = 32, lr: float = 0.01, optimizer: str = "sgd", eta: int = 2,
           warmup: float = 0.0, device: str | None = None, precision: str = "auto", augment=False,
           method_args: dict | None = None, train: dict | None = None, full_epochs: int = FULL_FINETUNE_EPOCHS,
           num_workers: int = 0, progress: bool = True, tmp_dir=None) -> Verification:
    """Fine-tune the first ``k`` of ``candidates`` (the estimators' order) on a held-out split of ``dataset``
    by successive halving and order them by held-out accuracy (see the module docstring for the split, the
    schedule, the learning rate and the cost).

    candidates: specs, ``CandidateRef`` s / ``Candidate`` s (what :func:`hubtune.rank` holds), ranking entries
        (their ``spec``) or timm models, best first.
    dataset: the ImageDataset the ranking was made on (or a name :func:`hubtune.data.create_dataset` takes;
        its train split).
    budget_steps: optimizer steps over all candidates and rungs (default: 2 epochs of the training part per
        candidate); ``eta``: the halving factor (an integer >= 2); ``warmup``: linear warm-up over this
        fraction of rung 0's steps.
    lr, optimizer, batch_size, precision, device, method_args (FineTune's settings), train (other TrainConfig
        fields, e.g. ``{"weight_decay": 1e-4}``): as ``hubtune tune --method finetune`` takes them.
    progress: one line per rung on stderr. tmp_dir: where the temporary run folders go (default: the system's).
    """
    from .data import ImageDataset, create_dataset
    from .tuning import FineTune, TrainConfig
    from .tuning.api import _check_classes, augment_config

    t0 = time.perf_counter()
    k = check_count("k", k, flag="--verify", optional=False, cure="pass how many of the top candidates to verify")
    budget_steps = check_count("budget_steps", budget_steps, flag="--verify-budget",
                               cure="pass the total optimizer steps, or leave it out for the default")
    batch_size = check_count("batch_size", batch_size, optional=False)
    full_epochs = check_count("full_epochs", full_epochs, optional=False)
    if isinstance(eta, bool) or not isinstance(eta, int) or eta < 2:
        raise InputError(f"eta={eta!r} must be a whole number >= 2 (the halving factor)")
    if isinstance(warmup, bool) or not isinstance(warmup, (int, float)) or not 0 <= warmup <= 1:
        raise InputError(f"warmup={warmup!r} must be a fraction of rung 0's steps in [0, 1]")
    train = dict(train or {})
    own = sorted(set(train) & set(_OWN_FIELDS))
    if own:
        raise ConfigError(f"verify: train= may not set {', '.join(own)}; verify sets them (use its arguments)")
    settings = FineTune.resolve_settings(dict(method_args or {}))
    aug = augment_config(augment)
    base_cfg = dict(batch_size=batch_size, lr=lr, optimizer=optimizer, scheduler="none", seed=seed, device=device,
                    precision=precision, num_workers=num_workers, **train)
    TrainConfig(**base_cfg)  # every value checked before any work
    candidates = list(candidates)
    if not candidates:
        raise InputError("verify: no candidates given")
    ds = dataset if isinstance(dataset, ImageDataset) else create_dataset(dataset, split="train")
    train_part, held = holdout_split(ds, holdout, seed)
    _check_classes(train_part, ds.name)
    num_classes = int(ds.num_classes)

    finalists = candidates[:k]
    k_eff = len(finalists)
    steps_per_epoch = math.ceil(len(train_part) / batch_size)
    budget_default = budget_steps is None
    if budget_default:
        budget_steps = DEFAULT_EPOCHS_PER_CANDIDATE * k_eff * steps_per_epoch
    plan = schedule(k_eff, eta, budget_steps)

    recs = [VerifiedCandidate(spec=_spec_of(c), prior_rank=i + 1) for i, c in enumerate(finalists)]
    rungs: list[Rung] = []
    total_steps = 0
    device_used = None

    def drop(j: int, why: str) -> None:
        recs[j].dropped = why
        warnings.warn(f"verification: dropping {recs[j].spec}: {why}", stacklevel=3)

    def train_rung(j: int, rung: int, run_dir: Path, start: int, steps: int) -> int:
        """Candidate j's rung: returns the steps taken; raises _Diverged, or what loading/training raised."""
        nonlocal device_used
        from .data import transform_for
        from .data.augment import train_transform_for
        from .tuning import Engine
        from .tuning.api import TransformedDataset, _mixer, _wrap
        from .tuning.method import seed_everything
        from .tuning.models import load_model

        seed_everything(seed)  # as tune: the new head is drawn from the seed (then replaced on resume)
        try:
            hm = load_model(_load(finalists[j]), pretrained=bool(settings.get("pretrained", True)))
            method = FineTune(hm, num_classes=num_classes, **settings)
        except OutputError:
            raise
        except Exception as e:
            raise _LoadFailed(f"could not be loaded in rung {rung} ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:300]})") from e
        del hm
        try:
            if method.data_config is None:
                method.data_config = dict(method.model.pretrained_cfg or {})
            view = _StepView(_wrap(train_part, train_transform_for(method.data_config, aug), seed),
                             start * batch_size, steps * batch_size, seed)
            ev = TransformedDataset(held, transform_for(method.data_config))
            method.prepare(view, device=device)
            cfg = TrainConfig(epochs=rung + 1, warmup_epochs=float(warmup) if rung == 0 else 0.0,
                              out_dir=str(run_dir), resume=rung > 0, progress=False, **base_cfg)
            report = Engine(cfg).fit(method, view, ev, mixer=_mixer(aug, num_classes, seed))
            device_used = report.get("device", device_used)
            rec = report["final"]
            taken = steps  # exactly len(view) / batch_size batches of batch_size
            ips = rec.get("train_images_per_second") or 0.0
            recs[j].train_seconds += taken * batch_size / ips if ips > 0 else 0.0
            terms = [rec.get("train_total", float("nan")), rec.get("eval_loss", float("nan"))]
            if not all(math.isfinite(v) for v in terms):
                raise _Diverged(f"diverged in rung {rung}: training loss {terms[0]:.4g}, held-out loss "
                                f"{terms[1]:.4g} (not finite); a lower lr may train it")
            recs[j].accuracy.append(float(rec["eval_acc"]))
            recs[j].loss.append(float(rec["eval_loss"]))
            return taken
        finally:
            del method
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    tmp = Path(tempfile.mkdtemp(prefix="hubtune-verify-", dir=tmp_dir))
    try:
        alive = list(range(k_eff))
        for i, steps in enumerate(plan.steps):
            t_rung = time.perf_counter()
            start = plan.r * (eta ** i - 1) // (eta - 1)
            for j in alive:
                t_c = time.perf_counter()
                try:
                    taken = train_rung(j, i, tmp / f"{j:03d}", start, steps)
                    recs[j].steps += taken
                    total_steps += taken
                    recs[j].rung = i
                except _Diverged as e:
                    recs[j].steps += steps
                    total_steps += steps
                    drop(j, str(e))
                except _LoadFailed as e:
                    drop(j, str(e))
                except OutputError:  # the temporary folder cannot be written: every candidate would fail
                    raise
                except Exception as e:  # one bad candidate never sinks the verification
                    drop(j, f"failed to train in rung {i} ({type(e).__name__}: {' '.join(str(e).split())[:300]})")
                finally:
                    recs[j].seconds += time.perf_counter() - t_c
            ok = sorted((j for j in alive if not recs[j].dropped),
                        key=lambda j: (-recs[j].accuracy[i], recs[j].prior_rank))
            last = i == len(plan.sizes) - 1 or len(ok) <= 1
            kept = [] if last else ok[: plan.sizes[i + 1]]
            for j in alive:
                if j not in kept:
                    shutil.rmtree(tmp / f"{j:03d}", ignore_errors=True)  # its state is no longer needed
            rungs.append(Rung(index=i, candidates=[recs[j].spec for j in alive], steps_each=steps, start_step=start,
                              kept=[recs[j].spec for j in kept], seconds=time.perf_counter() - t_rung))
            if progress:
                accs = "  ".join(f"{_short(recs[j].spec)} {recs[j].accuracy[i]:.3f}{'*' if j in kept else ''}"
                                 for j in ok)
                gone = "".join(f"  {_short(recs[j].spec)} dropped" for j in alive if recs[j].dropped)
                print(f"verify rung {i + 1}/{len(plan.sizes)}: {len(alive)} x {steps} steps (batch {batch_size}, "
                      f"from step {start}) in {rungs[-1].seconds:.1f} s; held-out acc: {accs or '-'}{gone}"
                      + ("  (* continues)" if kept else ""), file=sys.stderr, flush=True)
            if last:
                break
            alive = kept
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    ver = finalist_order(recs)
    for n, r in enumerate(ver, 1):
        r.rank = n
    full_steps = full_epochs * math.ceil(len(ds) / batch_size)
    measured = [r for r in recs if r.steps and r.train_seconds > 0]
    reference = sum(r.train_seconds / r.steps for r in measured) * full_steps
    seconds = time.perf_counter() - t0
    cost = {"full_epochs": full_epochs, "full_steps_per_candidate": full_steps,
            "steps_ratio": total_steps / (k_eff * full_steps),
            "candidates": len(candidates), "steps_ratio_all": total_steps / (len(candidates) * full_steps),
            "reference_seconds": reference, "seconds_ratio": seconds / reference if reference > 0 else None,
            "seconds_per_step": {r.spec: r.train_seconds / r.steps for r in measured}}
    split = {"seed": seed, "holdout_fraction": float(holdout), "train": len(train_part), "holdout": len(held),
             "train_fingerprint": train_part.fingerprint, "holdout_fingerprint": held.fingerprint,
             "dataset_fingerprint": ds.fingerprint}
    sets = {"k": k_eff, "k_asked": k, "eta": eta, "budget_steps": budget_steps, "budget_default": budget_default,
            "r": plan.r, "rung_sizes": plan.sizes, "rung_steps": plan.steps, "planned_steps": plan.total,
            "batch_size": batch_size, "lr": lr, "optimizer": optimizer, "scheduler": "none", "warmup": warmup,
            "warmup_steps": int(round(warmup * plan.r)), "augment": aug.enabled, "precision": precision,
            "device": device_used or device, "method": "finetune", "method_args": dict(method_args or {}),
            "train": train}
    return Verification(candidates=recs, rungs=rungs, order=[r.spec for r in ver], total_steps=total_steps,
                        images_trained=total_steps * batch_size, seconds=seconds, split=split, settings=sets,
                        cost=cost)


# ---------------------------------------------------------------------------------------------- reorder
def finalist_order(candidates) -> list[VerifiedCandidate]:
    """The verified candidates, best first: rung reached (desc), held-out accuracy there (desc), prior rank."""
    return sorted((c for c in candidates if c.verified), key=lambda c: (-c.rung, -c.accuracy[c.rung], c.prior_rank))


def reorder(entries, verification: Verification) -> list:
    """The ranking's entries (best first by the estimators) reordered by ``verification``: the verified
    finalists first, by :func:`finalist_order` (rung reached desc, held-out accuracy desc, prior rank), then
    every other entry (not verified, or dropped from verification) in its prior order. Returns a new list of
    the same entry objects, each given ``rank`` (its new 1-based position) and the :data:`ENTRY_FIELDS`:
    ``prior_rank`` (its position in ``entries``), ``verified``, ``verify_accuracy`` (held-out accuracy at the
    rung reached), ``verify_rung``, ``verify_steps`` and ``verify_dropped`` (the reason, or "")."""
    entries = list(entries)
    by_spec = {c.spec: c for c in verification.candidates}
    pos = {id(e): i for i, e in enumerate(entries, 1)}
    first = {c.spec: n for n, c in enumerate(finalist_order(verification.candidates))}
    fin = sorted((e for e in entries if e.spec in first), key=lambda e: first[e.spec])
    out = fin + [e for e in entries if e.spec not in first]
    for n, e in enumerate(out, 1):
        v = by_spec.get(e.spec)
        e.prior_rank = pos[id(e)]
        e.verified = bool(v is not None and v.verified)
        e.verify_accuracy = v.final_accuracy if e.verified else None
        e.verify_rung = v.rung if e.verified else None
        e.verify_steps = v.steps if v is not None else 0
        e.verify_dropped = v.dropped if v is not None else ""
        e.rank = n
    return out
