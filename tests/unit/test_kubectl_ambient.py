"""`kubectl ambient`'s pure core: every selection reason named, the pieces compared, and the
human formats pinned by golden files (tests/unit/golden/kubectl; regenerate with
AMBIENT_CNI_UPDATE_GOLDEN=1 and review the diff: a change in wording is a reviewed change)."""

from __future__ import annotations

import datetime
import io
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from ambient_cni.kubectl import human
from ambient_cni.kubectl.listing import pod_rows
from ambient_cni.kubectl.main import _selection, _split_pod, parser, run
from ambient_cni.kubectl.objects import ControllerInfo, NodeObject, controller_info, node_object
from ambient_cni.kubectl.overview import overview
from ambient_cni.kubectl.source import SourceError
from ambient_cni.kubectl.why import WhyReport, explain
from ambient_cni.selection import PodView, SelectionConfig
from ambient_cni.sidecar import ProxyFacts

GOLDEN = Path(__file__).parent / "golden" / "kubectl"
UPDATE = os.environ.get("AMBIENT_CNI_UPDATE_GOLDEN") == "1"
NOW = datetime.datetime(2026, 11, 26, 12, 0, 0, tzinfo=datetime.UTC)
CONFIG = SelectionConfig()
AMBIENT = {"istio.io/dataplane-mode": "ambient"}
REDIRECTION = "ambient.istio.io/redirection"
SIDECAR_STATUS = {"sidecar.istio.io/status": '{"containers":["istio-proxy"]}'}


