"""Start-up benchmark: seconds from launching a server to its first 200 on /readyz, compiling or not.

``python -m bench.startup [--threads 2] [--json FILE]``

Starts the service on the shipped models (``default`` and ``fast``, the in-memory store) three
ways, one after the other: eager (NTM_COMPILE=0); compiling with an empty inductor cache
(``TORCHINDUCTOR_CACHE_DIR`` a new folder: every graph of the warm-up is compiled); and compiling
again with that cache filled (what a restart, or an image whose build ran the warm-up, sees).
Each time is from the process's launch to the first 200 of /readyz, so it counts the imports,
loading the weights and the warm-up of both models. A compiling server then loads, or builds
in the background, each model's one-row packages (``models.aot``); the seconds until
``/metrics`` says both are loaded are reported beside.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from bench.common import machine_load, markdown_table, write_json
from tests.servers import ServerProcess

TARGET_SECONDS = 30.0


def start_seconds(env: dict[str, str]) -> tuple[float, float | None]:
    """Launch a server with ``env``: seconds until /readyz answers 200 and, when it compiles, until
    its one-row packages are loaded (``models.aot``). It is stopped afterwards."""
    started = time.monotonic()
    server = ServerProcess(env)
    try:
        server.wait_ready(timeout=600)
        ready = time.monotonic() - started
        if env.get("NTM_COMPILE") != "1":
            return ready, None
        server.wait_packages(timeout=600)
        return ready, time.monotonic() - started
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.startup", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the server (NTM_THREADS)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    load = machine_load()
    base = {"NTM_THREADS": str(args.threads), "NTM_LOG_LEVEL": "warning"}
    with tempfile.TemporaryDirectory(prefix="ntm-inductor-") as cache:
        compiling = {**base, "NTM_COMPILE": "1", "TORCHINDUCTOR_CACHE_DIR": cache}
        runs = {
            "eager": start_seconds({**base, "NTM_COMPILE": "0"}),
            "compiled, empty cache": start_seconds(compiling),
            "compiled, cache filled": start_seconds(compiling),
        }
    seconds = {name: ready for name, (ready, _) in runs.items()}
    packages = {name: loaded for name, (_, loaded) in runs.items() if loaded is not None}
    rows = [
        [name, f"{ready:.1f}", "yes" if ready <= TARGET_SECONDS else "no", "" if loaded is None else f"{loaded:.1f}"]
        for name, (ready, loaded) in runs.items()
    ]
    print(f"## Start-up to ready, both shipped models ({args.threads} threads, load average {load:.2f})\n")
    print(markdown_table(["server", "seconds to ready", f"<= {TARGET_SECONDS:.0f} s", "seconds to packages"], rows))
    write_json(
        args.json, {"threads": args.threads, "load_average": load, "seconds": seconds, "packages_seconds": packages}
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
