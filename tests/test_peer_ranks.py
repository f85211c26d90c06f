"""tools/peer_ranks.py: fastvae's EMA + restart codebook on 2 processes is the one process's; where
vector-quantize-pytorch's k-means init and code expiry are not (both ranks agree, with each other only)."""

import pytest

pytest.importorskip("vector_quantize_pytorch")


@pytest.mark.slow
def test_two_ranks_equal_one_process_for_fastvae_and_where_the_peer_does_not(tmp_path):
    from tools.peer_ranks import FLOAT32_NOISE, measure

    rows = {r["quantizer"]: r for r in measure(steps=3)}
    for name in ("fastvae: EMA", "fastvae: EMA + restart"):
        assert rows[name]["max_diff_vs_one_process"] < 1e-12 and rows[name]["max_diff_between_ranks"] == 0
    assert rows["vector-quantize-pytorch: EMA"]["max_diff_vs_one_process"] < FLOAT32_NOISE  # synced EMA sums
    for name in ("vector-quantize-pytorch: EMA + kmeans_init", "vector-quantize-pytorch: EMA + code expiry"):
        assert rows[name]["max_diff_vs_one_process"] > 0.1 and rows[name]["max_diff_between_ranks"] == 0
