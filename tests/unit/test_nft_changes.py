"""Reading the kernel's nftables announcements, from captured datagrams, and telling the
agent's own commits from others'; and the policy routing changes that count. No root: the
captures were made with `nft add table` and `iptables-nft -A` in a namespace watched by
nft_changes._subscribed_sockets (Linux 6.18)."""

from __future__ import annotations

import os
import struct
import threading
import time
from pathlib import Path

import pytest

from ambient_cni.dataplane import factory, nft_changes
from ambient_cni.dataplane.nft_changes import (
    NFNL_SUBSYS_NFTABLES,
    NFT_MSG_NEWGEN,
    NFTA_GEN_PROC_PID,
    RTM_DELROUTE,
    RTM_DELRULE,
    RTM_NEWROUTE,
    RTM_NEWRULE,
    OwnWriter,
    committer,
    foreign_commit,
    messages,
    routing_changed,
)
from ambient_cni.dataplane.runner import Children
from ambient_cni.netns import NetnsWorkers

# `nft add table inet cap`: the NEWTABLE datagram, then the NEWGEN one (committed by pid 9428).
ADD_TABLE = bytes.fromhex(
    "38000000000a000001000000d424000001000002080001006361700008000300000000000c00040000000000"
    "000000010800020000000000"
)
ADD_TABLE_GEN = bytes.fromhex(
    "2c0000000f0a000001000000d424000000000002080001000000000208000200000024d4080003006e667400"
)
# `iptables-nft -t nat -A OUTPUT -j ACCEPT` (pid 9430): table, chain and rule in one datagram.
IPTABLES_GEN = bytes.fromhex(
    "380000000f0a000002000000d624000000000003080001000000000308000200000024d61100030069707461"
    "626c65732d6e667400000000"
)


def test_each_message_of_a_datagram_is_read_with_its_type() -> None:
    assert [(kind >> 8, kind & 0xFF) for kind, _ in messages(ADD_TABLE)] == [
        (NFNL_SUBSYS_NFTABLES, 0)  # NFT_MSG_NEWTABLE
    ]
    [(kind, payload)] = messages(ADD_TABLE_GEN)
    assert kind == NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWGEN
    assert committer(payload) == 9428
    [(_, payload)] = messages(IPTABLES_GEN)
    assert committer(payload) == 9430


def test_a_truncated_or_empty_datagram_reads_as_what_it_holds() -> None:
    assert list(messages(b"")) == []
    assert list(messages(ADD_TABLE_GEN[:20])) == []
    assert committer(b"\x00\x00\x00\x00\x02\x00") is None


def test_a_commit_is_news_unless_the_agent_made_it() -> None:
    def nobody(_pid: int) -> bool:
        return False

    assert not foreign_commit(ADD_TABLE, nobody)  # its NEWGEN is still to come
    assert foreign_commit(ADD_TABLE_GEN, nobody)
    assert not foreign_commit(ADD_TABLE_GEN, lambda pid: pid == 9428)
    assert foreign_commit(IPTABLES_GEN, lambda pid: pid == 9428)
    assert foreign_commit(ADD_TABLE_GEN + IPTABLES_GEN, lambda pid: pid == 9428)


def test_own_writers_are_the_agents_threads_and_the_children_it_started(tmp_path: Path) -> None:
    me = os.getpid()
    proc = tmp_path / "proc"
    (proc / str(me) / "task" / "7001").mkdir(parents=True)  # a thread of ours
    (proc / "7002").mkdir()
    (proc / "7002" / "stat").write_text(f"7002 (iptables-restor) S {me} 1 1 0")  # our child
    (proc / "7003").mkdir()
    (proc / "7003" / "stat").write_text("7003 (nft) S 4242 1 1 0")  # someone else's
    children = Children()
    children.started(7004)
    children.exited(7004)  # gone and reaped before its commit was read: still ours
    own = OwnWriter(proc, children)
    assert own(me)
    assert own(7001)
    assert own(7002)
    assert not own(7003)
    assert own(7004)
    assert not own(7005)  # not there at all


