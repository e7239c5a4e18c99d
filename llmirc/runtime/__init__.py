"""The loader: runs a compiled bundle with numpy + ctypes (no compiler dependencies).

    import llmirc.runtime as rt
    model = rt.load("model.llmir")
    model.generate([[1, 2, 3]], max_new_tokens=16)
"""

__all__ = ["Model", "load"]


def __getattr__(name: str):
    """Model and load, imported when first used: the chat-template renderer's child process
    (template_worker) imports this package's text modules without numpy."""
    if name in __all__:
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    """The module's names and the lazy ones (tab completion, help)."""
    return sorted({*globals(), *__all__})
