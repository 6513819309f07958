"""--policy auto: cheap trials on the validation split, the winner trained in full, the choice explained."""

from __future__ import annotations

import json

import pytest

import vtransfer.api as api
from vtransfer.workflows.auto_policy import Trial, candidate_policies, pick_winner
from vtransfer.utils.errors import ConfigError
from vtransfer.run_config import RunConfig

FAST = dict(backbone="slowfusion", preset="tiny", size=48, batch_size=8, clips_per_video=2, val_clips=1,
            workers=0, device="cpu", cache="memory")


def _trial(policy, acc, params):
    return Trial(policy, 3, False, acc, params, 1.0, "x")


def test_the_best_validation_score_wins_and_ties_go_to_fewer_parameters():
    best, why = pick_winner([_trial("top-layer", 0.5, 10), _trial("top-3", 0.8, 100), _trial("all", 0.6, 1000)])
    assert best.policy == "top-3" and "0.800" in why
    best, why = pick_winner([_trial("all", 0.8, 1000), _trial("top-layer", 0.8, 10), _trial("top-3", 0.8, 100)])
    assert best.policy == "top-layer" and "tied with all, top-3" in why


def test_candidates_put_cached_feature_policies_first_and_skip_what_does_not_apply():
    cheap, rest = candidate_policies(RunConfig.from_options(backbone="vivit", preset="tiny"))
    assert cheap == ["top-layer", "attentive-probe"]  # both train on the frozen features alone
    names = [p for _, p in rest]
    assert "scratch" not in names and {"top-3", "temporal", "all", "bitfit", "lora", "adapter"} <= set(names)
    joint = [p for _, p in candidate_policies(RunConfig.from_options(backbone="vivit", preset="tiny-joint"))[1]]
    assert "temporal" not in joint and "adapter" not in joint  # neither applies to joint space-time attention
    counts = [n for n, _ in rest]
    assert counts == sorted(counts)  # fewest trainable parameters first


@pytest.fixture(scope="module")
def target(demo_datasets):
    return demo_datasets("target", class_set="target", videos_per_class=5, frames=16, size=48, seed=1)


def test_auto_trains_the_winner_in_the_run_folder_and_never_tests_a_trial(target, tmp_path):
    res = api.finetune(target, policy="auto", auto_trials=1, auto_epochs=1, epochs=2, patience=0,
                       out=tmp_path / "run", **FAST)
    doc = json.loads((tmp_path / "run" / "auto.json").read_text())
    tried = [t["policy"] for t in doc["trials"]]
    assert tried[0] == "top-layer" and len(tried) == 2 and doc["trials"][1]["epochs"] == 1
    # the cached-feature trial trains as long as the winner will: the run's --epochs, not the policy's default (30)
    assert doc["trials"][0]["epochs"] == 2 and doc["trials"][0]["full"] and not doc["trials"][1]["full"]
    assert doc["winner"] in tried and doc["winner"] in doc["why"]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["options"]["policy"] == doc["winner"] == res.plan["policy"]
    assert (tmp_path / "run" / "report" / "report.json").is_file() and res.test is not None
    for t in doc["trials"]:
        assert not (tmp_path / "run" / "auto-trials" / t["policy"] / "report").exists()


def test_bad_auto_settings_are_refused(target, tmp_path):
    with pytest.raises(ConfigError, match="--auto-epochs"):
        api.finetune(target, policy="auto", auto_epochs=0, out=tmp_path / "bad", **FAST)


def test_losing_trials_let_their_feature_stores_go():
    import torch

    from vtransfer.engine import feature_cache
    from vtransfer.workflows.auto_policy import _drop_losers
    from vtransfer.engine.trainer import QuietReporter

    class Recorder(QuietReporter):
        def __init__(self):
            self.lines = []

        def message(self, text):
            self.lines.append(text)

    feature_cache.clear_stores()
    for key in [("top", "c"), ("shared", "c"), ("probe", "c")]:
        feature_cache._STORES[key] = feature_cache.FeatureStore(torch.zeros(256, 1024), torch.zeros(256),
                                                                torch.zeros(256), [], 1)
    stores = {"top-layer": {("top", "c"), ("shared", "c")}, "attentive-probe": {("probe", "c"), ("shared", "c")}}
    rec = Recorder()
    _drop_losers([_trial("top-layer", 0.9, 10), _trial("attentive-probe", 0.8, 100)], stores, rec)
    # The loser's own store goes; the one the leader also uses stays, as does the leader's.
    assert feature_cache.store_keys() == {("top", "c"), ("shared", "c")}
    assert rec.lines == ["auto: freed 1 MiB of cached attentive-probe features"]
    assert set(stores) == {"top-layer"}
    feature_cache.clear_stores()


def test_drop_stores_reports_the_bytes_it_freed():
    import torch

    from vtransfer.engine import feature_cache

    feature_cache.clear_stores()
    store = feature_cache.FeatureStore(torch.zeros(4, 8), torch.zeros(4), torch.zeros(4), [], 1)
    feature_cache._STORES[("a", "b")] = store
    assert feature_cache.drop_stores({("a", "b"), ("x", "y")}) == 4 * 8 * 4
    assert feature_cache.store_keys() == set()
