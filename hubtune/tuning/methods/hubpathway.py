"""Hub-Pathway: data-dependent routing over a hub of pre-trained models: ``@register_method("hubpathway")``.

Shu, Cao, Zhang, Wang, Long, "Hub-Pathway: Transfer Learning from A Hub of Pre-trained Models", NeurIPS 2022
(arXiv:2206.03726). The authors' code could not be consulted here; every choice below not stated in the paper
is marked *(ours)*.

* **Models.** ``K >= 2`` timm models (different architectures allowed). Each keeps its backbone,
  ``f_e(x) = flatten(forward_head(forward_features(x), pre_logits=True))`` (the old classifier is dropped with
  ``reset_classifier(0)``), and gets a new head ``H_e = Linear(dim f_e, C)``. Inputs arrive prepared for
  model 0's data config; model ``e`` sees ``A_e(x)`` with ``A_e = InputAdapter(cfg_0, cfg_e)``.
* **Pathway generator** ``G``: a light network, input -> ``K`` logits. The default *(ours)* is
  :class:`PathwayCNN`: resize to 64x64, four conv3x3(stride 2)-BN-ReLU blocks of 16, 32, 64, 64 channels,
  global average pool, then two linear heads: the clean gate logits and the raw noise scale. ``generator`` may
  also be an ``nn.Module`` returning ``(B, K)`` logits (or a ``(clean, raw_noise)`` pair of them), or a timm
  model name, built with ``pretrained=False, num_classes=K`` (it sees the input as prepared for model 0).
* **Noisy top-k gating** (the paper's noisy pathway generator, after Shazeer et al., ICLR 2017):
  ``h(x) = G(x) + eps * softplus(r(x))``, ``eps ~ N(0, I)``, only in training and only with ``noise=True``.
  ``r(x)`` is the generator's second head, zero-initialised (std softplus(0) = 0.69 at the start). A generator
  that returns only the clean logits gets an input-independent learned ``r`` (one value per model, zeros at
  the start) *(ours)*. Pathway weights: the **full** softmax over all ``K`` (noisy) logits, kept on the
  ``k`` largest entries and exactly 0 elsewhere, *not* renormalised over the kept ones::

      p(x) = softmax(h(x))        (over all K)
      w_e(x) = p_e(x) if e in TopK(h(x), k) else 0

  as in Switch routing (Fedus et al., JMLR 2022: ``y = p_i(x) E_i(x)`` for the top-1 expert) *(ours: the paper
  writes the softmax over the kept logits)*. Why: with a softmax over the ``k`` kept logits alone, ``k = 1``
  gives ``w = 1`` for every sample, so the prediction does not depend on the generator and the task loss gives
  it no gradient (only the exploration term trains it). With the full softmax the kept weight ``p_e(x)`` moves
  with every logit at every ``k``: the task loss raises the probability of a model that predicts a sample well
  and lowers it otherwise. Rows sum to the probability mass of the kept models (1 when ``k = K``), so the
  aggregated logits are scaled by it; the heads are linear and learn the scale. At eval ``h = G(x)``.
* **Pathway routes.** Model ``e`` runs only on the samples whose top-k contains ``e`` (``w[:, e] > 0``
  except for float underflow); a model no sample picks is not called. ``last_routed[e]`` counts them. A
  model routed a *single* sample in training runs its BatchNorm layers on their running statistics for that
  call *(ours: batch statistics of one sample are undefined, and timm heads can end in a 1x1 map)*.
* **Pathway aggregation.** ``z(x) = sum_e w_e(x) * H_e(f_e(A_e(x)))``: a weighted sum of the models'
  *logits* *(ours: the paper aggregates the models' outputs; we take the outputs before the softmax, so*
  ``predict`` *returns logits that cross-entropy and argmax use directly)*.
* **Losses** (``total = ce + exploit_weight * exploit + explore_weight * explore``):

  - ``ce = CE(z(x), y)``, the task loss of the aggregated prediction (trains ``G`` through ``w``, at every k);
  - ``exploit`` (the paper's exploitation loss, "each model is further trained by specific data that activate
    it"): ``sum_e sum_{x: e in topk(x)} CE(H_e(f_e(A_e(x))), y) / (B * k)``, the mean over the ``B*k``
    activated (sample, model) pairs;
  - ``explore`` (the paper's exploration loss, keeps the generator from collapsing onto a few models):
    ``KL(p_bar || U_K) = log K - H(p_bar)`` with ``p_bar = mean_batch softmax(h(x))``, the batch-mean of the
    *full* softmax over the ``K`` (noisy) logits before top-k; the maximum-entropy regulariser, shifted by
    the constant ``log K`` so that it is 0 at a uniform use of the hub.

  Diagnostics ``route_frac_<e>`` (the fraction of the batch routed to model ``e``) are detached scalars.
* **Saving.** :meth:`HubPathway.save` writes ``model.safetensors`` (the whole state dict) and
  ``hubpathway.json``; :meth:`HubPathway.load` rebuilds it (``timm.create_model(arch, pretrained=False)``).
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..._io import json_safe, save_state_dict, write_json
from ...errors import ConfigError
from ..method import MultiModelMethod, Setting, register_method
from ..models import HubModel, InputAdapter, load_models, penultimate_features

FORMAT = "hubtune-hubpathway-v1"


class PathwayCNN(nn.Module):
    """The default pathway generator: ``x -> (clean logits, raw noise)``, both ``(B, K)``.

    ``x`` is resized (bilinear, antialiased) to ``size x size``; ``len(channels)`` conv3x3(stride 2)-BN-ReLU
    blocks; global average pool; ``gate = Linear(c, K)`` and ``noise = Linear(c, K)`` (zero-initialised, so
    the noise std starts at softplus(0) for every model)."""

    def __init__(self, num_models: int, channels=(16, 32, 64, 64), size: int = 64, in_chans: int = 3):
        super().__init__()
        self.size, self.channels = int(size), tuple(int(c) for c in channels)
        layers, c_in = [], in_chans
        for c in self.channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.gate = nn.Linear(c_in, num_models)
        self.noise = nn.Linear(c_in, num_models)
        nn.init.zeros_(self.noise.weight)
        nn.init.zeros_(self.noise.bias)

    def forward(self, x: torch.Tensor):
        if tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        f = self.features(x).mean(dim=(2, 3))
        return self.gate(f), self.noise(f)


class _Backbone(nn.Module):
    """A timm model without its classifier: ``x -> flatten(forward_head(forward_features(x), pre_logits=True))``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return penultimate_features(self.model, x)


