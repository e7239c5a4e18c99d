"""Whole bundles compiled on this x86-64 host for 64-bit Arm Linux, run under qemu-user.

`llmirc compile --cpu-variants native,aarch64-generic,aarch64-dotprod` puts an aarch64 library
beside the host's in one bundle. This script runs that library: the loader (`llmirc.runtime`,
which needs only NumPy, ctypes and tokenizers) in an aarch64 CPython 3.11 under qemu-aarch64,
on a small random checkpoint compiled several ways (float32, bfloat16, --quant int8, --quant
int4), and compares each aarch64 target's logits and greedy tokens with the host library's on
the same bundle (and, for float32, with transformers):

    python tests/aarch64_model_check.py [--work DIR]

It needs, besides the test dependencies: qemu-aarch64 and aarch64-linux-gnu-gcc, and Debian's
arm64 libpython (`dpkg --add-architecture arm64; apt install qemu-user gcc-aarch64-linux-gnu
libpython3.11:arm64`). It builds an aarch64 `python` launcher linked to that libpython, and
fetches the aarch64 wheels of the loader's dependencies (NumPy, tokenizers, click) and Jinja2
from the package index into --work, beside a wheel of this checkout: the aarch64 CLI then runs
as `PYTHONPATH=WORK/site qemu-aarch64 -L / WORK/python -m llmirc.cli run B.llmir ...`.
Not part of the test suite (tests/test_quant_kernels.py runs the aarch64 kernels one by one,
where qemu and the cross compiler exist). Exits 1 when a comparison fails.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from helpers import hf_logits, make_checkpoint

REPO = Path(__file__).resolve().parent.parent
LIBPYTHON = Path("/usr/lib/aarch64-linux-gnu/libpython3.11.so.1.0")
WHEELS = ["numpy", "tokenizers", "click", "jinja2", "markupsafe"]  # the loader's, and chat templates'
TARGETS = ("cpu-aarch64-generic", "cpu-aarch64-dotprod")
TOKENS = [0, 5, 9, 200, 17, 3, 44, 91, 12, 7, 250, 300, 31, 64, 128, 2]
CASES = {  # name -> (compile options, relative RMS allowed against the host library)
    "float32": ([], 1e-5),
    "bfloat16": (["--dtype", "bfloat16"], 1e-3),
    "int8": (["--quant", "int8"], 1e-2),
    "int4": (["--quant", "int4", "--quant-keep", "none"], 1e-2),
}
RUN = """
import json, sys
import numpy as np
from llmirc.runtime import load
bundle, target, ids = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
m = load(bundle, target=target, threads=2)
np.save(sys.argv[4], m.score(ids))
print(json.dumps(m.generate([ids[:8]], max_new_tokens=12, ignore_eos=True)[0]))
"""


def missing() -> list[str]:
    absent = [t for t in ("qemu-aarch64", "aarch64-linux-gnu-gcc") if shutil.which(t) is None]
    return absent + ([str(LIBPYTHON)] if not LIBPYTHON.is_file() else [])


def prepare(work: Path) -> tuple[Path, Path]:
    """(the aarch64 python launcher, its site folder with the wheels and this checkout's llmirc)."""
    work.mkdir(parents=True, exist_ok=True)
    launcher = work / "python"
    if not launcher.is_file():
        main = work / "main.c"
        main.write_text("int Py_BytesMain(int, char **);\nint main(int c, char **v) { return Py_BytesMain(c, v); }\n")
        subprocess.run(["aarch64-linux-gnu-gcc", str(main), "-o", str(launcher), f"-l:{LIBPYTHON.name}",
                        f"-L{LIBPYTHON.parent}"], check=True)
    wheels = work / "wheels"
    if not all(any(wheels.glob(f"{name}-*.whl")) for name in WHEELS):
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary", ":all:", "--no-deps",
                        "--python-version", "311", "--platform", "manylinux2014_aarch64", "--platform",
                        "manylinux_2_28_aarch64", "-d", str(wheels), *WHEELS], check=True)
    site = work / "site"
    shutil.rmtree(site, ignore_errors=True)
    for wheel in wheels.glob("*.whl"):
        zipfile.ZipFile(wheel).extractall(site)
    # this checkout's llmirc, laid out as pyproject.toml's package-dir maps it (no build/ folder left here)
    package_dir = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for package, folder in sorted(package_dir.items()):
        shutil.copytree(REPO / folder, site.joinpath(*package.split(".")), dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
    return launcher, site


def run_aarch64(launcher: Path, site: Path, bundle: Path, target: str, out: Path) -> list[int]:
    r = subprocess.run(["qemu-aarch64", "-L", "/", str(launcher), "-c", RUN, str(bundle), target, json.dumps(TOKENS),
                        str(out)], capture_output=True, text=True, env={"PYTHONPATH": str(site)}, timeout=900,
                       check=False)
    if r.returncode != 0:
        raise RuntimeError(f"{target} under qemu: exit {r.returncode}\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def rel_rms(a, b) -> float:
    return float(np.sqrt(((a - b) ** 2).mean() / (b ** 2).mean()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "llmirc" / "aarch64")
    args = ap.parse_args()
    if missing():
        print(f"cannot run: missing {', '.join(missing())} (see this script's docstring)")
        return 2
    from llmirc.runtime import load

    launcher, site = prepare(args.work)
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = make_checkpoint(tmp / "ckpt", "llama", tokenizer=True)
        for case, (options, tol) in CASES.items():
            bundle = tmp / f"{case}.llmir"
            subprocess.run([sys.executable, "-m", "llmirc.cli", "compile", str(tmp / "ckpt"), "-o", str(bundle), "-q",
                            "--cpu-variants", "native,aarch64-generic,aarch64-dotprod", *options], check=True)
            host = load(bundle)
            ref, ref_tokens = host.score(TOKENS), host.generate([TOKENS[:8]], max_new_tokens=12, ignore_eos=True)[0]
            for target in TARGETS:
                tokens = run_aarch64(launcher, site, bundle, target, tmp / "out.npy")
                got = np.load(tmp / "out.npy")
                err = rel_rms(got, ref)
                ok = err <= tol and tokens == ref_tokens
                extra = f", against transformers {rel_rms(got, hf_logits(model, TOKENS)):.1e}" if case == "float32" else ""
                print(f"{case:9} {target:20} logits vs the host library {err:.1e} (allowed {tol:.0e}){extra}; "
                      f"greedy tokens {'equal' if tokens == ref_tokens else f'DIFFER: {tokens} vs {ref_tokens}'}"
                      f"{'' if ok else '  FAILED'}")
                failed += not ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
