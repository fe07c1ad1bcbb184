"""peg-factory: PEG learngenes expanded into timm ViTs sized for devices.

The public API; the ``peg-factory`` CLI is a thin layer over it.
"""

__version__ = "0.1.0"

from factory.core.ancestry import DEMO_ARCH, Ancestry, load_ancestry  # noqa: E402
from factory.core.baselines import METHODS, init_descendant  # noqa: E402
from factory.errors import FactoryError  # noqa: E402
from factory.core.expand import expand, expand_tensors  # noqa: E402
from factory.core.flops import count_flops, count_params  # noqa: E402
from factory.core.learngene import Learngene, sample_learngene  # noqa: E402
from factory.core.mixing import DepthMap  # noqa: E402
from factory.core.shapes import ArchConfig, DescendantShape, vit_flops, vit_params  # noqa: E402
from factory.device.cost import CostModel  # noqa: E402
from factory.device.profile import Profile, load_profile  # noqa: E402
from factory.device.search import SearchSpace, search  # noqa: E402
from factory.pipeline.build import BuildConfig, build  # noqa: E402
from factory.pipeline.executor import LocalExecutor, RayExecutor  # noqa: E402

__all__ = [
    "DEMO_ARCH",
    "METHODS",
    "Ancestry",
    "ArchConfig",
    "BuildConfig",
    "CostModel",
    "LocalExecutor",
    "Profile",
    "RayExecutor",
    "SearchSpace",
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
    "load_ancestry",
    "load_profile",
    "sample_learngene",
    "search",
    "vit_flops",
    "vit_params",
]
