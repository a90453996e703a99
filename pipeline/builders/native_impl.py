"""Native builder: install an app's dependencies with its own tools, on the host.

Dependencies are cached per app under `cache`, in directories named by a hash of what
produced them (interpreter, manifests, lockfiles), so a push that leaves them unchanged
installs nothing. A virtual environment writes its own absolute path into its scripts and
cannot move, so processes run it where it was built, in the cache; node_modules can move,
so it is hard-linked into the build. Build tools run app code (setup.py, npm scripts) as the
app's user, which owns the build and the caches: whatever the daemon reads or writes there goes
through pipeline.app_owned_files, in a thread, and trees are removed or copied by the app's user.
What the tools print is read a bounded chunk at a time: probes (whose programs the app controls: `import
django` imports the app's own package) are stopped past PROBE_OUTPUT_BYTES. Lines the build shows name no
server path: the app's build directory and cache are shown as <app> and <cache>.
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
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from pipeline import app_owned_files as owned
from pipeline import static_server
from pipeline.builders import BuildError, BuildResult, Sandbox
from pipeline.builders.failure_excerpt import failure_excerpt
from pipeline.detect import NODE_LOCKFILES, DetectError, Detection, NodePackage
from pipeline.limits import MARKER_FILE_BYTES, MAX_REQUIREMENT_FILES, SCANNED_SOURCE_BYTES, Limits, byte_size
from runtime.log_lines import MAX_LINE_BYTES, LineSplitter

Log = Callable[[str], None]

STEP_TIMEOUT = 30 * 60.0
PROBE_TIMEOUT = 60.0
# A version, a path or a list of Go packages: a probe that prints more is stopped, and counts as failed.
PROBE_OUTPUT_BYTES = 64 * 1024
# A line of tool output longer than MAX_LINE_BYTES is shown in pieces; the lines kept for a failure's excerpt are
# cut to FAILURE_LINE_CHARS (the excerpt shows fewer).
FAILURE_LINE_CHARS = 1024
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
# The lines of a failed step's output kept to pick the excerpt from.
FAILURE_TAIL_LINES = 200
# App config vars reach the build, as on Heroku, except those that would break the build tools (Heroku's
# buildpacks keep the same out); PATH is the platform's.
BUILD_ENV_IGNORED = {"GIT_DIR", "CPATH", "CPPATH", "LD_PRELOAD", "LD_LIBRARY_PATH", "LIBRARY_PATH", "PYTHONHOME"}
# Python versions looked for on the PATH when listing what an app can use.
PYTHON_MINORS = tuple(f"3.{minor}" for minor in range(6, 30))
INSTALL_PYTHON = ("have an admin install it where every user can read it (pyenv with PYENV_ROOT under /opt "
                  "or /usr/local, or the distribution's package), or change {file}")
DOCKERFILE_FOUND = ("Dockerfile found, but this DevFlow runs apps natively (container mode comes with the Docker "
                    "runtime)")
COLLECTSTATIC_ADVICE = ("Error while running `python manage.py collectstatic --noinput` (see the traceback above). "
                        "Fix the app's static files settings, or skip this step: "
                        "config:set <app> DISABLE_COLLECTSTATIC=1 (https://devcenter.heroku.com/articles/django-assets)")
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
    material: tuple[str, ...]  # what the environment depends on: texts, or digests of the files
    argv: tuple[str, ...]
    reads_source: bool = False  # local paths or the project itself: the result is not cacheable


def _mark_ready(cache: Path, entry: str, **facts: str) -> None:
    """A cache entry is complete: later builds with the same inputs reuse it. An entry removed during the install
    (by the app's own processes) is not made again: that would be root's directory, empty but marked ready."""
    try:
        owned.write_file(cache, f"{entry}/{READY}", json.dumps(facts).encode() + b"\n")
    except owned.DirectoryGone:
        raise BuildError(f"the cache directory {entry} was removed while the dependencies were installed into it "
                         "(by the app's own processes?), so nothing was cached: push again") from None


def _make_dir(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)


class _Tools:
    """Runs build tools with the build's environment (in `sandbox`, when there is one), streaming their output
    line by line. `over_memory` says why a tool was killed when the build went over its memory; `places` maps
    the server paths of the build's trees to what the log shows instead (`<app>`, `<cache>`)."""

    def __init__(self, env: dict[str, str], log: Log, timeout: float, sandbox: Sandbox | None,
                 over_memory: str, places: dict[str, str] | None = None) -> None:
        self.env = env
        self._log = log
        self.timeout = timeout
        self.sandbox = sandbox
        self.preexec = sandbox.preexec if sandbox is not None else None
        self.over_memory = over_memory
        # Longest first: a tree's path may begin with another's.
        self.places = dict(sorted((places or {}).items(), key=lambda place: -len(place[0])))

    def log(self, line: str) -> None:
        self._log(self._hide(line))

    def _hide(self, text: str) -> str:
        for path, shown in self.places.items():
            text = text.replace(path, shown)
        return text

    def which(self, name: str, env: dict[str, str] | None = None) -> str | None:
        return shutil.which(name, path=(env or self.env).get("PATH", os.defpath))

    async def run(self, argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> None:
        env = {**self.env, **(env or {})}
        shown = self._shown(argv)
        executable = self.which(argv[0], env) if os.sep not in argv[0] else argv[0]
        if executable is None:
            raise BuildError(f"{Path(argv[0]).name} is not installed on the build host")
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
            raise BuildError(f"cannot run {Path(executable).name}: {why}. Builds run as the app's user: the tool, "
                             "and the interpreter a script names, must be readable and executable by all "
                             "users") from None
        tail: deque[str] = deque(maxlen=FAILURE_TAIL_LINES)
        kills = await self._memory_kills()
        try:
            await asyncio.wait_for(self._pump(proc, tail), self.timeout)
        except TimeoutError:
            raise BuildError(f"`{shown}` did not finish within {self.timeout:.0f} seconds") from None
        finally:
            if proc.returncode is None:
                _kill_group(proc)
                await proc.wait()
        if proc.returncode != 0:
            errors = failure_excerpt(tail)
            if await self._memory_kills() > kills:
                raise BuildError("\n".join([f"`{shown}` was killed: {self.over_memory}", *errors]))
            raise BuildError("\n".join([f"`{shown}` failed with exit status {proc.returncode}:", *errors]))

    async def _memory_kills(self) -> int:
        """Processes of the build the kernel killed for its memory so far."""
        return await asyncio.to_thread(self.sandbox.memory_kills) if self.sandbox is not None else 0

    async def _pump(self, proc: asyncio.subprocess.Process, tail: deque[str]) -> None:
        """The tool's output, a line at a time, however it comes: at most MAX_LINE_BYTES of it is held."""
        assert proc.stdout is not None
        lines = LineSplitter()  # a tool that never ends its line still gets heard
        while chunk := await proc.stdout.read(MAX_LINE_BYTES):
            for line in lines.feed(chunk):
                self._emit(line, tail)
        for line in lines.end():
            self._emit(line, tail)
        await proc.wait()

    def _emit(self, raw: bytes, tail: deque[str]) -> None:
        # A carriage return redraws a progress line: only its last state is worth a log line.
        text = self._hide(raw.rstrip().rsplit(b"\r", 1)[-1].decode("utf-8", "replace"))
        self._log(text)
        if text.strip():
            tail.append(text[:FAILURE_LINE_CHARS])

    async def output(self, argv: list[str], cwd: Path) -> str | None:
        """A probe's stdout, or None when the program is missing, fails, prints more than PROBE_OUTPUT_BYTES
        or takes longer than PROBE_TIMEOUT seconds (then it is killed, with whatever it started)."""
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, cwd=cwd, env=self.env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL, start_new_session=True, preexec_fn=self.preexec)
        except OSError:
            return None
        try:
            stdout = await asyncio.wait_for(_bounded_output(proc), PROBE_TIMEOUT)
        except TimeoutError:
            self.log(f"`{self._shown(argv)}` did not finish within {PROBE_TIMEOUT:.0f} seconds: stopped")
            return None
        finally:
            if proc.returncode is None:
                _kill_group(proc)
                await proc.wait()
        if stdout is None:
            self.log(f"`{self._shown(argv)}` printed more than {byte_size(PROBE_OUTPUT_BYTES)}: stopped")
            return None
        return stdout.decode("utf-8", "replace").strip() if proc.returncode == 0 else None

    def _shown(self, argv: list[str]) -> str:
        """The command as the log shows it: the program by its name, the build's trees by theirs."""
        return self._hide(shlex.join([Path(argv[0]).name, *argv[1:]]))


async def _bounded_output(proc: asyncio.subprocess.Process) -> bytes | None:
    """All of a probe's stdout, once it has exited; None as soon as it goes past PROBE_OUTPUT_BYTES."""
    assert proc.stdout is not None
    output = bytearray()
    while chunk := await proc.stdout.read(PROBE_OUTPUT_BYTES):
        output += chunk
        if len(output) > PROBE_OUTPUT_BYTES:
            return None
    await proc.wait()
    return bytes(output)


class NativeBuilder:
    name = "native"

    def __init__(self, extra_ca_file: Path | None = None, *, limits: Limits | None = None,
                 step_timeout: float = STEP_TIMEOUT) -> None:
        self.extra_ca_file = extra_ca_file
        self.limits = limits or Limits()
        self.step_timeout = step_timeout

    async def build(self, src: Path, detection: Detection, cache: Path, env: dict[str, str], log: Log,
                    sandbox: Sandbox | None = None) -> BuildResult:
        try:
            return await self._build(src, detection, cache, env, log, sandbox)
        except (owned.UnsafeAppFile, DetectError) as exc:
            raise BuildError(str(exc)) from None

    async def _build(self, src: Path, detection: Detection, cache: Path, env: dict[str, str], log: Log,
                     sandbox: Sandbox | None) -> BuildResult:
        if detection.has_dockerfile:
            if not (detection.stacks or detection.procfile):
                raise BuildError(f"{DOCKERFILE_FOUND}, and there is nothing else to build: add a Procfile with a "
                                 "web: line, or the app's own files (requirements.txt, pyproject.toml, package.json, "
                                 "go.mod, index.html)")
            log(f"{DOCKERFILE_FOUND}; building with the native builder from the other files instead")
        hand_over = sandbox.hand_over if sandbox is not None else _make_dir

        def prepare() -> tuple[Path, Path, dict[str, str]]:
            resolved = cache.resolve()
            for directory in (resolved, *(resolved / name for name in CACHE_DIRS)):
                hand_over(directory)
            return src.resolve(), resolved, self._tool_env(env, resolved)

        src, cache, tool_env = await asyncio.to_thread(prepare)
        over_memory = str(self.limits.refuse("max_build_memory", "it went over the memory a build may use"))
        tools = _Tools(tool_env, log, self.step_timeout, sandbox, over_memory,
                       places={str(src): "<app>", str(cache): "<cache>"})
        steps = {"node": self._node, "python": self._python, "go": self._go, "static": self._static}
        layers = [await steps[stack](src, detection, cache, tools) for stack in detection.stacks]
        processes = dict(detection.procfile) or _default_processes(layers)
        runtime_env = {"PYTHONUNBUFFERED": "1"}
        for layer in layers:
            runtime_env.update(layer.env)
        # The primary stack (built last) comes first on the PATH: its python, then node's tools.
        runtime_env["PATH"] = os.pathsep.join([p for layer in reversed(layers) for p in layer.path]
                                              + [tools.env["PATH"]])
        tools.log(f"Processes: {', '.join(f'{kind}: {command}' for kind, command in processes.items())}")
        return BuildResult(processes=processes, env=runtime_env)

    # environment

    def _tool_env(self, env: dict[str, str], cache: Path) -> dict[str, str]:
        host = {k: v for k, v in os.environ.items() if k in HOST_ENV or k.startswith(HOST_ENV_PREFIXES)}
        tool_env = {**host, **{k: v for k, v in env.items() if k not in BUILD_ENV_IGNORED}}
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
            bundle = str(self._ca_bundle(cache, host))
            tool_env.update(dict.fromkeys(CA_VARS, bundle))
        return tool_env

    def _ca_bundle(self, cache: Path, host: dict[str, str]) -> Path:
        """The host's trusted CAs plus the extra file: pip and npm replace their defaults with a given bundle.

        The sources come from the daemon's own environment only: root copies them where the app can read them."""
        assert self.extra_ca_file is not None
        # The push output names the setting, not the file: the admin knows where it is, the pusher need not.
        try:
            extra = self.extra_ca_file.read_text()
        except OSError as exc:
            raise BuildError(f"the extra CA file (devflow up --extra-ca-certs) cannot be read: {exc.strerror}") \
                from None
        if "-----BEGIN CERTIFICATE-----" not in extra:
            raise BuildError("the extra CA file (devflow up --extra-ca-certs) holds no PEM certificate")
        defaults = ssl.get_default_verify_paths()
        sources = [host.get(k) for k in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "PIP_CERT")]
        sources += [defaults.cafile, defaults.openssl_cafile, _certifi_bundle()]
        parts = []
        for source in dict.fromkeys(os.path.realpath(s) for s in sources if s and os.path.isfile(s)):
            parts.append(Path(source).read_text(errors="replace"))
        parts.append(extra)
        owned.write_file(cache, "ca-bundle.pem", ("\n".join(part.strip() for part in parts) + "\n").encode())
        return cache / "ca-bundle.pem"

    # python

    async def _python(self, src: Path, detection: Detection, cache: Path, tools: _Tools) -> _Layer:
        python, version = await self._interpreter(detection, cache, tools)
        install = await asyncio.to_thread(self._python_install, src, detection)
        if install.tool != "pip" and tools.which(install.tool) is None:
            raise BuildError(MISSING_TOOL[install.tool])
        if install.reads_source:
            # Installs that copy or point at the app's own files live and die with this build.
            base, entry = src, ".venv"
            tools.log(f"{install.inputs} installs files from the app itself: building a fresh environment in .venv")
            await _remove(base, entry, tools)
            await self._install_python(src, base / entry, python, install, tools)
        else:
            base, entry = cache, f"python/{_digest(python, version, install.tool, *install.material)}"
            async with _locked(cache, entry, self.step_timeout):
                if await asyncio.to_thread(owned.is_file, cache, f"{entry}/{READY}"):
                    tools.log(f"Reusing the Python environment: Python {version} and {install.inputs} unchanged")
                else:
                    tools.log(f"Installing Python dependencies from {install.inputs} with {install.tool}")
                    await _remove(cache, entry, tools)
                    await self._install_python(src, cache / entry, python, install, tools)
                    await asyncio.to_thread(_mark_ready, cache, entry, python=python, version=version,
                                            tool=install.tool)
        venv = base / entry
        await self._collectstatic(src, venv, tools)
        web, no_web = (None, "") if detection.procfile else \
            await asyncio.to_thread(_python_web, src, base, entry, self.limits.max_app_files)
        return _Layer(path=(str(venv / "bin"),), env={"VIRTUAL_ENV": str(venv)}, web=web, no_web=no_web)

    async def _interpreter(self, detection: Detection, cache: Path, tools: _Tools) -> tuple[str, str]:
        """The host Python matching the app's version file (same minor version), as (executable, x.y.z).

        Each candidate is probed as the app's user: one it cannot run (root's pyenv, say) is no candidate,
        and the error says that it is there but out of the app's reach."""
        wanted, version_file = detection.python_version, detection.python_version_file or ".python-version"
        minor = ".".join(wanted.split(".")[:2]) if wanted else ""
        pyenv, on_path = await asyncio.to_thread(_host_pythons, minor)
        candidates = [tools.which(f"python{minor}")] if minor else []
        candidates += [executable for name, executable in pyenv if name == minor or name.startswith(f"{minor}.")]
        candidates.append(tools.which("python3"))
        found = await _probe_pythons(candidates, cache, tools)
        if not found and not wanted:
            raise BuildError("Python is not installed on the build host: install Python 3 so `python3` is on "
                             "the PATH, or add a Dockerfile")
        matching = [(p, v) for p, v in found.items() if not wanted or v == wanted or v.startswith(f"{minor}.")]
        if not matching:
            usable = await _probe_pythons([tools.which(f"python{m}") for m in PYTHON_MINORS]
                                          + [executable for _, executable in pyenv], cache, tools)
            have = ", ".join(sorted(set(usable.values()) | set(found.values()), key=_version_key)) or "none"
            unreachable = [name for name, _ in pyenv if name == minor or name.startswith(f"{minor}.")]
            unreachable += [minor] if on_path and not unreachable and on_path not in usable else []
            how = INSTALL_PYTHON.format(file=version_file)
            if unreachable:
                raise BuildError(f"Python {unreachable[0]} is installed on the build host, but where the app's user "
                                 f"cannot run it (builds run as the app's own user; root's pyenv, say, is private "
                                 f"to root). The versions the app can use: {have}. To use {minor}, {how}")
            raise BuildError(f"Python {wanted} is requested by {version_file} but not installed on the build host. "
                             f"The versions the app can use: {have}. To use {minor}, {how}")
        python, version = next(((p, v) for p, v in matching if v == wanted), matching[0])
        if not wanted:
            tools.log(f"Using Python {version}; add a .python-version file to choose the version")
        elif version.startswith(wanted):
            tools.log(f"Using Python {version}")
        else:
            tools.log(f"Using Python {version}: {wanted} was requested, the same minor version")
        return python, version

    def _python_install(self, src: Path, detection: Detection) -> _PythonInstall:
        """What to run and what the environment depends on. Blocking (it reads the app's manifests). Lockfiles
        are hashed a chunk at a time; requirements.txt is read whole (within max_parsed_manifest_bytes): its
        includes and local paths matter."""
        def digest(name: str, required: bool = False, setting: str = "max_manifest_bytes") -> str:
            value = owned.file_digest(src, name, getattr(self.limits, setting), setting=setting)
            if value is None and required:
                raise BuildError(f"{name} is gone: it was there when the push was detected")
            return value or ""

        def pyproject() -> str:
            return digest("pyproject.toml", setting="max_parsed_manifest_bytes")

        manager = detection.python_manager or "pip"
        if manager == "uv":
            return _PythonInstall("uv", "pyproject.toml and uv.lock", (pyproject(), digest("uv.lock", True)),
                                  ("uv", "sync", "--locked", "--no-dev", "--no-install-project"))
        if manager == "poetry":
            return _PythonInstall("poetry", "pyproject.toml and poetry.lock", (pyproject(), digest("poetry.lock")),
                                  ("poetry", "install", "--only", "main", "--no-root", "--no-interaction", "--no-ansi"))
        if manager == "pipenv":
            if not owned.exists(src, "Pipfile.lock"):
                raise BuildError("Pipfile found without Pipfile.lock: run `pipenv lock` and commit Pipfile.lock")
            return _PythonInstall("pipenv", "Pipfile and Pipfile.lock",
                                  (digest("Pipfile", True), digest("Pipfile.lock")), ("pipenv", "install", "--deploy"))
        if owned.exists(src, "requirements.txt"):
            texts, uncached = _requirement_files(src, self.limits.max_parsed_manifest_bytes)
            return _PythonInstall("pip", "requirements.txt", tuple(texts), ("pip", "install", "-r", "requirements.txt"),
                                  reads_source=uncached or any(_reads_source(t) for t in texts))
        dependencies = detection.python_dependencies
        if dependencies is None:
            return _PythonInstall("pip", "pyproject.toml", (), ("pip", "install", "."), reads_source=True)
        # Like `uv sync --no-install-project`: the dependencies only; the app runs from its own directory.
        return _PythonInstall("pip", "the dependencies in pyproject.toml", (json.dumps(dependencies),),
                              ("pip", "install", *dependencies) if dependencies else ())

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

    async def _collectstatic(self, src: Path, venv: Path, tools: _Tools) -> None:
        """As Heroku's Python buildpack does for Django apps, with the app's config vars in the environment."""
        if not await asyncio.to_thread(owned.is_file, src, "manage.py"):
            return
        python = str(venv / "bin" / "python")
        if await tools.output([python, "-c", "import django"], cwd=src) is None:
            return
        if tools.env.get("DISABLE_COLLECTSTATIC", "0") not in ("", "0"):
            tools.log("Skipping Django's collectstatic: DISABLE_COLLECTSTATIC is set")
            return
        try:
            await tools.run([python, "manage.py", "collectstatic", "--noinput", "--traceback"], cwd=src,
                            env={"PYTHONPATH": tools.env.get("PYTHONPATH") or "."})
        except BuildError as exc:
            raise BuildError(f"{exc}\n{COLLECTSTATIC_ADVICE}") from None

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
        package = detection.node_package
        assert package is not None  # detected with the node stack
        files, pnpm_workspace = await asyncio.to_thread(self._node_inputs, src, manager, package)
        scripts = package.scripts
        script_env = {"NODE_ENV": tools.env.get("NODE_ENV", "production")}
        modern_yarn = manager == "yarn" and not manager_version.startswith("1.")
        if modern_yarn or package.reads_source or pnpm_workspace:
            # Workspaces, local packages and Yarn 2+ (its own release and settings in the tree) need the whole app.
            tools.log("Installing Node.js dependencies in place (workspaces, local packages or Yarn 2+ need the "
                      "whole app), without the node_modules cache")
            lockfile = any(name not in NODE_RC_FILES for name, _ in files)
            await tools.run(_node_install_argv(manager, modern_yarn, lockfile, cache), cwd=src, env=NODE_INSTALL_ENV)
        else:
            await self._node_modules(src, package, files, manager, node_version, manager_version, cache, tools)
            for hook in NODE_INSTALL_HOOKS:
                if hook in scripts:
                    await tools.run([manager, "run", hook], cwd=src, env=script_env)
        build = next((name for name in ("heroku-postbuild", "build") if name in scripts), None)
        if build:
            await tools.run([manager, "run", build], cwd=src, env=script_env)
        starts = "start" in scripts or await asyncio.to_thread(owned.is_file, src, "server.js")
        return _Layer(path=(str(src / "node_modules" / ".bin"),), env={"NODE_ENV": "production"},
                      web=f"{manager} start" if starts else None,
                      no_web="No Procfile, and package.json has no \"start\" script (nor is there a server.js): "
                             "add a start script, or a Procfile with a web: line")

    def _node_inputs(self, src: Path, manager: str, package: NodePackage) -> tuple[list[tuple[str, str]], bool]:
        """The manager's lockfile and the rc files (name, digest), and whether pnpm-workspace.yaml exists. Blocking
        (it reads the app's files). package.json itself was parsed by detection: it must be the same file still."""
        bounds = self.limits
        digest = owned.file_digest(src, "package.json", bounds.max_parsed_manifest_bytes,
                                   setting="max_parsed_manifest_bytes")
        if digest is None:
            raise BuildError("package.json is gone: it was there when the push was detected")
        if digest != package.digest:
            raise BuildError("package.json changed since the push was detected (by the app's own processes?): "
                             "push again")
        # Whatever is there is read (and refused unless a plain file): a lockfile turned into a FIFO is no reason
        # to install without one.
        lockfile = next((name for name, m in NODE_LOCKFILES if m == manager and owned.exists(src, name)), None)
        files = []
        for name in (lockfile, *NODE_RC_FILES):
            if name and (digest := owned.file_digest(src, name, bounds.max_manifest_bytes,
                                                     setting="max_manifest_bytes")) is not None:
                files.append((name, digest))
        return files, owned.is_file(src, "pnpm-workspace.yaml")

    async def _node_modules(self, src: Path, package: NodePackage, files: list[tuple[str, str]], manager: str,
                            node_version: str, manager_version: str, cache: Path, tools: _Tools) -> None:
        """Install into a cache directory keyed by the dependency manifest and lockfile, then link it into src."""
        lockfile = next((name for name, _ in files if name not in NODE_RC_FILES), None)
        entry = "node/" + _digest(node_version, manager, manager_version, package.manifest,
                                  *(f"{name}\0{digest}" for name, digest in files))
        inputs = f"package.json dependencies and {lockfile}" if lockfile else "package.json dependencies"
        async with _locked(cache, entry, self.step_timeout):
            if await asyncio.to_thread(owned.is_file, cache, f"{entry}/{READY}"):
                tools.log(f"Reusing node_modules: Node.js {node_version} and {inputs} unchanged")
            else:
                tools.log(f"Installing Node.js dependencies from {inputs} with {manager}")
                await _remove(cache, entry, tools)
                await _make_directory(cache, entry, tools)
                await asyncio.to_thread(self._copy_node_inputs, src, cache, entry, package, files)
                await tools.run(_node_install_argv(manager, False, lockfile is not None, cache), cwd=cache / entry,
                                env=NODE_INSTALL_ENV)
                await asyncio.to_thread(_mark_ready, cache, entry, node=node_version, manager=manager)
        if await asyncio.to_thread(owned.exists, src, "node_modules"):
            tools.log("Replacing the node_modules directory committed to the repository")
            await _remove(src, "node_modules", tools)
        if await asyncio.to_thread(owned.is_directory, cache, f"{entry}/node_modules"):
            await _link_tree(cache / entry / "node_modules", src / "node_modules", tools)

    def _copy_node_inputs(self, src: Path, cache: Path, entry: str, package: NodePackage,
                          files: list[tuple[str, str]]) -> None:
        """What the install in the cache entry reads: the manifest without scripts, the lockfile and rc files,
        each the very bytes the entry's name was made from. Blocking."""
        owned.write_file(cache, f"{entry}/package.json", package.manifest)
        for name, digest in files:
            copied = owned.copy_file(src, name, cache, f"{entry}/{name}", self.limits.max_manifest_bytes,
                                     setting="max_manifest_bytes")
            if copied != digest:
                raise BuildError(f"{name} {'is gone' if copied is None else 'changed'} while the build read it "
                                 "(by the app's own processes?): push again")

    # go and static sites

    async def _go(self, src: Path, detection: Detection, cache: Path, tools: _Tools) -> _Layer:
        """Like Heroku's Go buildpack: each main package becomes bin/<last element of its import path>."""
        if tools.which("go") is None:
            raise BuildError("go.mod found, but Go is not installed on the build host: install Go "
                             "(https://go.dev/dl/) so `go` is on the PATH, or add a Dockerfile")
        await tools.run(["go", "version"], cwd=src)
        await tools.run(["go", "build", "-o", "bin/", "./..."], cwd=src)
        listed = await tools.output(["go", "list", "-f", '{{if eq .Name "main"}}{{.ImportPath}}{{end}}', "./..."],
                                    cwd=src) or ""
        programs = {path: f"bin/{_go_executable_name(path)}" for path in listed.split()}
        module = detection.go_module
        where = {path: "." + path.removeprefix(module) if module and path.startswith(module) else path
                 for path in programs}
        tools.log("Built " + (", ".join(f"{binary} (from {where[path]})" for path, binary in programs.items())
                              or "no program: the module has no main package"))
        if module in programs:
            return _Layer(web=programs[module])
        if len(programs) == 1:
            return _Layer(web=next(iter(programs.values())))
        if programs:
            first = next(iter(programs.values()))
            return _Layer(no_web=f"No Procfile, and several Go programs were built, none from the module's root "
                                 f"package: add a Procfile with a web: line, e.g. 'web: {first}'")
        return _Layer(no_web="No Procfile, and the module has no main package to run: add one, or a Procfile with a "
                             "web: line")

    async def _static(self, src: Path, detection: Detection, cache: Path, tools: _Tools) -> _Layer:
        root = await asyncio.to_thread(_static_root, src)
        tools.log(f"Static site: serving {root}/" if root != "." else "Static site: serving the app's root directory")
        # The server goes into the build, run by the host's python3: the artifact needs nothing of DevFlow's.
        if tools.which("python3") is None:
            raise BuildError("python3 is not installed on the build host; static sites are served with it")
        target = ".devflow/static_server.py"
        await _make_directory(src, ".devflow", tools)
        await asyncio.to_thread(_copy_static_server, src, target)
        # Relative to the process's working directory: the release, wherever the process sees it (/app).
        return _Layer(web=shlex.join(["python3", "-I", target, root]))


