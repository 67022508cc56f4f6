"""The APIs: /v1 (sessions REST); the Open Inference Protocol's core (``oip``) and its two transports,
/v2 REST (``v2``) and gRPC (``grpc``)."""
