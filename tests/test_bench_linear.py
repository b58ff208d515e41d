"""``clusterssl bench linear`` runs on a small mixture and reports the probe beside its scikit-learn
baseline (the seconds are not checked: benchmarks are not tests)."""

from __future__ import annotations

from clusterssl.tools.bench_linear import render, run_benchmark


def test_bench_linear_reports_the_probe_and_the_baseline() -> None:
    summary = run_benchmark(samples=600, dim=16, classes=3, sigma=0.5, threads=None)
    assert summary["samples"] == 600 and summary["penalties_tried"] >= 3
    # well separated classes: both solvers get (nearly) every evaluation point right
    assert summary["top1"] > 0.95 and summary["baseline"]["top1"] > 0.95
    text = render(summary)
    assert "baseline, scikit-learn LogisticRegression" in text and "600 x 16" in text
