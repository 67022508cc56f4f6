"""Session snapshots: what a session has learned, as one signed, versioned binary.

A snapshot carries the session's NTM state, its label slots and step counters, and the model
name and weights fingerprint the state belongs to. It is signed with HMAC-SHA256 (RFC 2104)
under the server's key, so a client can keep, share and restore it, but cannot hand the model a
state the server did not make. Layout (integers little-endian)::

    magic "NTMX" | format u16 | total length u32 | header length u32
    | header (UTF-8 JSON) | state (``PackedState.to_bytes``) | HMAC-SHA256 of all that precedes it (32 bytes)

The fixed fields are read only to tell "truncated" and "trailing bytes" from "tampered"; nothing
else is parsed before the signature has been checked in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from dataclasses import dataclass

from models.state import PackedState, StateFormatError

MAGIC = b"NTMX"
FORMAT_VERSION = 1
_FIXED = struct.Struct("<4sHII")  # magic, format, total length, header length
MAC_SIZE = hashlib.sha256().digest_size


class SnapshotError(ValueError):
    """Bytes that are not a snapshot this server made and can read; the message says why."""


@dataclass(frozen=True)
class SnapshotContent:
    """What a snapshot restores into a new session."""

    model: str
    fingerprint: str
    labels: list[str | int]
    pending_slot: int
    steps: int
    labeled_steps: int
    correct_steps: int
    state: PackedState


def encode_snapshot(content: SnapshotContent, key: bytes) -> bytes:
    header = json.dumps(
        {
            "model": content.model,
            "fingerprint": content.fingerprint,
            "labels": content.labels,
            "pending_slot": content.pending_slot,
            "steps": content.steps,
            "labeled_steps": content.labeled_steps,
            "correct_steps": content.correct_steps,
        },
        separators=(",", ":"),
    ).encode()
    state = content.state.to_bytes()
    total = _FIXED.size + len(header) + len(state) + MAC_SIZE
    body = _FIXED.pack(MAGIC, FORMAT_VERSION, total, len(header)) + header + state
    return body + hmac.new(key, body, hashlib.sha256).digest()


def decode_snapshot(data: bytes, key: bytes, max_bytes: int) -> SnapshotContent:
    """The content of a snapshot made with ``key``; ``SnapshotError`` naming the reason otherwise."""
    if len(data) > max_bytes:
        raise SnapshotError(f"the snapshot has {len(data)} bytes; this server takes at most {max_bytes}")
    if len(data) < _FIXED.size or data[:4] != MAGIC:
        raise SnapshotError("not a session snapshot (no NTMX header)")
    magic, version, total, header_length = _FIXED.unpack_from(data)
    if version != FORMAT_VERSION:
        raise SnapshotError(f"snapshot format version {version}; this server reads version {FORMAT_VERSION}")
    if len(data) < total:
        raise SnapshotError(f"the snapshot is truncated: {len(data)} of its {total} bytes")
    if len(data) > total:
        raise SnapshotError(f"the snapshot has {len(data) - total} bytes past its end")
    body, mac = data[:-MAC_SIZE], data[-MAC_SIZE:]
    if total < _FIXED.size + MAC_SIZE or not hmac.compare_digest(mac, hmac.new(key, body, hashlib.sha256).digest()):
        raise SnapshotError("the snapshot's signature does not match: it was altered, or signed by another server key")
    try:
        header = json.loads(body[_FIXED.size : _FIXED.size + header_length])
        state = PackedState.from_bytes(body[_FIXED.size + header_length :])
        return SnapshotContent(
            model=str(header["model"]),
            fingerprint=str(header["fingerprint"]),
            labels=list(header["labels"]),
            pending_slot=int(header["pending_slot"]),
            steps=int(header["steps"]),
            labeled_steps=int(header["labeled_steps"]),
            correct_steps=int(header["correct_steps"]),
            state=state,
        )
    except (ValueError, KeyError, TypeError, StateFormatError) as exc:  # signed by this key, yet unreadable
        raise SnapshotError(f"the snapshot is signed but unreadable: {exc}") from None
