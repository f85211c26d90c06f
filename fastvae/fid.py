"""FID and KID (Heusel et al. 2017; Binkowski et al. 2018) with torch-fidelity: its Inception-v3 feature
extractor (the TF-FID network and resize, as the published numbers use) and its KID; the Fréchet distance
is computed here, 3x faster and always real (frechet_distance says how). fastvae owns the plumbing: which
images, the weights file, features gathered over processes, cached real features.

Why torch-fidelity and not torchmetrics' FID: torchmetrics wraps the same extractor but keeps its state
inside a module (one process, no cache of the real set's features, and KID without a weights path);
torch-fidelity's functions take features, so several processes can gather theirs first.

Images go in as [B, C, H, W] floats in [0, 1]; they become uint8 the way a PNG of them would
(torchvision's save_image: x * 255 + 0.5, clamped; truncating instead would turn 254.99998 into 254),
greyscale repeated to RGB (PIL's convert("RGB")), and torch-fidelity resizes them to 299 px itself.
Its weights file (`weights-inception-2015-12-05-6726825d.pth`; pytorch-fid's `pt_inception-...` differs)
is read from the torch hub cache or a given path, never downloaded, and only as plain tensors.
"""

from __future__ import annotations

import hashlib
import io
import tempfile
import warnings
from pathlib import Path

import torch

from fastvae.errors import UserError
from fastvae.perceptual import hub_checkpoints, weights_file

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
FEATURE_DIM = 2048
UNBIASED_FROM = 2048  # fewer images than feature dimensions: a rank-deficient covariance, FID biased upwards


def inception_path(path: str = "", flag: str = "--inception-weights") -> Path:
    """The Inception weights: `path` when given (a file, or a folder holding it), else the hub cache's
    copy; missing is one line naming the flag (or config key) that gives it."""
    found = weights_file(path, INCEPTION_FILE, flag) if path else hub_checkpoints() / INCEPTION_FILE
    if not found.is_file():
        where = f"'{found}'" if path else f"{INCEPTION_FILE} in {hub_checkpoints()} (torch's hub cache, $TORCH_HOME)"
        raise UserError(f"FID/KID need torch-fidelity's Inception weights: expected {where}; fastvae never downloads: "
                        f"copy {INCEPTION_URL} there from a machine with internet, or give {flag}"
                        f"{'=' if '.' in flag else ' '}PATH")
    return found


def load_inception(path: str = "", device="cpu", flag: str = "--inception-weights") -> tuple[torch.nn.Module, str]:
    """(torch-fidelity's frozen Inception-v3 giving 2048 pool features, the weights file's sha256).

    The file is read once into memory and checked to hold plain tensors (weights_only); torch-fidelity
    is then given a private copy of those same bytes, so what it unpickles is what was checked."""
    weights = inception_path(path, flag)
    data = weights.read_bytes()
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # pickle's and torch's own types
        raise UserError(f"Inception weights file '{weights}' refused: it is not plain tensors ({type(err).__name__}); "
                        f"expected torch-fidelity's {INCEPTION_FILE}") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"Inception weights file '{weights}' holds a {type(state).__name__} that is not a mapping of "
                        f"tensors; expected torch-fidelity's {INCEPTION_FILE}")
    bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise UserError(f"Inception weights file '{weights}': {bad} holds NaN or infinite values; expected "
                        f"torch-fidelity's {INCEPTION_FILE}")
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as err:
        raise UserError(f"FID/KID need torch-fidelity ({err}); expected `pip install 'fastvae[metrics]'`") from None
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / INCEPTION_FILE
        copy.write_bytes(data)
        try:
            model = FeatureExtractorInceptionV3("inception-v3-compat", [str(FEATURE_DIM)],
                                                feature_extractor_weights_path=str(copy))
        except (RuntimeError, KeyError, TypeError, AttributeError) as err:  # load_state_dict: keys, shapes
            raise UserError(f"Inception weights file '{weights}' does not fit Inception-v3 "
                            f"({str(err).splitlines()[0][:100]}); expected torch-fidelity's {INCEPTION_FILE}") from None
    return model.to(device), hashlib.sha256(data).hexdigest()


