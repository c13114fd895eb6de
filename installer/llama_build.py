"""The one recipe for the llama.cpp engine's native code: a portable `llama-server` in a wheel.

llama.cpp builds for the build machine by default (`-march=native`): a binary built on a
host with AVX-512 dies with SIGILL on an older one, and on a host with Intel AMX it takes
llama.cpp's AMX path, which crashes (tile-data permission is requested for the main
thread only). This recipe pins the source and the CPU instruction sets explicitly:
an x86-64 baseline with AVX2 (Haswell, 2013, and every server CPU since), never AMX,
never AVX-512.

The source is the llama-cpp-python sdist pinned below (by version and SHA-256): it carries
the whole llama.cpp tree under vendor/llama.cpp. Only llama.cpp's own C++ server,
`llama-server`, is built from it, linked statically to llama and ggml, CPU only (no GPU
offload: CUDA builds are not made by this recipe), with no network code and no web UI
(the appliance installs offline). The binary is packed into a small platform wheel that
this module writes itself:

    appliance_llama_server-0.3.36+<recipe hash>-py3-none-linux_x86_64.whl
        appliance_llama_server/__init__.py    binary() -> Path, build_info() -> dict
        appliance_llama_server/bin/llama-server
        appliance_llama_server/build.json     llama.cpp commit, recipe key, CPU features, ...
        appliance_llama_server/licenses/      llama.cpp's MIT licence and its vendored ones

Its version is a PEP 440 local version, so `appliance-llama-server==0.3.36` in pyproject.toml
matches it. Wheels are kept per recipe in ~/.cache/appliance/wheels/<recipe key>/
(APPLIANCE_WHEEL_CACHE overrides): a changed recipe never reuses an older build.

The same sdist's Python side, llama.cpp's own conversion scripts, goes into a second,
pure-Python wheel, copied as they are (nothing is compiled), so that fine-tuning turns a
PEFT LoRA adapter into the GGUF adapter this llama-server applies (`--lora`) with the
converter of the same llama.cpp, offline:

    appliance_llama_convert-0.3.36+<recipe hash>-py3-none-any.whl
        appliance_llama_convert/__init__.py   script(name) -> Path, build_info() -> dict
        appliance_llama_convert/build.json    the sdist and the files copied
        appliance_llama_convert/llama.cpp/    convert_lora_to_gguf.py, convert_hf_to_gguf.py,
                                              conversion/, gguf-py/, LICENSE

Its own recipe key (the sdist, the files copied, the package code) names its folder,
~/.cache/appliance/wheels/<version>-convert-<hash>/, so the server's key is unchanged. The
scripts need torch and transformers, which the appliance's `train` extra brings.

Used by the Makefile, install.sh (source installs) and `appliance bundle build`, so every
llama.cpp binary the appliance installs comes from here. Stdlib only: the Makefile runs
it before the virtual environment exists (it needs pip, cmake, ninja, a C++ compiler and
objdump).

    python installer/llama_build.py [CACHE]            # builds if needed; prints the folder for pip --find-links
    python installer/llama_build.py --convert [CACHE]  # the same for the conversion scripts' wheel (nothing compiled)
    python installer/llama_build.py --check            # the installed llama-server is that build: no AMX, no AVX-512, runs;
                                                       # the installed conversion scripts are their wheel's
"""
from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

VERSION = "0.3.36"  # pyproject.toml pins appliance-llama-server==VERSION
REQUIREMENT = f"llama-cpp-python=={VERSION}"  # the sdist: its vendor/llama.cpp is what is built
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
DISTRIBUTION = "appliance-llama-server"
PACKAGE = "appliance_llama_server"
TARGET = "llama-server"
WHEEL_TAG = "py3-none-linux_x86_64"
DEFAULT_CACHE = Path(os.environ.get("APPLIANCE_WHEEL_CACHE") or "~/.cache/appliance/wheels").expanduser()

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

# What is built: one self-contained server binary, llama and ggml linked in statically.
SERVER_CMAKE_ARGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    # No network code: models are local files; the appliance installs offline.
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    # The server alone; no web UI (the prebuilt one would be downloaded at configure time).
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
)

