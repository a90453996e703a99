"""Native builder: install an app's dependencies with its own tools, on the host.

Dependencies are cached per app under `cache`, in directories named by a hash of what
produced them (interpreter, manifests, lockfiles), so a push that leaves them unchanged
installs nothing. A virtual environment writes its own absolute path into its scripts and
cannot move, so processes run it where it was built, in the cache; node_modules can move,
so it is hard-linked into the build. Build tools run app code (setup.py, npm scripts):
the native builder is for apps whose code the host trusts.
"""

from __future__ import annotations

import ast
import asyncio
import errno
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import ssl
import sys
import tempfile
import tomllib
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import static_server
from pipeline.builders import BuildError, BuildResult, Sandbox
from pipeline.builders.app_owned_files import read_beneath, write_beneath
from pipeline.detect import NODE_LOCKFILES, Detection

Log = Callable[[str], None]

STEP_TIMEOUT = 30 * 60.0
PROBE_TIMEOUT = 60.0
LOCK_POLL = 0.2
# Cache directories the build tools (running as the app user) fill.
CACHE_DIRS = ("python", "node", "pip", "npm", "uv", "poetry", "yarn", "go", "pnpm-store", "home")
READY = ".devflow-ready"
# The host environment a build may see: tool configuration, locale, proxies; not the daemon's secrets.
HOST_ENV = {"PATH", "HOME", "USER", "LOGNAME", "LANG", "TZ", "TMPDIR", "SHELL", "SSL_CERT_FILE", "SSL_CERT_DIR",
            "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "GIT_SSL_CAINFO", "GOROOT", "GOPATH",
            "GOPROXY", "GOPRIVATE", "GONOPROXY", "GONOSUMDB", "GOSUMDB", "GOFLAGS", "GOTOOLCHAIN", "GOINSECURE",
            "http_proxy", "https_proxy", "no_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY"}
HOST_ENV_PREFIXES = ("LC_", "PIP_", "npm_config_", "NPM_CONFIG_", "UV_", "POETRY_", "PIPENV_", "PYENV", "YARN_",
                     "COREPACK_", "XDG_")
# Every variable through which pip, npm, node, go, git and curl read a CA bundle.
CA_VARS = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "PIP_CERT", "CURL_CA_BUNDLE", "GIT_SSL_CAINFO",
           "NODE_EXTRA_CA_CERTS", "npm_config_cafile")
ERROR_LINE = re.compile(r"^\s*(?:error\b|fatal\b|npm err!|npm error\b)", re.IGNORECASE)
PROBE = "import sys; print(getattr(sys, '_base_executable', sys.executable)); print('%d.%d.%d' % sys.version_info[:3])"
WSGI_MODULES = ("wsgi", "app", "main", "application")
ASGI_FRAMEWORKS = {"fastapi", "starlette", "quart", "litestar"}
NODE_INSTALL_HOOKS = ("preinstall", "install", "postinstall", "prepare")
NODE_RC_FILES = (".npmrc", ".yarnrc")
# Installs need the devDependencies that build scripts use, whatever NODE_ENV the app runs with.
NODE_INSTALL_ENV = {"NODE_ENV": "development"}
MISSING_TOOL = {
    "uv": "uv.lock found, but uv is not installed on the build host: install uv "
          "(https://docs.astral.sh/uv/getting-started/installation/) so `uv` is on the PATH, "
          "or replace uv.lock with a requirements.txt (uv export --no-dev -o requirements.txt)",
    "poetry": "this is a Poetry project, but Poetry is not installed on the build host: install it "
              "(pipx install poetry) so `poetry` is on the PATH, or add a requirements.txt instead",
    "pipenv": "Pipfile found, but Pipenv is not installed on the build host: install it (pipx install pipenv) "
              "so `pipenv` is on the PATH, or replace the Pipfile with a requirements.txt "
              "(pipenv requirements > requirements.txt)",
    "yarn": "yarn.lock found, but Yarn is not installed on the build host: install it (corepack enable) "
            "so `yarn` is on the PATH, or replace yarn.lock with a package-lock.json (npm install)",
    "pnpm": "pnpm-lock.yaml found, but pnpm is not installed on the build host: install it (corepack enable) "
            "so `pnpm` is on the PATH, or replace pnpm-lock.yaml with a package-lock.json (npm install)",
}