def _default_processes(layers: list[_Layer]) -> dict[str, str]:
    """Without a Procfile the last stack built (the app itself, not its assets) names the web process."""
    if layers[-1].web is None:
        raise BuildError(layers[-1].no_web)
    return {"web": layers[-1].web}


def _copy_static_server(src: Path, target: str) -> None:
    owned.write_file(src, target, Path(static_server.__file__).read_bytes())


async def _make_directory(base: Path, relative: str, tools: _Tools) -> None:
    """Made by the app's user, in a tree of the app's: one root made would be root's, a directory the app's user
    could neither empty nor remove."""
    if await tools.output(["mkdir", "-p", "--", relative], cwd=base) is None:
        raise BuildError(f"cannot create the directory {relative}")


async def _remove(base: Path, relative: str, tools: _Tools) -> None:
    """Remove a tree of the app's, as the app's user: root walking it could be sent anywhere by a link, or
    stopped by a FIFO, that the app swaps in while the walk is under way."""
    if await asyncio.to_thread(owned.exists, base, relative):
        await tools.run(["rm", "-rf", "--", relative], cwd=base)


def _requirement_files(src: Path, budget: int) -> tuple[list[str], bool]:
    """requirements.txt and every file it includes with -r/-c, which together decide the environment, and
    whether something else does (a URL, a file outside the app, more includes than are followed): then the
    environment is not cacheable. All of them together are bounded by `budget` bytes."""
    texts: list[str] = []
    seen: set[str] = set()
    queue = ["requirements.txt"]
    uncached = False
    left = budget
    while queue:
        current = queue.pop()
        if current in seen:
            continue
        if len(seen) == MAX_REQUIREMENT_FILES:
            uncached = True
            break
        seen.add(current)
        try:
            data = owned.read_file(src, current, left)
        except owned.FileTooLarge:
            what = "requirements.txt is" if not texts else "requirements.txt and the files it includes are"
            raise owned.FileTooLarge(f"{what} larger than {byte_size(budget)}{' in all' if texts else ''} (an admin "
                                     "can raise the limit with devflow up --max-parsed-manifest-bytes)") from None
        if data is None:
            continue
        left -= len(data)
        text = data.decode("utf-8", "replace")
        texts.append(text)
        for line in _requirement_lines(text):
            match = re.match(r"^(?:-r|-c|--requirement|--constraint)(?:\s*=\s*|\s+)(\S+)", line)
            if match:
                included = os.path.normpath(PurePosixPath(current).parent / match[1])
                if "://" in match[1] or os.path.isabs(included) or included.startswith(".."):
                    uncached = True  # pip reads it, as the app's user; the daemon does not
                else:
                    queue.append(included)
    return texts, uncached


