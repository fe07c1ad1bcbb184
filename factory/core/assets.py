"""The assets shipped in the package (demo ancestry, demo learngene) and what identifies an
ancestry spec, computed without importing torch (cache keys must be cheap)."""

from __future__ import annotations

from pathlib import Path

from factory.io import cache_dir, model_file, sha256_file

ASSETS = Path(__file__).resolve().parent.parent / "assets"
PACKAGED_DEMO = ASSETS / "demo_ancestry.safetensors"
#: The demo learngene shipped with the package: made from the shipped demo ancestry by
#: ``peg-factory learngene`` + ``peg-factory learngene train`` (its ``expanding_log.jsonl`` and
#: ``learngene.json`` say with what), so a default build does not pay for the expanding phase.
PACKAGED_LEARNGENE = ASSETS / "demo_learngene"


def demo_checkpoint_path() -> Path:
    return cache_dir() / "demo_ancestry" / "model.safetensors"


def demo_weights() -> Path | None:
    """The demo ancestry's weights file that ``load_ancestry("demo")`` uses, if any."""
    return next((p for p in (demo_checkpoint_path(), PACKAGED_DEMO) if p.is_file()), None)


def ancestry_fingerprint(spec: str) -> str:
    """Identity of an ancestry spec's weights: file hashes for checkpoints and the demo, the spec
    itself for timm names (``random:`` is seeded; pretrained tags are fixed by the timm version)."""
    if spec == "demo":
        weights = demo_weights()
        return f"demo:{sha256_file(weights)}" if weights else "demo:random"
    path_text = spec.rsplit("@", 1)[0] if "@" in spec else spec
    path = model_file(Path(path_text).expanduser())
    if path.is_file():
        return f"{sha256_file(path)}@{spec.rsplit('@', 1)[1] if '@' in spec else ''}"
    import importlib.metadata as md

    try:
        timm_version = md.version("timm")
    except md.PackageNotFoundError:
        timm_version = "?"
    return f"{spec}|timm {timm_version}"
