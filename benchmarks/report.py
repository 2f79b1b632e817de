"""Results as the tables of BENCHMARKS.md, each between its own markers, so the
prose around them (analysis, what bounds a missed target) survives a rerun."""

from __future__ import annotations

import re
from typing import Any

# The first marks.
TARGET_ENROLL_WALL_S = 3.0
TARGET_OVER_PER_RULE = 5.0
TARGET_OVER_FLOOR = 3.0
TARGET_EVENT_P99_S = 1.0
TARGET_CONVERGE_S = 30.0
TARGET_RSS_MIB = 1024.0
TARGET_WRITES_PER_NODE = 2


def _met(ok: bool) -> str:
    return "met" if ok else "**missed**"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def _s(seconds: float) -> str:
    return f"{seconds:.2f} s"


def enroll_table(r: dict[str, Any]) -> str:
    lat, leave = r["enroll_kernel_latency_s"], r["unenroll_kernel_latency_s"]
    faster = r["ratio_per_rule_over_ours"]
    return "\n".join(
        [
            f"{r['pods']} pods on one node, {r['workers']} workers, {r['backend']}.",
            "",
            "| measure | enrol | un-enrol |",
            "|---|---|---|",
            f"| wall, spec written to status all done | {_s(r['enroll_wall_s'])} "
            f"| {_s(r['unenroll_wall_s'])} |",
            f"| wall, spec written to the last pod's rules in the kernel "
            f"| {_s(r['enroll_kernel_wall_s'])} | {_s(leave['max'])} |",
            f"| per-pod latency p50 / p95 / p99 (to its rules in the kernel) "
            f"| {_ms(lat['p50'])} / {_ms(lat['p95'])} / {_ms(lat['p99'])} "
            f"| {_ms(leave['p50'])} / {_ms(leave['p95'])} / {_ms(leave['p99'])} |",
            f"| agent CPU | {_s(r['enroll_agent_cpu_s'])} | {_s(r['unenroll_agent_cpu_s'])} |",
            f"| status writes | {r['enroll_status_writes']:.0f} "
            f"| {r['unenroll_status_writes']:.0f} |",
            f"| agent peak RSS | {r['agent_peak_rss_mib']:.0f} MiB | |",
            "",
            "| same pods, same run | wall | ours compared |",
            "|---|---|---|",
            f"| ours (kernel done) | {_s(r['enroll_kernel_wall_s'])} | |",
            f"| per-rule: one `iptables` process per chain and rule "
            f"({r['per_rule_processes_per_pod']} per pod) | {_s(r['per_rule_wall_s'])} "
            f"| ours is {faster:.2f}x as fast |",
            f"| floor: one empty `iptables-restore` + the netlink calls per pod "
            f"| {_s(r['floor_wall_s'])} | ours takes {r['ratio_ours_over_floor']:.2f}x "
            f"({r['ratio_ours_kernel_over_floor']:.2f}x to the kernel) |",
            "",
            "| target | result |",
            "|---|---|",
            f"| {r['pods']} pods enrolled in at most {TARGET_ENROLL_WALL_S:.0f} s "
            f"| {_s(r['enroll_wall_s'])}: {_met(r['enroll_wall_s'] <= TARGET_ENROLL_WALL_S)} |",
            f"| at least {TARGET_OVER_PER_RULE:.0f}x faster than per-rule "
            f"| {faster:.2f}x: {_met(faster >= TARGET_OVER_PER_RULE)} |",
            f"| within {TARGET_OVER_FLOOR:.0f}x the floor "
            f"| {r['ratio_ours_over_floor']:.2f}x: "
            f"{_met(r['ratio_ours_over_floor'] <= TARGET_OVER_FLOOR)} |",
        ]
    )


