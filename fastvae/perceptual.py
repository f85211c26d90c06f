"""LPIPS (Zhang et al. 2018), the perceptual distance latent-diffusion autoencoders train with, from
the `lpips` package, with its backbone read from a file the user has: never downloaded at run time.

lpips ships only its linear heads (lpips/weights/v0.1/{alex,vgg}.pth); the backbone is torchvision's
ImageNet network, normally downloaded into $TORCH_HOME/hub/checkpoints/. Here it is read from that
cache or a path the user gives, with weights_only=True (a file holding a pickle that would run code
is refused). Why fastvae maps the file itself: lpips builds the backbone through torchvision's
`pretrained=True`, which downloads; `pnet_rand=True` builds it random, and the file's `features.*`
tensors then go into lpips's slices (net.sliceK.I.* is torchvision's features.I.*).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

from fastvae.errors import UserError

BACKBONE_FILES = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth"}
DOWNLOAD_FROM = "https://download.pytorch.org/models/"
SLICE_KEY = re.compile(r"^net\.slice\d+\.(\d+)\.(weight|bias)$")


def hub_checkpoints() -> Path:
    """torch's hub cache, where torchvision keeps downloaded weights ($TORCH_HOME/hub/checkpoints)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def weights_file(path: str, name: str, flag: str) -> Path:
    """`path` as a weights file: the file itself, or a folder holding `name` (a folder without it is
    one line saying a file is expected)."""
    found = Path(path)
    if found.is_dir():
        if not (found / name).is_file():
            raise UserError(f"{flag} '{path}' is a folder without {name}; expected the file itself or a folder "
                            f"holding it")
        return found / name
    return found


def backbone_path(net: str, path: str = "", flag: str = "loss.lpips_weights") -> Path:
    """The backbone's weights file: `path` when given (a file, or a folder holding it), else the torch hub
    cache's copy; missing is one line naming the file, where it goes, where it comes from, and the flag
    (or config key) that gives its path."""
    if net not in BACKBONE_FILES:
        raise UserError(f"config key 'loss.lpips_net': {net!r}; expected one of {', '.join(BACKBONE_FILES)}")
    name = BACKBONE_FILES[net]
    found = weights_file(path, name, flag) if path else hub_checkpoints() / name
    if not found.is_file():
        where = f"'{found}'" if path else f"{name} in {hub_checkpoints()} (torch's hub cache, $TORCH_HOME)"
        raise UserError(f"LPIPS's {net} backbone weights not found: expected {where}; fastvae never downloads: "
                        f"copy {DOWNLOAD_FROM}{name} there from a machine with internet, or give its path as "
                        f"{flag}")
    return found


def load_lpips(net: str = "vgg", path: str = "", flag: str = "loss.lpips_weights") -> torch.nn.Module:
    """A frozen LPIPS in eval mode (float32): lpips's linear heads, the backbone from `path` or the hub
    cache. Call it on images in [-1, 1]: [B, 3, H, W] -> [B, 1, 1, 1]."""
    weights = backbone_path(net, path, flag)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle's and torch's own types
        raise UserError(f"LPIPS backbone file '{weights}' refused: it is not plain tensors ({type(err).__name__}); "
                        f"expected torchvision's {BACKBONE_FILES[net]}") from None
    model = random_lpips(net)
    if not isinstance(state, dict):
        raise UserError(f"LPIPS backbone file '{weights}' holds a {type(state).__name__}; expected torchvision's "
                        f"{BACKBONE_FILES[net]} (a mapping of tensors)")
    backbone = {}
    for key in model.state_dict():
        match = SLICE_KEY.match(key)
        if match:
            source = f"features.{match.group(1)}.{match.group(2)}"
            tensor = state.get(source)
            if not torch.is_tensor(tensor) or tensor.shape != model.state_dict()[key].shape:
                raise UserError(f"LPIPS backbone file '{weights}' has no {source} of the {net} backbone's shape; "
                                f"expected torchvision's {BACKBONE_FILES[net]}")
            if not (tensor.is_floating_point() and torch.isfinite(tensor).all()):
                raise UserError(f"LPIPS backbone file '{weights}': {source} holds {tensor.dtype} values that are "
                                f"not all finite floats; expected torchvision's {BACKBONE_FILES[net]}")
            backbone[key] = tensor
    model.load_state_dict(backbone, strict=False)
    return model.eval().requires_grad_(False)


def random_backbone_features(net: str) -> torch.nn.Sequential:
    """torchvision's LPIPS backbone features, random. VGG16's are built alone (vgg.make_layers, what
    tv.vgg16().features is): the whole vgg16 draws a 120M-parameter classifier only to drop it, ~1 s."""
    from torchvision.models import alexnet, vgg

    return vgg.make_layers(vgg.cfgs["D"]) if net == "vgg" else alexnet().features


def random_lpips(net: str) -> torch.nn.Module:
    """lpips.LPIPS with its linear heads and a random backbone, for the file's weights to go into; for vgg,
    lpips is handed random_backbone_features' VGG (it would build the whole vgg16 at every LDM or
    tokenizer run's start)."""
    import lpips
    from lpips import pretrained_networks

    torchvision_models = pretrained_networks.tv
    if net == "vgg":
        pretrained_networks.tv = SimpleNamespace(vgg16=lambda pretrained=False: SimpleNamespace(
            features=random_backbone_features("vgg")))
    try:
        with warnings.catch_warnings():  # lpips asks torchvision for `pretrained=False`, deprecated there
            warnings.simplefilter("ignore")
            return lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    finally:
        pretrained_networks.tv = torchvision_models


def check_image_size(model: torch.nn.Module, net: str, channels: int, height: int, width: int) -> None:
    """One LPIPS distance of two images of this size, in one line if the backbone cannot take it
    (AlexNet's strides need about 32 px; VGG takes 16)."""
    try:
        with torch.no_grad():
            lpips_distance(model, torch.zeros(1, channels, height, width), torch.zeros(1, channels, height, width))
    except RuntimeError as err:
        raise UserError(f"config key 'loss.lpips_net': LPIPS's {net} backbone cannot take {height}x{width} images "
                        f"({str(err).splitlines()[0][:120]}); expected larger images or loss.lpips_net=vgg") from None


def lpips_distance(model: torch.nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """LPIPS per image [B] of images in [-1, 1], in float32 outside autocast (its feature
    normalization is not for bf16); greyscale repeated to RGB. Gradients flow to both inputs."""
    if a.shape[1] == 1:
        a, b = a.expand(-1, 3, -1, -1), b.expand(-1, 3, -1, -1)
    device_type = a.device.type if a.device.type in ("cuda", "cpu") else "cpu"
    with torch.autocast(device_type, enabled=False):
        return model(a.float(), b.float()).flatten()

