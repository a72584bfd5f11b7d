"""Networks: layers, NimbusLayer, training, the conversion pipeline (its recipe in
:mod:`nimbus.nn.recipe`), the compiled inference runtime, data loaders."""
from . import data  # noqa: F401
from .layers import (BatchNorm, Conv2d, Dropout, Flatten, Linear, Module, NimbusLayer,  # noqa: F401
                     ReLU, Sequential)
from .train import accuracy, evaluate, fit  # noqa: F401
from . import recipe  # noqa: F401
from .convert import Conversion, ConversionReport, convert  # noqa: F401
from .fold import fold  # noqa: F401
from .runtime import CompiledModel, compile  # noqa: F401

__all__ = ["Linear", "Conv2d", "BatchNorm", "ReLU", "Flatten", "Dropout", "Sequential",
           "NimbusLayer", "Module", "fit", "accuracy", "evaluate", "convert", "Conversion",
           "ConversionReport", "recipe", "fold", "compile", "CompiledModel", "data"]
