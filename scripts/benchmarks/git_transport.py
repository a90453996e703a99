"""Clone and push of a sizeable history through DevFlow and through C git's own servers, side by side.

DevFlow over SSH is compared with OpenSSH's sshd running git-shell, DevFlow over HTTP with
`git http-backend` behind lighttpd; `git daemon` (git://) is an extra reference line. The
client (C git), the repository, the repository config and the machine are the same for all.
"""

from __future__ import annotations

import argparse
import os
import pwd
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from benchmarks._support import (
    HOST, BenchError, DevflowServer, devflow_daemon, find_program, free_port, keygen, redact, run_quiet, server,
)
from gitd.git.cgit_impl import CGitBackend
from gitd.git.pack_backend import PackLimits
from gitd.settings import Settings

TARGET_RATIO = 1.10
SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")
GIT_TIMEOUT = 900

# The generated history. Bump GENERATOR_VERSION whenever anything below changes what it produces.
GENERATOR_VERSION = 1
SEED = 20240601
DIRECTORIES = 60
FILES_PER_DIRECTORY = 25
LINES_PER_FILE = 120
COMMITS = 5000
FILES_PER_COMMIT = 5
ASSET_EVERY = 20  # a commit adding an incompressible asset, like images in a real web app
ASSET_BYTES = 96 * 1024
TAG_EVERY = 500
EPOCH = 1_600_000_000
MIN_PACK_BYTES = 30 * 1024 * 1024
MIN_OBJECTS = 40_000
REFSPECS = ("refs/heads/*:refs/heads/*", "refs/tags/*:refs/tags/*")
# Neither branch is main or master: a push to the deploy branch starts a deployment, which is the
# push-to-live benchmark's business; this one measures the git transport alone.
BRANCH = "trunk"


# --- the history -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class History:
    path: Path
    objects: int
    pack_bytes: int


def _fast_import_stream(rng: random.Random) -> Iterator[bytes]:
    """A deterministic fast-import stream: source-like text files edited commit after commit, some assets."""
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz_", k=rng.randint(3, 10))) for _ in range(3000)]

    def line() -> str:
        return (" " * 4 * rng.randint(0, 3) + f"{rng.choice(words)} = {rng.choice(words)}({rng.choice(words)}, "
                f"0x{rng.getrandbits(32):08x})\n")

    files = {f"src/pkg{d:02d}/mod{f:03d}.py": [line() for _ in range(LINES_PER_FILE)]
             for d in range(DIRECTORIES) for f in range(FILES_PER_DIRECTORY)}
    paths = sorted(files)

    def inline(path: str, data: bytes) -> bytes:
        return f"M 100644 inline {path}\ndata {len(data)}\n".encode() + data + b"\n"

    for n in range(1, COMMITS + 1):
        when = EPOCH + n * 3600
        message = f"change {n}\n".encode()
        yield (f"commit refs/heads/{BRANCH}\nmark :{n}\n"
               f"author Bench Author <author@example.com> {when} +0000\n"
               f"committer Bench Committer <committer@example.com> {when} +0000\n"
               f"data {len(message)}\n").encode() + message
        changed = paths if n == 1 else rng.sample(paths, FILES_PER_COMMIT)
        for path in changed:
            lines = files[path]
            if n > 1:
                for _ in range(3):
                    lines[rng.randrange(len(lines))] = line()
                lines.insert(rng.randrange(len(lines)), line())
            yield inline(path, "".join(lines).encode())
        if n % ASSET_EVERY == 0:
            yield inline(f"assets/img{n:05d}.bin", rng.randbytes(ASSET_BYTES))
        yield b"\n"
        if n % TAG_EVERY == 0:
            message = f"release {n // TAG_EVERY}\n".encode()
            yield (f"tag v{n // TAG_EVERY}.0\nfrom :{n}\n"
                   f"tagger Bench Committer <committer@example.com> {when} +0000\n"
                   f"data {len(message)}\n").encode() + message + b"\n"
    yield f"reset refs/heads/stable\nfrom :{COMMITS - TAG_EVERY}\n\n".encode()


