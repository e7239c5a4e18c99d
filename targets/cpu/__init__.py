"""CPU target: kernels generated with llvmlite, linked into a shared library (see target.py)."""
