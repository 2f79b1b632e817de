from __future__ import annotations

import pytest

from ambient_cni.agent.podnetns import pod_uid_from_cgroup

UID = "0b8f7c1e-4b8a-4f62-9f0e-5a4d2b0c9e11"
SYSTEMD = (
    "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-x.scope\n"
)


@pytest.mark.parametrize(
    ("cgroup", "uid"),
    [
        (SYSTEMD.format(UID.replace("-", "_")), UID),
        (f"12:memory:/kubepods/burstable/pod{UID}/0123abcd\n", UID),
        (f"0::/kubepods/pod{UID.upper()}/x\n", UID),
        ("0::/system.slice/sshd.service\n", None),
        ("0::/user.slice/pod-not-a-uid\n", None),
    ],
)
def test_pod_uid_from_cgroup(cgroup: str, uid: str | None) -> None:
    assert pod_uid_from_cgroup(cgroup) == uid
