"""Weights to conductance pairs, layers split across tiles, torch models on crossbars."""
from .batchnorm import fold_batchnorm
from .conductance import conductances_to_weights, reference_weight, weights_to_conductances
from .config import MappingConfig
from .copying import plain_copy
from .attention import AnalogMultiheadAttention
from .recurrent import AnalogRNNBase, AnalogRNNCellBase
from .convert import (ANALOG_LAYERS, AnalogModel, analog_type_for, convert, is_digital_bias, mapped_modules,
                      on_tiles, register_layer, tile_parameters)
from .conv import AnalogConv2d
from .conv3d import AnalogConv3d
from .conv_transpose import AnalogConvTranspose2d
from .layers import AnalogLayer, AnalogLinear
from .matrix import AnalogMatrix

__all__ = ["AnalogMatrix", "AnalogModel", "AnalogLayer", "AnalogLinear", "AnalogConv2d", "AnalogConv3d",
           "AnalogConvTranspose2d", "MappingConfig",
           "convert", "fold_batchnorm", "weights_to_conductances", "conductances_to_weights",
           "reference_weight", "ANALOG_LAYERS", "AnalogMultiheadAttention", "AnalogRNNBase", "AnalogRNNCellBase",
           "register_layer", "analog_type_for",
           "mapped_modules", "on_tiles", "tile_parameters", "is_digital_bias", "plain_copy"]
