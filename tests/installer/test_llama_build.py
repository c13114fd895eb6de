"""The llama.cpp build the appliance loads: portable, never Intel AMX, never beyond its recipe.

This machine may lack AMX or AVX-512; the scan stands for the hosts that have them: the
libraries must be right on every CPU, not only run on this one.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import llama_cpp
import pytest

from appliance.errors import PlanError
from appliance.config import load_profile
from appliance.planning.engine_builds import check_engine_builds, llamacpp_gpu_offload
from appliance.planning.inventory import read_inventory
from appliance.planning.planner import make_plan
from installer import bundle_check, llama_build

INVENTORIES = Path(__file__).parents[1] / "inventories"
LIBRARIES = llama_build.libraries(Path(llama_cpp.__file__).parent)


def test_every_library_is_scanned():
    names = {lib.name.split(".so")[0] for lib in LIBRARIES}
    assert {"libllama", "libggml", "libggml-base", "libggml-cpu"} <= names, names


@pytest.mark.parametrize("library", LIBRARIES, ids=lambda p: p.name)
def test_no_amx_tile_instruction(library):
    assert llama_build.amx_instructions(library) == []


def test_the_scan_finds_amx(tmp_path):
    """A library with AMX tile instructions is caught: the scan above can fail."""
    source = tmp_path / "amx.c"
    source.write_text('void tiles(void) { __asm__ volatile ("tilezero %tmm4\\n\\ttilerelease"); }\n')
    library = tmp_path / "libamx.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    found = llama_build.amx_instructions(library)
    assert any("tilezero" in line and "%tmm4" in line for line in found), found
    assert any("tilerelease" in line for line in found), found


def test_installed_build_is_the_recipe():
    assert llama_build.installed_problems() == []
    info = llama_cpp.llama_print_system_info().decode()
    assert "AVX2 = 1" in info and "AVX512 = 1" not in info, info


def test_cpu_features_are_those_the_flags_enable():
    """Each -DGGML_<SET>=ON of the recipe is named, as /proc/cpuinfo spells it, in CPU_FEATURES."""
    cpuinfo_name = {"SSE42": "sse4_2", "AVX": "avx", "F16C": "f16c", "FMA": "fma", "AVX2": "avx2", "BMI2": "bmi2"}
    enabled = [arg[len("-DGGML_"):-len("=ON")] for arg in llama_build.CMAKE_ARGS if arg.endswith("=ON")]
    assert sorted(cpuinfo_name[name] for name in enabled) == sorted(llama_build.CPU_FEATURES)
    assert "-DGGML_NATIVE=OFF" in llama_build.CMAKE_ARGS
    assert all(arg.endswith("=OFF") for arg in llama_build.CMAKE_ARGS if "AMX" in arg or "AVX512" in arg)


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
    with pytest.raises(PlanError, match=r"smollm2-135m-instruct: .* no GPU offload .* gpu_layers: 0"):
        check_engine_builds(make_plan(load_profile("single-gpu"), [machine]), machine)
    machine = read_inventory(INVENTORIES / "edge-cpu-here.json")
    check_engine_builds(make_plan(load_profile("edge-cpu"), [machine]), machine)


def test_a_cpu_without_the_builds_instructions_is_refused_before_start():
    """`appliance up` on an Ivy Bridge Xeon (AVX, no AVX2): refused by name, not a SIGILL at the first request."""
    machine = read_inventory(INVENTORIES / "node-1x-t4.json")
    machine.cpu.model, machine.cpu.flags = "Intel(R) Xeon(R) CPU E5-2680 v2", ["sse4_2", "avx", "f16c"]
    plan = make_plan(load_profile("edge-cpu"), [machine])
    with pytest.raises(PlanError, match=r"cannot run \(avx2, fma, bmi2 missing on Intel\(R\) Xeon\(R\) CPU E5-2680 v2\)"):
        check_engine_builds(plan, machine)


def test_recipe_key_names_the_recipe(monkeypatch):
    key = llama_build.recipe_key()
    monkeypatch.setattr(llama_build, "CMAKE_ARGS", (*llama_build.CMAKE_ARGS, "-DGGML_AVX512=ON"))
    assert llama_build.recipe_key() != key and key.startswith(llama_build.VERSION)


def test_batched_prompt_evaluation_matches_one_token_at_a_time():
    """The build's kernels compute right: a prompt evaluated as one batch gives the greedy answer that
    one token at a time gives. With llamafile's sgemm on, the batch answered "La femme de France"."""
    path = load_profile("edge-cpu").models[0].path
    prompt = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
              "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    answers = {}
    for n_batch in (512, 1):
        llm = llama_cpp.Llama(path, n_ctx=512, n_batch=n_batch, n_ubatch=n_batch, n_threads=2, verbose=False)
        answers[n_batch] = llm.create_completion(prompt, temperature=0, max_tokens=8)["choices"][0]["text"]
        llm.close()
    assert answers[512] == answers[1]
    assert "Paris" in answers[512]