@dataclass(frozen=True)
class _Layer:
    """What one stack gives the app's processes: PATH entries, variables, a default web command."""

    path: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    web: str | None = None
    no_web: str = ""  # why there is no default web command, and what to add


@dataclass(frozen=True)
class _PythonInstall:
    """How one app's Python dependencies get installed, and what the result depends on."""

    tool: str
    inputs: str  # the files a user edits to change the environment, for the log
    material: tuple[bytes, ...]
    argv: tuple[str, ...]
    reads_source: bool = False  # local paths or the project itself: the result is not cacheable


def _mark_ready(entry: Path, **facts: str) -> None:
    """A cache entry is complete: later builds with the same inputs reuse it."""
    write_beneath(entry, READY, json.dumps(facts).encode() + b"\n")


def _make_dir(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)


class _Tools:
    """Runs build tools with the build's environment, streaming their output line by line."""

    def __init__(self, env: dict[str, str], log: Log, timeout: float, preexec: Callable[[], None] | None,
                 hand_over: Callable[[Path], None]) -> None:
        self.env = env
        self.log = log
        self.timeout = timeout
        self.preexec = preexec
        self.hand_over = hand_over

    def which(self, name: str, env: dict[str, str] | None = None) -> str | None:
        return shutil.which(name, path=(env or self.env).get("PATH", os.defpath))

    async def run(self, argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> None:
        env = {**self.env, **(env or {})}
        shown = shlex.join([Path(argv[0]).name, *argv[1:]])
        executable = self.which(argv[0], env) if os.sep not in argv[0] else argv[0]
        if executable is None:
            raise BuildError(f"{argv[0]} is not installed on the build host")
        self.log(f"$ {shown}")
        try:
            proc = await asyncio.create_subprocess_exec(
                executable, *argv[1:], cwd=cwd, env=env, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True,
                preexec_fn=self.preexec)
        except OSError as exc:
            # The tool was found, so this is exec failing as the build's user: a tool under /root, or a script
            # whose #! interpreter is missing or there. Anything else (no cwd, no fds) is not the tool's fault.
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOEXEC) or not cwd.is_dir():
                raise
            why = "the interpreter it names is missing" if exc.errno == errno.ENOENT else exc.strerror
            raise BuildError(f"cannot run {executable}: {why}. Builds run as the app's user: the tool, and the "
                             "interpreter a script names, must be readable and executable by all users") from None
        tail: deque[str] = deque(maxlen=40)
        try:
            await asyncio.wait_for(self._pump(proc, tail), self.timeout)
        except TimeoutError:
            raise BuildError(f"`{shown}` did not finish within {self.timeout:.0f} seconds") from None
        finally:
            if proc.returncode is None:
                _kill_group(proc)
                await proc.wait()
        if proc.returncode != 0:
            errors = [line for line in tail if ERROR_LINE.match(line)] or list(tail)[-8:]
            raise BuildError("\n".join([f"`{shown}` failed with exit status {proc.returncode}:", *errors]))

    async def _pump(self, proc: asyncio.subprocess.Process, tail: deque[str]) -> None:
        assert proc.stdout is not None
        pending = b""
        while chunk := await proc.stdout.read(65536):
            *lines, pending = (pending + chunk).split(b"\n")
            if len(pending) > 65536:  # a tool that never ends its line still gets heard
                lines, pending = [*lines, pending], b""
            for line in lines:
                self._emit(line, tail)
        if pending:
            self._emit(pending, tail)
        await proc.wait()

    def _emit(self, raw: bytes, tail: deque[str]) -> None:
        # A carriage return redraws a progress line: only its last state is worth a log line.
        text = raw.rstrip().rsplit(b"\r", 1)[-1].decode("utf-8", "replace")
        self.log(text)
        if text.strip():
            tail.append(text)

    async def output(self, argv: list[str], cwd: Path) -> str | None:
        """A probe's stdout, or None when the program is missing or fails."""
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, cwd=cwd, env=self.env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL, start_new_session=True, preexec_fn=self.preexec)
        except OSError:
            return None
        try:
            stdout, _ = await asyncio.wait_for(proc.communicate(), PROBE_TIMEOUT)
        except TimeoutError:
            return None
        finally:
            if proc.returncode is None:
                _kill_group(proc)
                await proc.wait()
        return stdout.decode("utf-8", "replace").strip() if proc.returncode == 0 else None