# What the binary's code executes, as /proc/cpuinfo names the flags; a bundle records
# them and an install on a CPU without one of them is refused up front.
CPU_FEATURES = ("sse4_2", "avx", "f16c", "fma", "avx2", "bmi2")

# Intel AMX tile instructions, and AVX-512 code (a zmm register, a mask register k0-k7, or
# xmm16-31/ymm16-31, which exist only with AVX-512's EVEX encoding): none may appear in the binary.
AMX_MNEMONIC = re.compile(r"\s(tilezero|ldtilecfg|sttilecfg|tileloadd|tileloaddt1|tilestored|tilerelease|tdp\w+)\s")
AVX512_REGISTER = re.compile(r"%(zmm\d+|k[0-7]|[xy]mm(1[6-9]|2\d|3[01]))\b")

# The wheel's Python code. Part of the recipe: a changed package is a new wheel.
PACKAGE_INIT = '''\
"""llama.cpp's OpenAI-compatible server, `llama-server`, built portable by the appliance.

Built by the appliance's installer/llama_build.py from the llama.cpp tree of a pinned
llama-cpp-python sdist: x86-64 with AVX2, no AVX-512, no Intel AMX, CPU only.
"""

from __future__ import annotations

import json
from pathlib import Path

_HERE = Path(__file__).resolve().parent


def binary() -> Path:
    """The llama-server executable in this package."""
    return _HERE / "bin" / "llama-server"


def build_info() -> dict:
    """How the binary was built (build.json): llama.cpp's commit, the recipe key, the CPU
    features its code needs (/proc/cpuinfo names), gpu_offload, and the CMake arguments."""
    return json.loads((_HERE / "build.json").read_text(encoding="utf-8"))
'''

# The conversion scripts' wheel: what it copies of the llama.cpp tree, as they are, into
# its package's llama.cpp/ folder. The scripts import conversion/ and gguf-py/ from beside
# themselves (not the installed gguf package); torch and transformers come from the
# appliance's `train` extra, so the wheel asks only for what gguf-py imports.
CONVERT_DISTRIBUTION = "appliance-llama-convert"
CONVERT_PACKAGE = "appliance_llama_convert"
CONVERT_TAG = "py3-none-any"
CONVERT_FILES = ("convert_lora_to_gguf.py", "convert_hf_to_gguf.py", "conversion", "gguf-py", "LICENSE")
CONVERT_REQUIRES = ("numpy", "pyyaml", "tqdm")

CONVERT_INIT = '''\
"""llama.cpp's own conversion scripts, from the same pinned llama.cpp tree as the appliance's
llama-server (installer/llama_build.py), so that what they write is what that server reads.

Run one with this Python, as a program: `[sys.executable, str(script("convert_lora_to_gguf.py")), ...]`.
They import conversion/ and gguf-py/ from beside themselves (unless NO_LOCAL_GGUF is set),
and need torch and transformers (the appliance's `train` extra).
"""

from __future__ import annotations

import json
from pathlib import Path

_HERE = Path(__file__).resolve().parent
TREE = _HERE / "llama.cpp"


def script(name: str) -> Path:
    """The path of one of llama.cpp's scripts in this package: "convert_lora_to_gguf.py" (the
    .py may be left out), "convert_hf_to_gguf.py"."""
    path = TREE / (name if name.endswith(".py") else f"{name}.py")
    if path.parent != TREE or not path.is_file():
        raise FileNotFoundError(f"{name!r} is not one of the llama.cpp scripts in {TREE}")
    return path


def build_info() -> dict:
    """What this package holds (build.json): the sdist it was copied from and the files copied."""
    return json.loads((_HERE / "build.json").read_text(encoding="utf-8"))
'''

_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed: the same binary always packs into the same wheel
WHEEL_LAYOUT = "1"  # part of the recipe: bump it when write_wheel() packs differently


