"""Weights to conductance pairs, layers split across tiles, torch models on crossbars."""
from .batchnorm import fold_batchnorm
from .conductance import conductances_to_weights, reference_weight, weights_to_conductances
from .config import MappingConfig
from .convert import ANALOG_LAYERS, AnalogModel, convert
from .conv import AnalogConv2d
from .layers import AnalogLayer, AnalogLinear
from .matrix import AnalogMatrix

__all__ = ["AnalogMatrix", "AnalogModel", "AnalogLayer", "AnalogLinear", "AnalogConv2d", "MappingConfig",
           "convert", "fold_batchnorm", "weights_to_conductances", "conductances_to_weights",
           "reference_weight", "ANALOG_LAYERS"]
