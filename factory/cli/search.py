"""``peg-factory search``: the shapes that fit a profile, ranked by capacity or by probes on the task's data.

It runs the build's own selection (:mod:`factory.pipeline.device_choice`) on one profile, with the
build's cache in ``--work`` (the learngene, the probes), so ``build --out`` the same directory reuses it.
"""

from __future__ import annotations

from pathlib import Path

import click

from factory.cli.common import (
    COUNT,
    POSITIVE_STEPS,
    SIZE,
    STEPS,
    UserError,
    ancestry_option,
    data_option,
    echo_json,
    init_option,
    objective_option,
    seed_option,
)


@click.command("search")
@click.option("--profile", "profile_spec", required=True, help="Profile YAML path or shipped name.")
@ancestry_option(help="Ancestry whose expansions are searched.")
@data_option(None, "Task data (a built-in name or an ImageFolder dir): rank by predicted accuracy on it.")
@objective_option(
    "accuracy: few-step probes (successive halving) of the Pareto front on --data pick the shape predicted "
    "most accurate after --steps; capacity: the largest shape that fits; auto: capacity for the trained "
    "learngene (measured within noise of the best), accuracy otherwise (--init other than peg, untrained "
    "learngene)."
)
@init_option("init_method", help="How the build will initialise descendants (the probes use the same).")
@click.option(
    "--expand-steps",
    type=STEPS,
    default=None,
    help="Expanding-phase steps of the learngene [default: the build's, 1500; 0 = untrained].",
)
@click.option(
    "--steps",
    type=POSITIVE_STEPS,
    default=100,
    show_default=True,
    help="Fine-tuning budget the accuracy is predicted for.",
)
@click.option(
    "--work",
    type=click.Path(path_type=Path),
    default=Path("out/build"),
    show_default=True,
    help="Build directory whose cache (learngene, estimates) is used and filled; `build --out` the same dir reuses it.",
)
@click.option(
    "--img-size", "img_sizes", type=SIZE, multiple=True, help="Input sizes to consider [default: ancestry's]."
)
@click.option(
    "--num-classes",
    type=click.IntRange(0, 1 << 20),
    default=None,
    help="Classes of the task [default: the data's, else the ancestry's].",
)
@click.option("--snap", type=SIZE, default=32, show_default=True, help="Widths are multiples of this.")
@click.option("--max-depth", type=COUNT, default=None, help="Deepest descendant [default: 2x ancestry].")
@click.option("--top", type=click.IntRange(1, 1_000_000), default=5, show_default=True, help="Shapes listed.")
@seed_option(help="Seed of the evolutionary search (large spaces) and of the probes.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (all fields, rejected shapes too).")
def search_cmd(
    profile_spec,
    ancestry,
    data,
    objective,
    init_method,
    expand_steps,
    steps,
    work,
    img_sizes,
    num_classes,
    snap,
    max_depth,
    top,
    seed,
    as_json,
) -> None:
    """Find descendant shapes that fit a device profile's budgets, ranked by predicted accuracy or capacity.

    \b
    Example:
      peg-factory search --profile profiles/jetson_orin.yaml --top 5
      peg-factory search --profile raspberry_pi5 --data digits      # probe the candidates on the task
      peg-factory search --profile raspberry_pi5 --json
    """
    import time

    from factory.core.ancestry import load_ancestry
    from factory.device.accuracy import describe_decision
    from factory.device.profile import load_profile
    from factory.device.search import SearchSpace
    from factory.pipeline.cache import Cache
    from factory.pipeline.config import BuildConfig, objective_for
    from factory.pipeline.device_choice import choose_by_probes, search_devices
    from factory.pipeline.shape_task import ancestry_and_data
    from factory.pipeline.stages import BuildContext, make_learngene

    profile = load_profile(profile_spec)
    cfg = BuildConfig(
        ancestry=ancestry,
        data=data or "digits",
        finetune_steps=steps,
        seed=seed,
        init=init_method,
        expand_steps=expand_steps,
        objective=objective,
    )
    anc, ds = ancestry_and_data(cfg) if data else (load_ancestry(ancestry), None)
    if objective == "accuracy" and not data:
        objective, reason = (
            "capacity",
            "--objective accuracy needs --data (task images to estimate on); fell back to capacity",
        )
        click.echo(f"note: {reason}", err=True)
    elif not data:
        objective, reason = "capacity", "no --data given (give --data to rank by predicted accuracy on it)"
    else:
        objective, reason = objective_for(cfg, anc)
        num_classes = num_classes or ds.num_classes
    space = SearchSpace.from_arch(
        anc.arch, max_depth=max_depth, snap=snap, img_sizes=tuple(img_sizes) or None, num_classes=num_classes
    )
    [entry], results = search_devices(
        [profile], space, anc, cfg, objective, reason, lambda m: click.echo(f"note: {m}", err=True)
    )
    if profile.name not in results:
        raise UserError(entry["error"])  # the profile's latency model could not be made
    result, method = results[profile.name], entry["latency_method"]
    selection: dict = {"objective": objective, "reason": reason}
    if objective == "accuracy" and result.feasible:
        log = lambda line: click.echo(line, err=True)  # noqa: E731
        ctx = BuildContext(Path(work), cfg, Cache(Path(work) / ".cache", log), log, anc, ds)
        make_learngene(ctx)
        t0 = time.perf_counter()
        [entry] = choose_by_probes(ctx, [entry], results, reason=reason)
        selection = {**entry["selection"], "seconds_total": round(time.perf_counter() - t0, 2)}
    if as_json:
        echo_json(
            {
                **result.to_dict(top=top),
                "selection": selection,
                "latency_method": method,
                "latency_band": entry["latency_band"],
            }
        )
        result.require_feasible()  # nothing fits: exit 2 with the closest miss, after the JSON
        return
    if objective == "accuracy" and result.feasible:
        click.echo(
            f"profile {profile.name}: predicted accuracy after {steps} fine-tuning steps on {data} "
            f"(successive halving, probe rungs {'/'.join(map(str, selection['estimator']['rungs']))} steps, "
            f"{selection['seconds']:.1f}s for estimates):"
        )
        click.echo(f"{'':2}{'shape':28s} {'steps':>5} {'cal NLL':>8} {'val acc':>8} {'latency ms':>10} {'capacity':>9}")
        for row in selection["candidates"]:
            click.echo(
                f"{'*' if row['chosen'] else ' ':2}{row['label']:28s} {row.get('probe_steps', ''):>5} "
                f"{row.get('val_nll', float('nan')):8.4f} {row['predicted_accuracy']:8.3f} "
                f"{row['latency_ms']:10.4f} {row['capacity_score']:9.2f}"
            )
        decision = next(r for r in selection["candidates"] if r["chosen"]).get("decision", {})
        click.echo(
            f"chosen: {selection['chosen']} (capacity proxy would pick {selection['capacity_choice']}); "
            f"{describe_decision(decision)}"
        )
        return
    click.echo(
        f"profile {profile.name}: {result.evaluated} shapes evaluated ({result.strategy}), "
        f"{len(result.feasible)} fit, {len(result.rejected)} rejected; latency by {method}; error band: "
        f"{entry['latency_band']}"
    )
    click.echo(f"ranked by capacity (log FLOPs + 0.5 log params), largest first; {reason}")
    result.require_feasible()  # nothing fits: one line with the closest miss, exit 2
    click.echo(f"{'rank':>4}  {'shape':28s} {'latency ms':>10} {'memory MB':>9} {'GFLOPs':>8} {'params M':>8}  margins")
    for i, c in enumerate(result.top(top), 1):
        margins = " ".join(f"{k}:{v:+.0%}" for k, v in c.margins.items())
        click.echo(
            f"{i:>4}  {c.shape.label():28s} {c.latency_ms:10.4f} {c.memory_mb:9.2f} {c.flops_g:8.4f} {c.params_m:8.3f}  {margins}"
        )
    click.echo(
        f"pareto front: {len(result.pareto)} shapes, latency {result.pareto[0].latency_ms:.4f}..{result.pareto[-1].latency_ms:.4f} ms"
    )
    by_budget: dict[str, int] = {}
    for c in result.rejected:
        for k in c.broken:
            by_budget[k] = by_budget.get(k, 0) + 1
    if by_budget:
        click.echo("rejected: " + ", ".join(f"{n} broke {k}" for k, n in sorted(by_budget.items())))
