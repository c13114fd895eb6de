"""What the engine builds installed on this machine need and can do, checked against a plan.

llama.cpp's server is built portable (installer/llama_build.py): an x86-64 baseline with
AVX2, CPU-only, as the build.json of the appliance-llama-server package records. A machine
without one of its instruction sets would kill the engine with SIGILL, one without a shared
library it links (libgomp, libstdc++) would stop it at exec, and a plan that puts llama.cpp
layers on a GPU would silently run on the CPU: all are refused before anything starts.
"""

from __future__ import annotations

import ctypes

from appliance.errors import PlanError
from appliance.planning.inventory import Inventory
from appliance.planning.plan_model import Plan


def _build_info() -> dict:
    """build.json of the installed llama-server (the appliance-llama-server wheel)."""
    try:
        import appliance_llama_server  # imported only when a plan needs the answer
    except ImportError:
        raise PlanError(
            "llama.cpp's server is not installed (no appliance-llama-server package): "
            "build and install it with installer/llama_build.py (make install does both)"
        ) from None
    return appliance_llama_server.build_info()


def llamacpp_gpu_offload() -> bool:
    """Whether the installed llama-server was built with a GPU backend (build.json's gpu_offload)."""
    return bool(_build_info().get("gpu_offload"))


def llamacpp_cpu_features() -> list[str]:
    """The instruction sets the installed llama-server was compiled to use, as /proc/cpuinfo names them."""
    return list(_build_info().get("cpu_features", []))


# Where a machine lacks a library the server links: the Debian package that has it.
LIBRARY_PACKAGES = {"libgomp.so.1": "libgomp1", "libstdc++.so.6": "libstdc++6", "libgcc_s.so.1": "libgcc-s1"}


def missing_libraries(names: list[str]) -> list[str]:
    """The shared libraries among `names` that this machine's dynamic linker cannot load."""
    missing = []
    for name in names:
        try:
            ctypes.CDLL(name)
        except OSError:
            missing.append(name)
    return missing


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
    if missing := missing_libraries(_build_info().get("needed_libraries", [])):
        packages = sorted({LIBRARY_PACKAGES.get(name, name) for name in missing})
        raise PlanError(
            f"this llama.cpp build needs {', '.join(missing)}, which this machine does not have: its engines could not "
            f"start. Install {' '.join(packages)} (Debian: apt-get install {' '.join(packages)})."
        )
    check_gpu_offload(plan)


def check_gpu_offload(plan: Plan) -> None:
    """Refuse llama.cpp layers on a GPU when the build (this machine's, the image's on k3s) is CPU-only."""
    offloaded = [m.name for m in plan.models if m.engine == "llamacpp" and m.gpu_layers]
    if offloaded and not llamacpp_gpu_offload():
        raise PlanError(
            f"{', '.join(offloaded)}: the plan puts llama.cpp layers on the GPU, but this llama.cpp build has no "
            "GPU offload (its build.json says gpu_offload: false; the appliance's build is portable and CPU-only). "
            "Set gpu_layers: 0 on these models in the profile to run them on the CPU, or serve them with engine: vllm."
        )