class NativeBuilder:
    name = "native"

    def __init__(self, extra_ca_file: Path | None = None, *, step_timeout: float = STEP_TIMEOUT) -> None:
        self.extra_ca_file = extra_ca_file
        self.step_timeout = step_timeout

    async def build(self, src: Path, detection: Detection, cache: Path, env: dict[str, str], log: Log,
                    sandbox: Sandbox | None = None) -> BuildResult:
        src, cache = src.resolve(), cache.resolve()
        hand_over = sandbox.hand_over if sandbox is not None else _make_dir
        for directory in (cache, *(cache / name for name in CACHE_DIRS)):
            hand_over(directory)
        tools = _Tools(self._tool_env(env, cache), log, self.step_timeout,
                       sandbox.preexec if sandbox is not None else None, hand_over)
        steps = {"node": self._node, "python": self._python, "go": self._go, "static": self._static}
        layers = [await steps[stack](src, detection, cache, tools) for stack in detection.stacks]
        processes = dict(detection.procfile) or _default_processes(layers)
        runtime_env = {"PYTHONUNBUFFERED": "1"}
        for layer in layers:
            runtime_env.update(layer.env)
        # The primary stack (built last) comes first on the PATH: its python, then node's tools.
        runtime_env["PATH"] = os.pathsep.join([p for layer in reversed(layers) for p in layer.path]
                                              + [tools.env["PATH"]])
        log(f"Processes: {', '.join(f'{kind}: {command}' for kind, command in processes.items())}")
        return BuildResult(processes=processes, env=runtime_env)

    # environment

    def _tool_env(self, env: dict[str, str], cache: Path) -> dict[str, str]:
        host = {k: v for k, v in os.environ.items() if k in HOST_ENV or k.startswith(HOST_ENV_PREFIXES)}
        tool_env = {**host, **env}
        tool_env["PATH"] = _without_own_venv(tool_env.get("PATH", os.defpath))
        tool_env.update({
            "PYTHONUNBUFFERED": "1",
            "PIP_CACHE_DIR": str(cache / "pip"), "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1",
            "PIP_PROGRESS_BAR": "off", "UV_CACHE_DIR": str(cache / "uv"), "POETRY_CACHE_DIR": str(cache / "poetry"),
            "npm_config_cache": str(cache / "npm"),
            "YARN_CACHE_FOLDER": str(cache / "yarn"), "npm_config_fund": "false", "npm_config_audit": "false",
            "npm_config_update_notifier": "false", "npm_config_progress": "false",
            "GOMODCACHE": str(cache / "go" / "mod"), "GOCACHE": str(cache / "go" / "build"),
        })
        if self.extra_ca_file is not None:
            bundle = str(self._ca_bundle(cache, tool_env))
            tool_env.update(dict.fromkeys(CA_VARS, bundle))
        return tool_env

    def _ca_bundle(self, cache: Path, env: dict[str, str]) -> Path:
        """The host's trusted CAs plus the extra file: pip and npm replace their defaults with a given bundle."""
        assert self.extra_ca_file is not None
        try:
            extra = self.extra_ca_file.read_text()
        except OSError as exc:
            raise BuildError(f"the extra CA file {self.extra_ca_file} cannot be read: {exc.strerror}") from None
        if "-----BEGIN CERTIFICATE-----" not in extra:
            raise BuildError(f"the extra CA file {self.extra_ca_file} holds no PEM certificate")
        defaults = ssl.get_default_verify_paths()
        sources = [env.get(k) for k in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "PIP_CERT")]
        sources += [defaults.cafile, defaults.openssl_cafile, _certifi_bundle()]
        parts = []
        for source in dict.fromkeys(os.path.realpath(s) for s in sources if s and os.path.isfile(s)):
            parts.append(Path(source).read_text(errors="replace"))
        parts.append(extra)
        bundle = cache / "ca-bundle.pem"
        # A fresh, exclusively created file: the app user, who owns the cache, cannot redirect the write.
        fd, staging = tempfile.mkstemp(dir=cache, prefix="ca-bundle.", suffix=".tmp")
        os.fchmod(fd, 0o644)  # by fd: the name could be a link by the time a path-based chmod ran
        with open(fd, "w") as out:
            out.write("\n".join(part.strip() for part in parts) + "\n")
        os.replace(staging, bundle)
        return bundle

    # python

    async def _python(self, src: Path, detection: Detection, cache: Path, tools: _Tools) -> _Layer:
        python, version = await self._interpreter(detection.python_version, cache, tools)
        install = _python_install(src, detection.python_manager or "pip")
        if install.tool != "pip" and tools.which(install.tool) is None:
            raise BuildError(MISSING_TOOL[install.tool])
        if install.reads_source:
            # Installs that copy or point at the app's own files live and die with this build.
            venv = src / ".venv"
            tools.log(f"{install.inputs} installs files from the app itself: building a fresh environment in .venv")
            await asyncio.to_thread(shutil.rmtree, venv, ignore_errors=True)
            await self._install_python(src, venv, python, install, tools)
        else:
            venv = cache / "python" / _digest(python, version, install.tool, *install.material)
            async with _locked(venv, self.step_timeout):
                if (venv / READY).is_file():
                    tools.log(f"Reusing the Python environment: Python {version} and {install.inputs} unchanged")
                else:
                    tools.log(f"Installing Python dependencies from {install.inputs} with {install.tool}")
                    await asyncio.to_thread(shutil.rmtree, venv, ignore_errors=True)
                    await self._install_python(src, venv, python, install, tools)
                    _mark_ready(venv, python=python, version=version, tool=install.tool)
        web, no_web = _python_web(src, venv)
        return _Layer(path=(str(venv / "bin"),), env={"VIRTUAL_ENV": str(venv)}, web=web, no_web=no_web)

    async def _interpreter(self, wanted: str | None, cache: Path, tools: _Tools) -> tuple[str, str]:
        """The host Python matching the app's version file (same minor version), as (executable, x.y.z)."""
        minor = ".".join(wanted.split(".")[:2]) if wanted else ""
        candidates = [tools.which(f"python{minor}")] if minor else []
        if minor:
            versions = Path(tools.env.get("PYENV_ROOT") or Path.home() / ".pyenv") / "versions"
            installed = [d / "bin" / f"python{minor}" for d in (versions.iterdir() if versions.is_dir() else ())
                         if d.name == minor or d.name.startswith(f"{minor}.")]
            candidates += [str(p) for p in sorted(installed, key=lambda p: _version_key(p.parts[-3]), reverse=True)]
        candidates.append(tools.which("python3"))
        found: dict[str, str] = {}
        for candidate in dict.fromkeys(c for c in candidates if c):
            # Probe from the cache, not the app: a pyenv shim would otherwise obey the app's .python-version.
            probe = await tools.output([candidate, "-c", PROBE], cwd=cache)
            if probe and len(lines := probe.splitlines()) == 2:
                found.setdefault(lines[0], lines[1])
        if not found and not wanted:
            raise BuildError("Python is not installed on the build host: install Python 3 so `python3` is on "
                             "the PATH, or add a Dockerfile")
        matching = [(p, v) for p, v in found.items() if not wanted or v == wanted or v.startswith(f"{minor}.")]
        if not matching:
            have = ", ".join(sorted(set(found.values()), key=_version_key)) or "none"
            raise BuildError(f"Python {wanted} is requested by the app but not installed on the build host "
                             f"(found: {have}): install it (e.g. pyenv install {minor}) or change .python-version")
        python, version = next(((p, v) for p, v in matching if v == wanted), matching[0])
        if not wanted:
            tools.log(f"Using Python {version} ({python}); add a .python-version file to choose the version")
        elif version.startswith(wanted):
            tools.log(f"Using Python {version} ({python})")
        else:
            tools.log(f"Using Python {version} ({python}): {wanted} was requested, the same minor version")
        return python, version

    async def _install_python(self, src: Path, venv: Path, python: str, install: _PythonInstall,
                              tools: _Tools) -> None:
        env = {"VIRTUAL_ENV": str(venv), "PATH": os.pathsep.join([str(venv / "bin"), tools.env["PATH"]])}
        if install.tool == "uv":
            env.update(UV_PROJECT_ENVIRONMENT=str(venv), UV_PYTHON=python, UV_PYTHON_DOWNLOADS="never")
        else:
            # pip only goes into environments that install something with it.
            await tools.run([python, "-m", "venv", *([] if install.argv else ["--without-pip"]), str(venv)], cwd=src)
        if install.tool == "poetry":
            env["POETRY_VIRTUALENVS_CREATE"] = "false"
        if install.tool == "pipenv":
            env.update(PIPENV_PIPFILE=str(src / "Pipfile"), PIPENV_VERBOSITY="-1", PIPENV_NOSPIN="1")
        if install.argv:
            await tools.run(list(install.argv), cwd=src, env=env)

    # node

    async def _node(self, src: Path, detection: Detection, cache: Path, tools: _Tools) -> _Layer:
        node = tools.which("node")
        if node is None:
            raise BuildError("package.json found, but Node.js is not installed on the build host: install Node.js "
                             "(https://nodejs.org) so `node` is on the PATH, or add a Dockerfile")
        manager = detection.node_manager or "npm"
        if tools.which(manager) is None:
            raise BuildError(MISSING_TOOL[manager])
        node_version = await tools.output([node, "--version"], cwd=cache) or "unknown"
        manager_version = await tools.output([manager, "--version"], cwd=src) or "unknown"
        engine = f" (package.json engines.node: {detection.node_engine})" if detection.node_engine else ""
        tools.log(f"Using Node.js {node_version}{engine} and {manager} {manager_version}")
        package = json.loads((src / "package.json").read_text(encoding="utf-8"))
        scripts = package.get("scripts") if isinstance(package.get("scripts"), dict) else {}
        script_env = {"NODE_ENV": tools.env.get("NODE_ENV", "production")}
        modern_yarn = manager == "yarn" and not manager_version.startswith("1.")
        if modern_yarn or _node_reads_source(src, package):
            # Workspaces, local packages and Yarn 2+ (its own release and settings in the tree) need the whole app.
            tools.log("Installing Node.js dependencies in place (workspaces, local packages or Yarn 2+ need the "
                      "whole app), without the node_modules cache")
            has_lockfile = any(m == manager and (src / name).is_file() for name, m in NODE_LOCKFILES)
            await tools.run(_node_install_argv(manager, modern_yarn, has_lockfile, cache), cwd=src,
                            env=NODE_INSTALL_ENV)
        else:
            await self._node_modules(src, package, manager, node_version, manager_version, cache, tools)
            for hook in NODE_INSTALL_HOOKS:
                if hook in scripts:
                    await tools.run([manager, "run", hook], cwd=src, env=script_env)
        build = next((name for name in ("heroku-postbuild", "build") if name in scripts), None)
        if build:
            await tools.run([manager, "run", build], cwd=src, env=script_env)
        starts = "start" in scripts or (src / "server.js").is_file()
        return _Layer(path=(str(src / "node_modules" / ".bin"),), env={"NODE_ENV": "production"},
                      web=f"{manager} start" if starts else None,
                      no_web="No Procfile, and package.json has no \"start\" script (nor is there a server.js): "
                             "add a start script, or a Procfile with a web: line")

    async def _node_modules(self, src: Path, package: dict, manager: str, node_version: str, manager_version: str,
                            cache: Path, tools: _Tools) -> None:
        """Install into a cache directory keyed by the dependency manifest and lockfile, then link it into src."""
        lockfile = next((name for name, m in NODE_LOCKFILES if m == manager and (src / name).is_file()), None)
        # Scripts run from the app's own tree, after the link: they are not part of the dependencies.
        manifest = json.dumps({k: v for k, v in package.items() if k != "scripts"}, sort_keys=True).encode()
        copied = [name for name in (lockfile, *NODE_RC_FILES) if name and (src / name).is_file()]
        target = cache / "node" / _digest(node_version, manager, manager_version, manifest,
                                          *(name.encode() + b"\0" + (src / name).read_bytes() for name in copied))
        inputs = f"package.json dependencies and {lockfile}" if lockfile else "package.json dependencies"
        async with _locked(target, self.step_timeout):
            if (target / READY).is_file():
                tools.log(f"Reusing node_modules: Node.js {node_version} and {inputs} unchanged")
            else:
                tools.log(f"Installing Node.js dependencies from {inputs} with {manager}")
                await asyncio.to_thread(shutil.rmtree, target, ignore_errors=True)
                tools.hand_over(target)
                write_beneath(target, "package.json", manifest)
                for name in copied:
                    write_beneath(target, name, read_beneath(src, name))
                await tools.run(_node_install_argv(manager, False, lockfile is not None, cache), cwd=target,
                                env=NODE_INSTALL_ENV)
                _mark_ready(target, node=node_version, manager=manager)
        if (src / "node_modules").exists():
            tools.log("Replacing the node_modules directory committed to the repository")
            await asyncio.to_thread(shutil.rmtree, src / "node_modules")
        if (target / "node_modules").is_dir():
            await _link_tree(target / "node_modules", src / "node_modules", tools)

    # go and static sites

    async def _go(self, src: Path, detection: Detection, cache: Path, tools: _Tools) -> _Layer:
        if tools.which("go") is None:
            raise BuildError("go.mod found, but Go is not installed on the build host: install Go "
                             "(https://go.dev/dl/) so `go` is on the PATH, or add a Dockerfile")
        await tools.run(["go", "version"], cwd=src)
        await tools.run(["go", "build", "-o", "bin/app", "."], cwd=src)
        return _Layer(web="bin/app")

    async def _static(self, src: Path, detection: Detection, cache: Path, tools: _Tools) -> _Layer:
        root = _static_root(src)
        tools.log(f"Static site: serving {root}/" if root != "." else "Static site: serving the app's root directory")
        # The server goes into the build, run by the host's python3: the artifact needs nothing of DevFlow's.
        python = tools.which("python3")
        if python is None:
            raise BuildError("python3 is not installed on the build host; static sites are served with it")
        target = ".devflow/static_server.py"
        write_beneath(src, target, Path(static_server.__file__).read_bytes())
        server = shlex.join([python, "-I", str(src / target), root])
        return _Layer(web=server)


