"""Models of every kind: overtile checkpoints, TorchScript, ONNX and bioimage.io packages.

:func:`describe` detects a model's kind from its file, reads it safely (no pickle from a
foreign file) and measures its geometry (:mod:`pipeline.models.probe`); :func:`load` builds
it on a worker; :func:`export` writes an overtile U-Net for other tools. Tiling and the jobs
see one interface, :class:`Model`, whatever the kind.
"""

from pipeline.models.export import export
from pipeline.models.kinds import KIND_NAMES, Model, ModelInfo, describe, detect, load, logit_activation, model_digest, stamp

__all__ = ["KIND_NAMES", "Model", "ModelInfo", "describe", "detect", "export", "load", "logit_activation", "model_digest", "stamp"]
