"""The paper recipes in ``recipes/``: every one parses with the real command options and drives a run.

Runs go through the CLI (``--recipe X`` plus tiny overrides: tiny presets, one
epoch, a few clips) on a small make-demo dataset, and the run folders'
``config.json`` must show the recipe's values where no option was given and the
command line's where one was.
"""

from __future__ import annotations

import csv
import json
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import vtransfer.cli
from vtransfer.utils.errors import ConfigError
from vtransfer.recipes import recipe_values

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

vtransfer.cli._register_commands()
from vtransfer.cli.app import app  # noqa: E402  (after the commands are registered)

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
RECIPE_COMMANDS = ("pretrain", "finetune", "compare-policies")
PAPER_RECIPES = ("karpathy-ucf101.toml", "i3d-kinetics-transfer.toml", "vivit-seed.toml")
UCF_GROUPS = {
    "Human-Object Interaction": 20,
    "Body-Motion Only": 16,
    "Human-Human Interaction": 5,
    "Playing Musical Instruments": 10,
    "Sports": 50,
}
# Overrides that make any recipe's run take seconds.
FAST = ["--epochs", "1", "--clips-per-video", "1", "--val-clips", "1", "--workers", "0", "--device", "cpu",
        "--cache", "memory"]


# -- helpers ---------------------------------------------------------------------------


def _command_keys() -> tuple[dict[str, set[str]], set[str]]:
    """Option names of each recipe-taking command, and of all of them (as the CLI computes them)."""
    from typer.main import get_command

    root = get_command(app)
    per_command = {name: {p.name for p in root.commands[name].params} for name in (*RECIPE_COMMANDS, "demo")}
    all_keys = set().union(*per_command.values()) - {"recipe"}
    return per_command, all_keys


def _values(recipe: Path, command: str) -> dict:
    per_command, all_keys = _command_keys()
    return recipe_values(recipe, command, per_command[command], all_keys)


def _invoke(args: list[str]):
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exit_code != 0:
        raise AssertionError(f"vtransfer {' '.join(map(str, args))} failed ({result.exit_code}):\n{result.output}") from result.exception
    return result


def _options(run_dir: Path) -> dict:
    return json.loads((run_dir / "config.json").read_text())["options"]


def _resolved(run_dir: Path) -> dict:
    return json.loads((run_dir / "config.json").read_text())["resolved"]


# -- fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _private_home(tmp_path_factory):
    """Keep the weights cache and source registry of these runs out of the user's home."""
    mp = pytest.MonkeyPatch()
    mp.setenv("VTRANSFER_HOME", str(tmp_path_factory.mktemp("vtransfer-home")))
    mp.setenv("VTRANSFER_OFFLINE", "1")
    yield
    mp.undo()


@pytest.fixture(scope="module")
def data(demo_datasets) -> Path:
    """Three appearance and three motion classes, 4 short videos each (shared, read only)."""
    return demo_datasets("target", class_set="target", videos_per_class=4, frames=16, size=48)


def _tiny_checkpoint(path: Path, backbone: str, **overrides) -> Path:
    """A random-init tiny backbone saved as a vtransfer checkpoint: stands in for pretrained weights."""
    from vtransfer.models.registry import build_backbone
    from vtransfer.weights.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = build_backbone(backbone, "tiny", num_classes=5, **overrides)
    return save_checkpoint(path, model, classes=[f"src{i}" for i in range(5)], source={"dataset": "synthetic-source"})


@pytest.fixture(scope="module")
def karpathy_runs(data, tmp_path_factory) -> dict[str, Path]:
    """compare-policies with the Karpathy recipe (tiny slow fusion at 64x64, stand-in pretrained weights)."""
    out = tmp_path_factory.mktemp("karpathy")
    weights = _tiny_checkpoint(out / "slowfusion.safetensors", "slowfusion", dropout=0.5)
    _invoke(["compare-policies", data, "--recipe", RECIPES / "karpathy-ucf101.toml", "--preset", "tiny", "--size", "64",
             *FAST, "--weights", weights, "--categories", data / "categories.csv", "--out", out / "compare"])
    return {"compare": out / "compare", "weights": weights}


# -- every recipe parses ------------------------------------------------------------------


@pytest.mark.parametrize("command", RECIPE_COMMANDS)
@pytest.mark.parametrize("name", [*PAPER_RECIPES, "demo.toml"])
def test_every_recipe_parses_for_every_command(name, command):
    values = _values(RECIPES / name, command)
    per_command, _ = _command_keys()
    assert values and set(values) <= per_command[command]
    assert values["backbone"] in ("slowfusion", "i3d", "vivit", "effnet3d")
    for key in ("categories", "split_files", "manifest"):
        if key in values:
            assert Path(values[key]).is_file(), f"{name} [{command}] {key} = {values[key]}"


