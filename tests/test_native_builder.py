"""Real builds of the fixture apps with the native builder: pip into a venv, npm ci, the caches, the errors.

Each built app is also started with the processes and environment the build returned and asked for a
page, the way the runtime will run it.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from conftest import free_port
from pipeline.builders import BuildError, BuildResult
from pipeline.builders.failure_excerpt import failure_excerpt
from pipeline.app_owned_files import FileTooLarge
from pipeline.builders import native_impl
from pipeline.builders.native_impl import (
    NativeBuilder,
    _go_executable_name,
    _python_web,
    _reads_source,
    _requirement_files,
)
from pipeline.detect import Detection, detect
from pipeline.limits import Limits
from runtime.local.app_user import AppUser

APPS = Path(__file__).parent / "apps"
LIMITS = Limits()
BASE_ENV = {"PATH": os.environ.get("PATH", os.defpath), "LANG": "C.UTF-8"}
STEP_TIMEOUT = 600.0
HOST_PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"
NO_DEPENDENCIES_PYPROJECT = '[project]\nname = "app"\nversion = "1"\ndependencies = []\n'


def copy_app(name: str, target: Path) -> Path:
    shutil.copytree(APPS / name, target)
    return target


def write(root: Path, files: dict[str, str]) -> Path:
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(content)
    return root


def build(src: Path, cache: Path, builder: NativeBuilder | None = None,
          env: dict[str, str] | None = None) -> tuple[BuildResult, list[str]]:
    lines: list[str] = []
    builder = builder or NativeBuilder(step_timeout=STEP_TIMEOUT)
    result = asyncio.run(builder.build(src, detect(src, LIMITS), cache, env or BASE_ENV, lines.append))
    return result, lines


def build_error(src: Path, cache: Path, builder: NativeBuilder | None = None,
                env: dict[str, str] | None = None, detection: Detection | None = None) -> tuple[str, list[str]]:
    """The build's error; `detection` when the tree changed since it was detected (as app code can change it)."""
    lines: list[str] = []
    builder = builder or NativeBuilder(step_timeout=STEP_TIMEOUT)
    with pytest.raises(BuildError) as error:
        asyncio.run(builder.build(src, detection or detect(src, LIMITS), cache, env or BASE_ENV, lines.append))
    return str(error.value), lines


@contextmanager
def serve(src: Path, result: BuildResult, process: str = "web") -> Iterator[httpx.Client]:
    """Start one process as the runtime would (sh -c, the build's env, $PORT) and wait for it to answer."""
    port = free_port()
    log = src.parent / f"{src.name}-{process}.log"
    with log.open("wb") as output:
        proc = subprocess.Popen(["/bin/sh", "-c", result.processes[process]], cwd=src, stdout=output,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env={**BASE_ENV, **result.env, "PORT": str(port), "GREETING": "hello"})
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=5) as client:
            for _ in range(300):
                assert proc.poll() is None, f"{process} exited: {log.read_text()}"
                try:
                    client.get("/")
                    break
                except httpx.TransportError:
                    time.sleep(0.1)
            else:
                raise AssertionError(f"{process} did not answer on port {port}: {log.read_text()}")
            yield client
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def commands(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("$ ")]


def extra_ca(path: Path) -> Path:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "DevFlow test extra CA")])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


# Python


def test_flask_gets_a_venv_and_gunicorn_and_a_redeploy_reinstalls_nothing(tmp_path):
    """Also with an extra CA: pip still trusts the host's CAs (PyPI is reached over TLS here) plus the extra one."""
    cache = tmp_path / "cache"
    ca = extra_ca(tmp_path / "extra-ca.pem")
    builder = NativeBuilder(ca, step_timeout=STEP_TIMEOUT)
    first, lines = build(copy_app("flask", tmp_path / "v1"), cache, builder)
    assert first.processes == {"web": "gunicorn app:app --bind 0.0.0.0:$PORT"}
    assert commands(lines)[-1] == "$ pip install -r requirements.txt"
    assert any(line.startswith("Successfully installed") and "flask" in line for line in lines)
    venv = Path(first.env["VIRTUAL_ENV"])
    assert venv.parent == cache / "python"
    assert first.env["PATH"].split(os.pathsep)[0] == str(venv / "bin")
    assert first.env["PYTHONUNBUFFERED"] == "1"
    bundle = (cache / "ca-bundle.pem").read_text()
    assert ca.read_text().strip() in bundle
    system = Path("/etc/ssl/certs/ca-certificates.crt")
    if system.is_file():
        assert system.read_text().strip()[:2000] in bundle
    with serve(tmp_path / "v1", first) as client:
        assert client.get("/").text == "flask v1"
        assert client.get("/env/GREETING").text == "hello"

    ready = venv / ".devflow-ready"
    installed = ready.stat().st_mtime_ns, (venv / "bin" / "gunicorn").stat().st_mtime_ns
    second, lines = build(copy_app("flask", tmp_path / "v2"), cache, builder)
    assert "Reusing the Python environment: Python" in "\n".join(lines)
    assert commands(lines) == []
    assert second == first
    assert (ready.stat().st_mtime_ns, (venv / "bin" / "gunicorn").stat().st_mtime_ns) == installed
    with serve(tmp_path / "v2", second) as client:
        assert client.get("/").text == "flask v1"


