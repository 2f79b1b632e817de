"""The committed CRD is what the models generate, and the models validate like the schema."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from ambient_cni.api.crd import crd, crd_yaml
from ambient_cni.api.models import AmbientNodeConfigSpec, Workload

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / "crds" / "ambientnodeconfigs.cni.ambient.dev.yaml"
CHART_COPY = REPO / "charts" / "istio-cni" / "templates" / "crd-ambientnodeconfigs.yaml"


def test_committed_crd_matches_the_models() -> None:
    assert COMMITTED.read_text() == crd_yaml(), (
        "crds/ drifted from ambient_cni.api.models: run "
        "`ambient-cni crds > crds/ambientnodeconfigs.cni.ambient.dev.yaml`"
    )


def test_chart_crd_matches_the_models_and_is_kept_on_uninstall() -> None:
    assert CHART_COPY.read_text() == crd_yaml(for_chart=True), (
        f"{CHART_COPY} drifted: run `ambient-cni crds --chart > {CHART_COPY.relative_to(REPO)}`"
    )
    assert yaml.safe_load(CHART_COPY.read_text())["metadata"]["annotations"] == {
        "helm.sh/resource-policy": "keep"
    }


def test_crd_names_columns_and_subresource() -> None:
    doc = crd()
    spec = doc["spec"]
    assert spec["scope"] == "Cluster"
    assert spec["names"]["shortNames"] == ["anc"]
    assert spec["names"]["categories"] == ["ambient"]
    version = spec["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert [c["name"].upper() for c in version["additionalPrinterColumns"]] == [
        "MODE",
        "ZTUNNEL",
        "ENROLLED",
        "SIDECARS",
        "PENDING",
        "FAILED",
        "READY",
        "AGE",
    ]


def test_schema_is_structural() -> None:
    text = yaml.safe_dump(crd())
    for forbidden in ("$ref", "anyOf", "title:", "null"):
        assert forbidden not in text
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    spec = schema["properties"]["spec"]
    assert spec["required"] == ["nodeName"]
    assert spec["properties"]["redirectMode"]["enum"] == ["inpod", "node"]
    workload = spec["properties"]["workloads"]["items"]
    assert workload["required"] == ["uid", "name", "namespace", "ips"]
    assert "isIP(self)" in str(workload["properties"]["ips"]["items"])


@pytest.mark.parametrize(
    "bad",
    [
        {"uid": "u", "name": "n", "namespace": "ns", "ips": ["10.0.0.300"]},
        {"uid": "u", "name": "n", "namespace": "ns", "ips": []},
        {"uid": "", "name": "n", "namespace": "ns", "ips": ["10.0.0.1"]},
        {"name": "n", "namespace": "ns", "ips": ["10.0.0.1"]},
    ],
)
def test_models_refuse_what_the_schema_refuses(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        Workload.model_validate(bad)


def test_spec_round_trips_through_the_wire_form() -> None:
    wire = {
        "nodeName": "node-1",
        "redirectMode": "inpod",
        "dnsCapture": True,
        "ztunnel": {
            "name": "zt",
            "namespace": "istio-system",
            "uid": "z",
            "ip": "fd00::1",
            "ready": True,
        },
        "workloads": [
            {
                "uid": "u",
                "name": "n",
                "namespace": "ns",
                "serviceAccount": "sa",
                "ips": ["10.0.0.1"],
            }
        ],
    }
    assert AmbientNodeConfigSpec.model_validate(wire).to_wire() == wire
