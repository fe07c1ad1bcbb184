"""A device's result in a build, typed and frozen: what its profile says, the shape chosen for it, what
was built, or why it failed. One :meth:`DeviceResult.to_manifest` writes its manifest entry.

Its life: :meth:`DeviceResult.for_profile` (the profile and the target the model card describes), then
:meth:`chose` (the search, the selection), then :meth:`built` (fine-tune, measurements, artifacts) or
:meth:`failed` at any point. Each step returns a new result; nothing updates one in place, so the status
is set in exactly one place per outcome.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from factory.io import content_key

Status = Literal["pending", "ok", "failed"]


def profile_hash(profile) -> str:
    """The sha256 of the profile's file, or of its content when it was not read from one."""
    return (
        hashlib.sha256(Path(profile.path).read_bytes()).hexdigest()
        if profile.path
        else content_key(profile.model_dump())
    )


@dataclass(frozen=True)
class DeviceResult:
    name: str
    profile: Mapping[str, Any]  # path, sha256, the profile's data, budgets, target
    status: Status = "pending"
    error: str | None = None
    choice: Mapping[str, Any] = field(default_factory=dict)  # shape, predicted, search, selection, latency basis/band
    product: Mapping[str, Any] = field(
        default_factory=dict
    )  # init, fine-tune, accuracy, measurements, artifacts, deploy

    @classmethod
    def for_profile(cls, profile) -> DeviceResult:
        """A device before its search: the profile, and what the model card says of the target."""
        target = {
            "description": profile.description or profile.name,
            "precision": profile.precision,
            "batch": profile.batch,
            "runtime": profile.hardware.runtime,
            "this_host": bool(profile.hardware.measure),
            **({"use": profile.use} if profile.use else {}),
            **({"input_size": profile.input_size} if profile.input_size else {}),
        }
        part = {
            "profile": str(profile.path),
            "profile_sha256": profile_hash(profile),
            "profile_data": profile.model_dump(mode="json", exclude_none=True),  # export needs no path to re-read it
            "budgets": dict(profile.budgets.items()),
            "target": target,
        }
        return cls(profile.name, part)

    # -- transitions ------------------------------------------------------------------------------------------

    def chose(self, **fields: Any) -> DeviceResult:
        """With the search's and the selection's fields added (later ones replace earlier ones)."""
        return dataclasses.replace(self, choice={**self.choice, **fields})

    def failed(self, reason: str) -> DeviceResult:
        return dataclasses.replace(self, status="failed", error=reason)

    def built(self, record: Mapping[str, Any]) -> DeviceResult:
        """Built: ``record`` is :func:`factory.pipeline.manifest.device_record`'s."""
        return dataclasses.replace(self, status="ok", error=None, product=dict(record))

    # -- reading ----------------------------------------------------------------------------------------------

    @property
    def is_failed(self) -> bool:
        return self.status == "failed"

    def to_manifest(self) -> dict[str, Any]:
        """The device's manifest entry (:data:`factory.pipeline.manifest_schema.MANIFEST_SCHEMA`)."""
        out = {"name": self.name, **self.profile, **self.choice, **self.product}
        if self.status != "pending":
            out["status"] = self.status
        if self.error is not None:
            out["error"] = self.error
        return out

    def __getitem__(self, key: str) -> Any:
        """Read a manifest field (``result["shape"]``), as the report and the model card read entries."""
        return self.to_manifest()[key]

    def __contains__(self, key: str) -> bool:
        return key in self.to_manifest()

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_manifest().get(key, default)