def _requirement_lines(text: str) -> list[str]:
    text = text.replace("\\\n", " ")
    return [line for line in (re.sub(r"(^|\s)#.*$", "", raw).strip() for raw in text.splitlines()) if line]


def _reads_source(requirements: str) -> bool:
    """Editable installs, local paths and local wheel directories make the environment depend on the tree."""
    for line in _requirement_lines(requirements):
        if line.startswith(("-e", "--editable", ".", "/", "file:")) or "@ file:" in line:
            return True
        match = re.match(r"^(?:-f|--find-links)(?:\s*=\s*|\s+)(\S+)", line)
        if match and "://" not in match[1]:
            return True
    return False


def _python_web(src: Path, base: Path, venv: str, max_entries: int) -> tuple[str | None, str]:
    """gunicorn serving the one obvious WSGI app, or why there is no default. Blocking (it reads the app)."""
    example = "'web: gunicorn app:app' or 'web: python app.py'"
    if not owned.is_file(base, f"{venv}/bin/gunicorn"):
        return None, f"No Procfile, and gunicorn is not among the dependencies: add a Procfile with a web: line " \
                     f"(e.g. {example}), or add gunicorn and a WSGI app"
    targets = _wsgi_targets(src, max_entries)
    if len(targets) == 1:
        return f"gunicorn {targets[0]} --bind 0.0.0.0:$PORT", ""
    if targets:
        return None, f"No Procfile, and several modules could be the web app ({', '.join(targets)}): " \
                     f"add a Procfile with a web: line, e.g. 'web: gunicorn {targets[0]}'"
    return None, f"No Procfile, and no {'/'.join(m + '.py' for m in WSGI_MODULES)} defines a WSGI `app` or " \
                 f"`application`: add a Procfile with a web: line (e.g. {example})"


