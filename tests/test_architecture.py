"""The house rules, checked: layer contracts, no import cycles, small modules, no reaching into
another module's private names, and the build's stage table."""

import ast
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("factory", "export")
MAX_LINES = 400


def _modules():
    for package in PACKAGES:
        yield from sorted((ROOT / package).rglob("*.py"))


def test_layer_contracts_hold():
    result = subprocess.run(
        [str(Path(sys.executable).with_name("lint-imports")), "--no-cache"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_no_import_cycles():
    graph = grimp.build_graph(*PACKAGES, include_external_packages=False, cache_dir=None)
    cycles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            if module == imported or graph.find_shortest_chain(importer=imported, imported=module) is None:
                continue
            # a package's __init__ importing its own submodules is not a cycle of the code
            if imported.startswith(module + ".") or module.startswith(imported + "."):
                continue
            cycles.append((module, imported))
    assert not cycles, cycles[:10]


def test_no_module_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in _modules() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_no_file_imports_another_modules_private_names():
    offenders = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
                offenders += [
                    f"{path.name}: {node.module}.{a.name}"
                    for a in node.names
                    if a.name.startswith("_") and a.name != "__version__"
                ]
    assert not offenders, offenders


def test_the_stage_table_drives_keys_and_names():
    from factory.pipeline.stages import STAGES

    assert [s.name for s in STAGES] == ["learngene", "init", "finetune", "measure", "export"]
    assert {s.scope for s in STAGES} == {"fleet", "shape", "device"}
    assert all(callable(s.inputs) and callable(s.run) and callable(s.estimate_s) for s in STAGES)


def test_the_finetune_key_is_the_train_config_that_runs(tmp_path):
    """A changed trainer setting changes the fine-tune's key (no hand-copied subset of the recipe)."""
    import dataclasses

    from factory.core.demo import load_demo_learngene
    from factory.core.shapes import DescendantShape
    from factory.data import make_synthetic
    from factory.pipeline.cache import Cache
    from factory.pipeline.config import BuildConfig, finetune_recipe
    from factory.pipeline.stages import FINETUNE, BuildContext, entry_for

    lg = load_demo_learngene()
    ctx = BuildContext(
        tmp_path, BuildConfig(data="synthetic", init="peg"), Cache(tmp_path), print, None, make_synthetic(), lg
    )
    shape = DescendantShape(2, 96, 2, 2.0, 28, 7, 4)
    key = entry_for(ctx, FINETUNE, shape).key
    assert FINETUNE.inputs(ctx, shape)["recipe"] == dataclasses.asdict(finetune_recipe(ctx.cfg))
    assert entry_for(ctx, FINETUNE, shape).key == key  # deterministic
    other = dataclasses.replace(ctx, cfg=BuildConfig(data="synthetic", init="peg", lr=2e-3))
    assert entry_for(other, FINETUNE, shape).key != key
    jobs = dataclasses.replace(ctx, cfg=BuildConfig(data="synthetic", init="peg", jobs=4))
    assert entry_for(jobs, FINETUNE, shape).key == key  # a run option, not part of any key
    # with --init auto the key holds the decided initialisation: auto -> peg is the same fine-tune as --init peg
    auto = dataclasses.replace(ctx, cfg=BuildConfig(data="synthetic"), inits={shape.label(): {"chosen": "peg"}})
    assert entry_for(auto, FINETUNE, shape).key == key
    auto.inits[shape.label()] = {"chosen": "scratch"}
    assert entry_for(auto, FINETUNE, shape).key != key


def _commands(cmd, path):
    import click

    yield path, cmd
    if isinstance(cmd, click.Group):
        for name, sub in sorted(cmd.commands.items()):
            yield from _commands(sub, f"{path} {name}")


def test_every_cli_option_is_documented_and_every_command_has_an_example():
    import click

    from factory.cli import cli

    undocumented, no_example = [], []
    for path, cmd in _commands(cli, "peg-factory"):
        undocumented += [f"{path} {p.opts[0]}" for p in cmd.params if isinstance(p, click.Option) and not p.help]
        if not isinstance(cmd, click.Group) and "Example:" not in (cmd.help or ""):
            no_example.append(path)
    assert not undocumented, undocumented
    assert not no_example, no_example
    assert {name for name in cli.commands} == {
        "ancestry",
        "build",
        "calibrate",
        "expand",
        "export",
        "flops",
        "learngene",
        "profiles",
        "search",
        "train",
    }
