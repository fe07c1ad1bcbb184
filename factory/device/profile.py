"""Device profiles: a target's budgets and hardware facts, validated.

A profile is a YAML file (schema: ``profiles/profile.schema.json``, generated from
:class:`Profile` by ``peg-factory profiles schema``)::

    name: jetson_orin
    hardware:
      kind: gpu                    # cpu | gpu | npu
      peak_tflops: {fp32: 5.3, fp16: 42.5, int8: 85.0}   # dense, 2 FLOPs per multiply-add
      memory_bandwidth_gbs: 204.8
      memory_mb: 8192             # memory the model may use on the device
      runtime: tensorrt            # tensorrt | onnxruntime | openvino
      source: "where the figures come from"
    precision: fp16                # fp32 | fp16 | int8
    batch: 1
    budgets: {latency_ms: 2.0, memory_mb: 256, flops_g: 5.0, params_m: 25}   # any, at least one
    calibration: orin_latency.csv  # optional: measured shape -> latency rows (relative path)
    export: [onnx, trt]

A CPU profile also declares ``hardware.cores`` (the cores its runtime's threads use): its latency is
then predicted with the generic CPU terms fitted on published ViT measurements
(:mod:`factory.device.published`), whose error band it states.

``hardware.measure: true`` (the shipped ``host.yaml``) means "this machine": peak throughput and
bandwidth are measured when the profile is resolved (:func:`factory.device.measure.measure_host`) instead
of declared. Every validation failure becomes one line naming the file, the field and the fix.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from export.formats import Format
from factory.device.runtimes import Runtime, runtime_spec
from factory.errors import FactoryError
from factory.io.atomic import require_regular_file

Precision = Literal["fp32", "fp16", "int8"]


def shipped_profiles_dir(source_root: Path = Path(__file__).resolve().parents[2]) -> Path:
    """Where the shipped profiles are: the source tree's ``profiles/`` (a clone, an editable install), else the
    copy a wheel installs under ``<prefix>/share/peg-factory/profiles`` (``pyproject.toml``'s data-files)."""
    source = source_root / "profiles"
    return source if source.is_dir() else Path(sys.prefix) / "share" / "peg-factory" / "profiles"


PROFILE_DIR = shipped_profiles_dir()
MAX_PROFILE_BYTES = 1 << 20
#: Names a device folder may not take: the files a build writes beside the device folders in ``--out``
#: (factory.pipeline.build.OUTPUT_FILES, report_files/; a test keeps them in step).
RESERVED_NAMES = ("manifest.json", "manifest.schema.json", "report.md", "report.html", "report_files")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Hardware(_Strict):
    kind: Literal["cpu", "gpu", "npu"]
    peak_tflops: dict[Precision, float] | None = Field(
        default=None, description="Dense peak throughput per precision, TFLOP/s (2 FLOPs per multiply-add)."
    )
    memory_bandwidth_gbs: float | None = Field(default=None, gt=0, description="DRAM bandwidth, GB/s.")
    memory_mb: float = Field(gt=0, description="Memory available to the model on the device, MB.")
    runtime: Runtime = Field(description="A registered runtime (factory.device.runtimes.RUNTIMES).")
    cores: int | None = Field(
        default=None,
        gt=0,
        le=4096,
        description="Cores the runtime's threads run on. A CPU profile that declares it (with datasheet peak and "
        "bandwidth) is predicted with the generic CPU terms fitted on published ViT measurements.",
    )
    measure: bool = Field(default=False, description="Measure peak and bandwidth on this machine instead.")
    source: str | None = Field(default=None, description="Citation for the figures.")

    @model_validator(mode="after")
    def _declared_or_measured(self) -> Hardware:
        if not self.measure:
            if not self.peak_tflops:
                raise ValueError("peak_tflops is required unless measure: true")
            if self.memory_bandwidth_gbs is None:
                raise ValueError("memory_bandwidth_gbs is required unless measure: true")
        for precision, value in (self.peak_tflops or {}).items():
            if not value > 0:
                raise ValueError(f"peak_tflops.{precision} must be > 0")
        return self


class Budgets(_Strict):
    latency_ms: float | None = Field(default=None, gt=0)
    memory_mb: float | None = Field(default=None, gt=0)
    flops_g: float | None = Field(
        default=None,
        gt=0,
        description="GFLOPs of one image's forward pass (per image, whatever the profile's batch: the way model "
        "sizes are quoted).",
    )
    params_m: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _at_least_one(self) -> Budgets:
        if all(v is None for v in self.model_dump().values()):
            raise ValueError("set at least one of latency_ms, memory_mb, flops_g, params_m")
        return self

    def items(self) -> list[tuple[str, float]]:
        return [(k, v) for k, v in self.model_dump().items() if v is not None]


class Profile(_Strict):
    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
        description="A safe slug (it names the device's folder under --out): letters, digits, '_', '-', '.', "
        "starting with a letter or digit, at most 64 characters; not one of the files a build writes into --out.",
    )
    description: str | None = None
    use: str | None = Field(
        default=None,
        description="The real use the budgets are sized for (e.g. '30 fps camera, a quarter of the frame to the ViT').",
    )
    input_size: int | None = Field(
        default=None,
        ge=1,
        le=8192,
        description="Input size (pixels) the budgets are meant for; the search runs at the "
        "ancestry's, and says so when it differs.",
    )
    hardware: Hardware
    precision: Precision = "fp32"
    batch: int = Field(default=1, ge=1, le=65536)
    budgets: Budgets
    calibration: str | None = Field(default=None, description="CSV of measured latencies, relative to the profile.")
    latency_tables: str | None = Field(
        default=None,
        description="Kernel latency tables (onnxruntime, fp32): 'host' for this machine's, measured by "
        "`peg-factory profiles measure`, or a JSON path relative to the profile.",
    )
    export: list[Format] = Field(default_factory=lambda: ["onnx"])
    path: str | None = Field(default=None, exclude=True, description="Where it was loaded from (set by the loader).")

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, name: str) -> str:
        if name.lower() in RESERVED_NAMES:
            raise ValueError(f"{name!r} is a file the build writes into --out; choose another name")
        return name

    @model_validator(mode="after")
    def _precision_declared(self) -> Profile:
        hw = self.hardware
        if not hw.measure and hw.peak_tflops and self.precision not in hw.peak_tflops:
            raise ValueError(f"precision {self.precision} has no hardware.peak_tflops.{self.precision} entry")
        if self.latency_tables is not None and (not runtime_spec(hw.runtime).kernel_tables or self.precision != "fp32"):
            raise ValueError(
                "latency_tables are measured with onnxruntime at fp32: set runtime onnxruntime and precision "
                "fp32, or drop latency_tables"
            )
        return self

    def limits(self) -> list[tuple[str, float]]:
        """What a shape must fit: the budgets, with the memory budget capped at the device's own
        ``hardware.memory_mb`` (a model that needs more memory than the device has cannot run there)."""
        out = dict(self.budgets.items())
        out["memory_mb"] = min(out.get("memory_mb", float("inf")), self.hardware.memory_mb)
        return list(out.items())

    def calibration_path(self) -> Path | None:
        if self.calibration is None:
            return None
        base = Path(self.path).parent if self.path else Path.cwd()
        return (base / self.calibration).resolve()


