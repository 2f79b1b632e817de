"""`ambient-cni sandbox status`: processes, then nodes and pods as kubectl shows them.

`-o wide` shows one address per node and pod (the first family's); a dual-stack
sandbox's status adds every address: the nodes' InternalIPs and pod CIDRs, and
the pods' podIPs.
"""

from __future__ import annotations

from pathlib import Path

from .cluster import SandboxCluster
from .lifecycle import leftovers
from .processes import tagged_pids
from .state import load_state


def _component(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    words = [a.decode(errors="replace") for a in argv if a]
    for module in ("ambient_cni.cli", "ambient_cni_sandbox"):  # an operator component, a helper
        if module in words:
            return " ".join(words[words.index(module) + 1 :])
    return Path(words[0]).name if words else "?"


def show_status(name: str) -> int:
    state = load_state(name)
    if state is None:
        found = leftovers(name)
        if found.empty:
            print(f"sandbox {name} is not up")
        else:
            print(
                f"sandbox {name} is not up, but left {found}; "
                f"remove it with: ambient-cni sandbox down --name {name}"
            )
        return 1
    print(f"sandbox {name}  created {state.created}  kubeconfig {state.kubeconfig}")
    print(
        f"api server https://127.0.0.1:{state.apiserver_port}  "
        f"pod network {state.topology.pod_network}  ip family {state.topology.ip_family}"
    )
    print("processes:")
    for pid in tagged_pids(name):
        print(f"  {pid:>7}  {_component(pid)}")
    cluster = SandboxCluster(state)
    result = cluster.kubectl("get", "nodes,pods", "-A", "-o", "wide", check=False)
    print(result.stdout, end="")
    if result.returncode != 0:
        print(f"kubectl failed: {result.stderr.strip()}")
        return 1
    if len(state.topology.ip_versions) > 1:
        print("\nevery family's addresses:")
        for kind, columns in ADDRESS_COLUMNS.items():
            listed = cluster.kubectl("get", kind, "-A", f"-o=custom-columns={columns}", check=False)
            print(listed.stdout if listed.returncode == 0 else listed.stderr, end="")
    return 0


# kubectl joins a list's entries with commas.
ADDRESS_COLUMNS = {
    "nodes": "NODE:.metadata.name,"
    'INTERNAL-IPS:.status.addresses[?(@.type=="InternalIP")].address,'
    "POD-CIDRS:.spec.podCIDRs[*]",
    "pods": "NAMESPACE:.metadata.namespace,POD:.metadata.name,POD-IPS:.status.podIPs[*].ip",
}
