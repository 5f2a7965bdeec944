r"""Multi-level adversarial domain adaptation for segmentation: ``@register_method("seg-adversarial")``.

A labelled source domain and an unlabelled target domain (``--dataset SRC --target-dataset TGT``). One network
segments both; on each chosen feature level a domain discriminator tries to tell source from target through
its own gradient-reversal layer, so the network learns features (and outputs) the discriminator cannot tell
apart, while Dice + CE on the source keeps them useful:

.. math::
    L = L_{seg}(z^s, M(y^s)) + \sum_{l \in \text{levels}} w_l\, L_{adv,l}, \qquad
    L_{adv,l} = \tfrac12\big[\overline{\mathrm{BCE}}(D_l(R_l(a^s_l)), 1)
              + \overline{\mathrm{BCE}}(D_l(R_l(a^t_l)), 0)\big]

with :math:`M` the explicit source -> target class map, :math:`a_l` the features of level ``l`` (encoder skips
``enc*``, decoder stages ``dec*``) or, for ``out``, the **softmax of the logits** of the source and of the
target batch (output-space adaptation, Tsai et al., *Learning to Adapt Structured Output Space for Semantic
Segmentation*, CVPR 2018), :math:`D_l` a :class:`~hubtune.tuning.losses.adversarial.ConvDomainDiscriminator`
(a classifier head giving one domain logit per location) and :math:`R_l` level ``l``'s own
:class:`~hubtune.tuning.losses.adversarial.WarmStartGRL` (Ganin & Lempitsky, ICML 2015): λ warms from 0 to 1 as
``2/(1+exp(-α p)) - 1``, ``p`` the fraction of the run done; its step count and length are in the checkpoint.

What this does differently from Intel's Model Adapter (whose faults hubtune must not share), each tested in
``tests/test_segmentation_adaptation.py``:

* the output-space term sees the **target's** predictions (softmax of the target logits) against the source's,
  and its reversed gradient reaches the segmenter (Intel's compared the source's ground truth with the source's
  argmax: no target, no gradient);
* **one GRL per discriminator**, each advanced exactly once per optimizer step and restored on resume (Intel's
  shared one GRL between two discriminators: its warm-up advanced twice per step and restarted on resume);
* the discriminator has a **classifier head** (one logit), not pooled trunk channels read as logits;
* the source -> target class map is an explicit, validated setting (``class_map``), not hard-coded;
* a misspelled setting is a :class:`~hubtune.errors.ConfigError` that lists the accepted ones.

Settings beyond :class:`~hubtune.tuning.methods.seg_finetune.SegmentationMethod`'s: ``levels`` (names from the
network's :attr:`~hubtune.tuning.seg_models.SegNet.level_names`, or ``"all"``; default ``["out"]``),
``level_weights`` (``{level: w}``; default :data:`DEFAULT_WEIGHT_OUT` for ``out`` and
:data:`DEFAULT_WEIGHT_FEATURE` for feature levels), the discriminators' ``disc_hidden``, ``disc_layers``,
``disc_head`` and learning-rate multiplier ``disc_lr_mult``, and the warm-up's ``grl_alpha``, ``grl_max_iters``
(null: the run's length), and ``target_labeled`` (the first N target training images keep their masks and add
their own Dice + CE, in the target's classes: semi-supervised adaptation). The source and the target go through
the network as one batch (MONAI's networks
normalise per instance, so this changes nothing but speed).
"""
from __future__ import annotations

import torch

from ...errors import ConfigError
from ..losses.adversarial import ConvDomainDiscriminator, LevelAdversary, MultiLevelAdversarialLoss, WarmStartGRL
from ..method import Setting, register_method
from .adaptation import PairedDataset
from .seg_finetune import SegmentationMethod

__all__ = ["SegAdversarial", "SegPairedDataset", "DEFAULT_WEIGHT_OUT", "DEFAULT_WEIGHT_FEATURE"]

#: default weight of the output-space level and of a feature level
DEFAULT_WEIGHT_OUT = 1.0
DEFAULT_WEIGHT_FEATURE = 0.02