def _format_error(path: str, exc: ValidationError) -> str:
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err["loc"]) or "(top level)"
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        fix = "remove it or check its spelling"
        msg = "unknown key"
    elif kind == "missing":
        fix = "add it"
        msg = "required field missing"
    elif kind.startswith("greater_than"):
        fix = "use a positive value"
    elif kind.startswith("less_than"):
        fix = "use a smaller value"
    elif kind == "finite_number":
        fix = "use a finite number (drop the budget to leave it unconstrained)"
    elif kind == "literal_error":
        fix = "use one of the listed values"
    elif kind == "string_pattern_mismatch" and field == "name":
        msg = f"{err.get('input')!r} is not a safe name (it becomes a folder under --out)"
        fix = "use letters, digits, '_', '-' or '.', starting with a letter or digit, at most 64 characters"
    else:
        fix = "see profiles/profile.schema.json"
    extra = f" ({len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"profile {path}: {field}: {msg.removeprefix('Value error, ')}; {fix}{extra}"


class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (YAML keeps the last silently) and a key
    that is not a scalar (``? [a, b]``); merge keys (``<<: *base``) work as in YAML, explicit keys overriding."""

    MERGE = "tag:yaml.org,2002:merge"

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == self.MERGE:
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                raise yaml.constructor.ConstructorError(
                    None, None, "a key that is not a plain value (a list or mapping as a key)", key_node.start_mark
                )
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str):
    """YAML ``text`` read safely and strictly (:class:`StrictLoader`)."""
    return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - a SafeLoader subclass


def parse_profile(text: str, path: str = "<string>") -> Profile:
    """Validate profile YAML ``text``; one-line :class:`FactoryError` on any problem."""
    if len(text) > MAX_PROFILE_BYTES:
        raise FactoryError(
            f"profile {path}: {len(text)} characters, more than a profile needs ({MAX_PROFILE_BYTES}); "
            "check that it is the right file"
        )
    try:
        data = load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", "") or ""
        if "appears twice" in problem:
            raise FactoryError(f"profile {path}: {problem}{where}; keep one of them") from exc
        if "not a plain value" in problem:
            raise FactoryError(f"profile {path}: {problem}{where}; use a plain name as the key") from exc
        raise FactoryError(f"profile {path}: unreadable YAML{where}; fix the syntax") from exc
    except RecursionError as exc:
        raise FactoryError(f"profile {path}: nested too deeply to be a profile; fix the YAML") from exc
    except ValueError as exc:  # e.g. an integer literal with thousands of digits
        raise FactoryError(f"profile {path}: unreadable value ({str(exc).split(';')[0]}); fix the YAML") from exc
    if not isinstance(data, dict):
        raise FactoryError(f"profile {path}: expected a mapping of fields at the top level, got {type(data).__name__}")
    try:
        return Profile.model_validate({**data, "path": path})
    except ValidationError as exc:
        raise FactoryError(_format_error(path, exc)) from exc
    except (TypeError, ValueError) as exc:  # pydantic raises these for some malformed keys
        raise FactoryError(f"profile {path}: {exc}; see profiles/profile.schema.json") from exc


def load_profile(spec: str | Path) -> Profile:
    """A profile from a YAML path or a shipped profile's name (``jetson_orin``, or ``demo/jetson_orin`` for the
    28-px demo's budgets)."""
    path = shipped_file(spec) or Path(spec)
    if path.exists():  # a FIFO or a folder is named as one, not as "not found"
        require_regular_file(path, "profile")
    if not path.is_file():
        names = ", ".join(list_profiles())
        raise FactoryError(f"profile {spec} not found; pass a YAML path or one of: {names}")
    try:
        if path.stat().st_size > MAX_PROFILE_BYTES:
            raise FactoryError(
                f"profile {path}: {path.stat().st_size} bytes, more than a profile needs ({MAX_PROFILE_BYTES}); "
                "check that it is the right file"
            )
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise FactoryError(f"profile {path}: cannot read it ({exc}); check the file") from exc
    return parse_profile(text, str(path))


