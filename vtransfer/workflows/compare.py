"""compare-policies: several freezing policies on one split with the same seeds, and one table of the results."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from vtransfer.data.preprocessing import describe_input
from vtransfer.data.run_data import open_dataset
from vtransfer.data.splits import read_manifest, write_manifest
from vtransfer.engine import feature_cache
from vtransfer.engine.trainer import TrainingDiverged
from vtransfer.evaluation.metrics import EvalResult
from vtransfer.policies.freezing import plan_policy
from vtransfer.policies.names import ALL_POLICY_NAMES, FREEZING_POLICY_NAMES, STRUCTURAL_POLICIES, default_epochs
from vtransfer.policies.peft import PolicyOptions
from vtransfer.reporting.policy_report import write_policy_table
from vtransfer.run_config import DataConfig, RunConfig, check_training
from vtransfer.utils.errors import ConfigError
from vtransfer.workflows import runs
from vtransfer.workflows.compare_rows import PolicyRow, aggregate_seed_rows
from vtransfer.workflows.pipeline import FinetuneResult
from vtransfer.workflows.run_model import build_run_model
from vtransfer.workflows.shots import run_curve, write_curve
from vtransfer.workflows.two_stream import FUSION_FILE

#: Options that make the comparison's split; its runs then all read that split from ``OUT/split.csv``.
SPLIT_KEYS = ("manifest", "split_files", "split_seed", "ratios", "group_pattern")


@dataclass
class CompareResult:
    """What :func:`compare_policies` produced: one row per policy (mean ± std over seeds)."""

    out_dir: Path
    rows: list[Any]
    skipped: dict[str, str]
    runs: dict[str, list[Path]]
    setup: dict[str, str] = field(default_factory=dict)  # backbone, architecture, input, parameters (see comparison_setup)
    curve: dict | None = None  # policy -> [vtransfer.workflows.shots.CurvePoint] with --shots


def resolve_seeds(seeds: Any, seed: int | None) -> list[int]:
    """The seeds to run: ``seeds``, or ``[seed]`` when only ``--seed`` is given (both agreeing is fine too)."""
    listed = [int(s) for s in (seeds if seeds is not None else ())]
    if seed is None:
        return listed or [0]
    if listed and listed != [int(seed)]:
        raise ConfigError(f"--seed {seed} and --seeds {','.join(map(str, listed))} disagree; give one of them")
    return [int(seed)]


def compare_policies(
    data: str | Path,
    *,
    policies: tuple[str, ...] | list[str] = FREEZING_POLICY_NAMES,
    seeds: tuple[int, ...] | list[int] | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    reporter=None,
    on_policy: Callable[[str, int], None] | None = None,
    shots: list[int | None] | None = None,
    finetune: Callable[..., FinetuneResult],
    **options: Any,
) -> CompareResult:
    """Run each policy on the same split with the same seeds and epoch budget; one table.

    ``options`` are run options (:class:`~vtransfer.run_config.RunConfig`'s
    names); ``seed=N`` is the same as ``seeds=(N,)``. Every run lives in
    ``OUT/<policy>`` (``OUT/<policy>/seed-N`` for several seeds); the table is
    written as ``compare.json``/``.csv``/``.md``/``.html`` plus a per-category
    bar chart. A policy that does not apply to the backbone (``temporal``
    without temporal layers) is skipped and reported. Re-running with the same
    options reuses finished runs. ``shots`` (``[1, 2, 5, None]``, ``None`` =
    all) adds a learning curve: every policy again with that many training
    videos per class (:mod:`vtransfer.workflows.shots`), written as ``shots.*`` and
    shown in ``compare.html``.
    """

    seeds = resolve_seeds(seeds, options.pop("seed", None))
    RunConfig.from_options(options)  # unknown option names fail now
    split_options = {k: options.pop(k) for k in SPLIT_KEYS if k in options}
    order, skipped = plan_comparison(list(policies), options)  # fail before work
    out_dir = Path(out) if out else runs.default_run_dir(f"compare-{options.get('backbone', RunConfig().model.backbone)}")
    reuse = out_dir.exists() and (out_dir / runs.SPLIT_FILE).exists() and not overwrite
    if not reuse:
        out_dir = runs.prepare_run_dir(out_dir, overwrite=overwrite)
        write_manifest(out_dir / runs.SPLIT_FILE, open_dataset(DataConfig(data=Path(data), **split_options)))
    run_options = dict(options, data=data, manifest=out_dir / runs.SPLIT_FILE)
    rows, run_dirs, accuracy = _run_policies(order, seeds, out_dir, run_options, skipped, reporter, on_policy, finetune)
    rows.sort(key=lambda r: list(policies).index(r.policy))  # the table keeps the order asked for (streams stay in order)
    setup = comparison_setup(run_dirs)
    figures, curve = [], None
    if shots and accuracy:
        curve = _learning_curve(shots, [p for p in policies if p in accuracy], seeds, out_dir, accuracy, data, options,
                                reporter, on_policy, finetune)
        figures.append(("Test accuracy by labelled training videos per class", "shots.png",
                        (out_dir / "shots.png").read_bytes()))
    if rows:
        write_policy_table(rows, out_dir, extra=setup, figures=figures)
    runs.write_json(out_dir / "skipped.json", skipped)
    return CompareResult(out_dir, rows, skipped, run_dirs, setup, curve)


def _run_policies(order: list[str], seeds: list[int], out_dir: Path, options: dict, skipped: dict[str, str], reporter,
                  on_policy, finetune) -> tuple[list, dict[str, list[Path]], dict[str, list[float]]]:
    """Every policy under every seed (``OUT/<policy>[/seed-N]``): table rows, run folders, per-seed test accuracy.

    A policy that fails with a configuration error or diverges goes into ``skipped`` (and out of the results).
    """

    rows, run_dirs, accuracy = [], {}, {}
    earlier_stores: set = set()  # frozen-prefix feature stores the policies run so far added
    for policy in order:
        per_seed: dict[str | None, list[PolicyRow]] = {}  # by stream: None for a one-stream run
        before = feature_cache.store_keys()
        for seed in seeds:
            sub = out_dir / policy if len(seeds) == 1 else out_dir / policy / f"seed-{seed}"
            if on_policy:
                on_policy(policy, seed)
            try:
                res = _finished_or_run(sub, reporter, finetune, dict(options, policy=policy, seed=seed))
            except runs.RunInterrupted as e:
                raise runs.RunInterrupted(out_dir, e.epochs_done, e.epochs, command="compare-policies") from None
            except (ConfigError, TrainingDiverged) as e:
                skipped[policy] = str(e)
                break
            run_dirs.setdefault(policy, []).append(sub)
            accuracy.setdefault(policy, []).append(res.test.video_hit1)
            for stream, part, where in _stream_rows(res, sub):
                per_seed.setdefault(stream, []).append(PolicyRow.from_eval(
                    policy, seed, trainable_params=part.trainable_params, total_params=part.total_params,
                    train_time_s=part.train_time_s, val_video_acc=part.best_val_video_acc, test=part.test,
                    run_dir=where, stream=stream))
        if per_seed and policy not in skipped:
            rows.extend(aggregate_seed_rows(seed_rows) for seed_rows in per_seed.values())
        added = feature_cache.store_keys() - before
        if added:  # the policies after it (deeper prefixes: shallow_prefixes_first) reuse or derive from these
            earlier_stores |= added
            feature_cache.prune_stores(earlier_stores)
            earlier_stores &= feature_cache.store_keys()
    if not feature_cache.comparisons_keep_stores():
        feature_cache.drop_stores(earlier_stores)  # nothing after the comparison reads them
    for policy in skipped:
        accuracy.pop(policy, None)
    return rows, run_dirs, accuracy


def _stream_rows(res: FinetuneResult, run_dir: Path) -> list[tuple[str | None, FinetuneResult, Path]]:
    """The rows one run gives: itself; or, for two-stream, each stream's and the fused one ("RGB gets appearance,
    flow gets motion, together both")."""
    if not res.streams:
        return [(None, res, run_dir)]
    return [*((name, part, run_dir / name) for name, part in res.streams.items()), ("two-stream", res, run_dir)]