class SegPairedDataset(PairedDataset):
    """:class:`~hubtune.tuning.methods.adaptation.PairedDataset` of segmentation items that also carries the masks
    of the first ``labelled`` target items as ``"target_mask"`` (``-1`` everywhere for the other target items), so a
    few labelled target images join the supervised loss (``target_labeled``)."""

    def __init__(self, source, target, seed: int = 0, labelled: int = 0):
        super().__init__(source, target, seed=seed)
        if labelled > len(target):
            raise ConfigError(f"target_labeled={labelled} exceeds the {len(target)} target training images")
        self.labelled = int(labelled)

    def __getitem__(self, i: int) -> dict:
        s = self.source[i]
        j = self.target_index(i)
        t = self.target[j]
        item = {"input": s["input"], "target": s["target"], "target_input": t["input"]}
        if self.labelled:
            if "target" not in t:
                raise ConfigError("target_labeled > 0 needs target images with masks (masks/ in the target folder)")
            item["target_mask"] = t["target"] if j < self.labelled else torch.full_like(t["target"], -1)
        return item


@register_method("seg-adversarial")
class SegAdversarial(SegmentationMethod):
    """Multi-level adversarial adaptation of a segmentation network (encoder, decoder and output space)."""

    inputs = "paired"
    settings = {
        **SegmentationMethod.settings,
        "levels": Setting(("out",), "levels with a discriminator: out (softmax output space), enc0..encN, decN..dec1, "
                                   "or 'all'", (list, tuple, str)),
        "level_weights": Setting(None, f"weight per level, e.g. {{out: 1.0, enc4: 0.02}} (null: out "
                                       f"{DEFAULT_WEIGHT_OUT}, features {DEFAULT_WEIGHT_FEATURE})", dict),
        "disc_hidden": Setting(64, "width of the first discriminator layer (doubling per layer)", int),
        "disc_layers": Setting(4, "stride-2 convolutions of each discriminator", int),
        "disc_head": Setting("patch", "discriminator head: patch (a logit per location) or image", str),
        "disc_lr_mult": Setting(1.0, "the discriminators' LR multiplier", float),
        "grl_alpha": Setting(10.0, "steepness of each GRL's warm-up", float),
        "grl_max_iters": Setting(None, "steps of the warm-up (null: the run's total steps)", int),
        "target_labeled": Setting(0, "the first N target training images keep their masks and add Dice + CE in "
                                     "the target's classes (0: the target is unlabelled)", int),
    }

    def __init__(self, model, num_classes: int, *, levels=("out",), level_weights: dict | None = None,
                 disc_hidden: int = 64, disc_layers: int = 4, disc_head: str = "patch", disc_lr_mult: float = 1.0,
                 grl_alpha: float = 10.0, grl_max_iters: int | None = None, target_labeled: int = 0, **kwargs):
        super().__init__(model, num_classes, **kwargs)
        if isinstance(target_labeled, bool) or not isinstance(target_labeled, int) or target_labeled < 0:
            raise ConfigError(f"target_labeled={target_labeled!r} is invalid: give a whole number >= 0")
        self.target_labeled = target_labeled
        self.levels = self.net.check_levels(levels)
        weights = {lv: (DEFAULT_WEIGHT_OUT if lv == "out" else DEFAULT_WEIGHT_FEATURE) for lv in self.levels}
        if level_weights is not None:
            extra = sorted(set(map(str, level_weights)) - set(self.levels))
            if extra:
                raise ConfigError(f"level_weights names level(s) {extra} that are not in levels={self.levels}; add "
                                  "them to levels or drop their weights")
            weights.update({str(k): v for k, v in level_weights.items()})
        if isinstance(disc_lr_mult, bool) or not isinstance(disc_lr_mult, (int, float)) or disc_lr_mult < 0:
            raise ConfigError(f"disc_lr_mult={disc_lr_mult!r} is invalid: give a number >= 0")
        if grl_max_iters is not None and (isinstance(grl_max_iters, bool) or not isinstance(grl_max_iters, int)
                                          or grl_max_iters < 1):
            raise ConfigError(f"grl_max_iters={grl_max_iters!r} is invalid: give a whole number >= 1 or null")
        probe = 32 if self.spatial_dims == 3 else 64
        if self.roi_size is not None:
            probe = min(self.roi_size)
        channels = self.net.level_channels(probe)
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(self.seed + 1)  # the discriminators: seeded, and independent of the network's draws
        try:
            adversaries = {}
            for lv in self.levels:
                try:
                    disc = ConvDomainDiscriminator(channels[lv], self.spatial_dims, disc_hidden, disc_layers,
                                                   disc_head)
                    grl = WarmStartGRL(alpha=grl_alpha, lo=0.0, hi=1.0,
                                       max_iters=1000 if grl_max_iters is None else grl_max_iters)
                    adversaries[lv] = LevelAdversary(disc, grl, softmax=(lv == "out"))
                except ValueError as e:
                    raise ConfigError(f"seg-adversarial level {lv!r}: {e}") from None
            try:
                self.adversary = MultiLevelAdversarialLoss(adversaries, weights)
            except ValueError as e:
                raise ConfigError(f"seg-adversarial: {e}") from None
        finally:
            torch.random.set_rng_state(gen_state)
        self.disc_lr_mult, self.grl_max_iters = float(disc_lr_mult), grl_max_iters
        self._adv_hp = {"levels": self.levels, "level_weights": dict(self.adversary.weights),
                        "disc_hidden": disc_hidden, "disc_layers": disc_layers, "disc_head": disc_head,
                        "disc_lr_mult": self.disc_lr_mult, "grl_alpha": grl_alpha, "grl_max_iters": grl_max_iters,
                        "target_labeled": target_labeled}

    def on_train_start(self, total_steps: int) -> None:
        """Each level's GRL warm-up spans the run (``grl_max_iters=None``). Called after a resumed checkpoint is
        restored, so the restored step counts are kept."""
        if self.grl_max_iters is None:
            self.adversary.set_run_length(total_steps)
            self._adv_hp["grl_max_iters_run"] = max(1, int(total_steps))

    def grl_coeffs(self) -> dict[str, float]:
        return {lv: g.coeff for lv, g in self.adversary.grls().items()}

    def param_groups(self, lr: float) -> list[dict]:
        m = self.disc_lr_mult
        return super().param_groups(lr) + [
            {"params": [p for p in self.adversary.parameters() if p.requires_grad], "lr": lr * m, "lr_mult": m,
             "name": "discriminators"}]

    def losses(self, batch: dict) -> dict[str, torch.Tensor]:
        if "target_input" not in batch:
            raise ConfigError("method 'seg-adversarial' needs batches with 'target_input' (unlabelled target images) "
                              "besides 'input' and 'target'; wrap the datasets in PairedDataset")
        x_s, x_t = batch["input"], batch["target_input"]
        if x_s.shape[1:] != x_t.shape[1:]:
            raise ConfigError(f"source images {tuple(x_s.shape[1:])} and target images {tuple(x_t.shape[1:])} differ "
                              "in shape; give both domains the same size (or roi_size for volumes)")
        y = self.map_labels(batch["target"])
        n = x_s.shape[0]
        logits, feats = self.net.forward_features(torch.cat([x_s, x_t], dim=0), self.levels)
        sup = self.supervised(logits[:n], y)
        adv = self.adversary({k: v[:n].float() for k, v in feats.items()},
                             {k: v[n:].float() for k, v in feats.items()})
        coeff = next(iter(self.adversary.grls().values())).coeff
        if self.training:
            self.adversary.step()
        total = sup["seg"] + adv["total"]
        out = {}
        if "target_mask" in batch:  # a few labelled target images (target_labeled): their masks, in the target's
            tm = batch["target_mask"]  # classes (no class map); -1 marks the unlabelled ones
            rows = (tm.flatten(1) >= 0).all(1)
            if bool(rows.any()):
                sup_t = self.supervised(logits[n:][rows], tm[rows])
                total = total + sup_t["seg"]
                out["target_seg"] = sup_t["seg"].detach()
            else:
                out["target_seg"] = total.new_zeros(()).detach()
        out.update({"total": total, "dice_loss": sup["dice_loss"].detach(), "ce": sup["ce"].detach(),
                    "adv": adv["total"].detach(), "grl_coeff": total.new_tensor(coeff).detach()})
        for lv in self.levels:
            out[f"adv_{lv}"] = adv[lv].detach()
            out[f"domain_acc_{lv}"] = adv[f"domain_acc_{lv}"].detach()
        return out

    def hparams(self) -> dict:
        return dict(super().hparams(), **self._adv_hp)
