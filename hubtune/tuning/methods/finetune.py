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
* **Regularizers** (``regularizers = ("l2sp", "bss")``): the generic ones every method may declare
  (:class:`~hubtune.tuning.losses.SPRegularization`, :class:`~hubtune.tuning.losses.BatchSpectralShrinkage`,
  built by :meth:`~hubtune.tuning.Method.add_regularizers`).
* **L2-SP** (Li et al., ICML 2018): ``alpha/2 * sum ||w - w0||^2`` over the trainable backbone weights,
  toward the starting (pretrained) weights ``w0``, plus ``beta/2 * ||w_head||^2`` on the head.
* **BSS**, Batch Spectral Shrinkage (Chen et al., NeurIPS 2019): ``eta * sum_{i=1..k} sigma_{-i}^2``, the
  ``k`` smallest singular values of the batch's penultimate feature matrix ``(B, D)``; computed in float32
  (float64 on CPU), and skipped (0, with one warning) if the SVD fails or is not finite.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...errors import ConfigError
from ..method import Method, Setting, register_method
from ..models import new_head, penultimate_features


@register_method("finetune")
class FineTune(Method):
    """Fine-tune a pretrained timm model (or a spec, loaded by ``load_candidate``) on ``num_classes`` classes."""

    regularizers = ("l2sp", "bss")
    settings = {
        "freeze_backbone": Setting(False, "train the new head only", bool),
        "stage_lr_mults": Setting(None, "LR multiplier per backbone stage (timm's group_matcher), a list, or one "
                                        "number for the whole backbone", (float, list, tuple)),
        "pretrained": Setting(True, "load a spec's pretrained weights (false: train from scratch)", bool),
    }

    def __init__(self, model, num_classes: int, *, freeze_backbone: bool = False, stage_lr_mults=None,
                 pretrained: bool = True, **regularizers):
        super().__init__()
        nh = new_head(model, num_classes, pretrained=pretrained, who="FineTune")
        self.head_names, self.copy_report = nh.head_names, nh.copy_report
        self.model = nh.module.train()
        self.data_config, self.model_name = nh.hub.data_config, nh.hub.name
        self.num_classes = num_classes
        self.freeze_backbone = bool(freeze_backbone)

        params = dict(self.model.named_parameters())
        self._head_params = [n for n in params if n in self.head_names]
        self._backbone_params = [n for n in params if n not in self.head_names]
        if self.freeze_backbone:
            for n in self._backbone_params:
                params[n].requires_grad_(False)
        self._stages = self._find_stages()
        self.stage_lr_mults = self._check_mults(stage_lr_mults)
        # after freezing: L2-SP pulls the trainable backbone weights only
        self.add_regularizers(self.model, nh.source_state, self._head_params, **regularizers)
        w = self.regularizer_weights
        self.l2sp_alpha, self.l2sp_beta, self.bss_eta, self.bss_k = (w["l2sp_alpha"], w["l2sp_beta"], w["bss_eta"],
                                                                     w["bss_k"])

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
        """The weighted L2-SP term (0 when ``l2sp_alpha`` and ``l2sp_beta`` are 0)."""
        return self.regularize().get("l2sp", torch.zeros((), device=next(self.model.parameters()).device))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return penultimate_features(self.model, x)

    def losses(self, batch: dict) -> dict[str, torch.Tensor]:
        feats = self.features(batch["input"])
        logits = self.model.get_classifier()(feats)
        ce = F.cross_entropy(logits.float(), batch["target"])
        reg = self.regularize(feats)
        l2sp, bss = reg.get("l2sp", ce.new_zeros(())), reg.get("bss", ce.new_zeros(()))
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
