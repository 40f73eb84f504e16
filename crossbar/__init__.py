"""xbarsim's crossbar core: device physics, tiles, DAC/ADC and the Numba kernel."""
from . import presets
from .config import ADCConfig, DACConfig, DeviceConfig, TileConfig
from .reference import ReferenceTile
from .tile import Tile, TileCounts

__version__ = "0.1.0"

__all__ = ["Tile", "TileCounts", "ReferenceTile", "TileConfig", "DeviceConfig", "DACConfig",
           "ADCConfig", "presets", "__version__"]