def shipped_file(spec: str | Path) -> Path | None:
    """The shipped YAML a name stands for (``jetson_orin`` -> ``PROFILE_DIR/jetson_orin.yaml``, ``demo/fleet``), where
    ``spec`` is not a path that exists and has no suffix; None otherwise."""
    path = Path(spec)
    if path.exists() or path.suffix:
        return None
    shipped = PROFILE_DIR / f"{spec}.yaml"
    return shipped if shipped.is_file() else None


def shipped_names(*, fleets: bool = False) -> list[str]:
    """Names of the shipped profiles (``jetson_orin``, the 28-px demo's ``demo/jetson_orin``), or with ``fleets``
    of the shipped fleet files (``demo/fleet``: a stem starting with ``fleet``)."""
    return sorted(
        p.relative_to(PROFILE_DIR).with_suffix("").as_posix()
        for p in PROFILE_DIR.rglob("*.yaml")
        if p.stem.startswith("fleet") == fleets
    )


def list_profiles() -> list[str]:
    """Shipped profile names: real-use ones (``jetson_orin``) and the 28-px demo's (``demo/jetson_orin``)."""
    return shipped_names()


def profile_json_schema() -> dict:
    schema = Profile.model_json_schema()
    schema["properties"].pop("path", None)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "peg-factory device profile"
    return schema