def test_every_recipe_starts_with_a_comment_citing_its_numbers():
    expected = {
        "karpathy-ucf101.toml": ["41.3", "64.1", "65.4", "62.2", "0.55", "0.79"],
        "i3d-kinetics-transfer.toml": ["98.0", "80.9"],
        "vivit-seed.toml": ["94.91", "94.84", "95.43", "94.58"],
        "demo.toml": ["DEMO_SETTINGS"],
    }
    for name, numbers in expected.items():
        text = (RECIPES / name).read_text()
        assert text.startswith("#"), name
        header = text.split("\nbackbone", 1)[0]  # the comment block before the first setting
        for number in numbers:
            assert number in header, f"{name}: {number} not in its opening comment"


def test_karpathy_recipe_values():
    recipe = RECIPES / "karpathy-ucf101.toml"
    common = dict(backbone="slowfusion", preset="full", frames=10, size=170, optimizer="sgd", lr=1e-3,
                  weight_decay=5e-4, batch_size=32, clips_per_video=20)
    for command in RECIPE_COMMANDS:
        v = _values(recipe, command)
        assert {k: v[k] for k in common} == common, command
    ft, cmp_, pre = (_values(recipe, c) for c in ("finetune", "compare-policies", "pretrain"))
    assert ft["dropout"] == cmp_["dropout"] == 0.9  # keep 10% of units when transferring
    assert pre["dropout"] == 0.5 and "categories" not in pre  # [pretrain] wins; no UCF file on the source set
    assert cmp_["policies"] == ["scratch", "top-layer", "top-3", "all"]
    assert ft["policy"] == "top-3"
    assert ft["categories"] == cmp_["categories"] == str(RECIPES / "ucf101_categories.csv")
    from vtransfer.data.splits import compile_group_pattern, group_of

    regex = compile_group_pattern(cmp_["group_pattern"])
    assert group_of("v_ApplyEyeMakeup_g08_c01.avi", regex) == "08"
    assert group_of("v_YoYo_g25_c05.avi", regex) == "25"


def test_karpathy_crops_170_from_200_pixel_frames():
    from vtransfer import api
    from vtransfer.models.registry import build_backbone

    v = _values(RECIPES / "karpathy-ucf101.toml", "finetune")
    overrides = api.geometry_overrides("slowfusion", v["preset"], v["frames"], v["stride"], v["size"])
    with torch.device("meta"):
        model = build_backbone("slowfusion", v["preset"], num_classes=101, **overrides)
    pre = api.adapt_preprocessing(model.preprocessing, v["frames"], v["stride"], v["size"])
    assert (pre.frames, pre.crop_size, pre.resize_short) == (10, (170, 170), 200)


def test_i3d_and_vivit_recipe_values():
    i3d = {c: _values(RECIPES / "i3d-kinetics-transfer.toml", c) for c in RECIPE_COMMANDS}
    assert i3d["finetune"]["weights"] == i3d["compare-policies"]["weights"] == "i3d:kinetics400"
    assert i3d["pretrain"]["weights"] == "i3d:imagenet"
    assert (i3d["finetune"]["frames"], i3d["finetune"]["size"], i3d["finetune"]["preset"]) == (64, 224, "kinetics")
    assert i3d["compare-policies"]["policies"] == ["top-layer", "all"]
    vivit = {c: _values(RECIPES / "vivit-seed.toml", c) for c in RECIPE_COMMANDS}
    assert vivit["finetune"]["preset"] == "vivit-seed" and vivit["finetune"]["frames"] == 150
    assert vivit["compare-policies"]["policies"] == ["all", "temporal", "top-layer"]
    assert vivit["finetune"]["policy"] == "temporal"
    assert (vivit["pretrain"]["epochs"], vivit["pretrain"]["ratios"]) == (30, [0.8, 0.2, 0.0])
    assert vivit["pretrain"]["name"] == vivit["finetune"]["weights"] == vivit["compare-policies"]["weights"]


def test_vivit_seed_case_2_trains_everything_but_the_tubelet_embedding():
    """The comment's `--train 'spatial*,temporal*'` is the seed paper's spatial + temporal transformer + FC."""
    from vtransfer.models.registry import build_backbone
    from vtransfer.policies.freezing import resolve_policy

    with torch.device("meta"):
        model = build_backbone("vivit", "vivit-seed", num_classes=100)
    plan = resolve_policy(model, "top-layer", ["spatial*", "temporal*"])
    groups = model.layer_groups()
    assert plan.trainable_groups == [g.name for g in groups if g.name != "embed"]
    assert set(plan.trainable) == {p for g in groups if g.name != "embed" for p in g.params}
    assert next(g for g in groups if g.name == "embed").params  # the frozen part is not empty