def recipe_key() -> str:
    """Names a build by its recipe, so a changed recipe never reuses an older build."""
    recipe = (REQUIREMENT, SDIST_SHA256, TARGET, WHEEL_TAG, WHEEL_LAYOUT, *cmake_args(), PACKAGE_INIT)
    digest = hashlib.sha256("\n".join(recipe).encode()).hexdigest()[:12]
    return f"{VERSION}-{digest}"


def cmake_args() -> tuple[str, ...]:
    """Every argument the build is configured with: the instruction sets, then what is built."""
    return (*CMAKE_ARGS, *SERVER_CMAKE_ARGS)


def wheel_version() -> str:
    """0.3.36+<recipe hash>: a local version, so ==0.3.36 matches it."""
    return f"{VERSION}+{recipe_key().rsplit('-', 1)[1]}"


def convert_key() -> str:
    """Names the conversion scripts' wheel by its own recipe: the sdist, what is copied, the package code."""
    recipe = (REQUIREMENT, SDIST_SHA256, CONVERT_TAG, WHEEL_LAYOUT, *CONVERT_FILES, *CONVERT_REQUIRES, CONVERT_INIT)
    digest = hashlib.sha256("\n".join(recipe).encode()).hexdigest()[:12]
    return f"{VERSION}-convert-{digest}"


def convert_version() -> str:
    """0.3.36+<convert recipe hash>, which covers the sdist's SHA-256: ==0.3.36 matches it."""
    return f"{VERSION}+{convert_key().rsplit('-', 1)[1]}"


def _run(cmd: list[str], **kwargs) -> None:
    """Run a build step with its output on stderr (stdout is for the folder's path alone)."""
    print("llama_build: " + " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, stdout=sys.stderr, **kwargs)


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_source(dest: Path) -> Path:
    """Download the pinned sdist into `dest`, check its SHA-256, unpack it; return its llama.cpp tree."""
    _run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "--disable-pip-version-check",
          "-d", str(dest), REQUIREMENT])
    sdists = list(dest.glob("llama_cpp_python-*.tar.gz"))
    if len(sdists) != 1:
        raise SystemExit(f"llama_build: pip download left {len(sdists)} llama-cpp-python sdists in {dest}")
    if (got := _sha256(sdists[0])) != SDIST_SHA256:
        raise SystemExit(f"llama_build: {sdists[0].name} has SHA-256 {got}, the recipe pins {SDIST_SHA256}")
    with tarfile.open(sdists[0]) as tar:
        if hasattr(tarfile, "data_filter"):  # Python 3.11.4+: no links or paths out of dest
            tar.extractall(dest, filter="data")
        else:
            tar.extractall(dest)
    tree = dest / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
    if not (tree / "CMakeLists.txt").is_file():
        raise SystemExit(f"llama_build: {sdists[0].name} has no vendor/llama.cpp tree")
    return tree


def build_tools(scratch: Path) -> tuple[str, str]:
    """cmake and ninja: the system's, else the binaries inside their PyPI wheels (installed
    under `scratch`), so a machine with only a C++ compiler and binutils can build."""
    cmake, ninja = shutil.which("cmake"), shutil.which("ninja")
    if cmake is None or ninja is None:
        wanted = [name for name, path in (("cmake", cmake), ("ninja", ninja)) if path is None]
        _run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--target", str(scratch), *wanted])
        cmake = cmake or str(scratch / "cmake" / "data" / "bin" / "cmake")
        ninja = ninja or str(scratch / "bin" / "ninja")  # a wheel script: --target puts it in bin/
    return cmake, ninja


def compile_server(source: Path, build: Path, tools: tuple[str, str]) -> Path:
    """Configure llama.cpp with the recipe's flags and build the llama-server target alone; return the binary."""
    for tool in ("c++", "objdump"):
        if shutil.which(tool) is None:
            raise SystemExit(f"llama_build: {tool} is needed to build llama-server (apt-get install g++ binutils)")
    cmake, ninja = tools
    _run([cmake, "-S", str(source), "-B", str(build), "-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}", *cmake_args()])
    _run([cmake, "--build", str(build), "--target", TARGET, "-j", str(_cpus())])
    binary = build / "bin" / TARGET
    if not binary.is_file():
        raise SystemExit(f"llama_build: the build made no {binary}")
    return binary


