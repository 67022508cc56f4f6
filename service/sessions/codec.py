"""A session record as two compact values: a small JSON header and the raw float32 state.

Header (format version 1): the record's fields but the state, so a replica can refuse a
state made by other weights (``fingerprint``) before decoding it, and answer a retry from
``last_response``. The state is ``PackedState.to_bytes`` (23,288 bytes for the default model).
"""

from __future__ import annotations

import dataclasses
import json

from models import PackedState
from service.sessions.store import SessionRecord

RECORD_FORMAT_VERSION = 1


class RecordFormatError(ValueError):
    """Stored bytes that are not a session record this code can read."""


def encode_header(record: SessionRecord) -> bytes:
    fields = {f.name: getattr(record, f.name) for f in dataclasses.fields(record) if f.name != "state"}
    return json.dumps({"format": RECORD_FORMAT_VERSION, **fields}, separators=(",", ":")).encode()


def decode_record(header: bytes, state: bytes) -> SessionRecord:
    try:
        fields = json.loads(header)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: deeply nested JSON
        raise RecordFormatError(f"unreadable session header: {exc}") from None
    if not isinstance(fields, dict) or fields.pop("format", None) != RECORD_FORMAT_VERSION:
        raise RecordFormatError("session header of an unknown format version")
    try:
        return SessionRecord(state=PackedState.from_bytes(state), **fields)
    except (TypeError, ValueError) as exc:
        raise RecordFormatError(f"unreadable session record: {exc}") from None
