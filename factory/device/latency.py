"""What the searcher needs from a device, as protocols: a latency model and a budgeted target.

Implementations: :class:`factory.device.roofline.CostModel` (the roofline, optionally fitted to a
calibration CSV by :mod:`factory.device.fit`, or answering latency from measured
:class:`factory.device.tables.KernelTables`). Which one a profile gets is decided in one place,
:func:`factory.device.resolve.latency_model_for`. The searcher (:func:`factory.device.search.search`)
imports none of them, as once-for-all's search takes an efficiency predictor.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from factory.core.shapes import ArchConfig, DescendantShape


@runtime_checkable
class LatencyModel(Protocol):
    """Predicted latency (ms, at the target's batch unless ``batch`` is given) and memory (MB) of a shape."""

    arch: ArchConfig  # the ancestry's architecture: stem, channels, patch size the shapes inherit
    method: str  # how latency is predicted, in words (search output, manifest)
    band: str  # the stated error band of that basis and its evidence, in words (search output, manifest, card)

    def latency_ms(self, shape: DescendantShape, batch: int | None = None) -> float: ...

    def memory_mb(self, shape: DescendantShape) -> float: ...


class Budgets(Protocol):
    def items(self) -> list[tuple[str, float]]: ...


class Target(Protocol):
    """A device as the searcher sees it: a name, the batch it runs, and budgets by name
    (``latency_ms``, ``memory_mb``, ``flops_g``, ``params_m``). A :class:`factory.device.profile.Profile` is one."""

    name: str
    batch: int
    budgets: Budgets
