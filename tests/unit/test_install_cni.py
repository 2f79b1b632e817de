"""install-cni: the conflist with istio-cni in it (pure), and the installer on real files."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest

from ambient_cni.install import installer as installer_module
from ambient_cni.install.conflist import (
    CniConfigError,
    PluginSettings,
    as_list,
    primary,
    with_plugin,
    without_plugin,
)
from ambient_cni.install.installer import OWN_CONFLIST, Installer, InstallOptions
from ambient_cni.install_report import (
    REPORT_FILE,
    STALE_AFTER,
    InstallReport,
    read_report,
    remove_report,
    write_report,
)

BRIDGE: dict[str, Any] = {
    "type": "bridge",
    "bridge": "cni0",
    "ipam": {"type": "host-local", "subnet": "10.244.0.0/24"},
    "vendorKey": {"kept": True},
}
CONFLIST = {"cniVersion": "1.0.0", "name": "k8s", "plugins": [BRIDGE, {"type": "portmap"}]}
SETTINGS = PluginSettings(agent_run_dir="/run/x", exclude_namespaces=("kube-system",))


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        (["10-calico.conflist", "05-cilium.conf", "README"], "05-cilium.conf"),
        (["99-loopback.conf", "10-flannel.conflist"], "10-flannel.conflist"),
        ([OWN_CONFLIST, "10-flannel.conflist"], "10-flannel.conflist"),
        ([".10-x.conflist.tmp", "notes.txt"], None),
    ],
)
def test_the_primary_config_is_the_first_by_name_as_runtimes_pick_it(
    files: list[str], expected: str | None
) -> None:
    assert primary(files, own=OWN_CONFLIST) == expected


def test_istio_cni_goes_last_once_and_every_other_key_is_kept() -> None:
    chained = with_plugin(CONFLIST, SETTINGS)
    assert [p["type"] for p in chained["plugins"]] == ["bridge", "portmap", "istio-cni"]
    assert chained["plugins"][0] == BRIDGE
    assert with_plugin(chained, SETTINGS) == chained  # idempotent
    assert without_plugin(chained) == CONFLIST


def test_a_single_conf_becomes_a_list_holding_its_plugin_first() -> None:
    conf = {"cniVersion": "0.4.0", "name": "net", **BRIDGE}
    assert as_list(conf) == {"cniVersion": "0.4.0", "name": "net", "plugins": [BRIDGE]}


@pytest.mark.parametrize("bad", [[], {"name": "x"}, {"plugins": "bridge"}, {"plugins": [{}]}])
def test_a_file_that_is_not_a_network_config_is_refused(bad: Any) -> None:
    with pytest.raises(CniConfigError):
        as_list(bad)


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path, Path]:
    conf, bin_dir = tmp_path / "net.d", tmp_path / "bin"
    conf.mkdir()
    bin_dir.mkdir()
    plugin = tmp_path / "istio-cni"
    plugin.write_bytes(b"\x7fELF plugin v1")
    return conf, bin_dir, plugin


def test_install_chains_converts_a_conf_writes_0600_and_copies_the_binary(
    dirs: tuple[Path, Path, Path],
) -> None:
    conf, bin_dir, plugin = dirs
    (conf / "10-net.conf").write_text(json.dumps({"cniVersion": "1.0.0", "name": "n", **BRIDGE}))
    installer = Installer(InstallOptions(bin_dir, conf, plugin, SETTINGS))

    state = installer.ensure()
    assert state.ready
    assert state.config == conf / "10-net.conflist"
    assert sorted(p.name for p in conf.iterdir()) == ["10-net.conflist"]
    written = json.loads((conf / "10-net.conflist").read_text())
    assert [p["type"] for p in written["plugins"]] == ["bridge", "istio-cni"]
    assert stat.S_IMODE((conf / "10-net.conflist").stat().st_mode) == 0o600
    assert (bin_dir / "istio-cni").read_bytes() == plugin.read_bytes()
    assert installer.ensure().changes == ()  # level-based: nothing to do the second time

    # The primary CNI rewrites its file: the next pass chains istio-cni again.
    (conf / "10-net.conflist").write_text(json.dumps(CONFLIST))
    assert installer.ensure().changes == (f"istio-cni chained last in {conf / '10-net.conflist'}",)


def test_without_a_primary_config_it_is_not_ready_and_says_why(
    dirs: tuple[Path, Path, Path],
) -> None:
    conf, bin_dir, plugin = dirs
    state = Installer(InstallOptions(bin_dir, conf, plugin, SETTINGS)).ensure()
    assert not state.ready
    assert "the primary CNI writes it" in state.problem


def test_uninstall_leaves_nothing_of_istio_cni(dirs: tuple[Path, Path, Path]) -> None:
    conf, bin_dir, plugin = dirs
    (conf / "10-net.conflist").write_text(json.dumps(CONFLIST))
    installer = Installer(InstallOptions(bin_dir, conf, plugin, SETTINGS))
    installer.ensure()

    assert installer.uninstall()
    assert json.loads((conf / "10-net.conflist").read_text()) == CONFLIST
    assert not (bin_dir / "istio-cni").exists()
    assert installer.uninstall() == []


def test_unchained_it_writes_the_primary_with_istio_cni_in_a_file_that_sorts_first(
    dirs: tuple[Path, Path, Path],
) -> None:
    conf, bin_dir, plugin = dirs
    (conf / "10-net.conflist").write_text(json.dumps(CONFLIST))
    Installer(InstallOptions(bin_dir, conf, plugin, SETTINGS, chained=False)).ensure()
    assert json.loads((conf / "10-net.conflist").read_text()) == CONFLIST  # untouched
    own = json.loads((conf / OWN_CONFLIST).read_text())
    assert [p["type"] for p in own["plugins"]] == ["bridge", "portmap", "istio-cni"]
    assert sorted(p.name for p in conf.iterdir())[0] == OWN_CONFLIST  # what a runtime takes


def test_a_rewrite_by_the_primary_cni_during_ours_is_not_lost(
    dirs: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    conf, bin_dir, plugin = dirs
    path = conf / "10-net.conflist"
    path.write_text(json.dumps(CONFLIST))
    rewritten = {**CONFLIST, "plugins": [*CONFLIST["plugins"], {"type": "bandwidth"}]}
    real_identity = installer_module._identity
    calls = {"n": 0}

    def identity(p: Path) -> Any:
        # Between our read and our rename, the primary CNI writes its file anew (once).
        calls["n"] += 1
        if calls["n"] == 2:
            path.write_text(json.dumps(rewritten))
        return real_identity(p)

    monkeypatch.setattr(installer_module, "_identity", identity)
    assert Installer(InstallOptions(bin_dir, conf, plugin, SETTINGS)).ensure().ready
    written = json.loads(path.read_text())
    assert [p["type"] for p in written["plugins"]] == [
        "bridge",
        "portmap",
        "bandwidth",
        "istio-cni",
    ]


def test_the_report_to_the_agent_round_trips_and_a_missing_or_bad_one_says_so(
    tmp_path: Path,
) -> None:
    assert read_report(tmp_path) == InstallReport(
        installed=False, message="install-cni has not reported (running?)"
    )
    report = InstallReport(installed=True, message="istio-cni is chained in /x")
    write_report(tmp_path, report)
    assert read_report(tmp_path) == report
    assert [p.name for p in tmp_path.iterdir()] == [REPORT_FILE]  # no temporary file left
    # Not renewed: install-cni is not running, and nobody keeps istio-cni in the chain.
    later = (tmp_path / REPORT_FILE).stat().st_mtime + STALE_AFTER + 5
    stale = read_report(tmp_path, now=later)
    assert not stale.installed
    assert stale.message.startswith("install-cni has not reported for 35 s (running?)")
    (tmp_path / REPORT_FILE).write_text("{not json")
    found = read_report(tmp_path)
    assert not found.installed
    assert found.message.startswith("install-cni's report is unreadable")
    remove_report(tmp_path)
    remove_report(tmp_path)  # idempotent
    assert not (tmp_path / REPORT_FILE).exists()
