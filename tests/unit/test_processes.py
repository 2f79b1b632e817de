from __future__ import annotations

import os
import socket

from ambient_cni_sandbox.processes import listens_on


def test_listens_on_sees_a_listener_and_only_while_listening() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        port = server.getsockname()[1]
        assert not listens_on(os.getpid(), port)  # bound, not listening
        server.listen()
        assert listens_on(os.getpid(), port)
    assert not listens_on(os.getpid(), port)


def test_listens_on_a_missing_process_is_false() -> None:
    assert not listens_on(2**22 + 1, 80)
