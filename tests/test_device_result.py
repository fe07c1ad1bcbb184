"""A device's result in a build: typed, frozen, one manifest entry, each status set in one place."""

from __future__ import annotations

import dataclasses

import pytest

from factory.device.profile import load_profile
from factory.pipeline.device_result import DeviceResult


def test_a_result_is_frozen_and_each_step_returns_a_new_one():
    start = DeviceResult.for_profile(load_profile("demo/jetson_orin"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        start.status = "ok"  # type: ignore[misc]
    chosen = start.chose(shape={"depth": 3}, selection={"objective": "capacity"})
    assert start.choice == {} and chosen.choice["shape"] == {"depth": 3}
    assert chosen.status == "pending" and "status" not in chosen.to_manifest()
    built = chosen.built({"init": "peg", "artifacts": {}})
    failed = chosen.failed("nothing fits")
    assert built.to_manifest()["status"] == "ok" and "error" not in built.to_manifest()
    assert failed.to_manifest()["status"] == "failed" and failed["error"] == "nothing fits"
    assert chosen.status == "pending"  # unchanged by either outcome


def test_the_manifest_entry_holds_the_profile_the_choice_and_the_product():
    prof = load_profile("demo/raspberry_pi5")
    entry = DeviceResult.for_profile(prof).chose(shape={"depth": 2}).built({"init": "scratch"}).to_manifest()
    assert entry["name"] == prof.name and entry["target"]["runtime"] == prof.hardware.runtime
    assert entry["profile_data"]["name"] == prof.name and len(entry["profile_sha256"]) == 64
    assert entry["shape"] == {"depth": 2} and entry["init"] == "scratch" and entry["status"] == "ok"
