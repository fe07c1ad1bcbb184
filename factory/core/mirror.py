"""Does a horizontal flip keep an image's label on this task? The math of ``--hflip auto``.

A flip is a label-preserving augmentation exactly when the task's images are mirror-symmetric class by
class: a mirrored image of class ``y`` is as typical of ``y`` as the image itself (photos of objects, scenes,
textures). Then *any* fixed classifier is as accurate on mirrored queries as on the images themselves: with
the gallery drawn from the task and a query ``q`` independent of it, ``flip(q)`` has the same distribution
as ``q``. Where a mirror changes what an image shows (digits, letters, text, arrows, a class pair told apart
by side) the mirrored queries fall to other classes. The check measures that with the ancestry's features
``f`` (its pooled pre-logit token, :func:`factory.core.transfer.pooled_features`) on ``n`` training images
in the evaluation view::

    acc   = leave-one-out k-NN accuracy of f(x_i)       against the gallery {f(x_j) : j != i}
    acc_m = leave-one-out k-NN accuracy of f(flip(x_i)) against the same gallery
    kept  = (acc_m - chance) / (acc - chance)           chance = the sample's majority-class share

and decides (:func:`choose_hflip`):

1. ``acc - chance`` below ``min_signal_se`` binomial SEs of ``acc``: the features separate the classes too
   little to tell (a random-weight ancestry, a task far from it) -> no flip, the safe side: a wrong flip
   mislabels every mirrored image of an asymmetric class (bench/RESULTS.md, "The training view of a folder":
   -7.6 to -20.7 points on digits), a missing one costs photos a little (+2.0 points, within one SE, on
   textures there);
2. no flip when the mirrored images lose their class both *materially* -- ``kept < min_kept`` -- and
   *significantly*: McNemar's ``z = (lost - gained) / sqrt(lost + gained) >= min_loss_z``, with ``lost`` the
   images k-NN classifies right and misclassifies mirrored and ``gained`` the other way round; else flip
   with probability ``flip`` (timm's 0.5).

Both conditions, because a photo task keeps 1.0 only in expectation: at the probe's 100-512 images the photo
crops of ``textures`` kept 0.52-1.28 (mean 0.87-0.92) at ``z`` up to 2.4, while digits and MNIST kept 0.16-0.43
at ``z`` 5.8 or more (5 samples of each size, bench/mirror_check.py). ``min_loss_z`` 3 sits between: digits are
refused with a wide margin, and the photo crops' sampling noise is not taken for a mirror's loss (a wrong flip
cost digits 7.6-20.7 points, a missed one the photo crops 2.0: bench/train_view.py). The sample is the init
probe's (spread over the split: every class). Everything is in :class:`MirrorProbe`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from factory.errors import FactoryError


@dataclass(frozen=True)
class MirrorProbe:
    """How ``--hflip auto`` decides (module docstring)."""

    flip: float = 0.5  # the flip probability where the task is mirror-symmetric (timm's)
    min_kept: float = 0.9  # mirrored queries must keep this share of the k-NN accuracy above chance
    min_signal_se: float = 3.0  # k-NN accuracy must beat chance by this many binomial SEs to tell at all
    min_loss_z: float = 3.0  # ... and a loss below min_kept must be this significant (McNemar's z) to refuse the flip
    k: int = 10  # neighbours voting

    def __post_init__(self) -> None:
        ok = (
            0 < self.flip <= 1
            and 0 < self.min_kept <= 1
            and self.min_signal_se >= 0
            and self.min_loss_z >= 0
            and self.k >= 1
        )
        if not ok or any(map(math.isnan, (self.flip, self.min_kept, self.min_signal_se, self.min_loss_z))):
            raise FactoryError(
                f"invalid mirror probe {self}: flip and min_kept in (0, 1], min_signal_se and min_loss_z >= 0, k >= 1",
                param="mirror_probe",
            )


@dataclass(frozen=True)
class MirrorCheck:
    """What ``--hflip auto`` measured and chose."""

    accuracy: float  # acc: k-NN on the images
    mirrored_accuracy: float  # acc_m: k-NN on the same images mirrored, against the unmirrored gallery
    chance: float  # the sample's majority-class share
    images: int
    lost: int  # images k-NN got right and got wrong mirrored
    gained: int  # ... and the other way round
    hflip: float  # the chosen flip probability
    reason: str
    seconds: float = 0.0

    @property
    def kept(self) -> float:
        return kept_share(self.accuracy, self.mirrored_accuracy, self.chance)

    @property
    def loss_z(self) -> float:
        return mcnemar_z(self.lost, self.gained)

    def to_dict(self) -> dict:
        kept = self.kept
        return {
            "hflip": self.hflip,
            "reason": self.reason,
            "knn_accuracy": round(self.accuracy, 4),
            "mirrored_knn_accuracy": round(self.mirrored_accuracy, 4),
            "chance": round(self.chance, 4),
            "kept": None if math.isnan(kept) else round(kept, 4),
            "lost": self.lost,
            "gained": self.gained,
            "loss_z": round(self.loss_z, 2),
            "images": self.images,
            "seconds": round(self.seconds, 3),
            "method": "leave-one-out k-NN of the ancestry's pooled features, mirrored queries against unmirrored images",
        }


def kept_share(accuracy: float, mirrored: float, chance: float) -> float:
    """``kept = (acc_m - chance) / (acc - chance)``; ``nan`` when ``acc`` is not above chance."""
    signal = accuracy - chance
    return (mirrored - chance) / signal if signal > 0 else float("nan")


def mcnemar_z(lost: int, gained: int) -> float:
    """McNemar's ``z = (lost - gained) / sqrt(lost + gained)`` of paired right/wrong outcomes (0 with none)."""
    return (lost - gained) / math.sqrt(lost + gained) if lost + gained else 0.0


