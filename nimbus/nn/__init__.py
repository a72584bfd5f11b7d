"""Networks: layers, NimbusLayer, training, the conversion pipeline, data loaders."""
from . import data  # noqa: F401