def _learning_curve(shots, policies, seeds, out_dir: Path, accuracy: dict[str, list[float]], data, options: dict,
                    reporter, on_policy, finetune) -> dict:
    """The few-shot points of every policy (see :mod:`vtransfer.workflows.shots`), written as ``OUT/shots.*``."""

    base = read_manifest(out_dir / runs.SPLIT_FILE, check_files=False)

    def run_point(manifest: Path, sub: Path, policy: str, seed: int) -> float:
        if on_policy:
            on_policy(f"{policy} {sub.parent.parent.name}", seed)
        res = _finished_or_run(sub, reporter, finetune, dict(options, data=data, policy=policy, seed=seed, manifest=manifest))
        return res.test.video_hit1

    curve = run_curve(shots, policies, seeds, out_dir, accuracy, len(base.split("train")), run_point)
    write_curve(curve, out_dir, chance=1 / len(base.classes))
    return curve


def _short(value: Any) -> str:
    """A config value for one line of a table (nested settings are counted, not spelled out)."""
    if isinstance(value, dict):
        return f"<{len(value)} settings>"
    return str(value)


def comparison_setup(run_dirs: dict[str, list[Path]]) -> dict[str, str]:
    """What every row of a comparison trained: backbone, architecture, input geometry, parameters, weights.

    Read back from each run's ``config.json``. Rows must share one
    architecture and geometry; if any differs (runs reused from an older
    comparison), an ``"architecture mismatch"`` entry names the rows.
    """

    seen: dict[str, list[str]] = {}
    setup: dict[str, str] = {}
    weights = set()
    epochs: dict[str, list[str]] = {}
    totals: dict[str, int] = {}
    for policy, dirs in run_dirs.items():
        for d in dirs:
            try:
                resolved = _resolved_setup(d)
            except (OSError, KeyError, ValueError):
                continue
            arch = resolved.get("architecture")
            pre = resolved.get("preprocessing", {})
            described = {
                "backbone": str(resolved.get("weights", {}).get("backbone", "?")),
                "architecture": ", ".join(f"{k}={_short(v)}" for k, v in sorted((arch or {}).items())
                                          if k not in ("num_classes", "dropout")) or "(not recorded)",
                "input": describe_input(pre),
            }
            totals.setdefault(policy, int(resolved.get("total_params", 0)))
            key = repr(sorted(described.items()))
            epochs.setdefault(str(resolved.get("train", {}).get("epochs", "?")), []).append(policy)
            seen.setdefault(key, []).append(f"{policy}" if len(dirs) == 1 else f"{policy}/{d.name}")
            setup = setup or described
            if policy != "scratch":
                weights.add(str(resolved.get("weights", {}).get("weights")))
    if totals:  # LoRA, adapters and probes add modules: the backbone is the smallest row's
        base = min(totals.values())
        setup["parameters"] = f"{base:,}"
        added = {p: n - base for p, n in totals.items() if n > base}
        if added:
            setup["added by the policy"] = ", ".join(f"{p} +{n:,}" for p, n in added.items())
    if weights:
        setup["pretrained weights"] = ", ".join(sorted(weights))
    if epochs:
        setup["epochs"] = "; ".join(f"{n} ({', '.join(dict.fromkeys(ps))})" for n, ps in epochs.items()) if len(epochs) > 1 else next(iter(epochs))
    if len(seen) > 1:
        setup["architecture mismatch"] = "; ".join(", ".join(rows) for rows in seen.values())
    return setup


