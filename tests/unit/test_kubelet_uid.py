"""Finding kubelet's UID in a /proc tree, as the nftables probe rule needs it."""

from __future__ import annotations

from pathlib import Path

import pytest

from ambient_cni.dataplane.kubelet_uid import kubelet_uid


def process(proc: Path, pid: int, comm: str, argv: list[str], uid: int) -> None:
    entry = proc / str(pid)
    entry.mkdir()
    (entry / "comm").write_text(comm + "\n")
    (entry / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    (entry / "status").write_text(f"Name:\t{comm}\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n")


def test_the_kubelet_process_gives_its_real_uid(tmp_path: Path) -> None:
    process(tmp_path, 1, "systemd", ["/sbin/init"], 0)
    process(tmp_path, 40, "kubelet", ["/usr/bin/kubelet", "--config=/var/lib/kubelet"], 2000)
    (tmp_path / "self").mkdir()
    assert kubelet_uid(tmp_path) == 2000


def test_k3s_counts_as_kubelet_and_a_namesake_without_kubelet_in_argv_does_not(
    tmp_path: Path,
) -> None:
    process(tmp_path, 7, "kubelet", ["/opt/impostor"], 5)
    process(tmp_path, 9, "k3s", ["/usr/local/bin/k3s", "server"], 0)
    assert kubelet_uid(tmp_path) == 0


def test_no_kubelet_says_which_flag_to_pass(tmp_path: Path) -> None:
    process(tmp_path, 1, "systemd", ["/sbin/init"], 0)
    with pytest.raises(LookupError, match="--kubelet-uid"):
        kubelet_uid(tmp_path)
