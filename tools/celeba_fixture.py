"""A synthetic CelebA in the real dataset's exact on-disk format, for tests and benchmarks.

CelebA cannot be downloaded here and no package ships it; these files have its
layout, sizes (178x218 JPEGs) and text formats, with a known attribute pattern.

    python tools/celeba_fixture.py DIR [--n 600] [--layout official|torchvision]   # prints the root
"""

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

ATTRIBUTES = ("5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose "
              "Black_Hair Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee "
              "Gray_Hair Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard "
              "Oval_Face Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair "
              "Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young").split()
assert len(ATTRIBUTES) == 40


def attribute_value(i: int, name: str) -> int:
    """The known pattern: Smiling on even images, Eyeglasses on every third, Male on the first half."""
    if name == "Smiling":
        return 1 if i % 2 == 0 else -1
    if name == "Eyeglasses":
        return 1 if i % 3 == 0 else -1
    return -1


def partition(i: int, n: int) -> int:
    return 0 if i < int(n * 0.7) else (1 if i < int(n * 0.85) else 2)


def write_celeba(root: Path, n: int = 60, layout: str = "official") -> Path:
    """Writes n 178x218 JPEGs plus list_attr_celeba.txt and list_eval_partition.txt; returns the root to use."""
    base = root / "celeba" if layout == "torchvision" else root
    images = base / "img_align_celeba"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = [f"{n}", " ".join(ATTRIBUTES) + " "]
    parts = []
    for i in range(n):
        name = f"{i + 1:06d}.jpg"
        face = rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)
        if attribute_value(i, "Smiling") == 1:  # a bright "smile" band: a learnable difference
            face[140:160, 50:128] = 255
        Image.fromarray(face).save(images / name, quality=90)
        values = "".join(f"{attribute_value(i, a):3d}" for a in ATTRIBUTES)
        lines.append(f"{name}{values}")
        parts.append(f"{name} {partition(i, n)}")
    (base / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (base / "list_eval_partition.txt").write_text("\n".join(parts) + "\n")
    return root


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="a folder that does not exist yet")
    parser.add_argument("--n", type=int, default=60, help="images (70%% train, 15%% valid, 15%% test)")
    parser.add_argument("--layout", choices=("official", "torchvision"), default="official")
    args = parser.parse_args(argv)
    print(write_celeba(args.root, args.n, args.layout))


if __name__ == "__main__":
    main()