def _wsgi_targets(src: Path, max_entries: int) -> list[str]:
    targets = []
    for module in WSGI_MODULES:
        names, imports = _top_level(src, f"{module}.py")
        if imports & ASGI_FRAMEWORKS:
            continue
        attribute = next((a for a in ("application", "app") if a in names), None)
        if attribute:
            targets.append(f"{module}:{attribute}")
    if owned.is_file(src, "manage.py"):  # Django: <project>/wsgi.py defines `application`
        targets += [f"{project}.wsgi" for project in owned.subdirectories(src, "", max_entries)
                    if "application" in _top_level(src, f"{project}/wsgi.py")[0]]
    return targets


def _top_level(src: Path, module: str) -> tuple[set[str], set[str]]:
    """Names a module binds at top level, and the top-level packages it imports; nothing for a module that is
    missing, not a plain file, too large to be an entry point, or not Python."""
    try:
        source = owned.read_file(src, module, SCANNED_SOURCE_BYTES)
        tree = ast.parse(source or b"")
    except (owned.UnsafeAppFile, SyntaxError, ValueError, RecursionError, MemoryError):
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


def _node_install_argv(manager: str, modern_yarn: bool, has_lockfile: bool, cache: Path) -> list[str]:
    if manager == "yarn":
        return ["yarn", "install", "--immutable"] if modern_yarn else \
            ["yarn", "install", "--frozen-lockfile", "--production=false", "--non-interactive"]
    if manager == "pnpm":
        return ["pnpm", "install", "--frozen-lockfile", "--store-dir", str(cache / "pnpm-store")]
    return ["npm", "ci" if has_lockfile else "install", "--include=dev", "--no-audit", "--no-fund"]


