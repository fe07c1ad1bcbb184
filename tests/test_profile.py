import json

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from factory import FactoryError
from factory.device.profile import PROFILE_DIR, list_profiles, load_profile, parse_profile, profile_json_schema

GOOD = {
    "name": "t",
    "hardware": {
        "kind": "gpu",
        "peak_tflops": {"fp16": 10.0},
        "memory_bandwidth_gbs": 100,
        "memory_mb": 1000,
        "runtime": "tensorrt",
    },
    "precision": "fp16",
    "budgets": {"latency_ms": 1.0},
}


def _yaml(data) -> str:
    return yaml.safe_dump(data)


def test_every_shipped_profile_validates_and_cites_its_figures():
    names = list_profiles()
    assert {"jetson_orin", "jetson_orin_nano", "raspberry_pi5", "x86_laptop_cpu", "h100", "host"} <= set(names)
    for name in names:
        p = load_profile(name)
        assert p.hardware.source, name
        assert p.budgets.items()
    assert load_profile("host").hardware.measure


def test_shipped_profiles_state_a_real_use_at_224_px_and_the_demo_fleet_is_kept_apart():
    names = list_profiles()
    real = [n for n in names if "/" not in n and n != "host"]
    demo = [n for n in names if n.startswith("demo/")]
    assert {"jetson_orin", "raspberry_pi5", "x86_laptop_cpu"} <= set(real)
    assert {f"demo/{n}" for n in ("jetson_orin", "jetson_orin_nano", "raspberry_pi5")} <= set(demo)
    for name in real:
        p = load_profile(name)
        assert p.input_size == 224 and p.use and ("fps" in p.use or "serving" in p.use), name
    for name in demo:
        p = load_profile(name)
        assert p.input_size == 28 and "demo" in p.use and p.name == name.split("/")[1], name
        # the demo's budgets are tighter than the real use's: they are sized for 64x fewer pixels
        real_budget = load_profile(p.name).budgets.latency_ms
        assert p.budgets.latency_ms < real_budget, name


def test_real_use_budgets_give_a_deit_tiny_ancestry_more_than_a_few_blocks():
    """At 224 px the real-use budgets admit real models (the demo-sized ones gave DeiT-Tiny one block on the Pi 5)."""
    from factory.core.shapes import ArchConfig
    from factory.device.resolve import latency_model_for
    from factory.device.search import SearchSpace, search

    deit_tiny = ArchConfig(
        embed_dim=192, depth=12, num_heads=3, mlp_hidden=768, img_size=224, patch_size=16, num_classes=1000, in_chans=3
    )
    space = SearchSpace.from_arch(deit_tiny)
    for name in ("raspberry_pi5", "jetson_orin_nano", "x86_laptop_cpu"):
        prof = load_profile(name)
        best = search(prof, space, latency_model_for(prof, arch=deit_tiny)).require_feasible()
        assert best.shape.depth >= 6 and best.shape.img_size == 224, (name, best.shape.label())
    demo = load_profile("demo/raspberry_pi5")
    small = search(demo, space, latency_model_for(demo, arch=deit_tiny)).require_feasible()
    assert small.shape.depth * small.shape.embed_dim < best.shape.depth * best.shape.embed_dim


def test_a_profile_sized_for_another_input_size_says_so(tmp_path):
    from factory.core.ancestry import load_ancestry
    from factory.device.search import SearchSpace
    from factory.pipeline.config import BuildConfig
    from factory.pipeline.device_choice import search_devices

    anc = load_ancestry("demo")
    lines = []
    [entry], _ = search_devices(
        [load_profile("raspberry_pi5")],
        SearchSpace.from_arch(anc.arch),
        anc,
        BuildConfig(),
        "capacity",
        "test",
        lines.append,
    )
    assert "budgets sized for 224 px" in entry["input_size_note"] and "ancestry's 28 px" in entry["input_size_note"]
    assert lines == [f"raspberry_pi5: {entry['input_size_note']}"]
    assert entry["target"]["use"].startswith("10 fps camera")
    [same], _ = search_devices(
        [load_profile("demo/raspberry_pi5")],
        SearchSpace.from_arch(anc.arch),
        anc,
        BuildConfig(),
        "capacity",
        "test",
        lines.append,
    )
    assert "input_size_note" not in same and len(lines) == 1


def test_schema_file_is_current():
    assert json.loads((PROFILE_DIR / "profile.schema.json").read_text()) == profile_json_schema()


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda d: d.update(colour="red"), "colour: unknown key; remove it"),
        (lambda d: d["hardware"].update(peak_tflop={"fp16": 1}), "hardware.peak_tflop: unknown key"),
        (
            lambda d: d["budgets"].update(latency_ms=-1),
            "budgets.latency_ms: Input should be greater than 0; use a positive value",
        ),
        (lambda d: d["budgets"].update(latency_ms="fast"), "budgets.latency_ms"),
        (lambda d: d.pop("hardware"), "hardware: required field missing; add it"),
        (lambda d: d.update(budgets={}), "budgets: set at least one of latency_ms"),
        (lambda d: d.update(precision="fp8"), "precision"),
        (lambda d: d.update(precision="int8"), "precision int8 has no hardware.peak_tflops.int8"),
        (lambda d: d["hardware"].pop("memory_bandwidth_gbs"), "memory_bandwidth_gbs is required unless measure: true"),
        (lambda d: d.update(batch=0), "batch"),
    ],
)
def test_bad_profiles_get_one_line_naming_the_field(mutate, message):
    data = json.loads(json.dumps(GOOD))
    mutate(data)
    with pytest.raises(FactoryError) as info:
        parse_profile(_yaml(data), "bad.yaml")
    text = str(info.value)
    assert text.startswith("profile bad.yaml: ") and message in text and "\n" not in text