def _default_processes(layers: list[_Layer]) -> dict[str, str]:
    """Without a Procfile the last stack built (the app itself, not its assets) names the web process."""
    if not layers:
        raise BuildError("No Procfile, and nothing the native builder can build (only a Dockerfile, which the "
                         "native builder does not run): add a Procfile with a web: line")
    if layers[-1].web is None:
        raise BuildError(layers[-1].no_web)
    return {"web": layers[-1].web}


def _python_install(src: Path, manager: str) -> _PythonInstall:
    pyproject = (src / "pyproject.toml").read_bytes() if (src / "pyproject.toml").is_file() else b""
    if manager == "uv":
        return _PythonInstall("uv", "pyproject.toml and uv.lock", (pyproject, (src / "uv.lock").read_bytes()),
                              ("uv", "sync", "--locked", "--no-dev", "--no-install-project"))
    if manager == "poetry":
        lock = (src / "poetry.lock").read_bytes() if (src / "poetry.lock").is_file() else b""
        return _PythonInstall("poetry", "pyproject.toml and poetry.lock", (pyproject, lock),
                              ("poetry", "install", "--only", "main", "--no-root", "--no-interaction", "--no-ansi"))
    if manager == "pipenv":
        if not (src / "Pipfile.lock").is_file():
            raise BuildError("Pipfile found without Pipfile.lock: run `pipenv lock` and commit Pipfile.lock")
        return _PythonInstall("pipenv", "Pipfile and Pipfile.lock",
                              ((src / "Pipfile").read_bytes(), (src / "Pipfile.lock").read_bytes()),
                              ("pipenv", "install", "--deploy"))
    if (src / "requirements.txt").is_file():
        files = _requirement_files(src / "requirements.txt")
        return _PythonInstall("pip", "requirements.txt", tuple(f.read_bytes() for f in files),
                              ("pip", "install", "-r", "requirements.txt"),
                              reads_source=any(_reads_source(f) for f in files))
    project = tomllib.loads(pyproject.decode("utf-8")).get("project", {})
    if "dependencies" in project.get("dynamic", []) or "name" not in project:
        return _PythonInstall("pip", "pyproject.toml", (pyproject,), ("pip", "install", "."), reads_source=True)
    dependencies = [str(d) for d in project.get("dependencies", [])]
    # Like `uv sync --no-install-project`: the dependencies only; the app runs from its own directory.
    return _PythonInstall("pip", "the dependencies in pyproject.toml", (json.dumps(dependencies).encode(),),
                          ("pip", "install", *dependencies) if dependencies else ())


