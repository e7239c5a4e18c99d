"""User-facing errors: one line, naming the file or option at fault.

The CLI prints `error: <message>` and exits 1 for these (2 for a UsageError, as for click's own
usage errors). Anything else is a bug in llmirc: the
CLI prints `internal error in <stage>: ...; please report` and exits 3 (the traceback only with
`--debug` or LLMIRC_DEBUG=1); `stage` names where it happened. This module is part of the
loader, so it imports nothing heavy.
"""

import contextlib


class LlmircError(Exception):
    """An error caused by the user's input (checkpoint, bundle, option), not by llmirc."""


class UsageError(LlmircError):
    """An option's value, or a combination of options, that no input could make right (an unknown
    dtype, --quant-method gptq without --calibration): a usage error, exit 2 on the command line."""


class CheckpointError(LlmircError):
    """A model checkpoint (config.json, safetensors, ONNX) is missing, malformed or unsupported."""


class BundleError(LlmircError):
    """A compiled bundle is missing, malformed, tampered with or from a newer llmirc."""


class RequestError(LlmircError):
    """A generation request the engine refuses for one of its parameters: `field` names it (the
    SamplingParams field: temperature, stop, allowed_token_ids, guided, ...), so that a server can name its
    own (vLLM's 400s name theirs as `param`)."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


class RuntimeLimitError(LlmircError):
    """A request does not fit the loaded model (KV cache full, context too long, bad token id), or
    a KV cache does not fit this machine's memory."""


@contextlib.contextmanager
def stage(name: str):
    """Tags an unexpected exception raised inside the block with the stage it came from
    (`internal_stage(e)`), innermost stage first; LlmircErrors pass through untouched."""
    try:
        yield
    except LlmircError:
        raise
    except Exception as e:
        if internal_stage(e) is None:
            with contextlib.suppress(AttributeError):  # an exception type without a __dict__
                e.llmirc_stage = name
        raise


@contextlib.contextmanager
def naming(path, *aliases):
    """A CheckpointError raised inside the block (a node's problem found deep in the ONNX importer or
    a pass, which knows the node, not the file) names `path` first, unless it names `path` or one of
    its `aliases` (the same file under another spelling) already."""
    try:
        yield
    except CheckpointError as e:
        if str(e).startswith(tuple(f"{p}:" for p in (path, *aliases))):
            raise
        raise CheckpointError(f"{path}: {e}") from None


def internal_stage(e: BaseException) -> str | None:
    """The stage (`stage(name)`) an unexpected exception came from, if known."""
    return getattr(e, "llmirc_stage", None)