def test_in_a_pid_namespace_of_its_own_the_agent_knows_itself_by_the_hosts_numbers(
    tmp_path: Path,
) -> None:
    host = tmp_path / "host-proc"  # the host's /proc, mounted at /host/proc
    (host / "4242" / "task" / "4250").mkdir(parents=True)  # the agent's thread, host numbering
    (host / "self").symlink_to("4242")
    (host / "4300").mkdir()
    (host / "4300" / "stat").write_text("4300 (iptables-restor) S 4242 1 1 0")  # its child
    (host / "7004").mkdir()
    (host / "7004" / "stat").write_text("7004 (nft) S 1 1 1 0")  # someone else's
    children = Children()
    children.started(7004)  # the agent's own child, by the container's numbering
    own = OwnWriter(host, children)
    assert own.pid == 4242
    assert own(4242)
    assert own(4250)
    assert own(4300)
    assert not own(os.getpid())
    assert not own(7004), "a PID from the container's numbering must not match the host's"


def test_a_child_is_remembered_a_while_after_it_exits(monkeypatch: pytest.MonkeyPatch) -> None:
    children = Children()
    children.started(11)
    assert 11 in children
    children.exited(11)
    assert 11 in children
    later = time.monotonic() + Children.KEEP + 1
    monkeypatch.setattr(time, "monotonic", lambda: later)
    assert 11 not in children


@pytest.mark.skipif(os.geteuid() != 0, reason="entering a namespace (even our own) needs root")
def test_a_call_from_a_pool_thread_into_the_same_pool_does_not_wait_on_itself() -> None:
    # One worker: a nested call queued behind its caller would wait forever.
    pool = NetnsWorkers(1, name="nested")
    here = "/proc/self/ns/net"
    result: list[tuple[int, int]] = []
    ident = threading.get_ident

    def outer() -> None:
        result.append(pool.run(here, lambda: (ident(), pool.run(here, ident))))

    caller = threading.Thread(target=outer, daemon=True)
    caller.start()
    caller.join(timeout=10)
    try:
        assert not caller.is_alive(), "the nested call waited on its own pool"
        assert result[0][0] != result[0][1]  # the inner call had a thread of its own
    finally:
        pool.close()


def _rtnl(kind: int, table: int = 0) -> bytes:
    """One rtnetlink message: a header, then an rtmsg (or fib_rule_hdr) whose fifth byte
    is the table."""
    body = bytes([2, 0, 0, 0, table, 0, 0, 0]) + b"\x00" * 4
    return struct.pack("=IHHII", 16 + len(body), kind, 0, 0, 0) + body


def test_a_rule_or_a_route_in_the_redirections_table_is_a_routing_change() -> None:
    assert routing_changed(_rtnl(RTM_NEWRULE, 100))
    assert routing_changed(_rtnl(RTM_DELRULE, 100))
    assert routing_changed(_rtnl(RTM_DELROUTE, 100))
    assert routing_changed(_rtnl(RTM_NEWROUTE, 254) + _rtnl(RTM_NEWROUTE, 100))
    assert not routing_changed(_rtnl(RTM_NEWROUTE, 254))  # the main table: not ours
    assert not routing_changed(_rtnl(RTM_DELROUTE, 255))  # local: an address came or went
    assert not routing_changed(b"")


def test_each_backend_says_whether_the_kernel_announces_its_changes() -> None:
    assert factory.build("iptables-legacy").changes is None  # polled
    for backend in ("iptables-nft", "nftables"):
        changes = factory.build(backend).changes
        assert changes is not None
        assert changes.announces
        changes.close()


def test_an_attribute_cut_short_reads_as_unknown_not_an_error() -> None:
    # nfgenmsg, then an attribute header claiming a 4-byte value the datagram lacks.
    header_only = b"\x00\x00\x00\x00" + struct.pack("=HH", 8, NFTA_GEN_PROC_PID)
    assert committer(header_only) is None


def test_a_kernel_that_cannot_name_namespaces_is_said_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    nft_changes._without_generations.cache_clear()
    monkeypatch.setattr(nft_changes, "SO_NETNS_COOKIE", 0x7FFF)  # as on Linux before 5.14
    with caplog.at_level("WARNING", logger="ambient_cni.dataplane.nft_changes"):
        assert nft_changes.generation() is None
        assert nft_changes.generation() is None
    said = [r.getMessage() for r in caplog.records if "generations" in r.getMessage()]
    assert len(said) == 1, said
    assert "each re-check of a pod reads its rules" in said[0]
    nft_changes._without_generations.cache_clear()