def _count(repo: Path) -> tuple[int, int]:
    """(objects, bytes of pack files) of the repository."""
    stats = dict(line.split(": ", 1) for line in
                 run_quiet(["git", "count-objects", "-v"], cwd=repo).stdout.decode().splitlines())
    pack_bytes = sum(pack.stat().st_size for pack in (repo / "objects" / "pack").glob("*.pack"))
    return int(stats["in-pack"]) + int(stats["count"]), pack_bytes


def ensure_history(cache_dir: Path) -> History:
    """The generated repository, built once per generator version and kept in the cache directory."""
    path = cache_dir / f"history-v{GENERATOR_VERSION}.git"
    if not path.is_dir():
        print(f"generating the benchmark history into {path} (once; takes a minute or two) ...", flush=True)
        cache_dir.mkdir(parents=True, exist_ok=True)
        building = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=cache_dir))
        try:
            run_quiet(["git", "init", "-q", "--bare", "-b", BRANCH, str(building)])
            importer = subprocess.Popen(["git", "fast-import", "--quiet"], cwd=building, stdin=subprocess.PIPE)
            assert importer.stdin is not None
            try:
                for chunk in _fast_import_stream(random.Random(SEED)):
                    importer.stdin.write(chunk)
            finally:
                importer.stdin.close()
                if importer.wait(timeout=GIT_TIMEOUT) != 0:
                    raise BenchError("git fast-import failed on the generated history")
            run_quiet(["git", "repack", "-a", "-d", "-f", "-q", "--window=10", "--depth=50"], cwd=building,
                      timeout=GIT_TIMEOUT)
            run_quiet(["git", "prune-packed"], cwd=building)
            building.rename(path)
        finally:
            shutil.rmtree(building, ignore_errors=True)
    objects, pack_bytes = _count(path)
    if objects < MIN_OBJECTS or pack_bytes < MIN_PACK_BYTES:
        raise BenchError(f"the generated history in {path} is too small ({objects} objects, {pack_bytes} bytes)")
    return History(path, objects, pack_bytes)


# --- the servers -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tools:
    git: str
    sshd: str
    git_shell: str
    http_backend: str
    lighttpd: str


def find_tools() -> Tools:
    git = find_program("git", "install git")
    exec_path = Path(run_quiet([git, "--exec-path"]).stdout.decode().strip())
    http_backend = exec_path / "git-http-backend"
    if not os.access(http_backend, os.X_OK):
        raise BenchError(f"git-http-backend not found in {exec_path}: install git's HTTP backend (package git)")
    for program in ("ssh-keygen", "ssh"):
        find_program(program, "install the OpenSSH client (package openssh-client)")
    return Tools(
        git=git,
        sshd=find_program("sshd", "install the OpenSSH server (package openssh-server)", SBIN),
        git_shell=find_program("git-shell", "install git (git-shell)", [str(exec_path)]),
        http_backend=str(http_backend),
        lighttpd=find_program("lighttpd", "install lighttpd (package lighttpd)", SBIN),
    )


def devflow_repo_config() -> dict[str, str]:
    """The config DevFlow's C git backend runs with, minus its hooks: the references get the same."""
    limits = PackLimits(hooks_dir=Path(os.devnull), max_push_bytes=Settings.model_fields["max_push_bytes"].default)
    argv = CGitBackend("git", limits).command("upload-pack", Path(os.devnull), stateless=False, advertise=False)
    pairs = dict(argv[i + 1].split("=", 1) for i, arg in enumerate(argv) if arg == "-c")
    pairs.pop("core.hooksPath")
    return {**pairs, "http.receivepack": "true"}


def server_env() -> dict[str, str]:
    """The reference servers' environment: no user git config, as DevFlow's pack programs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    return {**env, "GIT_CONFIG_GLOBAL": os.devnull}


class ReferenceRepos:
    """Bare repositories the reference servers serve, configured as DevFlow configures its own."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.config = devflow_repo_config()
        self._pushes = 0
        root.mkdir(parents=True)

    def create(self, name: str) -> Path:
        path = self.root / name
        run_quiet(["git", "init", "-q", "--bare", str(path)], env=server_env())
        for key, value in self.config.items():
            run_quiet(["git", "config", "--file", str(path / "config"), key, value])
        return path

    def fresh(self) -> str:
        self._pushes += 1
        return self.create(f"push-{self._pushes}.git").name


