"""The loader runs a bundle with none of the compiler's dependencies importable."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from helpers import make_checkpoint
from llmirc.driver import CompileOptions, Progress, compile_model

BLOCKED = ("xdsl", "llvmlite", "triton", "onnx", "torch", "transformers", "iree", "safetensors")


@pytest.mark.slow
def test_loader_runs_without_compiler_dependencies(tmp_path):
    make_checkpoint(tmp_path / "ckpt", "llama", tokenizer=True)
    bundle = tmp_path / "m.llmir"
    compile_model(tmp_path / "ckpt", bundle, CompileOptions(cpu_variants=("native",)), Progress(None))
    script = textwrap.dedent(f"""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {BLOCKED!r}:
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        import llmirc.runtime as rt
        from llmirc.cli import main
        m = rt.load({str(bundle)!r})
        out = m.generate([[0, 5, 9], [3]], max_new_tokens=4)
        assert [len(o) for o in out] == [4, 4], out
        assert m.score([0, 5, 9]).shape == (3, 384)
        print(m.tokenizer.decode(out[0]))
        sys.argv = ["llmirc", "run", {str(bundle)!r}, "--prompt", "the quick", "--max-new-tokens", "3"]
        main()
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_dir_lists_the_lazily_imported_names():
    """load and Model are imported on first use; dir() (tab completion) lists them all the same."""
    import llmirc.runtime as rt

    assert {"load", "Model"} <= set(dir(rt))