def _requirement_files(first: Path) -> list[Path]:
    """requirements.txt and every file it includes with -r/-c: together they decide the environment."""
    files: list[Path] = []
    queue = [first]
    while queue:
        current = queue.pop()
        if current in files or not current.is_file():
            continue
        files.append(current)
        for line in _requirement_lines(current):
            match = re.match(r"^(?:-r|-c|--requirement|--constraint)(?:\s*=\s*|\s+)(\S+)", line)
            if match:
                queue.append((current.parent / match[1]).resolve())
    return files


def _requirement_lines(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace").replace("\\\n", " ")
    return [line for line in (re.sub(r"(^|\s)#.*$", "", raw).strip() for raw in text.splitlines()) if line]


def _reads_source(path: Path) -> bool:
    """Editable installs, local paths and local wheel directories make the environment depend on the tree."""
    for line in _requirement_lines(path):
        if line.startswith(("-e", "--editable", ".", "/", "file:")) or "@ file:" in line:
            return True
        match = re.match(r"^(?:-f|--find-links)(?:\s*=\s*|\s+)(\S+)", line)
        if match and "://" not in match[1]:
            return True
    return False


def _python_web(src: Path, venv: Path) -> tuple[str | None, str]:
    """gunicorn serving the one obvious WSGI app, or why there is no default."""
    example = "'web: gunicorn app:app' or 'web: python app.py'"
    if not (venv / "bin" / "gunicorn").exists():
        return None, f"No Procfile, and gunicorn is not among the dependencies: add a Procfile with a web: line " \
                     f"(e.g. {example}), or add gunicorn and a WSGI app"
    targets = _wsgi_targets(src)
    if len(targets) == 1:
        return f"gunicorn {targets[0]} --bind 0.0.0.0:$PORT", ""
    if targets:
        return None, f"No Procfile, and several modules could be the web app ({', '.join(targets)}): " \
                     f"add a Procfile with a web: line, e.g. 'web: gunicorn {targets[0]}'"
    return None, f"No Procfile, and no {'/'.join(m + '.py' for m in WSGI_MODULES)} defines a WSGI `app` or " \
                 f"`application`: add a Procfile with a web: line (e.g. {example})"


def _wsgi_targets(src: Path) -> list[str]:
    targets = []
    for module in WSGI_MODULES:
        names, imports = _top_level(src / f"{module}.py")
        if imports & ASGI_FRAMEWORKS:
            continue
        attribute = next((a for a in ("application", "app") if a in names), None)
        if attribute:
            targets.append(f"{module}:{attribute}")
    if (src / "manage.py").is_file():  # Django: <project>/wsgi.py defines `application`
        targets += [f"{wsgi.parent.name}.wsgi" for wsgi in sorted(src.glob("*/wsgi.py"))
                    if "application" in _top_level(wsgi)[0]]
    return targets


def _top_level(path: Path) -> tuple[set[str], set[str]]:
    """Names a module binds at top level, and the top-level packages it imports."""
    try:
        tree = ast.parse(path.read_bytes())
    except (OSError, SyntaxError, ValueError):
        return set(), set()
    names: set[str] = set()
    imports: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Import):
            imports.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imports.add((node.module or "").split(".")[0])
            names.update(alias.asname or alias.name for alias in node.names)
    return names, imports


