"""The loader: runs a compiled bundle with numpy + ctypes (no compiler dependencies).

    import llmirc.runtime as rt
    model = rt.load("model.llmir")
    model.generate([[1, 2, 3]], max_new_tokens=16)
"""

from .model import Model, load

__all__ = ["Model", "load"]