def _resolved_setup(run_dir: Path) -> dict:
    """A run's resolved configuration; a two-stream run's is its RGB stream's, with both streams' input."""
    resolved = runs.read_json(run_dir / runs.CONFIG_FILE)["resolved"]
    if "streams" not in resolved:
        return resolved
    rgb = runs.read_json(run_dir / "rgb" / runs.CONFIG_FILE)["resolved"]
    flow = runs.read_json(run_dir / "flow" / runs.CONFIG_FILE)["resolved"]
    return {**rgb, "preprocessing": {**rgb["preprocessing"], "stream": "two-stream",
                                     "flow": flow["preprocessing"].get("flow")},
            "total_params": rgb.get("total_params", 0) + flow.get("total_params", 0)}


def plan_comparison(policies: list[str], options: dict) -> tuple[list[str], dict[str, str]]:
    """Check a comparison before any data is decoded; return the order to run it in and the skipped policies.

    Unknown policy names, weights that do not fit the backbone, a preset a
    checkpoint contradicts: all raise here, naming the valid choices, instead
    of after minutes of training. A policy that does not apply to this model
    (``temporal`` without temporal layers) is returned in ``skipped`` with the
    reason. The rest are ordered by :func:`shallow_prefixes_first`.
    """

    unknown = [p for p in policies if p not in ALL_POLICY_NAMES]
    if unknown:
        raise ConfigError(f"--policies: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(ALL_POLICY_NAMES)}")
    if not policies:
        raise ConfigError(f"--policies: give at least one of {', '.join(ALL_POLICY_NAMES)}")
    cfg = RunConfig.from_options({**options, "policy": "top-layer"})
    check_training(cfg.training, cfg.clips)  # out-of-range training options would fail every policy alike
    shared, _ = build_run_model(cfg, num_classes=2)
    depth, skipped = {}, {}
    for p in policies:
        model = build_run_model(cfg, num_classes=2)[0] if p in STRUCTURAL_POLICIES else shared  # one structure a model
        try:
            depth[p] = plan_policy(model, p, PolicyOptions.from_config(cfg.policy), cfg.policy.train_groups)[1].first_trainable_group
        except ConfigError as e:
            skipped[p] = str(e)
    runnable = [p for p in policies if p in depth]
    return shallow_prefixes_first(runnable, depth), skipped


