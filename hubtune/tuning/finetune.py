"""Classic fine-tuning with L2-SP, BSS and per-stage learning rates: ``@register_method("finetune")``.

By default this is plain fine-tuning, as in timm and tllib (cross-entropy only): L2-SP and BSS are opt-in
(``l2sp_alpha``, ``l2sp_beta``, ``bss_eta`` default to 0; e.g. ``--method-arg l2sp_alpha=0.01
--method-arg l2sp_beta=0.01 --method-arg bss_eta=0.001``, the papers' values).

* **Weight transfer.** The target model is the source timm model with a new classifier
  (``reset_classifier(num_classes)``); every other tensor whose name and shape match is copied, and
  :attr:`FineTune.copy_report` lists what was copied, what is missing from the source, what had a different
  shape and what was re-initialised (the head).
* **Stages.** Backbone parameters are grouped with timm's own ``model.group_matcher(coarse=True)`` via
  ``timm.models.group_parameters`` (for a ResNet: stem, layer1, ..., layer4); the classifier (the module
  ``get_classifier()`` returns) is always its own group at LR x1.0. ``stage_lr_mults`` gives one multiplier per
  backbone group, in order (e.g. ``(0.1, 0.1, 0.2, 0.2, 0.3)`` for a ResNet); a model without a
  ``group_matcher`` has one backbone group. A single float applies to the whole backbone.
* **L2-SP** (Li et al., ICML 2018): ``alpha/2 * sum ||w - w0||^2`` over the trainable backbone weights,
  toward the starting (pretrained) weights ``w0``, plus ``beta/2 * ||w_head||^2`` on the head.
* **BSS**, Batch Spectral Shrinkage (Chen et al., NeurIPS 2019): ``eta * sum_{i=1..k} sigma_{-i}^2``, the
  ``k`` smallest singular values of the batch's penultimate feature matrix ``(B, D)``; computed in float32
  (float64 on CPU), and skipped (0, with one warning) if the SVD fails or is not finite.
"""
from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .method import Method, register_method


def transfer_weights(source_state: dict, target: torch.nn.Module, skip: set | frozenset = frozenset()) -> dict:
    """Copy every tensor of ``source_state`` into ``target`` whose name and shape match (names in ``skip``
    are left alone). Returns ``{"copied", "missing", "shape_mismatch", "unexpected", "skipped"}`` name lists."""
    report = {"copied": [], "missing": [], "shape_mismatch": [], "unexpected": [], "skipped": []}
    tsd = target.state_dict()
    new = {}
    for name, t in tsd.items():
        if name in skip:
            report["skipped"].append(name)
        elif name not in source_state:
            report["missing"].append(name)
        elif tuple(source_state[name].shape) != tuple(t.shape):
            report["shape_mismatch"].append(name)
        else:
            new[name] = source_state[name]
            report["copied"].append(name)
    report["unexpected"] = [n for n in source_state if n not in tsd]
    target.load_state_dict(new, strict=False)
    return report


def bss_penalty(features: torch.Tensor, k: int = 1) -> torch.Tensor:
    """``sum_{i=1..k} sigma_{-i}^2``: squares of the k smallest singular values of ``features`` (B, D).

    Computed in float64 on CPU and float32 elsewhere; returns 0 (and warns) if the SVD fails or is not finite."""
    f = features.reshape(features.shape[0], -1)
    f = f.double() if f.device.type == "cpu" else f.float()
    k = max(0, min(int(k), min(f.shape)))
    if k == 0:
        return f.new_zeros(()).float()
    try:
        s = torch.linalg.svdvals(f)  # descending
        out = (s[-k:] ** 2).sum()
        if not torch.isfinite(out):
            raise RuntimeError("non-finite singular values")
        return out.float()
    except RuntimeError as e:
        warnings.warn(f"BSS: the SVD of the batch features failed ({e}); the BSS term is 0 for this batch")
        return features.new_zeros(()).float()


def _head_names(model: torch.nn.Module) -> set[str]:
    head = model.get_classifier()
    for prefix, mod in model.named_modules():
        if mod is head:
            return {f"{prefix}.{n}" if prefix else n for n in head.state_dict()}
    return set()


