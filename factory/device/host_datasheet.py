"""A datasheet profile of *this* machine, from what it says of itself: its ISA, cores and clock.

The check of the published CPU latency terms (``bench/latency_model.py``, ``bench/latency_threads.py``) predicts
this host from datasheet figures alone. A profile written for one VM type (``profiles/host_datasheet.yaml``: a
Zen 4 EPYC, 32 FLOP/cycle at 2.6 GHz) mis-describes the next one (an Intel Xeon with two 512-bit FMA units:
64 FLOP/cycle), and the check then measures the wrong datasheet, not the terms. :func:`host_datasheet`
derives the figures from ``/proc/cpuinfo`` on the machine that runs the check:

- **FP32 FLOP/cycle/core** = 2 (FMA) x FP32 lanes per vector x FMA pipes (:func:`flop_per_cycle`): AVX-512 on
  Intel server cores (two 512-bit FMA units; AMX present says Sapphire Rapids or later) and on AMD Zen 5
  (family 26): 64; AVX-512 on AMD Zen 4 (family 25, executed as two 256-bit halves): 32; AVX2 + FMA (two 256-bit
  pipes since Haswell and Zen 2): 32; neither: 8 (SSE, two 128-bit adds and multiplies).
- **INT8** = 4 x FP32 where the CPU has 8-bit dot products (AVX-512 VNNI, AVX-VNNI or AMX-INT8), else 2 x.
- **Clock**: ``cpu MHz`` (a VM reports its TSC, the base clock; turbo is not counted: a shared VM rarely sees it).
- **Cores**: the CPUs this process may run on (``sched_getaffinity``).
- **Bandwidth**: a per-core fair share of a server socket, :data:`GBS_PER_CORE` (EPYC 9004: 460.8 GB/s for 96
  cores; Xeon 4th gen: 307 GB/s for 56): ``cpuinfo`` says nothing of memory, so this is an assumption, said so.

Every figure is returned with the line it came from (``source``), so the profile cites this machine.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

#: DRAM bandwidth per core of a server socket (GB/s): EPYC 9004 460.8/96 = 4.8, Xeon 4th gen 307/56 = 5.5.
GBS_PER_CORE = 4.8


def cpu_facts(cpuinfo: str) -> dict[str, Any]:
    """``vendor``, ``family``, ``model name``, ``mhz`` and ``flags`` of the first CPU in a ``/proc/cpuinfo`` text."""
    first = cpuinfo.split("\n\n")[0]
    fields = {}
    for line in first.splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    mhz = fields.get("cpu MHz")
    if mhz is None:  # some kernels (ARM) print no MHz: the model name may carry it ("@ 2.60GHz")
        found = re.search(r"@\s*([\d.]+)\s*GHz", fields.get("model name", ""))
        mhz = float(found.group(1)) * 1000 if found else None
    return {
        "vendor": fields.get("vendor_id", ""),
        "family": int(fields["cpu family"]) if fields.get("cpu family", "").isdigit() else None,
        "model_name": fields.get("model name", ""),
        "mhz": float(mhz) if mhz is not None else None,
        "flags": set(fields.get("flags", "").split()),
    }


def flop_per_cycle(facts: dict[str, Any]) -> tuple[int, str]:
    """``(FP32 FLOP per cycle per core, why)`` from the ISA flags, vendor and family (see module docstring)."""
    flags, vendor, family = facts["flags"], facts["vendor"], facts["family"]
    if "avx512f" in flags:
        if vendor == "AuthenticAMD" and (family or 0) < 26:
            return 32, "AVX-512 on AMD Zen 4 (family 25): two 256-bit FMA pipes = 16 FP32 FMA/cycle"
        what = "AMX, " if "amx_tile" in flags else ""
        return 64, f"AVX-512 ({what}two 512-bit FMA units) = 32 FP32 FMA/cycle"
    if "avx2" in flags and "fma" in flags:
        return 32, "AVX2 + FMA: two 256-bit FMA pipes = 16 FP32 FMA/cycle"
    return 8, "no AVX2/FMA: two 128-bit SSE pipes (add, multiply) = 8 FP32 FLOP/cycle"


def host_datasheet(cpuinfo: str | None = None, cores: int | None = None) -> dict[str, Any]:
    """A datasheet profile (the mapping a profile YAML holds) of this machine, or of ``cpuinfo``'s with ``cores``."""
    if cpuinfo is None:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    facts = cpu_facts(cpuinfo)
    if facts["mhz"] is None:
        from factory.errors import FactoryError

        raise FactoryError("/proc/cpuinfo gives no clock (cpu MHz or '@ x GHz'): write the datasheet profile by hand")
    per_cycle, why = flop_per_cycle(facts)
    ghz = facts["mhz"] / 1000
    fp32 = cores * per_cycle * ghz / 1000  # TFLOP/s
    vnni = facts["flags"] & {"avx512_vnni", "avx_vnni", "amx_int8"}
    int8 = fp32 * (4 if vnni else 2)
    name = facts["model_name"] or "this CPU"
    return {
        "name": "host_datasheet",
        "description": f"{name} ({cores} cores), onnxruntime CPU, FP32, batch 1, from this machine's own datasheet figures",
        "use": "the check of the published CPU terms: a CPU they were not fitted on, with budgets for one 224x224 frame at 30 fps",
        "input_size": 224,
        "hardware": {
            "kind": "cpu",
            "cores": cores,
            "peak_tflops": {"fp32": round(fp32, 4), "int8": round(int8, 4)},
            "memory_bandwidth_gbs": round(cores * GBS_PER_CORE, 1),
            "memory_mb": 4096,
            "runtime": "onnxruntime",
            "source": (
                f"/proc/cpuinfo of this machine: {name}, {facts['vendor'] or 'unknown vendor'} family "
                f"{facts['family']}, {facts['mhz']:.0f} MHz; {why}; {cores} x {per_cycle} x {ghz:.2f} GHz = "
                f"{fp32 * 1000:.1f} GFLOP/s FP32; INT8 x{4 if vnni else 2} "
                f"({'8-bit dot products: ' + ', '.join(sorted(vnni)) if vnni else 'no 8-bit dot products'}); "
                f"bandwidth assumed {GBS_PER_CORE} GB/s per core (a server socket's fair share)"
            ),
        },
        "precision": "fp32",
        "batch": 1,
        "budgets": {"latency_ms": 33.0},
        "export": ["onnx", "onnx-int8"],
    }


def host_datasheet_profile(cpuinfo: str | None = None, cores: int | None = None):
    """:func:`host_datasheet` validated as a :class:`factory.device.profile.Profile`."""
    import yaml

    from factory.device.profile import parse_profile

    return parse_profile(yaml.safe_dump(host_datasheet(cpuinfo, cores), sort_keys=False), "this machine's datasheet")