def inception_input(images: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] in [0, 1] -> uint8 RGB, as a PNG of them reads back (see the module docstring)."""
    x = images.detach().float().mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


@torch.no_grad()
def inception_features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """2048 pool features per image [B, 2048], float64 on the CPU."""
    if images.shape[1] not in (1, 3):
        raise UserError(f"FID/KID: images with {images.shape[1]} channels; expected 1 (greyscale) or 3 (RGB)")
    (features,) = model(inception_input(images))
    return features.double().cpu()


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID of two feature sets [N, D]: ||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^1/2), float64.

    Written here rather than torch-fidelity's fid_statistics_to_metric, which takes the eigenvalues of the
    non-symmetric S1 S2 (np.linalg.eigvals: ~20 s for D = 2048 on 2 cores, and complex values it silently
    drops). The same trace, real by construction: S1 S2 has the eigenvalues of the symmetric A S2 A with
    A = S1^1/2 (two symmetric eigendecompositions, ~3x faster); with fewer images than dimensions, of
    X1 S2 X1^T, so the trace is the nuclear norm of X1 X2^T / sqrt((N1 - 1)(N2 - 1)) (X: centered
    features), an N1 x N2 matrix. Clearly negative eigenvalues (near-singular covariances) warn; fewer
    images than feature dimensions warn too (biased upwards). Tested against scipy's sqrtm on the
    papers' formula and against torch-fidelity on the same images."""
    for name, f in (("real", real), ("generated", fake)):
        if len(f) < 2:
            raise UserError(f"FID: {len(f)} {name} image(s); expected at least 2 (and >= {UNBIASED_FROM} for an "
                            f"unbiased value)")
    (n1, d), n2 = real.shape, len(fake)
    x1, x2 = (f.double() - f.double().mean(0) for f in (real, fake))
    mean_gap = (real.double().mean(0) - fake.double().mean(0)).pow(2).sum()
    traces = x1.pow(2).sum() / (n1 - 1) + x2.pow(2).sum() / (n2 - 1)
    if min(n1, n2) < UNBIASED_FROM:
        warnings.warn(f"FID from {min(n1, n2)} images (< {UNBIASED_FROM}) is biased upwards: compare FIDs of equal "
                      f"image counts only", stacklevel=2)
    if min(n1, n2) <= d:
        trace_root = torch.linalg.svdvals(x1 @ x2.T).sum() / ((n1 - 1) * (n2 - 1)) ** 0.5
    else:
        trace_root = trace_of_root_product(x1.T @ x1 / (n1 - 1), x2.T @ x2 / (n2 - 1), n1, n2)
    return float(mean_gap + traces - 2 * trace_root)


def trace_of_root_product(s1: torch.Tensor, s2: torch.Tensor, n1: int, n2: int) -> torch.Tensor:
    """Tr((S1 S2)^1/2) from the symmetric A S2 A, A = S1^1/2; a warning where it is not positive."""
    w1, v1 = torch.linalg.eigh(s1)
    root1 = (v1 * w1.clamp(min=0).sqrt()) @ v1.T
    eig = torch.linalg.eigvalsh(root1 @ s2 @ root1)
    if float(eig.min()) < -1e-6 * float(eig.abs().max()) or float(w1.min()) < -1e-6 * float(w1.abs().max()):
        warnings.warn(f"FID: the covariances are near-singular ({n1} and {n2} images for {len(s1)} feature "
                      f"dimensions); negative eigenvalues were set to 0, the value is unreliable", stacklevel=3)
    return eig.clamp(min=0).sqrt().sum()


def kernel_inception_distance(real: torch.Tensor, fake: torch.Tensor, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 2020) -> tuple[float, float, int]:
    """KID (mean, std over subsets, subset size) by torch-fidelity: the unbiased MMD^2 with the cubic
    kernel (x.y / D + 1)^3 over `subsets` random subsets of min(subset_size, N1, N2) images each."""
    from torch_fidelity.metric_kid import kid_features_to_metric

    size = min(subset_size, len(real), len(fake))
    if size < 2:
        raise UserError(f"KID: {size} image(s) in a subset; expected at least 2")
    out = kid_features_to_metric(real.double().cpu(), fake.double().cpu(), kid_subsets=subsets,
                                 kid_subset_size=size, rng_seed=seed, verbose=False)
    return out["kernel_inception_distance_mean"], out["kernel_inception_distance_std"], size


