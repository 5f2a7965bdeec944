"""Domain-adversarial adaptation: ``@register_method("dann")`` and ``@register_method("cdan")``.

Unsupervised domain adaptation: labelled source images, unlabelled target images, evaluation on the
target domain's labelled test set. Both methods are one class, :class:`DomainAdversarial`:

* **Model.** A timm backbone (a model or a spec, loaded by ``load_candidate``), its classifier replaced by
  a new head for ``num_classes`` (every other tensor is kept), optionally preceded by a bottleneck
  (``Linear -> BatchNorm1d -> ReLU`` to ``bottleneck_dim``). The bottleneck is installed *inside* the timm
  model, in place of its classifier (``fc = Sequential(bottleneck, head)``), so ``model(x)`` gives the
  logits; without a bottleneck the tuned model is a plain timm model that ``load_candidate("local-dir:OUT")``
  loads back, with one its state dict has the extra ``fc.0.*``/``fc.1.*`` keys and must be loaded into
  the method (``DomainAdversarial(...).load_state_dict``).
* **Loss.** ``total = CE(source logits, source labels) + trade_off * adversarial``, the adversarial term
  being :class:`~hubtune.tuning.losses.DomainAdversarialLoss` (DANN; Ganin & Lempitsky, ICML 2015) on the
  (source, target) features, or :class:`~hubtune.tuning.losses.ConditionalDomainAdversarialLoss` (CDAN;
  Long et al., NeurIPS 2018) on (features, logits): multilinear map, randomized when
  ``features * classes > 4096`` (or as ``randomized`` says), entropy conditioning with
  ``entropy_conditioning=True`` (CDAN+E). Source and target pass through the backbone as one batch (as in
  tllib), so BatchNorm sees both domains.
* **GRL.** A :class:`~hubtune.tuning.losses.WarmStartGRL` whose coefficient rises from 0 to 1 as Ganin's
  schedule says, p being the fraction of training done: ``grl_max_iters=None`` (the default) takes the run's
  total number of steps from the engine (:meth:`DomainAdversarial.on_train_start`; 1000 until then, e.g. in your
  own loop), so the coefficient reaches ≈1 at the end of any run; an int fixes it. Every training-mode
  ``losses()`` call advances it by one step; the step count and ``max_iters`` are in the state dict, so a
  resumed run continues the schedule.
* **When it helps.** The features must be able to drop what tells the domains apart. An invertible feature
  map (a linear backbone on vectors, say) keeps the domains exactly as separable as the inputs, since the
  discriminator can undo it, so no step of the backbone confuses the discriminator and DANN/CDAN stay at
  source-only level; domains with hardly overlapping supports saturate the discriminator (vanishing
  reversed gradient); and the adversarial game needs a few hundred steps. On two moons rotated by 30
  degrees (a ReLU MLP, 480 SGD steps) DANN and CDAN gain 6-18 points over source-only
  (``tests/test_adaptation.py``).
* **Regularizers.** ``regularizers = ("bss", "l2sp")``: ``bss_eta`` adds Batch Spectral Shrinkage on the source
  features (DANN + BSS, as in tllib's examples), ``l2sp_alpha``/``l2sp_beta`` L2-SP; off by default. E.g.
  ``hubtune tune --method dann --method-arg bss_eta=0.001``.
* **Batches.** ``{"input": source images, "target": source labels, "target_input": target images}``;
  :class:`PairedDataset` makes them from two datasets for the :class:`~hubtune.tuning.engine.Engine` (and
  passes ``set_epoch`` on to both, for seeded augmentation).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from ..losses.adversarial import (ConditionalDomainAdversarialLoss, DomainAdversarialLoss, DomainDiscriminator,
                                  WarmStartGRL)
from ..method import Method, Setting, register_method
from ..models import check_num_classes, load_model, new_head, penultimate_features

__all__ = ["PairedDataset", "DomainAdversarial", "DANN", "CDAN"]


def _input_of(item):
    if isinstance(item, dict):
        return item["input"]
    if isinstance(item, (tuple, list)):
        return item[0]
    return item


class PairedDataset(torch.utils.data.Dataset):
    """Source items paired with unlabelled target inputs, for the Engine.

    ``source[i]`` is ``(input, label)`` (or ``{"input", "target"}``); ``target[j]`` is an input, an
    ``(input, label)`` pair (the label is ignored) or a dict with ``"input"``. Item ``i`` is
    ``{"input": source input i, "target": source label i, "target_input": target[perm[i % n_t]]}`` where
    ``perm`` is ``torch.randperm(n_t)`` drawn once from a generator seeded with ``seed``: deterministic
    from the index alone (so it works with any sampler, DataLoader workers and DDP), every target item is
    used once per ``n_t`` source items (the target set is cycled when it is smaller, and a random
    ``len(source)``-sized part of it is used when it is larger). The length is ``len(source)``; the Engine's
    per-epoch shuffle of the source indices re-mixes which pairs share a batch.
    """

    def __init__(self, source, target, seed: int = 0):
        if len(source) == 0 or len(target) == 0:
            raise ConfigError(f"PairedDataset needs non-empty source and target datasets, got "
                              f"{len(source)} and {len(target)} items")
        self.source, self.target, self.seed = source, target, int(seed)
        self.perm = torch.randperm(len(target), generator=torch.Generator().manual_seed(self.seed))

    def __len__(self) -> int:
        return len(self.source)

    def set_epoch(self, epoch: int) -> None:
        """Pass the epoch on to the source and target datasets (or the datasets they wrap), so seeded
        augmentation draws per (sample, epoch, seed); the pairing itself does not change."""
        from ..engine import set_epoch

        set_epoch(self.source, epoch)
        set_epoch(self.target, epoch)

    def target_index(self, i: int) -> int:
        return int(self.perm[i % len(self.perm)])

    def __getitem__(self, i: int) -> dict:
        item = self.source[i]
        if isinstance(item, dict):
            x, y = item["input"], item["target"]
        else:
            x, y = item
        return {"input": x, "target": y, "target_input": _input_of(self.target[self.target_index(i)])}


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


class DomainAdversarial(Method):
    """DANN (``conditional=False``) or CDAN (``conditional=True``) on a timm backbone.

    Parameters: ``model`` (timm model or spec), ``num_classes``; ``bottleneck_dim`` (None: no bottleneck);
    ``trade_off`` (weight of the adversarial term); ``hidden`` (discriminator width); ``grl_alpha``,
    ``grl_max_iters`` (the warm-up schedule: None = the run's total steps, from the engine); ``backbone_lr_mult`` (the backbone's LR multiplier; the head,
    bottleneck and discriminator train at the full LR); CDAN only: ``randomized``, ``randomized_dim``,
    ``entropy_conditioning``; ``seed`` (new head, bottleneck, discriminator and random map).
    """

    conditional = False
    inputs = "paired"
    regularizers = ("bss", "l2sp")
    settings = {
        "trade_off": Setting(1.0, "weight of the adversarial term", float),
        "bottleneck_dim": Setting(None, "a Linear-BN-ReLU bottleneck of this width before the head (null: none)",
                                  int),
        "hidden": Setting(1024, "width of the domain discriminator", int),
        "grl_alpha": Setting(10.0, "steepness of the gradient-reversal warm-up", float),
        "grl_max_iters": Setting(None, "steps of the warm-up (null: the run's total steps)", int),
        "backbone_lr_mult": Setting(0.1, "the backbone's LR multiplier (head and discriminator: x1)", float),
        "pretrained": Setting(True, "load a spec's pretrained weights", bool),
    }

    def __init__(self, model, num_classes: int, *, bottleneck_dim: int | None = None, trade_off: float = 1.0,
                 hidden: int = 1024, grl_alpha: float = 10.0, grl_max_iters: int | None = None,
                 backbone_lr_mult: float = 0.1, randomized: bool | None = None, randomized_dim: int = 1024,
                 entropy_conditioning: bool = False, pretrained: bool = True, seed: int = 0,
                 conditional: bool | None = None, **regularizers):
        super().__init__()
        if conditional is not None:
            self.conditional = bool(conditional)
        who = self.name or "DomainAdversarial"
        hm = load_model(model, pretrained=pretrained)
        if not hasattr(hm.module, "reset_classifier") or not hasattr(hm.module, "get_classifier"):
            raise ConfigError(f"{who} needs a timm model (reset_classifier/get_classifier), got "
                              f"{type(hm.module).__name__}")
        check_num_classes(num_classes, "DomainAdversarial")
        if bottleneck_dim is not None and (not isinstance(bottleneck_dim, int) or bottleneck_dim < 1):
            raise ConfigError(f"bottleneck_dim={bottleneck_dim!r} is invalid: give None or a whole number >= 1")
        for nm, v in (("trade_off", trade_off), ("backbone_lr_mult", backbone_lr_mult)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ConfigError(f"{nm}={v!r} is invalid: give a number >= 0")
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            nh = new_head(hm, num_classes, who=who)
            target = nh.module
            self.copy_report = nh.copy_report
            self.data_config, self.model_name = nh.hub.data_config, nh.hub.name
            width = int(getattr(target, "head_hidden_size", None) or target.num_features)
            head = target.get_classifier()
            head_path = next(n for n, m in target.named_modules() if m is head)
            if bottleneck_dim is not None:
                bottleneck = nn.Sequential(nn.Linear(width, bottleneck_dim), nn.BatchNorm1d(bottleneck_dim),
                                           nn.ReLU())
                head = nn.Linear(bottleneck_dim, num_classes)
                _set_submodule(target, head_path, nn.Sequential(bottleneck, head))
                width = bottleneck_dim
            self.model = target.train()
            self._head_path = head_path
            self.features_dim = width
            grl = WarmStartGRL(alpha=grl_alpha, lo=0.0, hi=1.0,
                               max_iters=1000 if grl_max_iters is None else grl_max_iters)
            if self.conditional:
                if randomized is None:
                    randomized = width * num_classes > 4096
                map_dim = randomized_dim if randomized else width * num_classes
                self.adversary = ConditionalDomainAdversarialLoss(
                    DomainDiscriminator(map_dim, hidden), grl, num_classes=num_classes, features_dim=width,
                    randomized=randomized, randomized_dim=randomized_dim,
                    entropy_conditioning=entropy_conditioning, seed=seed)
            else:
                self.adversary = DomainAdversarialLoss(DomainDiscriminator(width, hidden), grl)
        finally:
            torch.random.set_rng_state(gen_state)
        self.num_classes = num_classes
        self.bottleneck_dim = bottleneck_dim
        self.trade_off = float(trade_off)
        self.backbone_lr_mult = float(backbone_lr_mult)
        self.grl_max_iters = grl_max_iters
        self._hp = {"num_classes": num_classes, "bottleneck_dim": bottleneck_dim, "trade_off": self.trade_off,
                    "hidden": hidden, "grl_alpha": grl_alpha, "grl_max_iters": grl_max_iters,
                    "backbone_lr_mult": self.backbone_lr_mult, "seed": seed}
        if self.conditional:
            self._hp.update(randomized=self.adversary.randomized, randomized_dim=randomized_dim,
                            entropy_conditioning=bool(entropy_conditioning))
        head_params = {n for n, p in self.model.named_parameters()
                       if any(p is q for q in self.classifier().parameters())}
        self.add_regularizers(self.model, nh.source_state, head_params, **regularizers)
        self._hp.update(self.regularizer_weights)

    @classmethod
    def from_settings(cls, ctx):
        """As :meth:`Method.from_settings`, with the run's ``seed`` (new head, bottleneck, discriminator, random
        map)."""
        model = ctx.model if ctx.model is not None or ctx.ranking is None else ctx.best_of_ranking()
        if ctx.model is not None and ctx.ranking is not None:
            raise ConfigError("give either model= or ranking=, not both")
        if model is None:
            raise ConfigError("no model given; pass model= (a spec such as 'resnet18' or 'local-dir:PATH') or "
                              "ranking= (a `hubtune rank --out` folder) with top_k=")
        return cls(model, ctx.num_classes, seed=ctx.seed, **ctx.settings)

    def on_train_start(self, total_steps: int) -> None:
        """The GRL warm-up spans the run (``grl_max_iters=None``): p = steps done / ``total_steps``."""
        if self.grl_max_iters is None:
            self.grl.max_iters = max(1, int(total_steps))
            self._hp["grl_max_iters"] = self.grl.max_iters

    # ---------------------------------------------------------------- pieces
    @property
    def grl(self) -> WarmStartGRL:
        return self.adversary.grl

    @property
    def discriminator(self) -> nn.Module:
        return self.adversary.discriminator

    def classifier(self) -> nn.Module:
        """Pooled backbone features -> logits (bottleneck included when there is one)."""
        return self.model.get_submodule(self._head_path)

    def bottleneck(self) -> nn.Module:
        return self.classifier()[0] if self.bottleneck_dim is not None else nn.Identity()

    def head(self) -> nn.Module:
        return self.classifier()[1] if self.bottleneck_dim is not None else self.classifier()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The features the adversary sees: pooled backbone features, through the bottleneck if any."""
        return self.bottleneck()(penultimate_features(self.model, x))

    def param_groups(self, lr: float) -> list[dict]:
        head_ids = {id(p) for p in self.classifier().parameters()}
        backbone = [p for p in self.model.parameters() if p.requires_grad and id(p) not in head_ids]
        head = [p for p in self.classifier().parameters() if p.requires_grad]
        disc = [p for p in self.adversary.parameters() if p.requires_grad]
        m = self.backbone_lr_mult
        return [{"params": backbone, "lr": lr * m, "lr_mult": m, "name": "backbone"},
                {"params": head, "lr": lr, "lr_mult": 1.0, "name": "head"},
                {"params": disc, "lr": lr, "lr_mult": 1.0, "name": "discriminator"}]

    # ---------------------------------------------------------------- losses
    def losses(self, batch: dict) -> dict[str, torch.Tensor]:
        if "target_input" not in batch:
            raise ConfigError(f"method {self.name!r} needs batches with 'target_input' (unlabelled target "
                              "images) besides 'input' and 'target'; wrap the datasets in PairedDataset")
        x_s, x_t = batch["input"], batch["target_input"]
        n_s = x_s.shape[0]
        f = self.features(torch.cat([x_s, x_t], dim=0))
        logits = self.head()(f)
        f_s, f_t = f[:n_s], f[n_s:]
        l_s, l_t = logits[:n_s], logits[n_s:]
        ce = F.cross_entropy(l_s.float(), batch["target"])
        coeff = self.grl.coeff
        if self.conditional:
            adv = self.adversary(f_s.float(), f_t.float(), l_s.float(), l_t.float())
        else:
            adv = self.adversary(f_s.float(), f_t.float())
        if self.training:
            self.grl.step()
        transfer = adv["total"]
        reg = self.regularize(f_s)  # BSS on the source features (as tllib's DANN + BSS), L2-SP on the backbone
        total = ce + self.trade_off * transfer + sum(reg.values())
        return {"total": total, "ce": ce.detach(), "transfer": transfer.detach(),
                "domain_acc": adv["domain_acc"].detach(), "grl_coeff": ce.new_tensor(coeff).detach(),
                **{k: v.detach() for k, v in reg.items()}}

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def model_to_save(self) -> torch.nn.Module:
        return self.model

    def hparams(self) -> dict:
        return dict(self._hp, conditional=self.conditional,
                    copy_report={k: len(v) for k, v in self.copy_report.items()})


@register_method("dann")
class DANN(DomainAdversarial):
    """Domain-Adversarial Neural Network (Ganin & Lempitsky, ICML 2015); see :class:`DomainAdversarial`."""

    conditional = False


@register_method("cdan")
class CDAN(DomainAdversarial):
    """Conditional Domain Adversarial Network (Long et al., NeurIPS 2018); see :class:`DomainAdversarial`."""

    conditional = True
    settings = {**DomainAdversarial.settings,
                "randomized": Setting(None, "randomized multilinear map (null: when features x classes > 4096)",
                                      bool),
                "randomized_dim": Setting(1024, "width of the randomized multilinear map", int),
                "entropy_conditioning": Setting(False, "CDAN+E: weight samples by the certainty of their "
                                                       "prediction", bool)}
