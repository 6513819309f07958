"""Weight sources: download cache, sha256 checks, offline errors, converters, registered sources."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import json
import socket
import threading
from pathlib import Path

import pytest
import torch

from vtransfer.utils.errors import WeightsError
from vtransfer.loading.backbone import load_backbone, load_backbone_with_info
from vtransfer.models.registry import build_backbone
from vtransfer.weights import hub
from vtransfer.weights.checkpoint import save_checkpoint
from vtransfer.loading.sources import BUILTIN_SOURCES, detect_layout, list_sources, register_source, registered_sources
from vtransfer.weights.source import kinetics400_classes


SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


pytestmark = pytest.mark.usefixtures("home")  # conftest: an empty VTRANSFER_HOME, offline


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tiny_i3d_port_file(path: Path, num_classes: int = 400):
    torch.manual_seed(0)
    model = build_backbone("i3d", "tiny", num_classes=num_classes).eval()
    torch.save(model.state_dict(), path)
    return model


# -- hub: cache, hashes, offline --------------------------------------------------------------------


def test_cache_location_follows_vtransfer_home(home):
    assert hub.weights_dir() == home.resolve() / "weights"
    assert BUILTIN_SOURCES["i3d:kinetics400"].cached_path() == home.resolve() / "weights" / "i3d_rgb_imagenet_kinetics400.pt"


def test_offline_builtin_source_fails_fast_naming_url_and_path(home, monkeypatch):
    from vtransfer.models.i3d import I3D

    def forbidden(what):
        def fail(*args, **kwargs):
            raise AssertionError(f"{what} before the weights file was found")
        return fail

    # fails fast: no network attempt, no model built first
    monkeypatch.setattr(hub, "download_url_to_file", forbidden("network access"))
    monkeypatch.setattr(I3D, "__init__", forbidden("model built"))
    source = BUILTIN_SOURCES["i3d:kinetics400"]
    with pytest.raises(WeightsError) as err:
        load_backbone("i3d", weights="i3d:kinetics400")
    msg = str(err.value)
    assert msg.startswith(f"could not download {source.url} (")
    assert f"Offline? Download it elsewhere and put it at {home.resolve() / 'weights' / source.filename}" in msg


def test_network_failure_names_url_and_path(home, monkeypatch):
    monkeypatch.delenv("VTRANSFER_OFFLINE")
    url = "http://127.0.0.1:9/nothing-here.pt"  # discard port on this machine: connection refused
    with pytest.raises(WeightsError, match=r"could not download http://127\.0\.0\.1:9/nothing-here\.pt \(.+\)\. Offline\?") as err:
        hub.fetch(url, "nothing-here.pt", sha256=None)
    assert str(home.resolve() / "weights" / "nothing-here.pt") in str(err.value)
    assert list((home / "weights").iterdir()) == []  # no partial file left


def test_file_url_with_right_hash_is_cached_and_not_downloaded_again(tmp_path, monkeypatch):
    src = tmp_path / "w.bin"
    src.write_bytes(b"weights" * 1000)
    path = hub.fetch(src.as_uri(), "w.bin", sha256=sha256(src))
    assert path.read_bytes() == src.read_bytes() and path.parent == hub.weights_dir()

    def no_download(*args, **kwargs):
        raise AssertionError("cache hit must not download")

    monkeypatch.setattr(hub, "_download", no_download)
    src.unlink()
    assert hub.fetch(src.as_uri(), "w.bin", sha256=sha256(path)) == path
    assert hub.fetch("https://example.invalid/w.bin", "w.bin", sha256=sha256(path)) == path  # offline is fine too


def test_wrong_hash_is_an_error_and_the_file_is_not_kept(tmp_path):
    src = tmp_path / "w.bin"
    src.write_bytes(b"tampered")
    wrong = "0" * 64
    with pytest.raises(WeightsError) as err:
        hub.fetch(src.as_uri(), "w.bin", sha256=wrong)
    msg = str(err.value)
    assert f"expected {wrong}, got {sha256(src)}" in msg and "w.bin" in msg and src.as_uri() in msg
    assert not hub.cached_path("w.bin").exists()
    assert [p.name for p in hub.weights_dir().iterdir()] == []


def test_hash_prefix_is_checked(tmp_path):
    src = tmp_path / "w.bin"
    src.write_bytes(b"abc")
    digest = sha256(src)
    assert hub.fetch(src.as_uri(), "good.bin", sha256=None, sha256_prefix=digest[:8]).exists()
    with pytest.raises(WeightsError, match="expected 1378be20... \\(prefix\\)"):
        hub.fetch(src.as_uri(), "bad.bin", sha256=None, sha256_prefix="1378be20")


def test_a_cached_file_that_changed_is_refused(home):
    source = BUILTIN_SOURCES["i3d:kinetics400"]
    path = source.cached_path()
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not the published file")
    with pytest.raises(WeightsError, match=f"{path}.*sha256 mismatch: expected {source.sha256}"):
        load_backbone("i3d", weights="i3d:kinetics400")


def test_trust_on_first_use_records_and_enforces_the_hash(tmp_path, capsys):
    src = tmp_path / "w.bin"
    src.write_bytes(b"first")
    path = hub.fetch(src.as_uri(), "w.bin", sha256=None)
    sidecar = hub.trusted_hash_path(path)
    assert sidecar.read_text().split()[0] == sha256(src)
    assert "trust on first use" in capsys.readouterr().err
    assert hub.fetch(src.as_uri(), "w.bin", sha256=None) == path
    path.write_bytes(b"second")
    with pytest.raises(WeightsError, match="differs from .* recorded"):
        hub.fetch(src.as_uri(), "w.bin", sha256=None)


# -- built-in sources through file:// URLs --------------------------------------------------------


def test_kinetics_source_loads_from_a_file_url_with_its_classes(tmp_path, monkeypatch):
    ref = tiny_i3d_port_file(tmp_path / "rgb_imagenet.pt")
    source = dataclasses.replace(
        BUILTIN_SOURCES["i3d:kinetics400"],
        url=(tmp_path / "rgb_imagenet.pt").as_uri(),
        sha256=sha256(tmp_path / "rgb_imagenet.pt"),
        preset="tiny",
    )
    monkeypatch.setitem(BUILTIN_SOURCES, "i3d:kinetics400", source)
    model, info = load_backbone_with_info("i3d", weights="i3d:kinetics400")
    assert info["kind"] == "source" and info["source"] == "i3d:kinetics400"
    assert info["pretrained_on"]["name"] == "Kinetics-400" and len(info["classes"]) == 400
    assert info["classes"][0] == "abseiling" and info["path"] == str(source.cached_path())
    x = torch.randn(1, 3, 9, 112, 112)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))

    five, info = load_backbone_with_info("i3d", weights="i3d:kinetics400", num_classes=5)
    assert five.num_classes == 5 and info["head_reset"] and info["classes"] is None
    assert five.state_dict()["Mixed_5c.b0.conv3d.weight"].equal(ref.state_dict()["Mixed_5c.b0.conv3d.weight"])

    wrong = dataclasses.replace(source, filename="other.pt", sha256="f" * 64)
    monkeypatch.setitem(BUILTIN_SOURCES, "i3d:kinetics400", wrong)
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        load_backbone("i3d", weights="i3d:kinetics400")


def test_imagenet_googlenet_source_inflates(tmp_path, monkeypatch):
    from torchvision.models import googlenet

    torch.manual_seed(0)
    g2d = googlenet(weights=None, aux_logits=False, init_weights=False)
    torch.save(g2d.state_dict(), tmp_path / "googlenet.pth")
    digest = sha256(tmp_path / "googlenet.pth")
    source = dataclasses.replace(
        BUILTIN_SOURCES["i3d:imagenet"], url=(tmp_path / "googlenet.pth").as_uri(), filename="gl.pth", sha256_prefix=digest[:8]
    )
    monkeypatch.setitem(BUILTIN_SOURCES, "i3d:imagenet", source)
    model, info = load_backbone_with_info("i3d", weights="i3d:imagenet", num_classes=7)
    w2d = g2d.state_dict()["conv1.conv.weight"]
    w3d = model.state_dict()["Conv3d_1a_7x7.conv3d.weight"]
    assert w3d.shape[2] == 7
    assert torch.allclose(w3d, w2d.unsqueeze(2).repeat(1, 1, 7, 1, 1) / 7)
    assert info["pretrained_on"]["name"] == "ImageNet-1k" and info["classes"] is None and model.num_classes == 7


def test_imagenet_vit_source_initialises_vivit(tmp_path, monkeypatch):
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(image_size=64, patch_size=16, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128)
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    digest = sha256(tmp_path / "vit.pth")
    source = dataclasses.replace(
        BUILTIN_SOURCES["vivit:imagenet"], url=(tmp_path / "vit.pth").as_uri(), filename="vit.pth", sha256_prefix=digest[:8], preset="tiny"
    )
    monkeypatch.setitem(BUILTIN_SOURCES, "vivit:imagenet", source)
    model = load_backbone("vivit", weights="vivit:imagenet", num_classes=3)
    state = model.state_dict()
    qkv = [k for k in state if k.endswith("qkv.weight")][0]
    assert torch.equal(state[qkv], vit.state_dict()["encoder.layers.encoder_layer_0.self_attention.in_proj_weight"])
    assert model.num_classes == 3


@pytest.mark.parametrize(("name", "backbone"), [("slowfusion:sports1m", "slowfusion"), ("vivit:ucf101", "vivit")])
def test_sources_without_public_weights_say_how_to_get_them(name, backbone):
    source = BUILTIN_SOURCES[name]
    assert not source.available and source.url is None
    with pytest.raises(WeightsError, match="no public weights exist.*vtransfer pretrain.*--weights FILE"):
        load_backbone(backbone, weights=name)
    with pytest.raises(WeightsError, match="holds a backbone of type slowfusion"):
        load_backbone("i3d", weights="slowfusion:sports1m")


def test_kinetics400_classes_match_the_shared_label_file():
    classes = kinetics400_classes()
    assert len(classes) == 400 == len(set(classes))
    assert classes == sorted(classes)
    labels = SHARED_DATA / "kinetics400_labels.txt"
    if not labels.exists():
        pytest.skip("../shared/data is not available")
    assert classes == [line for line in labels.read_text().splitlines() if line.strip()]


def test_detect_layout_recognises_each_foreign_format():
    from torchvision.models import googlenet
    from torchvision.models.vision_transformer import VisionTransformer

    i3d = build_backbone("i3d", "tiny").state_dict()
    assert detect_layout(i3d).name == "i3d-port"
    assert detect_layout(googlenet(weights=None, aux_logits=False, init_weights=False).state_dict()).name == "torchvision-googlenet"
    vit = VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32)
    assert detect_layout(vit.state_dict()).name == "torchvision-vit"
    vp = pytest.importorskip("vit_pytorch.vivit")
    ref = vp.ViViT(image_size=32, image_patch_size=16, frames=4, frame_patch_size=2, num_classes=3, dim=16,
                   spatial_depth=1, temporal_depth=1, heads=2, mlp_dim=32)
    assert detect_layout(ref.state_dict()).name == "vit-pytorch-vivit"
    assert detect_layout(build_backbone("vivit", "tiny").state_dict()) is None
    assert detect_layout({"weight": torch.zeros(1)}) is None


# -- registered sources ----------------------------------------------------------------------------


def test_register_list_and_load_a_user_source(tmp_path, home):
    torch.manual_seed(0)
    model = build_backbone("slowfusion", "tiny", num_classes=4).eval()
    ckpt = save_checkpoint(
        tmp_path / "sf.safetensors",
        model,
        classes=["a", "b", "c", "d"],
        source={"name": "pretrain", "dataset": {"name": "UCF-101", "num_classes": 101, "size": "13,320 videos"}},
    )
    entry = register_source(ckpt, "slowfusion:my-ucf101")
    assert entry["backbone"] == "slowfusion" and entry["format"] == "vtransfer" and entry["num_classes"] == 4
    assert entry["pretrained_on"] == "UCF-101" and entry["sha256"] == sha256(ckpt)
    stored = json.loads((home / "sources.json").read_text())
    assert stored["slowfusion:my-ucf101"]["path"] == str(ckpt.resolve())
    assert "slowfusion:my-ucf101" in registered_sources()

    rows = {r["name"]: r for r in list_sources("slowfusion")}
    assert set(rows) == {"slowfusion:sports1m", "slowfusion:my-ucf101"}
    assert rows["slowfusion:my-ucf101"]["present"] and rows["slowfusion:my-ucf101"]["kind"] == "registered"
    assert not rows["slowfusion:sports1m"]["present"] and not rows["slowfusion:sports1m"]["available"]
    assert all(r["backbone"] == "i3d" for r in list_sources("i3d"))

    loaded, info = load_backbone_with_info("slowfusion", weights="slowfusion:my-ucf101")
    assert info["source"] == "slowfusion:my-ucf101" and info["classes"] == ["a", "b", "c", "d"]
    x = torch.randn(1, 3, 10, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))

    other = build_backbone("slowfusion", "tiny", num_classes=4)
    save_checkpoint(ckpt, other, classes=["a", "b", "c", "d"])  # the file changes behind the registry's back
    with pytest.raises(WeightsError, match="sha256 .* recorded when it was registered"):
        load_backbone("slowfusion", weights="slowfusion:my-ucf101")
    ckpt.unlink()
    assert not {r["name"]: r for r in list_sources()}["slowfusion:my-ucf101"]["present"]
    with pytest.raises(WeightsError, match="is gone"):
        load_backbone("slowfusion", weights="slowfusion:my-ucf101")


def test_register_a_foreign_file_and_refuse_bad_ones(tmp_path):
    tiny_i3d_port_file(tmp_path / "port.pt", num_classes=10)
    entry = register_source(tmp_path / "port.pt", "i3d:port")
    assert entry["format"] == "i3d-port" and entry["backbone"] == "i3d" and entry["num_classes"] == 10
    with pytest.raises(WeightsError, match="built-in"):
        register_source(tmp_path / "port.pt", "i3d:kinetics400")
    with pytest.raises(WeightsError, match="--name"):
        register_source(tmp_path / "port.pt", "bad name!")
    torch.save({"foo": torch.zeros(1)}, tmp_path / "foo.pt")
    with pytest.raises(WeightsError, match="not a recognised state-dict layout"):
        register_source(tmp_path / "foo.pt", "foo")
    with pytest.raises(WeightsError, match="no such weights file"):
        register_source(tmp_path / "absent.pt", "absent")
    assert list(registered_sources()) == ["i3d:port"]


def test_http_download_with_progress_goes_through_a_temp_file(tmp_path, monkeypatch):
    monkeypatch.delenv("VTRANSFER_OFFLINE")
    served = tmp_path / "served"
    served.mkdir()
    (served / "w.bin").write_bytes(bytes(range(256)) * 8192)  # 2 MiB: several chunks
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/w.bin"
        path = hub.fetch(url, "w.bin", sha256=sha256(served / "w.bin"))
        assert path.read_bytes() == (served / "w.bin").read_bytes()
        assert [p.name for p in hub.weights_dir().iterdir()] == ["w.bin"]
        with pytest.raises(WeightsError, match=r"could not download .*/absent\.bin \(HTTP 404"):
            hub.fetch(url.replace("w.bin", "absent.bin"), "absent.bin", sha256=None)
    finally:
        server.shutdown()
        server.server_close()


def test_a_server_that_never_answers_times_out_naming_url_and_path(home, monkeypatch):
    monkeypatch.delenv("VTRANSFER_OFFLINE")
    monkeypatch.setattr(hub, "CONNECT_TIMEOUT_S", 0.5)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)  # the connection is queued, never answered
    before = socket.getdefaulttimeout()
    try:
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/w.bin"
        says = r"could not download http://127\.0\.0\.1:\d+/w\.bin \(no answer within 0\.5 s\)\. Offline\?"
        with pytest.raises(WeightsError, match=says) as err:
            hub.fetch(url, "w.bin", sha256=None)
    finally:
        silent.close()
    assert str(home.resolve() / "weights" / "w.bin") in str(err.value)
    assert list((home / "weights").iterdir()) == []  # no partial file left
    assert socket.getdefaulttimeout() == before  # the download's timeout did not leak
