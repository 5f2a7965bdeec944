"""The method protocol: a method defines loss terms, the :class:`~hubtune.tuning.engine.Engine` owns the loop.

A new method is one file::

    @register_method("mymethod")
    class MyMethod(Method):
        def losses(self, batch):  # batch["input"], batch.get("target")
            ...
            return {"total": ce + reg, "ce": ce, "reg": reg}

        def predict(self, x):
            return self.model(x)

        def model_to_save(self):
            return self.model
"""
from __future__ import annotations

import torch

from ..registry import Registry

METHODS: Registry = Registry("tuning method")


def register_method(name: str):
    """Class decorator: registers a :class:`Method` subclass under ``name`` and sets ``cls.name``."""

    def decorator(cls):
        cls.name = name
        return METHODS.register(name)(cls)

    return decorator


class Method(torch.nn.Module):
    """Defines loss terms only; the Engine owns the loop.

    ``forward(batch)`` is ``losses(batch)`` so that a ``DistributedDataParallel`` wrapper (which hooks
    ``forward``) synchronises the gradients of every term.
    """

    name = ""
    #: TrainConfig fields this method trains best with (e.g. the authors' optimiser); :func:`hubtune.tune`
    #: applies them beneath any config file or explicit argument
    train_defaults: dict = {}
    #: the method holds several hub models (``btuning``, ``zootuning``, ``hubpathway``): built by
    #: ``cls.from_ranking(ranking, top_k, num_classes, **kwargs)`` or from a list of models, and exposes
    #: ``data_config`` (the config of the model whose transform feeds the batch)
    multi_model = False
    #: some parameters get no gradient in a step (routing): DDP then needs ``find_unused_parameters``
    sparse_parameters = False

    def losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """Loss terms of one batch; must include ``"total"`` (the one that is back-propagated).

        ``batch`` has ``"input"`` and, except for label-free methods, ``"target"``."""
        raise NotImplementedError

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        return self.losses(batch)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)``, used for evaluation."""
        raise NotImplementedError

    def param_groups(self, lr: float) -> list[dict]:
        """Optimizer parameter groups; the default is one group of every trainable parameter at ``lr``.

        A group's ``lr`` is its starting learning rate: the engine's scheduler scales every group by the
        same factor, so per-group multipliers are kept throughout."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": lr}]

    def model_to_save(self) -> torch.nn.Module:
        """The tuned model (a timm model), saved as ``model.safetensors`` + ``config.json``."""
        raise NotImplementedError

    def prepare(self, train_dataset, device=None) -> None:
        """Called by :func:`hubtune.tune` once before training, with the transformed training set; a method
        that needs a pass over the data first (B-Tuning fitting its student projection) does it here."""

    def save(self, out_dir) -> None:
        """Write the tuned model to ``out_dir``; the default saves :meth:`model_to_save` as a timm folder
        (``model.safetensors`` + ``config.json``, loadable as ``local-dir:OUT``). A method whose result is not
        one timm model (a pathway over several models, say) overrides this."""
        from .engine import save_timm_folder

        save_timm_folder(self.model_to_save(), out_dir)

    def on_train_start(self, total_steps: int) -> None:
        """Called by the engine once before the first step (after a resumed checkpoint is restored) with the
        run's total number of optimizer steps (epochs x steps per epoch); schedules measured in fractions of
        the run (the GRL warm-up of DANN/CDAN) use it."""

    def on_epoch_start(self, epoch: int, total_epochs: int) -> None:
        """Called by the engine before each epoch (0-based)."""

    def frozen_modules(self) -> dict[str, torch.nn.Module]:
        """Frozen, never-trained submodules (teachers), by attribute path (``{"teacher": self.teacher}``).

        The engine keeps their tensors out of ``checkpoint.pt`` (it records each one's identity instead); on
        resume the method rebuilds them itself (from its spec, as at the start) and the engine checks that the
        rebuilt module has the recorded identity. Default: none."""
        return {}

    def hparams(self) -> dict:
        """The method's hyper-parameters, written to ``report.json``."""
        return {}
