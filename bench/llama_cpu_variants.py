"""Decode speed of llama.cpp builds for different CPU instruction sets, side by side.

Builds llama.cpp's own `llama-bench` from the exact tree that the pinned llama-cpp-python
vendors, once per variant:
    portable  the appliance's recipe (installer/llama_build.py): AVX2 baseline, no AVX-512, no AMX
    avx512    the recipe plus AVX-512 (F, VBMI, VNNI, BF16), still no AMX
    native    llama.cpp's default, -march=native (AMX included where the CPU has it)
then runs them in turns (--rounds, every variant once per round) on the default model and
reports decode (tg) and prompt (pp) tokens/s, and each variant's ratio to portable within
a round (median over rounds). Variants whose instructions this CPU lacks are skipped.

Usage: .venv/bin/python bench/llama_cpu_variants.py [--rounds 3] [--threads 2] [--work DIR]
(the llama.cpp source comes from `pip download` of the pinned sdist; builds take a few
minutes each on 2 cores and are kept in --work).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from appliance.config import load_profile  # noqa: E402
from installer import bundle_check, llama_build  # noqa: E402
from services.engines.exits import describe_exit  # noqa: E402

AVX512 = ("-DGGML_AVX512=ON", "-DGGML_AVX512_VBMI=ON", "-DGGML_AVX512_VNNI=ON", "-DGGML_AVX512_BF16=ON")
VARIANTS = {
    "portable": (llama_build.CMAKE_ARGS, llama_build.CPU_FEATURES),
    "avx512": (tuple(a for a in llama_build.CMAKE_ARGS if a.split("=")[0] not in {x.split("=")[0] for x in AVX512}) + AVX512,
               llama_build.CPU_FEATURES + ("avx512f", "avx512vbmi", "avx512_vnni", "avx512_bf16")),
    "native": (("-DGGML_NATIVE=ON",), ()),
}
COMMON = ("-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
          "-DLLAMA_BUILD_SERVER=OFF", "-DBUILD_SHARED_LIBS=OFF")


def llama_source(work: Path) -> Path:
    tree = work / f"llama_cpp_python-{llama_build.VERSION}" / "vendor" / "llama.cpp"
    if not tree.is_dir():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                        "--dest", str(work), llama_build.REQUIREMENT], check=True, stdout=sys.stderr)
        with tarfile.open(work / f"llama_cpp_python-{llama_build.VERSION}.tar.gz") as sdist:
            sdist.extractall(work, filter="data")
    return tree


def build(tree: Path, work: Path, name: str, flags: tuple[str, ...], jobs: int) -> Path:
    out = work / f"build-{name}"
    binary = out / "bin" / "llama-bench"
    if not binary.exists():
        subprocess.run(["cmake", "-S", str(tree), "-B", str(out), *COMMON, *flags], check=True, stdout=sys.stderr)
        subprocess.run(["cmake", "--build", str(out), "--target", "llama-bench", "-j", str(jobs)],
                       check=True, stdout=sys.stderr)
    return binary


def run_bench(binary: Path, model: str, threads: int) -> dict[str, float] | str:
    """Tokens/s for prompt (pp) and decode (tg), or why the run failed (a crash is a result too)."""
    done = subprocess.run([str(binary), "-m", model, "-t", str(threads), "-p", "128", "-n", "64", "-r", "3",
                           "-o", "json"], capture_output=True, text=True)
    if done.returncode:
        return describe_exit(done.returncode, "this llama.cpp build")
    rows = json.loads(done.stdout)
    return {("pp" if row["n_prompt"] else "tg"): row["avg_ts"] for row in rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=2, help="parallel compile jobs")
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "results" / "llama-variants")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    flags = bundle_check.cpu_flags() or set()
    runnable = {name: spec for name, spec in VARIANTS.items() if set(spec[1]) <= flags}
    tree = llama_source(args.work)
    binaries = {name: build(tree, args.work, name, spec[0], args.jobs) for name, spec in runnable.items()}
    model = load_profile("edge-cpu").models[0].path
    results: dict[str, list] = {name: [] for name in binaries}
    for round_no in range(1, args.rounds + 1):
        for name, binary in binaries.items():
            results[name].append(run_bench(binary, model, args.threads))
            print(f"round {round_no} {name}: {results[name][-1]}", file=sys.stderr)
    amx = "amx_tile" in flags
    print(f"CPU flags: avx512f={'avx512f' in flags} amx={amx}; model {Path(model).name}; "
          f"{args.threads} threads; {args.rounds} rounds")
    print(f"{'variant':10} {'tg tok/s':>9} {'pp tok/s':>9} {'tg vs portable':>15} {'pp vs portable':>15}  (rounds' ratios)")
    for name, rows in results.items():
        if failed := next((r for r in rows if isinstance(r, str)), None):
            print(f"{name:10} {failed}")
            continue
        per_round = {kind: [r[kind] / p[kind] for r, p in zip(rows, results["portable"])] for kind in ("tg", "pp")}
        spread = "  ".join(f"{kind} {min(v):.2f}-{max(v):.2f}" for kind, v in per_round.items())
        print(f"{name:10} {statistics.median(r['tg'] for r in rows):9.1f} {statistics.median(r['pp'] for r in rows):9.1f} "
              f"{statistics.median(per_round['tg']):15.2f} {statistics.median(per_round['pp']):15.2f}  ({spread})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
