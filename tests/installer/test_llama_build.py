"""The llama.cpp server the appliance runs: portable, never Intel AMX or AVX-512, never beyond its recipe.

This machine may lack AMX or AVX-512; the scans stand for the hosts that have them: the
binary must be right on every CPU, not only run on this one.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import appliance_llama_server
import pytest

from appliance.config import load_profile
from appliance.errors import PlanError
from appliance.planning.engine_builds import (
    check_engine_builds,
    llamacpp_cpu_features,
    llamacpp_gpu_offload,
    missing_libraries,
)
from appliance.planning.inventory import read_inventory
from appliance.planning.planner import make_plan
from installer import bundle_check, llama_build
from tests.conftest import QUESTION, SYSTEM, free_port

INVENTORIES = Path(__file__).parents[1] / "inventories"
BINARY = appliance_llama_server.binary()


@pytest.fixture(scope="module")
def scan() -> dict[str, list[str]]:
    """One disassembly of the installed binary (about 15 MB), for both scans."""
    return llama_build.instructions(BINARY, {"AMX": llama_build.AMX_MNEMONIC, "AVX-512": llama_build.AVX512_REGISTER})


def test_no_amx_tile_instruction(scan):
    assert scan["AMX"] == []


def test_no_avx512_instruction(scan):
    assert scan["AVX-512"] == []


def compile_sample(tmp_path: Path, name: str, source: str) -> Path:
    (tmp_path / f"{name}.c").write_text(source)
    library = tmp_path / f"lib{name}.so"
    subprocess.run(["gcc", "-O0", "-shared", "-fPIC", "-o", str(library), str(tmp_path / f"{name}.c")], check=True)
    return library


def test_the_scan_finds_amx(tmp_path):
    """Code with AMX tile instructions is caught: the scan above can fail."""
    library = compile_sample(tmp_path, "amx", 'void tiles(void) { __asm__ volatile ("tilezero %tmm4\\n\\ttilerelease"); }\n')
    found = llama_build.amx_instructions(library)
    assert any("tilezero" in line and "%tmm4" in line for line in found), found
    assert any("tilerelease" in line for line in found), found


def test_the_scan_finds_avx512_and_only_in_instructions(tmp_path):
    """zmm registers, mask registers and the EVEX-only x/ymm16-31 are caught; symbol names that
    merely spell them (a call to avx512_zmm_k1) are not."""
    library = compile_sample(tmp_path, "avx512", (
        'void wide(void) { __asm__ volatile ("vaddps %zmm1, %zmm2, %zmm3{%k1}\\n\\tkmovw %k2, %eax\\n\\t'
        'vmovdqu64 %ymm17, %ymm1"); }\n'))
    found = llama_build.avx512_instructions(library)
    assert any("vaddps" in line and "%zmm3{%k1}" in line for line in found), found
    assert any("kmovw" in line and "%k2" in line for line in found), found
    assert any("vmovdqu64" in line and "%ymm17" in line for line in found), found
    clean = compile_sample(tmp_path, "avx2", (
        'void avx512_zmm_k1(void) { __asm__ volatile ("vaddps %ymm1, %ymm2, %ymm3"); }\n'
        'void caller(void) { avx512_zmm_k1(); }\n'))
    dump = subprocess.run(["objdump", "-d", str(clean)], capture_output=True, text=True, check=True).stdout
    assert "call" in dump and "<avx512_zmm_k1" in dump  # the name is in the disassembly...
    assert llama_build.avx512_instructions(clean) == []  # ...and is not taken for AVX-512 code


def test_installed_build_is_the_recipe():
    assert llama_build.installed_problems() == []
    info = appliance_llama_server.build_info()
    assert info["recipe"] == llama_build.recipe_key()
    assert info["version"] == llama_build.wheel_version() == f"{llama_build.VERSION}+{llama_build.recipe_key().split('-')[1]}"
    assert info["cmake_args"] == list(llama_build.cmake_args())
    assert info["cpu_features"] == list(llama_build.CPU_FEATURES)
    assert info["backends"] == ["ggml-cpu"] and info["gpu_offload"] is False
    assert info["source"]["sha256"] == llama_build.SDIST_SHA256
    version = subprocess.run([str(BINARY), "--version"], capture_output=True, text=True, timeout=60, check=False)
    assert version.returncode == 0, version.stderr
    if info["llama_cpp_commit"]:
        assert info["llama_cpp_commit"] in version.stdout + version.stderr


def test_cpu_features_are_those_the_flags_enable():
    """Each -DGGML_<SET>=ON of the recipe is named, as /proc/cpuinfo spells it, in CPU_FEATURES,
    and the engine check reads the same list from the installed build."""
    cpuinfo_name = {"SSE42": "sse4_2", "AVX": "avx", "F16C": "f16c", "FMA": "fma", "AVX2": "avx2", "BMI2": "bmi2"}
    enabled = [arg[len("-DGGML_"):-len("=ON")] for arg in llama_build.cmake_args()
               if arg.startswith("-DGGML_") and arg.endswith("=ON")]
    assert sorted(cpuinfo_name[name] for name in enabled) == sorted(llama_build.CPU_FEATURES)
    assert "-DGGML_NATIVE=OFF" in llama_build.cmake_args()
    assert all(arg.endswith("=OFF") for arg in llama_build.cmake_args() if "AMX" in arg or "AVX512" in arg)
    assert llamacpp_cpu_features() == list(llama_build.CPU_FEATURES)


def test_the_wheel_is_valid_and_installs_an_executable(tmp_path):
    """The recipe's wheel: RECORD lists every member with its hash, and pip installs it into a
    fresh folder where llama-server keeps its executable bit and runs."""
    wheels = list(llama_build.build_wheel(llama_build.DEFAULT_CACHE).glob("*.whl"))
    assert [w.name for w in wheels] == [
        f"{llama_build.PACKAGE}-{llama_build.wheel_version()}-{llama_build.WHEEL_TAG}.whl"]
    with zipfile.ZipFile(wheels[0]) as whl:
        names = whl.namelist()
        dist_info = f"{llama_build.PACKAGE}-{llama_build.wheel_version()}.dist-info"
        assert names[-1] == f"{dist_info}/RECORD"
        record = list(csv.reader(io.StringIO(whl.read(f"{dist_info}/RECORD").decode())))
        assert sorted(row[0] for row in record) == sorted(names)
        for name, digest, size in record:
            if name.endswith("/RECORD"):
                continue
            data = whl.read(name)
            expected = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert (digest, int(size)) == (f"sha256={expected}", len(data)), name
        assert f"Tag: {llama_build.WHEEL_TAG}" in whl.read(f"{dist_info}/WHEEL").decode()
        assert f"Name: {llama_build.DISTRIBUTION}\n" in whl.read(f"{dist_info}/METADATA").decode()
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    "--disable-pip-version-check", "--target", str(target), str(wheels[0])], check=True)
    installed = target / llama_build.PACKAGE / "bin" / "llama-server"
    assert installed.is_file() and os.access(installed, os.X_OK), oct(installed.stat().st_mode)
    probe = subprocess.run(
        [sys.executable, "-c", ("import json, appliance_llama_server as s; "
                                "print(json.dumps([str(s.binary()), s.build_info()['recipe']]))")],
        env={**os.environ, "PYTHONPATH": str(target)}, capture_output=True, text=True, check=True, cwd=tmp_path)
    assert json.loads(probe.stdout) == [str(installed), llama_build.recipe_key()]
    assert subprocess.run([str(installed), "--version"], capture_output=True, timeout=60, check=False).returncode == 0


IVY_BRIDGE_FLAGS = ("fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse "
                    "sse2 ss ht syscall nx rdtscp lm constant_tsc pni pclmulqdq ssse3 cx16 sse4_1 sse4_2 x2apic "
                    "popcnt aes xsave avx f16c rdrand hypervisor lahf_lm")


def test_a_cpu_without_avx2_is_refused_naming_what_it_lacks(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Intel(R) Xeon(R) CPU E5-2680 v2\nflags\t\t: {IVY_BRIDGE_FLAGS}\n\n")
    manifest = {"python": bundle_check.PYTHON_TAG, "platform": bundle_check.PLATFORM,
                "cpu_features": list(llama_build.CPU_FEATURES), "accelerator": "none"}
    problem = bundle_check.incompatibility(manifest, cpuinfo)
    assert problem and "lacks fma, avx2, bmi2" in problem and "illegal instruction" in problem
    # this machine runs the build (the test suite is running on it)
    assert bundle_check.incompatibility(manifest) is None


def test_gpu_offload_with_a_cpu_build_is_refused():
    """On a GPU server the single-gpu plan offloads llama.cpp layers; the portable build cannot."""
    assert llamacpp_gpu_offload() is False
    machine = read_inventory(INVENTORIES / "workstation-1x-l4.json")
    with pytest.raises(PlanError, match=r"smollm2-135m-instruct: .* no GPU offload .*gpu_offload: false.* gpu_layers: 0"):
        check_engine_builds(make_plan(load_profile("single-gpu"), [machine]), machine)
    machine = read_inventory(INVENTORIES / "edge-cpu-here.json")
    check_engine_builds(make_plan(load_profile("edge-cpu"), [machine]), machine)


def test_a_cpu_without_the_builds_instructions_is_refused_before_start():
    """`appliance up` on an Ivy Bridge Xeon (AVX, no AVX2): refused by name, not a SIGILL at the first request."""
    machine = read_inventory(INVENTORIES / "node-1x-t4.json")
    machine.cpu.model, machine.cpu.flags = "Intel(R) Xeon(R) CPU E5-2680 v2", ["sse4_2", "avx", "f16c"]
    plan = make_plan(load_profile("edge-cpu"), [machine])
    with pytest.raises(PlanError, match=r"cannot run \(fma, avx2, bmi2 missing on Intel\(R\) Xeon\(R\) CPU E5-2680 v2\)"):
        check_engine_builds(plan, machine)


def test_the_libraries_the_server_links_are_checked_on_this_machine():
    """build.json names what the binary links; a machine without one of them is refused by name."""
    import appliance_llama_server

    needed = appliance_llama_server.build_info()["needed_libraries"]
    assert {"libstdc++.so.6", "libc.so.6"} <= set(needed)
    assert missing_libraries(needed) == []  # this machine runs the server
    assert missing_libraries(["libc.so.6", "libno-such-runtime.so.7"]) == ["libno-such-runtime.so.7"]


def test_recipe_key_names_the_recipe(monkeypatch):
    key = llama_build.recipe_key()
    assert key.startswith(llama_build.VERSION + "-")
    for name, value in (("CMAKE_ARGS", (*llama_build.CMAKE_ARGS, "-DGGML_AVX512=ON")),
                        ("SERVER_CMAKE_ARGS", (*llama_build.SERVER_CMAKE_ARGS, "-DLLAMA_USE_PREBUILT_UI=ON")),
                        ("SDIST_SHA256", "0" * 64),
                        ("PACKAGE_INIT", llama_build.PACKAGE_INIT + "\n")):
        with monkeypatch.context() as patch:
            patch.setattr(llama_build, name, value)
            assert llama_build.recipe_key() != key, name
    assert llama_build.recipe_key() == key


def test_the_server_answers_right_with_a_batched_prompt(tmp_path):
    """llama-server evaluates the prompt as one batch and answers the greedy "Paris". With llamafile's
    sgemm on, the batched F16 products were wrong and it answered "La femme de France"."""
    model = load_profile("edge-cpu").models[0].path
    port, log = free_port(), tmp_path / "llama-server.log"
    with open(log, "wb") as out:  # a file, not a pipe: nobody reads the log while the server runs
        proc = subprocess.Popen([str(BINARY), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
                                 "-t", "2", "-c", "2048", "-np", "1", "--no-webui"],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"llama-server exited with {proc.returncode}: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, "llama-server was not ready after 120 s"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as health:
                    if health.status == 200:
                        break
            except (urllib.error.URLError, OSError):  # not listening yet, or 503 while loading
                pass
            time.sleep(0.2)
        body = {"messages": [SYSTEM, QUESTION], "temperature": 0, "max_tokens": 16}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.load(response)["choices"][0]["message"]["content"]
        assert "Paris" in answer, answer
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
