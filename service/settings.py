"""The one settings object: every option of ``ntm-serve``, each also an NTM_* environment variable."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from models.allocator import DEFAULT_KEEP_MB

PRETRAINED_DIR = Path(__file__).resolve().parent.parent / "models" / "pretrained"  # served as "default"
FAST_DIR = Path(__file__).resolve().parent.parent / "models" / "fast"  # the faster, less accurate conv NTM


class Settings(BaseSettings):
    """Service configuration. Environment: NTM_<NAME>, e.g. NTM_STORE=redis://localhost:6379/0."""

    model_config = SettingsConfigDict(env_prefix="NTM_", extra="ignore")

    host: str = Field("127.0.0.1", description="the address to listen on (0.0.0.0: every interface)")
    port: int = Field(8000, ge=0, le=65535, description="the port to listen on")
    grpc_port: int = Field(
        8001,
        ge=0,
        le=65535,
        description="the port of the Open Inference Protocol over gRPC, on the same host (Triton's 8001); 0: no gRPC",
    )
    workers: int = Field(1, ge=1, description="uvicorn worker processes")
    models: Annotated[list[Path], NoDecode] = Field(
        default_factory=lambda: [PRETRAINED_DIR, FAST_DIR],
        description="checkpoint directories (config.json + model.safetensors); the first is the default "
        "(by default the shipped models: the accurate one as 'default', the fast one as 'fast')",
    )
    store: str = Field(
        "memory://",
        description="memory://, redis://host:port/db (rediss:// for TLS), or a Redis Cluster: "
        "redis+cluster://host:port[,host:port...] from any of its nodes (rediss+cluster:// for TLS)",
    )
    redis_prefix: str = Field("ntm:", description="key prefix for the Redis store (on a cluster: no hash tag)")
    redis_timeout_seconds: float = Field(
        1.0, gt=0, description="bound on each Redis operation, retries of a broken connection included"
    )
    device: str = Field("cpu", description="cpu, cuda or auto")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads (default: torch's)")
    malloc_keep_mb: int = Field(
        DEFAULT_KEEP_MB,
        ge=0,
        le=2047,
        description="freed heap that glibc keeps mapped for the next model call instead of returning it to the "
        "kernel (models.allocator); 0: glibc's defaults",
    )
    compile: bool = Field(
        True,
        description="compile each model's recurrent step with torch.compile before "
        "traffic (/readyz says 503 until then); 0: eager",
    )
    compile_package: bool = Field(
        True,
        description="with compile, on the CPU: load, or build in the background once ready, AOTInductor "
        "packages of the step for one session (models.aot), kept in inductor's cache folder; 0: none, one row eager",
    )

    session_ttl_seconds: float = Field(3600.0, gt=0, description="idle time before a session expires")
    max_session_ttl_seconds: float = Field(
        7 * 24 * 3600.0, gt=0, description="the longest ttl_seconds a client may ask for"
    )
    min_session_ttl_seconds: float = Field(
        1.0,
        gt=0,
        description="the shortest ttl_seconds a client may ask for: a session that expires before its "
        "creator's next request can reach it is of no use",
    )
    max_sessions: int = Field(
        100_000, ge=1, description="live sessions the store holds (with Redis: across all replicas); more -> 503"
    )
    sweep_interval_seconds: float = Field(
        30.0, gt=0, description="how often expired sessions are dropped from the store's indexes"
    )

    max_batch: int = Field(256, ge=1, description="largest micro-batch of session steps")
    max_wait_ms: float = Field(2.0, ge=0, description="how long a batch waits to fill under load")
    model_thread_nice: int = Field(
        10,
        ge=0,
        le=19,
        description="niceness of the model threads (Linux): on a core shared with the event loop, the loop "
        "answers and parses first and the model then runs fuller batches; 0 turns it off",
    )

    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    max_image_side: int = Field(512, ge=1)
    max_steps_per_request: int = Field(256, ge=1)
    max_predict_images: int = Field(256, ge=1, description="images in one read-only predict request")
    snapshot_key: SecretStr | None = Field(
        None,
        description="the secret that signs session snapshots (HMAC-SHA256); unset: a random key per process, so "
        "snapshots restore only in the process that made them",
    )
    max_snapshot_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="the largest snapshot a restore takes")

    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="API keys (comma-separated); none: open"
    )
    api_keys_file: Path | None = Field(None, description="file with one API key per line")
    metrics_require_key: bool = Field(False, description="whether /metrics needs an API key too")
    max_sessions_per_key: int = Field(10_000, ge=1, description="live sessions one API key may hold; more -> 429")
    max_steps_per_session: int = Field(
        1_000_000, ge=1, description="steps one session may take before it must be reset"
    )
    rate_limit_steps: str | None = Field(
        None,
        description="steps per API key (per client address with no keys), as the limits library writes it: "
        "'50/second', '1000/hour'; a batch of N steps or a prediction of N images counts N; unset: no limit",
    )
    rate_limit_sessions: str | None = Field(
        None, description="session creates per API key (per client address with no keys), e.g. '20/minute'"
    )
    rate_limit_strategy: Literal["moving-window", "fixed-window", "sliding-window-counter"] = Field(
        "moving-window",
        description="how the limits library counts: moving-window is exact and keeps an entry per unit of the "
        "limit; fixed-window and sliding-window-counter keep counters (fixed: bursts up to twice the limit "
        "across a window's edge; sliding: an estimate)",
    )

    log_level: str = Field("info", description="debug, info, warning or error (JSON logs on stderr)")
    access_log: bool = True
    otel_telemetry: bool = Field(
        False,
        description="FastAPI's native OpenTelemetry spans and metrics, for an app that configures an OTel SDK "
        "provider (the service's own metrics are Prometheus, at /metrics)",
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("rate_limit_steps", "rate_limit_sessions")
    @classmethod
    def _rate_limit(cls, value: str | None) -> str | None:
        """A rate the limits library parses (``limits.parse``), of at least one per window."""
        if value is None or not value.strip():
            return None
        from limits import parse

        try:
            item = parse(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a rate limit: write it as '50/second' or '1000 per hour'") from None
        if item.amount < 1:
            raise ValueError(f"{value!r} allows nothing: a rate limit allows at least 1 per window")
        return value

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, value: object) -> object:
        if isinstance(value, str):
            return [part for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        """Combinations that would serve wrongly: refused at start-up, not found out by clients."""
        if self.workers > 1 and self.store.startswith("memory://"):
            raise ValueError(
                f"workers={self.workers} needs a shared store (redis://host:port/db): with memory:// each worker "
                "process holds its own sessions, and a step reaching another worker would find none"
            )
        if not self.store.startswith("memory://"):
            self._cluster_fits()
        if self.grpc_port and self.grpc_port == self.port:
            raise ValueError(f"grpc_port ({self.grpc_port}) is the HTTP port too: give gRPC its own, or 0 for none")
        if self.session_ttl_seconds > self.max_session_ttl_seconds:
            raise ValueError(
                f"session_ttl_seconds ({self.session_ttl_seconds:g}) is over max_session_ttl_seconds "
                f"({self.max_session_ttl_seconds:g})"
            )
        if self.min_session_ttl_seconds > self.session_ttl_seconds:
            raise ValueError(
                f"min_session_ttl_seconds ({self.min_session_ttl_seconds:g}) is over session_ttl_seconds "
                f"({self.session_ttl_seconds:g})"
            )
        return self

    def _cluster_fits(self) -> None:
        """On a Redis Cluster: keys spread by hash tags of their own, the capacity shared by the index shards."""
        from service.sessions.redis import CLUSTER_SCHEMES, INDEX_SHARDS

        if not self.store.startswith(CLUSTER_SCHEMES):
            return
        if "{" in self.redis_prefix or "}" in self.redis_prefix:
            raise ValueError(
                f"redis_prefix ({self.redis_prefix!r}) holds a hash tag: on a Redis Cluster it would put every key "
                "in one slot, on one master"
            )
        if self.max_sessions < INDEX_SHARDS:
            raise ValueError(
                f"max_sessions ({self.max_sessions}) is under {INDEX_SHARDS}: on a Redis Cluster each of the "
                f"{INDEX_SHARDS} index shards holds its share of it, and some would hold none"
            )


def describe_settings_error(exc: ValidationError) -> str:
    """A settings error in one line, each problem named by its NTM_* variable where it has one."""
    parts = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(p) for p in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        parts.append(f"NTM_{where.upper()}: {message}" if where else message)
    return "; ".join(parts)
