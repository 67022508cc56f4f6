"""Just enough of Docker to check our Dockerfile without a Docker engine.

A Dockerfile parser (instructions, stages, ARG/ENV variables), Docker's .dockerignore matching,
and a replay of one build stage on the host: the build context as Docker would send it, the
stage's COPY lines into a scratch "root" directory, and its RUN lines as shell commands there.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

# ------------------------------------------------------------------------------------- parsing


@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    args: str  # the rest of the instruction, continuation lines joined
    line: int  # 1-based line of the instruction's first line


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def find(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


@dataclass
class Dockerfile:
    global_args: list[Instruction]
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"no stage named {name!r}")


def parse_dockerfile(text: str) -> Dockerfile:
    """Instructions grouped by stage. Comment lines go, also inside continuations, as in Docker."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        keyword, _, args = " ".join(part for part in pending if part).partition(" ")
        if "<<" in args and keyword.upper() in ("RUN", "COPY"):
            raise ValueError(f"line {start}: heredocs are not supported by this parser")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
        pending = []
    if pending:
        raise ValueError("the Dockerfile ends inside a continuation line")

    global_args: list[Instruction] = []
    stages: list[Stage] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            words = instruction.args.split()
            words = [w for w in words if not w.startswith("--")]  # --platform=...
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif not stages:
            if instruction.keyword != "ARG":
                raise ValueError(f"line {instruction.line}: {instruction.keyword} before the first FROM")
            global_args.append(instruction)
        else:
            stages[-1].instructions.append(instruction)
    return Dockerfile(global_args, stages)


_VARIABLE = re.compile(
    r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


def expand(value: str, variables: Mapping[str, str]) -> str:
    """Docker's ${NAME}, ${NAME:-default} and $NAME substitution (unset names become empty)."""

    def substitute(match: re.Match) -> str:
        name = match.group("braced") or match.group("bare")
        found = variables.get(name, "")
        if not found and match.group("default") is not None:
            return match.group("default")
        return found

    return _VARIABLE.sub(substitute, value)


def assignments(instruction: Instruction) -> list[tuple[str, str | None]]:
    """NAME=value pairs of an ARG or ENV line (unexpanded; None for an ARG without a default)."""
    words = shlex.split(instruction.args)
    if instruction.keyword == "ENV" and words and "=" not in words[0]:
        return [(words[0], " ".join(words[1:]))]  # the legacy `ENV NAME value` form
    pairs: list[tuple[str, str | None]] = []
    for word in words:
        name, eq, value = word.partition("=")
        pairs.append((name, value if eq else None))
    return pairs


def stage_variables(stage: Stage, initial: Mapping[str, str], fixed: Mapping[str, str] | None = None) -> dict[str, str]:
    """The ARG defaults and ENV values a stage ends with; names in ``fixed`` keep their given value."""
    fixed = fixed or {}
    variables = {**initial, **fixed}
    for instruction in stage.instructions:
        apply_variables(instruction, variables, fixed)
    return variables


def apply_variables(instruction: Instruction, variables: dict[str, str], fixed: Mapping[str, str]) -> None:
    if instruction.keyword not in ("ARG", "ENV"):
        return
    for name, value in assignments(instruction):
        if name in fixed:
            continue
        if value is None:
            variables.setdefault(name, "")
        else:
            variables[name] = expand(value, variables)


def exec_form(instruction: Instruction, prefix: str = "") -> list[str]:
    """The JSON array of an exec-form ENTRYPOINT/CMD (after ``prefix``, e.g. "CMD" in HEALTHCHECK)."""
    args = instruction.args
    if prefix:
        args = args[args.index(prefix) + len(prefix) :]
    return json.loads(args.strip())


# ---------------------------------------------------------------------------------- .dockerignore


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Go's filepath.Match syntax plus Docker's ``**`` (any number of directories)."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i + 1)
            body = pattern[i + 1 : end]
            out, i = out + "[" + ("^" + body[1:] if body.startswith(("!", "^")) else body) + "]", end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


class DockerIgnore:
    """Docker's .dockerignore rules: the last pattern matching a path, or a parent of it, decides."""

    def __init__(self, text: str) -> None:
        self.rules: list[tuple[bool, str, re.Pattern[str]]] = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            negated = line.startswith("!")
            pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
            self.rules.append((negated, pattern, _glob_regex(pattern)))

    def excluded(self, relative: str) -> bool:
        parts = relative.strip("/").split("/")
        prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
        result = False
        for negated, _, regex in self.rules:
            if any(regex.match(prefix) for prefix in prefixes):
                result = not negated
        return result

    def may_reinclude_below(self, directory: str) -> bool:
        """Whether a ``!`` pattern could bring back something inside an excluded directory."""
        return any(negated and (p.startswith(directory + "/") or "*" in p) for negated, p, _ in self.rules)


def stage_context(source: Path, target: Path) -> list[str]:
    """Copy the build context Docker would send (``source`` less .dockerignore) to ``target``."""
    ignore_file = source / ".dockerignore"
    ignore = DockerIgnore(ignore_file.read_text() if ignore_file.exists() else "")
    sent: list[str] = []
    for directory, dirnames, filenames in os.walk(source):
        here = Path(directory).relative_to(source).as_posix()
        here = "" if here == "." else here + "/"
        dirnames[:] = [
            d for d in dirnames if not (ignore.excluded(here + d) and not ignore.may_reinclude_below(here + d))
        ]
        for name in filenames:
            relative = here + name
            if ignore.excluded(relative):
                continue
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / relative, target / relative)
            sent.append(relative)
    return sorted(sent)


