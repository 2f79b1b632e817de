"""The CustomResourceDefinition of AmbientNodeConfig, generated from the pydantic models.

Pydantic's JSON schema is turned into a Kubernetes structural schema: $refs
inlined, optional fields (anyOf with null) reduced to their type, titles and
null defaults dropped. `ambient-cni crds` prints the result; crds/ holds the
committed copy and a test fails if it drifts.
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel

from .models import AmbientNodeConfigSpec, AmbientNodeConfigStatus
from .names import CATEGORY, CRD_NAME, GROUP, KIND, PLURAL, SHORT_NAME, SINGULAR, VERSION

Schema = dict[str, Any]

PRINTER_COLUMNS = [
    {"name": "Mode", "type": "string", "jsonPath": ".spec.redirectMode"},
    {"name": "Ztunnel", "type": "boolean", "jsonPath": ".status.ztunnel.connected"},
    {"name": "Enrolled", "type": "integer", "jsonPath": ".status.enrolled"},
    {"name": "Sidecars", "type": "integer", "jsonPath": ".status.sidecars"},
    {"name": "Pending", "type": "integer", "jsonPath": ".status.pending"},
    {"name": "Failed", "type": "integer", "jsonPath": ".status.failed"},
    {
        "name": "Ready",
        "type": "string",
        "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
    },
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]

_DROPPED_KEYS = {"title", "$defs"}


def structural(model: type[BaseModel]) -> Schema:
    """A model's JSON schema as a Kubernetes structural schema."""
    raw = model.model_json_schema(by_alias=True, mode="serialization")
    defs: dict[str, Schema] = raw.get("$defs", {})
    result: Schema = _convert(raw, defs)
    return result


def _convert(node: Any, defs: dict[str, Schema]) -> Any:
    if isinstance(node, list):
        return [_convert(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[1]]
        extra = {k: v for k, v in node.items() if k != "$ref"}
        return _convert({**target, **extra}, defs)
    any_of = node.get("anyOf")
    if any_of is not None:
        options = [o for o in any_of if o != {"type": "null"}]
        if len(options) != 1:
            raise ValueError(f"cannot express anyOf {any_of} in a structural schema")
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        return _convert({**options[0], **rest}, defs)
    out: Schema = {}
    for key, value in node.items():
        if key in _DROPPED_KEYS or (key == "default" and value is None):
            continue
        if key == "properties":
            out[key] = {name: _convert(prop, defs) for name, prop in value.items()}
        else:
            out[key] = _convert(value, defs)
    return out


def crd() -> Schema:
    spec = structural(AmbientNodeConfigSpec)
    spec["description"] = "Desired redirection state of one node, written by the controller."
    status = structural(AmbientNodeConfigStatus)
    status["description"] = "What the node agent applied and observed."
    schema: Schema = {
        "type": "object",
        "description": "Ambient mesh redirection for one node: desired (spec) and actual (status).",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
        "x-kubernetes-validations": [
            {
                "rule": "self.spec.nodeName == self.metadata.name",
                "message": "must equal metadata.name (one object per Node, named after it)",
                "fieldPath": ".spec.nodeName",
            }
        ],
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME},
        "spec": {
            "group": GROUP,
            "scope": "Cluster",
            "names": {
                "kind": KIND,
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": [SHORT_NAME],
                "categories": [CATEGORY],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": schema},
                }
            ],
        },
    }


def crd_yaml(*, for_chart: bool = False) -> str:
    """The CRD as YAML; the chart's copy is kept by `helm uninstall` (deleting a CRD
    would delete every AmbientNodeConfig with it)."""
    document = crd()
    command = "ambient-cni crds --chart" if for_chart else "ambient-cni crds"
    if for_chart:
        document["metadata"]["annotations"] = {"helm.sh/resource-policy": "keep"}
    header = f"# Generated from ambient_cni.api.models by `{command}`; do not edit.\n"
    return header + yaml.safe_dump(document, sort_keys=False, width=100)
