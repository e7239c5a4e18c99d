"""The llmir bundle format: strict safetensors I/O, the atomic bundle writer, the reader.

Part of the loader: imports only the standard library, numpy and llmirc.errors.
"""

from .reader import FORMAT, FORMAT_VERSION, MANIFEST, Bundle, is_bundle, open_bundle
from .safetensors import SafetensorsFile, SafetensorsWriter, open_safetensors, save_safetensors
from .writer import BundleWriter

__all__ = [
    "FORMAT", "FORMAT_VERSION", "MANIFEST", "Bundle", "BundleWriter", "SafetensorsFile",
    "SafetensorsWriter", "is_bundle", "open_bundle", "open_safetensors", "save_safetensors",
]
