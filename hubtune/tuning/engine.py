"""One loop for every method: ``Engine(TrainConfig(...)).fit(method, train_dataset, eval_dataset)``.

The engine owns device placement, the seeded data order, the optimizer (from ``method.param_groups``), a
per-iteration LR schedule with linear warm-up, gradient clipping, bf16 autocast, evaluation, logs
(``metrics.jsonl``), checkpoints (``checkpoint.pt``, every epoch, written atomically), exact resume, DDP
under ``torchrun`` and, at the end, the tuned model in timm's folder format (``model.safetensors`` +
``config.json``, loadable as ``local-dir:OUT``) and ``report.json``.

Data order: epoch ``e`` visits the training set in ``torch.randperm(n)`` drawn from a generator seeded with
``seed + e`` (the permutation ``DistributedSampler`` uses), so one process with global batch B and W
processes with B/W each see the same global batches. ``batch_size`` is the *global* batch.

Datasets yield ``(input, target)`` pairs, ``{"input": ..., "target": ...}`` dicts, or bare inputs
(label-free methods; no accuracy is computed then). A training set (or a wrapper's ``.dataset``) with a
``set_epoch(epoch)`` method is told the epoch before each one, so seeded augmentation differs per epoch and is
replayed exactly on resume.

Segmentation methods (``method.task == "segmentation"``) are evaluated by Dice and the 95th-percentile Hausdorff
distance instead of accuracy (:meth:`Engine._evaluate_segmentation`: ``eval_dice``, ``eval_hd95``, ``eval_loss``).

Output folder: a run refuses a folder that already holds one (``checkpoint.pt``, ``model.safetensors``,
``report.json`` or ``metrics.jsonl``) unless ``resume=True`` (continue it) or ``overwrite=True`` (remove those
files, and only those, first). Frozen submodules a method names in :meth:`Method.frozen_modules` (teachers) are
kept out of ``checkpoint.pt``: their identity is recorded instead and checked on resume. Loss terms are
accumulated on the device and read back once per epoch (no host sync per step).
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, Subset

from .._io import atomic_torch_save, atomic_write_text, check_writable, write_json
from ..errors import CheckpointError, ConfigError, OutputError
from .method import Method

OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("cosine", "step", "none")
PRECISIONS = ("auto", "bf16", "fp32")
BACKENDS = ("torch", "ipex")
#: files whose presence means a folder holds a run (``resume`` continues it, ``overwrite`` replaces it)
RUN_MARKERS = ("checkpoint.pt", "model.safetensors", "report.json", "metrics.jsonl")
#: every file a run writes to its folder: all that ``overwrite=True`` removes
RUN_FILES = RUN_MARKERS + ("config.json",)


@dataclass
class TrainConfig:
    """Training hyper-parameters, validated once at construction (``ConfigError`` names the bad value).

    ``batch_size`` is the global batch (divided among DDP processes). ``step_size`` is in epochs (the
    ``step`` scheduler multiplies the LR by ``gamma`` every ``step_size`` epochs); ``warmup_epochs`` may be
    fractional and ramps the LR linearly per iteration. ``precision="auto"`` means bf16 autocast on a GPU that
    supports it and fp32 otherwise; ``"bf16"`` asks for bf16 autocast on CPU too. ``backend="ipex"`` (CPU
    only; ``device=None`` then means CPU) applies Intel Extension for PyTorch's ``ipex.optimize`` to the method
    and optimizer once, after the optimizer is built (``pip install 'hubtune[ipex]'``, a release matching
    torch's major.minor; see :mod:`hubtune_ext.ipex`). ``overwrite=True`` lets a run replace the run files of
    a folder that holds one (without it, and without ``resume``, such a folder is refused). ``verbose=True``
    prints one line per epoch to stdout (loss terms, evaluation, images/s), besides ``metrics.jsonl``;
    ``progress`` shows a bar over each epoch's steps (None: when stderr is a terminal).
    """

    epochs: int = 10
    batch_size: int = 32
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    scheduler: str = "cosine"
    step_size: int = 30
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    grad_clip: float | None = None
    precision: str = "auto"
    device: str | None = None
    seed: int = 0
    out_dir: str | None = None
    resume: bool = False
    num_workers: int = 0
    backend: str = "torch"
    overwrite: bool = False
    verbose: bool = False
    progress: bool | None = None      # the per-epoch bar: None = when stderr is a terminal

    def __post_init__(self):
        def bad(field, value, want):
            raise ConfigError(f"TrainConfig.{field}={value!r} is invalid: {want}")

        if not isinstance(self.epochs, int) or isinstance(self.epochs, bool) or self.epochs < 1:
            bad("epochs", self.epochs, "give a whole number >= 1")
        if not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool) or self.batch_size < 1:
            bad("batch_size", self.batch_size, "give a whole number >= 1")
        if self.optimizer not in OPTIMIZERS:
            bad("optimizer", self.optimizer, f"choose one of {', '.join(OPTIMIZERS)}")
        if not _finite(self.lr) or self.lr <= 0:
            bad("lr", self.lr, "give a finite number > 0")
        if not _finite(self.momentum) or not 0 <= self.momentum < 1:
            bad("momentum", self.momentum, "give a number in [0, 1)")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            bad("nesterov", self.nesterov, "Nesterov needs optimizer='sgd' and momentum > 0")
        if not _finite(self.weight_decay) or self.weight_decay < 0:
            bad("weight_decay", self.weight_decay, "give a finite number >= 0")
        if self.scheduler not in SCHEDULERS:
            bad("scheduler", self.scheduler, f"choose one of {', '.join(SCHEDULERS)}")
        if not isinstance(self.step_size, int) or isinstance(self.step_size, bool) or self.step_size < 1:
            bad("step_size", self.step_size, "give a whole number of epochs >= 1")
        if not _finite(self.gamma) or not 0 < self.gamma <= 1:
            bad("gamma", self.gamma, "give a number in (0, 1]")
        if not _finite(self.warmup_epochs) or not 0 <= self.warmup_epochs <= self.epochs:
            bad("warmup_epochs", self.warmup_epochs, f"give a number in [0, epochs={self.epochs}]")
        if self.grad_clip is not None and (not _finite(self.grad_clip) or self.grad_clip <= 0):
            bad("grad_clip", self.grad_clip, "give None (no clipping) or a max norm > 0")
        if self.precision not in PRECISIONS:
            bad("precision", self.precision, f"choose one of {', '.join(PRECISIONS)}")
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError):
                bad("device", self.device, "give None (auto), 'cpu', 'cuda' or 'cuda:N'")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            bad("seed", self.seed, "give a whole number")
        if self.resume and not self.out_dir:
            bad("resume", self.resume, "resume=True needs out_dir (where checkpoint.pt is)")
        if self.resume and self.overwrite:
            bad("overwrite", self.overwrite, "resume=True continues the run in out_dir and overwrite=True "
                "replaces it; choose one")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            bad("num_workers", self.num_workers, "give a whole number >= 0")
        if self.backend not in BACKENDS:
            bad("backend", self.backend, f"choose one of {', '.join(BACKENDS)}")
        if self.backend == "ipex" and self.device is not None and torch.device(self.device).type != "cpu":
            bad("backend", self.backend, f"the ipex backend runs on the CPU only, but device={self.device!r}; "
                "use device='cpu' (or None) with backend='ipex', or backend='torch'")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def lr_factor(it: int, total: int, warmup: int, cfg: TrainConfig, iters_per_epoch: int) -> float:
    """Multiplier of every group's starting LR at iteration ``it`` (0-based): linear warm-up, then the schedule."""
    if warmup > 0 and it < warmup:
        return (it + 1) / warmup
    if cfg.scheduler == "cosine":
        span = max(total - warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(it - warmup, span) / span))
    if cfg.scheduler == "step":
        return cfg.gamma ** (it // (cfg.step_size * iters_per_epoch))
    return 1.0


def _as_batch(b) -> dict:
    if isinstance(b, dict):
        return b
    if isinstance(b, (list, tuple)):
        if len(b) == 2:
            return {"input": b[0], "target": b[1]}
        if len(b) == 1:
            return {"input": b[0]}
    if torch.is_tensor(b):
        return {"input": b}
    raise ConfigError(f"a dataset item collated to {type(b).__name__}; yield (input, target), "
                      "{'input': ..., 'target': ...} or a bare input tensor")


def _to(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def prepare_out_dir(out_dir, resume: bool = False, overwrite: bool = False) -> Path:
    """Check, before any work, that ``out_dir`` can be written (:func:`hubtune._io.check_writable`, which
    creates it) and may take this run: a folder holding a run (:data:`RUN_MARKERS`) is refused with
    :class:`OutputError` unless ``resume`` (continue it) or ``overwrite`` (its :data:`RUN_FILES`, and nothing
    else, are removed now). Temporary files a killed run left behind are removed in every case."""
    out = check_writable(out_dir)
    for name in RUN_FILES:
        for tmp in out.glob(f".{name}.*.tmp"):  # left by a process killed mid-write (atomic_path's names)
            tmp.unlink(missing_ok=True)
    if resume:
        return out
    held = [name for name in RUN_MARKERS if (out / name).exists()]
    if held and not overwrite:
        raise OutputError(f"{out} already holds a run ({', '.join(held)}); pass --resume (resume=True) to continue "
                          "it, --overwrite (overwrite=True) to replace it, or choose a new --out")
    if overwrite:
        for name in RUN_FILES:
            try:
                (out / name).unlink(missing_ok=True)
            except OSError as e:
                raise OutputError(f"could not remove {out / name} to overwrite the run: {e.strerror}; remove it "
                                  "yourself or choose a new --out") from None
    return out


def _fault_hook(name: str, count: int) -> None:
    """Fault injection for the test suite: ``HUBTUNE_TEST_KILL_AFTER_<name>=N`` SIGKILLs this process when
    ``count`` reaches N (``STEPS``: optimizer steps taken by this process; ``CHECKPOINT``: epochs whose
    checkpoint was just written)."""
    want = os.environ.get(f"HUBTUNE_TEST_KILL_AFTER_{name}")
    if want and count == int(want):
        os.kill(os.getpid(), signal.SIGKILL)


def set_epoch(dataset, epoch: int) -> None:
    """Tell ``dataset`` the epoch: its ``set_epoch(epoch)`` if it has one, else that of the dataset it wraps
    (``.dataset``, as ``torch.utils.data.Subset`` and hubtune's wrappers hold it)."""
    for _ in range(16):
        fn = getattr(dataset, "set_epoch", None)
        if callable(fn):
            fn(epoch)
            return
        dataset = getattr(dataset, "dataset", None)
        if dataset is None:
            return


def _frozen_keys(method: Method) -> dict[str, torch.nn.Module]:
    frozen = dict(method.frozen_modules() or {})
    for path, mod in frozen.items():
        if not path or not isinstance(mod, torch.nn.Module):
            raise ConfigError(f"method {method.name!r}: frozen_modules() must map attribute paths to modules, got "
                              f"{path!r}: {type(mod).__name__}")
    return frozen


def _is_frozen_key(key: str, frozen) -> bool:
    return any(key.startswith(p + ".") for p in frozen)


def _identities(frozen: dict[str, torch.nn.Module]) -> dict[str, str]:
    if not frozen:
        return {}
    from .models import module_identity

    return {path: module_identity(mod) for path, mod in sorted(frozen.items())}


# RNG states as tensors and plain lists, so checkpoint.pt loads with torch.load(weights_only=True).
def _numpy_state_out(st) -> dict:
    name, keys, pos, has_gauss, cached = st
    return {"name": name, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _numpy_state_in(d: dict):
    return (d["name"], d["keys"].numpy().astype(np.uint32), d["pos"], d["has_gauss"], d["cached"])


def _python_state_out(st) -> dict:
    version, internal, gauss = st
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}


def _python_state_in(d: dict):
    return (d["version"], tuple(int(v) for v in d["internal"].tolist()), d["gauss"])


class Engine:
    """Runs any :class:`Method`: ``Engine(TrainConfig(...)).fit(method, train, eval) -> report dict``."""

    def __init__(self, config: TrainConfig | None = None, **kwargs):
        if config is None:
            config = TrainConfig(**kwargs)
        elif kwargs:
            raise ConfigError("give either a TrainConfig or keyword arguments, not both")
        self.config = config
        self.optimizer = None  # the last fit()'s optimizer, kept for inspection

    # ------------------------------------------------------------------ distributed
    def _setup_distributed(self, device: torch.device) -> tuple[int, int, bool]:
        import torch.distributed as dist

        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return 0, 1, False
        created = False
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            created = True
        return dist.get_rank(), dist.get_world_size(), created

    def _device(self) -> torch.device:
        cfg = self.config
        if cfg.device is not None:
            return torch.device(cfg.device)
        if cfg.backend == "ipex":
            return torch.device("cpu")
        if torch.cuda.is_available():
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            return torch.device("cuda")
        return torch.device("cpu")

    def _use_bf16(self, device: torch.device) -> bool:
        p = self.config.precision
        if p == "fp32":
            return False
        if device.type == "cuda":
            ok = torch.cuda.is_bf16_supported()
            if p == "bf16" and not ok:
                warnings.warn("precision='bf16' asked for but this GPU does not support bf16; running fp32")
            return ok
        return p == "bf16" and device.type == "cpu"

    # ------------------------------------------------------------------ the loop
    def fit(self, method: Method, train_dataset, eval_dataset=None, mixer=None) -> dict:
        """Train ``method`` on ``train_dataset``, evaluate on ``eval_dataset`` after each epoch, and return the
        report. ``mixer``: a :class:`hubtune.data.augment.BatchMixer` (mixup / cutmix / label smoothing)
        applied to each labelled training batch as ``mixer(x, y, epoch=e, step=s)``, which makes the targets
        soft ``(B, C)`` rows (``F.cross_entropy`` takes them as they are)."""
        import torch.distributed as dist

        cfg = self.config
        if not isinstance(method, Method):
            raise ConfigError(f"fit() needs a hubtune Method, got {type(method).__name__}")
        t0 = time.perf_counter()
        device = self._device()
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)
        if cfg.backend == "ipex":  # the user asked for ipex: fail before any work when it cannot be used
            from hubtune_ext.ipex import IpexUnavailableError, ipex_status

            ok, reason = ipex_status()
            if not ok:
                raise IpexUnavailableError(reason)
        rank, world, created_pg = self._setup_distributed(device)
        if cfg.batch_size % world:
            raise ConfigError(f"TrainConfig.batch_size={cfg.batch_size} is the global batch; it must divide "
                              f"evenly among WORLD_SIZE={world} processes")
        local_bs = cfg.batch_size // world
        is_main = rank == 0
        out = Path(cfg.out_dir) if cfg.out_dir else None
        if out is not None and is_main:
            prepare_out_dir(out, resume=cfg.resume, overwrite=cfg.overwrite)
        bf16 = self._use_bf16(device)

        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        random.seed(cfg.seed)

        method.to(device)
        model = method
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            model = DDP(method, device_ids=[device.index] if device.type == "cuda" else None,
                        find_unused_parameters=method.sparse_parameters)

        # Same permutation with 1 process as with W (DistributedSampler seeds with seed + epoch).
        sampler = DistributedSampler(train_dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
        loader_gen = torch.Generator().manual_seed(cfg.seed)
        loader = DataLoader(train_dataset, batch_size=local_bs, sampler=sampler, num_workers=cfg.num_workers,
                            generator=loader_gen, pin_memory=device.type == "cuda", drop_last=False)
        iters = len(loader)
        if iters == 0:
            raise ConfigError("the training dataset is empty")
        total_iters = iters * cfg.epochs
        warmup_iters = int(round(cfg.warmup_epochs * iters))

        groups = [dict(g, params=list(g["params"])) for g in method.param_groups(cfg.lr)]
        groups = [g for g in groups if g["params"]]
        if not groups:
            raise ConfigError(f"method {method.name!r} has no trainable parameters (all frozen?)")
        if cfg.optimizer == "sgd":
            opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                  weight_decay=cfg.weight_decay)
        else:
            opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        if cfg.backend == "ipex":  # once, in place: `method` stays the object that is saved and checkpointed
            from hubtune_ext.ipex import optimize

            _, opt = optimize(method, opt, dtype=torch.bfloat16 if bf16 else None, required=True, inplace=True)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda it: lr_factor(it, total_iters, warmup_iters, cfg, iters))
        trainable = [p for g in opt.param_groups for p in g["params"]]
        self.optimizer = opt

        start_epoch, history = 0, []
        ckpt_path = out / "checkpoint.pt" if out else None
        frozen = _frozen_keys(method)
        frozen_ids = _identities(frozen) if out is not None else {}
        if cfg.resume and ckpt_path is not None and ckpt_path.is_file():
            start_epoch, history = self._restore(ckpt_path, method, opt, sched, loader_gen, frozen, frozen_ids)
        method.on_train_start(total_iters)

        show_bar = is_main and (sys.stderr.isatty() if cfg.progress is None else cfg.progress)
        steps_done = 0
        for epoch in range(start_epoch, cfg.epochs):
            sampler.set_epoch(epoch)
            set_epoch(train_dataset, epoch)
            method.on_epoch_start(epoch, cfg.epochs)
            model.train()
            sums: dict[str, torch.Tensor] = {}
            seen = 0
            t_epoch = time.perf_counter()
            bar = None
            if show_bar:
                from tqdm import tqdm

                bar = tqdm(total=iters, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, file=sys.stderr)
            for step, batch in enumerate(method.batches(_as_batch(raw) for raw in loader)):
                batch = _to(batch, device)
                n = len(batch["input"])
                if mixer is not None and batch.get("target") is not None:
                    batch["input"], batch["target"] = mixer(batch["input"], batch["target"], epoch=epoch, step=step)
                    batch.pop("teacher_logits", None)  # requested for the unmixed inputs: the teacher sees the mix
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    terms = model(batch)
                if "total" not in terms:
                    raise ConfigError(f"method {method.name!r}: losses() returned {sorted(terms)} without 'total'")
                opt.zero_grad(set_to_none=True)
                terms["total"].float().backward()
                if cfg.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
                opt.step()
                sched.step()
                steps_done += 1
                _fault_hook("STEPS", steps_done)
                for k, v in terms.items():  # on the device: read back once per epoch, not per step
                    v = v.detach().to(torch.float64) * n
                    sums[k] = sums[k] + v if k in sums else v
                seen += n
                if bar is not None:
                    bar.update(1)
                    if bar.n % max(1, iters // 10) == 0 or bar.n == iters:
                        bar.set_postfix(loss=f"{float(terms['total'].detach()):.4f}")
            if bar is not None:
                bar.close()
            keys = sorted(sums)
            stats = torch.stack([sums[k].reshape(()) for k in keys]
                                + [torch.tensor(float(seen), dtype=torch.float64, device=device)]).cpu()
            train_seconds = time.perf_counter() - t_epoch
            if world > 1:
                stats = stats.to(device)
                dist.all_reduce(stats)
                stats = stats.cpu()
            rec = {"epoch": epoch + 1, "lr": opt.param_groups[-1]["lr"]}
            rec.update({f"train_{k}": float(v) for k, v in zip(keys, (stats[:-1] / stats[-1]).tolist())})
            rec["train_images_per_second"] = float(stats[-1]) / max(train_seconds, 1e-9)
            if eval_dataset is not None:
                rec.update(self._evaluate(method, eval_dataset, device, bf16, local_bs, rank, world))
            rec["seconds"] = time.perf_counter() - t0
            history.append(rec)
            if is_main and cfg.verbose:
                print(epoch_line(rec, cfg.epochs), flush=True)
            if is_main and out is not None:
                atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
                atomic_torch_save({
                    "epoch": epoch + 1,
                    "method_name": method.name,
                    "method": {k: v for k, v in method.state_dict().items() if not _is_frozen_key(k, frozen)},
                    "frozen": frozen_ids,
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "history": history,
                    "sampler": {"seed": cfg.seed, "next_epoch": epoch + 1},
                    "rng": {
                        "torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                        "numpy": _numpy_state_out(np.random.get_state()),
                        "python": _python_state_out(random.getstate()),
                        "loader": loader_gen.get_state(),
                    },
                    "config": asdict(cfg),
                }, ckpt_path)
                _fault_hook("CHECKPOINT", epoch + 1)
            if world > 1:
                dist.barrier()

        report = {
            "method": method.name,
            "final": history[-1] if history else {},
            "history": history,
            "config": asdict(cfg),
            "method_hparams": method.hparams(),
            "device": str(device),
            "precision": "bf16" if bf16 else "fp32",
            "world_size": world,
            "resumed_from_epoch": start_epoch,
            "seconds": time.perf_counter() - t0,
        }
        if is_main and out is not None:
            method.save(out)
            write_json(out / "report.json", report)
        if world > 1:
            dist.barrier()
            if created_pg:
                dist.destroy_process_group()
        return report

    def _restore(self, path: Path, method: Method, opt, sched, loader_gen, frozen: dict,
                 frozen_ids: dict) -> tuple[int, list]:
        """Load ``checkpoint.pt`` into the method, optimizer, scheduler and RNGs; any fault is a
        :class:`CheckpointError` naming the file and the cure. Returns ``(epoch, history)``."""
        cure = (f"start again with --overwrite (overwrite=True) or a new --out, or resume from an intact copy of "
                f"{path.name}")
        try:
            ck = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated zip, foreign pickle, not a file torch can read
            raise CheckpointError(f"{path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]}); it "
                                  f"is truncated or not a hubtune checkpoint: {cure}") from None
        need = ("epoch", "method_name", "method", "optimizer", "scheduler", "rng")
        if not isinstance(ck, dict) or any(k not in ck for k in need):
            raise CheckpointError(f"{path} is not a hubtune checkpoint (it lacks "
                                  f"{', '.join(k for k in need if not isinstance(ck, dict) or k not in ck)}); {cure}")
        if ck["method_name"] != method.name:
            raise CheckpointError(f"{path} was written by method {ck['method_name']!r}, not {method.name!r}; resume "
                                  f"with the same method, or {cure}")
        try:
            missing, unexpected = method.load_state_dict(ck["method"], strict=False)
        except RuntimeError as e:  # a size mismatch
            raise CheckpointError(f"{path} belongs to another model ({_first_lines(e)}); resume with the model and "
                                  f"settings it was written with, or {cure}") from None
        missing = [k for k in missing if not _is_frozen_key(k, frozen)]
        if missing or unexpected:
            what = "; ".join(s for s in (
                f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}" if missing else "",
                f"unexpected {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}" if unexpected else "")
                if s)
            raise CheckpointError(f"{path} belongs to another model (state dict keys differ: {what}); resume with "
                                  f"the model and settings it was written with, or {cure}")
        saved_ids = dict(ck.get("frozen") or {})
        if sorted(saved_ids) != sorted(frozen_ids) or any(saved_ids[p] != frozen_ids[p] for p in saved_ids):
            differ = sorted(p for p in set(saved_ids) | set(frozen_ids) if saved_ids.get(p) != frozen_ids.get(p))
            raise CheckpointError(f"{path} was trained with other frozen modules ({', '.join(differ)}: the teacher "
                                  "differs from the one the checkpoint recorded); resume with the same teacher, or "
                                  f"{cure}")
        try:
            opt.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["scheduler"])
            rng = ck["rng"]
            torch.set_rng_state(rng["torch"])
            if rng.get("cuda") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
            np.random.set_state(_numpy_state_in(rng["numpy"]))
            random.setstate(_python_state_in(rng["python"]))
            loader_gen.set_state(rng["loader"])
            return int(ck["epoch"]), list(ck.get("history", []))
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise CheckpointError(f"{path} does not fit this run ({type(e).__name__}: {_first_lines(e)}); resume "
                                  f"with the settings it was written with, or {cure}") from None

    @torch.no_grad()
    def _evaluate(self, method: Method, dataset, device, bf16: bool, local_bs: int, rank: int, world: int) -> dict:
        import torch.distributed as dist

        if method.task == "segmentation":
            return self._evaluate_segmentation(method, dataset, device, bf16, local_bs, rank, world)
        stats = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count: on the device
        for logits, y in self._predictions(method, dataset, device, bf16, local_bs, rank, world):
            stats[0] += F.cross_entropy(logits, y, reduction="sum").double()
            stats[1] += (logits.argmax(1) == y).sum().double()
            stats[2] += len(y)
        if world > 1:
            dist.all_reduce(stats)
        stats = stats.cpu()
        if stats[2] == 0:
            return {}
        return {"eval_loss": float(stats[0] / stats[2]), "eval_acc": float(stats[1] / stats[2])}

    def _predictions(self, method: Method, dataset, device, bf16: bool, batch_size: int, rank: int, world: int):
        """``(float32 logits, targets)`` of every labelled batch of this rank's share of ``dataset`` (every sample
        exactly once over all ranks: DistributedSampler would pad), the method in eval mode meanwhile."""
        if world > 1:
            dataset = Subset(dataset, list(range(rank, len(dataset), world)))
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False,
                            generator=torch.Generator().manual_seed(0), num_workers=self.config.num_workers)
        method.eval()
        try:
            for raw in loader:
                batch = _to(_as_batch(raw), device)
                if batch.get("target") is None:
                    continue
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    logits = method.predict(batch["input"])
                yield logits.float(), batch["target"]
        finally:
            method.train()

    @torch.no_grad()
    def _evaluate_segmentation(self, method: Method, dataset, device, bf16: bool, local_bs: int, rank: int,
                               world: int) -> dict:
        """Segmentation: ``eval_loss`` (mean per-image cross-entropy), ``eval_dice`` (per image, the mean Dice of
        the foreground classes present in its ground truth; then the mean over the images that have one: MONAI's
        ``DiceMetric(include_background=False, reduction="mean", ignore_empty=True)``), ``eval_dice_class<c>``
        (per class, over the images where it is present) when there are several foreground classes, and
        ``eval_hd95`` (MONAI's 95th-percentile Hausdorff distance in pixels, averaged as Dice over the (image,
        class) pairs where prediction and ground truth are both non-empty; with ``method.eval_hd95``). Volumes
        (3D) are evaluated one at a time, through the method's ``predict`` (sliding-window inference when it has
        a window)."""
        import torch.distributed as dist

        bs = 1 if getattr(method, "spatial_dims", 2) == 3 else local_bs
        hd = bool(getattr(method, "eval_hd95", False))
        sums = None  # [loss, images, hd sum, hd count, dice sum, images with Dice, per-class sums.., counts..]
        for logits, y in self._predictions(method, dataset, device, bf16, bs, rank, world):
            c = logits.shape[1]
            if sums is None:
                sums = torch.zeros(6 + 2 * (c - 1), dtype=torch.float64, device=device)
            spatial = tuple(range(1, y.dim()))
            sums[0] += F.cross_entropy(logits, y, reduction="none").mean(dim=spatial).sum().double()
            sums[1] += y.shape[0]
            pred = logits.argmax(1)
            d, valid = dice_per_class(pred, y, c)
            d = torch.where(valid, d, torch.zeros_like(d))
            per_image = valid.sum(1)  # MONAI's "mean": over an image's defined classes, then over the images
            has = per_image > 0
            sums[4] += (d.sum(1)[has] / per_image[has]).sum().double()
            sums[5] += has.sum().double()
            sums[6:5 + c] += d.sum(0).double()
            sums[5 + c:] += valid.sum(0).double()
            if hd:
                h = hd95_per_class(pred, y, c)
                ok = torch.isfinite(h)
                k = ok.sum(1)
                has_h = k > 0  # as Dice: per image over its defined classes, then over the images
                sums[2] += (torch.where(ok, h, torch.zeros_like(h)).sum(1)[has_h] / k[has_h]).sum().double()
                sums[3] += has_h.sum().double()
        if world > 1:
            if sums is None:  # a rank without labelled items still joins the reduction, with zeros of the width
                c = int(getattr(method, "num_classes", 0) or 0)
                if c < 2:
                    raise ConfigError("distributed segmentation evaluation: a rank saw no labelled item and the "
                                      "method does not say its num_classes")
                sums = torch.zeros(6 + 2 * (c - 1), dtype=torch.float64, device=device)
            dist.all_reduce(sums)
        if sums is None or sums[1] == 0:
            return {}
        sums = sums.cpu()
        c = (len(sums) - 6) // 2 + 1
        dsum, dcnt = sums[6:5 + c], sums[5 + c:]
        rec = {"eval_loss": float(sums[0] / sums[1])}
        if sums[5] > 0:
            rec["eval_dice"] = float(sums[4] / sums[5])
        if c > 2:
            for k in range(c - 1):
                if dcnt[k] > 0:
                    rec[f"eval_dice_class{k + 1}"] = float(dsum[k] / dcnt[k])
        if hd and sums[3] > 0:
            rec["eval_hd95"] = float(sums[2] / sums[3])
        return rec


