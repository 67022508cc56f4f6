"""``ntm-serve``: run the service under uvicorn. Every flag is also an NTM_* environment variable (and every
setting is one: see service.settings)."""

from __future__ import annotations

import argparse
import os
import sys

import uvicorn
from pydantic import ValidationError

from models.checkpoint import CheckpointError, load_checkpoint, load_config
from service.logs import configure_logging
from service.settings import Settings, describe_settings_error


def main(argv: list[str] | None = None) -> int:
    """Serve; 2 when the settings or a checkpoint cannot be served, with the reason on stderr."""
    try:
        return serve(argv)
    except ValidationError as exc:
        print(f"ntm-serve: invalid settings: {describe_settings_error(exc)}", file=sys.stderr)
        return 2


def serve(argv: list[str] | None) -> int:
    defaults = Settings()
    parser = argparse.ArgumentParser(prog="ntm-serve", description="Serve NTM few-shot models over HTTP.")
    parser.add_argument("--host", default=defaults.host)
    parser.add_argument("--port", type=int, default=defaults.port)
    parser.add_argument("--store", default=defaults.store, help="memory:// (default) or redis://host:port/db")
    parser.add_argument(
        "--model", action="append", default=None, help="checkpoint directory, repeatable; the shipped model when none"
    )
    parser.add_argument("--workers", type=int, default=defaults.workers)
    parser.add_argument("--device", default=defaults.device)
    parser.add_argument("--log-level", default=defaults.log_level)
    args = parser.parse_args(argv)
    overrides = {
        "host": args.host,
        "port": str(args.port),
        "store": args.store,
        "workers": str(args.workers),
        "device": args.device,
        "log_level": args.log_level,
    }
    if args.model:
        overrides["models"] = ",".join(args.model)
    for key, value in overrides.items():
        os.environ[f"NTM_{key.upper()}"] = value
    settings = Settings()
    configure_logging(settings.log_level)
    for path in settings.models:  # a bad checkpoint stops start-up here, with the file it names
        try:
            load_config(path)
            load_checkpoint(path)
        except CheckpointError as exc:
            print(f"ntm-serve: cannot serve {path}: {exc}", file=sys.stderr)
            return 2
    uvicorn.run(
        "service.app:app_from_env",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=30,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
