"""Kernel-level latency prediction for onnxruntime on CPU, from measured look-up tables.

nn-Meter's recipe, for the ops of a timm ViT as onnxruntime runs them after its graph
optimisations (checked on the exported graph: LayerNormalization and BiasGelu fused, MatMul and
its bias Add kept apart, attention left as reshape/transpose/scale/MatMul/Softmax/MatMul):

=============  ======================  =====================================================
kernel         table axes              what the micro-model runs
=============  ======================  =====================================================
linear         rows, in, out           MatMul [1,rows,in] x [in,out] + bias Add
linear_gelu    rows, in, out           MatMul + BiasGelu (fc1)
attention      batch*heads, tokens,    Reshape, Transpose, Split, scale Muls, q k^T MatMul,
               head_dim                Softmax, MatMul with v, Transpose, Reshape
layernorm      rows, width             LayerNormalization
add            rows, width             Add (residual)
stem           rows (= batch*grid^2),  Conv (stride = patch), Reshape, Transpose, Concat of the
               width                   class token, Add of the position embedding
=============  ======================  =====================================================

A shape at batch ``B`` (``N`` tokens, width ``D``, ``H`` heads, hidden ``M``, ``G`` patches) is

    t_kernels = stem(B*G, D) + depth * [2 ln(BN, D) + lin(BN, D, 3D) + attn(BH, N, D/H)
                + lin(BN, D, D) + 2 add(BN, D) + lin_gelu(BN, D, M) + lin(BN, M, D)]
                + ln(BN, D) + lin(B, D, classes)

where each term is interpolated (multilinear in log size, log time; linear extrapolation
beyond the grid) from that kernel's own measurements, net of the runtime's empty-run time.
The whole-model time adds what single kernels do not show -- the small shape ops between
kernels (attention's scale computed from shapes at run time), cache misses when weights are
not resident -- through three terms fitted, per batch size, on whole models measured with the
tables (a batch with no fitted terms uses the nearest one's):

    t = scale_B * t_kernels + per_block_ms_B * depth + fixed_ms_B.

Per batch size because the missing part differs in kind: at batch 1 the kernels are small and
weight-bound, so dispatch and cold weights weigh more than at batch 8, where compute dominates.

:func:`factory.device.measure.measure_tables` measures everything (grids spanning a search space, a handful of whole
models for the three terms) on this host; :func:`factory.device.measure.host_tables_path` is where the CLI caches them,
per host and onnxruntime version (``peg-factory profiles measure``).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from factory.core.shapes import ArchConfig, DescendantShape, num_tokens
from factory.errors import FactoryError
from factory.io import atomic_write_bytes

FORMAT = 2
KERNELS = ("linear", "linear_gelu", "attention", "layernorm", "add", "stem")


def _geom(lo: int, hi: int, n: int) -> list[int]:
    """``n`` integers spread geometrically over ``[lo, hi]`` (deduplicated)."""
    if hi <= lo or n < 2:
        return [lo]
    return sorted({round(lo * (hi / lo) ** (i / (n - 1))) for i in range(n)})


@dataclass(frozen=True)
class Grids:
    """Table axes spanning a search space: rows (batch x tokens), widths, hidden sizes, tokens, heads."""

    rows: list[int]
    widths: list[int]
    tokens: list[int]
    batch_heads: list[int]
    head_dims: list[int]
    stem_rows: list[int]

    @classmethod
    def spanning(
        cls,
        arch: ArchConfig,
        *,
        max_width: int,
        max_hidden: int,
        img_sizes: tuple[int, ...],
        batches: tuple[int, ...],
        max_heads: int,
        points: int = 6,
    ) -> Grids:
        grids = [s // arch.patch_size for s in img_sizes]
        n_lo, n_hi = min(grids) ** 2 + arch.num_prefix_tokens, max(grids) ** 2 + arch.num_prefix_tokens
        return cls(
            rows=_geom(1, max(batches) * n_hi, points + 2),
            widths=_geom(16, max(max_width, max_hidden, 3 * max_width), points + 1),
            tokens=_geom(max(2, n_lo), n_hi, points - 2),
            batch_heads=_geom(1, max(batches) * max_heads, points - 2),
            head_dims=_geom(16, 128, 3),
            stem_rows=sorted({g * g for g in _geom(min(grids), max(grids) * 3, points - 2)}),
        )

    @classmethod
    def for_space(cls, space, arch: ArchConfig, batches: tuple[int, ...], points: int = 6) -> Grids:
        """Grids spanning every shape of a :class:`factory.device.search.SearchSpace` at ``batches``."""
        widths = space.widths
        return cls.spanning(
            arch,
            max_width=max(w for w, _, _ in widths),
            max_hidden=max(int(w * max(r)) for w, _, r in widths),
            img_sizes=tuple(space.img_sizes),
            batches=batches,
            max_heads=max(max(h) for _, h, _ in widths),
            points=points,
        )

    def axes(self, kernel: str) -> list[list[int]]:
        return {
            "linear": [self.rows, self.widths, self.widths],
            "linear_gelu": [self.rows, self.widths, self.widths],
            "attention": [self.batch_heads, self.tokens, self.head_dims],
            "layernorm": [self.rows, self.widths],
            "add": [self.rows, self.widths],
            "stem": [self.stem_rows, self.widths],
        }[kernel]


@dataclass
class KernelTables:
    """Measured kernel times (ms, net of the empty run) on grids, plus the whole-model terms."""

    host: dict[str, Any]
    arch: dict[str, Any]
    empty_ms: float
    tables: dict[str, dict[str, Any]]  # kernel -> {"axes": [[...]], "ms": nested list}
    terms: dict[str, list[float]] = field(default_factory=dict)  # batch -> [scale, per_block_ms, fixed_ms]
    fit_rows: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    _memo: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def points(self) -> int:
        return sum(math.prod(len(a) for a in t["axes"]) for t in self.tables.values())

    # -- prediction --
    def _interpolator(self, kernel: str) -> Callable[[tuple[int, ...]], float]:
        """Multilinear in log(dims) -> log(ms), extrapolating linearly; axes with one point are constant."""
        import numpy as np
        from scipy.interpolate import RegularGridInterpolator

        t = self.tables[kernel]
        axes = [np.log(np.asarray(a, dtype=float)) for a in t["axes"]]
        values = np.log(np.maximum(np.asarray(t["ms"], dtype=float), 1e-4)).reshape([len(a) for a in axes])
        keep = [i for i, a in enumerate(axes) if len(a) > 1]
        for i in reversed(range(len(axes))):
            if i not in keep:
                values = values.take(0, axis=i)
        if not keep:
            constant = float(np.exp(values))
            return lambda dims: constant
        rgi = RegularGridInterpolator([axes[i] for i in keep], values, bounds_error=False, fill_value=None)
        return lambda dims: float(np.exp(rgi(np.log([[max(1, dims[i]) for i in keep]]))[0]))

    def kernel_ms(self, kernel: str, dims: tuple[int, ...]) -> float:
        """One kernel's predicted time (ms, net of the empty run), memoised per ``(kernel, dims)``."""
        key = (kernel, dims)
        if key not in self._memo:
            if kernel not in self._memo:
                self._memo[kernel] = self._interpolator(kernel)
            self._memo[key] = self._memo[kernel](dims)
        return self._memo[key]

    def kernel_sum_ms(self, shape: DescendantShape, batch: int, arch: ArchConfig) -> float:
        """``t_kernels`` of the module docstring."""
        n, d, m, h = num_tokens(shape, arch), shape.embed_dim, shape.mlp_hidden, shape.num_heads
        bn, k = batch * n, self.kernel_ms
        block = (
            2 * k("layernorm", (bn, d))
            + k("linear", (bn, d, 3 * d))
            + k("attention", (batch * h, n, d // h))
            + k("linear", (bn, d, d))
            + 2 * k("add", (bn, d))
            + k("linear_gelu", (bn, d, m))
            + k("linear", (bn, m, d))
        )
        return (
            k("stem", (batch * shape.grid**2, d))
            + shape.depth * block
            + k("layernorm", (bn, d))
            + k("linear", (batch, d, max(1, shape.num_classes)))
        )

    def terms_for(self, batch: int) -> tuple[float, float, float]:
        """``(scale, per_block_ms, fixed_ms)`` fitted at ``batch``, else at the nearest fitted batch (log scale)."""
        if not self.terms:
            return 1.0, 0.0, 0.0
        key = min(self.terms, key=lambda b: abs(math.log(int(b)) - math.log(batch)))
        scale, per_block, fixed = self.terms[key]
        return scale, per_block, fixed

    def latency_ms(self, shape: DescendantShape, batch: int, arch: ArchConfig) -> float:
        scale, per_block, fixed = self.terms_for(batch)
        return scale * self.kernel_sum_ms(shape, batch, arch) + per_block * shape.depth + fixed + self.empty_ms

    def describe_terms(self) -> str:
        return (
            "; ".join(
                f"batch {b}: scale {t[0]:.3f}, {t[1] * 1e3:.1f} us per block, fixed {t[2] * 1e3:.1f} us"
                for b, t in sorted(self.terms.items(), key=lambda kv: int(kv[0]))
            )
            or "none fitted"
        )

    # -- fitting the whole-model terms --
    def fit(self, rows: list[tuple[DescendantShape, int, float]], arch: ArchConfig) -> None:
        """Per batch size, least squares for ``scale, per_block_ms, fixed_ms`` on measured whole
        models (relative errors; scale in [0.3, 3], non-negative per-block time)."""
        import numpy as np
        from scipy.optimize import lsq_linear

        self.terms = {}
        for batch in sorted({b for _, b, _ in rows}):
            mine = [(s, t) for s, b, t in rows if b == batch]
            measured = np.array([t for _, t in mine])
            a = np.array([[self.kernel_sum_ms(s, batch, arch), s.depth, 1.0] for s, _ in mine]) / measured[:, None]
            y = (measured - self.empty_ms) / measured
            res = lsq_linear(a, y, bounds=([0.3, 0.0, -self.empty_ms], [3.0, np.inf, np.inf]))
            self.terms[str(batch)] = [float(v) for v in res.x]
        self.fit_rows = [{"shape": s.label(), "batch": b, "measured_ms": round(t, 4)} for s, b, t in rows]

    # -- persistence --
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "host": self.host,
            "arch": self.arch,
            "empty_ms": self.empty_ms,
            "tables": self.tables,
            "terms": self.terms,
            "fit_rows": self.fit_rows,
            "seconds": self.seconds,
        }

    def save(self, path: str | Path) -> None:
        """Write the tables sealed: ``sha256`` of their canonical JSON, checked by :meth:`load`."""
        data = self.to_dict()
        atomic_write_bytes(path, json.dumps({**data, "sha256": _digest(data)}, indent=1).encode())

    @classmethod
    def load(cls, path: str | Path) -> KernelTables:
        """Read, check the seal and validate (:func:`validate`) a tables file; one-line errors."""
        path = Path(path)
        fix = "re-measure with `peg-factory profiles measure`"
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise FactoryError(
                f"latency tables {path}: unreadable ({' '.join(str(exc).split())[:160]}); {fix}"
            ) from exc
        if not isinstance(data, dict):
            raise FactoryError(f"latency tables {path}: not a tables file (a JSON {type(data).__name__}); {fix}")
        if data.get("format") != FORMAT:
            raise FactoryError(
                f"latency tables {path}: unreadable (format {data.get('format')!r}, expected {FORMAT}); {fix}"
            )
        sealed = data.pop("sha256", None)
        if sealed != _digest(data):
            raise FactoryError(
                f"latency tables {path}: {'unsealed' if sealed is None else 'changed since measured'} (its "
                f"sha256 does not match); {fix}"
            )
        try:
            validate(data)
        except (ValueError, KeyError, TypeError) as exc:
            raise FactoryError(f"latency tables {path}: {exc}; {fix}") from exc
        return cls(
            data["host"],
            data["arch"],
            float(data["empty_ms"]),
            data["tables"],
            {str(b): [float(v) for v in t] for b, t in data["terms"].items()},
            data.get("fit_rows", []),
            float(data.get("seconds", 0.0)),
        )

    def check_for(self, arch: ArchConfig, path: str | Path, host: dict[str, Any] | None = None) -> None:
        """Refuse (one line) tables measured for another stem (patch size, channels) or runtime, or, with
        ``host`` (this machine's :func:`factory.device.measure.host_facts`), on another CPU."""
        fix = "re-measure with `peg-factory profiles measure`"
        for key in ("patch_size", "in_chans", "num_prefix_tokens"):
            if key in self.arch and self.arch[key] != arch.to_dict().get(key):
                raise FactoryError(
                    f"latency tables {path}: measured for {key} {self.arch[key]}, the ancestry has "
                    f"{arch.to_dict().get(key)}; {fix} for this ancestry"
                )
        if self.host.get("runtime", "onnxruntime") != "onnxruntime":
            raise FactoryError(
                f"latency tables {path}: measured with {self.host.get('runtime')}, not onnxruntime; {fix}"
            )
        if host is not None:
            for key in ("cpu", "cpus", "machine"):
                if key in self.host and self.host[key] != host.get(key):
                    raise FactoryError(
                        f"latency tables {path}: measured on another host ({key} {self.host[key]!r}, this one "
                        f"{host.get(key)!r}); {fix} here"
                    )


def _digest(data: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _finite_positive(value: Any, what: str, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{what} must be finite and {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return float(value)


def validate(data: dict[str, Any]) -> None:
    """The structure :meth:`KernelTables.load` needs: every kernel's axes strictly ascending positive
    integers, its ``ms`` grid of exactly those sizes, every time finite and positive; ``terms`` keyed
    by batch sizes >= 1 with three finite numbers; ``empty_ms`` finite and >= 0. ``ValueError`` names the field."""
    if data.get("format") != FORMAT:
        raise ValueError(f"format {data.get('format')!r}, expected {FORMAT}")
    for key, kind in (("host", dict), ("arch", dict), ("tables", dict), ("terms", dict)):
        if not isinstance(data.get(key), kind):
            raise ValueError(f"{key} must be a {kind.__name__}, got {type(data.get(key)).__name__}")
    _finite_positive(data.get("empty_ms"), "empty_ms", allow_zero=True)
    for kernel in KERNELS:
        table = data["tables"].get(kernel)
        if not isinstance(table, dict):
            raise ValueError(f"kernel {kernel!r} missing")
        axes = table.get("axes")
        if not isinstance(axes, list) or not axes or not all(isinstance(a, list) and a for a in axes):
            raise ValueError(f"{kernel}.axes must be a list of non-empty lists")
        for n, axis in enumerate(axes):
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in axis):
                raise ValueError(f"{kernel}.axes[{n}] must hold integers >= 1")
            if any(b <= a for a, b in zip(axis, axis[1:])):
                raise ValueError(f"{kernel}.axes[{n}] must be strictly ascending")

        def check(grid: Any, depth: int, where: str) -> None:
            if depth == len(axes):
                _finite_positive(grid, f"{kernel}.ms{where}")
                return
            if not isinstance(grid, list) or len(grid) != len(axes[depth]):
                raise ValueError(f"{kernel}.ms{where} must have {len(axes[depth])} entries (axis {depth})")
            for k, sub in enumerate(grid):
                check(sub, depth + 1, f"{where}[{k}]")

        check(table.get("ms"), 0, "")
    for batch, terms in data["terms"].items():
        if not str(batch).isdigit() or int(batch) < 1:
            raise ValueError(f"terms: batch {batch!r} must be an integer >= 1")
        if not isinstance(terms, list) or len(terms) != 3:
            raise ValueError(f"terms[{batch}] must be [scale, per_block_ms, fixed_ms]")
        for name, value in zip(("scale", "per_block_ms", "fixed_ms"), terms):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"terms[{batch}].{name} must be a finite number, got {value!r}")
        if terms[0] <= 0:
            raise ValueError(f"terms[{batch}].scale must be > 0, got {terms[0]!r}")


def spread_shapes(space, count: int, batches: tuple[int, ...], seed: int = 0) -> list[tuple[DescendantShape, int]]:
    """``count`` random shapes of ``space`` (seeded), cycling through ``batches``."""
    import random

    rng = random.Random(seed)
    return [(space.random_shape(rng), batches[i % len(batches)]) for i in range(count)]
