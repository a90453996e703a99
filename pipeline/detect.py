"""Stack detection: what a pushed tree is, read from the files users already have.

Detection only reads files; it never runs tools, so it is cheap and safe to run on any push. It reads them
the way the daemon reads anything in an app's tree (pipeline.app_owned_files): within the tree, regular
files only, each within its bound. The manifests it parses (package.json, pyproject.toml, go.mod) are bounded
by max_parsed_manifest_bytes, far below what a lockfile may take: parsing takes many times a document's size
in memory. Each is parsed here once, and the Detection keeps what the builder needs of it, not the document.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline import app_owned_files
from pipeline.app_json import AppJson, AppJsonError, parse_app_json
from pipeline.json_documents import JsonDocumentError, parse_json
from pipeline.limits import MARKER_FILE_BYTES, Limits
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
class NodePackage:
    """What the build needs of package.json."""

    digest: str  # SHA-256 of the file detected: a build refuses a package.json changed since
    manifest: bytes  # all of it but the scripts, as canonical JSON: what the installed dependencies depend on
    scripts: frozenset[str]
    reads_source: bool  # workspaces or local packages: the install needs the whole app


@dataclass(frozen=True)
class Detection:
    stacks: tuple[str, ...]
    procfile: dict[str, str] = field(default_factory=dict)
    app_json: AppJson = field(default_factory=AppJson)
    python_version: str | None = None
    python_version_file: str | None = None
    node_engine: str | None = None
    node_package: NodePackage | None = None
    # pyproject.toml's [project] dependencies, when pip installs from it and they are static; None: pip installs
    # the project itself (`pip install .`), which alone knows them
    python_dependencies: tuple[str, ...] | None = None
    python_manager: PythonManager | None = None
    node_manager: NodeManager | None = None
    go_module: str | None = None
    has_dockerfile: bool = False
    notes: list[str] = field(default_factory=list)


def detect(src: Path, limits: Limits) -> Detection:
    """What `src` is. Blocking (it reads files): async code runs it in a thread."""
    try:
        return _Detector(src, limits).detect()
    except app_owned_files.UnsafeAppFile as exc:
        raise DetectError(str(exc)) from None


class _Detector:
    def __init__(self, src: Path, limits: Limits) -> None:
        self.src = src
        self.limits = limits

    def has(self, name: str) -> bool:
        return app_owned_files.is_file(self.src, name)

    def read(self, name: str, setting: str | None = "max_parsed_manifest_bytes") -> str | None:
        bound = getattr(self.limits, setting) if setting else MARKER_FILE_BYTES
        return app_owned_files.read_text(self.src, name, bound, setting=setting)

    def detect(self) -> Detection:
        notes: list[str] = []
        has_dockerfile = self.has("Dockerfile")
        procfile = self.procfile()
        if procfile:
            notes.append(f"Detected Procfile: {', '.join(procfile)}")
        app_json = self.app_json()
        if app_json is not None:
            notes.append(f"Detected app.json{_app_json_summary(app_json)}")

        stacks: list[str] = []
        python_manager, python_version, python_version_file, python_dependencies = self.python(notes)
        if python_manager:
            stacks.append("python")
        node_manager, node_engine, node_package = self.node(notes)
        if node_manager:
            stacks.append("node")
        go_mod = self.read("go.mod")
        go_module = None
        if go_mod is not None:
            stacks.append("go")
            go_module, go_version = _go_module(go_mod)
            notes.append(f"Detected Go (go.mod{f', module {go_module}' if go_module else ''}"
                         f"{f', go {go_version}' if go_version else ''})")
        static_marker = self.has(".static")
        if static_marker or (self.has("index.html") and not stacks):
            stacks.append("static")
            notes.append(f"Detected a static site ({'.static' if static_marker else 'index.html'})")

        if procfile and not stacks and not has_dockerfile:
            notes.append("No dependency files found: the Procfile's commands run with the host's tools")
        if not (stacks or procfile or has_dockerfile):
            raise DetectError(
                "Nothing to deploy: no Procfile, Dockerfile or app files were found. Add a Procfile with a "
                "'web: <command>' line, a Dockerfile, or one of requirements.txt, pyproject.toml, Pipfile, "
                "package.json, go.mod, index.html")
        return Detection(
            stacks=tuple(sorted(stacks, key=STACK_ORDER.index)), procfile=procfile,
            app_json=app_json or AppJson(), python_version=python_version, python_version_file=python_version_file,
            node_engine=node_engine, node_package=node_package, python_dependencies=python_dependencies,
            python_manager=python_manager, node_manager=node_manager, go_module=go_module,
            has_dockerfile=has_dockerfile, notes=notes,
        )

    def procfile(self) -> dict[str, str]:
        text = self.read("Procfile", "max_procfile_bytes")
        if text is None:
            return {}
        try:
            return parse_procfile(text, self.limits)
        except ProcfileError as exc:
            raise DetectError(str(exc)) from None

    def app_json(self) -> AppJson | None:
        text = self.read("app.json", "max_app_json_bytes")
        if text is None:
            return None
        try:
            return parse_app_json(text, self.limits)
        except AppJsonError as exc:
            raise DetectError(str(exc)) from None

    def pyproject(self) -> dict[str, Any] | None:
        text = self.read("pyproject.toml")
        return None if text is None else parse_pyproject(text)

    def python(self, notes: list[str]) -> tuple[PythonManager | None, str | None, str | None,
                                                  tuple[str, ...] | None]:
        """The manager follows the most specific file: a lockfile names its tool, requirements.txt means pip.
        With the version, its file, and the dependencies pip installs from pyproject.toml."""
        pyproject = self.pyproject()
        has = {name: self.has(name) for name in ("uv.lock", "poetry.lock", "Pipfile", "requirements.txt")}
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
            return None, None, None, None
        (source, manager), *others = candidates
        version, version_file = self.python_version()
        line = f"Detected Python ({source}, {manager})"
        if version:
            line += f", Python {version} from {version_file}"
        notes.append(line)
        read = {source, "pyproject.toml"} if manager in ("uv", "poetry") else {source}  # they read both
        ignored = [name for name, _ in others if name not in read]
        if ignored:
            notes.append(f"Using {source} for Python dependencies; ignoring {', '.join(dict.fromkeys(ignored))}")
        dependencies = _static_dependencies(pyproject) if pyproject and source == "pyproject.toml" else None
        return manager, version, version_file, dependencies

    def python_version(self) -> tuple[str | None, str | None]:
        """`.python-version` (pyenv, uv) wins over Heroku's older runtime.txt."""
        for name, prefix in ((".python-version", ""), ("runtime.txt", "python-")):
            text = self.read(name, None)
            if text is None:
                continue
            lines = [line.strip() for line in text.splitlines()]
            value = next((line for line in lines if line and not line.startswith("#")), "")
            version = value.removeprefix(prefix)
            if not value.startswith(prefix) or not PYTHON_VERSION.match(version):
                example = "3.12" if name == ".python-version" else "python-3.12"
                raise DetectError(f"{name}: {value[:40]!r} is not a Python version; write one like {example}")
            return version, name
        return None, None

    def node(self, notes: list[str]) -> tuple[NodeManager | None, str | None, NodePackage | None]:
        text = self.read("package.json")
        if text is None:
            return None, None, None
        package = parse_package_json(text)
        engines = package.get("engines", {})
        engine = engines.get("node") if isinstance(engines, dict) else None
        if engine is not None and not isinstance(engine, str):
            raise DetectError("package.json: engines.node must be a version range string like \">=20\"")
        lockfiles = [(name, manager) for name, manager in NODE_LOCKFILES if self.has(name)]
        manager: NodeManager = lockfiles[0][1] if lockfiles else "npm"
        line = f"Detected Node.js (package.json, {manager}{', ' + lockfiles[0][0] if lockfiles else ', no lockfile'})"
        if engine:
            line += f", engines.node {engine[:80]}"
        notes.append(line)
        if len(lockfiles) > 1:
            notes.append(f"Several lockfiles found; using {lockfiles[0][0]}, ignoring "
                         f"{', '.join(name for name, _ in lockfiles[1:])}")
        return manager, engine, _node_package(text, package)