# -- UCF-101 categories ----------------------------------------------------------------


def test_ucf101_categories_file_has_the_five_groups():
    from vtransfer.data.categories import read_categories_file

    mapping = read_categories_file(RECIPES / "ucf101_categories.csv")
    assert len(mapping) == 101
    assert Counter(mapping.values()) == Counter(UCF_GROUPS)
    assert mapping["ApplyEyeMakeup"] == "Human-Object Interaction"
    assert mapping["PlayingDaf"] == "Playing Musical Instruments"
    assert mapping["SalsaSpin"] == "Human-Human Interaction"
    assert mapping["WalkingWithDog"] == "Body-Motion Only"
    assert mapping["Archery"] == "Sports"


def test_ucf101_categories_agree_with_the_shared_transcription():
    shared = SHARED / "ucf101_groups.csv"
    if not shared.exists():
        pytest.skip("../shared/data is not present")
    with shared.open() as f:
        theirs = {row["class"]: row["group"] for row in csv.DictReader(f)}
    with (RECIPES / "ucf101_categories.csv").open() as f:
        ours = {row["class"]: row["category"] for row in csv.DictReader(f)}
    assert ours == theirs


# -- the demo recipe mirrors DEMO_SETTINGS -------------------------------------------------


def test_demo_recipe_mirrors_demo_settings():
    from vtransfer.demo import DEMO_SETTINGS

    raw = tomllib.loads((RECIPES / "demo.toml").read_text())
    demo = raw["demo"]
    assert set(demo) <= set(DEMO_SETTINGS), f"keys the demo does not have: {set(demo) - set(DEMO_SETTINGS)}"
    assert demo == DEMO_SETTINGS
    # the command-option form replays the comparison
    cmp_ = _values(RECIPES / "demo.toml", "compare-policies")
    for key in ("backbone", "preset", "weights", "frames", "stride", "size", "batch_size", "clips_per_video", "val_clips"):
        assert cmp_[key] == DEMO_SETTINGS[key], key
    assert cmp_["epochs"] == DEMO_SETTINGS["epochs"] and cmp_["policies"] == DEMO_SETTINGS["policies"]
    assert cmp_["seeds"] == [DEMO_SETTINGS["seed"]] and cmp_["patience"] == 0
    assert cmp_["ratios"] == DEMO_SETTINGS["target_ratios"]


# -- unknown keys ------------------------------------------------------------------------


@pytest.mark.parametrize("text, key", [
    ('backbone = "i3d"\nlearning_rate = 0.1\n', "learning_rate"),
    ('backbone = "i3d"\n[finetune]\npolcy = "all"\n', "polcy"),
    ('[demo]\nvideos_per_klass = 3\n', "videos_per_klass"),
])
def test_unknown_key_is_an_error_naming_it(tmp_path, data, text, key):
    recipe = tmp_path / "bad.toml"
    recipe.write_text(text)
    with pytest.raises(ConfigError, match=key):
        _values(recipe, "finetune")
    result = CliRunner().invoke(app, ["finetune", str(data), "--recipe", str(recipe), "--out", str(tmp_path / "run")])
    assert result.exit_code != 0
    assert isinstance(result.exception, ConfigError) and key in str(result.exception)
    assert not (tmp_path / "run" / "config.json").exists()


def test_relative_paths_are_relative_to_the_recipe_file(tmp_path, monkeypatch):
    folder = tmp_path / "my-recipes"
    folder.mkdir()
    (folder / "groups.csv").write_text("class,category\nring,appearance\n")
    (folder / "r.toml").write_text('backbone = "i3d"\ncategories = "groups.csv"\n[finetune]\nweights = "w/pre.safetensors"\n')
    monkeypatch.chdir(tmp_path)  # not the recipe's folder
    v = _values(Path("my-recipes/r.toml"), "finetune")
    assert Path(v["categories"]) == folder.resolve() / "groups.csv"
    assert Path(v["weights"]) == folder.resolve() / "w" / "pre.safetensors"
    assert _values(RECIPES / "i3d-kinetics-transfer.toml", "finetune")["weights"] == "i3d:kinetics400"  # a name stays a name


def test_key_of_another_command_in_its_table_is_an_error(tmp_path):
    recipe = tmp_path / "bad.toml"
    recipe.write_text('[finetune]\npolicies = ["all"]\n')  # compare-policies' option, not finetune's
    with pytest.raises(ConfigError, match="policies"):
        _values(recipe, "finetune")


