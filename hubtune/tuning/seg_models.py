"""Segmentation networks for the ``segmentation`` task: MONAI's own networks, seen at named feature levels.

:class:`SegNet` wraps a network (``monai.networks.nets.BasicUNet``, ``DynUNet`` — nnU-Net-like — or any module)
and exposes its encoder and decoder features by name, through forward hooks on the submodules that produce them,
so a method can put a domain discriminator on any level without touching the network's code::

    >>> net = build_seg_model("basicunet?features=8,8,16,32,64,8", spatial_dims=2, in_channels=1, num_classes=2)
    >>> logits, feats = net.forward_features(x, ["enc4", "dec1"])   # feats["enc4"]: the bottleneck
    >>> net.level_names   # ['enc0', 'enc1', 'enc2', 'enc3', 'enc4', 'dec4', 'dec3', 'dec2', 'dec1', 'out']

Levels: ``encK`` (K = 0 at full resolution; the deepest is the bottleneck), ``decK`` (the up-sampling stages,
numbered as the network numbers them, so ``dec1`` is the last, at full resolution) and
``out`` (the logits; the output-space discriminator of AdaptSegNet sees their softmax). For ``BasicUNet``:
``enc0`` = ``conv_0``, ``enc1..enc4`` = ``down_1..down_4``, ``dec4..dec1`` = ``upcat_4..upcat_1``. For ``DynUNet``:
``enc0`` = ``input_block``, ``enc1..`` = ``downsamples[i]``, then ``bottleneck``, and ``dec*`` = ``upsamples[j]``
from the deepest. Any other module: give ``levels={"name": "submodule.path", ...}``.

Specs (the ``--model`` of ``hubtune tune --task segmentation``): ``basicunet`` or ``dynunet`` with options after
``?`` (``basicunet?features=16,16,32,64,128,16``, ``dynunet?filters=16,32,64,128&strides=1,2,2,2``), or
``local-dir:PATH``, a folder written by a segmentation run (``model.safetensors`` + ``config.json``).
MONAI is the extra ``hubtune[seg]``, imported only when a network is built.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .._checks import split_options
from ..errors import ConfigError, MissingExtraError, ModelNotFoundError

__all__ = ["SegNet", "build_seg_model", "load_seg_folder", "save_seg_folder", "import_monai", "SEG_ARCHS"]

SEG_ARCHS = ("basicunet", "dynunet")
#: BasicUNet's defaults are for 3D CT; these are the ``features`` used when none are given
BASICUNET_FEATURES = (32, 32, 64, 128, 256, 32)


def import_monai(feature: str = "the segmentation task"):
    """The ``monai`` module, or :class:`MissingExtraError` naming the extra ``hubtune[seg]``."""
    try:
        import monai
    except ImportError:
        raise MissingExtraError("monai", "seg", feature) from None
    return monai


class SegNet(nn.Module):
    """A segmentation network with named feature levels (see the module docstring).

    ``net``: the network, ``(B, C_in, *spatial) -> (B, num_classes, *spatial)`` logits; ``levels``: ``{name:
    submodule path}`` (``"out"`` is always the logits and needs no path); ``config``: how to rebuild it
    (``architecture``, ``kwargs``), written to ``config.json`` by :func:`save_seg_folder`."""

    def __init__(self, net: nn.Module, levels: dict[str, str], *, spatial_dims: int, in_channels: int,
                 num_classes: int, config: dict | None = None):
        super().__init__()
        if not isinstance(net, nn.Module):
            raise ConfigError(f"a segmentation network must be an nn.Module, got {type(net).__name__}")
        self.net = net
        names = dict(net.named_modules())
        for name, path in levels.items():
            if name == "out":
                raise ConfigError("level 'out' is the logits; do not map it to a submodule")
            if path not in names:
                raise ConfigError(f"level {name!r} names submodule {path!r}, which the network "
                                  f"{type(net).__name__} does not have; its submodules include "
                                  f"{', '.join(list(names)[1:8])} ...")
        self.level_paths = dict(levels)
        self.spatial_dims, self.in_channels, self.num_classes = int(spatial_dims), int(in_channels), int(num_classes)
        self.config = dict(config or {"architecture": "custom", "kwargs": {}})
        self._channels: dict[str, int] | None = None

    @property
    def level_names(self) -> list[str]:
        return list(self.level_paths) + ["out"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def check_levels(self, levels) -> list[str]:
        """``levels`` (names, or ``"all"``) checked against :attr:`level_names`."""
        if levels == "all":
            return self.level_names
        if isinstance(levels, str):
            levels = [levels]
        levels = list(levels)
        bad = [lv for lv in levels if lv not in self.level_names]
        if bad or not levels:
            what = "unknown level(s) " + ", ".join(map(repr, bad)) if bad else "empty"
            raise ConfigError(f"levels={levels!r}: {what}"
                              f"; this network has {', '.join(self.level_names)} (or 'all')")
        if len(set(levels)) != len(levels):
            raise ConfigError(f"levels={levels!r} names a level twice; give each once")
        return levels

    def forward_features(self, x: torch.Tensor, levels) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(logits, {level: features})`` of one forward pass; ``feats["out"]`` is the logits themselves."""
        levels = self.check_levels(levels)
        got: dict[str, torch.Tensor] = {}
        handles = []
        for name in levels:
            if name == "out":
                continue
            mod = self.net.get_submodule(self.level_paths[name])

            def hook(_m, _inp, out, name=name):
                got[name] = out[0] if isinstance(out, (tuple, list)) else out

            handles.append(mod.register_forward_hook(hook))
        try:
            logits = self.net(x)
        finally:
            for h in handles:
                h.remove()
        if "out" in levels:
            got["out"] = logits
        return logits, {name: got[name] for name in levels}

    def level_channels(self, probe: int = 32) -> dict[str, int]:
        """``{level: channels}``, from one probe pass on zeros of side ``probe`` (kept after the first call)."""
        if self._channels is None:
            p = next(self.parameters())
            x = torch.zeros((1, self.in_channels) + (probe,) * self.spatial_dims, dtype=p.dtype, device=p.device)
            was = self.training
            self.eval()
            try:
                with torch.no_grad():
                    _, feats = self.forward_features(x, "all")
            finally:
                self.train(was)
            self._channels = {k: int(v.shape[1]) for k, v in feats.items()}
        return dict(self._channels)


