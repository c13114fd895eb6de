"""What the engine builds installed on this machine need and can do, checked against a plan.

llama.cpp's build is portable (installer/llama_build.py): an x86-64 baseline with AVX2,
CPU-only. A machine without one of its instruction sets would kill the engine with
SIGILL, and a plan that puts llama.cpp layers on a GPU would silently run on the CPU:
both are refused before anything starts.
"""

from __future__ import annotations

import functools
import re

from appliance.errors import PlanError
from appliance.planning.inventory import Inventory
from appliance.planning.plan_model import Plan

# llama_print_system_info()'s names -> /proc/cpuinfo's, for the sets the probe records.
SYSTEM_INFO_FLAGS = {
    "AVX": "avx", "AVX2": "avx2", "F16C": "f16c", "FMA": "fma", "BMI2": "bmi2", "AVX_VNNI": "avx_vnni",
    "AVX512": "avx512f", "AVX512_VBMI": "avx512vbmi", "AVX512_VNNI": "avx512_vnni", "AVX512_BF16": "avx512_bf16",
    "AMX_INT8": "amx_int8", "AMX_BF16": "amx_bf16",
}


@functools.cache
def _llama_cpp():
    import llama_cpp  # loads the native library: only when a plan needs the answer

    return llama_cpp


def llamacpp_gpu_offload() -> bool:
    """llama_supports_gpu_offload() of the llama.cpp library this Python loads."""
    return bool(_llama_cpp().llama_supports_gpu_offload())


def llamacpp_cpu_features() -> list[str]:
    """The instruction sets the loaded llama.cpp library was compiled to use, as /proc/cpuinfo names them."""
    info = _llama_cpp().llama_print_system_info().decode()
    return [SYSTEM_INFO_FLAGS[name] for name in re.findall(r"(\w+) = 1", info) if name in SYSTEM_INFO_FLAGS]


def check_engine_builds(plan: Plan, machine: Inventory) -> None:
    """Refuse a plan for `machine` (this one) that the installed engines cannot run as planned."""
    llamacpp = [m for m in plan.models if m.engine == "llamacpp"]
    if not llamacpp:
        return
    if machine.cpu.flags and (missing := [f for f in llamacpp_cpu_features() if f not in machine.cpu.flags]):
        raise PlanError(
            f"this llama.cpp build uses CPU instructions this machine cannot run ({', '.join(missing)} missing on "
            f"{machine.cpu.model}): its engines would die with SIGILL. Install a build made for this CPU "
            "(installer/llama_build.py's baseline needs AVX2)."
        )
    offloaded = [m.name for m in llamacpp if m.gpu_layers]
    if offloaded and not llamacpp_gpu_offload():
        raise PlanError(
            f"{', '.join(offloaded)}: the plan puts llama.cpp layers on the GPU, but this llama.cpp build has no "
            "GPU offload (llama_supports_gpu_offload() is false; the appliance's build is portable and CPU-only). "
            "Set gpu_layers: 0 on these models in the profile to run them on the CPU, or serve them with engine: vllm."
        )