def test_build_fails_with_pips_message_and_leaves_no_half_built_environment(tmp_path):
    cache = tmp_path / "cache"
    message, lines = build_error(copy_app("build-fails", tmp_path / "v1"), cache)
    assert message.startswith("`pip install -r requirements.txt` failed with exit status 1:")
    assert "No matching distribution found for devflow-fixture-no-such-package-7f3a9c==1.0.0" in message
    assert any("No matching distribution found" in line for line in lines)
    assert not list((cache / "python").glob("*/.devflow-ready"))
    message, lines = build_error(copy_app("build-fails", tmp_path / "v2"), cache)
    assert "No matching distribution found" in message
    assert "$ pip install -r requirements.txt" in lines


def test_procfile_apps_keep_their_processes(tmp_path):
    result, lines = build(copy_app("stdlib", tmp_path / "stdlib"), tmp_path / "cache")
    assert result.processes == {"web": "python3 app.py"}
    assert commands(lines) == []
    with serve(tmp_path / "stdlib", result) as client:
        assert client.get("/").text == "stdlib v1"
        assert client.get("/env/GREETING").text == "hello"
    workers, _ = build(copy_app("workers", tmp_path / "workers"), tmp_path / "cache")
    assert workers.processes == {"web": "python3 app.py", "worker": "python3 worker.py",
                                 "release": "python3 release.py"}


