from __future__ import annotations

from pathlib import Path

import pytest

from ambient_cni_sandbox.binaries import (
    BuildError,
    PinnedVersions,
    cache_key,
    gomod_dir,
    kube_ldflags,
    parse_pins,
)

GOMOD = """module x

require (
\tgithub.com/other v1.0.0 // indirect
\tgo.etcd.io/etcd/server/v3 v3.7.0
\thelm.sh/helm/v3 v3.22.0
\tk8s.io/kubernetes v1.37.2
)
"""


def test_parse_pins() -> None:
    assert parse_pins(GOMOD) == PinnedVersions(kubernetes="v1.37.2", etcd="v3.7.0", helm="v3.22.0")


def test_parse_pins_names_the_missing_module() -> None:
    with pytest.raises(BuildError, match=r"k8s\.io/kubernetes"):
        parse_pins(GOMOD.replace("k8s.io/kubernetes v1.37.2", ""))


def test_committed_gomod_pins_matching_staging_tags() -> None:
    text = (gomod_dir() / "go.mod").read_text()
    pins = parse_pins(text)
    staging = f"v0{pins.kubernetes[2:]}"  # v1.37.2 -> v0.37.2
    replaces = [line for line in text.splitlines() if "=> k8s.io/" in line]
    assert replaces, "staging modules must be pinned with replace lines"
    assert all(line.rstrip().endswith(staging) for line in replaces), replaces


def test_kube_ldflags_set_version_for_server_client_and_helm() -> None:
    flags = kube_ldflags(PinnedVersions("v1.37.2", "v3.7.0", "v3.22.0"), "2026-01-01T00:00:00Z")
    assert "-X k8s.io/component-base/version.gitVersion=v1.37.2" in flags
    assert "-X k8s.io/client-go/pkg/version.gitMinor=37" in flags
    assert "-X helm.sh/helm/v3/internal/version.version=v3.22.0" in flags
    assert "-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=37" in flags


def test_kube_ldflags_refuse_unparseable_version() -> None:
    with pytest.raises(BuildError, match="cannot parse"):
        kube_ldflags(PinnedVersions("main", "v3.7.0", "v3.22.0"), "now")


def test_cache_key_changes_with_every_input() -> None:
    base = cache_key(b"mod", b"sum", "go1.26")
    assert cache_key(b"mod", b"sum", "go1.26") == base
    assert (
        len(
            {
                base,
                cache_key(b"mod2", b"sum", "go1.26"),
                cache_key(b"mod", b"sum2", "go1.26"),
                cache_key(b"mod", b"sum", "go1.27"),
                cache_key(b"mo", b"dsum", "go1.26"),
            }
        )
        == 5
    )


def test_gomod_dir_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AMBIENT_CNI_GOMOD_DIR", str(tmp_path))
    assert gomod_dir() == tmp_path
