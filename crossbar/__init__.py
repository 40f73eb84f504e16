"""xbarsim's crossbar core: device physics, tiles, DAC/ADC and the Numba kernel."""
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _distribution_version

from . import presets
from .config import ADCConfig, DACConfig, DeviceConfig, IRDropConfig, SlicingConfig, TileConfig
from .grid import TileGrid
from .reference import ReferenceTile
from .tile import Tile, TileCounts

try:  # one version, setup.py's, as installed
    __version__ = _distribution_version("xbarsim")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["Tile", "TileGrid", "TileCounts", "ReferenceTile", "TileConfig", "DeviceConfig", "DACConfig",
           "ADCConfig", "IRDropConfig", "SlicingConfig", "presets", "__version__"]
