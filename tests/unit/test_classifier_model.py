"""ResNet-50 in plain torch: torchvision's key layout, pretrained loading, model files."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from hpc_jobs.classifier import model as cm  # noqa: E402


def torchvision_resnet50_keys() -> list[str]:
    """The state_dict keys of torchvision's resnet50, derived from its structure: a stem,
    Bottleneck layers [3, 4, 6, 3] (downsample in each layer's first block) and fc."""

    def bn(prefix: str) -> list[str]:
        return [f"{prefix}.{s}" for s in
                ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]

    keys = ["conv1.weight", *bn("bn1")]
    for layer, blocks in enumerate([3, 4, 6, 3], start=1):
        for b in range(blocks):
            p = f"layer{layer}.{b}"
            for i in (1, 2, 3):
                keys += [f"{p}.conv{i}.weight", *bn(f"{p}.bn{i}")]
            if b == 0:
                keys += [f"{p}.downsample.0.weight", *bn(f"{p}.downsample.1")]
    return [*keys, "fc.weight", "fc.bias"]


def test_state_dict_keys_and_shapes_match_torchvision_resnet50() -> None:
    net = cm.resnet50(num_classes=1000, in_channels=3)
    state = net.state_dict()
    assert sorted(state) == sorted(torchvision_resnet50_keys())
    # Shapes that pin the architecture (torchvision resnet50: 25,557,032 parameters).
    assert tuple(state["conv1.weight"].shape) == (64, 3, 7, 7)
    assert tuple(state["layer4.2.conv3.weight"].shape) == (2048, 512, 1, 1)
    assert tuple(state["layer2.0.downsample.0.weight"].shape) == (512, 256, 1, 1)
    assert tuple(state["fc.weight"].shape) == (1000, 2048)
    assert sum(p.numel() for p in net.parameters()) == 25_557_032
    out = net.eval()(torch.zeros(1, 3, 64, 64))
    assert tuple(out.shape) == (1, 1000)


def test_imagenet_style_file_loads_into_two_channel_classifier(tmp_path: Path) -> None:
    torch.manual_seed(0)
    imagenet = cm.resnet50(num_classes=1000, in_channels=3)
    path = tmp_path / "resnet50-imagenet.pth"
    torch.save(imagenet.state_dict(), path)
    net = cm.resnet50(num_classes=2, in_channels=2)
    skipped = cm.load_pretrained(net, path)
    assert skipped == ["fc.weight", "fc.bias"]
    got, src = net.state_dict(), imagenet.state_dict()
    assert torch.equal(got["layer3.5.conv2.weight"], src["layer3.5.conv2.weight"])
    # conv1: mean over RGB, repeated, scaled so equal inputs give the same response.
    want = src["conv1.weight"].mean(1, keepdim=True).repeat(1, 2, 1, 1) * 1.5
    assert torch.allclose(got["conv1.weight"], want)
    x = torch.rand(1, 1, 32, 32)
    assert torch.allclose(net.conv1(x.repeat(1, 2, 1, 1)), imagenet.conv1(x.repeat(1, 3, 1, 1)),
                          atol=1e-5)


def test_wrong_weights_file_is_refused_with_what_is_wrong(tmp_path: Path) -> None:
    bad = tmp_path / "resnet18.pth"
    state = cm.resnet50().state_dict()
    del state["layer4.2.conv3.weight"]
    state["layer5.0.conv1.weight"] = torch.zeros(1)
    torch.save(state, bad)
    with pytest.raises(ValueError, match=r"missing \['layer4.2.conv3.weight'\].*unexpected"):
        cm.load_pretrained(cm.resnet50(), bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cm.load_pretrained(cm.resnet50(), tmp_path / "nope.pth")


def test_classifier_file_round_trips_with_meta_and_weights_only(tmp_path: Path) -> None:
    torch.manual_seed(1)
    net = cm.resnet50(num_classes=2, in_channels=2).eval()
    meta = {"arch": "resnet50", "channels": [0, 1], "crop_size": 32,
            "display": {"rule": "tissue-ecdf", "low": 0.01, "high": 0.995},
            "class_names": ["negative", "positive"], "threshold": 0.4}
    path = cm.save_classifier(tmp_path / "models" / "m1.pt", net, meta)
    loaded, got_meta = cm.load_classifier(path)
    assert got_meta == meta
    x = torch.rand(3, 2, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))
    # weights_only: a file carrying pickled code is refused, not executed
    evil = tmp_path / "evil.pt"
    torch.save({"format": cm.FORMAT, "x": Path("/etc")}, evil)
    with pytest.raises(ValueError, match="not a weights-only torch file"):
        cm.load_classifier(evil)
    with pytest.raises(ValueError, match="lacks"):
        cm.save_classifier(tmp_path / "m2.pt", net, {"arch": "resnet50"})
