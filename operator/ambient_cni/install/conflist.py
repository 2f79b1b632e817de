"""The node's CNI configuration with istio-cni in it: pure functions over parsed JSON.

The primary network is the one a container runtime uses: the first `.conf`,
`.conflist` or `.json` file of the conf dir in lexicographic order (containerd
and CRI-O both pick it that way). istio-cni goes last in its `plugins`; a
single-plugin `.conf` becomes a `.conflist` holding that plugin first. Every
key of every other plugin is kept as it was.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

PLUGIN_TYPE = "istio-cni"
CONFIG_EXTENSIONS = (".conf", ".conflist", ".json")

Config = dict[str, Any]


class CniConfigError(ValueError):
    """A config file that is not a CNI network configuration; the message says why."""


class PluginSettings(BaseModel):
    """What istio-cni's own entry says (Istio's key names where Istio has the setting)."""

    model_config = ConfigDict(frozen=True)

    agent_run_dir: str = "/var/run/istio-cni"
    exclude_namespaces: tuple[str, ...] = ("kube-system",)
    pod_namespace: str = "istio-system"
    agent_pod_prefix: str = "ambient-cni-node-"
    agent_timeout_seconds: float = Field(default=5.0, gt=0, le=60)

    def entry(self) -> Config:
        return {
            "type": PLUGIN_TYPE,
            "cni_agent_run_dir": self.agent_run_dir,
            "exclude_namespaces": list(self.exclude_namespaces),
            "pod_namespace": self.pod_namespace,
            "agent_pod_prefix": self.agent_pod_prefix,
            "agent_timeout_seconds": self.agent_timeout_seconds,
        }


def primary(file_names: Iterable[str], own: str | None = None) -> str | None:
    """The file a runtime would take: the first CNI config by name (our own excluded)."""
    candidates = sorted(
        name
        for name in file_names
        if name.endswith(CONFIG_EXTENSIONS) and name != own and not name.startswith(".")
    )
    return candidates[0] if candidates else None


def as_list(config: Mapping[str, Any]) -> Config:
    """A network config as a conflist: a single-plugin `.conf` becomes a list of one."""
    if not isinstance(config, Mapping):
        raise CniConfigError("not a JSON object")
    if "plugins" in config:
        if not isinstance(config["plugins"], list) or not all(
            isinstance(p, Mapping) and isinstance(p.get("type"), str) for p in config["plugins"]
        ):
            raise CniConfigError("`plugins` is not a list of plugin objects with a `type`")
        return copy.deepcopy(dict(config))
    if not isinstance(config.get("type"), str):
        raise CniConfigError("neither `plugins` nor a plugin `type`")
    plugin = {k: copy.deepcopy(v) for k, v in config.items() if k not in ("cniVersion", "name")}
    conflist: Config = {"name": config.get("name", "k8s-pod-network"), "plugins": [plugin]}
    if "cniVersion" in config:
        conflist["cniVersion"] = config["cniVersion"]
    return conflist


def with_plugin(config: Mapping[str, Any], settings: PluginSettings) -> Config:
    """The conflist with istio-cni last, exactly once, as `settings` say."""
    conflist = as_list(config)
    others = [p for p in conflist["plugins"] if p.get("type") != PLUGIN_TYPE]
    conflist["plugins"] = [*others, settings.entry()]
    return conflist


def without_plugin(config: Mapping[str, Any]) -> Config:
    """The conflist with no istio-cni entry."""
    conflist = as_list(config)
    conflist["plugins"] = [p for p in conflist["plugins"] if p.get("type") != PLUGIN_TYPE]
    return conflist