def _go_executable_name(import_path: str) -> str:
    """What `go build -o dir/` names a main package: its import path's last element, skipping a major
    version suffix (example.com/tool/v2 -> tool)."""
    parent, _, last = import_path.rpartition("/")
    if parent and re.fullmatch(r"v[1-9][0-9]*", last):
        return parent.rpartition("/")[2]
    return last


def _static_root(src: Path) -> str:
    """The directory to serve: the first line of .static when it names one (e.g. `dist`), else the root.
    Blocking (it reads the app)."""
    lines = (owned.read_text(src, ".static", MARKER_FILE_BYTES) or "").splitlines()
    root = next((line.strip() for line in lines if line.strip() and not line.startswith("#")), ".")
    refusal = BuildError(f".static names {root[:80]!r}, which is not a directory inside the app (after the build): "
                         "write a relative directory like `dist`, or leave .static empty")
    if os.path.isabs(root) or "\0" in root:
        raise refusal
    try:
        if not owned.is_directory(src, root):
            raise refusal
    except owned.UnsafeAppFile:
        raise refusal from None
    return root


def _host_pythons(minor: str) -> tuple[list[tuple[str, str]], str | None]:
    """What the daemon sees installed, whether the app's user can run it or not: (version, executable) of each
    pyenv Python (PYENV_ROOT, else ~/.pyenv), and python<minor> on the daemon's PATH. From the daemon's own
    environment, not the app's: an app's config cannot point the daemon at a directory of its choosing."""
    on_path = shutil.which(f"python{minor}", path=os.environ.get("PATH", os.defpath)) if minor else None
    versions = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv") / "versions"
    try:
        with os.scandir(versions) as entries:
            names = [entry.name for _, entry in zip(range(1000), entries, strict=False)]
    except OSError:
        return [], on_path
    found = []
    for name in sorted(names, key=_version_key, reverse=True):
        match = re.match(r"^(\d+)\.(\d+)", name)
        if match:
            found.append((name, str(versions / name / "bin" / f"python{match[1]}.{match[2]}")))
    return found, on_path


async def _probe_pythons(candidates: list[str | None], cache: Path, tools: _Tools) -> dict[str, str]:
    """Executable -> x.y.z of each candidate the app's user can run."""
    found: dict[str, str] = {}
    for candidate in dict.fromkeys(c for c in candidates if c):
        # Probe from the cache, not the app: a pyenv shim would otherwise obey the app's .python-version.
        probe = await tools.output([candidate, "-c", PROBE], cwd=cache)
        if probe and len(lines := probe.splitlines()) == 2:
            found.setdefault(lines[0], lines[1])
    return found


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
async def _locked(cache: Path, entry: str, timeout: float) -> AsyncIterator[None]:
    """One build at a time fills a cache entry; the other waits, then reuses it."""
    lock_fd = await asyncio.to_thread(owned.lock_file, cache, f"{entry}.lock")
    try:
        for _ in range(int(timeout / LOCK_POLL) + 1):
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                await asyncio.sleep(LOCK_POLL)
        else:
            raise BuildError(f"another build kept the cache entry {entry} busy for {timeout:.0f} seconds")
        yield
    finally:
        os.close(lock_fd)  # which releases the lock


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