def test_python_version_file_picks_the_interpreter(tmp_path):
    src = write(tmp_path / "app", {"pyproject.toml": NO_DEPENDENCIES_PYPROJECT, ".python-version": HOST_PYTHON,
                                   "Procfile": "web: python -c 'import sys; print(sys.version)'\n"})
    result, lines = build(src, tmp_path / "cache")
    assert any(line.startswith(f"Using Python {HOST_PYTHON}.") for line in lines)
    venv_python = Path(result.env["VIRTUAL_ENV"]) / "bin" / "python"
    version = subprocess.run([venv_python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    assert version == HOST_PYTHON
    (src / ".python-version").write_text("3.4\n")
    message, _ = build_error(src, tmp_path / "cache")
    assert message.startswith("Python 3.4 is requested by .python-version but not installed on the build host. "
                              "The versions the app can use: ")
    assert HOST_PYTHON + "." in message
    assert message.endswith("To use 3.4, have an admin install it where every user can read it (pyenv with "
                            "PYENV_ROOT under /opt or /usr/local, or the distribution's package), or change "
                            ".python-version")


def test_pyproject_without_dependencies_needs_no_install_and_no_gunicorn_means_a_procfile(tmp_path):
    message, lines = build_error(write(tmp_path / "app", {"pyproject.toml": NO_DEPENDENCIES_PYPROJECT,
                                                          "app.py": "app = object()\n"}), tmp_path / "cache")
    assert message.startswith("No Procfile, and gunicorn is not among the dependencies: add a Procfile with a "
                              "web: line")
    assert len(commands(lines)) == 1 and " -m venv " in commands(lines)[0]


@pytest.mark.parametrize("tool, files", [
    ("uv", {"pyproject.toml": NO_DEPENDENCIES_PYPROJECT, "uv.lock": "version = 1\n"}),
    ("poetry", {"pyproject.toml": "[tool.poetry]\nname = 'app'\n", "poetry.lock": ""}),
    ("pipenv", {"Pipfile": "[packages]\n", "Pipfile.lock": "{}"}),
])
def test_a_missing_python_tool_names_what_to_install(tmp_path, tool, files):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)
    src = write(tmp_path / "app", {**files, "Procfile": "web: python3 app.py\n"})
    message, _ = build_error(src, tmp_path / "cache", env={"PATH": str(bin_dir)})
    assert f"install {'it' if tool != 'uv' else 'uv'} (" in message and f"`{tool}` is on the PATH" in message


def test_a_tool_that_cannot_be_run_fails_the_build_with_why(tmp_path):
    """A script whose interpreter the build's user cannot reach (e.g. a venv under /root) is a build error."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)
    uv = bin_dir / "uv"
    uv.write_text("#!/nonexistent/devflow-test/python3\n")
    uv.chmod(0o755)
    src = write(tmp_path / "app", {"pyproject.toml": NO_DEPENDENCIES_PYPROJECT, "uv.lock": "version = 1\n",
                                   "Procfile": "web: python3 app.py\n"})
    message, _ = build_error(src, tmp_path / "cache", env={"PATH": str(bin_dir)})
    assert message.startswith("cannot run uv: the interpreter it names is missing. Builds run as the app's user")


def test_default_web_process_needs_one_obvious_wsgi_app(tmp_path):
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "venv" / "bin" / "gunicorn").touch()

    def web(src: Path) -> tuple[str | None, str]:
        return _python_web(src, tmp_path, "venv", 1000)

    cases = {
        "flask": ({"app.py": "from flask import Flask\napp = Flask(__name__)\n"}, "gunicorn app:app"),
        "wsgi-application": ({"wsgi.py": "from mysite.web import application\n"}, "gunicorn wsgi:application"),
        "annotated": ({"main.py": "app: object = make()\n"}, "gunicorn main:app"),
        "django": ({"manage.py": "", "mysite/wsgi.py": "application = get_wsgi_application()\n"},
                   "gunicorn mysite.wsgi"),
        "fastapi-is-not-wsgi": ({"main.py": "from fastapi import FastAPI\napp = FastAPI()\n"}, None),
        "syntax-error": ({"app.py": "app = (\n"}, None),
        "two": ({"app.py": "app = 1\n", "wsgi.py": "application = 2\n"}, None),
    }
    for name, (files, command) in cases.items():
        command_found, why = web(write(tmp_path / name, files))
        assert command_found == (f"{command} --bind 0.0.0.0:$PORT" if command else None), name
        assert bool(why) == (command is None), name
    assert "several modules could be the web app (wsgi:application, app:app)" in web(tmp_path / "two")[1]
    assert "no wsgi.py/app.py/main.py/application.py defines a WSGI `app`" in web(tmp_path / "fastapi-is-not-wsgi")[1]


def test_a_probe_that_floods_its_output_is_stopped_and_counts_as_failed(tmp_path):
    """`import django` runs from the app's directory, so it imports the app's own django/: one that prints without
    end must not fill the daemon's memory. It is stopped past 64 KiB, and Django is taken to be missing."""
    flood = ("import os, sys\nopen('flood.pid', 'w').write(str(os.getpid()))\nchunk = b'x' * 65536\n"
             "for _ in range(1024): sys.stdout.buffer.write(chunk)\n")  # 64 MiB, then it would end by itself
    src = write(tmp_path / "app", {"pyproject.toml": NO_DEPENDENCIES_PYPROJECT, "django/__init__.py": flood,
                                   "manage.py": "print('collectstatic ran')\n", "Procfile": "web: python3 app.py\n"})
    _, lines = build(src, tmp_path / "cache")
    assert "`python -c 'import django'` printed more than 64 KiB: stopped" in lines
    assert "collectstatic ran" not in lines and not any("collectstatic" in line for line in commands(lines))
    pid = int((src / "flood.pid").read_text())
    assert not Path(f"/proc/{pid}").exists()  # killed (and reaped), not left writing


def test_a_probe_that_never_ends_is_stopped_with_what_it_started(tmp_path, monkeypatch):
    """The timeout covers the whole probe, output and exit: a child that keeps the pipe open ends with it."""
    monkeypatch.setattr(native_impl, "PROBE_TIMEOUT", 2.0)
    hang = ("import os, subprocess\nchild = subprocess.Popen(['sleep', '600'])\n"
            "open('sleeper.pid', 'w').write(str(child.pid))\nprint('imported', flush=True)\nchild.wait()\n")
    src = write(tmp_path / "app", {"pyproject.toml": NO_DEPENDENCIES_PYPROJECT, "django/__init__.py": hang,
                                   "manage.py": "", "Procfile": "web: python3 app.py\n"})
    _, lines = build(src, tmp_path / "cache")
    assert "`python -c 'import django'` did not finish within 2 seconds: stopped" in lines
    sleeper = Path(f"/proc/{int((src / 'sleeper.pid').read_text())}/stat")
    for _ in range(100):  # SIGKILL is sent; its delivery is the kernel's
        if not sleeper.exists() or sleeper.read_text().split(") ")[-1].startswith("Z"):
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the probe's child is still running")


def test_the_build_output_names_no_server_path(tmp_path):
    """Pushers see where things are as the app sees them: the static server runs from the release's own
    directory (/app for the app's processes), the interpreter is named by its version, tools' paths as <app>
    and <cache>."""
    src = write(tmp_path / "site", {"pyproject.toml": NO_DEPENDENCIES_PYPROJECT, ".static": "dist\n",
                                    "dist/index.html": "from dist"})
    cache = tmp_path / "cache"
    result, lines = build(src, cache)
    assert result.processes == {"web": "python3 -I .devflow/static_server.py dist"}
    assert "Processes: web: python3 -I .devflow/static_server.py dist" in lines
    assert any(line.startswith("$ python") and " -m venv --without-pip <cache>/python/" in line for line in lines)
    assert [line for line in lines if line.startswith("Using Python ")] == [
        f"Using Python {platform.python_version()}; add a .python-version file to choose the version"]
    assert not [line for line in lines if str(tmp_path) in line or "/bin/" in line]
    with serve(src, result) as client:  # from the build directory, as the runtime's processes without /app
        assert client.get("/").text == "from dist"
    assert sorted(os.listdir(src / ".devflow")) == ["static_server.py"]


def test_requirements_that_read_the_app_tree_are_not_cached(tmp_path):
    cases = {"flask\n-e .\n": True, "./libs/pkg\n": True, "pkg @ file:///x\n": True, "-f wheels\npkg\n": True,
             "--find-links https://x/simple\npkg\n": False, "flask==3 # ./not-a-path\n": False,
             "-r base.txt\n": False}
    for text, reads in cases.items():
        assert _reads_source(text) is reads, text


# Node


def test_node_runs_npm_ci_and_build_then_reuses_node_modules(tmp_path):
    cache = tmp_path / "cache"
    first, lines = build(copy_app("node", tmp_path / "v1"), cache)
    assert first.processes == {"web": "npm start"}
    assert commands(lines) == ["$ npm ci --include=dev --no-audit --no-fund", "$ npm run build"]
    assert "built dist/banner.txt" in lines
    assert first.env["NODE_ENV"] == "production"
    assert first.env["PATH"].split(os.pathsep)[0] == str(tmp_path / "v1" / "node_modules" / ".bin")
    with serve(tmp_path / "v1", first) as client:
        assert client.get("/").text == "node v1"
        assert client.get("/env/GREETING").text == "hello"
        assert client.get("/uptime").text[0].isdigit()  # the `ms` dependency is installed

    cached = next((cache / "node").glob("*/node_modules/ms/package.json"))
    installed = cached.stat().st_mtime_ns
    second, lines = build(copy_app("node", tmp_path / "v2"), cache)
    assert any(line.startswith("Reusing node_modules: Node.js") for line in lines)
    assert commands(lines) == ["$ npm run build"]
    assert cached.stat().st_mtime_ns == installed
    linked = tmp_path / "v2" / "node_modules" / "ms" / "package.json"
    assert linked.stat().st_ino == cached.stat().st_ino  # hard-linked from the cache, not copied
    with serve(tmp_path / "v2", second) as client:
        assert client.get("/").text == "node v1"


def test_extra_ca_reaches_npm_and_build_scripts(tmp_path):
    src = copy_app("node", tmp_path / "app")
    (src / "build.js").write_text(
        'const fs = require("fs");\nfs.mkdirSync("dist", {recursive: true});\n'
        'fs.writeFileSync("dist/banner.txt", "x");\n'
        'const names = ["NODE_EXTRA_CA_CERTS", "npm_config_cafile", "SSL_CERT_FILE", "PIP_CERT"];\n'
        'fs.writeFileSync("ca.json", JSON.stringify(Object.fromEntries(names.map(n => [n, process.env[n]]))));\n')
    ca = extra_ca(tmp_path / "extra-ca.pem")
    result, lines = build(src, tmp_path / "cache", NativeBuilder(ca, step_timeout=STEP_TIMEOUT))
    assert "$ npm ci --include=dev --no-audit --no-fund" in lines  # fetched `ms` over TLS with the combined bundle
    seen = json.loads((src / "ca.json").read_text())
    assert set(seen.values()) == {str(tmp_path / "cache" / "ca-bundle.pem")}
    assert ca.read_text().strip() in (tmp_path / "cache" / "ca-bundle.pem").read_text()
    assert not any(key in result.env for key in seen)


def test_concurrent_builds_install_once(tmp_path):
    async def both() -> list[list[str]]:
        logs: list[list[str]] = [[], []]
        builder = NativeBuilder(step_timeout=STEP_TIMEOUT)
        await asyncio.gather(*(builder.build(src, detect(src, LIMITS), tmp_path / "cache", BASE_ENV, logs[i].append)
                               for i, src in enumerate([copy_app("node", tmp_path / f"v{i}") for i in range(2)])))
        return logs

    logs = asyncio.run(both())
    installs = [lines for lines in logs if "$ npm ci --include=dev --no-audit --no-fund" in lines]
    assert len(installs) == 1
    assert any(line.startswith("Reusing node_modules") for lines in logs for line in lines)
    assert all((tmp_path / f"v{i}" / "node_modules" / "ms").is_dir() for i in range(2))


def test_package_json_is_parsed_once_and_must_not_change_after_detection(tmp_path):
    """The build installs what detection parsed; a package.json the app's processes rewrote since is refused, as
    is one that goes past its bound (max_parsed_manifest_bytes, not the lockfiles' max_manifest_bytes)."""
    src = copy_app("node", tmp_path / "app")
    detection = detect(src, LIMITS)
    package = json.loads((src / "package.json").read_text())
    (src / "package.json").write_text(json.dumps({**package, "dependencies": {"left-pad": "1.3.0"}}))
    message, lines = build_error(src, tmp_path / "cache", detection=detection)
    assert message == "package.json changed since the push was detected (by the app's own processes?): push again"
    assert commands(lines) == []
    with open(src / "package.json", "wb") as f:
        f.truncate(2 * 1024**2)
    message, _ = build_error(src, tmp_path / "cache", detection=detection)
    assert message == ("package.json is larger than 1 MiB (an admin can raise the limit with devflow up "
                       "--max-parsed-manifest-bytes)")


def test_a_cache_entry_removed_during_the_install_is_not_marked_ready(tmp_path):
    """The app's processes remove the entry while npm installs into it: root must not make it again (it would be
    root's, holding only the ready marker, reused empty by every later build and not removable by the app)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "node").symlink_to(shutil.which("node"))
    npm = bin_dir / "npm"  # `npm ci` that ends by removing the directory it installed into
    npm.write_text('#!/bin/sh\nif [ "$1" = --version ]; then echo 10.0.0; exit 0; fi\n'
                   'if [ "$1" = ci ]; then rm -rf "$PWD"; fi\n')
    npm.chmod(0o755)
    src = copy_app("node", tmp_path / "app")
    message, _ = build_error(src, tmp_path / "cache", env={**BASE_ENV, "PATH": f"{bin_dir}{os.pathsep}{os.defpath}"})
    assert message.startswith("the cache directory node/")
    assert message.endswith(" was removed while the dependencies were installed into it (by the app's own "
                            "processes?), so nothing was cached: push again")
    assert list((tmp_path / "cache" / "node").iterdir()) == list((tmp_path / "cache" / "node").glob("*.lock"))


@pytest.mark.parametrize("manager, lockfile", [("yarn", "yarn.lock"), ("pnpm", "pnpm-lock.yaml")])
def test_a_missing_node_package_manager_names_what_to_install(tmp_path, manager, lockfile):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "node").symlink_to(shutil.which("node"))
    src = write(tmp_path / "app", {"package.json": '{"scripts": {"start": "node x.js"}}', lockfile: ""})
    message, _ = build_error(src, tmp_path / "cache", env={"PATH": str(bin_dir)})
    assert f"{lockfile} found, but" in message and f"so `{manager}` is on the PATH" in message


def test_missing_start_script_and_node_assets_before_python(tmp_path):
    package = {"name": "app", "version": "1.0.0", "scripts": {"build": "node -e \"require('fs').writeFileSync("
                                                                        "'static.css', 'body{}')\""}}
    src = write(tmp_path / "assets", {"package.json": json.dumps(package)})
    message, lines = build_error(src, tmp_path / "cache")
    assert commands(lines) == ["$ npm install --include=dev --no-audit --no-fund", "$ npm run build"]
    assert message.startswith("No Procfile, and package.json has no \"start\" script")

    write(src, {"pyproject.toml": NO_DEPENDENCIES_PYPROJECT, "Procfile": "web: python3 -m http.server $PORT\n"})
    result, lines = build(src, tmp_path / "cache")
    assert detect(src, LIMITS).stacks == ("node", "python")
    assert commands(lines)[0] == "$ npm run build" and " -m venv " in commands(lines)[1]
    assert (src / "static.css").read_text() == "body{}"
    path = result.env["PATH"].split(os.pathsep)
    assert path[:2] == [str(Path(result.env["VIRTUAL_ENV"]) / "bin"), str(src / "node_modules" / ".bin")]


def test_tool_output_is_streamed_while_the_tool_runs(tmp_path):
    """The build script waits for a file the log callback creates on its first line: buffering would hang it."""
    script = ('const fs = require("fs");\nconsole.log("first line");\nlet n = 0;\n'
              'const poll = setInterval(() => {\n  if (fs.existsSync("go-on")) { console.log("second line"); '
              'clearInterval(poll); }\n  else if (++n > 200) { console.error("never heard back"); process.exit(1); }\n'
              '}, 50);\n')
    src = write(tmp_path / "app", {"package.json": json.dumps({"name": "app", "scripts": {"build": "node build.js",
                                                                                          "start": "node build.js"}}),
                                   "build.js": script})
    lines: list[str] = []

    def log(line: str) -> None:
        lines.append(line)
        if line == "first line":
            (src / "go-on").touch()

    builder = NativeBuilder(step_timeout=STEP_TIMEOUT)
    asyncio.run(builder.build(src, detect(src, LIMITS), tmp_path / "cache", BASE_ENV, log))
    assert lines.index("first line") < lines.index("second line")


def test_a_step_that_runs_too_long_is_killed(tmp_path):
    src = write(tmp_path / "app", {"package.json": json.dumps({"name": "app", "scripts": {"build": "node hang.js"}}),
                                   "hang.js": 'require("fs").writeFileSync("pid", String(process.pid));\n'
                                              'setTimeout(() => {}, 600000);\n'})
    message, _ = build_error(src, tmp_path / "cache", NativeBuilder(step_timeout=5))
    assert message == "`npm run build` did not finish within 5 seconds"
    pid = int((src / "pid").read_text())
    for _ in range(100):
        stat = Path(f"/proc/{pid}/stat")
        if not stat.exists() or stat.read_text().split(") ")[-1].startswith("Z"):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the build script {pid} is still running")


def test_a_bad_extra_ca_file_fails_the_build(tmp_path):
    src = copy_app("stdlib", tmp_path / "app")
    message, _ = build_error(src, tmp_path / "cache", NativeBuilder(tmp_path / "missing.pem"))
    assert message == ("the extra CA file (devflow up --extra-ca-certs) cannot be read: No such file or directory")
    (tmp_path / "not-a-cert.pem").write_text("hello\n")
    message, _ = build_error(src, tmp_path / "cache", NativeBuilder(tmp_path / "not-a-cert.pem"))
    assert message == "the extra CA file (devflow up --extra-ca-certs) holds no PEM certificate"


# Go and static sites


def test_go_without_a_toolchain_says_to_install_go(tmp_path):
    src = write(tmp_path / "app", {"go.mod": "module example.com/app\n\ngo 1.22\n",
                                   "main.go": "package main\n\nfunc main() {}\n"})
    empty = tmp_path / "empty-path"
    empty.mkdir()
    message, _ = build_error(src, tmp_path / "cache", env={"PATH": str(empty)})
    assert message == ("go.mod found, but Go is not installed on the build host: install Go (https://go.dev/dl/) "
                       "so `go` is on the PATH, or add a Dockerfile")


def test_static_site_is_served_without_listings_or_dotfiles(tmp_path):
    src = copy_app("static", tmp_path / "site")
    write(src, {".secret": "no", "assets/app.css": "body{}", "assets/.env": "no"})
    result, _ = build(src, tmp_path / "cache")
    assert set(result.processes) == {"web"}
    with serve(src, result) as client:
        assert "static v1" in client.get("/").text
        assert client.get("/assets/app.css").text == "body{}"
        assert [client.get(p).status_code for p in ("/assets/", "/.secret", "/assets/.env", "/%2esecret")] == [404] * 4
        assert client.head("/index.html").status_code == 200


def test_static_marker_can_name_the_directory_to_serve(tmp_path):
    src = write(tmp_path / "site", {".static": "dist\n", "dist/index.html": "from dist", "secret.txt": "no"})
    result, lines = build(src, tmp_path / "cache")
    assert "Static site: serving dist/" in lines
    with serve(src, result) as client:
        assert client.get("/").text == "from dist"
        assert client.get("/secret.txt").status_code == 404
    (src / ".static").write_text("../elsewhere\n")
    message, _ = build_error(src, tmp_path / "cache")
    assert message.startswith(".static names '../elsewhere', which is not a directory inside the app")


def test_a_dockerfile_is_said_to_need_container_mode(tmp_path):
    message, lines = build_error(write(tmp_path / "app", {"Dockerfile": "FROM scratch\n"}), tmp_path / "cache")
    assert message.startswith("Dockerfile found, but this DevFlow runs apps natively (container mode comes with the "
                              "Docker runtime), and there is nothing else to build: add a Procfile")
    src = write(tmp_path / "both", {"Dockerfile": "FROM scratch\n", "Procfile": "web: python3 -m http.server\n"})
    _, lines = build(src, tmp_path / "cache")
    assert lines[0] == ("Dockerfile found, but this DevFlow runs apps natively (container mode comes with the Docker "
                        "runtime); building with the native builder from the other files instead")


def test_a_lockfile_linked_out_of_the_app_is_not_copied_into_the_cache(tmp_path):
    """Earlier build steps run app code as the app's user: a lockfile turned into a link must not make
    root copy what it points at into the app's cache."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text('{"lockfileVersion": 3, "secret": "root only"}')
    src = copy_app("node", tmp_path / "linked")
    detection = detect(src, LIMITS)
    (src / "package-lock.json").unlink()
    (src / "package-lock.json").symlink_to(outside / "secret")
    message, _ = build_error(src, tmp_path / "cache", detection=detection)
    assert message == "package-lock.json is a symbolic link that leads outside the app"
    copied = [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and "root only" in p.read_text(errors="ignore")]
    assert not copied


def test_a_link_planted_over_the_static_server_is_refused(tmp_path):
    src = copy_app("static", tmp_path / "site")
    victim = tmp_path / "victim.py"
    victim.write_text("precious")
    (src / ".devflow").mkdir()
    (src / ".devflow" / "static_server.py").symlink_to(victim)
    message, _ = build_error(src, tmp_path / "cache")
    assert "symbolic link" in message
    assert victim.read_text() == "precious"


# what real apps need: Go program names, Django's collectstatic, versions the app's user can run


@pytest.mark.skipif(shutil.which("go") is None, reason="needs go on the build host")
def test_go_programs_are_named_after_their_import_paths_as_on_heroku(tmp_path):
    cache = tmp_path / "cache"
    result, lines = build(copy_app("go", tmp_path / "root"), cache)
    assert result.processes == {"web": "bin/devflow-fixture-go"}  # the module path's last element
    assert "Built bin/devflow-fixture-go (from .)" in lines
    with serve(tmp_path / "root", result) as client:
        assert client.get("/").text == "go v1"

    src = copy_app("go-cmd", tmp_path / "cmd")
    result, lines = build(src, cache)
    assert "Built bin/web (from ./cmd/web), bin/worker (from ./cmd/worker)" in lines  # not the /v2 library
    assert result.processes == {"web": "bin/web", "worker": "bin/worker"}
    with serve(src, result) as client:
        assert client.get("/").text == "go-cmd v1"
    (src / "Procfile").unlink()
    message, _ = build_error(src, cache)
    assert message == ("No Procfile, and several Go programs were built, none from the module's root package: add "
                       "a Procfile with a web: line, e.g. 'web: bin/web'")


def test_go_executable_names_follow_go_build():
    assert [_go_executable_name(p) for p in ("example.com/shop", "example.com/shop/cmd/web", "example.com/tool/v2",
                                             "example.com/tool/cmd/v3", "v2", "example.com/v0")] == \
        ["shop", "web", "tool", "cmd", "v2", "v0"]


def test_django_gets_collectstatic_with_the_apps_config_or_heros_advice(tmp_path):
    """Django comes from PyPI; the three builds share one environment."""
    cache = tmp_path / "cache"
    config = {**BASE_ENV, "DJANGO_SECRET_KEY": "from-config"}
    src = copy_app("django", tmp_path / "v1")
    result, lines = build(src, cache, env=config)
    assert "$ python manage.py collectstatic --noinput --traceback" in lines
    assert (src / "staticfiles" / "admin" / "css" / "base.css").is_file()
    assert result.processes["web"].startswith("python -m django runserver")

    src = copy_app("django", tmp_path / "v2")
    _, lines = build(src, cache, env={**config, "DISABLE_COLLECTSTATIC": "1"})
    assert "Skipping Django's collectstatic: DISABLE_COLLECTSTATIC is set" in lines
    assert not (src / "staticfiles").exists()

    message, _ = build_error(copy_app("django", tmp_path / "v3"), cache)  # no DJANGO_SECRET_KEY
    excerpt = message.splitlines()
    assert excerpt[0] == "`python manage.py collectstatic --noinput --traceback` failed with exit status 1:"
    assert excerpt[1] == "Traceback (most recent call last):"
    assert excerpt[-2] == "KeyError: 'DJANGO_SECRET_KEY'"
    assert excerpt[-1].startswith("Error while running `python manage.py collectstatic --noinput` (see the traceback "
                                  "above). Fix the app's static files settings, or skip this step: config:set <app> "
                                  "DISABLE_COLLECTSTATIC=1")


@pytest.mark.skipif(os.getuid() != 0, reason="builds run as another user only under root")
def test_a_python_the_apps_user_cannot_run_is_named_as_such(tmp_path, monkeypatch):
    """A pyenv under a directory private to root: there for root, out of reach for the app's uid."""
    reachable = Path(tempfile.mkdtemp(prefix="devflow-test-build-"))
    try:
        reachable.chmod(0o711)
        private = tmp_path / "root-pyenv"
        (private / "versions" / "3.99.1" / "bin").mkdir(parents=True)
        (private / "versions" / "3.99.1" / "bin" / "python3.99").symlink_to(sys.executable)
        monkeypatch.setenv("PYENV_ROOT", str(private))
        src = write(reachable / "app", {"pyproject.toml": NO_DEPENDENCIES_PYPROJECT, ".python-version": "3.99\n",
                                        "Procfile": "web: python3 app.py\n"})
        user = AppUser.numbered(700_999_001)
        user.hand_over_tree(src)
        lines: list[str] = []
        with pytest.raises(BuildError) as error:
            asyncio.run(NativeBuilder(step_timeout=STEP_TIMEOUT).build(
                src, detect(src, LIMITS), reachable / "cache", BASE_ENV, lines.append, user))
        message = str(error.value)
        assert message.startswith("Python 3.99.1 is installed on the build host, but where the app's user cannot "
                                  "run it (builds run as the app's own user; root's pyenv, say, is private to root). "
                                  "The versions the app can use: ")
        assert str(private) not in message and "3.99.1, " not in message
    finally:
        shutil.rmtree(reachable)


def test_failure_excerpts_keep_the_lines_that_explain():
    npm = ["npm notice New minor version of npm available!", "", "> app@1.0.0 build", "> node build.js", "",
           "/app/build.js:1", 'throw new Error("the build broke")', "^", "", "Error: the build broke",
           "    at Object.<anonymous> (/app/build.js:1:7)", "    at Module._compile (node:internal:1)", "",
           "Node.js v20.20.2", "npm warn deprecated x@1", "npm error code 1", "npm error path /app",
           "npm error command failed", "npm error A complete log of this run can be found in: /root/.npm/x.log"]
    assert failure_excerpt(npm) == ["Error: the build broke", "    at Object.<anonymous> (/app/build.js:1:7)",
                                    "npm error code 1", "npm error path /app", "npm error command failed"]
    go = ["go: downloading example.com/x v1.0.0", "# example.com/app", "./main.go:9:2: undefined: greting",
          "./main.go:12:5: missing return"]
    assert failure_excerpt(go) == ["./main.go:9:2: undefined: greting", "./main.go:12:5: missing return"]
    python = ["Collecting flask", "Traceback (most recent call last):", '  File "/x/setup.py", line 3, in <module>',
              "    import numpy", '  File "/x/numpy.py", line 1, in <module>', "    raise ImportError('no')",
              "ImportError: no", "note: This error originates from a subprocess"]
    assert failure_excerpt(python) == ["Traceback (most recent call last):", '  File "/x/numpy.py", line 1, in '
                                       "<module>", "    raise ImportError('no')", "ImportError: no"]
    assert failure_excerpt([f"line {i}" for i in range(50)]) == [f"line {i}" for i in range(42, 50)]
    many = failure_excerpt([f"ERROR: {i}" for i in range(100)])
    assert len(many) == 20 and many[-1] == "... and 81 more lines in the build log"


def test_requirement_includes_are_read_inside_the_app_only(tmp_path):
    src = write(tmp_path / "app", {"requirements.txt": "-r reqs/base.txt\n", "reqs/base.txt": "-c ../pins.txt\nsix\n",
                                   "pins.txt": "six==1.16.0\n", "loop.txt": "-r loop.txt\n"})
    texts, uncached = _requirement_files(src, 1024)
    assert texts == ["-r reqs/base.txt\n", "-c ../pins.txt\nsix\n", "six==1.16.0\n"] and not uncached
    for include in ("/etc/passwd", "../../outside.txt", "https://example.com/reqs.txt"):
        (src / "requirements.txt").write_text(f"-r {include}\n")
        assert _requirement_files(src, 1024) == ([f"-r {include}\n"], True), include  # pip's to read, not root's
    (src / "requirements.txt").write_text("-r loop.txt\n")
    assert _requirement_files(src, 1024)[1] is False
    (src / "requirements.txt").write_text("-r reqs/base.txt\n" + "x" * 1000)
    with pytest.raises(FileTooLarge, match=r"^requirements.txt and the files it includes are larger than 1 KiB in all"):
        _requirement_files(src, 1024)
    (src / "chain").mkdir()
    for i in range(150):
        (src / "chain" / f"{i}.txt").write_text(f"-r {i + 1}.txt\n")
    (src / "requirements.txt").write_text("-r chain/0.txt\n")
    texts, uncached = _requirement_files(src, 1024**2)
    assert len(texts) == 100 and uncached  # past the includes followed, the environment is not cached
