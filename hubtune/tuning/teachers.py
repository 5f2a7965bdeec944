"""Teacher sources behind one interface, for every method that learns from frozen teachers (``kd``, ``btuning``).

A source is called with a batch and gives the teacher's outputs ``(B, C)`` for it:

* :class:`LiveTeacher`: a frozen local module run under ``no_grad`` on the batch seen through the teacher's own
  input view (an :class:`~hubtune.tuning.models.InputAdapter` from the batches' data config to the teacher's;
  none when the module adapts its own inputs, as B-Tuning's ensemble does).
* :class:`CachedTeacher`: rows of a verified cache written by :func:`cache_teacher_outputs` (per sample and, for
  an augmented training set, per epoch); the method then holds no teacher module at all. Batches must carry
  ``"index"`` (:class:`IndexedDataset`), so such a method sets ``needs_index``.

:func:`teacher_source` picks one from the method's ``cache_teacher``/``cache_dir``/``cache_path`` settings. The
third kind, a served teacher (``serve:NAME``, Ray Serve, :mod:`hubtune.serving`), is a :class:`ServedTeacherModule`
behind a :class:`LiveTeacher`: its outputs are requested ahead by the method's ``batches`` hook and arrive in
``batch["teacher_logits"]``; a step without them (mixup changed the inputs) makes one request.

Cache files and keys: :func:`cache_teacher_outputs` runs the teacher (eval mode, fp32, through its input view) once
over a dataset in index order, for ``epochs`` epochs: before epoch ``e`` it calls ``dataset.set_epoch(e)`` when the
dataset has it (:class:`~hubtune.data.augment.AugmentedDataset`, whose items are deterministic per sample, epoch
and seed), so the teacher outputs of an augmented run are computed once and replayed. It writes a float32
``(E, n, C)`` ``.npy`` (row ``[e, i]`` = the teacher's logits for ``dataset[i]`` in epoch ``e``), a float64
``(E, n, 2)`` ``.fp.npy`` of per-sample input fingerprints, and a ``.json`` with the cache key, all atomically
(the ``.json`` last). :class:`TeacherCache` reads it back and compares every batch's input fingerprints with the
stored ones, so a dataset that augments differently, reorders or changed raises
:class:`~hubtune.errors.TeacherCacheError` instead of silently distilling wrong targets. The key is
:func:`teacher_view_key`: the teacher identity (the candidate's identity hash for a spec,
:func:`~hubtune.tuning.models.module_identity` for a module) and its input view.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from .._checks import check_count
from .._io import atomic_path, write_json
from ..errors import ConfigError, InputError, TeacherCacheError
from .models import (HubModel, InputAdapter, has_data_config, load_model, module_identity, penultimate_features,
                     view_of)

__all__ = ["LiveTeacher", "CachedTeacher", "teacher_source", "TeacherCache", "cache_teacher_outputs",
           "IndexedDataset", "teacher_view_key", "teacher_cache_key", "teacher_cache_path", "input_fingerprint",
           "load_teacher", "CACHE_FORMAT"]

CACHE_FORMAT = "hubtune-teacher-cache-v2"


def teacher_view_key(identity: str, teacher_config: dict | None, input_config: dict | None = None) -> str:
    """The cache key of a teacher seen through its own input view: sha256 of the teacher ``identity``, its
    view (``teacher_config``) and, when the batches are prepared for another view (``input_config``), that
    one too (the :class:`InputAdapter` between them is then part of what the teacher computes)."""
    dst, src = view_of(teacher_config), view_of(input_config)
    payload = {"identity": identity, "view": dst, "from": src if (dst is not None and src != dst) else None}
    return hashlib.sha256(("hubtune-teacher-view-v1\n" + json.dumps(payload, sort_keys=True)).encode()).hexdigest()


def load_teacher(model, role: str = "teacher", pretrained: bool = True):
    """``(HubModel, data config or None)`` from an nn.Module, a Candidate, a HubModel or a hub spec; the data
    config is None for a bare module that carries none (it is fed batches as they come). The one loader of
    teachers (and of the student they are paired with): ``kd``, ``cache_teacher_outputs``, ``cache-teacher``."""
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
    """The key a teacher's cache is stored under: :func:`~hubtune.tuning.teachers.teacher_view_key` of its
    identity and view. ``teacher``: a spec, Candidate or module (configs as :class:`KnowledgeDistillation`
    resolves them), or an object with ``cache_identity()`` (B-Tuning's ensemble, which adapts its own inputs)."""
    if hasattr(teacher, "cache_identity"):
        return teacher.cache_identity()
    hm, cfg = load_teacher(teacher, "teacher", True)
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
    return check_count(name, v, error=ConfigError, optional=False,
                       cure="give cache_teacher_outputs a whole number >= 1")


@torch.no_grad()
def cache_teacher_outputs(teacher, dataset, path=None, batch_size: int = 64, device=None, *, epochs: int = 1,
                          input_config: dict | None = None, teacher_config: dict | None = None,
                          cache_dir=None) -> Path:
    """Run ``teacher`` (eval mode, fp32, no grad, through its input view) over ``dataset`` in index order for
    ``epochs`` epochs and write its logits; returns the path of the ``.npy``.

    ``teacher``: a module, a Candidate or a hub spec, or a module with ``cache_identity()`` that adapts its own
    inputs (B-Tuning's :class:`~hubtune.tuning.methods.btuning.TeacherEnsemble`). ``input_config``: the data config the
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
        hm, cfg = load_teacher(teacher, "teacher", True)
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
        self.path, self.verify, self.key = Path(path), bool(verify), key
        meta_p, fp_p = _meta_path(self.path), _fp_path(self.path)
        if not self.path.is_file() or not meta_p.is_file() or not fp_p.is_file():
            raise TeacherCacheError(
                f"no teacher cache at {self.path} (with {meta_p.name} and {fp_p.name}): write it first with "
                "`hubtune cache-teacher` or hubtune.tuning.cache_teacher_outputs(teacher, train_dataset, "
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
                                    "set in hubtune.tuning.IndexedDataset(train_dataset)")
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


# ---------------------------------------------------------------------------------------------- served teachers
SERVE_PREFIX = "serve:"


class ServedTeacherModule(torch.nn.Module):
    """A teacher served by ``hubtune serve-teacher`` (Ray Serve), seen by the methods as a frozen module:
    ``forward(x)`` (x in the teacher's input view) is one request for logits through a
    :class:`~hubtune.serving.TeacherClient`; :meth:`pipeline` keeps ``window`` requests in flight ahead of
    training. ``forward_features(x)`` asks the service for the penultimate features instead (a second client, made
    on first use) and ``forward_head(f, pre_logits=True)`` returns them as they are, so
    :func:`~hubtune.tuning.models.penultimate_features` works on a served teacher as on a local timm model
    (B-Tuning's projections, SSLD's deduplication). It holds no weights: its one buffer is the service's
    identity (weights hash and preprocessing), so the engine's record of frozen modules, and a resume, tell two
    different teachers apart."""

    def __init__(self, name: str, address=None, *, window: int = 4, timeout: float = 30.0, retries: int = 3,
                 on_stall: str = "fail"):
        super().__init__()
        from ..serving.deployment import RayServeTransport

        transport = RayServeTransport(name, address)
        info = transport.info()
        self.service, self.address, self.info = name, address, info
        self.pretrained_cfg = dict(info.get("data_config") or {})
        self.num_classes = info.get("num_classes")
        if info.get("num_features"):
            self.num_features = int(info["num_features"])  # what B-Tuning sizes its projections by
        self.register_buffer("identity_bytes", torch.tensor(list(info["identity"].encode()), dtype=torch.uint8))
        self._local = None  # not an nn.Module attribute: the local copy is no part of this module's state
        if on_stall == "local":  # the same teacher, loaded here for the batches no replica answers
            hm, _ = load_teacher(info["spec"], "teacher")
            self._local = _Local(hm.module.eval().requires_grad_(False), info["identity"])
        self._client_args = {"window": window, "timeout": timeout, "retries": retries, "on_stall": on_stall}
        self.client = self._client(transport, "logits")
        self._features_client = None

    def _client(self, transport, output: str):
        from ..serving import TeacherClient

        local = self._local
        if local is not None and output == "features":
            local = _Local(lambda x: penultimate_features(self._local.fn, x), self.info["identity"])
        return TeacherClient(transport, local=local, identity=self.info["identity"], output=output,
                             **self._client_args)

    @property
    def features_client(self):
        """The client that asks the service for penultimate features (made on first use)."""
        if self._features_client is None:
            from ..serving.deployment import RayServeTransport

            self._features_client = self._client(RayServeTransport(self.service, self.address, output="features"),
                                                 "features")
        return self._features_client

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.client(x.detach().float().cpu()).to(x.device)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The served teacher's penultimate features ``(n, D)`` (what ``hubtune rank`` extracts)."""
        return self.features_client(x.detach().float().cpu()).to(x.device)

    def forward_head(self, f: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if not pre_logits:
            raise ConfigError(f"served teacher {self.service!r}: its head runs in the service; ask for logits "
                              "with forward(x), or for features with forward_features(x)")
        return f

    def pipeline(self, batches, adapter=None, output: str = "logits", key: str = "teacher_logits"):
        """The batches with ``batch[key]`` set to the teacher's ``output`` (``"logits"`` or ``"features"``),
        requested ``window`` batches ahead, in order."""
        def view(b):
            x = b["input"]
            with torch.no_grad():
                return (adapter(x) if adapter is not None else x).float()

        client = self.client if output == "logits" else self.features_client
        for batch, out in client.pipeline(batches, inputs=view):
            batch[key] = out
            yield batch


class _Local:
    def __init__(self, fn, identity):
        self.fn, self.identity = fn, identity

    def __call__(self, x):
        with torch.no_grad():
            return self.fn(x)


def served_teacher(spec: str, **client_kwargs) -> HubModel:
    """``serve:NAME`` (or ``serve:NAME@ADDRESS``) → a :class:`HubModel` whose module is a
    :class:`ServedTeacherModule`, with the service's data config and identity."""
    name, _, address = spec[len(SERVE_PREFIX):].partition("@")
    if not name:
        raise ConfigError(f"teacher {spec!r} names no service: write serve:NAME (see `hubtune serve-teacher --list`)")
    module = ServedTeacherModule(name, address or None, **client_kwargs)
    return HubModel(module, dict(module.pretrained_cfg), spec, module.info["identity"], 0)


# ---------------------------------------------------------------------------------------------- sources
class LiveTeacher:
    """A frozen local ``module`` seen through ``adapter`` (None: fed the batch as it comes). Holds references
    only: the method owns the module (and moves it with itself)."""

    cached = False
    needs_index = False

    def __init__(self, module: torch.nn.Module, adapter: torch.nn.Module | None = None):
        self.module, self.adapter = module, adapter

    def on_epoch_start(self, epoch: int, total_epochs: int) -> None:
        pass

    def __call__(self, batch: dict) -> torch.Tensor:
        if "teacher_logits" in batch:  # requested ahead by a served teacher's pipeline
            return batch["teacher_logits"]
        x = batch["input"]
        with torch.no_grad():
            return self.module(self.adapter(x) if self.adapter is not None else x)


class CachedTeacher:
    """The teacher's outputs read from a :class:`TeacherCache` by ``batch["index"]`` and the current epoch."""

    cached = True
    needs_index = True

    def __init__(self, cache: "TeacherCache"):
        self.cache, self.epoch = cache, 0

    @property
    def path(self) -> Path:
        return self.cache.path

    def on_epoch_start(self, epoch: int, total_epochs: int) -> None:
        """Remember the epoch (the cache row of augmented runs); a run longer than the cache fails here, at its
        start, with the cure."""
        self.epoch = int(epoch)
        self.cache.check_epochs(epoch, total_epochs)

    def __call__(self, batch: dict) -> torch.Tensor:
        return self.cache.lookup(batch, batch["input"], self.epoch)


def teacher_source(module, key_fn, *, adapter=None, cache_teacher: bool = False, cache_dir=None, cache_path=None,
                   verify_cache: bool = True, num_classes: int | None = None, class_msg=None):
    """A :class:`CachedTeacher` when ``cache_teacher`` (or a ``cache_path``) is given, else a
    :class:`LiveTeacher` of ``module`` through ``adapter``. ``key_fn()`` gives the cache key (computed only
    when a cache is read: hashing a module costs a pass over its weights)."""
    if cache_teacher or cache_path is not None:
        return CachedTeacher(TeacherCache(cache_path, key_fn(), num_classes, verify_cache, class_msg,
                                          cache_dir=cache_dir))
    return LiveTeacher(module, adapter)
