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


FLAGS = {  # flag -> setting; a flag given on the command line overrides its NTM_* variable
    "--host": "host",
    "--port": "port",
    "--grpc-port": "grpc_port",
    "--store": "store",
    "--model": "models",
    "--workers": "workers",
    "--device": "device",
    "--log-level": "log_level",
}


def settings_from_flags(argv: list[str] | None) -> Settings:
    """The settings: NTM_* variables, with the flags given on top (written back to the environment, so
    that uvicorn's worker processes, which build their own settings, see them too)."""
    fields = Settings.model_fields
    parser = argparse.ArgumentParser(prog="ntm-serve", description="Serve NTM few-shot models over HTTP and gRPC.")
    for flag, name in FLAGS.items():
        repeatable = name == "models"
        default = "the shipped model" if repeatable else fields[name].default
        parser.add_argument(
            flag,
            dest=name,
            action="append" if repeatable else "store",
            metavar="DIR" if repeatable else name.upper(),
            help=f"{fields[name].description or name} (NTM_{name.upper()}; default: {default})",
        )
    args = vars(parser.parse_args(argv))
    for name, value in args.items():
        if value is not None:
            os.environ[f"NTM_{name.upper()}"] = ",".join(value) if isinstance(value, list) else value
    return Settings()


def serve(argv: list[str] | None) -> int:
    settings = settings_from_flags(argv)
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
