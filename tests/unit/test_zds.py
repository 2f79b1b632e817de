"""The ZDS codec against Google's protobuf runtime, built from the field numbers of section 2.6."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from ambient_cni.zds import (
    Ack,
    AddWorkload,
    DelWorkload,
    KeepWorkload,
    SnapshotSent,
    WorkloadInfo,
    WorkloadRequest,
    ZdsDecodeError,
    ZdsHello,
    decode_hello,
    decode_request,
    decode_response,
    encode_hello,
    encode_request,
    encode_response,
)

F = descriptor_pb2.FieldDescriptorProto


def _proto_classes() -> dict[str, Any]:
    file = descriptor_pb2.FileDescriptorProto(
        name="zds_test.proto", package="istio.workload.zds", syntax="proto3"
    )
    version = file.enum_type.add(name="Version")
    version.value.add(name="NOT_USED", number=0)
    version.value.add(name="V1", number=1)

    def message(name: str, *fields: tuple[str, int, int, str | None, int | None]) -> None:
        msg = file.message_type.add(name=name)
        if any(f[4] is not None for f in fields):
            msg.oneof_decl.add(name="payload")
        for field_name, number, kind, type_name, oneof in fields:
            field = msg.field.add(name=field_name, number=number, type=kind, label=F.LABEL_OPTIONAL)
            if type_name:
                field.type_name = f".istio.workload.zds.{type_name}"
            if oneof is not None:
                field.oneof_index = oneof

    message("ZdsHello", ("version", 1, F.TYPE_ENUM, "Version", None))
    message(
        "WorkloadInfo",
        ("name", 1, F.TYPE_STRING, None, None),
        ("namespace", 2, F.TYPE_STRING, None, None),
        ("service_account", 3, F.TYPE_STRING, None, None),
    )
    message(
        "AddWorkload",
        ("uid", 1, F.TYPE_STRING, None, None),
        ("workload_info", 2, F.TYPE_MESSAGE, "WorkloadInfo", None),
    )
    message("KeepWorkload", ("uid", 1, F.TYPE_STRING, None, None))
    message("DelWorkload", ("uid", 2, F.TYPE_STRING, None, None))
    message("SnapshotSent")
    message(
        "WorkloadRequest",
        ("add", 1, F.TYPE_MESSAGE, "AddWorkload", 0),
        ("del", 2, F.TYPE_MESSAGE, "DelWorkload", 0),
        ("snapshot_sent", 3, F.TYPE_MESSAGE, "SnapshotSent", 0),
        ("keep", 5, F.TYPE_MESSAGE, "KeepWorkload", 0),
    )
    message("Ack", ("error", 1, F.TYPE_STRING, None, None))
    message("WorkloadResponse", ("ack", 1, F.TYPE_MESSAGE, "Ack", 0))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    names = ["ZdsHello", "WorkloadRequest", "WorkloadResponse"]
    return {
        n: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"istio.workload.zds.{n}"))
        for n in names
    }


PB = _proto_classes()


def reference_request(request: WorkloadRequest) -> Any:
    msg = PB["WorkloadRequest"]()
    if isinstance(request, AddWorkload):
        msg.add.uid = request.uid
        if request.workload_info is not None:
            info = request.workload_info
            msg.add.workload_info.name = info.name
            msg.add.workload_info.namespace = info.namespace
            msg.add.workload_info.service_account = info.service_account
    elif isinstance(request, DelWorkload):
        getattr(msg, "del").uid = request.uid
    elif isinstance(request, KeepWorkload):
        msg.keep.uid = request.uid
    else:
        msg.snapshot_sent.SetInParent()
    return msg


REQUESTS: list[WorkloadRequest] = [
    AddWorkload("0b8f7c1e-4b8a", WorkloadInfo("web-1", "shop", "web")),
    AddWorkload("u", WorkloadInfo("n", "ns", "")),
    AddWorkload("u"),
    AddWorkload("ünïcode", WorkloadInfo("x" * 300, "ns", "sa")),  # multi-byte length varint
    DelWorkload("0b8f7c1e-4b8a"),
    KeepWorkload("0b8f7c1e-4b8a"),
    SnapshotSent(),
]


@pytest.mark.parametrize("request_", REQUESTS, ids=lambda r: type(r).__name__)
def test_requests_match_protobuf_both_ways(request_: WorkloadRequest) -> None:
    ours = encode_request(request_)
    theirs = reference_request(request_).SerializeToString()
    assert ours == theirs
    assert decode_request(theirs) == request_


@pytest.mark.parametrize("error", ["", "netns not found"])
def test_responses_match_protobuf(error: str) -> None:
    msg = PB["WorkloadResponse"]()
    msg.ack.error = error
    msg.ack.SetInParent()
    assert encode_response(Ack(error)) == msg.SerializeToString()
    assert decode_response(msg.SerializeToString()) == Ack(error)
    assert Ack(error).ok is (not error)


def test_hello() -> None:
    msg = PB["ZdsHello"](version=1)
    assert encode_hello(ZdsHello()) == msg.SerializeToString() == b"\x08\x01"
    assert decode_hello(b"\x08\x01") == ZdsHello(version=1)
    assert decode_hello(b"") == ZdsHello(version=0)


def test_known_bytes() -> None:
    assert encode_request(SnapshotSent()) == b"\x1a\x00"
    assert encode_request(DelWorkload("ab")) == b"\x12\x04\x12\x02ab"
    assert encode_response(Ack()) == b"\x0a\x00"


def test_unknown_fields_are_skipped() -> None:
    # An Add with an unknown varint field 9 and an unknown fixed32 field 10 around it.
    data = b"\x48\x05" + encode_request(AddWorkload("u")) + b"\x55\x01\x02\x03\x04"
    assert decode_request(data) == AddWorkload("u")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "without a payload"),
        (b"\x0a\x05\x0a\x01", "announced"),
        (b"\x0a", "truncated varint"),
        (b"\x08\x01", "should be a message"),
        (b"\x0a\x03\x0a\x01\xff", "not UTF-8"),
        (b"\x0b", "wire type 3"),
    ],
)
def test_malformed_requests_are_refused_clearly(data: bytes, message: str) -> None:
    with pytest.raises(ZdsDecodeError, match=message):
        decode_request(data)


def test_response_without_ack_is_refused() -> None:
    with pytest.raises(ZdsDecodeError, match="without an ack"):
        decode_response(b"")