def test_unreadable_yaml_and_missing_files(tmp_path):
    with pytest.raises(FactoryError, match="unreadable YAML at line 2"):
        parse_profile("name: x\nhardware: [unclosed", "p.yaml")
    with pytest.raises(FactoryError, match="expected a mapping"):
        parse_profile("- just\n- a list", "p.yaml")
    with pytest.raises(FactoryError, match="not found; pass a YAML path or one of: .*jetson_orin"):
        load_profile(tmp_path / "none.yaml")
    binary = tmp_path / "b.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(FactoryError, match="b.yaml"):
        load_profile(binary)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200))
def test_fuzz_arbitrary_text_never_tracebacks(text):
    try:
        parse_profile(text, "fuzz.yaml")
    except FactoryError as exc:
        assert "\n" not in str(exc)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(
        st.sampled_from(["name", "hardware", "precision", "batch", "budgets", "export", "calibration", "x"]),
        json_values,
        max_size=6,
    ),
    st.dictionaries(
        st.sampled_from(["kind", "peak_tflops", "memory_bandwidth_gbs", "memory_mb", "runtime", "measure"]),
        json_values,
        max_size=6,
    ),
)
def test_fuzz_structured_profiles_never_traceback(top, hardware):
    data = dict(top)
    if "hardware" in data and isinstance(data["hardware"], dict):
        data["hardware"] = hardware
    try:
        parse_profile(yaml.safe_dump(data), "fuzz.yaml")
    except FactoryError as exc:
        assert "\n" not in str(exc)


@pytest.mark.parametrize(
    "name", ["../../evil", ".", "..", "/abs/path", "a/b", "x" * 65, "-flag", "", "name with space"]
)
def test_unsafe_profile_names_are_refused(name):
    data = yaml.safe_load((PROFILE_DIR / "host.yaml").read_text())
    data["name"] = name
    with pytest.raises(FactoryError, match=r"^profile p.yaml: name: .* is not a safe name .*; use letters, digits"):
        parse_profile(yaml.safe_dump(data), "p.yaml")


def test_the_all_demo_fleet_lists_every_demo_device_but_litert_and_each_loads():
    """profiles/demo/fleet_all.yaml: the large fleet bench/time_budget.py builds (LiteRT needs its own venv)."""
    from pathlib import Path

    from factory.pipeline.fleet import load_fleet

    paths = load_fleet(PROFILE_DIR / "demo" / "fleet_all.yaml")
    demo = {n.split("/")[1] for n in list_profiles() if n.startswith("demo/")}
    assert {Path(p).stem for p in paths} == demo - {"raspberry_pi5_litert"} and len(paths) == 9
    assert all(load_profile(p).input_size == 28 for p in paths)


def test_a_fleet_lists_files_beside_it_and_shipped_names_as_profile_does(tmp_path):
    """'profiles: [demo/pixel8]' was read as tmp/demo/pixel8 (not found) while `--profile demo/pixel8` works; a
    file beside the fleet still wins over a shipped name, and a missing file is named by its path."""
    from factory.pipeline.fleet import load_fleet

    (tmp_path / "mine.yaml").write_text((PROFILE_DIR / "demo" / "pixel8.yaml").read_text().replace("pixel8", "mine"))
    (tmp_path / "fleet.yaml").write_text("profiles: [mine.yaml, demo/pixel8, jetson_orin]\n")
    specs = load_fleet(tmp_path / "fleet.yaml")
    assert specs == [str(tmp_path / "mine.yaml"), "demo/pixel8", "jetson_orin"]
    assert [load_profile(s).name for s in specs] == ["mine", "pixel8", "jetson_orin"]
    (tmp_path / "fleet.yaml").write_text("profiles: [gone.yaml]\n")
    with pytest.raises(FactoryError, match=f"profile {tmp_path / 'gone.yaml'} not found"):
        load_profile(load_fleet(tmp_path / "fleet.yaml")[0])


def test_shipped_profiles_and_fleets_are_found_outside_the_source_tree(tmp_path, monkeypatch):
    """A wheel has no source tree: the profiles come from <prefix>/share/peg-factory/profiles, which pyproject's
    data-files fill with every shipped file; --fleet takes a shipped fleet's name as --profile takes a profile's."""
    import glob
    import sys
    from pathlib import Path

    import tomllib

    from factory.device.profile import shipped_profiles_dir
    from factory.pipeline.fleet import load_fleet, shipped_fleets

    root = PROFILE_DIR.parent
    assert shipped_profiles_dir(root) == PROFILE_DIR
    assert shipped_profiles_dir(tmp_path) == Path(sys.prefix) / "share" / "peg-factory" / "profiles"
    data_files = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["data-files"]
    packaged = {
        Path(f).relative_to("profiles")
        for pats in data_files.values()
        for pat in pats
        for f in glob.glob(pat, root_dir=root)
    }
    shipped = {p.relative_to(PROFILE_DIR) for p in PROFILE_DIR.rglob("*") if p.is_file()}
    assert packaged == shipped  # a new profile folder needs its data-files line
    assert all(target == f"share/peg-factory/{Path(pats[0]).parent}" for target, pats in data_files.items())

    monkeypatch.chdir(tmp_path)  # not the repository: relative profiles/... paths do not exist here
    assert "demo/fleet" in shipped_fleets() and [Path(p).stem for p in load_fleet("demo/fleet")] == [
        "jetson_orin",
        "jetson_orin_nano",
        "raspberry_pi5",
    ]
    with pytest.raises(FactoryError, match="fleet demo-fleet not found; pass a fleet file or one of: demo/fleet"):
        load_fleet("demo-fleet")
