"""peg-factory: PEG learngenes expanded into timm ViTs sized for devices.

The public API; the ``peg-factory`` CLI is a thin layer over it.
"""

from factory._version import __version__
from factory.core.ancestry import DEMO_ARCH, Ancestry, load_ancestry
from factory.core.baselines import METHODS, init_descendant
from factory.core.expand import expand, expand_tensors
from factory.core.flops import count_flops, count_params
from factory.core.learngene import Learngene, sample_learngene
from factory.core.mirror import MirrorProbe
from factory.core.mixing import DepthMap
from factory.core.shapes import ArchConfig, DescendantShape, vit_flops, vit_params
from factory.core.transfer import TransferProbe
from factory.device.profile import Profile, load_profile
from factory.device.resolve import latency_model_for
from factory.device.roofline import CostModel
from factory.device.search import SearchSpace, search
from factory.errors import FactoryError
from factory.pipeline.build import build
from factory.pipeline.config import BuildConfig
from factory.pipeline.executor import LocalExecutor, RayExecutor

__all__ = [
    "__version__",
    "DEMO_ARCH",
    "METHODS",
    "Ancestry",
    "ArchConfig",
    "BuildConfig",
    "CostModel",
    "LocalExecutor",
    "MirrorProbe",
    "Profile",
    "RayExecutor",
    "SearchSpace",
    "TransferProbe",
    "DepthMap",
    "DescendantShape",
    "FactoryError",
    "Learngene",
    "count_flops",
    "count_params",
    "expand",
    "expand_tensors",
    "build",
    "init_descendant",
    "latency_model_for",
    "load_ancestry",
    "load_profile",
    "sample_learngene",
    "search",
    "vit_flops",
    "vit_params",
]
