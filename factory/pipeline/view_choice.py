"""``--hflip auto``: the build decides, once per build and before anything is planned or cached, whether its
fine-tunes draw mirrored training views (:mod:`factory.core.mirror` has the rule and its figures).

Only a streamed ImageFolder's training views can be flipped (:class:`factory.data.stream.TrainView`); a data set
held in memory is trained on its images as they are, so ``auto`` is 0 there and nothing is measured. The check
runs on the init probe's spread sample of the training split, with the ancestry's own model; its decision
replaces ``hflip`` in the build's config, so the fine-tunes' recipe and cache keys carry the number (a build
given ``--hflip 0.5`` shares its fine-tunes with an ``auto`` build that chose 0.5).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from factory.pipeline.context import BuildContext


def decide_hflip(ctx: BuildContext):
    """Resolve ``ctx.cfg.hflip == "auto"`` in place; the :class:`~factory.core.mirror.MirrorCheck` when one ran
    (None for a fixed ``--hflip`` or data in memory), after logging the choice."""
    from factory.core.mirror import check_mirror
    from factory.data import ImageTensors, spread_sample
    from factory.pipeline.stages import probe_images

    if ctx.cfg.hflip != "auto":
        return None
    if isinstance(ctx.data.train, ImageTensors):
        ctx.cfg = dataclasses.replace(ctx.cfg, hflip=0.0)
        return None
    sample = spread_sample(ctx.data.train, probe_images(ctx))
    check = check_mirror(ctx.ancestry.model, sample.images, sample.labels, ctx.cfg.mirror_probe)
    ctx.cfg = dataclasses.replace(ctx.cfg, hflip=check.hflip)
    ctx.log(f"training view: --hflip auto -> {check.hflip:g}: {check.reason} ({check.seconds:.1f}s)")
    return check


def mirror_part(check) -> dict[str, Any]:
    """The manifest's (and dry run's) record of the ``--hflip auto`` check: ``{}`` when none was made."""
    return {} if check is None else {"hflip_check": check.to_dict()}