def event_table(r: dict[str, Any]) -> str:
    kernel, note = r["label_to_kernel_s"], r["label_to_annotation_s"]
    return "\n".join(
        [
            f"{r['pods']} pods over {r['nodes']} nodes; latency from the namespace label.",
            "",
            "| to | min | p50 | p95 | p99 | max |",
            "|---|---|---|---|---|---|",
            *(
                f"| {what} | "
                + " | ".join(_ms(v[k]) for k in ("min", "p50", "p95", "p99", "max"))
                + " |"
                for what, v in (
                    ("rules in the pod's netns (kernel)", kernel),
                    ("`redirection: enabled` annotation", note),
                )
            ),
            "",
            "| target | result |",
            "|---|---|",
            f"| event to kernel p99 under {TARGET_EVENT_P99_S:.0f} s at {r['pods']} pods "
            f"| {_ms(kernel['p99'])}: {_met(kernel['p99'] < TARGET_EVENT_P99_S)} |",
        ]
    )


def scale_table(r: dict[str, Any]) -> str:
    return "\n".join(
        [
            f"{r['nodes']} nodes, {r['pods']} pods in {r['namespaces']} namespaces; "
            f"{r['relabelled']} namespaces labelled ambient at once "
            f"({r['enrolled_after']} pods enrolled).",
            "",
            "| measure | value |",
            "|---|---|",
            f"| creating the objects (not the controller) | {_s(r['populate_s'])} |",
            f"| controller start to an AmbientNodeConfig per node | {_s(r['first_sync_s'])} |",
            f"| burst: labels patched to every spec converged | {_s(r['converge_s'])} |",
            f"| burst: spec writes | {r['spec_writes']:.0f} "
            f"(per node: max {r['spec_writes_per_node_max']}, "
            f"mean {r['spec_writes_per_node_mean']:.2f}) |",
            f"| burst: controller CPU | {_s(r['controller_burst_cpu_s'])} |",
            f"| controller CPU since start | {_s(r['controller_total_cpu_s'])} |",
            f"| controller peak RSS | {r['controller_peak_rss_mib']:.0f} MiB |",
            f"| restart: process start to every spec confirmed | {_s(r['restart_relist_s'])}"
            f" ({r['restart_writes']:.0f} writes, peak RSS "
            f"{r['restart_peak_rss_mib']:.0f} MiB) |",
            "",
            "| target | result |",
            "|---|---|",
            f"| converge under {TARGET_CONVERGE_S:.0f} s | {_s(r['converge_s'])}: "
            f"{_met(r['converge_s'] < TARGET_CONVERGE_S)} |",
            f"| peak RSS under 1 GiB | {r['controller_peak_rss_mib']:.0f} MiB: "
            f"{_met(r['controller_peak_rss_mib'] < TARGET_RSS_MIB)} |",
            f"| at most {TARGET_WRITES_PER_NODE} spec writes per node per burst "
            f"| {r['spec_writes_per_node_max']}: "
            f"{_met(r['spec_writes_per_node_max'] <= TARGET_WRITES_PER_NODE)} |",
        ]
    )


def watch_table(r: dict[str, Any]) -> str:
    share = r["agent_bytes"] / r["all_bytes"] if r["all_bytes"] else 0.0
    return "\n".join(
        [
            f"During the burst above, all {r['nodes']} AmbientNodeConfigs changed.",
            "",
            "| receiver | objects | bytes |",
            "|---|---|---|",
            f"| one agent (its own object only) | {r['agent_objects']:.0f} "
            f"| {r['agent_bytes']:.0f} |",
            f"| a watch of every object | {r['all_objects']} | {r['all_bytes']} |",
            "",
            f"The agent received {share:.2%} of the bytes.",
        ]
    )


def header(machine: dict[str, str], command: str, date: str) -> str:
    return "\n".join(
        [
            f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory']}, "
            f"Linux {machine['kernel']}.",
            f"Command: `{command}`. Date: {date}.",
        ]
    )


def replace_section(document: str, name: str, body: str) -> str:
    """Put `body` between `<!-- bench:name -->` and `<!-- /bench:name -->`."""
    pattern = re.compile(
        rf"(<!-- bench:{re.escape(name)} -->\n).*?(\n<!-- /bench:{re.escape(name)} -->)", re.S
    )
    if not pattern.search(document):
        raise ValueError(f"BENCHMARKS.md has no markers for {name!r}")
    return pattern.sub(lambda m: m.group(1) + body + m.group(2), document)
