"""The CUDA driver and GPU as TensorRT will meet them, asked without PyTorch.

A CPU-only torch, or a torch built for a newer CUDA than the driver runs, knows no GPU; TensorRT
and pycuda only need the driver. So the GPU's name and compute capability come from pycuda or from
the driver library itself (libcuda), and the driver's CUDA version is compared with the CUDA the
installed TensorRT wheel was built for (`tensorrt-cu12` / `tensorrt-cu13`) before TensorRT is asked
to start.
"""
from __future__ import annotations

import ctypes
import importlib.metadata
import logging
import re

log = logging.getLogger(__name__)

# Linux driver branch that each CUDA major of NVIDIA's pip wheels needs (TensorRT's install prerequisites)
MIN_DRIVER = {12: "r535", 13: "r580"}
_COMPUTE_CAPABILITY_MAJOR, _COMPUTE_CAPABILITY_MINOR = 75, 76  # CUdevice_attribute values


def _libcuda():
    """The CUDA driver library, or None where there is none."""
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None


def driver_cuda_version() -> tuple[int, int] | None:
    """(major, minor) of the newest CUDA the installed driver supports (nvidia-smi's "CUDA Version"); None
    without a driver."""
    lib = _libcuda()
    if lib is None:
        return None
    version = ctypes.c_int(0)
    if lib.cuDriverGetVersion(ctypes.byref(version)) != 0 or version.value <= 0:
        return None
    return version.value // 1000, version.value % 1000 // 10


def _gpu_from_pycuda(device: int) -> dict[str, str] | None:
    try:
        import pycuda.driver as cuda

        cuda.init()
        dev = cuda.Device(device)
        return {"name": dev.name(), "compute_capability": "{}.{}".format(*dev.compute_capability())}
    except Exception:  # noqa: BLE001 - pycuda missing, no driver, no GPU: try the driver itself
        return None


def _gpu_from_driver(device: int) -> dict[str, str] | None:
    lib = _libcuda()
    if lib is None or lib.cuInit(0) != 0:
        return None
    handle, major, minor = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(0)
    name = ctypes.create_string_buffer(256)
    if (lib.cuDeviceGet(ctypes.byref(handle), device) != 0
            or lib.cuDeviceGetName(name, len(name), handle) != 0
            or lib.cuDeviceGetAttribute(ctypes.byref(major), _COMPUTE_CAPABILITY_MAJOR, handle) != 0
            or lib.cuDeviceGetAttribute(ctypes.byref(minor), _COMPUTE_CAPABILITY_MINOR, handle) != 0):
        return None
    return {"name": name.value.decode(errors="replace"), "compute_capability": f"{major.value}.{minor.value}"}


GPU_PROBES = (_gpu_from_pycuda, _gpu_from_driver)


def gpu_info(device: int = 0) -> dict[str, str] | None:
    """{"name", "compute_capability"} of CUDA device `device` (the strings pycuda reports), or None without one."""
    for probe in GPU_PROBES:
        found = probe(device)
        if found:
            return found
    return None


def gpu_count() -> int:
    """How many CUDA GPUs this process sees (CUDA_VISIBLE_DEVICES applies), asked of the driver without creating a
    context; 0 without a driver."""
    lib = _libcuda()
    count = ctypes.c_int(0)
    if lib is None or lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def wheel_cuda(flavour: str) -> tuple[str, int] | None:
    """(package, CUDA major) of the installed TensorRT wheel of `flavour` (tensorrt | tensorrt-rtx), e.g.
    ("tensorrt-cu13", 13); None when no wheel with a CUDA suffix is installed (a tar/deb install)."""
    pattern = re.compile(r"^tensorrt-rtx-cu(\d+)" if flavour == "tensorrt-rtx" else r"^tensorrt-cu(\d+)")
    found = []
    for dist in importlib.metadata.distributions():
        name = re.sub(r"[-_.]+", "-", dist.metadata["Name"] or "").lower()
        match = pattern.match(name)
        if match:
            found.append((f"{match.group(0)}", int(match.group(1))))
    return max(found, key=lambda f: f[1]) if found else None


def driver_problem(flavour: str) -> str | None:
    """Why the driver cannot run the installed TensorRT wheel (its CUDA is newer than the driver's), or None."""
    wheel, driver = wheel_cuda(flavour), driver_cuda_version()
    if wheel is None or driver is None or driver[0] >= wheel[1]:
        return None
    package, cuda_major = wheel
    fix = (f"pip uninstall -y tensorrt {package} {package}-libs {package}-bindings && pip install tensorrt-cu12"
           if flavour == "tensorrt" and cuda_major > 12 else f"install a {flavour} wheel built for CUDA {driver[0]}")
    return (f"the NVIDIA driver supports CUDA up to {driver[0]}.{driver[1]}, but {package} is built for CUDA "
            f"{cuda_major} (driver {MIN_DRIVER.get(cuda_major, 'newer')} or newer): {fix} (see "
            "requirements-gpu.txt), or update the driver")
