"""Zoo-Tuning: ``@register_method("zootuning")``.

Shu, Kou, Cao, Wang, Long, "Zoo-Tuning: Adaptive Transfer from a Zoo of Models", ICML 2021.

K >= 2 source models of **one architecture** (pretrained differently) are merged into one network of that
architecture whose convolutions are *adaptive aggregations* of the sources' kernels:

* **Convolutions.** Every supported convolution becomes an :class:`AdaptiveAggregationConv2d` holding the K
  source kernels ``W_e`` (stacked, trainable) and computing, per input sample ``x``,
  ``W(x) = sum_e g_e(x) * T_e W_e``, where ``g(x) = sigmoid(conv1x1(relu(conv1x1(gap(x)))))`` (K independent
  sigmoid gates, hidden width ``C_in // gate_reduction + 1``; see *Gate initialisation*) and ``T_e`` is a learnable ``C_out x C_out``
  output-channel alignment initialised to the identity, applied as ``T_e @ W_e.reshape(C_out, -1)``. Alignment
  is used only on kernels larger than 1x1 with ``groups == 1`` (1x1 and grouped/depthwise kernels are cheap to
  re-align through their neighbours, and a ``C_out x C_out`` matrix per depthwise conv would mix channels the
  grouping keeps apart); ``align=False`` disables it everywhere. Biases (where the sources have one) are
  aggregated with the same gates and the same alignment: ``b(x) = sum_e g_e(x) * T_e b_e``.
  Two exact implementations (``impl``): ``"grouped"`` applies the per-sample kernels with ONE grouped
  convolution, the batch folded into the channels (``x.view(1, B*C_in, H, W)``, weight
  ``(B*C_out, C_in/groups, kh, kw)``, ``groups = B*groups``), as the authors do on GPUs; ``"sum"`` uses that a
  convolution is linear in its kernel, ``conv(x_b, sum_e g_be W'_e) = sum_e g_be conv(x_b, W'_e)``, and runs K
  ordinary batched convolutions whose outputs are mixed per sample: K times the convolution FLOPs but no
  ``B x |W|`` kernel tensor and no many-group convolution, which CPU kernels run poorly (measured in
  ``bench/bench_multi.py``). ``"auto"`` (default): grouped on CUDA, sum elsewhere.
* **Gate initialisation** (``gate_init``). ``"average"`` (default, *ours*): the last 1x1 conv of every gate
  starts with zero weight and bias ``logit(1/K) = -log(K - 1)``, so every gate is exactly ``1/K`` for every
  input and the aggregated network starts as the plain average of the sources, ``W = (1/K) sum_e W_e`` (the
  BatchNorms are averaged too); the gates then train from there (the zero weight gets its gradient at the
  first step, the hidden layer from the second on). ``"half"``: PyTorch's default initialisation of that conv
  (the paper does not say), gates near ``sigmoid(0) = 0.5``, so every convolution starts at about ``K/2`` times
  the average kernel, e.g. 1.5x for K = 3; a convolution without a BatchNorm after it (an SE block's, a
  residual branch's last one without BN) then passes on activations scaled by ``K/2``. One consequence to
  know: a step on the sources' kernels moves the aggregate by ``K g^2`` times the step (``g`` the gate), i.e.
  ``1/K`` of a single model's step at the average start against ``K/4`` at the half start, so the average start
  trains the aggregate more slowly at the same lr. Measured on a 2-core AMD EPYC VM (3 ``test_resnet`` sources, each
  trained 3 epochs on another third of digits, Zoo-Tuned 2 epochs on 400 other digits at 32 px, batch 32,
  3 seeds, digits test accuracy): lr 0.01: half 0.690 +- 0.023, average 0.320 +- 0.048; lr 0.03: half
  0.544 +- 0.217, average 0.581 +- 0.092. The average start is the correct one and is the more stable, but
  it wants a higher lr (about K/2 times); tune the lr with it rather than relying on the K/2 scaling.
* **Supported convolutions:** ``torch.nn.Conv2d`` itself (``padding_mode='zeros'``) and timm's
  ``Conv2dSame`` (TF "same" padding, applied before the aggregated convolution). Other ``Conv2d`` subclasses
  (weight-standardised ``StdConv2d``, ``Conv2dSameExport``, ...) change the forward, so they are *not*
  aggregated: they keep ``models[0]``'s weights and are listed in :attr:`ZooTuning.skipped_convs`.
* **BatchNorm.** One shared BN per position; its affine weight/bias and running mean/var are the plain average
  of the K sources' (the running variance is the mean of the variances, not the variance of the mixture).
* **Everything else** that is not a convolution or a BN (linear layers, layer-scales, ...) is taken from
  ``models[0]``: only convolutions are aggregated. (timm's SE blocks use 1x1 ``Conv2d``, so they *are*
  aggregated.)
* **Head.** A new classifier (``reset_classifier(num_classes)``), its own parameter group at
  ``lr * head_lr_mult``; gates and alignments train with the backbone at ``lr``.
* **Lite** (``lite=True``): in training the gates are averaged over the batch, so each batch uses one kernel
  (an ordinary convolution), and an exponential moving average of the batch-mean gates is kept in the buffer
  ``ema_gates``: ``ema = m * ema + (1 - m) * mean_gates`` (``m = ema_momentum``). The buffer starts at the
  initial gate value (``1/K``, or 0.5 with ``gate_init="half"``) and is overwritten by the first training
  batch's mean gates. In eval the EMA gates are used and the gate
  network is not run, so :meth:`ZooTuning.collapse` can fold the aggregation into an ordinary timm model
  (``W = sum_e ema_e T_e W_e``), which is what is saved.
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..._io import json_safe, save_state_dict, write_json
from ...errors import ConfigError
from ..method import MultiModelMethod, Setting, register_method
from ..models import HubModel, check_num_classes, head_names, load_models

FORMAT = "hubtune-zootuning-v1"


def _conv_same_cls():
    try:
        from timm.layers import Conv2dSame
    except ImportError:  # pragma: no cover - timm is a dependency of every tuning method
        return None
    return Conv2dSame


IMPLS = ("auto", "grouped", "sum")
GATE_INITS = ("average", "half")


def _check_choices(impl: str, gate_init: str) -> None:
    if impl not in IMPLS:
        raise ConfigError(f"ZooTuning impl={impl!r} is invalid: choose one of {', '.join(IMPLS)}")
    if gate_init not in GATE_INITS:
        raise ConfigError(f"ZooTuning gate_init={gate_init!r} is invalid: choose 'average' (every gate starts "
                          "at 1/K: the sources' average) or 'half' (PyTorch's default init, gates near 0.5)")


def _supported_conv(m: nn.Module) -> bool:
    """Plain ``nn.Conv2d`` (zero padding) or timm's ``Conv2dSame``; other subclasses change the forward."""
    same = _conv_same_cls()
    return (type(m) is nn.Conv2d and m.padding_mode == "zeros") or (same is not None and type(m) is same)


