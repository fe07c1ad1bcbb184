import math

import pytest

from factory import DescendantShape, FactoryError
from factory.core.ancestry import DEMO_ARCH
from factory.core.shapes import STANDARD_ARCH, vit_flops, vit_params
from factory.device.fit import Measurement, calibrate
from factory.device.profile import load_profile, parse_profile
from factory.device.resolve import latency_model_for
from factory.device.roofline import CostModel, Device, Efficiency, memory_mb, roofline_ms, vit_ops
from factory.device.search import FittedAccuracy, SearchSpace, pareto_front, search

S = DescendantShape(6, 192, 3, 4.0, 224, 16, 1000)


def test_ops_account_for_every_flop():
    ops = vit_ops(S)
    macs = sum(op.macs * count for op, count in ops)
    # the closed form also counts LayerNorm (5 per element), which the roofline treats as memory traffic
    n, d = 197, 192
    assert macs == vit_flops(S) - (2 * S.depth + 1) * 5 * n * d


def test_roofline_limits():
    dev = Device(peak_flops=1e12, bandwidth=1e11, runtime="onnxruntime", memory_mb=1e3, fused_attention=False)
    eff = Efficiency(matmul=1.0, attention=1.0, memory=1.0, op_overhead_us=0.0, fixed_ms=0.0)
    ops = vit_ops(S)
    expected = (
        sum(max(2 * op.macs / 1e12 if op.kind != "elementwise" else 0.0, op.bytes / 1e11) * c for op, c in ops) * 1e3
    )
    assert roofline_ms(ops, dev, eff) == pytest.approx(expected)
    # doubling peak and bandwidth halves the time; overheads add per op
    fast = Device(2e12, 2e11, "onnxruntime", 1e3, False)
    assert roofline_ms(ops, fast, eff) == pytest.approx(expected / 2)
    n_ops = sum(c for _, c in ops)
    with_overhead = roofline_ms(ops, dev, Efficiency(1.0, 1.0, 1.0, op_overhead_us=10.0, fixed_ms=0.5))
    assert with_overhead == pytest.approx(expected + n_ops * 0.01 + 0.5)


def test_fused_attention_removes_score_traffic_and_memory():
    unfused = sum(op.bytes for op, _ in vit_ops(S) if op.kind == "attention")
    fused = sum(op.bytes for op, _ in vit_ops(S, fused_attention=True) if op.kind == "attention")
    assert unfused - fused == 3 * 3 * 197 * 197 * 4
    many_tokens = DescendantShape(2, 192, 12, 4.0, 224, 8, 10)  # 785 tokens: scores dominate the MLP
    assert memory_mb(many_tokens, 1, "fp32", "onnxruntime") > memory_mb(
        many_tokens, 1, "fp32", "onnxruntime", fused_attention=True
    )
    assert memory_mb(S, 1, "fp32", "onnxruntime") == memory_mb(S, 1, "fp32", "onnxruntime", fused_attention=True)


def test_memory_formula():
    n, d, m, h = 197, 192, 768, 3
    weights = vit_params(S) * 2
    acts = 4 * 2 * (2 * n * d + max(3 * n * d + h * n * n, 2 * n * m))
    assert memory_mb(S, 4, "fp16", "tensorrt") == pytest.approx((weights + acts) / 1e6 + 40.0)