def _ensure_privsep_dir(tools: Tools, config: Path) -> None:
    """sshd run as root wants its privilege separation directory, which the distribution's service makes."""
    check = subprocess.run([tools.sshd, "-t", "-f", str(config)], capture_output=True, text=True, timeout=60)
    missing = "Missing privilege separation directory: "
    if check.returncode != 0 and missing in check.stderr and os.geteuid() == 0:
        directory = Path(check.stderr.split(missing, 1)[1].strip())
        print(f"creating sshd's privilege separation directory {directory}", flush=True)
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        check = subprocess.run([tools.sshd, "-t", "-f", str(config)], capture_output=True, text=True, timeout=60)
    if check.returncode != 0:
        raise BenchError(f"sshd refuses the benchmark's configuration: {check.stderr.strip()}")


@contextmanager
def sshd(tools: Tools, work: Path, client_key: Path) -> Iterator[int]:
    """OpenSSH's sshd on a free loopback port: the current user, the benchmark's client key, git-shell only."""
    port = free_port()
    host_key = keygen(work / "sshd_host_key")
    authorized = work / "authorized_keys"
    authorized.write_text(Path(f"{client_key}.pub").read_text())
    config = work / "sshd_config"
    force = f'{shlex.quote(tools.git_shell)} -c "$SSH_ORIGINAL_COMMAND"'
    config.write_text("\n".join([
        f"ListenAddress {HOST}:{port}",
        f"HostKey {host_key}",
        f"PidFile {work / 'sshd.pid'}",
        f"AuthorizedKeysFile {authorized}",
        f"AllowUsers {user_name()}",
        "StrictModes no", "UsePAM no", "PubkeyAuthentication yes", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "PermitRootLogin prohibit-password", "PermitTTY no",
        "AllowTcpForwarding no", "X11Forwarding no", "AllowAgentForwarding no", "PrintMotd no",
        # git sends GIT_PROTOCOL so both servers speak protocol v2; no user git config, as in DevFlow.
        # sshd runs ForceCommand through the user's login shell; SHLVL=1 keeps bash from sourcing
        # ~/.bashrc for it (bash does that for ssh sessions at shell level 1), which is no part of git.
        "AcceptEnv GIT_PROTOCOL", f"SetEnv GIT_CONFIG_GLOBAL={os.devnull} SHLVL=1",
        f"ForceCommand {force}",
    ]) + "\n")
    _ensure_privsep_dir(tools, config)
    with server("sshd", [tools.sshd, "-D", "-e", "-f", str(config)], work / "sshd.log", port, server_env()):
        yield port


@contextmanager
def lighttpd(tools: Tools, work: Path, repos: Path) -> Iterator[int]:
    """lighttpd running git http-backend as CGI.

    Responses stream; request bodies are collected first (stream-request-body = 0): git sends a large
    push chunked, and a CGI needs CONTENT_LENGTH, so lighttpd answers 411 when told to stream them.
    """
    port = free_port()
    (work / "www").mkdir()
    config = work / "lighttpd.conf"
    config.write_text(f"""\
server.bind = "{HOST}"
server.port = {port}
server.document-root = "{work / 'www'}"
server.errorlog = "{work / 'lighttpd.error.log'}"
server.upload-dirs = ("{work}")
server.modules = ("mod_alias", "mod_setenv", "mod_cgi")
server.stream-request-body = 0
server.stream-response-body = 2
alias.url = ("/git/" => "{tools.http_backend}/")
$HTTP["url"] =~ "^/git/" {{
  cgi.assign = ("" => "")
  setenv.set-environment = (
    "GIT_PROJECT_ROOT" => "{repos}",
    "GIT_HTTP_EXPORT_ALL" => "1",
    "GIT_CONFIG_GLOBAL" => "{os.devnull}",
    "REMOTE_USER" => "bench",
    "PATH" => "{os.environ.get('PATH', os.defpath)}",
  )
}}
""")
    with server("lighttpd", [tools.lighttpd, "-D", "-f", str(config)], work / "lighttpd.log", port, server_env()):
        yield port


@contextmanager
def git_daemon(tools: Tools, work: Path, repos: Path) -> Iterator[int]:
    port = free_port()
    argv = [tools.git, "daemon", "--reuseaddr", f"--listen={HOST}", f"--port={port}", f"--base-path={repos}",
            "--export-all", "--enable=receive-pack", str(repos)]
    with server("git daemon", argv, work / "git-daemon.log", port, server_env()):
        yield port


