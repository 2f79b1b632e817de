"""ZDS, the node agent <-> ztunnel protocol: message encoding, pure.

Proto3 wire format by hand for the handful of messages of
`istio.workload.zds` (reference section 2.6), with their exact field
numbers: one message per SOCK_SEQPACKET datagram, no length prefix. Unknown
fields are skipped, as protobuf requires, so newer peers still parse.
"""

from __future__ import annotations

from dataclasses import dataclass

ZDS_VERSION_V1 = 1

_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5


class ZdsDecodeError(ValueError):
    """A datagram that is not the message it should be."""


# -- messages -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ZdsHello:
    version: int = ZDS_VERSION_V1


@dataclass(frozen=True)
class WorkloadInfo:
    name: str = ""
    namespace: str = ""
    service_account: str = ""


@dataclass(frozen=True)
class AddWorkload:
    uid: str
    workload_info: WorkloadInfo | None = None


@dataclass(frozen=True)
class KeepWorkload:
    uid: str


@dataclass(frozen=True)
class DelWorkload:
    uid: str


@dataclass(frozen=True)
class SnapshotSent:
    pass


WorkloadRequest = AddWorkload | KeepWorkload | DelWorkload | SnapshotSent


@dataclass(frozen=True)
class Ack:
    error: str = ""  # non-empty: a NACK

    @property
    def ok(self) -> bool:
        return not self.error


# -- wire primitives -------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _bytes_field(field: int, data: bytes) -> bytes:
    return _key(field, _LENGTH) + _varint(len(data)) + data


def _string_field(field: int, value: str) -> bytes:
    return _bytes_field(field, value.encode()) if value else b""  # proto3 omits defaults


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ZdsDecodeError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ZdsDecodeError("varint too long")


def _fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, value) pairs; varints as int, length-delimited as bytes."""
    fields: list[tuple[int, int | bytes]] = []
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        field, wire_type = key >> 3, key & 7
        if field == 0:
            raise ZdsDecodeError("field number 0")
        if wire_type == _VARINT:
            value, pos = _read_varint(data, pos)
            fields.append((field, value))
        elif wire_type == _LENGTH:
            size, pos = _read_varint(data, pos)
            if pos + size > len(data):
                raise ZdsDecodeError(
                    f"field {field}: {size} bytes announced, {len(data) - pos} left"
                )
            fields.append((field, data[pos : pos + size]))
            pos += size
        elif wire_type in (_FIXED64, _FIXED32):
            pos += 8 if wire_type == _FIXED64 else 4
            if pos > len(data):
                raise ZdsDecodeError(f"field {field}: truncated fixed-width value")
        else:
            raise ZdsDecodeError(f"field {field}: unsupported wire type {wire_type}")
    return fields


def _string(fields: list[tuple[int, int | bytes]], number: int) -> str:
    value: int | bytes = b""
    for field, found in fields:
        if field == number:
            value = found  # the last one wins, as in protobuf
    if not isinstance(value, bytes):
        raise ZdsDecodeError(f"field {number} should be a string")
    try:
        return value.decode()
    except UnicodeDecodeError as exc:
        raise ZdsDecodeError(f"field {number} is not UTF-8") from exc


def _message(fields: list[tuple[int, int | bytes]], number: int) -> bytes | None:
    found: bytes | None = None
    for field, value in fields:
        if field == number:
            if not isinstance(value, bytes):
                raise ZdsDecodeError(f"field {number} should be a message")
            found = value
    return found


# -- encode and decode -------------------------------------------------------------------------


def encode_hello(hello: ZdsHello) -> bytes:
    return _key(1, _VARINT) + _varint(hello.version) if hello.version else b""


def decode_hello(data: bytes) -> ZdsHello:
    version = 0
    for field, value in _fields(data):
        if field == 1 and isinstance(value, int):
            version = value
    return ZdsHello(version=version)


def _encode_info(info: WorkloadInfo) -> bytes:
    return (
        _string_field(1, info.name)
        + _string_field(2, info.namespace)
        + _string_field(3, info.service_account)
    )


def encode_request(request: WorkloadRequest) -> bytes:
    if isinstance(request, AddWorkload):
        body = _string_field(1, request.uid)
        if request.workload_info is not None:
            body += _bytes_field(2, _encode_info(request.workload_info))
        return _bytes_field(1, body)
    if isinstance(request, DelWorkload):
        return _bytes_field(2, _string_field(2, request.uid))
    if isinstance(request, SnapshotSent):
        return _bytes_field(3, b"")
    return _bytes_field(5, _string_field(1, request.uid))


def decode_request(data: bytes) -> WorkloadRequest:
    fields = _fields(data)
    payloads = [(field, value) for field, value in fields if field in (1, 2, 3, 5)]
    if not payloads:
        raise ZdsDecodeError("WorkloadRequest without a payload")
    field, value = payloads[-1]  # oneof: the last one set wins
    if not isinstance(value, bytes):
        raise ZdsDecodeError(f"WorkloadRequest field {field} should be a message")
    inner = _fields(value)
    if field == 1:
        info_bytes = _message(inner, 2)
        info = None
        if info_bytes is not None:
            info_fields = _fields(info_bytes)
            info = WorkloadInfo(
                name=_string(info_fields, 1),
                namespace=_string(info_fields, 2),
                service_account=_string(info_fields, 3),
            )
        return AddWorkload(uid=_string(inner, 1), workload_info=info)
    if field == 2:
        return DelWorkload(uid=_string(inner, 2))
    if field == 3:
        return SnapshotSent()
    return KeepWorkload(uid=_string(inner, 1))


def encode_response(ack: Ack) -> bytes:
    return _bytes_field(1, _string_field(1, ack.error))


def decode_response(data: bytes) -> Ack:
    ack = _message(_fields(data), 1)
    if ack is None:
        raise ZdsDecodeError("WorkloadResponse without an ack")
    return Ack(error=_string(_fields(ack), 1))
