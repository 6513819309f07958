"""vtransfer's checkpoint format: round trips, atomic writes, metadata validation, pickle refusal."""

from __future__ import annotations

import json
import os
import pickle
import shlex
from pathlib import Path

import pytest
import torch

from vtransfer.utils.errors import ConfigError, WeightsError
from vtransfer.loading.backbone import load_backbone, load_backbone_with_info
from vtransfer.models.registry import build_backbone
from vtransfer.weights.checkpoint import METADATA_KEY, is_vtransfer_checkpoint, read_checkpoint_metadata, read_foreign_state_dict, save_checkpoint
from vtransfer.loading.checkpoints import load_checkpoint, model_from_checkpoint


SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BACKBONES = ("slowfusion", "i3d", "vivit", "effnet3d")


pytestmark = pytest.mark.usefixtures("home")  # conftest: an empty VTRANSFER_HOME, offline


def tiny(name: str, num_classes: int | None = None):
    torch.manual_seed(0)
    return build_backbone(name, "tiny", num_classes=num_classes).eval()


def clip_for(model, batch: int = 2) -> torch.Tensor:
    """A small valid input: I3D needs >= 9 frames and >= 112 pixels; the others take their preset size."""
    pre = model.preprocessing
    frames = 9 if model.backbone_name == "i3d" else pre.frames
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, frames, *pre.crop_size, generator=g)


def classes_for(model) -> list[str]:
    return [f"class_{i}" for i in range(model.num_classes)]


# -- round trip -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BACKBONES)
def test_round_trip_gives_identical_state_outputs_and_metadata(tmp_path, name):
    model = tiny(name)
    # Perturb BatchNorm statistics so buffers are not at their defaults.
    for n, b in model.named_buffers():
        if n.endswith("running_var"):
            b.uniform_(0.5, 1.5)
    source = {"name": "i3d:kinetics400", "dataset": {"name": "Kinetics-400", "num_classes": 400, "size": "240k"}}
    training = {"policy": "top-3", "epochs": 3, "val_video_hit1": 0.75}
    path = save_checkpoint(tmp_path / "m.safetensors", model, classes=classes_for(model), source=source, training=training)

    assert is_vtransfer_checkpoint(path)
    ckpt = load_checkpoint(path)
    ref = model.state_dict()
    assert set(ckpt.state_dict) == set(ref)
    for k, v in ref.items():
        assert torch.equal(ckpt.state_dict[k], v), k
    assert ckpt.backbone == name and ckpt.classes == classes_for(model)
    assert ckpt.config == model.config and ckpt.preprocessing == model.preprocessing
    assert ckpt.source == source and ckpt.training == training

    loaded, _ = model_from_checkpoint(path)
    assert not loaded.training
    x = clip_for(model)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_header_holds_one_string_metadata_key(tmp_path):
    from safetensors import safe_open

    model = tiny("vivit")
    path = save_checkpoint(tmp_path / "m.safetensors", model, classes=classes_for(model))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert list(meta) == [METADATA_KEY]
    doc = json.loads(meta[METADATA_KEY])
    assert doc["format"] == "vtransfer-checkpoint" and doc["format_version"] == 1
    assert doc["backbone"] == "vivit" and doc["num_classes"] == model.num_classes
    assert doc["preprocessing"]["frames"] == model.preprocessing.frames
    assert read_checkpoint_metadata(path) == doc


def test_shared_tensors_are_saved_and_restored(tmp_path):
    from safetensors.torch import save

    model = tiny("vivit")
    blocks = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.weight.shape == (128, 64)]
    assert len(blocks) >= 2
    blocks[1].weight = blocks[0].weight  # tie two parameters: the state dict now has aliases
    with pytest.raises(RuntimeError):
        save(model.state_dict())  # plain safetensors refuses aliases: our save must handle them
    path = save_checkpoint(tmp_path / "tied.safetensors", model, classes=classes_for(model))
    ckpt = load_checkpoint(path)
    names = [n for n, t in model.state_dict().items() if t.data_ptr() == blocks[0].weight.data_ptr()]
    assert len(names) == 2
    assert torch.equal(ckpt.state_dict[names[0]], ckpt.state_dict[names[1]])


def test_num_classes_replaces_the_head(tmp_path):
    model = tiny("slowfusion")
    path = save_checkpoint(tmp_path / "m.safetensors", model, classes=classes_for(model))
    loaded, ckpt = model_from_checkpoint(path, num_classes=3)
    assert loaded.num_classes == 3 and len(ckpt.classes) == model.num_classes
    assert loaded(clip_for(loaded)).shape == (2, 3)