def test_calibration_recovers_known_efficiencies():
    truth = Efficiency(matmul=0.3, attention=0.2, memory=0.4, op_overhead_us=4.0, fixed_ms=0.1)
    dev = Device(4e11, 5e10, "onnxruntime", 1e3, False)
    model = CostModel(dev, "fp32", 1, Efficiency(), STANDARD_ARCH)
    shapes = [
        DescendantShape(d, w, w // 64, r, i, 16, 1000)
        for d, w, r, i in [
            (2, 128, 2.0, 96),
            (4, 192, 4.0, 224),
            (8, 256, 3.0, 160),
            (12, 384, 4.0, 224),
            (3, 64, 1.0, 64),
            (6, 320, 2.5, 192),
            (10, 128, 4.0, 128),
            (1, 448, 2.0, 224),
        ]
    ]
    rows = [Measurement(s, 1, roofline_ms(vit_ops(s), dev, truth)) for s in shapes]
    fitted = calibrate(model, rows)
    assert fitted.calibrated
    assert fitted.band.startswith("+-") and "8 calibration rows" in fitted.band and "cross-validated" in fitted.band
    for s in shapes + [DescendantShape(5, 256, 4, 3.5, 208, 16, 1000)]:
        assert fitted.latency_ms(s) == pytest.approx(roofline_ms(vit_ops(s), dev, truth), rel=0.02)


def test_profile_calibration_csv(tmp_path):
    csv = tmp_path / "cal.csv"
    csv.write_text(
        "depth,embed_dim,num_heads,mlp_ratio,img_size,patch_size,num_classes,batch,latency_ms\n"
        "2,64,1,2.0,28,7,10,1,0.5\n4,128,2,4.0,28,7,10,1,1.0\n6,192,3,4.0,28,7,10,1,1.6\n"
    )
    prof = tmp_path / "p.yaml"
    prof.write_text(open(load_profile("demo/raspberry_pi5").path).read() + "calibration: cal.csv\n")
    cm = latency_model_for(load_profile(prof), arch=DEMO_ARCH)
    assert cm.calibrated
    assert cm.latency_ms(DescendantShape(4, 128, 2, 4.0, 28, 7, 10)) == pytest.approx(1.0, rel=0.25)
    # the stated band is the fit's own error on its rows: these three are not all on one roofline
    from factory.device.fit import fit_band

    assert fit_band([0.1, -0.2, 0.05], 3).startswith("+-18% ") and "median 10%" in fit_band([0.1, -0.2, 0.05], 3)
    assert "3 calibration rows" in cm.band
    assert "in-sample" in cm.band  # 3 rows: too few to hold any out
    uncalibrated = latency_model_for(load_profile("demo/jetson_orin"), arch=DEMO_ARCH)
    assert uncalibrated.band.startswith("none stated") and "rough estimate" in uncalibrated.band
    assert "published ViT latencies" in latency_model_for(load_profile("demo/raspberry_pi5"), arch=DEMO_ARCH).band
    csv.write_text("depth,embed_dim\n2,64\n")
    with pytest.raises(FactoryError, match="cal.csv line 2"):
        latency_model_for(load_profile(prof), arch=DEMO_ARCH)


def test_space_respects_expandability():
    space = SearchSpace.from_arch(DEMO_ARCH)
    shapes = list(space.enumerate())
    assert len(shapes) == space.size() > 1000
    for s in shapes:
        assert s.embed_dim <= 192 and s.head_dim <= 64 and s.mlp_hidden <= 768 and s.depth <= 12
        assert s.embed_dim % 32 == 0 and s.head_dim % 8 == 0


def test_search_ranks_feasible_and_explains_rejections():
    profile = load_profile("demo/raspberry_pi5")
    cost = latency_model_for(profile, arch=DEMO_ARCH)
    result = search(profile, SearchSpace.from_arch(DEMO_ARCH), cost)
    assert result.strategy == "enumerate" and result.evaluated == result.space_size
    assert result.feasible and result.rejected  # the demo exercises the budgets
    assert all(c.latency_ms <= 0.5 and c.memory_mb <= 64 for c in result.feasible)
    assert all("latency_ms" in c.broken or "memory_mb" in c.broken for c in result.rejected)
    scores = [c.score for c in result.feasible]
    assert scores == sorted(scores, reverse=True)
    front = result.pareto
    assert [c.latency_ms for c in front] == sorted(c.latency_ms for c in front)
    assert all(b.score > a.score for a, b in zip(front, front[1:]))
    best = result.feasible[0]
    assert best.margins["latency_ms"] == pytest.approx((0.5 - best.latency_ms) / 0.5)
    # the top list: distinct shapes, head count only as the tie-break (one entry per depth/width/ratio/input)
    top = result.top(5)
    keys = [(c.shape.depth, c.shape.embed_dim, c.shape.mlp_ratio, c.shape.img_size) for c in top]
    assert len(top) == 5 and len(set(keys)) == 5 and top[0] is best
    same_but_heads = [
        c for c in result.feasible if (c.shape.depth, c.shape.embed_dim, c.shape.mlp_ratio) == keys[0][:3]
    ]
    assert len(same_but_heads) > 1  # the space does offer other head counts of the best shape


def test_impossible_budgets_name_the_budget_to_relax():
    text = open(load_profile("demo/jetson_orin").path).read().replace("latency_ms: 1.0", "latency_ms: 0.00001")
    profile = parse_profile(text, "tight.yaml")
    result = search(profile, SearchSpace.from_arch(DEMO_ARCH), latency_model_for(profile, arch=DEMO_ARCH))
    assert not result.feasible
    with pytest.raises(
        FactoryError,
        match=r"no shape fits the budgets; the closest, d1-w32-h1-r1-i28-p7, needs latency_ms.*relax budgets.latency_ms",
    ):
        result.require_feasible()


def test_evolutionary_search_is_deterministic_and_finds_the_optimum():
    from factory.core.ancestry import load_ancestry

    arch = load_ancestry("random:vit_small_patch16_224").arch
    profile = load_profile("demo/jetson_orin")
    cost = latency_model_for(profile, arch=arch)
    space = SearchSpace.from_arch(arch, img_sizes=(160, 224))
    exact = search(profile, space, cost)
    evo_a = search(profile, space, cost, enumerate_limit=100, evaluations=3000, seed=1)
    evo_b = search(profile, space, cost, enumerate_limit=100, evaluations=3000, seed=1)
    assert evo_a.strategy == "evolutionary" and evo_a.evaluated == 3000 < exact.evaluated
    assert [c.shape for c in evo_a.feasible[:5]] == [c.shape for c in evo_b.feasible[:5]]
    assert evo_a.feasible[0].score >= exact.feasible[0].score - 0.2


def test_fitted_accuracy_predictor():
    shapes = [DescendantShape(d, 192, 3, 4.0, 28, 7, 10) for d in (1, 2, 4, 8, 12)]
    rows = [(s, 0.5 + 0.1 * math.log(s.depth)) for s in shapes]
    pred = FittedAccuracy.fit(rows, DEMO_ARCH)
    for s, acc in rows:
        assert pred(s) == pytest.approx(acc, abs=1e-6)
    with pytest.raises(FactoryError, match="at least 4"):
        FittedAccuracy.fit(rows[:2], DEMO_ARCH)


def test_pareto_front_helper():
    assert pareto_front([]) == []
