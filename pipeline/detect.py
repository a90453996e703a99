"""Stack detection: what a pushed tree is, read from the files users already have.

Detection only reads files; it never runs tools, so it is cheap and safe to run on any push.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.app_json import AppJson, AppJsonError, parse_app_json
from pipeline.procfile import ProcfileError, parse_procfile

PythonManager = Literal["pip", "uv", "poetry", "pipenv"]
NodeManager = Literal["npm", "yarn", "pnpm"]

# Build order: front-end assets first, so a Python or Go app can ship what node built.
STACK_ORDER = ("node", "python", "go", "static")
PYTHON_VERSION = re.compile(r"^(\d+)\.(\d+)(?:\.(\d+))?$")
NODE_LOCKFILES: tuple[tuple[str, NodeManager], ...] = (
    ("pnpm-lock.yaml", "pnpm"), ("yarn.lock", "yarn"), ("package-lock.json", "npm"), ("npm-shrinkwrap.json", "npm"),
)


class DetectError(Exception):
    """Nothing deployable, or a file that describes the app is malformed; the message says what to add or fix."""


@dataclass(frozen=True)
class Detection:
    stacks: tuple[str, ...]
    procfile: dict[str, str] = field(default_factory=dict)
    app_json: AppJson = field(default_factory=AppJson)
    python_version: str | None = None
    node_engine: str | None = None
    python_manager: PythonManager | None = None
    node_manager: NodeManager | None = None
    has_dockerfile: bool = False
    notes: list[str] = field(default_factory=list)


def detect(src: Path) -> Detection:
    notes: list[str] = []
    has_dockerfile = (src / "Dockerfile").is_file()
    if has_dockerfile:
        notes.append("Detected Dockerfile")
    procfile = _procfile(src)
    if procfile:
        notes.append(f"Detected Procfile: {', '.join(procfile)}")
    app_json = _app_json(src)
    if (src / "app.json").is_file():
        notes.append(f"Detected app.json{_app_json_summary(app_json)}")

    stacks: list[str] = []
    python_manager, python_version = _python(src, notes)
    if python_manager:
        stacks.append("python")
    node_manager, node_engine = _node(src, notes)
    if node_manager:
        stacks.append("node")
    if (src / "go.mod").is_file():
        stacks.append("go")
        notes.append(f"Detected Go (go.mod{_go_version(src)})")
    if (src / ".static").is_file() or ((src / "index.html").is_file() and not stacks):
        stacks.append("static")
        notes.append(f"Detected a static site ({'.static' if (src / '.static').is_file() else 'index.html'})")

    if procfile and not stacks and not has_dockerfile:
        notes.append("No dependency files found: the Procfile's commands run with the host's tools")
    if not (stacks or procfile or has_dockerfile):
        raise DetectError(
            "Nothing to deploy: no Procfile, Dockerfile or app files were found. Add a Procfile with a "
            "'web: <command>' line, a Dockerfile, or one of requirements.txt, pyproject.toml, Pipfile, "
            "package.json, go.mod, index.html")
    return Detection(
        stacks=tuple(sorted(stacks, key=STACK_ORDER.index)), procfile=procfile, app_json=app_json,
        python_version=python_version, node_engine=node_engine, python_manager=python_manager,
        node_manager=node_manager, has_dockerfile=has_dockerfile, notes=notes,
    )


def _read(src: Path, name: str) -> str:
    try:
        return (src / name).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DetectError(f"{name} is not UTF-8 text") from None


def _procfile(src: Path) -> dict[str, str]:
    if not (src / "Procfile").is_file():
        return {}
    try:
        return parse_procfile(_read(src, "Procfile"))
    except ProcfileError as exc:
        raise DetectError(str(exc)) from None


def _app_json(src: Path) -> AppJson:
    if not (src / "app.json").is_file():
        return AppJson()
    try:
        return parse_app_json(_read(src, "app.json"))
    except AppJsonError as exc:
        raise DetectError(str(exc)) from None


def _app_json_summary(app_json: AppJson) -> str:
    parts = [f"healthchecks for {', '.join(app_json.healthchecks)}"] if app_json.healthchecks else []
    parts += [name for name in ("predeploy", "postdeploy") if getattr(app_json, name)]
    parts += [f"formation {', '.join(f'{k}={v}' for k, v in app_json.formation.items())}"] if app_json.formation else []
    parts += ["cron"] if app_json.cron else []
    return f": {'; '.join(parts)}" if parts else ""


def _pyproject(src: Path) -> dict[str, Any] | None:
    if not (src / "pyproject.toml").is_file():
        return None
    try:
        return tomllib.loads(_read(src, "pyproject.toml"))
    except tomllib.TOMLDecodeError as exc:
        raise DetectError(f"pyproject.toml is not valid TOML: {exc}") from None


def _python(src: Path, notes: list[str]) -> tuple[PythonManager | None, str | None]:
    """The manager follows the most specific file: a lockfile names its tool, requirements.txt means pip."""
    pyproject = _pyproject(src)
    has = {name: (src / name).is_file() for name in ("uv.lock", "poetry.lock", "Pipfile", "requirements.txt")}
    candidates: list[tuple[str, PythonManager]] = []
    if has["uv.lock"]:
        candidates.append(("uv.lock", "uv"))
    if has["poetry.lock"] or (pyproject and "poetry" in pyproject.get("tool", {}) and "project" not in pyproject):
        candidates.append(("poetry.lock" if has["poetry.lock"] else "pyproject.toml", "poetry"))
    if has["Pipfile"]:
        candidates.append(("Pipfile", "pipenv"))
    if has["requirements.txt"]:
        candidates.append(("requirements.txt", "pip"))
    if pyproject and ("project" in pyproject or "build-system" in pyproject):
        candidates.append(("pyproject.toml", "pip"))
    if not candidates:
        return None, None
    (source, manager), *others = candidates
    version, version_file = _python_version(src)
    line = f"Detected Python ({source}, {manager})"
    if version:
        line += f", Python {version} from {version_file}"
    notes.append(line)
    read = {source, "pyproject.toml"} if manager in ("uv", "poetry") else {source}  # they read both
    ignored = [name for name, _ in others if name not in read]
    if ignored:
        notes.append(f"Using {source} for Python dependencies; ignoring {', '.join(dict.fromkeys(ignored))}")
    return manager, version


def _python_version(src: Path) -> tuple[str | None, str | None]:
    """`.python-version` (pyenv, uv) wins over Heroku's older runtime.txt."""
    for name, prefix in ((".python-version", ""), ("runtime.txt", "python-")):
        if not (src / name).is_file():
            continue
        lines = [line.strip() for line in _read(src, name).splitlines()]
        value = next((line for line in lines if line and not line.startswith("#")), "")
        version = value.removeprefix(prefix)
        if not value.startswith(prefix) or not PYTHON_VERSION.match(version):
            example = "3.12" if name == ".python-version" else "python-3.12"
            raise DetectError(f"{name}: {value!r} is not a Python version; write one like {example}")
        return version, name
    return None, None


