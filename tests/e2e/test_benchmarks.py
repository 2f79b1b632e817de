"""Each benchmark at smoke size on the e2e sandbox, so none can rot: it runs to
the end, measures every pod, and its table renders into BENCHMARKS.md."""

from __future__ import annotations

import math
from pathlib import Path

from ambient_cni_sandbox.cluster import SandboxCluster
from ambient_cni_sandbox.network import sandbox_netns
from benchmarks import cni_add, controller_scale, enroll, event_to_kernel, idle, report

BENCHMARKS_MD = Path(__file__).resolve().parents[2] / "BENCHMARKS.md"


def test_enrolment_benchmark_measures_every_pod_and_its_baselines(
    sandbox: SandboxCluster, tmp_path: Path
) -> None:
    result = enroll.run(sandbox, pods=6, profile=tmp_path)
    assert set(result["backends"]) == {"iptables-nft", "nftables"}
    for run in result["backends"].values():
        assert run["enroll_seen_in_kernel"] == 6
        assert 0 < run["enroll_kernel_wall_s"] <= run["enroll_wall_s"]
        assert all(math.isfinite(run[k]) for k in run if k.startswith("ratio_"))
        assert run["agent_peak_rss_mib"] > 0
        assert set(run["profiles"]) == {"enrol", "unenrol"}  # py-spy sampled both phases
    node = result["node_mode"]  # the legacy mode on the same pods
    assert node["enroll_seen_in_kernel"] == 6
    assert 0 < node["enroll_kernel_wall_s"] <= node["enroll_wall_s"]
    assert "| enrol: spec to status all done |" in report.enroll_table(result)
    assert result["per_rule_wall_s"] > 0
    assert result["floor_wall_s"] > 0
    assert result["in_process_floor_wall_s"] > 0
    assert not sandbox_netns("acni-test-bench-")  # nothing left behind
    assert "the in-process floor to the kernel |" in report.enroll_table(result)


def test_event_to_kernel_benchmark_times_every_pod(sandbox: SandboxCluster) -> None:
    result = event_to_kernel.run(sandbox, pods=4, backend="nftables")
    for measured in (result["label_to_kernel_s"], result["label_to_annotation_s"]):
        assert 0 < measured["min"] <= measured["p50"] <= measured["p99"] <= measured["max"]
    assert sandbox.namespace(event_to_kernel.NAMESPACE) is None
    assert "event to kernel p99" in report.event_table({"backends": {"nftables": result}})


def test_controller_scale_benchmark_counts_writes_and_isolates_the_agent(
    sandbox: SandboxCluster,
) -> None:
    result = controller_scale.run(sandbox, nodes=8, pods=80, relabel=4)
    assert result["spec_writes_per_node_max"] <= report.TARGET_WRITES_PER_NODE
    assert result["restart_writes"] == 0
    # The agent saw only its own object; a cluster-wide watch saw every node's change.
    assert result["agent_objects"] < result["all_objects"]
    assert result["all_objects"] >= 8
    assert "| at most 2 spec writes per node per burst |" in report.scale_table(result)
    assert "one agent (its own object only)" in report.watch_table(result)


def test_every_section_of_benchmarks_md_has_its_markers() -> None:
    document = BENCHMARKS_MD.read_text()
    for name in ("machine", "enroll", "event", "scale", "watch", "cni", "idle"):
        document = report.replace_section(document, name, f"TABLE-{name}")  # raises if absent
        assert f"<!-- bench:{name} -->\nTABLE-{name}\n<!-- /bench:{name} -->" in document


def test_cni_add_benchmark_times_every_case_and_leaves_nothing(sandbox: SandboxCluster) -> None:
    result = cni_add.run(sandbox, pods=3)
    for case in ("add_bridge_alone_s", "add_outside_mesh_s", "add_inside_mesh_s", "add_sidecar_s"):
        assert 0 < result[case]["min"] <= result[case]["max"]
    assert result["enrolled_at_add"] == 3
    assert result["captured_at_add"] == 3
    assert result["plugin_binary_bytes"] > 0
    assert not sandbox_netns(sandbox.state.topology.prefix + "cnibench-")
    assert sandbox.namespace(cni_add.INSIDE) is None
    assert "pod in the mesh (enrolled first)" in report.cni_table(result)
    assert "pod with a sidecar (captured first)" in report.cni_table(result)


def test_agent_at_rest_benchmark_measures_each_size_and_a_repair(sandbox: SandboxCluster) -> None:
    # Short clocks: each 3 s window holds a full re-check, so its cost is in the figures.
    result = idle.run(sandbox, sizes=(0, 3), drift_interval=1, resync_interval=3, window=3)
    for run in result["backends"].values():
        assert [row["pods"] for row in run["rows"]] == [0, 3]
        assert all(0 <= row["cpu_share"] < 1 for row in run["rows"])  # 10 ms ticks: may be 0
        assert run["announced"] == 1
        assert 0 < run["flushed_rule_repaired_s"] <= report.TARGET_REPAIR_S
    # In-process: no process at rest, not even for the full re-check.
    assert result["backends"]["nftables"]["rows"][-1]["processes"] == 0
    assert "| nftables | 3 |" in report.idle_table(result)
    assert not sandbox_netns("acni-test-bench-idle-")  # nothing left behind