def choose_hflip(
    accuracy: float, mirrored: float, chance: float, n: int, lost: int, gained: int, probe: MirrorProbe
) -> tuple[float, str]:
    """``(flip probability, why)`` by the module docstring's rule."""
    se = math.sqrt(max(accuracy * (1 - accuracy), 1.0 / max(n, 1)) / max(n, 1))
    signal = accuracy - chance
    figures = f"k-NN {accuracy:.3f}, mirrored {mirrored:.3f}, chance {chance:.3f}, {n} images"
    if not (signal > 0 and signal >= probe.min_signal_se * se):  # NaN too; at chance nothing tells, whatever the SE
        return 0.0, (
            f"the ancestry's features separate the classes too little to tell whether a mirror keeps the label "
            f"({figures}: {signal:.3f} above chance, under {probe.min_signal_se:g} SE); no flip, the safe side"
        )
    kept, z = kept_share(accuracy, mirrored, chance), mcnemar_z(lost, gained)
    if kept < probe.min_kept and z >= probe.min_loss_z:
        return 0.0, (
            f"mirrored images lose their class ({figures}: kept {kept:.2f} < {probe.min_kept:g}, z {z:.1f} >= "
            f"{probe.min_loss_z:g}): a flip would mislabel them"
        )
    return probe.flip, f"mirrored images keep their class ({figures}: kept {kept:.2f}, z {z:.1f})"


def mirror_scores(features: torch.Tensor, mirrored: torch.Tensor, labels: torch.Tensor, k: int):
    """``(acc, acc_m, lost, gained)`` of the module docstring from paired features of the images and their mirrors."""
    from factory.core.transfer import knn_loo_predict

    right = knn_loo_predict(features, labels, k) == labels
    right_m = knn_loo_predict(features, labels, k, queries=mirrored) == labels
    lost = int((right & ~right_m).sum())
    gained = int((right_m & ~right).sum())
    return float(right.double().mean()), float(right_m.double().mean()), lost, gained


def check_mirror(
    model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, probe: MirrorProbe = MirrorProbe()
) -> MirrorCheck:
    """:class:`MirrorCheck` of ``model``'s features (a timm ViT: the ancestry) on ``images`` (``(N, C, H, W)``,
    the evaluation view) and ``labels``; fewer than two images or one class cannot tell: no flip."""
    from factory.core.transfer import pooled_features

    t0 = time.perf_counter()
    n = int(labels.shape[0])
    if n < 2 or int(labels.unique().numel()) < 2:
        return MirrorCheck(
            float("nan"), float("nan"), 1.0, n, 0, 0, 0.0, "too few images or classes to tell; no flip", 0.0
        )
    features = pooled_features(model, images)
    mirrored = pooled_features(model, images.flip(-1))
    acc, acc_m, lost, gained = mirror_scores(features, mirrored, labels, probe.k)
    chance = float(torch.bincount(labels).max()) / n
    hflip, why = choose_hflip(acc, acc_m, chance, n, lost, gained, probe)
    return MirrorCheck(acc, acc_m, chance, n, lost, gained, hflip, why, time.perf_counter() - t0)
