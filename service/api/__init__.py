"""HTTP APIs: /v1 (sessions REST) and /v2 (Open Inference Protocol)."""
