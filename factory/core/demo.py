"""The shipped demo assets, read-only: the demo ancestry and the trained demo learngene.

Training the demo ancestry is :mod:`factory.training.demo_recipe`; where the files live is
:mod:`factory.core.assets`.
"""

from __future__ import annotations

from factory.core.ancestry import Ancestry, load_demo_ancestry
from factory.core.assets import PACKAGED_LEARNGENE
from factory.core.learngene import Learngene
from factory.errors import FactoryError

__all__ = ["PACKAGED_LEARNGENE", "load_demo_ancestry", "load_demo_learngene"]


def load_demo_learngene(ancestry: Ancestry | None = None):
    """The shipped trained learngene; ``ancestry`` (default: the demo one) must be the one it
    was made from, else a :class:`FactoryError` says so (e.g. a user-trained demo ancestry)."""
    anc = ancestry or load_demo_ancestry()
    lg = Learngene.load(PACKAGED_LEARNGENE)
    if lg.meta.get("ancestry", {}).get("sha256") != anc.sha256:
        raise FactoryError(
            f"the shipped demo learngene was made from another ancestry than {anc.spec!r} ({anc.sha256[:12]}); "
            "make one with `peg-factory learngene` and `peg-factory learngene train`"
        )
    return lg
