"""ResNet-50 in plain torch with torchvision-compatible ``state_dict`` keys, and model files.

``resnet50()`` builds the same module tree as ``torchvision.models.resnet50`` (``conv1``,
``bn1``, ``layer1`` .. ``layer4`` of Bottleneck blocks ``[3, 4, 6, 3]`` with
``conv1/bn1/conv2/bn2/conv3/bn3`` and ``downsample.0/1`` in each layer's first block, ``fc``),
so a torchvision/ImageNet weights file loads with :func:`load_pretrained`.

A trained classifier is one file, ``<name>.pt`` (written by :func:`save_classifier`): a dict
``{"format": FORMAT, "meta": {...}, "state_dict": {...}}`` of tensors and plain values only,
so it loads with ``torch.load(weights_only=True)`` (no pickled code runs). ``meta`` holds
everything prediction needs: ``arch``, ``channels``, ``crop_size``, ``display`` (the
normalisation rule), ``class_names``, ``threshold``; a ``<name>.json`` copy beside it is for
people.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

FORMAT = "omeflow-classifier v1"
ARCH = "resnet50"
#: Blocks per layer of ResNet-50 (torchvision's ``resnet50``).
LAYERS = (3, 4, 6, 3)
#: Keys ``meta`` must hold (prediction reads them).
META_KEYS = ("arch", "channels", "crop_size", "display", "class_names", "threshold")


def _nn() -> Any:
    import torch.nn as nn

    return nn


def _bottleneck_cls() -> type:
    nn = _nn()

    class Bottleneck(nn.Module):
        """torchvision's Bottleneck (stride on the 3x3 conv, expansion 4)."""

        expansion = 4

        def __init__(self, inplanes: int, planes: int, stride: int = 1,
                     downsample: Any = None) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(planes * 4)
            self.relu = nn.ReLU(inplace=True)
            self.downsample = downsample

        def forward(self, x: Any) -> Any:
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
            return self.relu(out + identity)

    return Bottleneck


def _resnet_cls() -> type:
    nn = _nn()
    Bottleneck = _bottleneck_cls()

    class ResNet(nn.Module):
        """torchvision's ResNet layout (Bottleneck blocks)."""

        def __init__(self, layers: tuple[int, ...], num_classes: int, in_channels: int) -> None:
            super().__init__()
            self.inplanes = 64
            self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
            self.layer1 = self._layer(64, layers[0], 1)
            self.layer2 = self._layer(128, layers[1], 2)
            self.layer3 = self._layer(256, layers[2], 2)
            self.layer4 = self._layer(512, layers[3], 2)
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(512 * 4, num_classes)
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.constant_(m.weight, 1)
                    nn.init.constant_(m.bias, 0)
            for m in self.modules():  # zero-init the last BN of each block (torchvision option)
                if isinstance(m, Bottleneck):
                    nn.init.constant_(m.bn3.weight, 0)

        def _layer(self, planes: int, blocks: int, stride: int) -> Any:
            downsample = None
            if stride != 1 or self.inplanes != planes * 4:
                downsample = nn.Sequential(
                    nn.Conv2d(self.inplanes, planes * 4, 1, stride=stride, bias=False),
                    nn.BatchNorm2d(planes * 4),
                )
            layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
            self.inplanes = planes * 4
            layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
            return nn.Sequential(*layers)

        def forward(self, x: Any) -> Any:
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(self.avgpool(x).flatten(1))

    return ResNet


def resnet50(num_classes: int = 2, in_channels: int = 3) -> torch.nn.Module:
    """ResNet-50 (torchvision layout and ``state_dict`` keys) for ``in_channels`` inputs."""
    if num_classes < 1 or in_channels < 1:
        raise ValueError(f"num_classes={num_classes} and in_channels={in_channels} must be >= 1")
    return _resnet_cls()(LAYERS, num_classes, in_channels)


def build(arch: str, num_classes: int, in_channels: int) -> torch.nn.Module:
    """The network named ``arch`` (only ``resnet50`` today)."""
    if arch != ARCH:
        raise ValueError(f"unknown classifier arch {arch!r}; known: {ARCH!r}")
    return resnet50(num_classes, in_channels)


def _load_state(path: Path) -> dict[str, Any]:
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist: give the path of a .pt/.pth "
                                "file under the site's model folder")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, ...
        raise ValueError(f"{path} is not a weights-only torch file ({type(exc).__name__}: "
                         f"{str(exc)[:200]}); save it with torch.save(model.state_dict())"
                         ) from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state_dict")
    return obj


def adapt_conv1(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """A pretrained ``conv1.weight`` (64, k, 7, 7) for ``in_channels`` inputs: the mean over
    the k input channels, repeated (the response to equal inputs is unchanged)."""
    if weight.shape[1] == in_channels:
        return weight
    mean = weight.mean(dim=1, keepdim=True)
    return mean.repeat(1, in_channels, 1, 1) * (weight.shape[1] / in_channels)


def load_pretrained(model: torch.nn.Module, path: Path) -> list[str]:
    """Load a torchvision/ImageNet ``resnet50`` state_dict file into ``model``.

    ``conv1`` is adapted to the model's input channels; an ``fc`` of another class count is
    dropped (kept from ``model``). Returns the keys not loaded. Any other missing, extra or
    mis-shaped key is an error naming it.
    """
    state = _load_state(path)
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    if "conv1.weight" in state:
        state["conv1.weight"] = adapt_conv1(state["conv1.weight"], own["conv1.weight"].shape[1])
    skipped = []
    for key in ("fc.weight", "fc.bias"):
        if key in state and key in own and state[key].shape != own[key].shape:
            del state[key]
            skipped.append(key)
    missing = sorted(set(own) - set(state) - set(skipped))
    extra = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(state) & set(own)) if state[k].shape != own[k].shape]
    if missing or extra or shapes:
        raise ValueError(
            f"{path} is not a torchvision resnet50 state_dict: "
            + "; ".join(p for p in (
                f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}" if missing else "",
                f"unexpected {extra[:5]}{' ...' if len(extra) > 5 else ''}" if extra else "",
                f"wrong shapes {shapes[:3]}" if shapes else "",
            ) if p)
            + " (give weights of torchvision.models.resnet50)"
        )
    model.load_state_dict({**own, **state})
    return skipped


def save_classifier(path: Path, model: torch.nn.Module, meta: dict[str, Any]) -> Path:
    """Write ``model`` + ``meta`` to ``path`` (``.pt``, atomically) and ``meta`` as JSON beside
    it. ``meta`` must hold :data:`META_KEYS` and be JSON-able."""
    import io

    import torch

    from hpc_jobs.fsutil import atomic_write

    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise ValueError(f"classifier meta lacks {missing} (prediction needs {list(META_KEYS)})")
    text = json.dumps(meta, indent=2, sort_keys=True, allow_nan=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"format": FORMAT, "meta_json": text, "state_dict": state}, buf)
    atomic_write(path, buf.getvalue(), mode=0o644)
    atomic_write(path.with_suffix(".json"), text + "\n", mode=0o644)
    return path


def load_classifier(path: Path, device: str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """``(model in eval mode on device, meta)`` from a file written by :func:`save_classifier`."""
    obj = _load_state(path)
    if obj.get("format") != FORMAT:
        raise ValueError(f"{path} is not an omeflow classifier (format {obj.get('format')!r}, "
                         f"expected {FORMAT!r}): train one with train_classifier")
    meta = json.loads(obj["meta_json"])
    model = build(meta["arch"], len(meta["class_names"]), len(meta["channels"]))
    model.load_state_dict(obj["state_dict"])
    return model.to(device).eval(), meta