class AdaptiveAggregationConv2d(nn.Module):
    """``W(x) = sum_e g_e(x) T_e W_e`` over K source convolutions (Zoo-Tuning, Shu et al., ICML 2021).

    ``convs``: K convolutions of identical configuration. Gates: global average pool -> 1x1 conv
    ``C_in -> C_in // gate_reduction + 1`` -> ReLU -> 1x1 conv ``-> K`` -> sigmoid. ``T_e`` (``align``,
    identity at start) only when the kernel is larger than 1x1 and ``groups == 1``. ``lite``: batch-mean gates
    in training (one kernel per batch) and EMA gates in eval; see the module docstring."""

    def __init__(self, convs, *, gate_reduction: int = 4, align: bool = True, lite: bool = False,
                 ema_momentum: float = 0.9, impl: str = "auto", gate_init: str = "average"):
        super().__init__()
        _check_choices(impl, gate_init)
        self.impl = impl
        c0 = convs[0]
        self.conv_cls = type(c0)
        self.same_pad = self.conv_cls is not nn.Conv2d  # timm Conv2dSame
        self.in_channels, self.out_channels = c0.in_channels, c0.out_channels
        self.kernel_size, self.stride, self.padding = tuple(c0.kernel_size), tuple(c0.stride), c0.padding
        self.dilation, self.groups = tuple(c0.dilation), c0.groups
        self.num_sources = len(convs)
        self.lite, self.ema_momentum = bool(lite), float(ema_momentum)
        self.weight = nn.Parameter(torch.stack([c.weight.detach().clone() for c in convs]))
        self.bias = (nn.Parameter(torch.stack([c.bias.detach().clone() for c in convs]))
                     if c0.bias is not None else None)
        hidden = self.in_channels // int(gate_reduction) + 1
        dev, dt = c0.weight.device, c0.weight.dtype
        self.gate = nn.Sequential(nn.Conv2d(self.in_channels, hidden, 1, device=dev, dtype=dt), nn.ReLU(),
                                  nn.Conv2d(hidden, self.num_sources, 1, device=dev, dtype=dt))
        K = self.num_sources
        if gate_init == "average":  # every gate exactly 1/K at the start: the aggregate is the sources' average
            with torch.no_grad():
                self.gate[2].weight.zero_()
                self.gate[2].bias.fill_(-math.log(K - 1) if K > 1 else 30.0)  # logit(1/K); sigmoid(30) = 1
        g0 = 1.0 / K if gate_init == "average" else 0.5
        self.aligned = bool(align) and self.groups == 1 and max(self.kernel_size) > 1
        if self.aligned:
            eye = torch.eye(self.out_channels, device=dev, dtype=dt)
            self.align = nn.Parameter(eye.expand(self.num_sources, -1, -1).clone())
        else:
            self.register_parameter("align", None)
        self.register_buffer("ema_gates", torch.full((self.num_sources,), g0, device=dev, dtype=dt))
        self.register_buffer("ema_batches", torch.zeros((), dtype=torch.long, device=dev))

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"groups={self.groups}, sources={self.num_sources}, aligned={self.aligned}, lite={self.lite}")

    # -------------------------------------------------------------- pieces
    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, K)`` sigmoid gates from the layer input ``x``."""
        return torch.sigmoid(self.gate(F.adaptive_avg_pool2d(x, 1))).flatten(1)

    def aligned_weight(self) -> torch.Tensor:
        """``(K, C_out, C_in/groups, kh, kw)``: ``T_e @ W_e.reshape(C_out, -1)`` (``W_e`` if not aligned)."""
        if self.align is None:
            return self.weight
        w = self.weight.flatten(2)
        return torch.matmul(self.align, w).view_as(self.weight)

    def aligned_bias(self):
        """``(K, C_out)``: ``T_e b_e`` (``b_e`` if not aligned), or None."""
        if self.bias is None or self.align is None:
            return self.bias
        return torch.matmul(self.align, self.bias.unsqueeze(-1)).squeeze(-1)

    def combined(self, g: torch.Tensor):
        """Kernel and bias for gates ``g`` of shape ``(K,)`` or ``(B, K)`` (then with a leading B)."""
        aw = self.aligned_weight()
        g = g.to(aw.dtype)  # under autocast the gates and the aligned kernel may come out in different dtypes
        w = torch.tensordot(g, aw, dims=([g.ndim - 1], [0]))
        b = self.aligned_bias()
        b = None if b is None else g @ b.to(aw.dtype)
        return w, b

    def _pad(self, x):
        if self.same_pad:
            from timm.layers.padding import pad_same

            return pad_same(x, self.kernel_size, self.stride, self.dilation)
        return x

    def _conv(self, x, w, b, groups):
        pad = 0 if self.same_pad else self.padding
        return F.conv2d(self._pad(x), w, b, self.stride, pad, self.dilation, groups)

    # -------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lite:
            if self.training:
                g = self.gates(x).mean(0)
                with torch.no_grad():
                    m = self.ema_momentum if int(self.ema_batches) > 0 else 0.0
                    self.ema_gates.mul_(m).add_((1.0 - m) * g.detach().to(self.ema_gates.dtype))
                    self.ema_batches.add_(1)
            else:
                g = self.ema_gates.to(x.dtype)
            w, b = self.combined(g)
            return self._conv(x, w.to(x.dtype), None if b is None else b.to(x.dtype), self.groups)
        B = x.shape[0]
        if self.impl == "sum" or (self.impl == "auto" and x.device.type != "cuda"):
            g = self.gates(x).to(x.dtype)  # (B, K)
            aw, ab = self.aligned_weight().to(x.dtype), self.aligned_bias()
            y = 0
            for e in range(self.num_sources):
                ye = self._conv(x, aw[e], None if ab is None else ab[e].to(x.dtype), self.groups)
                y = y + g[:, e, None, None, None] * ye
            return y
        w, b = self.combined(self.gates(x))  # (B, C_out, C_in/g, kh, kw), (B, C_out)
        w = w.reshape(B * self.out_channels, *w.shape[2:]).to(x.dtype)
        b = None if b is None else b.reshape(-1).to(x.dtype)
        y = self._conv(x.reshape(1, B * self.in_channels, *x.shape[2:]), w, b, B * self.groups)
        return y.view(B, self.out_channels, *y.shape[2:])

    @torch.no_grad()
    def to_conv(self) -> nn.Conv2d:
        """An ordinary convolution (same class as the sources') with the EMA-gated kernel
        ``sum_e ema_e T_e W_e`` and bias ``sum_e ema_e T_e b_e``."""
        w, b = self.combined(self.ema_gates.to(self.weight.dtype))
        conv = self.conv_cls(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                             padding=0 if self.same_pad else self.padding, dilation=self.dilation,
                             groups=self.groups, bias=b is not None, device=w.device, dtype=w.dtype)
        conv.weight.copy_(w)
        if b is not None:
            conv.bias.copy_(b)
        return conv


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def _label(hm: HubModel, i: int) -> str:
    arch = (getattr(hm.module, "pretrained_cfg", None) or {}).get("architecture")
    return f"models[{i}] {hm.name!r}" + (f" ({arch})" if arch and arch != hm.name else "")


def _check_same_architecture(hubs: list[HubModel]) -> None:
    hint = ("Zoo-Tuning aggregates the kernels of models of one architecture; give models of the same "
            "architecture, or use hubpathway/btuning for heterogeneous hubs")
    ref = hubs[0]
    ref_heads = head_names(ref.module) if hasattr(ref.module, "get_classifier") else set()
    ref_sd = {k: tuple(v.shape) for k, v in ref.module.state_dict().items() if k not in ref_heads}
    for i, hm in enumerate(hubs[1:], 1):
        a, b = _label(ref, 0), _label(hm, i)
        if type(hm.module) is not type(ref.module):
            raise ConfigError(f"Zoo-Tuning: {a} is a {type(ref.module).__name__} but {b} is a "
                              f"{type(hm.module).__name__}. {hint}")
        heads = head_names(hm.module) if hasattr(hm.module, "get_classifier") else set()
        sd = {k: tuple(v.shape) for k, v in hm.module.state_dict().items() if k not in heads}
        for k in ref_sd:
            if k not in sd:
                raise ConfigError(f"Zoo-Tuning: {a} has {k!r} {ref_sd[k]} but {b} has no such tensor. {hint}")
            if sd[k] != ref_sd[k]:
                raise ConfigError(f"Zoo-Tuning: {a} has {k!r} of shape {ref_sd[k]} but {b} has {sd[k]}. {hint}")
        extra = [k for k in sd if k not in ref_sd]
        if extra:
            raise ConfigError(f"Zoo-Tuning: {b} has {extra[0]!r} {sd[extra[0]]} but {a} has no such tensor. {hint}")


@register_method("zootuning")
class ZooTuning(MultiModelMethod):
    """Zoo-Tuning (Shu et al., ICML 2021) over ``models`` (K >= 2 timm modules or hub specs of one
    architecture); see the module docstring for the aggregation, BN sharing, lite mode and saving."""

    settings = {
        "lite": Setting(False, "input-independent gates (EMA), collapsible into one ordinary model", bool),
        "ema_momentum": Setting(0.9, "lite: momentum of the gate EMA", float),
        "gate_reduction": Setting(4, "channel reduction of the gate network", int),
        "align": Setting(True, "learn a per-source 1x1 channel alignment", bool),
        "head_lr_mult": Setting(10.0, "the new head's LR multiplier", float),
        "pretrained": Setting(True, "load the specs' pretrained weights", bool),
        "impl": Setting("auto", "aggregation kernel: auto, grouped or sum", str),
        "gate_init": Setting("average", "average (start at the sources' mean kernel) or half (sigmoid 0.5)", str),
    }

    def __init__(self, models, num_classes: int, *, lite: bool = False, ema_momentum: float = 0.9,
                 gate_reduction: int = 4, align: bool = True, head_lr_mult: float = 10.0, pretrained: bool = True,
                 impl: str = "auto", gate_init: str = "average"):
        super().__init__()
        _check_choices(impl, gate_init)
        check_num_classes(num_classes, "ZooTuning")
        if not isinstance(ema_momentum, (int, float)) or not 0 <= ema_momentum < 1:
            raise ConfigError(f"ZooTuning ema_momentum={ema_momentum!r} is invalid: give a number in [0, 1)")
        if not isinstance(gate_reduction, int) or isinstance(gate_reduction, bool) or gate_reduction < 1:
            raise ConfigError(f"ZooTuning gate_reduction={gate_reduction!r} is invalid: give a whole number >= 1")
        if not isinstance(head_lr_mult, (int, float)) or head_lr_mult < 0:
            raise ConfigError(f"ZooTuning head_lr_mult={head_lr_mult!r} is invalid: give a number >= 0")
        hubs = load_models(models, pretrained=pretrained, role="ZooTuning models")
        if len(hubs) < 2:
            raise ConfigError(f"ZooTuning got {len(hubs)} model ({hubs[0].name}); Zoo-Tuning aggregates K >= 2 "
                              "source models of one architecture: give at least two (or use finetune for one)")
        for i, hm in enumerate(hubs):
            if not hasattr(hm.module, "reset_classifier") or not hasattr(hm.module, "get_classifier"):
                raise ConfigError(f"ZooTuning {_label(hm, i)} is not a timm model (no reset_classifier/"
                                  "get_classifier); give timm models or hub specs")
        _check_same_architecture(hubs)
        self.num_models, self.num_classes = len(hubs), num_classes
        self.lite, self.ema_momentum = bool(lite), float(ema_momentum)
        self.gate_reduction, self.align = int(gate_reduction), bool(align)
        self.head_lr_mult, self.impl, self.gate_init = float(head_lr_mult), impl, gate_init
        self.model_names = [h.name for h in hubs]
        self.data_config = dict(hubs[0].data_config)
        self.source_num_params = sum(p.numel() for n, p in hubs[0].module.named_parameters()
                                     if n not in head_names(hubs[0].module))
        sources = [h.module for h in hubs]

        target = copy.deepcopy(sources[0])
        target.reset_classifier(num_classes)
        head = target.get_classifier()
        in_head = {id(m) for m in head.modules()}
        self.aggregated_convs, self.skipped_convs, self.shared_bns = [], [], []
        for name, mod in list(target.named_modules()):
            if id(mod) in in_head:
                continue
            if isinstance(mod, nn.Conv2d):
                if not _supported_conv(mod):
                    self.skipped_convs.append(f"{name} ({type(mod).__name__})")
                    continue
                convs = [s.get_submodule(name) for s in sources]
                _set_submodule(target, name, AdaptiveAggregationConv2d(
                    convs, gate_reduction=self.gate_reduction, align=self.align, lite=self.lite,
                    ema_momentum=self.ema_momentum, impl=impl, gate_init=gate_init))
                self.aggregated_convs.append(name)
            elif isinstance(mod, _BatchNorm):
                bns = [s.get_submodule(name) for s in sources]
                with torch.no_grad():
                    for attr in ("weight", "bias", "running_mean", "running_var"):
                        t = getattr(mod, attr, None)
                        if t is not None:
                            t.copy_(torch.stack([getattr(b, attr).detach() for b in bns]).mean(0))
                self.shared_bns.append(name)
        self.model = target.train()
        self.head_names = head_names(self.model)

    # ------------------------------------------------------------------ method protocol
    def losses(self, batch: dict) -> dict[str, torch.Tensor]:
        ce = F.cross_entropy(self.predict(batch["input"]).float(), batch["target"])
        return {"total": ce, "ce": ce.detach()}

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def param_groups(self, lr: float) -> list[dict]:
        params = dict(self.model.named_parameters())
        backbone = [p for n, p in params.items() if n not in self.head_names and p.requires_grad]
        head = [p for n, p in params.items() if n in self.head_names and p.requires_grad]
        return [{"params": backbone, "lr": lr, "lr_mult": 1.0, "name": "backbone"},
                {"params": head, "lr": lr * self.head_lr_mult, "lr_mult": self.head_lr_mult, "name": "head"}]

    def collapse(self) -> nn.Module:
        """Lite only: an ordinary timm model (the sources' class, ``num_classes`` outputs) whose convolutions
        are ``sum_e ema_e T_e W_e`` and whose BN and head are the trained shared ones; in eval mode it computes
        what this method's eval-mode :meth:`predict` computes."""
        if not self.lite:
            raise ConfigError("ZooTuning.collapse(): with lite=False the gates depend on each input sample, so "
                              "the aggregated network cannot be folded into one ordinary model; train with "
                              "lite=True to get a collapsible model (or save()/ZooTuning.load() the full one)")
        out = copy.deepcopy(self.model)
        for name, mod in list(out.named_modules()):
            if isinstance(mod, AdaptiveAggregationConv2d):
                _set_submodule(out, name, mod.to_conv())
        return out.train(self.model.training)

    def model_to_save(self) -> nn.Module:
        return self.collapse() if self.lite else self.model

    def save(self, out_dir) -> None:
        """Lite: the collapsed timm folder (``local-dir:OUT``). Otherwise ``model.safetensors`` (the
        aggregated module's state dict, atomic) and ``zootuning.json``; load it back with :meth:`load`."""
        if self.lite:
            return super().save(out_dir)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        arch = (getattr(self.model, "pretrained_cfg", None) or {}).get("architecture")
        if not arch:
            raise ConfigError(f"ZooTuning.save(): the source model ({type(self.model).__name__}) has no "
                              "pretrained_cfg['architecture']; build the sources with timm.create_model")
        save_state_dict(self.model, out / "model.safetensors")
        write_json(out / "zootuning.json", {
            "format": FORMAT, "architecture": arch, "num_models": self.num_models,
            "num_classes": self.num_classes, "lite": False, "ema_momentum": self.ema_momentum,
            "gate_reduction": self.gate_reduction, "align": self.align, "head_lr_mult": self.head_lr_mult,
            "model_names": self.model_names, "data_config": json_safe(self.data_config)})

    @classmethod
    def load(cls, out_dir) -> "ZooTuning":
        """Rebuild a non-lite ZooTuning written by :meth:`save` (``timm.create_model(arch)`` K times, then the
        saved state dict, strictly)."""
        import timm
        from safetensors.torch import load_file

        out = Path(out_dir)
        meta_path = out / "zootuning.json"
        if not meta_path.is_file():
            raise ConfigError(f"ZooTuning.load({str(out)!r}): no zootuning.json there; a lite run saves an "
                              "ordinary timm folder instead, load it with load_candidate('local-dir:...')")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise ConfigError(f"ZooTuning.load: {meta_path} has format {meta.get('format')!r}, expected {FORMAT!r}")
        sources = [timm.create_model(meta["architecture"], pretrained=False) for _ in range(meta["num_models"])]
        zt = cls(sources, int(meta["num_classes"]), lite=False, ema_momentum=meta["ema_momentum"],
                 gate_reduction=meta["gate_reduction"], align=meta["align"], head_lr_mult=meta["head_lr_mult"])
        zt.model.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
        zt.model_names = list(meta.get("model_names", zt.model_names))
        return zt.eval()

    def hparams(self) -> dict:
        params = dict(self.model.named_parameters())
        gate = sum(p.numel() for n, p in params.items() if ".gate." in n)
        align = sum(p.numel() for n, p in params.items() if n.endswith(".align"))
        return {"num_models": self.num_models, "models": self.model_names, "num_classes": self.num_classes,
                "lite": self.lite, "ema_momentum": self.ema_momentum, "gate_reduction": self.gate_reduction,
                "align": self.align, "head_lr_mult": self.head_lr_mult, "impl": self.impl,
                "gate_init": self.gate_init,
                "aggregated_convs": len(self.aggregated_convs),
                "aligned_convs": sum(1 for m in self.model.modules()
                                     if isinstance(m, AdaptiveAggregationConv2d) and m.aligned),
                "skipped_convs": list(self.skipped_convs), "shared_bns": len(self.shared_bns),
                "num_params": sum(p.numel() for p in params.values()), "num_params_gates": gate,
                "num_params_align": align, "num_params_source_backbone": self.source_num_params}