def parse_package_json(text: str) -> dict[str, Any]:
    """package.json is strict JSON (npm reads it so) holding an object."""
    try:
        package = parse_json(text, "package.json")
    except JsonDocumentError as exc:
        raise DetectError(str(exc)) from None
    if not isinstance(package, dict):
        raise DetectError("package.json must hold a JSON object")
    return package


def parse_pyproject(text: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise DetectError(f"pyproject.toml is not valid TOML: {exc}") from None
    except RecursionError:  # tomllib recurses into nested arrays and inline tables
        raise DetectError("pyproject.toml nests arrays or tables too deeply") from None


def _node_package(text: str, package: dict[str, Any]) -> NodePackage:
    scripts = package.get("scripts")
    sections = ("dependencies", "devDependencies", "optionalDependencies")
    specs = [spec for s in sections if isinstance(package.get(s), dict) for spec in package[s].values()]
    local = any(isinstance(spec, str) and spec.startswith(("file:", "link:", "workspace:", "portal:", ".", "/"))
                for spec in specs)
    # Scripts run from the app's own tree, after the install: they are not part of the dependencies.
    manifest = json.dumps({k: v for k, v in package.items() if k != "scripts"}, sort_keys=True).encode()
    return NodePackage(digest=hashlib.sha256(text.encode()).hexdigest(), manifest=manifest,
                       scripts=frozenset(scripts) if isinstance(scripts, dict) else frozenset(),
                       reads_source=local or "workspaces" in package)


def _static_dependencies(pyproject: dict[str, Any]) -> tuple[str, ...] | None:
    """The [project] dependencies, when pyproject.toml lists them itself and names the project."""
    project = pyproject.get("project", {})
    if not isinstance(project, dict):
        raise DetectError("pyproject.toml: project must be a table")
    dynamic, dependencies = project.get("dynamic", []), project.get("dependencies", [])
    if not all(isinstance(v, list) and all(isinstance(item, str) for item in v) for v in (dynamic, dependencies)):
        raise DetectError("pyproject.toml: project.dynamic and project.dependencies must be arrays of strings")
    if "dependencies" in dynamic or "name" not in project:
        return None
    return tuple(dependencies)


def _app_json_summary(app_json: AppJson) -> str:
    parts = [f"healthchecks for {', '.join(app_json.healthchecks)}"] if app_json.healthchecks else []
    parts += [name for name in ("predeploy", "postdeploy") if getattr(app_json, name)]
    parts += [f"formation {', '.join(f'{k}={v}' for k, v in app_json.formation.items())}"] if app_json.formation else []
    parts += ["cron"] if app_json.cron else []
    return f": {'; '.join(parts)}" if parts else ""


def _go_module(go_mod: str) -> tuple[str | None, str | None]:
    """The module path and the go directive of a go.mod."""
    module = re.search(r'^module\s+"?([^\s"]+)"?\s*(?://.*)?$', go_mod, re.MULTILINE)
    version = re.search(r"^go\s+(\S+)\s*(?://.*)?$", go_mod, re.MULTILINE)
    return (module[1] if module else None), (version[1] if version else None)