@register_method("finetune")
class FineTune(Method):
    """Fine-tune a pretrained timm model (or a spec, loaded by ``load_candidate``) on ``num_classes`` classes."""

    def __init__(self, model, num_classes: int, *, freeze_backbone: bool = False,
                 stage_lr_mults=None, l2sp_alpha: float = 0.0, l2sp_beta: float = 0.0,
                 bss_eta: float = 0.0, bss_k: int = 1, pretrained: bool = True):
        super().__init__()
        if isinstance(model, str):
            from ..hub import load_candidate

            model = load_candidate(model, pretrained=pretrained).module
        if not hasattr(model, "reset_classifier") or not hasattr(model, "get_classifier"):
            raise ConfigError(f"FineTune needs a timm model (reset_classifier/get_classifier), got "
                              f"{type(model).__name__}")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ConfigError(f"FineTune num_classes={num_classes!r} is invalid: give a whole number >= 1")
        for nm, v in (("l2sp_alpha", l2sp_alpha), ("l2sp_beta", l2sp_beta), ("bss_eta", bss_eta)):
            if not isinstance(v, (int, float)) or v < 0:
                raise ConfigError(f"FineTune {nm}={v!r} is invalid: give a number >= 0 (0 disables it)")
        if not isinstance(bss_k, int) or bss_k < 1:
            raise ConfigError(f"FineTune bss_k={bss_k!r} is invalid: give a whole number >= 1")
        source_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        target = copy.deepcopy(model)
        target.reset_classifier(num_classes)
        self.head_names = _head_names(target)
        self.copy_report = transfer_weights(source_state, target, skip=self.head_names)
        self.model = target.train()
        self.num_classes = num_classes
        self.freeze_backbone = bool(freeze_backbone)
        self.l2sp_alpha, self.l2sp_beta = float(l2sp_alpha), float(l2sp_beta)
        self.bss_eta, self.bss_k = float(bss_eta), int(bss_k)

        params = dict(self.model.named_parameters())
        self._head_params = [n for n in params if n in self.head_names]
        self._backbone_params = [n for n in params if n not in self.head_names]
        if self.freeze_backbone:
            for n in self._backbone_params:
                params[n].requires_grad_(False)
        self._stages = self._find_stages()
        self.stage_lr_mults = self._check_mults(stage_lr_mults)
        # Starting weights for L2-SP, persistent buffers so a resumed run keeps the same anchor.
        self._w0_keys = {}
        if self.l2sp_alpha > 0:
            for n in self._backbone_params:
                if params[n].requires_grad:
                    key = "w0__" + n.replace(".", "__")
                    self.register_buffer(key, params[n].detach().clone())
                    self._w0_keys[n] = key

    # ---------------------------------------------------------------- stages
    def _find_stages(self) -> list[list[str]]:
        """Backbone parameter names per stage, in order, from timm's coarse group_matcher."""
        matcher = getattr(self.model, "group_matcher", None)
        backbone = set(self._backbone_params)
        if matcher is None:
            return [list(self._backbone_params)]
        from timm.models import group_parameters

        try:
            grouped = group_parameters(self.model, matcher(coarse=True))
        except Exception:  # a model whose matcher does not cover its parameters
            return [list(self._backbone_params)]
        stages = [[n for n in names if n in backbone] for _, names in sorted(grouped.items())]
        stages = [s for s in stages if s]
        covered = {n for s in stages for n in s}
        rest = [n for n in self._backbone_params if n not in covered]
        if rest:
            stages.append(rest)
        return stages

    def _check_mults(self, mults):
        if mults is None:
            return None
        if isinstance(mults, (int, float)):
            mults = (float(mults),) * len(self._stages)
        mults = tuple(float(m) for m in mults)
        if len(mults) != len(self._stages):
            firsts = ", ".join(s[0].split(".")[0] for s in self._stages)
            raise ConfigError(f"FineTune stage_lr_mults has {len(mults)} values but this model has "
                              f"{len(self._stages)} backbone stages ({firsts}); give one multiplier per stage")
        if any(m < 0 for m in mults):
            raise ConfigError(f"FineTune stage_lr_mults={mults} is invalid: multipliers must be >= 0")
        return mults

    @property
    def stages(self) -> list[list[str]]:
        return [list(s) for s in self._stages]

    def param_groups(self, lr: float) -> list[dict]:
        params = dict(self.model.named_parameters())
        groups = []
        mults = self.stage_lr_mults or (1.0,) * len(self._stages)
        for i, (names, m) in enumerate(zip(self._stages, mults)):
            ps = [params[n] for n in names if params[n].requires_grad]
            if ps:
                groups.append({"params": ps, "lr": lr * m, "lr_mult": m, "name": f"stage{i}"})
        head = [params[n] for n in self._head_params if params[n].requires_grad]
        groups.append({"params": head, "lr": lr, "lr_mult": 1.0, "name": "head"})
        return groups

    # ---------------------------------------------------------------- losses
    def l2sp(self) -> torch.Tensor:
        params = dict(self.model.named_parameters())
        dev = next(iter(params.values())).device
        loss = torch.zeros((), device=dev)
        if self.l2sp_alpha > 0 and self._w0_keys:
            sq = sum(((params[n].float() - getattr(self, k).float()) ** 2).sum() for n, k in self._w0_keys.items())
            loss = loss + 0.5 * self.l2sp_alpha * sq
        if self.l2sp_beta > 0:
            head = [params[n] for n in self._head_params if params[n].requires_grad]
            if head:
                loss = loss + 0.5 * self.l2sp_beta * sum((p.float() ** 2).sum() for p in head)
        return loss

    def features(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        f = m.forward_head(m.forward_features(x), pre_logits=True)
        return f.reshape(f.shape[0], -1)

    def losses(self, batch: dict) -> dict[str, torch.Tensor]:
        feats = self.features(batch["input"])
        logits = self.model.get_classifier()(feats)
        ce = F.cross_entropy(logits.float(), batch["target"])
        l2sp = self.l2sp()
        bss = (self.bss_eta * bss_penalty(feats, self.bss_k)) if self.bss_eta > 0 else ce.new_zeros(())
        return {"total": ce + l2sp + bss, "ce": ce.detach(), "l2sp": l2sp.detach(), "bss": bss.detach()}

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def model_to_save(self) -> torch.nn.Module:
        return self.model

    def hparams(self) -> dict:
        return {"num_classes": self.num_classes, "freeze_backbone": self.freeze_backbone,
                "stage_lr_mults": self.stage_lr_mults, "l2sp_alpha": self.l2sp_alpha, "l2sp_beta": self.l2sp_beta,
                "bss_eta": self.bss_eta, "bss_k": self.bss_k,
                "copy_report": {k: len(v) for k, v in self.copy_report.items()}}
