"""fastvae/pictures.py: grids tiled as torchvision's make_grid tiles them (without importing it)."""

import subprocess

import pytest
import torch
from torchvision.utils import make_grid

from fastvae.pictures import tile


@pytest.mark.parametrize("n, channels, nrow", [(1, 1, 8), (1, 3, 4), (5, 1, 3), (12, 3, 4), (7, 3, 10)])
def test_tile_is_make_grids_layout(n, channels, nrow):
    images = torch.rand(n, channels, 9, 6, generator=torch.Generator().manual_seed(n))
    assert torch.equal(tile(images, nrow), make_grid(images, nrow=nrow, padding=2, pad_value=1.0))


def test_a_grid_command_does_not_import_torchvision(python, tmp_path):
    """generate / evaluate / the MNIST path start without torchvision (~1.2 s of their start-up)."""
    code = ("import sys, torch; from fastvae import pictures, generate, evaluate; from fastvae.data import mnist; "
            "pictures.save_grid(torch.rand(4, 1, 8, 8), sys.argv[1], 2, 't'); "
            "print(sorted(m for m in ('torchvision', 'matplotlib.pyplot') if m in sys.modules))")
    out = subprocess.run([python, "-c", code, str(tmp_path / "g.png")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_a_picture_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """Two generate commands writing one --out, or one that fails half-way, never leave half a PNG:
    it is written beside the target and renamed onto it."""
    from PIL import Image

    from fastvae.pictures import save_grid

    path = save_grid(torch.rand(4, 1, 8, 8), tmp_path / "samples.png", 2, "first")
    before = path.read_bytes()

    def half_then_fail(self, fp, *args, **kwargs):
        open(fp, "wb").write(before[: len(before) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", half_then_fail)
    with pytest.raises(OSError):
        save_grid(torch.rand(4, 1, 8, 8), path, 2, "second")
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["samples.png"]