class FeatureSets:
    """The Inception features one evaluation collects, by set: "real" (the split's images, unless read
    from the cache), "reconstructions" (z = mu) and "samples" (from the prior). Each process collects
    its own share in order; `gathered` joins the shares in rank order, which is the order one process
    would have collected them in (evaluate's shards are contiguous)."""

    def __init__(self, inception: torch.nn.Module, weights_sha: str, fid: bool = False, rfid: bool = False,
                 kid: bool = False, num_samples: int | None = None, kid_subsets: int = 100,
                 kid_subset_size: int = 1000, cache_file: Path | None = None, real_images: int | None = None) -> None:
        self.inception, self.weights_sha = inception, weights_sha
        self.fid, self.rfid, self.kid, self.num_samples = fid, rfid, kid, num_samples
        self.kid_subsets, self.kid_subset_size, self.cache_file = kid_subsets, kid_subset_size, cache_file
        self.cached_real = read_cached(cache_file, real_images)
        self.parts: dict[str, list[torch.Tensor]] = {"real": [], "reconstructions": [], "samples": []}

    def add(self, name: str, images: torch.Tensor) -> None:
        wanted = {"real": self.cached_real is None, "reconstructions": self.rfid, "samples": self.fid}[name]
        if wanted:
            self.parts[name].append(inception_features(self.inception, images))

    def gathered(self, name: str, all_gather=None) -> torch.Tensor:
        mine = torch.cat(self.parts[name]) if self.parts[name] else torch.zeros(0, FEATURE_DIM, dtype=torch.float64)
        return mine if all_gather is None else all_gather(mine)

    def report(self, all_gather=None, is_main: bool = True) -> dict:
        """FID / KID of the asked comparisons against the real features (cached after the first time)."""
        real = self.cached_real if self.cached_real is not None else self.gathered("real", all_gather)
        if self.cached_real is None and self.cache_file is not None and is_main:
            write_cached(self.cache_file, real)
        out = {"inception_weights_sha256": self.weights_sha, "fid_real_images": len(real)}
        for key, name, asked in (("fid", "samples", self.fid), ("rfid", "reconstructions", self.rfid)):
            if not asked:
                continue
            fake = self.gathered(name, all_gather)
            out[f"{key}_images"] = len(fake)
            out[key] = frechet_distance(real, fake)
            if self.kid:
                kid = key[:-3] + "kid"  # kid (samples), rkid (reconstructions)
                out[f"{kid}_mean"], out[f"{kid}_std"], out[f"{kid}_subset_size"] = \
                    kernel_inception_distance(real, fake, self.kid_subsets, self.kid_subset_size)
        return out


def real_features_file(run_dir: Path, data, split: str, images: int, binarize: bool, weights_sha: str,
                       pixels: str) -> Path:
    """Where a split's features are cached in a run's folder (evaluate's and training's): one file per
    everything that changes them (the images themselves: `pixels`, their digest as read; the data
    settings, the split, how many, binarized or not, the weights), hashed into its name. Images
    overwritten in place change the digest, so stale features are never read."""
    import json

    key = {"data": [data.name, data.root, data.image_size, data.channels, data.center_crop, data.test_fraction,
                    data.split_seed, data.label_attribute, data.test_split],
           "split": split, "images": images, "binarize": binarize, "weights": weights_sha, "pixels": pixels}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(run_dir) / "fid_features" / f"real-{digest}.safetensors"


@torch.no_grad()
def pixels_digest(dataset, total: int, binarize: bool, shard=(0, 1), all_gather=None) -> str:
    """sha256 of the first `total` images of a data set as evaluation reads them (8-bit values, in order),
    each process digesting its share and the shares' digests joined in rank order."""
    from torch.utils.data import Subset

    from fastvae.data import in_order_loader
    from fastvae.evaluation import shard_of

    digest = hashlib.sha256()
    for x, _, _ in in_order_loader(Subset(dataset, shard_of(total, shard)), 100):
        x = (x > 0.5).to(x.dtype) if binarize else x
        digest.update((x * 255).round().to(torch.uint8).contiguous().numpy().tobytes())
    mine = torch.tensor([list(digest.digest())], dtype=torch.int64)
    shares = mine if all_gather is None else all_gather(mine)
    return hashlib.sha256(bytes(shares.flatten().tolist())).hexdigest()


def read_cached(path: Path | None, images: int | None = None) -> torch.Tensor | None:
    """The cached features, checked: a safetensors file holding `features` [images, 2048], finite. A
    damaged one (cut, NaN, another file) is said in one line and computed again (it is only a cache)."""
    if path is None or not path.is_file():
        return None
    from safetensors.torch import load_file

    try:
        features = load_file(str(path))["features"]
        problem = None if features.dim() == 2 and features.shape[1] == FEATURE_DIM and \
            (images is None or features.shape[0] == images) and torch.isfinite(features).all() else \
            f"shape {tuple(features.shape)}, expected [{images}, {FEATURE_DIM}] of finite numbers"
    except Exception as err:  # safetensors' own errors for a file of another kind; KeyError for no features
        problem = f"unreadable ({type(err).__name__})"
    if problem is not None:
        print(f"fastvae: the cached real-image features {path} are damaged ({problem}): computing them again",
              flush=True)
        return None
    return features.double()


def write_cached(path: Path, features: torch.Tensor) -> None:
    """float32 (what the extractor computes in): 8 KB per image."""
    from safetensors.torch import save_file

    from fastvae.atomic import replaced

    with replaced(path) as tmp:
        save_file({"features": features.float().contiguous()}, str(tmp))