@contextlib.contextmanager
def _bn_running_stats(module: nn.Module):
    """Within the block, ``module``'s BatchNorm layers normalise with their running statistics (eval mode) and
    do not update them: a model routed a single sample cannot take batch statistics from one value."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    for m in bns:
        m.eval()
    try:
        yield
    finally:
        for m in bns:
            m.train()


def _check_weight(name: str, v) -> float:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
        raise ConfigError(f"HubPathway {name}={v!r} is invalid: give a finite number >= 0")
    return float(v)


@register_method("hubpathway")
class HubPathway(MultiModelMethod):
    """Hub-Pathway over ``models`` (``K >= 2`` specs or timm modules) for ``num_classes`` classes; see the
    module docstring for the formulas. After each forward, ``last_weights`` holds the pathway weights
    ``(B, K)`` and ``last_routed[e]`` the number of samples model ``e`` processed."""

    sparse_parameters = True  # models no sample of the batch routes to get no gradient

    settings = {
        "k": Setting(1, "how many models each sample is routed to", int),
        "generator": Setting(None, "the pathway generator: null (a small CNN), a timm model name, or an nn.Module",
                             None),
        "noise": Setting(True, "noisy top-k gating in training", bool),
        "explore_weight": Setting(0.1, "weight of the exploration loss KL(mean routing || uniform)", float),
        "exploit_weight": Setting(1.0, "weight of the exploitation loss (each routed model's own CE)", float),
        "head_lr_mult": Setting(10.0, "the heads' LR multiplier", float),
        "generator_lr_mult": Setting(10.0, "the generator's LR multiplier", float),
        "pretrained": Setting(True, "load the specs' pretrained weights", bool),
    }

    def __init__(self, models, num_classes: int, *, k: int = 1, generator=None, noise: bool = True,
                 explore_weight: float = 0.1, exploit_weight: float = 1.0, head_lr_mult: float = 10.0,
                 generator_lr_mult: float = 10.0, pretrained: bool = True):
        super().__init__()
        hub = load_models(models, pretrained=pretrained, role="models")
        K = len(hub)
        if K < 2:
            raise ConfigError(f"HubPathway needs K >= 2 models, got K={K} ({hub[0].name}); give at least two "
                              "models, or use the 'finetune' method for one")
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= K:
            raise ConfigError(f"HubPathway k={k!r} is invalid with K={K} models: give a whole number with "
                              f"1 <= k <= {K}")
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ConfigError(f"HubPathway num_classes={num_classes!r} is invalid: give a whole number >= 1")
        self.explore_weight = _check_weight("explore_weight", explore_weight)
        self.exploit_weight = _check_weight("exploit_weight", exploit_weight)
        self.head_lr_mult = _check_weight("head_lr_mult", head_lr_mult)
        self.generator_lr_mult = _check_weight("generator_lr_mult", generator_lr_mult)
        self.num_models, self.k, self.num_classes, self.noise = K, k, num_classes, bool(noise)
        self.names = self.model_names = [h.name for h in hub]
        self.data_configs = [dict(h.data_config) for h in hub]
        self.data_config = self.data_configs[0]  # the batch is prepared for model 0

        backbones, heads, archs = [], [], []
        for h in hub:
            m = h.module
            if not all(hasattr(m, a) for a in ("forward_features", "forward_head", "reset_classifier")):
                raise ConfigError(f"HubPathway model {h.name!r} ({type(m).__name__}) is not a timm model "
                                  "(forward_features/forward_head/reset_classifier); give timm models or hub specs")
            m = copy.deepcopy(m)
            m.reset_classifier(0)
            dim = int(getattr(m, "head_hidden_size", None) or m.num_features)
            backbones.append(_Backbone(m))
            heads.append(nn.Linear(dim, num_classes))
            pcfg = getattr(m, "pretrained_cfg", None) or {}
            archs.append(pcfg.get("architecture"))
        self.architectures = archs
        self.backbones = nn.ModuleList(backbones)
        self.heads = nn.ModuleList(heads)
        self.adapters = nn.ModuleList(InputAdapter(self.data_configs[0], c) for c in self.data_configs)
        self.generator, self.generator_spec = self._build_generator(generator, K)
        # Input-independent raw noise scale, used only when the generator returns the clean logits alone.
        self.noise_raw = nn.Parameter(torch.zeros(K))
        self.last_routed: list[int] = [0] * K
        self.last_weights: torch.Tensor | None = None

    @staticmethod
    def _build_generator(generator, K: int):
        if generator is None:
            g = PathwayCNN(K)
            return g, {"type": "default", "channels": list(g.channels), "size": g.size}
        if isinstance(generator, str):
            import timm

            try:
                g = timm.create_model(generator, pretrained=False, num_classes=K)
            except RuntimeError as e:
                raise ConfigError(f"HubPathway generator={generator!r} is not a timm model name ({e}); give None "
                                  "(the default small CNN), a timm name such as 'resnet18' or an nn.Module "
                                  "returning (B, K) logits") from None
            return g, {"type": "timm", "name": generator}
        if isinstance(generator, nn.Module):
            return generator, {"type": "module", "class": type(generator).__name__}
        raise ConfigError(f"HubPathway generator={generator!r} is invalid: give None (the default small CNN), a "
                          "timm model name such as 'resnet18' or an nn.Module returning (B, K) logits")

    # ---------------------------------------------------------------- gating
    def _generator_out(self, x: torch.Tensor):
        """``(clean, raw_noise)``, both float32 ``(B, K)``."""
        out = self.generator(x)
        clean, raw = (out if isinstance(out, (tuple, list)) and len(out) == 2 else (out, None))
        want = (x.shape[0], self.num_models)
        for t in (clean, raw):
            if t is not None and (not torch.is_tensor(t) or tuple(t.shape) != want):
                shape = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
                raise ConfigError(f"HubPathway generator ({type(self.generator).__name__}) returned {shape}, "
                                  f"expected logits of shape {want} (batch, K={self.num_models}); give a "
                                  "generator with K outputs")
        if raw is None:
            raw = self.noise_raw.unsqueeze(0).expand(x.shape[0], -1)
        return clean.float(), raw.float()

    def gate(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"clean": G(x), "logits": h(x), "probs": softmax(h), "mask": top-k membership, "weights": w}``.

        ``h = G(x) + eps * softplus(r(x))`` in training with ``noise=True``, else ``G(x)``;
        ``w = softmax(h)`` (over all K) on the top-k entries of h, 0 elsewhere (see the module docstring)."""
        clean, raw = self._generator_out(x)
        h = clean
        if self.training and self.noise:
            h = clean + torch.randn_like(clean) * F.softplus(raw)
        probs = F.softmax(h, dim=1)
        top_i = h.topk(self.k, dim=1).indices
        mask = torch.zeros_like(h, dtype=torch.bool).scatter(1, top_i, True)
        w = probs * mask
        return {"clean": clean, "logits": h, "probs": probs, "mask": mask, "weights": w}

    # ---------------------------------------------------------------- routing
    def model_logits(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """``H_e(f_e(A_e(x)))``: model ``e``'s logits on the (already selected) rows ``x``."""
        return self.heads[e](self.backbones[e](self.adapters[e](x)))

    def _route(self, x: torch.Tensor):
        """``(gate dict, z, [(idx_e, logits_e) or None])``: runs each model on its activated rows only."""
        g = self.gate(x)
        w, mask = g["weights"], g["mask"]
        z = torch.zeros(x.shape[0], self.num_classes, device=x.device, dtype=torch.float32)
        per_model = []
        routed = []
        for e in range(self.num_models):
            idx = mask[:, e].nonzero(as_tuple=True)[0]
            routed.append(int(idx.numel()))
            if idx.numel() == 0:
                per_model.append(None)
                continue
            if self.training and idx.numel() == 1:
                with _bn_running_stats(self.backbones[e]):
                    logits = self.model_logits(e, x.index_select(0, idx)).float()
            else:
                logits = self.model_logits(e, x.index_select(0, idx)).float()
            z = z.index_add(0, idx, w.index_select(0, idx)[:, e:e + 1] * logits)
            per_model.append((idx, logits))
        self.last_routed = routed
        self.last_weights = w.detach()
        return g, z, per_model

    def losses(self, batch: dict) -> dict[str, torch.Tensor]:
        x, y = batch["input"], batch["target"]
        g, z, per_model = self._route(x)
        ce = F.cross_entropy(z, y)
        pairs = x.shape[0] * self.k
        exploit = sum(F.cross_entropy(lg, y.index_select(0, idx), reduction="sum")
                      for idx, lg in (p for p in per_model if p is not None)) / pairs
        p_bar = g["probs"].mean(0)
        explore = math.log(self.num_models) + (p_bar * torch.log(p_bar.clamp_min(1e-12))).sum()
        total = ce + self.exploit_weight * exploit + self.explore_weight * explore
        out = {"total": total, "ce": ce.detach(), "exploit": exploit.detach(), "explore": explore.detach()}
        for e, n in enumerate(self.last_routed):
            out[f"route_frac_{e}"] = torch.tensor(n / x.shape[0], device=x.device)
        return out

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Aggregated logits ``z(x) = sum_e w_e(x) * H_e(f_e(A_e(x)))`` (B, num_classes)."""
        return self._route(x)[1]

    # ---------------------------------------------------------------- optimisation and bookkeeping
    def param_groups(self, lr: float) -> list[dict]:
        groups = []
        for e, b in enumerate(self.backbones):
            groups.append({"params": [p for p in b.parameters() if p.requires_grad], "lr": lr, "lr_mult": 1.0,
                           "name": f"backbone_{e}"})
        groups.append({"params": [p for p in self.heads.parameters() if p.requires_grad],
                       "lr": lr * self.head_lr_mult, "lr_mult": self.head_lr_mult, "name": "heads"})
        gen = [p for p in self.generator.parameters() if p.requires_grad] + [self.noise_raw]
        groups.append({"params": gen, "lr": lr * self.generator_lr_mult, "lr_mult": self.generator_lr_mult,
                       "name": "generator"})
        return groups

    def model_to_save(self) -> nn.Module:
        return self

    def config(self) -> dict:
        """What :meth:`load` needs to rebuild the module (written as ``hubpathway.json``)."""
        return {"format": FORMAT, "architectures": list(self.architectures), "names": list(self.names),
                "data_configs": [json_safe(c) for c in self.data_configs],
                "num_classes": self.num_classes, "k": self.k, "generator": dict(self.generator_spec),
                "noise": self.noise, "explore_weight": self.explore_weight, "exploit_weight": self.exploit_weight,
                "head_lr_mult": self.head_lr_mult, "generator_lr_mult": self.generator_lr_mult}

    def save(self, out_dir) -> None:
        """Write ``model.safetensors`` (the state dict, atomically: temp name + ``os.replace``) and
        ``hubpathway.json``; :meth:`load` reads them back."""
        if any(a is None for a in self.architectures):
            bad = [n for n, a in zip(self.names, self.architectures) if a is None]
            raise ConfigError(f"HubPathway cannot save: models {bad} have no pretrained_cfg['architecture']; "
                              "build them with timm.create_model")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_state_dict(self, out / "model.safetensors")
        write_json(out / "hubpathway.json", self.config())

    @classmethod
    def load(cls, out_dir, *, generator: nn.Module | None = None, map_location="cpu") -> "HubPathway":
        """Rebuild a saved HubPathway: one ``timm.create_model(arch, pretrained=False)`` per model, then the
        saved state dict (strict). A custom-module generator must be given again as ``generator``."""
        import timm
        from safetensors.torch import load_file

        out = Path(out_dir)
        path = out / "hubpathway.json"
        if not path.is_file():
            raise ConfigError(f"{str(out)!r} holds no hubpathway.json; give a folder written by HubPathway.save")
        cfg = json.loads(path.read_text())
        if cfg.get("format") != FORMAT:
            raise ConfigError(f"{path} has format {cfg.get('format')!r}, expected {FORMAT!r}")
        gspec = cfg["generator"]
        if generator is None:
            if gspec["type"] == "default":
                generator = PathwayCNN(len(cfg["architectures"]), gspec["channels"], gspec["size"])
            elif gspec["type"] == "timm":
                generator = gspec["name"]
            else:
                raise ConfigError(f"{path} was saved with a custom generator ({gspec.get('class')}); pass "
                                  "HubPathway.load(..., generator=<a module of the same class>)")
        names = cfg.get("names", cfg["architectures"])
        hub = [HubModel(timm.create_model(a, pretrained=False), dict(dc), name)
               for a, dc, name in zip(cfg["architectures"], cfg["data_configs"], names)]
        obj = cls(hub, cfg["num_classes"], k=cfg["k"], generator=generator, noise=cfg["noise"],
                  explore_weight=cfg["explore_weight"], exploit_weight=cfg["exploit_weight"],
                  head_lr_mult=cfg["head_lr_mult"], generator_lr_mult=cfg["generator_lr_mult"])
        obj.load_state_dict(load_file(str(out / "model.safetensors"), device=str(map_location)), strict=True)
        return obj

    def hparams(self) -> dict:
        def count(mod) -> int:
            return sum(p.numel() for p in mod.parameters())

        per_model = [count(b) + count(h) for b, h in zip(self.backbones, self.heads)]
        gen = count(self.generator) + self.noise_raw.numel()
        return {"K": self.num_models, "k": self.k, "names": list(self.names), "num_classes": self.num_classes,
                "noise": self.noise, "explore_weight": self.explore_weight, "exploit_weight": self.exploit_weight,
                "head_lr_mult": self.head_lr_mult, "generator_lr_mult": self.generator_lr_mult,
                "generator": dict(self.generator_spec),
                "params": {"total": count(self), "per_model": per_model, "generator": gen}}