# -- recipes drive runs ----------------------------------------------------------------------


def test_karpathy_recipe_drives_compare_policies(karpathy_runs, data):
    compare = karpathy_runs["compare"]
    rows = json.loads((compare / "compare.json").read_text())["rows"]
    assert [r["policy"] for r in rows] == ["scratch", "top-layer", "top-3", "all"]   # the recipe's list
    assert all(set(r["per_category"]) == {"appearance", "motion"} for r in rows)      # the demo's categories file
    for policy in ("scratch", "top-layer", "top-3", "all"):
        o = _options(compare / policy)
        assert o["policy"] == policy
        assert (o["lr"], o["optimizer"], o["weight_decay"], o["batch_size"], o["dropout"]) == (1e-3, "sgd", 5e-4, 32, 0.9)
        assert (o["frames"], o["size"], o["epochs"], o["clips_per_video"]) == (10, 64, 1, 1)
        assert Path(o["categories"]) == data / "categories.csv"             # --categories wins over the UCF file
        assert Path(o["weights"]) == karpathy_runs["weights"]               # --weights wins over the registered name
    scratch = _resolved(compare / "scratch")
    assert scratch["train"]["optimizer"] == "sgd" and scratch["train"]["momentum"] == 0.9
    assert _resolved(compare / "top-3")["trainable_params"] < scratch["trainable_params"]


def test_karpathy_transfer_dropout_reaches_the_model(karpathy_runs):
    """The pretrained file has dropout 0.5; the recipe's 0.9 (keep 10%) is what the transferred models train with."""
    from vtransfer.weights.checkpoint import read_checkpoint_metadata

    for policy in ("scratch", "top-layer", "top-3", "all"):
        meta = read_checkpoint_metadata(karpathy_runs["compare"] / policy / "model.safetensors")
        assert meta["config"]["dropout"] == 0.9, policy


def test_i3d_recipe_drives_finetune(data, tmp_path):
    weights = _tiny_checkpoint(tmp_path / "i3d.safetensors", "i3d")
    run = tmp_path / "run"
    _invoke(["finetune", data, "--recipe", RECIPES / "i3d-kinetics-transfer.toml", "--preset", "tiny",
             "--frames", "10", "--size", "32", "--weights", weights, "--batch-size", "16", *FAST, "--out", run])
    o = _options(run)
    assert (o["backbone"], o["policy"], o["optimizer"], o["stride"]) == ("i3d", "all", "sgd", 1)   # from the recipe
    assert (o["preset"], o["frames"], o["size"], o["batch_size"]) == ("tiny", 10, 32, 16)        # from the command line
    assert Path(o["weights"]) == weights                                    # not i3d:kinetics400 (no download)
    r = _resolved(run)
    assert r["train"]["optimizer"] == "sgd" and r["trainable_params"] == r["total_params"]
    assert tuple(r["preprocessing"]["mean"]) == (0.5, 0.5, 0.5)             # RGB in [-1, 1]


def test_vivit_recipe_drives_finetune(data, tmp_path):
    weights = _tiny_checkpoint(tmp_path / "vivit.safetensors", "vivit")
    run = tmp_path / "run"
    _invoke(["finetune", data, "--recipe", RECIPES / "vivit-seed.toml", "--preset", "tiny", "--frames", "8",
             "--weights", weights, "--batch-size", "16", *FAST, "--out", run])
    o = _options(run)
    assert (o["backbone"], o["policy"], o["stride"]) == ("vivit", "temporal", 1)   # case 3, from the recipe
    assert (o["preset"], o["frames"]) == ("tiny", 8)
    r = _resolved(run)
    assert r["policy"]["trainable_groups"] == ["temporal.0", "temporal.1", "head"]
    assert r["train"]["optimizer"] == "adamw"                               # the seed paper states none: vtransfer's ViViT default


def test_demo_recipe_replays_the_comparison(data, tmp_path, home):
    out = tmp_path / "cmp"
    _invoke(["compare-policies", data, "--recipe", RECIPES / "demo.toml", "--policies", "top-layer", "--frames", "4",
             "--size", "32", *FAST, "--out", out])
    o = _options(out / "top-layer")
    assert (o["backbone"], o["preset"], o["weights"], o["stride"]) == ("effnet3d", "tiny", "effnet3d:imagenet", 2)
    assert (o["batch_size"], o["patience"], o["seed"]) == (8, 0, 0)
    assert (o["epochs"], o["clips_per_video"], o["frames"], o["size"]) == (1, 1, 4, 32)  # --epochs beats the table's 10