def _cmake_cache(build: Path, name: str) -> str | None:
    found = re.search(rf"^{name}:[A-Z]+=(.*)$", (build / "CMakeCache.txt").read_text(), re.MULTILINE)
    return found.group(1) if found else None


def _dynamic_needs(binary: Path) -> tuple[list[str], str | None]:
    """The shared libraries `binary` needs at run time, and the newest glibc symbol version it uses."""
    headers = subprocess.run(["objdump", "-p", str(binary)], capture_output=True, text=True, check=True).stdout
    symbols = subprocess.run(["objdump", "-T", str(binary)], capture_output=True, text=True, check=True).stdout
    versions = {tuple(int(n) for n in v.split(".")) for v in re.findall(r"GLIBC_(\d+(?:\.\d+)+)", symbols)}
    glibc = ".".join(map(str, max(versions))) if versions else None
    return re.findall(r"^\s*NEEDED\s+(\S+)", headers, re.MULTILINE), glibc


def describe_build(binary: Path, build: Path) -> dict:
    """build.json: what the binary is, how it was built, and what it needs of the machine."""
    info_cpp = (build / "common" / "build-info.cpp").read_text()
    generated = dict(re.findall(r"(LLAMA_\w+) = \"?([^\";]*)\"?;", info_cpp))
    backends = (_cmake_cache(build, "GGML_AVAILABLE_BACKENDS") or "").split(";")
    needed, glibc = _dynamic_needs(binary)
    version = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60, check=False)
    reported = re.search(r"version: (\S+)", version.stdout + version.stderr)
    return {
        "distribution": DISTRIBUTION,
        "version": wheel_version(),
        "recipe": recipe_key(),
        "source": {"requirement": REQUIREMENT, "sha256": SDIST_SHA256, "tree": "vendor/llama.cpp"},
        "llama_cpp_version": reported.group(1) if reported else None,
        "llama_cpp_commit": None if generated.get("LLAMA_COMMIT") in (None, "unknown") else generated["LLAMA_COMMIT"],
        "llama_cpp_build_number": int(generated.get("LLAMA_BUILD_NUMBER") or 0),
        "compiler": generated.get("LLAMA_COMPILER"),
        "target": TARGET,
        "cpu_features": list(CPU_FEATURES),
        "backends": [b for b in backends if b],
        # Only ggml's CPU backend is built: CUDA (or any GPU) builds are not made by this recipe.
        "gpu_offload": any(b not in ("ggml-cpu", "ggml-blas") for b in backends if b),
        "needed_libraries": needed,
        "glibc": glibc,
        "cmake_args": list(cmake_args()),
    }


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _pack_wheel(path: Path, distribution: str, version: str, tag: str, summary: str,
                files: list[tuple[str, bytes, int]], *, purelib: bool = False, python: str = ">=3.8",
                requires: tuple[str, ...] = ()) -> Path:
    """Write a wheel to `path`: `files` (name in the wheel, content, permission bits), then its
    METADATA, WHEEL and RECORD."""
    dist_info = f"{distribution.replace('-', '_')}-{version}.dist-info"
    metadata = (f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\nSummary: {summary}\n"
                f"License: MIT\nRequires-Python: {python}\n" + "".join(f"Requires-Dist: {r}\n" for r in requires))
    members = [
        *files,
        (f"{dist_info}/METADATA", metadata.encode(), 0o644),
        (f"{dist_info}/WHEEL", (f"Wheel-Version: 1.0\nGenerator: appliance installer/llama_build.py\n"
                                f"Root-Is-Purelib: {str(purelib).lower()}\nTag: {tag}\n").encode(), 0o644),
    ]
    record = "".join(f"{name},{_record_hash(data)},{len(data)}\n" for name, data, _ in members) + f"{dist_info}/RECORD,,\n"
    members.append((f"{dist_info}/RECORD", record.encode(), 0o644))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as whl:
        for name, data, mode in members:
            entry = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
            entry.external_attr = (0o100000 | mode) << 16  # a regular file with these permission bits: pip keeps +x
            entry.compress_type = zipfile.ZIP_DEFLATED
            whl.writestr(entry, data)
    return path


