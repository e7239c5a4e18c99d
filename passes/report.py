"""What the passes did, for `llmirc compile --report` and the bundle's manifest."""

from __future__ import annotations


def note(ctx, what: str, n: int = 1) -> None:
    """Counts one rewrite (`what` reads like "onnx-fuse-norm: rms_norm"); a no-op for plain
    xDSL contexts, so the passes also run under xdsl-opt."""
    report = getattr(ctx, "report", None)
    if report is not None:
        report[what] += n
