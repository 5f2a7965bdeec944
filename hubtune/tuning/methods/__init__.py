"""One file per method, each registered with ``@register_method(name)``: finetune, kd, adaptation (dann and cdan:
one class), btuning, zootuning, hubpathway.

Nothing here lists them: :data:`hubtune.tuning.METHODS` imports every module of this package (``pkgutil`` over
``__path__``) the first time it is read, so a new method is a new file in this folder (or a module named by
``HUBTUNE_PLUGINS``, or a ``hubtune.methods`` entry point).
"""