def write_wheel(out_dir: Path, binary: Path, info: dict, licenses: dict[str, Path]) -> Path:
    """Pack `binary`, build.json and the package code into this recipe's wheel in `out_dir`; return its path.

    `licenses` maps a file name under the package's licenses/ folder to its source file.
    """
    version = wheel_version()
    files = [
        (f"{PACKAGE}/__init__.py", PACKAGE_INIT.encode(), 0o644),
        (f"{PACKAGE}/build.json", (json.dumps(info, indent=2) + "\n").encode(), 0o644),
        (f"{PACKAGE}/bin/{TARGET}", binary.read_bytes(), 0o755),
        *((f"{PACKAGE}/licenses/{name}", path.read_bytes(), 0o644) for name, path in sorted(licenses.items())),
    ]
    return _pack_wheel(out_dir / f"{PACKAGE}-{version}-{WHEEL_TAG}.whl", DISTRIBUTION, version, WHEEL_TAG,
                       f"llama.cpp's llama-server ({REQUIREMENT}'s vendor/llama.cpp), built portable for the appliance",
                       files)


def convert_files(tree: Path) -> dict[str, Path]:
    """What the conversion scripts' wheel copies of the llama.cpp `tree`: its path under llama.cpp/ -> the file."""
    found: dict[str, Path] = {}
    for name in CONVERT_FILES:
        top = tree / name
        if not top.exists():
            raise SystemExit(f"llama_build: the llama.cpp tree has no {name}")
        for path in sorted([top] if top.is_file() else top.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                found[path.relative_to(tree).as_posix()] = path
    return found


def write_convert_wheel(out_dir: Path, tree: Path) -> Path:
    """Pack llama.cpp's conversion scripts (CONVERT_FILES of `tree`) and the package code into
    the conversion wheel in `out_dir`; return its path."""
    version = convert_version()
    copied = convert_files(tree)
    info = {
        "distribution": CONVERT_DISTRIBUTION,
        "version": version,
        "recipe": convert_key(),
        "source": {"requirement": REQUIREMENT, "sha256": SDIST_SHA256, "tree": "vendor/llama.cpp"},
        "files": list(copied),
    }
    files = [
        (f"{CONVERT_PACKAGE}/__init__.py", CONVERT_INIT.encode(), 0o644),
        (f"{CONVERT_PACKAGE}/build.json", (json.dumps(info, indent=2) + "\n").encode(), 0o644),
        *((f"{CONVERT_PACKAGE}/llama.cpp/{name}", path.read_bytes(), 0o644) for name, path in copied.items()),
    ]
    return _pack_wheel(out_dir / f"{CONVERT_PACKAGE}-{version}-{CONVERT_TAG}.whl", CONVERT_DISTRIBUTION, version,
                       CONVERT_TAG, f"llama.cpp's conversion scripts ({REQUIREMENT}'s vendor/llama.cpp) for the appliance",
                       files, purelib=True, python=">=3.10", requires=CONVERT_REQUIRES)


def build_wheel(cache: Path) -> Path:
    """The folder holding this recipe's wheel under `cache`, building it first if absent.

    The source, the build tree and the wheel are made in a temporary folder inside `cache`
    (removed afterwards); only the finished wheel is moved, atomically, into place. The
    conversion scripts' wheel is made from the same source then, if it is absent too.
    """
    folder = cache / recipe_key()
    if list(folder.glob(f"{PACKAGE}-*.whl")):
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=cache, prefix=".build-") as tmp:
        staging = Path(tmp)
        tree = fetch_source(staging / "source")
        binary = compile_server(tree, staging / "build", build_tools(staging / "tools"))
        if problems := binary_problems(binary):
            raise SystemExit("llama_build: the build is not portable: " + "; ".join(problems))
        licenses = {"LICENSE": tree / "LICENSE", **{p.name: p for p in sorted((tree / "licenses").glob("LICENSE*"))}}
        (staging / "dist").mkdir()
        wheel = write_wheel(staging / "dist", binary, describe_build(binary, staging / "build"), licenses)
        _move_into(wheel, folder)
        build_convert_wheel(cache, tree)
    print(f"llama_build: built {folder / wheel.name} in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return folder


def build_convert_wheel(cache: Path, tree: Path | None = None) -> Path:
    """The folder holding the conversion scripts' wheel under `cache`, making it first if absent:
    from the llama.cpp `tree` given, else from the pinned sdist, fetched and checked as for the server."""
    folder = cache / convert_key()
    if list(folder.glob(f"{CONVERT_PACKAGE}-*.whl")):
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".convert-") as tmp:
        staging = Path(tmp)
        wheel = write_convert_wheel(staging, tree or fetch_source(staging / "source"))
        _move_into(wheel, folder)
    print(f"llama_build: made {folder / wheel.name}", file=sys.stderr)
    return folder


