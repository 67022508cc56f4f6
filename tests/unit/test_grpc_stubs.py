"""The committed gRPC stubs are what the .proto generates, and the .proto is the wire tritonclient.grpc speaks.

The first test regenerates the stubs into a scratch folder with grpcio-tools (the pinned version of the
test extra) and compares them with the committed ones byte for byte: a .proto edited without
``make grpc-stubs`` fails here. The second compiles the .proto to descriptors (never into protobuf's
default pool, which tritonclient's messages occupy in this process) and compares every message and
method the service implements with tritonclient's own generated module, field by field.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from grpc_tools import protoc
from tritonclient.grpc import service_pb2 as triton_pb2

ROOT = Path(__file__).resolve().parents[2]
PROTO = Path("service/api/grpc/grpc_predict_v2.proto")
GENERATED = ("grpc_predict_v2_pb2.py", "grpc_predict_v2_pb2.pyi", "grpc_predict_v2_pb2_grpc.py")
METHODS = (
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelInfer",
    "ModelStreamInfer",
)


def compile_proto(scratch: Path, *outputs: str) -> None:
    """protoc on a copy of the .proto at its place in the package, so that the imports it writes are the same."""
    (scratch / PROTO).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / PROTO, scratch / PROTO)
    assert protoc.main(["grpc_tools.protoc", f"-I{scratch}", *outputs, str(scratch / PROTO)]) == 0


def test_committed_stubs_are_fresh(tmp_path: Path) -> None:
    out = str(tmp_path)
    compile_proto(tmp_path, f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}")
    for name in GENERATED:
        fresh = (tmp_path / PROTO.parent / name).read_text()
        committed = (ROOT / PROTO.parent / name).read_text()
        assert committed == fresh, f"{PROTO.parent / name} is stale: run `make grpc-stubs` and commit the result"


def message_fields(message: descriptor_pb2.DescriptorProto) -> dict:
    """A message as the wire sees it: each field's number, type, label and message type, nested messages too."""
    return {
        "fields": {f.name: (f.number, f.type, f.label, f.type_name, f.HasField("oneof_index")) for f in message.field},
        "nested": {nested.name: message_fields(nested) for nested in message.nested_type},
    }


@pytest.fixture(scope="module")
def ours(tmp_path_factory: pytest.TempPathFactory) -> descriptor_pb2.FileDescriptorProto:
    scratch = tmp_path_factory.mktemp("proto")
    compile_proto(scratch, f"--descriptor_set_out={scratch / 'set.pb'}")
    files = descriptor_pb2.FileDescriptorSet.FromString((scratch / "set.pb").read_bytes())
    (ours,) = files.file
    return ours


def test_the_wire_is_tritonclients(ours: descriptor_pb2.FileDescriptorProto) -> None:
    theirs = descriptor_pb2.FileDescriptorProto()
    triton_pb2.DESCRIPTOR.CopyToProto(theirs)
    assert ours.package == theirs.package == "inference"
    (service,) = ours.service
    (triton_service,) = [s for s in theirs.service if s.name == service.name == "GRPCInferenceService"]

    def methods(svc: descriptor_pb2.ServiceDescriptorProto) -> dict:
        return {
            m.name: (m.input_type, m.output_type, m.client_streaming, m.server_streaming)
            for m in svc.method
            if m.name in METHODS
        }

    assert methods(service) == methods(triton_service) and set(methods(service)) == set(METHODS)
    assert len(service.method) == len(METHODS)
    their_messages = {m.name: m for m in theirs.message_type}
    for message in ours.message_type:
        assert message_fields(message) == message_fields(their_messages[message.name]), message.name
