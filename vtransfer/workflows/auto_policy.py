"""``--policy auto``: choose the freezing policy on the validation split from cheap runs, then train the winner.

The trials, cheapest first:

1. every policy that trains the classifier alone on frozen features (``top-layer``,
   and any other policy whose trainable part is only the head group) runs in
   full, for the run's own epochs as the winner will (unset: the policy's default): its epochs cost
   next to nothing on the frozen-prefix feature cache;
2. then at most ``auto_trials`` of the other policies that apply to the model,
   fewest trainable parameters first, each for ``auto_epochs`` epochs.

Each trial is scored by its best validation video accuracy; ties go to the
policy with fewer trainable parameters (cheaper, and less room to overfit a
small training set). The test videos are never scored in a trial. The winner
is then trained in full in the run folder itself, like any other run, and
``RUN/auto.json`` records every trial, its score, epochs and time, and why the
winner won. A trial's frozen-prefix feature stores are let go as soon as it
can no longer win, so memory holds the leader's features, not every trial's.
``scratch`` is never a candidate: it is the baseline, not a way to
transfer.

With ``--stream two-stream`` the stream is chosen too: each trial trains
both streams, and the RGB network, the flow network and the fused pair are
three candidates, scored the same way (a single stream trains half the
parameters, so it wins a tie with the pair). The winner's stream is the one
trained in full.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vtransfer.engine import feature_cache
from vtransfer.policies.freezing import plan_policy
from vtransfer.policies.names import ALL_POLICY_NAMES, STRUCTURAL_POLICIES
from vtransfer.policies.peft import PolicyOptions
from vtransfer.run_config import RunConfig
from vtransfer.utils.errors import ConfigError
from vtransfer.workflows import runs
from vtransfer.workflows.two_stream import run_any
from vtransfer.workflows.run_model import build_run_model

AUTO = "auto"
TRIALS_DIR = "auto-trials"


@dataclass
class Trial:
    """One candidate policy's run: what it trained and how it scored on the validation split."""

    policy: str
    epochs: int
    full: bool  # trained with its full epoch budget (a cached-feature policy), not a short trial
    val_video_acc: float
    trainable_params: int
    time_s: float
    run_dir: str
    stream: str = "rgb"

    @property
    def label(self) -> str:
        """The policy, with its stream when that is not RGB (``top-layer (flow)``)."""
        return self.policy if self.stream == "rgb" else f"{self.policy} ({self.stream})"


def candidate_policies(cfg: RunConfig) -> tuple[list[str], list[tuple[int, str]]]:
    """The cached-feature policies, and ``(trainable params, policy)`` of the others that apply, cheapest first."""

    base = cfg.replace(policy="top-layer", merge=False)
    shared, _ = build_run_model(base, num_classes=2)
    cheap, rest = [], []
    for policy in ALL_POLICY_NAMES:
        if policy in ("scratch", AUTO):
            continue
        model = build_run_model(base, num_classes=2)[0] if policy in STRUCTURAL_POLICIES else shared
        try:
            model, plan = plan_policy(model, policy, PolicyOptions.from_config(base.policy))
        except ConfigError:
            continue  # does not apply to this backbone (temporal without temporal layers, LoRA without linears)
        if plan.first_trainable_group >= len(model.layer_groups()) - 1:
            cheap.append(policy)
        else:
            rest.append((plan.trainable_count(model), policy))
    return cheap, sorted(rest)


def choose_policy(run_dir: Path, cfg: RunConfig, reporter=None) -> tuple[str, list[Trial], str]:
    """Run the trials under ``RUN/auto-trials/<policy>``; return the winner, every trial and the reason it won."""

    if cfg.policy.auto_trials < 0 or cfg.policy.auto_epochs < 1:
        raise ConfigError(f"--auto-trials must be >= 0 and --auto-epochs >= 1 (got {cfg.policy.auto_trials}, "
                          f"{cfg.policy.auto_epochs})")
    cheap, rest = candidate_policies(cfg)
    # the cached-feature policies get the run's own epochs (as the winner will; unset: each policy's default)
    chosen = [(p, cfg.training.epochs, True) for p in cheap]
    chosen += [(p, cfg.policy.auto_epochs, False) for _, p in rest[: cfg.policy.auto_trials]]
    trials: list[Trial] = []
    stores: dict[str, set] = {}  # trial policy -> feature-store keys it added
    for policy, epochs, full in chosen:
        trial_cfg = cfg.replace(policy=policy, epochs=epochs, out=None, merge=False).with_policy_epochs()
        if not full:
            trial_cfg = trial_cfg.replace(patience=0)
        sub = runs.prepare_run_dir(run_dir / TRIALS_DIR / policy, overwrite=True)
        _say(reporter, f"auto: trying {policy} for {trial_cfg.training.epochs} epochs")
        t0 = time.perf_counter()
        before = feature_cache.store_keys()
        res = run_any(sub, trial_cfg.replace(out=str(sub)), resume=False, reporter=reporter, test=False)
        elapsed, n = time.perf_counter() - t0, int(trial_cfg.training.epochs)
        parts = {**res.streams, "two-stream": res} if res.streams else {trial_cfg.clips.stream: res}
        for stream, part in parts.items():
            where = sub / stream if res.streams and stream != "two-stream" else sub
            trials.append(Trial(policy, n, full, float(part.best_val_video_acc), part.trainable_params,
                                elapsed, str(where), stream=stream))
        stores[policy] = feature_cache.store_keys() - before
        _drop_losers(trials, stores, reporter)
    if not trials:
        raise ConfigError(f"--policy auto: no policy applies to backbone {cfg.model.backbone!r}")
    best, why = pick_winner(trials)
    return best, trials, why


def _drop_losers(trials: list[Trial], stores: dict[str, set], reporter) -> None:
    """Free the feature stores of trials that can no longer win; the leader's stay for its full run."""

    leader = pick_winner(trials)[0].policy  # a two-stream trial's streams share its stores
    keep = stores.get(leader, set())
    for policy in [p for p in stores if p != leader]:
        freed = feature_cache.drop_stores(stores.pop(policy) - keep)
        if freed:
            _say(reporter, f"auto: freed {freed / 2**20:,.0f} MiB of cached {policy} features")


def pick_winner(trials: list[Trial]) -> tuple[Trial, str]:
    """The trial with the best validation video accuracy (ties: fewest trainable parameters), and why it won."""
    best = max(trials, key=lambda t: (t.val_video_acc, -t.trainable_params))
    tied = [t.label for t in trials if t.val_video_acc == best.val_video_acc and t is not best]
    why = (f"{best.label} has the best validation video accuracy ({best.val_video_acc:.3f})"
           + (f"; tied with {', '.join(tied)}, it trains the fewest parameters ({best.trainable_params:,})" if tied else ""))
    return best, why


def write_choice(run_dir: Path, winner: Trial, trials: list[Trial], why: str, total_s: float) -> Path:
    """``RUN/auto.json``: the trials, the winner (policy and stream) and why."""

    path = run_dir / "auto.json"
    runs.write_json(path, {"winner": winner.policy, "stream": winner.stream, "why": why, "trials": [asdict(t) for t in trials], "trials_time_s": total_s})
    return path


def describe(trials: list[Trial]) -> list[str]:
    """One line per trial, for the log."""
    return [f"  {t.label:<25} {'full' if t.full else 'trial'} {t.epochs:>3} epochs  val video acc {t.val_video_acc:.3f}  "
            f"{t.trainable_params:>10,} trainable  {t.time_s:6.1f}s" for t in trials]


def _say(reporter: Any, text: str) -> None:
    if reporter is not None:
        reporter.message(text)