def _node_reads_source(src: Path, package: dict) -> bool:
    sections = ("dependencies", "devDependencies", "optionalDependencies")
    specs = [spec for s in sections if isinstance(package.get(s), dict) for spec in package[s].values()]
    local = any(isinstance(spec, str) and spec.startswith(("file:", "link:", "workspace:", "portal:", ".", "/"))
                for spec in specs)
    return local or "workspaces" in package or (src / "pnpm-workspace.yaml").is_file()


def _node_install_argv(manager: str, modern_yarn: bool, has_lockfile: bool, cache: Path) -> list[str]:
    if manager == "yarn":
        return ["yarn", "install", "--immutable"] if modern_yarn else \
            ["yarn", "install", "--frozen-lockfile", "--production=false", "--non-interactive"]
    if manager == "pnpm":
        return ["pnpm", "install", "--frozen-lockfile", "--store-dir", str(cache / "pnpm-store")]
    return ["npm", "ci" if has_lockfile else "install", "--include=dev", "--no-audit", "--no-fund"]


def _static_root(src: Path) -> str:
    """The directory to serve: the first line of .static when it names one (e.g. `dist`), else the root."""
    marker = src / ".static"
    if marker.is_symlink():
        # Build scripts ran as the app user before this root-side read: a link could point anywhere.
        raise BuildError(".static must be a plain file, not a symlink")
    lines = marker.read_text(encoding="utf-8", errors="replace").splitlines() if marker.is_file() else []
    root = next((line.strip() for line in lines if line.strip() and not line.startswith("#")), ".")
    resolved = (src / root).resolve()
    if os.path.isabs(root) or not resolved.is_relative_to(src) or not resolved.is_dir():
        raise BuildError(f".static names {root!r}, which is not a directory inside the app "
                         "(after the build): write a relative directory like `dist`, or leave .static empty")
    return root


