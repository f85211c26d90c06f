"""torch-fidelity's Inception-v3 file with random weights (tools/random_weights.py), written once per
session: FID/KID's plumbing runs on it in CI; the numbers it gives are not real FIDs."""

from shared import built_once
from tools.random_weights import write_random_inception


def inception_weights(tmp_path_factory) -> str:
    folder = built_once(tmp_path_factory, "inception_random", write_random_inception)
    return str(next(folder.glob("weights-inception-*.pth")))
