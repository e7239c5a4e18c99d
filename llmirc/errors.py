"""User-facing errors: one line, naming the file or option at fault.

The CLI prints `error: <message>` and exits 1 for these; anything else is a bug and
keeps its traceback. This module is part of the loader, so it imports nothing heavy.
"""


class LlmircError(Exception):
    """An error caused by the user's input (checkpoint, bundle, option), not by llmirc."""


class CheckpointError(LlmircError):
    """A model checkpoint (config.json, safetensors, ONNX) is missing, malformed or unsupported."""


class BundleError(LlmircError):
    """A compiled bundle is missing, malformed, tampered with or from a newer llmirc."""


class RuntimeLimitError(LlmircError):
    """A request does not fit the loaded model (KV cache full, context too long, bad token id)."""