def _move_into(wheel: Path, folder: Path) -> None:
    folder.mkdir(exist_ok=True)
    os.replace(wheel, folder / wheel.name)  # atomic: a half-written wheel is never found


def instructions(binary: Path, patterns: dict[str, re.Pattern], limit: int = 5) -> dict[str, list[str]]:
    """Up to `limit` disassembled lines of `binary` per pattern that matches its instruction text.

    Symbol names (<...>) and objdump's comments (# ...) are left out of the text matched.
    """
    if shutil.which("objdump") is None:
        raise RuntimeError("objdump (binutils) is needed to scan native code")
    found: dict[str, list[str]] = {kind: [] for kind in patterns}
    with subprocess.Popen(["objdump", "-d", "--no-show-raw-insn", str(binary)],
                          stdout=subprocess.PIPE, text=True) as dump:
        for line in dump.stdout:
            _, tab, text = line.partition(":\t")
            if not tab:
                continue  # a section or symbol heading, not an instruction
            if "<" in text or "#" in text:
                text = re.sub(r"<[^>]*>", "", text.split("#", 1)[0])
            text = f" {text} "
            for kind, pattern in patterns.items():
                if len(found[kind]) < limit and pattern.search(text):
                    found[kind].append(line.strip())
            if all(len(lines) >= limit for lines in found.values()):
                dump.kill()
                break
    return found


def amx_instructions(binary: Path, limit: int = 5) -> list[str]:
    """Up to `limit` disassembled lines of `binary` that use an AMX tile instruction."""
    return instructions(binary, {"AMX": AMX_MNEMONIC}, limit)["AMX"]


def avx512_instructions(binary: Path, limit: int = 5) -> list[str]:
    """Up to `limit` disassembled lines of `binary` that use AVX-512 registers (zmm, k0-k7, x/ymm16-31)."""
    return instructions(binary, {"AVX-512": AVX512_REGISTER}, limit)["AVX-512"]


def binary_problems(binary: Path) -> list[str]:
    """What is wrong with a llama-server binary: AMX or AVX-512 code, or it does not run."""
    problems = [f"{binary.name} contains {kind} instructions ({lines[0]})"
                for kind, lines in instructions(binary, {"AMX": AMX_MNEMONIC, "AVX-512": AVX512_REGISTER}, 1).items()
                if lines]
    try:
        run = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60, check=False)
        if run.returncode:
            problems.append(f"{binary} --version exited {run.returncode}: {(run.stderr or run.stdout).strip()[-500:]}")
    except (OSError, subprocess.TimeoutExpired) as exc:
        problems.append(f"{binary} --version did not run: {exc}")
    return problems