def dice_per_class(pred: torch.Tensor, y: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image, per-foreground-class Dice of label maps ``pred`` and ``y`` ``(B, *S)``:
    ``2 |P ∩ G| / (|P| + |G|)`` for classes 1..C-1, ``(B, C-1)``, and whether each is defined (``|G| > 0``, as
    MONAI's ``ignore_empty=True``)."""
    spatial = tuple(range(1, y.dim()))
    ds, valid = [], []
    for k in range(1, num_classes):
        p, g = pred == k, y == k
        inter = (p & g).sum(spatial).double()
        size = p.sum(spatial).double() + g.sum(spatial).double()
        ds.append(torch.where(size > 0, 2 * inter / size.clamp_min(1), torch.zeros_like(size)))
        valid.append(g.sum(spatial) > 0)
    return torch.stack(ds, 1), torch.stack(valid, 1)


def hd95_per_class(pred: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """MONAI's ``compute_hausdorff_distance(percentile=95)`` per image and foreground class ``(B, C-1)``, in
    pixels; NaN or inf where the prediction or the ground truth is empty."""
    import warnings as _w

    from monai.metrics import compute_hausdorff_distance

    oh_p = F.one_hot(pred.long(), num_classes).movedim(-1, 1)
    oh_y = F.one_hot(y.long(), num_classes).movedim(-1, 1)
    with _w.catch_warnings():
        _w.simplefilter("ignore")  # MONAI warns for every empty class; those pairs are left out of the mean
        h = compute_hausdorff_distance(oh_p, oh_y, include_background=False, percentile=95)
    return torch.as_tensor(h, dtype=torch.float64, device=pred.device)


def _first_lines(e: Exception, n: int = 3) -> str:
    return " ".join(str(e).strip().splitlines()[:n])[:400]


def epoch_line(rec: dict, total_epochs: int) -> str:
    """One line per epoch for stdout: ``epoch 2/5  total=0.41 ce=0.38 ...  eval_acc=0.912  1234 img/s``."""
    train = " ".join(f"{k[6:]}={v:.4g}" for k, v in rec.items()
                     if k.startswith("train_") and k != "train_images_per_second" and isinstance(v, float))
    ev = " ".join(f"{k}={v:.4g}" for k, v in rec.items() if k.startswith("eval_") and isinstance(v, float))
    ips = rec.get("train_images_per_second")
    return "  ".join(p for p in (f"epoch {rec['epoch']}/{total_epochs}", train, ev,
                                 f"{ips:.1f} img/s" if ips is not None else "") if p)
