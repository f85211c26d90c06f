"""Pretrained-weight files that cannot be downloaded here, written with random weights of the same
architecture, names and format: they check plumbing and gradients (tests), and cost the same FLOPs
(benchmarks), not perceptual quality.

    python tools/random_weights.py vgg FOLDER     # FOLDER/vgg16-397923af.pth
"""

from pathlib import Path

import torch

from fastvae.perceptual import BACKBONE_FILES


def write_random_backbone(net: str, folder) -> Path:
    """torchvision's backbone file for LPIPS (its `features.*` tensors, as the real file holds them)."""
    from torchvision.models import alexnet, vgg

    torch.manual_seed(0)
    # VGG's features alone (the whole vgg16 would allocate its 120M-parameter classifier for nothing)
    features = vgg.make_layers(vgg.cfgs["D"]) if net == "vgg" else alexnet().features
    path = Path(folder) / BACKBONE_FILES[net]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    return path


if __name__ == "__main__":
    import sys

    print(write_random_backbone(sys.argv[1], sys.argv[2]))
