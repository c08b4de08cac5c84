"""benchmarks/bench_search.py runs end to end on a tiny gallery: the warm search extracts nothing
and the results file has what the README quotes."""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import bench_search  # noqa: E402


def test_bench_search_quick_writes_cold_and_warm_rows(tmp_path):
    assert bench_search.main(["--sizes", "24", "--queries", "3", "--methods", "transreid-tiny", "--quick",
                              "--cache", str(tmp_path / "cache"), "--out", str(tmp_path), "--no-plot"]) == 0
    result = json.loads((tmp_path / "bench_search_quick.json").read_text())
    assert result["environment"]["torch"] and result["environment"]["cpu"] and result["environment"]["date"]
    (row,) = result["rows"]
    assert (row["method"], row["gallery"]) == ("transreid-tiny", 24)
    assert (row["cold"]["extracted"], row["cold"]["reused"]) == (24, 0)
    assert (row["warm"]["extracted"], row["warm"]["reused"]) == (0, 24)
    assert row["warm"]["queries"] == 3 and row["warm"]["topk"] == 10
    for key in ("extraction_images_per_second", "warm_ranking_queries_per_second", "warm_over_cold"):
        assert row[key] > 0
    assert row["cold"]["peak_rss_mb"] >= row["cold"]["peak_rss_before_search_mb"] > 0
