"""``clusterssl bench convert``: it runs end to end on a tiny generated set and reports every figure it
promises, for tar and for the conversion (the figures themselves are not checked: benchmarks are not
tests)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import invoke


def test_bench_convert_reports_tar_convert_and_memory_for_each_size(tmp_path: Path) -> None:
    result = invoke(
        "bench",
        "convert",
        "--images",
        "20",
        "--images",
        "40",
        "--repeats",
        "1",
        "--dir",
        str(tmp_path),
        "--json",
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert [r["images"] for r in summary["results"]] == [20, 40]
    assert summary["per_sample_loop"].startswith(("C ", "Python ("))
    for row in summary["results"]:
        assert row["dataset"]["images"] == row["images"]
        for contender in ("tar", "tar_fsync", "convert"):
            assert row[contender]["images_per_s"] > 0 and row[contender]["mb_per_s"] > 0
        convert = row["convert"]
        assert convert["workers"] == 2 and convert["shards"] >= 1
        assert convert["peak_pss_total_mb"] >= convert["pss_before_mb"] > 0
        rate_ratio = convert["images_per_s"] / row["tar"]["images_per_s"]
        assert row["ratio_vs_tar"] == pytest.approx(rate_ratio, rel=0.01, abs=0.002)
    assert not list(tmp_path.iterdir()), "the generated data is removed without --keep"
