"""Teacher services: a teacher runs as an inference service and students pipeline their batches through it.

* :mod:`hubtune.serving.client`: :class:`TeacherClient` (EDL's reader: windowed, ordered, failover, identity
  pinning, stall policy) and the :class:`Transport` protocol it speaks. Imports no Ray, so importing this
  package is cheap.
* :mod:`hubtune.serving.deployment` (the Ray Serve side) is imported only when used: Ray is optional.
"""
from .client import Pending, ReplicaError, TeacherClient, Transport

__all__ = ["TeacherClient", "ReplicaError", "Transport", "Pending"]

# The Ray Serve side (hubtune.serving.deployment) needs Ray: imported on first use of one of its names.
_DEPLOYMENT_NAMES = ("TeacherDeployment", "serve_teacher", "list_teachers", "scale_teacher", "stop_teacher",
                     "RayServeTransport", "ServedTeacher")
__all__ += list(_DEPLOYMENT_NAMES)


def __getattr__(name):
    if name in _DEPLOYMENT_NAMES:
        from . import deployment

        return getattr(deployment, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