def shallow_prefixes_first(policies: list[str], depth: dict[str, int]) -> list[str]:
    """The order to run ``policies`` in so that shared feature caches are reused, not recomputed.

    ``depth`` is each policy's first trainable group. A frozen-prefix feature
    store can be extended to a deeper prefix by running only the groups in
    between, never cut back to a shallower one, so the policies with a frozen
    prefix run shallowest first (``top-3`` before ``top-layer``), each taking
    the place of one of them in the list; policies without a frozen prefix
    keep their places.
    """
    cached = iter(sorted((p for p in policies if depth[p] > 0), key=lambda p: depth[p]))
    return [next(cached) if depth[p] > 0 else p for p in policies]


def _finished_or_run(run_dir: Path, reporter, finetune: Callable[..., FinetuneResult], options: dict) -> FinetuneResult:
    """Reuse a finished run with identical options, else (re)run it."""

    if options.get("epochs") is None:  # compared as finetune will record it

        options = {**options, "epochs": default_epochs(str(options["policy"]))}
    report_file = run_dir / "report" / "report.json"
    same_options = False
    if (run_dir / runs.CONFIG_FILE).exists():
        saved = runs.read_json(run_dir / runs.CONFIG_FILE)
        saved_cfg = RunConfig.from_json(saved)
        wanted = RunConfig.from_options({**saved_cfg.options(), **options, "out": str(run_dir)})
        same_options = saved_cfg.to_json() == wanted.to_json()
    if same_options and not report_file.exists():
        return finetune(resume=run_dir, reporter=reporter)  # a sub-run that was stopped: continue it
    if same_options:
        return _finished_result(run_dir)
    return finetune(reporter=reporter, out=run_dir, overwrite=True, **options)


def _finished_result(run_dir: Path) -> FinetuneResult:
    """A finished run's result read back from its folder (a two-stream run's with each stream's)."""
    report = runs.read_json(run_dir / "report" / "report.json")
    resolved = runs.read_json(run_dir / runs.CONFIG_FILE)["resolved"]
    if "streams" in resolved:  # two-stream: the streams' runs hold the training numbers
        streams = {name: _finished_result(run_dir / name) for name in resolved["streams"]}
        fusion = runs.read_json(run_dir / FUSION_FILE)
        first = next(iter(streams.values()))
        return FinetuneResult(run_dir, run_dir / runs.MODEL_FILE, report, [h for r in streams.values() for h in r.history],
                              sum(r.trainable_params for r in streams.values()),
                              sum(r.total_params for r in streams.values()),
                              sum(r.train_time_s for r in streams.values()), fusion["fused_val_video_acc"], first.plan,
                              test=EvalResult.from_dict(report), streams=streams, fusion_weight=fusion["flow_weight"])
    history = runs.read_metrics(run_dir)
    return FinetuneResult(run_dir, run_dir / runs.MODEL_FILE, report, history, resolved["trainable_params"],
                          resolved["total_params"], sum(h["time_s"] for h in history),
                          max((h["val_video_acc"] for h in history), default=0.0), resolved["policy"],
                          test=EvalResult.from_dict(report))
