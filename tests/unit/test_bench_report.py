"""The controller scale table: one column per size, and issue 20's marks at 5,000 nodes."""

from __future__ import annotations

from typing import Any

from benchmarks import report


def run(nodes: int, converge: float, cpu: float, mean: float = 1.0) -> dict[str, Any]:
    return {
        "nodes": nodes,
        "pods": nodes * 20,
        "namespaces": 200,
        "relabelled": 100,
        "enrolled_after": nodes * 10,
        "populate_s": 10.0,
        "first_sync_s": 2.0,
        "converge_s": converge,
        "spec_writes": nodes * mean,
        "spec_writes_per_node_max": 2,
        "spec_writes_per_node_mean": mean,
        "controller_burst_cpu_s": cpu,
        "controller_total_cpu_s": cpu * 2,
        "controller_peak_rss_mib": nodes * 0.2,
        "restart_relist_s": 3.0,
        "restart_writes": 0,
        "restart_peak_rss_mib": 100.0,
    }


def test_sizes_side_by_side_with_the_large_targets() -> None:
    table = report.scale_table(
        {"sizes": [run(1000, 5.0, 4.0), run(2000, 9.0, 8.0), run(5000, 25.0, 24.0, 1.01)]}
    )
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("| measure |"))
    assert header.count("nodes /") == 3
    assert "| burst: controller CPU | 4.00 s | 8.00 s | 24.00 s |" in lines
    assert "| burst: converged per 1,000 nodes | 5.00 s | 4.50 s | 5.00 s |" in lines
    assert "| converge in at most 20 s | 25.00 s: **missed** |" in lines
    assert "| burst CPU at most 2.5x the 2,000-node run's | 3.00x: **missed** |" in lines
    assert any(
        line.startswith("| at most 1 spec write per node") and "missed" in line for line in lines
    )
    assert any(line.startswith("| restart to every spec") and ": met |" in line for line in lines)


def test_one_size_keeps_the_one_column_table() -> None:
    table = report.scale_table(run(8, 1.0, 1.0))
    assert "| at most 2 spec writes per node per burst |" in table  # tests/e2e reads it
    assert "issue 20" not in table  # no 5,000-node marks for a small run