# ---------------------------------------------------------------------------------------------- building
def _ints(value, name: str, spec: str) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in str(value).split(",") if v != "")
    except ValueError:
        raise ConfigError(f"model spec {spec!r}: {name}={value!r} must be comma-separated whole numbers") from None
    if not out or any(v < 1 for v in out):
        raise ConfigError(f"model spec {spec!r}: {name}={value!r} must be whole numbers >= 1")
    return out


def _check_options(opts: dict, allowed: set, spec: str, arch: str) -> None:
    unknown = sorted(set(opts) - allowed)
    if unknown:
        raise ConfigError(f"model spec {spec!r}: unknown option(s) {', '.join(unknown)}; {arch} takes "
                          f"{', '.join(sorted(allowed))}")


def _basicunet(opts: dict, spec: str, spatial_dims: int, in_channels: int, num_classes: int) -> SegNet:
    monai = import_monai()
    _check_options(opts, {"features", "dropout", "norm"}, spec, "basicunet")
    features = _ints(opts["features"], "features", spec) if "features" in opts else BASICUNET_FEATURES
    if len(features) != 6:
        raise ConfigError(f"model spec {spec!r}: basicunet features needs 6 numbers (5 encoder widths and the "
                          f"last decoder's), got {len(features)}")
    kwargs = {"features": list(features), "dropout": float(opts.get("dropout", 0.0))}
    if "norm" in opts:
        kwargs["norm"] = opts["norm"]
    net = monai.networks.nets.BasicUNet(spatial_dims=spatial_dims, in_channels=in_channels,
                                        out_channels=num_classes, **kwargs)
    levels = {"enc0": "conv_0", "enc1": "down_1", "enc2": "down_2", "enc3": "down_3", "enc4": "down_4",
              "dec4": "upcat_4", "dec3": "upcat_3", "dec2": "upcat_2", "dec1": "upcat_1"}
    return SegNet(net, levels, spatial_dims=spatial_dims, in_channels=in_channels, num_classes=num_classes,
                  config={"architecture": "basicunet", "kwargs": kwargs})


def _dynunet(opts: dict, spec: str, spatial_dims: int, in_channels: int, num_classes: int) -> SegNet:
    monai = import_monai()
    _check_options(opts, {"filters", "strides", "kernels"}, spec, "dynunet")
    strides = _ints(opts.get("strides", "1,2,2,2"), "strides", spec)
    filters = _ints(opts["filters"], "filters", spec) if "filters" in opts else tuple(
        min(32 * 2 ** i, 320) for i in range(len(strides)))
    kernels = _ints(opts.get("kernels", ",".join(["3"] * len(strides))), "kernels", spec)
    if not (len(filters) == len(strides) == len(kernels)) or len(strides) < 2:
        raise ConfigError(f"model spec {spec!r}: dynunet needs as many filters, strides and kernels (>= 2 each), "
                          f"got {len(filters)}, {len(strides)}, {len(kernels)}")
    kwargs = {"filters": list(filters), "strides": list(strides), "kernel_size": list(kernels),
              "upsample_kernel_size": list(strides[1:]), "res_block": True}
    net = monai.networks.nets.DynUNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=num_classes,
                                      **kwargs)
    n = len(strides)
    levels = {"enc0": "input_block"}
    levels.update({f"enc{i + 1}": f"downsamples.{i}" for i in range(n - 2)})
    levels[f"enc{n - 1}"] = "bottleneck"
    levels.update({f"dec{n - 1 - j}": f"upsamples.{j}" for j in range(n - 1)})
    return SegNet(net, levels, spatial_dims=spatial_dims, in_channels=in_channels, num_classes=num_classes,
                  config={"architecture": "dynunet", "kwargs": kwargs})