def _node(src: Path, notes: list[str]) -> tuple[NodeManager | None, str | None]:
    if not (src / "package.json").is_file():
        return None, None
    try:
        package = json.loads(_read(src, "package.json"))
    except json.JSONDecodeError as exc:
        raise DetectError(f"package.json is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") \
            from None
    if not isinstance(package, dict):
        raise DetectError("package.json must hold a JSON object")
    engines = package.get("engines", {})
    engine = engines.get("node") if isinstance(engines, dict) else None
    if engine is not None and not isinstance(engine, str):
        raise DetectError("package.json: engines.node must be a version range string like \">=20\"")
    lockfiles = [(name, manager) for name, manager in NODE_LOCKFILES if (src / name).is_file()]
    manager: NodeManager = lockfiles[0][1] if lockfiles else "npm"
    line = f"Detected Node.js (package.json, {manager}{', ' + lockfiles[0][0] if lockfiles else ', no lockfile'})"
    if engine:
        line += f", engines.node {engine}"
    notes.append(line)
    if len(lockfiles) > 1:
        notes.append(f"Several lockfiles found; using {lockfiles[0][0]}, ignoring "
                     f"{', '.join(name for name, _ in lockfiles[1:])}")
    return manager, engine


def _go_version(src: Path) -> str:
    match = re.search(r"^go\s+(\S+)\s*$", _read(src, "go.mod"), re.MULTILINE)
    return f", go {match[1]}" if match else ""