def test_save_rejects_a_class_list_that_does_not_match_the_head(tmp_path):
    model = tiny("i3d")
    with pytest.raises(ConfigError, match="3 class names given but the model's head has 10"):
        save_checkpoint(tmp_path / "m.safetensors", model, classes=["a", "b", "c"])
    assert not (tmp_path / "m.safetensors").exists()


# -- atomic writes --------------------------------------------------------------------------------


def test_save_leaves_no_temporary_files(tmp_path):
    model = tiny("vivit")
    save_checkpoint(tmp_path / "m.safetensors", model, classes=classes_for(model))
    save_checkpoint(tmp_path / "m.safetensors", model, classes=classes_for(model))  # overwrite
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "vthome") == ["m.safetensors"]


def test_a_failing_write_leaves_the_old_checkpoint_intact(tmp_path, monkeypatch):
    import vtransfer.utils.atomic as atomic

    old = tiny("vivit")
    path = save_checkpoint(tmp_path / "m.safetensors", old, classes=classes_for(old))
    before = path.read_bytes()

    new = tiny("vivit", num_classes=4)

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, new, classes=classes_for(new))
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert load_checkpoint(path).classes == classes_for(old)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "vthome") == ["m.safetensors"]


# -- metadata validation --------------------------------------------------------------------------


def _write_raw(path: Path, tensors: dict, meta: dict | str | None) -> Path:
    from safetensors.torch import save_file

    metadata = None if meta is None else {METADATA_KEY: meta if isinstance(meta, str) else json.dumps(meta)}
    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.fixture()
def good(tmp_path):
    model = tiny("i3d")
    path = save_checkpoint(tmp_path / "good.safetensors", model, classes=classes_for(model))
    ckpt = load_checkpoint(path)
    return dict(ckpt.state_dict), dict(ckpt.metadata)


def _expect_error(path: Path, pattern: str) -> None:
    with pytest.raises(WeightsError, match=pattern) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)
    with pytest.raises(WeightsError):
        model_from_checkpoint(path)


def test_unknown_backbone_is_named(tmp_path, good):
    state, meta = good
    path = _write_raw(tmp_path / "x.safetensors", state, {**meta, "backbone": "resnet50"})
    _expect_error(path, "unknown backbone 'resnet50'")


def test_missing_fields_are_named(tmp_path, good):
    state, meta = good
    meta = {k: v for k, v in meta.items() if k not in ("classes", "preprocessing")}
    _expect_error(_write_raw(tmp_path / "x.safetensors", state, meta), "lacks field.*preprocessing, classes")


def test_class_list_that_does_not_match_the_head(tmp_path, good):
    state, meta = good
    meta = {**meta, "classes": ["a", "b", "c"], "num_classes": 3}
    _expect_error(_write_raw(tmp_path / "x.safetensors", state, meta), "3 class names but the classifier has 10 outputs")


