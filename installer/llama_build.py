"""The one recipe for the llama.cpp engine's native code: a portable llama-cpp-python wheel.

llama.cpp builds for the build machine by default (`-march=native`): a wheel built on a
host with AVX-512 dies with SIGILL on an older one, and on a host with Intel AMX it takes
llama.cpp's AMX path, which crashes (tile-data permission is requested for the main
thread only). This recipe pins the version and the CPU instruction sets explicitly:
an x86-64 baseline with AVX2 (Haswell, 2013, and every server CPU since), never AMX.

Used by the Makefile, install.sh (source installs) and `appliance bundle build`, so
every wheel the appliance installs comes from here. Stdlib only: the Makefile runs it
before the virtual environment exists.

    python installer/llama_build.py [CACHE]   # builds if needed; prints the folder for pip --find-links
    python installer/llama_build.py --check   # the installed llama_cpp is that wheel: no AMX, nothing beyond it
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

VERSION = "0.3.36"  # pyproject.toml pins the same
DEFAULT_CACHE = Path(os.environ.get("APPLIANCE_WHEEL_CACHE") or "~/.cache/appliance/wheels").expanduser()
REQUIREMENT = f"llama-cpp-python=={VERSION}"

# Explicit instruction sets: nothing is detected from the build machine.
CMAKE_ARGS = (
    "-DGGML_NATIVE=OFF",
    "-DGGML_BACKEND_DL=OFF",
    "-DGGML_CPU_ALL_VARIANTS=OFF",
    "-DGGML_SSE42=ON",
    "-DGGML_AVX=ON",
    "-DGGML_F16C=ON",
    "-DGGML_FMA=ON",
    "-DGGML_AVX2=ON",
    "-DGGML_BMI2=ON",
    "-DGGML_AVX_VNNI=OFF",
    "-DGGML_AVX512=OFF",
    "-DGGML_AVX512_VBMI=OFF",
    "-DGGML_AVX512_VNNI=OFF",
    "-DGGML_AVX512_BF16=OFF",
    "-DGGML_AMX_TILE=OFF",
    "-DGGML_AMX_INT8=OFF",
    "-DGGML_AMX_BF16=OFF",
    # llamafile's sgemm computes batched F16 products wrongly in an AVX2 build of this
    # llama.cpp (KQ with an F16 KV cache: SmolLM2 answers "La femme de France" instead of
    # "Paris"); ggml's own kernels are right. tests/installer/test_llama_build.py checks.
    "-DGGML_LLAMAFILE=OFF",
)

# What the wheel's code executes, as /proc/cpuinfo names the flags; a bundle records
# them and an install on a CPU without one of them is refused up front.
CPU_FEATURES = ("sse4_2", "avx", "f16c", "fma", "avx2", "bmi2")

# Intel AMX tile instructions: none may appear in any library the appliance can load.
AMX_MNEMONIC = re.compile(r"\s(tilezero|ldtilecfg|sttilecfg|tileloadd|tileloaddt1|tilestored|tilerelease|tdp\w+)\s")


def recipe_key() -> str:
    """Names a wheel by its recipe, so a changed recipe never reuses an older build."""
    digest = hashlib.sha256("\n".join((REQUIREMENT, *CMAKE_ARGS)).encode()).hexdigest()[:12]
    return f"{VERSION}-{digest}"


def build_wheel(cache: Path) -> Path:
    """The folder holding this recipe's wheel under `cache`, building it first if absent.

    Built with pip's cache off, so no wheel built with another recipe is reused.
    """
    folder = cache / recipe_key()
    if list(folder.glob("llama_cpp_python-*.whl")):
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as staging:
        env = {**os.environ, "CMAKE_ARGS": " ".join(CMAKE_ARGS), "FORCE_CMAKE": "1"}
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir",
             "--no-binary", "llama-cpp-python", "--wheel-dir", staging, REQUIREMENT],
            env=env, check=True, stdout=sys.stderr,  # stdout is for the folder's path alone
        )
        built = list(Path(staging).glob("llama_cpp_python-*.whl"))
        if len(built) != 1:
            raise SystemExit(f"pip wheel left {len(built)} llama-cpp-python wheels in {staging}")
        folder.mkdir(exist_ok=True)
        os.replace(built[0], folder / built[0].name)  # atomic: a half-built wheel is never found
    return folder


def libraries(package_dir: Path) -> list[Path]:
    """Every shared library shipped inside the llama_cpp package folder."""
    return sorted(p for p in package_dir.rglob("*.so*") if p.is_file() and not p.is_symlink())


def amx_instructions(library: Path, limit: int = 5) -> list[str]:
    """Up to `limit` disassembled lines of `library` that use an AMX tile instruction."""
    if shutil.which("objdump") is None:
        raise RuntimeError("objdump (binutils) is needed to scan native libraries")
    found = []
    with subprocess.Popen(["objdump", "-d", "--no-show-raw-insn", str(library)],
                          stdout=subprocess.PIPE, text=True) as dump:
        for line in dump.stdout:
            if AMX_MNEMONIC.search(line):
                found.append(line.strip())
                if len(found) >= limit:
                    dump.kill()
                    break
    return found


def installed_problems() -> list[str]:
    """What is wrong with the llama_cpp package this Python imports: AMX code, or a build
    whose reported CPU features go beyond the recipe (a wheel from another recipe)."""
    import llama_cpp  # only in the appliance's environment, after pip install

    problems = []
    try:  # PEP 610: pip records the wheel file it installed from
        source = json.loads(importlib.metadata.distribution("llama-cpp-python").read_text("direct_url.json") or "{}")
    except importlib.metadata.PackageNotFoundError:
        source = {}
    if recipe_key() not in source.get("url", ""):
        problems.append(f"the installed llama-cpp-python is not this recipe's wheel ({recipe_key()}); "
                        f"it came from {source.get('url') or 'a package index or pip cache'}")
    libs = libraries(Path(llama_cpp.__file__).parent)
    if not libs:
        problems.append(f"no shared libraries found in {Path(llama_cpp.__file__).parent}")
    for lib in libs:
        if found := amx_instructions(lib, limit=1):
            problems.append(f"{lib.name} contains Intel AMX instructions ({found[0]})")
    info = llama_cpp.llama_print_system_info().decode()
    enabled = set(re.findall(r"(\w+) = 1", info))
    if extra := sorted(enabled & {"AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16", "AVX_VNNI", "AMX_INT8", "AMX_BF16"}):
        problems.append(f"llama.cpp was built with {', '.join(extra)}, beyond this recipe ({info.strip()})")
    return problems


def main(argv: list[str]) -> int:
    if argv == ["--check"]:
        problems = installed_problems()
        for problem in problems:
            print(f"llama_build: {problem}; rebuild with installer/llama_build.py", file=sys.stderr)
        return 1 if problems else 0
    if len(argv) > 1 or (argv and argv[0].startswith("-")):
        print("usage: " + "\n       ".join(line.strip() for line in __doc__.splitlines() if "llama_build.py" in line), file=sys.stderr)
        return 2
    print(build_wheel(Path(argv[0]).expanduser().resolve() if argv else DEFAULT_CACHE))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