def ago(seconds: int) -> str:
    return (NOW - datetime.timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")


def pod(name: str, **overrides: Any) -> PodView:
    base: dict[str, Any] = {
        "uid": f"uid-{name}",
        "name": name,
        "namespace": "shop",
        "node_name": "node-1",
        "ips": ("10.244.1.5",),
        "phase": "Running",
    }
    return PodView(**{**base, **overrides})


def entry(name: str, namespace: str = "shop", **extra: Any) -> dict[str, Any]:
    return {"uid": f"uid-{name}", "name": name, "namespace": namespace, **extra}


def condition(kind: str, ok: bool, reason: str, message: str = "") -> dict[str, Any]:
    return {
        "type": kind,
        "status": "True" if ok else "False",
        "reason": reason,
        "message": message,
        "lastTransitionTime": ago(600),
    }


def anc(
    name: str,
    *,
    spec: list[dict[str, Any]],
    status: list[dict[str, Any]] | None,
    generation: int = 3,
    observed: int = 3,
    ztunnel: bool = True,
    ready: tuple[bool, str, str] = (True, "AllEnrolled", ""),
) -> NodeObject:
    obj: dict[str, Any] = {
        "metadata": {"name": name, "uid": f"anc-{name}", "generation": generation},
        "spec": {"nodeName": name, "redirectMode": "inpod", "workloads": spec},
    }
    if status is not None:
        counts = {s: sum(1 for w in status if w["state"] == s) for s in ("Enrolled", "Pending")}
        obj["status"] = {
            "observedGeneration": observed,
            "mode": "inpod",
            "backend": "iptables-nft",
            "agentVersion": "0.1.0",
            "ztunnel": {
                "connected": ztunnel,
                "pod": f"istio-system/ztunnel-{name}" if ztunnel else None,
            },
            "enrolled": counts["Enrolled"],
            "pending": counts["Pending"],
            "failed": sum(1 for w in status if w["state"] == "Failed"),
            "workloads": status,
            "conditions": [condition("Ready", *ready)],
        }
    return node_object(obj)


IPS: dict[str, Any] = {"ips": ["10.244.1.5"]}
NODE_1 = anc(
    "node-1",
    spec=[entry("client", **IPS), entry("server", **IPS), entry("broken", **IPS)],
    status=[
        entry("client", state="Enrolled", reason="Enrolled", since=ago(250)),
        entry(
            "server",
            state="Enrolled",
            reason="Enrolled",
            since=ago(4000),
            lastRepair={
                "time": ago(30),
                "reason": "RulesDrifted",
                "message": "put back: 3 of our rules missing in mangle",
                "count": 3,
            },
        ),
        entry(
            "broken",
            state="Failed",
            reason="NetnsNotFound",
            message="the pod's network namespace is gone",
            since=ago(90),
        ),
    ],
    ready=(False, "NotReady", "1 workload(s) failed"),
)
ENABLED = {"ambient.istio.io/redirection": "enabled"}


# -- every reason of selection, named -------------------------------------------------------

REASONS: list[tuple[str, PodView, dict[str, str] | None, str, str]] = [
    ("NamespaceLabel", pod("client", annotations=ENABLED), AMBIENT, "Redirected", "labelled"),
    ("PodLabel", pod("p", labels=AMBIENT), {}, "Pending", "the pod is labelled"),
    ("ExcludedNamespace", pod("k", namespace="kube-system"), AMBIENT, "NotRedirected", "excluded"),
    ("HostNetwork", pod("h", host_network=True), AMBIENT, "NotRedirected", "hostNetwork: true"),
    ("SidecarPod", pod("s", annotations=SIDECAR_STATUS), AMBIENT, "NotRedirected", "sidecar"),
    (
        "ZtunnelPod",
        pod("z", namespace="istio-system", labels={"app": "ztunnel"}),
        None,
        "NotRedirected",
        "app=ztunnel",
    ),
    (
        "NodeAgentPod",
        pod("a", namespace="istio-system", labels={"k8s-app": "istio-cni-node"}),
        None,
        "NotRedirected",
        "node agent",
    ),
    ("Terminal", pod("t", phase="Succeeded"), AMBIENT, "NotRedirected", "phase Succeeded"),
    (
        "OptedOut",
        pod("o", labels={"istio.io/dataplane-mode": "none"}),
        AMBIENT,
        "NotRedirected",
        "=none",
    ),
    ("NotSelected", pod("n"), {}, "NotRedirected", "neither the pod nor namespace shop"),
    (
        "RedirectionDisabled",
        pod("d", annotations={"ambient.istio.io/redirection": "disabled"}),
        AMBIENT,
        "NotRedirected",
        "redirection=disabled",
    ),
    ("NotScheduled", pod("u", node_name=None, ips=()), AMBIENT, "NotRedirected", "not scheduled"),
    ("NoPodIP", pod("i", ips=()), AMBIENT, "NotRedirected", "no IP address yet"),
]


@pytest.mark.parametrize(
    ("reason", "view", "labels", "verdict", "words"), REASONS, ids=[r[0] for r in REASONS]
)
def test_why_names_the_rule_that_decided(
    reason: str, view: PodView, labels: dict[str, str] | None, verdict: str, words: str
) -> None:
    report = explain(view, labels, CONFIG, NODE_1)
    assert (report.reason, report.verdict) == (reason, verdict)
    assert words in report.rule


def test_why_compares_the_pieces() -> None:
    # Enrolled in status, but the annotation was never written: they disagree.
    report = explain(pod("client"), AMBIENT, CONFIG, NODE_1)
    assert (report.verdict, report.ok) == ("Inconsistent", False)
    assert codes(report) == ["AnnotationMissing"]
    # The spec still lists a pod that selection now leaves out (the controller lags).
    report = explain(pod("server", annotations=ENABLED), {}, CONFIG, NODE_1)
    assert report.verdict == "Inconsistent"
    assert codes(report) == ["ListedButNotSelected", "StillInStatus"]
    # Selected, not yet in the spec.
    report = explain(pod("new"), AMBIENT, CONFIG, NODE_1)
    assert report.verdict == "Pending"
    assert codes(report) == ["NotInSpec"]
    # Failed in status.
    report = explain(pod("broken"), AMBIENT, CONFIG, NODE_1)
    assert (report.verdict, report.status and report.status.reason) == ("Failed", "NetnsNotFound")
    # The node has no AmbientNodeConfig at all.
    report = explain(pod("lost", node_name="node-9"), AMBIENT, CONFIG, None)
    assert report.verdict == "Pending"
    assert [f.message for f in report.findings] == [
        "node node-9 has no AmbientNodeConfig: is the controller running?"
    ]


def codes(report: WhyReport) -> list[str]:
    return [f.code for f in report.findings]


def test_why_while_things_move() -> None:
    leaving = anc(
        "node-1",
        spec=[],
        status=[entry("old", state="Removing", reason="NetnsNotFound", since=ago(5))],
    )
    # Still redirected until it can be taken out: its annotation is right to say enabled.
    report = explain(pod("old", annotations=ENABLED), {}, CONFIG, leaving)
    assert (report.verdict, codes(report)) == ("Pending", [])
    # A leftover failure of a pod selection no longer wants is not "its redirection failed".
    failed_leftover = anc(
        "node-1", spec=[], status=[entry("gone", state="Failed", reason="NetnsNotFound")]
    )
    report = explain(pod("gone"), {}, CONFIG, failed_leftover)
    assert (report.verdict, codes(report)) == ("Inconsistent", ["StillInStatus"])
    # The agent has not reported on the spec that changed: wait, do not accuse.
    behind = anc(
        "node-1",
        spec=[entry("client", **IPS)],
        status=[entry("client", state="Enrolled", reason="Enrolled")],
        generation=4,
        observed=3,
    )
    report = explain(pod("client", annotations=ENABLED), {}, CONFIG, behind)
    assert (report.verdict, codes(report)) == ("Pending", ["AgentBehind", "ListedButNotSelected"])
    # `pending` is what the agent writes while ztunnel has not taken the pod.
    waiting = anc(
        "node-1",
        spec=[entry("w", **IPS)],
        status=[entry("w", state="Pending", reason="ZtunnelNotConnected")],
    )
    report = explain(pod("w", annotations={REDIRECTION: "pending"}), AMBIENT, CONFIG, waiting)
    assert (report.verdict, codes(report)) == ("Pending", [])
    # ... and a stale one on a pod nothing holds is said.
    report = explain(pod("x", annotations={REDIRECTION: "pending"}), {}, CONFIG, waiting)
    assert (report.verdict, codes(report)) == ("Inconsistent", ["AnnotationStale"])


def test_status_and_why_never_disagree() -> None:
    """Every pod `why` finds wrong is counted by `status`, under the same verdict."""
    # client: Enrolled, but its annotation is missing (it was written and removed by hand).
    others = [p for p in cluster_pods() if p.name != "client"]
    pods = [*others, pod("client"), pod("client-2"), pod("stray", annotations=ENABLED)]
    view = overview(
        [NODE_1, NODE_2],
        node_names=["node-1", "node-2"],
        pods=pods,
        namespace_labels=NAMESPACES,
        config=CONFIG,
        controller=LEADING,
        now=NOW,
    )
    by_node = {"node-1": NODE_1, "node-2": NODE_2}
    wrong = {
        f"{p.namespace}/{p.name}": r.verdict
        for p in pods
        if not (
            r := explain(p, NAMESPACES.get(p.namespace), CONFIG, by_node.get(p.node_name or ""))
        ).ok
    }
    counted = {name: g.state for g in view.not_enrolled for name in g.pods}
    assert counted == wrong
    assert wrong == {
        "shop/broken": "Failed",
        "shop/client": "Inconsistent",
        "shop/new": "Pending",
        "shop/client-2": "Pending",
        "shop/stray": "Pending",
    }


def test_a_node_without_agent_or_pods_is_shown_not_counted() -> None:
    idle = anc("node-3", spec=[], status=None)
    view = overview(
        [NODE_2, idle],
        node_names=["node-2", "node-3"],
        pods=[pod("db", namespace="data", node_name="node-2", annotations=ENABLED)],
        namespace_labels=NAMESPACES,
        config=CONFIG,
        controller=LEADING,
        now=NOW,
    )
    assert view.ready
    assert [(n.name, n.idle) for n in view.nodes] == [("node-2", False), ("node-3", True)]


def test_controller_leading_is_judged_on_the_api_servers_clock() -> None:
    lease = {"spec": {"holderIdentity": "c", "renewTime": ago(5), "leaseDurationSeconds": 15}}
    skewed_laptop = NOW + datetime.timedelta(minutes=3)
    assert controller_info(lease, server_time=NOW).leading(skewed_laptop)
    assert not controller_info(lease).leading(skewed_laptop)


@pytest.mark.parametrize(
    ("argument", "namespace", "explicit", "expected"),
    [
        ("web", "shop", False, ("shop", "web")),
        ("data/db", "shop", False, ("data", "db")),
        ("pod/web", "shop", False, ("shop", "web")),
        ("po/data/db", "shop", False, ("data", "db")),
        ("data/db", "data", True, ("data", "db")),
        ("data/db", "shop", True, "names namespace data, but -n says shop"),
        ("a/b/c", "shop", False, "'a/b/c': give a pod as"),
        ("pod/", "shop", False, "'pod/': give a pod as"),
    ],
)
def test_pod_arguments(
    argument: str, namespace: str, explicit: bool, expected: tuple[str, str] | str
) -> None:
    if isinstance(expected, tuple):
        assert _split_pod(argument, namespace, explicit) == expected
    else:
        with pytest.raises(SourceError, match=re.escape(expected)):
            _split_pod(argument, namespace, explicit)


def test_without_the_controllers_word_why_says_what_it_assumed() -> None:
    config, note = _selection(ControllerInfo(found=False, problem="no Lease x/y"), "istio-system")
    assert config == CONFIG
    assert note == (
        "the controller's configuration is unknown (no Lease x/y): decided with its defaults, "
        "excluded namespaces kube-system, system namespace istio-system"
    )
    report = explain(pod("web"), {}, config, NODE_1, note=note)
    assert human.why_text(report, NOW, PLAIN).splitlines()[-1] == f"Note: {note}"


def test_why_follows_the_controllers_configuration() -> None:
    """Excluded namespaces come from the controller's Lease, not from the plugin's defaults."""
    lease = {
        "metadata": {
            "annotations": {
                "cni.ambient.dev/version": "0.1.0",
                "cni.ambient.dev/excluded-namespaces": "kube-system,shop",
                "cni.ambient.dev/system-namespace": "istio-system",
            }
        },
        "spec": {"holderIdentity": "ctl-1", "renewTime": ago(1), "leaseDurationSeconds": 15},
    }
    info = controller_info(lease)
    assert info.leading(NOW)
    assert info.excluded_namespaces == ("kube-system", "shop")
    config = SelectionConfig(excluded_namespaces=frozenset(info.excluded_namespaces))
    assert explain(pod("x"), AMBIENT, config, NODE_1).reason == "ExcludedNamespace"


def test_a_malformed_node_config_is_reported_not_fatal() -> None:
    broken = node_object(
        {
            "metadata": {"name": "node-3", "generation": 1},
            "spec": {"nodeName": "node-3", "workloads": [{"uid": "x", "ips": ["not-an-ip"]}]},
        }
    )
    assert broken.spec is None
    assert "spec unreadable" in str(broken.problem)
    report = explain(pod("x", node_name="node-3"), AMBIENT, CONFIG, broken)
    assert any("spec unreadable" in f.message for f in report.findings)


# -- golden human output -------------------------------------------------------------------


def check_golden(name: str, text: str) -> None:
    golden = GOLDEN / name
    if UPDATE:
        golden.write_text(text)
    assert text == golden.read_text(), f"{golden} differs (AMBIENT_CNI_UPDATE_GOLDEN=1 to accept)"


PLAIN = human.Style(colour=False)


@pytest.mark.parametrize(
    ("golden", "view", "labels"),
    [
        ("why-redirected.txt", pod("server", annotations=ENABLED), AMBIENT),
        ("why-failed.txt", pod("broken"), AMBIENT),
        ("why-not-selected.txt", pod("web"), {"team": "web"}),
        ("why-inconsistent.txt", pod("client"), AMBIENT),
        (
            "why-sidecar.txt",
            pod(
                "legacy",
                annotations=SIDECAR_STATUS,
                proxy=ProxyFacts(annotations=SIDECAR_STATUS),
            ),
            {},
        ),
    ],
)
def test_why_reads_well(golden: str, view: PodView, labels: dict[str, str]) -> None:
    check_golden(golden, human.why_text(explain(view, labels, CONFIG, NODE_1), NOW, PLAIN))


NODE_2 = anc(
    "node-2",
    spec=[entry("db", namespace="data", **IPS)],
    status=[entry("db", namespace="data", state="Enrolled", reason="Enrolled", since=ago(7200))],
)
LEADING = ControllerInfo(holder="ambient-cni-controller-7d9f-x2", renewed=NOW, version="0.1.0")
NAMESPACES = {"shop": AMBIENT, "data": AMBIENT, "web": {}}


def cluster_pods() -> list[PodView]:
    return [
        pod("client", annotations=ENABLED),
        pod("server", annotations=ENABLED),
        pod("broken"),
        pod("new"),
        pod("db", namespace="data", node_name="node-2", annotations=ENABLED),
        pod("web", namespace="web", node_name="node-2"),
    ]


def test_status_healthy() -> None:
    view = overview(
        [NODE_2],
        node_names=["node-2"],
        pods=[pod("db", namespace="data", node_name="node-2", annotations=ENABLED)],
        namespace_labels=NAMESPACES,
        config=CONFIG,
        controller=LEADING,
        now=NOW,
    )
    assert (view.ready, view.problems) == (True, ())
    check_golden("status-healthy.txt", human.status_text(view, PLAIN, wide=False))


def test_status_broken() -> None:
    stale = anc("node-3", spec=[], status=[], generation=5, observed=4, ztunnel=False)
    orphan = anc("node-gone", spec=[], status=[])
    view = overview(
        [NODE_1, NODE_2, stale, orphan],
        node_names=["node-1", "node-2", "node-3", "node-4"],
        pods=cluster_pods(),
        namespace_labels=NAMESPACES,
        config=CONFIG,
        controller=LEADING,
        now=NOW,
    )
    assert not view.ready
    groups = {(g.state, g.reason): g.pods for g in view.not_enrolled}
    assert groups == {
        ("Failed", "NetnsNotFound"): ("shop/broken",),
        ("Pending", "NotInSpec"): ("shop/new",),
    }
    check_golden("status-broken.txt", human.status_text(view, PLAIN, wide=True))


def test_pods_lists_what_the_nodes_say() -> None:
    rows = pod_rows([NODE_1, NODE_2])
    assert [(r.namespace, r.name, r.state) for r in rows] == [
        ("data", "db", "Enrolled"),
        ("shop", "broken", "Failed"),
        ("shop", "client", "Enrolled"),
        ("shop", "server", "Enrolled"),
    ]
    assert [r.name for r in pod_rows([NODE_1, NODE_2], "data")] == ["db"]
    check_golden("pods-all.txt", human.pods_text(rows, NOW, PLAIN, all_namespaces=True, wide=False))
    check_golden(
        "pods-wide.txt",
        human.pods_text(pod_rows([NODE_1], "shop"), NOW, PLAIN, all_namespaces=False, wide=True),
    )


def test_colour_only_paints_and_keeps_columns_aligned() -> None:
    rows = pod_rows([NODE_1])
    plain = human.pods_text(rows, NOW, PLAIN, all_namespaces=False, wide=False)
    coloured = human.pods_text(
        rows, NOW, human.Style(colour=True), all_namespaces=False, wide=False
    )
    assert "\033[31mFailed\033[0m" in coloured
    assert coloured.replace("\033[31m", "").replace("\033[32m", "").replace("\033[0m", "") == plain


class FakeSource:
    """The API server's answers as the plugin's Protocol gives them (one function's test)."""

    def node_configs(self) -> list[NodeObject]:
        return [NODE_1, NODE_2]

    def node_config(self, node: str) -> NodeObject | None:
        return {"node-1": NODE_1, "node-2": NODE_2}.get(node)

    def node_names(self) -> list[str]:
        return ["node-1", "node-2"]

    def pods(self) -> list[PodView]:
        return cluster_pods()

    def pod(self, namespace: str, name: str) -> PodView | None:
        return next((p for p in cluster_pods() if (p.namespace, p.name) == (namespace, name)), None)

    def namespace_labels(self, namespace: str) -> dict[str, str] | None:
        return NAMESPACES.get(namespace)

    def all_namespace_labels(self) -> dict[str, dict[str, str]]:
        return NAMESPACES

    def controller(self, namespace: str) -> ControllerInfo:
        return LEADING


def command(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    args = parser().parse_args(argv)
    return run(args, FakeSource(), "shop", NOW, out), out.getvalue()


def test_exit_codes_and_stable_json() -> None:
    assert command("why", "server")[0] == 0
    assert command("why", "data/db")[0] == 0
    assert command("why", "pod/broken")[0] == 1
    assert command("status")[0] == 1
    code, text = command("pods", "-o", "json")
    assert code == 0
    items = json.loads(text)["items"]
    assert [i["name"] for i in items] == ["broken", "client", "server"]
    assert list(items[0]) == [
        "namespace", "name", "uid", "node", "mode", "state", "reason", "message", "since",
        "ips", "lastRepair",
    ]  # fmt: skip
    code, text = command("why", "shop/server", "-o", "json")
    data = json.loads(text)
    assert (data["verdict"], data["ok"], data["listedInSpec"]) == ("Redirected", True, True)