def build_seg_model(spec, *, spatial_dims: int, in_channels: int, num_classes: int, levels: dict | None = None,
                    seed: int | None = None) -> SegNet:
    """A :class:`SegNet` from a spec (see the module docstring), a :class:`SegNet` (returned as it is) or any
    ``nn.Module`` (with ``levels={name: submodule path}``). ``seed`` seeds the new network's weights."""
    if isinstance(spec, SegNet):
        return spec
    if isinstance(spec, nn.Module):
        return SegNet(spec, levels or {}, spatial_dims=spatial_dims, in_channels=in_channels,
                      num_classes=num_classes)
    if not isinstance(spec, str):
        raise ConfigError(f"a segmentation model is a spec ('basicunet', 'dynunet', 'local-dir:PATH') or an "
                          f"nn.Module, got {type(spec).__name__}")
    if spatial_dims not in (2, 3):
        raise ConfigError(f"spatial_dims={spatial_dims!r} is invalid: give 2 or 3")
    if spec.startswith("local-dir:"):
        return load_seg_folder(spec[len("local-dir:"):], spatial_dims=spatial_dims, in_channels=in_channels,
                               num_classes=num_classes)
    arch, opts = split_options(spec, f"model spec {spec!r}", ConfigError)
    arch = arch.strip().lower()
    builders = {"basicunet": _basicunet, "dynunet": _dynunet}
    if arch not in builders:
        raise ModelNotFoundError(f"unknown segmentation model {spec!r}; choose one of {', '.join(SEG_ARCHS)} "
                                 "(options after '?'), 'local-dir:PATH' of a segmentation run, or pass an nn.Module")
    state = torch.random.get_rng_state()
    if seed is not None:
        torch.manual_seed(seed)
    try:
        return builders[arch](opts, spec, spatial_dims, in_channels, num_classes)
    finally:
        if seed is not None:
            torch.random.set_rng_state(state)


def save_seg_folder(model: SegNet, out_dir, extra: dict | None = None) -> None:
    """``model.safetensors`` (the network's state dict) and ``config.json`` (``task: segmentation``, the
    architecture and its arguments, spatial dims, channels, classes, levels), both atomic; loaded back by
    ``local-dir:OUT``."""
    from .._io import save_state_dict, write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"task": "segmentation", "architecture": model.config.get("architecture", "custom"),
           "kwargs": model.config.get("kwargs", {}), "spatial_dims": model.spatial_dims,
           "in_channels": model.in_channels, "num_classes": model.num_classes, "levels": model.level_paths}
    cfg.update(extra or {})
    save_state_dict(model.net, out / "model.safetensors")
    write_json(out / "config.json", cfg)


def load_seg_folder(path, *, spatial_dims: int | None = None, in_channels: int | None = None,
                    num_classes: int | None = None) -> SegNet:
    """The :class:`SegNet` a segmentation run saved in ``path``; the given dims/channels/classes must match."""
    folder = Path(path).expanduser()
    cfg_path, w_path = folder / "config.json", folder / "model.safetensors"
    if not cfg_path.is_file() or not w_path.is_file():
        raise ModelNotFoundError(f"local-dir:{path}: no config.json and model.safetensors there; give the --out "
                                 "folder of a finished segmentation run")
    try:
        cfg = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise ModelNotFoundError(f"{cfg_path} is not valid JSON ({e}); the folder is damaged") from None
    if cfg.get("task") != "segmentation":
        raise ConfigError(f"local-dir:{path} holds a {cfg.get('task', 'classification')} model, not a segmentation "
                          "network; give the --out folder of a `--task segmentation` run")
    for name, want in (("spatial_dims", spatial_dims), ("in_channels", in_channels), ("num_classes", num_classes)):
        if want is not None and int(cfg[name]) != int(want):
            raise ConfigError(f"local-dir:{path} was trained with {name}={cfg[name]}, but this run needs {want}; "
                              "use a model trained for the same data and classes")
    arch = cfg.get("architecture")
    if arch not in SEG_ARCHS:
        raise ConfigError(f"local-dir:{path} holds a {arch!r} network, which hubtune cannot rebuild from its config; "
                          "pass the module itself (model=) instead")
    monai = import_monai()
    cls = monai.networks.nets.BasicUNet if arch == "basicunet" else monai.networks.nets.DynUNet
    net = cls(spatial_dims=int(cfg["spatial_dims"]), in_channels=int(cfg["in_channels"]),
              out_channels=int(cfg["num_classes"]), **cfg["kwargs"])
    from safetensors.torch import load_file

    try:
        net.load_state_dict(load_file(str(w_path)))
    except Exception as e:
        raise ConfigError(f"{w_path} does not fit the network in its config.json ({str(e).splitlines()[0][:200]}); "
                          "the folder is damaged") from None
    return SegNet(net, cfg["levels"], spatial_dims=int(cfg["spatial_dims"]), in_channels=int(cfg["in_channels"]),
                  num_classes=int(cfg["num_classes"]), config={"architecture": arch, "kwargs": cfg["kwargs"]})