def test_wrong_missing_and_unexpected_tensors_are_named(tmp_path, good):
    state, meta = good
    bad = dict(state)
    bad["logits.conv3d.weight"] = torch.zeros(7, 3, 1, 1, 1)
    del bad["Mixed_5c.b0.bn.running_mean"]
    bad["extra.weight"] = torch.zeros(2)
    path = _write_raw(tmp_path / "x.safetensors", bad, meta)
    with pytest.raises(WeightsError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert "logits.conv3d.weight: file (7, 3, 1, 1, 1) vs model" in msg
    assert "Mixed_5c.b0.bn.running_mean" in msg and "extra.weight" in msg


def test_config_that_does_not_build(tmp_path, good):
    state, meta = good
    meta = {**meta, "config": {**meta["config"], "no_such_argument": 1}}
    _expect_error(_write_raw(tmp_path / "x.safetensors", state, meta), "does not build a i3d")


@pytest.mark.parametrize(
    ("meta", "pattern"),
    [
        (None, "without vtransfer metadata"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
    ],
)
def test_files_that_are_not_vtransfer_checkpoints(tmp_path, good, meta, pattern):
    state, _ = good
    _expect_error(_write_raw(tmp_path / "x.safetensors", state, meta), pattern)


def test_newer_format_version_asks_for_an_upgrade(tmp_path, good):
    state, meta = good
    _expect_error(_write_raw(tmp_path / "x.safetensors", state, {**meta, "format_version": 99}), "upgrade vtransfer")


def test_truncated_file_is_an_error(tmp_path, good):
    state, meta = good
    path = _write_raw(tmp_path / "x.safetensors", state, meta)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(WeightsError, match=str(path)):
        load_checkpoint(path)


def test_missing_file(tmp_path):
    with pytest.raises(WeightsError, match="no such checkpoint file"):
        load_checkpoint(tmp_path / "absent.safetensors")


# -- untrusted pickles ----------------------------------------------------------------------------


class _RunsACommand:
    """Unpickling this runs ``touch MARKER`` through os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


@pytest.fixture()
def evil_files(tmp_path):
    marker = tmp_path / "PWNED"
    payload = _RunsACommand(marker)
    # The payload really works when unpickled without protection: the test below can fail.
    pickle.loads(pickle.dumps(payload))
    assert marker.exists()
    marker.unlink()

    tiny_i3d = tiny("i3d").state_dict()
    files = []
    for suffix in (".pt", ".pth", ".bin"):
        zipped = tmp_path / f"evil_zip{suffix}"
        torch.save({**tiny_i3d, "logits.conv3d.bias": payload}, zipped)  # PyTorch's zip format
        legacy = tmp_path / f"evil_legacy{suffix}"
        with open(legacy, "wb") as f:  # a bare pickle, as old torch.save / pickle.dump wrote them
            pickle.dump({"state_dict": payload}, f)
        files += [zipped, legacy]
    disguised = tmp_path / "evil.safetensors"  # a pickle with a checkpoint's name
    disguised.write_bytes(pickle.dumps(payload))
    files.append(disguised)
    assert not marker.exists()
    return marker, files


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_crafted_pickles_are_refused_by_every_load_path(evil_files):
    from vtransfer.loading.sources import register_source

    marker, files = evil_files
    loaders = {
        "load_checkpoint": load_checkpoint,
        "model_from_checkpoint": model_from_checkpoint,
        "read_foreign_state_dict": read_foreign_state_dict,
        "load_backbone": lambda p: load_backbone("i3d", weights=p),
        "load_backbone(name=None)": lambda p: load_backbone(None, weights=str(p)),
        "register_source": lambda p: register_source(p, "evil"),
    }
    try:
        from vtransfer.weights.i3d_port import read_i3d_port_file

        loaders["read_i3d_port_file"] = read_i3d_port_file
    except ImportError:  # pragma: no cover - the importer ships with the package
        pass
    assert "read_i3d_port_file" in loaders
    for path in files:
        for what, load in loaders.items():
            with pytest.raises(WeightsError) as err:
                load(path)
            assert str(path) in str(err.value), (what, path)
            assert not marker.exists(), f"{what}({path.name}) executed the pickle's command"


def test_pickle_refusal_message_explains(evil_files):
    _, files = evil_files
    with pytest.raises(WeightsError, match="refused.*weights_only=True"):
        read_foreign_state_dict(files[0])
    with pytest.raises(WeightsError, match="PyTorch/pickle file, not a vtransfer checkpoint"):
        load_checkpoint(files[0])


# -- foreign layouts through load_backbone ----------------------------------------------------------


def test_i3d_port_file_imports_and_round_trips(tmp_path):
    src = tiny("i3d")
    port_state = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}  # an old file
    torch.save(port_state, tmp_path / "rgb_port.pt")

    model, info = load_backbone_with_info("i3d", weights=tmp_path / "rgb_port.pt", preset="tiny")
    assert info["kind"] == "foreign" and info["layout"] == "i3d-port" and not model.training
    x = clip_for(src)
    with torch.no_grad():
        ref = src(x)
        assert torch.equal(model(x), ref)
    ckpt = save_checkpoint(tmp_path / "i3d.safetensors", model, classes=classes_for(model))
    again = load_backbone("i3d", weights=ckpt)
    with torch.no_grad():
        assert torch.equal(again(x), ref)


def test_full_size_i3d_port_layout_from_the_key_list_round_trips(tmp_path):
    table = SHARED_DATA / "i3d_pytorch_port_keys.tsv"
    if not table.exists():
        pytest.skip("../shared/data is not available")
    g = torch.Generator().manual_seed(0)
    state = {}
    for line in table.read_text().splitlines():
        if not line.strip():
            continue
        key, shape = line.split("\t")
        shape = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(5)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        else:
            state[key] = torch.randn(shape, generator=g) * 0.05
    assert len(state) == 344
    torch.save(state, tmp_path / "port.pt")

    model, info = load_backbone_with_info("i3d", weights=tmp_path / "port.pt")
    assert info["num_classes"] == 400 and sum(p.numel() for p in model.parameters()) == 12_697_264
    ckpt = save_checkpoint(tmp_path / "i3d.safetensors", model, classes=[f"k{i}" for i in range(400)])
    again, _ = model_from_checkpoint(ckpt)
    x = torch.randn(1, 3, 9, 112, 112, generator=g)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_vit_pytorch_vivit_file_imports_with_the_same_logits(tmp_path):
    vit_pytorch = pytest.importorskip("vit_pytorch.vivit")
    from vtransfer.weights.vit_pytorch_import import vivit_config_from_vit_pytorch

    kwargs = dict(
        image_size=32, image_patch_size=16, frames=4, frame_patch_size=2, num_classes=5, dim=32,
        spatial_depth=1, temporal_depth=1, heads=2, dim_head=16, mlp_dim=64,
    )
    torch.manual_seed(0)
    ref = vit_pytorch.ViViT(**kwargs).eval()
    torch.save(ref.state_dict(), tmp_path / "vivit_vp.pt")
    model, info = load_backbone_with_info(
        "vivit", weights=tmp_path / "vivit_vp.pt", preset="vivit-seed", **vivit_config_from_vit_pytorch(**kwargs)
    )
    assert info["layout"] == "vit-pytorch-vivit" and model.num_classes == 5
    x = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        assert (model(x) - ref(x)).abs().max().item() < 1e-4


def test_weights_of_another_backbone_are_an_error(tmp_path):
    model = tiny("i3d")
    path = save_checkpoint(tmp_path / "i3d.safetensors", model, classes=classes_for(model))
    with pytest.raises(WeightsError, match="holds a backbone of type i3d.*vivit"):
        load_backbone("vivit", weights=path)
    torch.save(model.state_dict(), tmp_path / "port.pt")
    with pytest.raises(WeightsError, match="holds a backbone of type i3d.*slowfusion"):
        load_backbone("slowfusion", weights=tmp_path / "port.pt")


def test_checkpoint_name_is_taken_from_the_file_and_head_replaced(tmp_path):
    model = tiny("slowfusion")
    path = save_checkpoint(tmp_path / "sf.safetensors", model, classes=classes_for(model), source={"name": "mine"})
    loaded, info = load_backbone_with_info(None, weights=str(path))
    assert info["backbone"] == "slowfusion" and info["classes"] == classes_for(model) and info["source"] == "mine"
    replaced, info = load_backbone_with_info("slowfusion", weights=path, num_classes=2)
    assert replaced.num_classes == 2 and info["head_reset"] and info["classes"] is None
    assert info["pretrained_classes"] == classes_for(model)


def test_unrecognised_foreign_layout_and_unknown_name(tmp_path):
    torch.save({"encoder.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(WeightsError, match="not a recognised state-dict layout.*encoder.weight"):
        load_backbone("i3d", weights=tmp_path / "other.pt")
    with pytest.raises(WeightsError, match="no such file and no weight source.*i3d:kinetics400"):
        load_backbone("i3d", weights="i3d:nope")


def test_trained_on_understands_source_and_run_records():
    from vtransfer.weights.checkpoint import trained_on

    builtin = {"source": {"name": "i3d:kinetics400", "dataset": {"name": "Kinetics-400", "num_classes": 400, "size": "240k"}}}
    assert trained_on(builtin) == {"name": "Kinetics-400", "num_classes": 400, "size": "240k"}
    run = {"source": {"pretrained": {}, "finetuned_on": {"dataset": "/data/ucf101", "classes": ["a", "b"], "videos": 40}}}
    assert trained_on(run) == {"name": "ucf101", "num_classes": 2, "size": "40 videos"}
    pretrain = {"source": {"pretrain_source": {"name": "slowfusion:sports", "dataset": "sports1m", "classes": ["x"], "videos": 9},
                           "finetuned_on": {"dataset": "/d/sports1m"}}}
    assert trained_on(pretrain) == {"name": "sports1m", "num_classes": 1, "size": "9 videos"}
    assert trained_on({"source": {}, "training": {}}) is None


def test_shape_preserving_overrides_apply_to_a_checkpoint_and_others_fail(tmp_path):
    model = tiny("vivit")
    model.preprocessing = model.preprocessing.replace(stride=3)  # adapted after construction, as finetune does
    path = save_checkpoint(tmp_path / "v.safetensors", model, classes=classes_for(model))
    loaded = load_backbone("vivit", weights=path, dropout=0.25)
    assert loaded.config["dropout"] == 0.25 and loaded.preprocessing.stride == 3
    x = clip_for(model)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))  # eval mode: dropout does not change outputs
    with pytest.raises(WeightsError, match="shape mismatch"):
        load_backbone("vivit", weights=path, mlp_dim=96)
    with pytest.warns(UserWarning, match="differs from preset 'vivit-b'; the preset was ignored"):
        assert load_backbone("vivit", weights=path, preset="vivit-b").config == model.config
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_backbone("vivit", weights=path, preset="tiny")  # the checkpoint's own preset: nothing to warn about
