"""The Open Inference Protocol over gRPC: the .proto, its generated stubs, and the server (``server.py``).

The stubs register the ``inference`` package's messages in protobuf's default descriptor pool, as
``tritonclient.grpc`` (and KServe's own stubs) do with theirs: one process imports one of them, so the
service imports this package only when it serves gRPC, and clients (tests, benchmarks) use tritonclient's.
"""