def user_name() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name


# --- the measurements ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """One server as the client sees it: the URL of the seeded history, and fresh empty repos to push to."""

    server: str
    clone_url: str
    fresh_push_url: Callable[[], str]
    refs_of: Callable[[str], Path]  # push URL -> the repository on disk, to check what arrived


@dataclass(frozen=True)
class Lane:
    """DevFlow and its reference over one transport; git:// has no DevFlow side."""

    transport: str
    devflow: Endpoint | None
    reference: Endpoint


class Client:
    """C git as the benchmark's only client, with no user config and a non-interactive ssh."""

    def __init__(self, key: Path, scratch: Path, history: History) -> None:
        ssh = (f"ssh -F {os.devnull} -i {shlex.quote(str(key))} -o IdentitiesOnly=yes -o BatchMode=yes "
               f"-o StrictHostKeyChecking=no -o UserKnownHostsFile={os.devnull} -o LogLevel=ERROR")
        env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
        self.env = {**env, "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1",
                    "GIT_TERMINAL_PROMPT": "0", "GIT_SSH_COMMAND": ssh}
        self.scratch = scratch
        self.history = history

    def _git(self, *args: str, cwd: Path | None = None) -> float:
        start = time.perf_counter()
        run_quiet(["git", *args], cwd=cwd, env=self.env, timeout=GIT_TIMEOUT)
        return time.perf_counter() - start

    def push(self, url: str) -> float:
        return self._git("push", "-q", url, *REFSPECS, cwd=self.history.path)

    def clone(self, url: str, check: bool = False) -> float:
        dest = Path(tempfile.mkdtemp(prefix="clone-", dir=self.scratch)) / "repo.git"
        try:
            seconds = self._git("clone", "-q", "--bare", url, str(dest))
            if check:
                self.check_refs(dest, url)
            return seconds
        finally:
            shutil.rmtree(dest.parent)

    def check_refs(self, repo: Path, url: str) -> None:
        def refs(path: Path) -> str:
            return run_quiet(["git", "show-ref"], cwd=path, env=self.env).stdout.decode()

        if refs(repo) != refs(self.history.path):
            raise BenchError(f"{redact(url)} did not transfer the whole history")


def _devflow_endpoints(devflow: DevflowServer) -> tuple[Endpoint, Endpoint]:
    """SSH and HTTP into one daemon; each push goes to a new app, created by the push."""
    apps = iter(range(1, 1_000_000))
    ssh_base = f"ssh://git@{HOST}:{devflow.ssh_port}"
    http_base = f"http://admin:{devflow.token}@{HOST}:{devflow.http_port}"

    def repo(url: str) -> Path:
        return devflow.data / "repos" / url.rsplit("/", 1)[1]

    return (
        Endpoint("DevFlow", f"{ssh_base}/history.git", lambda: f"{ssh_base}/push-{next(apps)}.git", repo),
        Endpoint("DevFlow", f"{http_base}/history.git", lambda: f"{http_base}/push-{next(apps)}.git", repo),
    )


def _measure(lanes: list[Lane], client: Client, runs: int) -> dict[tuple[str, str, str], list[float]]:
    """Time every operation on every endpoint, alternating which side goes first (A,B then B,A) against drift.

    The first round is a warm-up that also checks every endpoint transfers the whole history.
    """
    samples: dict[tuple[str, str, str], list[float]] = {}
    for run in range(runs + 1):
        warmup = run == 0
        label = "warm-up" if warmup else f"run {run}/{runs}"
        for operation in ("clone", "push"):
            for lane in lanes:
                sides = [e for e in (lane.devflow, lane.reference) if e is not None]
                if run % 2 == 0:
                    sides.reverse()
                timings = []
                for endpoint in sides:
                    if operation == "clone":
                        seconds = client.clone(endpoint.clone_url, check=warmup)
                    else:
                        url = endpoint.fresh_push_url()
                        seconds = client.push(url)
                        if warmup:
                            client.check_refs(endpoint.refs_of(url), url)
                    if not warmup:
                        samples.setdefault((operation, lane.transport, endpoint.server), []).append(seconds)
                    timings.append(f"{endpoint.server} {seconds:.3f}s")
                print(f"  {label:<9} {operation:<5} {lane.transport:<5} " + "   ".join(timings), flush=True)
    return samples


