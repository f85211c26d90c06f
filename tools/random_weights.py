"""Pretrained-weight files that cannot be downloaded here, written with random weights of the same
architecture, names and format: they check plumbing and gradients (tests), and cost the same FLOPs
(benchmarks), not perceptual quality.

    python tools/random_weights.py vgg FOLDER         # FOLDER/vgg16-397923af.pth
    python tools/random_weights.py inception FOLDER   # FOLDER/weights-inception-2015-12-05-6726825d.pth
"""

from pathlib import Path

import torch

from fastvae.perceptual import BACKBONE_FILES, random_backbone_features


def write_random_backbone(net: str, folder) -> Path:
    """torchvision's backbone file for LPIPS (its `features.*` tensors, as the real file holds them)."""
    torch.manual_seed(0)
    features = random_backbone_features(net)
    path = Path(folder) / BACKBONE_FILES[net]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    return path


def write_random_inception(folder) -> Path:
    """torch-fidelity's Inception-v3 file (its state_dict's names and shapes), random, with each
    BatchNorm's running statistics set from one batch of random images: without them the features of a
    42-layer random network shrink towards 0 and every FID would be about 0."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from fastvae.fid import FEATURE_DIM, INCEPTION_FILE

    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keep the random initialization
            return None

    torch.manual_seed(0)
    path = Path(folder) / INCEPTION_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({}, path)  # what the constructor reads (and the subclass ignores)
    model = Unloaded("inception-v3-compat", [str(FEATURE_DIM)], feature_extractor_weights_path=str(path))
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # the batch's own statistics
    model.train()
    with torch.no_grad():
        model(torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8))
    torch.save(model.state_dict(), path)
    return path


if __name__ == "__main__":
    import sys

    write = write_random_inception if sys.argv[1] == "inception" else lambda folder: write_random_backbone(sys.argv[1], folder)
    print(write(sys.argv[2]))