# ------------------------------------------------------------------------------------------ replay


def reroot(root: Path, path: str) -> Path:
    """An absolute path of the image, inside the scratch root directory standing in for it."""
    return root / path.lstrip("/")


_RUN_FLAG = re.compile(r"^--(?:mount|network|security)=\S+\s+")


def run_command(instruction: Instruction) -> str:
    """The shell command of a RUN line, less its BuildKit flags (--mount=type=cache,... etc.)."""
    command = instruction.args
    while _RUN_FLAG.match(command):
        command = _RUN_FLAG.sub("", command, count=1)
    if command.startswith("["):
        raise ValueError(f"line {instruction.line}: exec-form RUN is not replayed; use the shell form")
    return command


@dataclass
class Replay:
    root: Path  # the scratch directory standing in for the image's filesystem
    context: Path  # the staged build context
    variables: dict[str, str]  # the stage's ARG/ENV values at its end
    commands: list[str]  # the shell commands run, after any rewrite
    log: str  # their combined output


def replay_stage(
    stage: Stage,
    context: Path,
    root: Path,
    base_env: Mapping[str, str],
    fixed: Mapping[str, str],
    rewrite: Callable[[str], str],
    timeout: float,
) -> Replay:
    """Run a stage's WORKDIR, COPY and RUN lines on the host, under ``root``.

    ``base_env`` is the base image's environment, ``fixed`` variables the replay pins (e.g. the
    venv's path, re-rooted), ``rewrite`` the hook that may change a RUN command before it runs.
    Docker's ARG and ENV values are the environment of each RUN, as in a real build.
    """
    variables = dict(base_env)
    variables.update(fixed)
    cwd = root
    cwd.mkdir(parents=True, exist_ok=True)
    commands: list[str] = []
    log: list[str] = []
    for instruction in stage.instructions:
        keyword = instruction.keyword
        if keyword in ("ARG", "ENV"):
            apply_variables(instruction, variables, fixed)
        elif keyword == "WORKDIR":
            path = expand(instruction.args, variables)
            cwd = reroot(root, path) if path.startswith("/") else cwd / path
            cwd.mkdir(parents=True, exist_ok=True)
        elif keyword == "COPY":
            _copy(instruction, variables, context, root, cwd)
        elif keyword == "RUN":
            command = rewrite(run_command(instruction))
            commands.append(command)
            done = subprocess.run(
                ["/bin/sh", "-c", command],
                cwd=cwd,
                env=variables,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=timeout,
            )
            log.append(f"$ {command}\n{done.stdout}")
            if done.returncode != 0:
                raise AssertionError(
                    f"Dockerfile line {instruction.line} failed ({done.returncode}) in the replay:\n"
                    f"$ {command}\n{done.stdout[-6000:]}"
                )
        elif keyword in ("LABEL", "EXPOSE", "SHELL"):
            continue
        else:
            raise ValueError(f"line {instruction.line}: {keyword} is not replayed; keep this stage replayable")
    return Replay(root, context, variables, commands, "".join(log))


def _copy(instruction: Instruction, variables: Mapping[str, str], context: Path, root: Path, cwd: Path) -> None:
    words = [expand(w, variables) for w in shlex.split(instruction.args)]
    if any(w.startswith("--from") for w in words):
        raise ValueError(f"line {instruction.line}: COPY --from is not replayed")
    words = [w for w in words if not w.startswith("--")]
    sources, dest = words[:-1], words[-1]
    target = reroot(root, dest) if dest.startswith("/") else cwd / dest
    into = dest.endswith("/") or len(sources) > 1
    for source in sources:
        path = context / source
        if not path.exists():
            raise AssertionError(
                f"Dockerfile line {instruction.line}: COPY {source}: not in the build context (.dockerignore?)"
            )
        if path.is_dir():
            shutil.copytree(path, target, dirs_exist_ok=True)
        else:
            destination = target / path.name if into else target
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, destination)