def installed_problems() -> list[str]:
    """What is wrong with the llama-server this Python's environment provides: not this recipe's
    wheel, AMX or AVX-512 code, or a binary that does not run here."""
    try:
        import appliance_llama_server  # only in the appliance's environment, after pip install
    except ImportError:
        return [f"{DISTRIBUTION} is not installed in {sys.prefix}"]
    problems = []
    if recipe_key() not in (url := _installed_from(DISTRIBUTION)):
        problems.append(f"the installed {DISTRIBUTION} is not this recipe's wheel ({recipe_key()}); "
                        f"it came from {url or 'a package index or pip cache'}")
    info = appliance_llama_server.build_info()
    if info.get("recipe") != recipe_key():
        problems.append(f"the installed llama-server was built by recipe {info.get('recipe')}, not {recipe_key()}")
    binary = appliance_llama_server.binary()
    if not os.access(binary, os.X_OK):
        return [*problems, f"{binary} is missing or not executable"]
    return problems + binary_problems(binary)


def _installed_from(distribution: str) -> str:
    """The wheel file pip installed `distribution` from (PEP 610's direct_url.json), or ''."""
    try:
        return json.loads(importlib.metadata.distribution(distribution).read_text("direct_url.json") or "{}").get("url", "")
    except importlib.metadata.PackageNotFoundError:
        return ""


def installed_convert_problems() -> list[str]:
    """What is wrong with the conversion scripts this Python's environment provides: not this
    recipe's wheel, a file the recipe copies missing, or a file unlike the wheel's (RECORD)."""
    try:
        import appliance_llama_convert  # only in the appliance's environment, after pip install
    except ImportError:
        return [f"{CONVERT_DISTRIBUTION} is not installed in {sys.prefix}"]
    problems = []
    if convert_key() not in (url := _installed_from(CONVERT_DISTRIBUTION)):
        problems.append(f"the installed {CONVERT_DISTRIBUTION} is not this recipe's wheel ({convert_key()}); "
                        f"it came from {url or 'a package index or pip cache'}")
    info = appliance_llama_convert.build_info()
    if info.get("recipe") != convert_key():
        problems.append(f"the installed conversion scripts were copied by recipe {info.get('recipe')}, not {convert_key()}")
    tree = appliance_llama_convert.TREE
    problems += [f"{tree / top} is missing" for top in CONVERT_FILES if not (tree / top).exists()]
    problems += [f"{tree / name} is missing" for name in info.get("files", []) if not (tree / name).is_file()]
    for file in importlib.metadata.distribution(CONVERT_DISTRIBUTION).files or []:
        if file.hash and file.hash.mode == "sha256" and (path := Path(file.locate())).is_file():
            digest = base64.urlsafe_b64encode(hashlib.sha256(path.read_bytes()).digest()).rstrip(b"=").decode()
            if digest != file.hash.value:
                problems.append(f"{path} differs from the file its wheel installed")
    return problems


def main(argv: list[str]) -> int:
    if argv == ["--check"]:
        problems = installed_problems() + installed_convert_problems()
        for problem in problems:
            print(f"llama_build: {problem}; rebuild with installer/llama_build.py", file=sys.stderr)
        if not problems:
            import appliance_llama_convert
            import appliance_llama_server

            info = appliance_llama_server.build_info()
            print(f"llama_build: {appliance_llama_server.binary()} is recipe {info['recipe']} "
                  f"(llama.cpp {info.get('llama_cpp_commit') or 'commit unknown'}): no AMX, no AVX-512, runs")
            print(f"llama_build: {appliance_llama_convert.TREE} holds the conversion scripts of recipe "
                  f"{convert_key()}, as its wheel installed them")
        return 1 if problems else 0
    build = build_wheel
    if argv[:1] == ["--convert"]:
        build, argv = build_convert_wheel, argv[1:]
    if len(argv) > 1 or (argv and argv[0].startswith("-")):
        usage = [line.strip() for line in __doc__.splitlines() if line.strip().startswith("python installer/")]
        print("usage: " + "\n       ".join(usage), file=sys.stderr)
        return 2
    try:
        print(build(Path(argv[0]).expanduser().resolve() if argv else DEFAULT_CACHE))
    except subprocess.CalledProcessError as exc:
        print(f"llama_build: {' '.join(map(str, exc.cmd))} failed (exit {exc.returncode}); its output is above",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
