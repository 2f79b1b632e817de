"""rtnetlink requests on one plain socket, with pyroute2's message classes for the encoding.

An IPRoute() session costs about 2 ms to set up (pyroute2 0.9 runs an event loop
for it), more than the kernel work of a pod's rule and route or of listing a
namespace's addresses; these run for every pod on every pass, so they go over
a plain socket made in the calling thread's namespace. The encoding and
decoding are pyroute2's; only the few lines of transport are written here.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import socket
import struct
from collections.abc import Iterator
from typing import Any

from pyroute2.netlink import (
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_EXCL,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    nlmsgerr,
)
from pyroute2.netlink.rtnl import RTM_GETADDR, RTM_NEWADDR
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg

from .errors import DataplaneError

_SEQUENCE = itertools.count(1)
CREATE = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
DELETE = NLM_F_REQUEST | NLM_F_ACK


@contextlib.contextmanager
def rtnetlink() -> Iterator[socket.socket]:
    """A NETLINK_ROUTE socket in this thread's network namespace."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.bind((0, 0))
        yield sock


def encoded(message: Any) -> bytes:
    """A message's bytes, to send many times (request() sets its flags and sequence)."""
    message.encode()
    return bytes(message.data)


def request(sock: socket.socket, message: bytes, flags: int) -> int:
    """Send one request and wait for its ack: 0, or the errno the kernel answered."""
    data = bytearray(message)
    struct.pack_into("=HI", data, 6, flags, next(_SEQUENCE))  # nlmsghdr: flags, then sequence
    sock.send(data)
    answer = nlmsgerr(sock.recv(65536))
    answer.decode()
    return -int(answer["error"])


def created(sock: socket.socket, message: bytes) -> bool:
    """Create exclusively: True if made, False if it was there (the kernel refuses a copy)."""
    code = request(sock, message, CREATE)
    if code in (0, errno.EEXIST):
        return code == 0
    raise DataplaneError("RoutingFailed", f"netlink: {os.strerror(code)}", retryable=True)


def deleted(sock: socket.socket, message: bytes) -> bool:
    """Delete: True if it was there, False if not."""
    code = request(sock, message, DELETE)
    if code in (0, errno.ENOENT, errno.ESRCH):
        return code == 0
    raise DataplaneError("RoutingFailed", f"netlink: {os.strerror(code)}", retryable=True)


def addresses() -> set[str]:
    """Every address of every link in this thread's namespace."""
    query = ifaddrmsg()
    query["header"]["type"] = RTM_GETADDR
    query["header"]["flags"] = NLM_F_REQUEST | NLM_F_DUMP
    query["header"]["sequence_number"] = next(_SEQUENCE)
    query["family"] = socket.AF_UNSPEC
    query.encode()
    found: set[str] = set()
    with rtnetlink() as sock:
        sock.send(query.data)
        while True:
            data = sock.recv(65536)
            offset = 0
            while offset < len(data):
                length, kind = struct.unpack_from("IH", data, offset)
                if kind in (NLMSG_DONE, NLMSG_ERROR):
                    return found
                if kind == RTM_NEWADDR:
                    message = ifaddrmsg(data[offset : offset + length])
                    message.decode()
                    if address := message.get_attr("IFA_ADDRESS"):
                        found.add(str(address))
                offset += (length + 3) & ~3


def address_message(ifindex: int, address: str, prefixlen: int) -> bytes:
    """RTM_NEWADDR for `address`/`prefixlen` on link `ifindex` (IPv6 only)."""
    message = ifaddrmsg()
    message["header"]["type"] = RTM_NEWADDR
    message["family"] = socket.AF_INET6
    message["prefixlen"] = prefixlen
    message["index"] = ifindex
    message["attrs"] = [("IFA_LOCAL", address), ("IFA_ADDRESS", address)]
    return encoded(message)