def measure(runs: int, cache_dir: Path) -> list[Comparison]:
    tools = find_tools()
    history = ensure_history(cache_dir)
    git_version = run_quiet([tools.git, "--version"]).stdout.decode().strip()
    print(f"history: {history.objects} objects, {history.pack_bytes / 2**20:.1f} MiB of packs ({history.path})")
    load = " ".join(f"{n:.1f}" for n in os.getloadavg())
    print(f"client and servers: {git_version}, {os.cpu_count()} CPUs, load average {load}; "
          f"{runs} runs after a warm-up", flush=True)
    with tempfile.TemporaryDirectory(prefix="devflow-bench-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        key = keygen(work / "client_key")
        client = Client(key, work, history)
        repos = ReferenceRepos(work / "reference-repos")
        devflow = stack.enter_context(devflow_daemon(work / "devflow-data", key))
        ssh_port = stack.enter_context(sshd(tools, work, key))
        http_port = stack.enter_context(lighttpd(tools, work, repos.root))
        daemon_port = stack.enter_context(git_daemon(tools, work, repos.root))

        # Both sides get the history to clone by a push, so each serves the pack as it received it.
        repos.create("history.git")
        client.push(str(repos.root / "history.git"))
        client.push(f"ssh://git@{HOST}:{devflow.ssh_port}/history.git")

        def local(url: str) -> Path:
            return repos.root / url.rsplit("/", 1)[1]

        ssh_base = f"ssh://{user_name()}@{HOST}:{ssh_port}{repos.root}"
        http_base = f"http://{HOST}:{http_port}/git"
        daemon_base = f"git://{HOST}:{daemon_port}"
        devflow_ssh, devflow_http = _devflow_endpoints(devflow)
        lanes = [
            Lane("ssh", devflow_ssh, Endpoint("sshd + git-shell", f"{ssh_base}/history.git",
                                              lambda: f"{ssh_base}/{repos.fresh()}", local)),
            Lane("http", devflow_http, Endpoint("lighttpd + http-backend", f"{http_base}/history.git",
                                                lambda: f"{http_base}/{repos.fresh()}", local)),
            Lane("git", None, Endpoint("git daemon", f"{daemon_base}/history.git",
                                       lambda: f"{daemon_base}/{repos.fresh()}", local)),
        ]
        samples = _measure(lanes, client, runs)

    def median_of(operation: str, transport: str, server: str) -> float | None:
        runs = samples.get((operation, transport, server))
        return statistics.median(runs) if runs else None

    return [
        Comparison(operation, lane.transport, median_of(operation, lane.transport, "DevFlow"),
                   lane.reference.server, median_of(operation, lane.transport, lane.reference.server) or 0.0)
        for operation in ("clone", "push") for lane in lanes
    ]


# --- the report ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    """Median seconds of DevFlow and of the reference for one operation; devflow is None on the git:// line."""

    operation: str
    transport: str
    devflow: float | None
    reference_name: str
    reference: float

    @property
    def ratio(self) -> float | None:
        return None if self.devflow is None else self.devflow / self.reference


def print_table(comparisons: list[Comparison]) -> None:
    headers = ("operation", "transport", "DevFlow s", "reference", "reference s", "DevFlow/reference")
    rows = [
        (c.operation, c.transport, "-" if c.devflow is None else f"{c.devflow:.3f}", c.reference_name,
         f"{c.reference:.3f}", "-" if c.ratio is None else f"{c.ratio:.2f}")
        for c in comparisons
    ]
    widths = [max(len(row[i]) for row in (headers, *rows)) for i in range(len(headers))]
    for row in (headers, *rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    over = [f"{c.operation} {c.transport}" for c in comparisons if c.ratio is not None and c.ratio > TARGET_RATIO]
    print(f"medians in seconds; target: every ratio <= {TARGET_RATIO:.2f}: "
          + (f"over on {', '.join(over)}" if over else "met"))


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "devflow-bench"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench git", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per measurement, median reported (default 5)")
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
                        help="where the generated history is kept between runs (default %(default)s)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    try:
        comparisons = measure(args.runs, args.cache_dir.expanduser().resolve())
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    print()
    print_table(comparisons)
    return 0