async def _link_tree(source: Path, target: Path, tools: _Tools) -> None:
    """Hard links share the cached files at no cost in space; a copy where links cannot cross filesystems.

    `cp` runs as the app's user: both trees are the app's, and root walking them could be sent elsewhere by a
    link the app swaps in while the walk is under way.
    """
    if await tools.output(["cp", "-a", "--link", str(source), str(target)], cwd=source.parent) is None:
        tools.log("Cannot hard-link node_modules from the cache (another filesystem?): copying it")
        await tools.run(["rm", "-rf", str(target)], cwd=source.parent)
        await tools.run(["cp", "-a", str(source), str(target)], cwd=source.parent)


@asynccontextmanager
async def _locked(path: Path, timeout: float) -> AsyncIterator[None]:
    """One build at a time fills a cache entry; the other waits, then reuses it."""
    # The cache belongs to the app user: never follow a link planted where the lock goes.
    lock_fd = os.open(path.parent / f"{path.name}.lock", os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    with open(lock_fd, "w") as handle:
        for _ in range(int(timeout / LOCK_POLL) + 1):
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                await asyncio.sleep(LOCK_POLL)
        else:
            raise BuildError(f"another build kept the cache entry {path.name} busy for {timeout:.0f} seconds")
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _digest(*parts: str | bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "big") + data)
    return digest.hexdigest()[:24]


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", version)[:3])


def _without_own_venv(path: str) -> str:
    """Drop DevFlow's own virtual environment from PATH so apps never pick up its python."""
    if sys.prefix == sys.base_prefix:
        return path
    own = os.path.realpath(Path(sys.prefix) / "bin")
    return os.pathsep.join(p for p in path.split(os.pathsep) if p and os.path.realpath(p) != own)


def _certifi_bundle() -> str | None:
    try:
        import certifi
    except ImportError:
        return None
    return certifi.where()


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
