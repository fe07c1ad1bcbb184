"""A datasheet profile of the machine that runs the check, from its own /proc/cpuinfo: ISA, cores, clock."""

from __future__ import annotations

import pytest

from factory.device.host_datasheet import cpu_facts, flop_per_cycle, host_datasheet, host_datasheet_profile
from factory.errors import FactoryError

from .helpers import cli_run

ZEN4 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC 9R14 96-Core Processor
cpu MHz\t\t: 2600.000
flags\t\t: fpu sse sse2 avx fma avx2 avx512f avx512bw avx512_vnni avx512_bf16

processor\t: 1
vendor_id\t: AuthenticAMD
"""
XEON_AMX = (
    ZEN4.replace("AuthenticAMD", "GenuineIntel")
    .replace("cpu family\t: 25", "cpu family\t: 6")
    .replace("avx512_bf16", "avx512_bf16 amx_tile amx_int8 amx_bf16")
    .replace("2600.000", "2000.000")
)
AVX2 = (
    "vendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel name\t: Intel(R) Core(TM) i7-8700 CPU @ 3.20GHz\n"
    "flags\t\t: sse avx fma avx2\n"
)


def test_the_zen4_vm_gives_the_figures_its_hand_written_profile_has():
    sheet = host_datasheet(ZEN4, cores=2)
    assert sheet["hardware"]["peak_tflops"] == {"fp32": 0.1664, "int8": 0.6656}  # profiles/host_datasheet.yaml's
    assert "Zen 4" in sheet["hardware"]["source"] and "2600 MHz" in sheet["hardware"]["source"]


def test_an_intel_vm_with_amx_is_not_described_as_zen4():
    per_cycle, why = flop_per_cycle(cpu_facts(XEON_AMX))
    assert per_cycle == 64 and "AMX" in why  # two 512-bit FMA units: twice Zen 4's 32
    assert host_datasheet(XEON_AMX, cores=2)["hardware"]["peak_tflops"]["fp32"] == pytest.approx(2 * 64 * 2.0 / 1000)


def test_avx2_without_mhz_reads_the_clock_from_the_model_name_and_has_no_vnni():
    sheet = host_datasheet(AVX2, cores=4)["hardware"]
    assert sheet["peak_tflops"] == {
        "fp32": pytest.approx(4 * 32 * 3.2 / 1000),
        "int8": pytest.approx(4 * 32 * 3.2 / 500),
    }
    assert "no 8-bit dot products" in sheet["source"] and sheet["memory_bandwidth_gbs"] == 19.2
    with pytest.raises(FactoryError, match="no clock"):
        host_datasheet(AVX2.replace(" @ 3.20GHz", ""), cores=1)


def test_this_machines_profile_loads_and_the_cli_prints_it():
    prof = host_datasheet_profile()
    assert (
        prof.hardware.cores >= 1 and prof.hardware.peak_tflops["fp32"] > 0 and "/proc/cpuinfo" in prof.hardware.source
    )
    res = cli_run("profiles", "datasheet")
    assert res.exit_code == 0 and "name: host_datasheet" in res.output and "nothing in it was measured" in res.output
