"""Fleet files: ``profiles: [a.yaml, b.yaml]``, the profiles one build makes models for."""

from __future__ import annotations

from pathlib import Path

from factory.device.profile import MAX_PROFILE_BYTES, load_yaml, shipped_file, shipped_names
from factory.errors import FactoryError
from factory.io import require_regular_file

FLEET_KEYS = {"profiles"}


def load_fleet(path: str | Path) -> list[str]:
    """Profiles listed by a fleet file (``profiles: [a.yaml, b.yaml, demo/pixel8]``): a path relative to the
    file, or a shipped profile's name (no suffix, not a file beside the fleet), as ``--profile`` takes them; an
    unknown or repeated key is refused, as in a profile."""
    import yaml

    path = shipped_fleet(path)
    require_regular_file(path, "fleet")  # a FIFO would be read forever
    try:
        if path.stat().st_size > MAX_PROFILE_BYTES:
            raise FactoryError(
                f"fleet {path}: larger than a fleet file needs ({MAX_PROFILE_BYTES} bytes); check the file"
            )
        data = load_yaml(path.read_text())
    except RecursionError as exc:
        raise FactoryError(f"fleet {path}: nested too deeply to be a fleet file; fix the YAML") from exc
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
        raise FactoryError(
            f"fleet {path}: cannot read it ({' '.join(str(exc).split())[:200]}); check the file"
        ) from exc
    if isinstance(data, dict) and set(data) - FLEET_KEYS:
        raise FactoryError(
            f"fleet {path}: unknown key {sorted(map(str, set(data) - FLEET_KEYS))[0]!r}; a fleet file holds "
            "'profiles: [profile.yaml, ...]' only"
        )
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("profiles"), list)
        or not data["profiles"]
        or not all(isinstance(p, str) and p for p in data["profiles"])
    ):
        raise FactoryError(f"fleet {path}: expected 'profiles: [profile.yaml, ...]' (a list of paths)")
    return [_entry(path.parent, p) for p in data["profiles"]]


def shipped_fleets() -> list[str]:
    """Names of the shipped fleet files (``demo/fleet``): ``--fleet`` takes them as ``--profile`` takes
    ``jetson_orin``."""
    return shipped_names(fleets=True)


def shipped_fleet(spec: str | Path) -> Path:
    """``spec`` as a path where it exists or names a file (a suffix), else the shipped fleet of that name
    (:func:`factory.device.profile.shipped_file`, a fleet's name only); a path that is neither is one line naming
    the shipped fleets."""
    path = Path(spec)
    if path.exists() or path.suffix:
        return path
    shipped = shipped_file(spec)
    if shipped is not None and path.as_posix() in shipped_fleets():
        return shipped
    raise FactoryError(f"fleet {spec} not found; pass a fleet file or one of: {', '.join(shipped_fleets())}")


def _entry(folder: Path, spec: str) -> str:
    """``spec`` as :func:`factory.device.profile.load_profile` takes it: absolute, relative to the fleet's
    ``folder`` where that exists or it names a file (a suffix), else a shipped profile's name."""
    if Path(spec).is_absolute():
        return spec
    beside = (folder / spec).resolve()
    return str(beside) if beside.exists() or Path(spec).suffix else spec
