"""The built-in router against direct connections to the same app, side by side in one run, with nginx as
the reference proxy when it is installed.

For each app (a stdlib ThreadingHTTPServer, typical of small user apps, and uvicorn, a fast one) the
load generator (wrk when installed, else a Python one) runs in its own process against the app directly,
through the built-in router in its own process (as the daemon runs it), and through nginx
(one worker, keep-alive upstream connections). Two loads each: saturation (requests/s) and a paced load at
half the saturation rate of the slower of direct and router, where added latency is what a proxy costs
rather than queueing.

The paced load is measured two ways. Alternating: the targets take turns, the whole load on one at a time,
and the medians of several runs are compared. Paired: half the connections go direct and half through the
proxy at the same moment, to the same app, and each run's difference of p99s is kept. On a small shared
machine the p99 of a few seconds swings by several milliseconds from one run to the next (steal time,
vCPU wakeups), which the alternating comparison reads as proxy cost; in a pair both paths live through the
same seconds, so the difference is the extra hop's latency. The proxy's CPU use slows both halves of a
pair alike, so that cost shows in the alternating figures only.

On a virtual machine the largest swings come from steal time, the CPU its hypervisor gives other guests:
a run (or pair) during which more than --max-steal of the CPUs was stolen is taken again, up to a few
times, and the report says how much steal the kept runs saw.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TypeVar

import uvicorn
import uvloop

from benchmarks._support import HOST, ROOT, BenchError, free_port, run_quiet, server
from benchmarks.steal import quiet
from runtime.router.process_impl import RouterProcess, stop_routers

APPS = ("stdlib", "uvicorn")
HOSTNAME = "bench.localhost"
BODY = b"hello from the benchmark app\n" * 8  # a small page, headers and body in one write
STEAL_TRIES = 4
T = TypeVar("T")


# --- measurement -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


def median_sample(samples: list[Sample]) -> Sample:
    return Sample(statistics.median(s.rps for s in samples), statistics.median(s.p50_ms for s in samples),
                  statistics.median(s.p99_ms for s in samples), sum(s.errors for s in samples))


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}
# A think time drawn from 0..2x the mean: with a fixed one, the connections fall into step and the "paced" load
# becomes bursts of every connection at once, which a single-threaded proxy serves one after the other, so
# its p99 measures the burst size times its per-request cost rather than the latency one request sees.
# Seeded per target, so the two halves of a pair do not draw the same sequence and fire together.
_DELAY_SCRIPT = "math.randomseed({seed})\nfunction delay() return math.random(0, {twice}) end\n"


def wrk(wrk_path: str, port: int, connections: int, seconds: float, delay_ms: int, workdir: Path) -> Sample:
    """One wrk run; with `delay_ms` each connection waits that long on average between requests (a paced load)."""
    argv = [wrk_path, "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", "-H", f"Host: {HOSTNAME}"]
    if delay_ms:
        script = workdir / f"delay-{delay_ms}-{port}.lua"  # one per target: paired runs start two wrk at once
        script.write_text(_DELAY_SCRIPT.format(seed=port, twice=2 * delay_ms))
        argv += ["-s", str(script)]
    out = run_quiet([*argv, f"http://{HOST}:{port}/"], timeout=seconds + 60).stdout.decode()

    def latency(percent: str) -> float:
        found = re.search(rf"^\s*{percent}%\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
        if not found:
            raise BenchError(f"cannot read the {percent}% latency from wrk:\n{out}")
        return float(found[1]) * _UNITS[found[2]]

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not rps:
        raise BenchError(f"cannot read requests/s from wrk:\n{out}")
    errors = sum(int(n) for n in re.findall(r"(?:Non-2xx or 3xx responses|connect|read|write|timeout)[: ]\s*(\d+)",
                                            out.split("Requests/sec")[0]))
    return Sample(float(rps[1]), latency("50"), latency("99"), errors)


def python_load(port: int, connections: int, seconds: float, delay_ms: int) -> Sample:
    """The fallback load generator, in its own process like wrk: keep-alive connections on uvloop."""
    env = {**os.environ, "PYTHONPATH": _pythonpath()}
    argv = [sys.executable, "-m", "benchmarks.router", "load", str(port), str(connections), str(seconds),
            str(delay_ms)]
    result = json.loads(run_quiet(argv, timeout=seconds + 60, env=env).stdout)
    return Sample(**result)


async def _load(port: int, connections: int, seconds: float, delay_ms: int) -> Sample:
    request = f"GET / HTTP/1.1\r\nHost: {HOSTNAME}\r\n\r\n".encode()
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def one_connection() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"content-length:\s*(\d+)", head, re.IGNORECASE)[1])
                await reader.readexactly(length)
                latencies.append(time.perf_counter() - start)
                errors += not head.startswith(b"HTTP/1.1 200")
                if delay_ms:
                    await asyncio.sleep(random.uniform(0, 2 * delay_ms) / 1000)
        finally:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(one_connection() for _ in range(connections)))
    elapsed = time.perf_counter() - start
    latencies.sort()
    return Sample(len(latencies) / elapsed, latencies[len(latencies) // 2] * 1000,
                  latencies[int(len(latencies) * 0.99)] * 1000, errors)


# --- the servers -----------------------------------------------------------------------------------------


def _pythonpath() -> str:
    return os.pathsep.join([str(ROOT / "scripts"), str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)


class StdlibApp(ThreadingHTTPServer):
    request_queue_size = 128  # not 5: connection bursts would measure SYN retransmits, not requests


class StdlibHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    wbufsize = 1 << 16  # head and body in one write, as frameworks do (else Nagle and delayed ACKs: 40 ms)

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, format: str, *args: object) -> None:
        pass


def serve_stdlib(port: int) -> None:
    StdlibApp((HOST, port), StdlibHandler).serve_forever()


async def _asgi_app(scope: dict, receive: Callable[[], Awaitable[dict]],
                    send: Callable[[dict], Awaitable[None]]) -> None:
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(BODY)).encode())]})
    await send({"type": "http.response.body", "body": BODY})


def serve_uvicorn(port: int) -> None:
    uvicorn.run(_asgi_app, host=HOST, port=port, loop="uvloop", http="httptools", lifespan="off",
                access_log=False, log_level="warning")


def serve_router(port: int, app_port: int, run_dir: Path) -> None:
    """The router as the daemon runs it: a process of its own (runtime.router.standalone), driven over its
    control socket by RouterProcess."""
    async def run() -> None:
        router = RouterProcess(HOST, port, run_dir, run_dir / "router.log")
        await router.start()
        await router.set_app("bench", [HOSTNAME], [(HOST, app_port)])
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await router.close()
        await asyncio.to_thread(stop_routers, run_dir)

    uvloop.run(run())


_NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    upstream app {{ server {host}:{app_port}; keepalive 64; }}
    server {{
        listen {host}:{port};
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $remote_addr;
        }}
    }}
}}
"""


def nginx_argv(nginx: str, port: int, app_port: int, workdir: Path) -> list[str]:
    """nginx as a reverse proxy with keep-alive upstream connections, its files all in `workdir`."""
    workdir.mkdir(exist_ok=True)
    conf = workdir / "nginx.conf"
    conf.write_text(_NGINX_CONF.format(dir=workdir, host=HOST, port=port, app_port=app_port))
    return [nginx, "-p", str(workdir), "-c", str(conf), "-e", str(workdir / "nginx-error.log")]


@contextmanager
def app_and_proxies(kind: str, logs: Path) -> Iterator[dict[str, int]]:
    """The app and the proxies in front of it, each in its own process; yields each target's port."""
    env = {**os.environ, "PYTHONPATH": _pythonpath()}
    ports = {"direct": free_port(), "router": free_port()}
    module = [sys.executable, "-m", "benchmarks.router"]
    nginx = shutil.which("nginx", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))
    with ExitStack() as stack:
        stack.enter_context(server(f"{kind} app", [*module, "serve-app", kind, str(ports["direct"])],
                                   logs / f"{kind}.log", ports["direct"], env))
        stack.enter_context(server("router", [*module, "serve-router", str(ports["router"]), str(ports["direct"]),
                                             str(logs / f"router-{kind}")],
                                   logs / f"router-{kind}.log", ports["router"], env))
        if nginx:
            ports["nginx"] = free_port()
            argv = nginx_argv(nginx, ports["nginx"], ports["direct"], logs / f"nginx-{kind}")
            stack.enter_context(server("nginx", argv, logs / f"nginx-{kind}.log", ports["nginx"]))
        yield ports


# --- the report ------------------------------------------------------------------------------------------


def measure(kind: str, args: argparse.Namespace, workdir: Path) -> list[str]:
    wrk_path = shutil.which("wrk")

    repeated, kept_stolen, failed = 0, [], []  # failed: per run, appended from the threads of paired runs

    def load(port: int, seconds: float, delay_ms: int = 0, connections: int = args.connections) -> Sample:
        """One run; its failed requests count whether or not the run is kept."""
        if wrk_path:
            sample = wrk(wrk_path, port, connections, seconds, delay_ms, workdir)
        else:
            sample = python_load(port, connections, seconds, delay_ms)
        failed.append(sample.errors)
        return sample

    def measured(fn: Callable[[], T]) -> T:
        """A measurement taken again while the hypervisor steals more than --max-steal of the CPUs."""
        nonlocal repeated
        result, stolen, tries = quiet(fn, args.max_steal / 100, STEAL_TRIES)
        repeated += tries - 1
        if stolen is not None:
            kept_stolen.append(stolen)
        return result

    def run(port: int, seconds: float, delay_ms: int = 0, connections: int = args.connections) -> Sample:
        return measured(lambda: load(port, seconds, delay_ms, connections))

    def side_by_side(ports: dict[str, int], delay_ms: int = 0) -> dict[str, Sample]:
        samples: dict[str, list[Sample]] = {name: [] for name in ports}
        for _ in range(args.runs):  # alternate, so that drift in the machine hits every target alike
            for name, port in ports.items():
                samples[name].append(run(port, args.duration, delay_ms))
        return {name: median_sample(runs) for name, runs in samples.items()}

    def paired(direct_port: int, proxy_port: int, delay_ms: int) -> list[float]:
        """Each run's proxy p99 minus direct p99, both loads running at once (half the connections each)."""
        connections = args.connections // 2
        added = []
        with ThreadPoolExecutor(2) as pool:

            def pair() -> tuple[Sample, Sample]:
                direct_run, proxy_run = (pool.submit(load, port, args.duration, delay_ms, connections)
                                         for port in (direct_port, proxy_port))
                return direct_run.result(), proxy_run.result()

            for _ in range(args.runs):
                direct_sample, proxy_sample = measured(pair)
                added.append(proxy_sample.p99_ms - direct_sample.p99_ms)
        return added

    with app_and_proxies(kind, workdir) as ports:
        for port in ports.values():
            load(port, 1)
        saturated = side_by_side(ports)
        rate = min(saturated["direct"].rps, saturated["router"].rps) / 2
        delay_ms = max(1, round(args.connections / rate * 1000))
        paced = side_by_side(ports, delay_ms)
        proxies = [name for name in ports if name != "direct"]
        pairs = {name: paired(ports["direct"], ports[name], delay_ms) for name in proxies}
    direct, paced_direct = saturated["direct"], paced["direct"]
    generator = "wrk" if wrk_path else "Python load generator"
    lines = [
        f"{kind} app, {args.connections} connections, {generator}, median of {args.runs} x {args.duration:g}s",
        f"  saturation  direct {direct.rps:9.0f} req/s  p50 {direct.p50_ms:6.2f} ms  p99 {direct.p99_ms:6.2f} ms",
    ]
    for name in proxies:
        sample = saturated[name]
        lines.append(f"              {name:6} {sample.rps:9.0f} req/s  p50 {sample.p50_ms:6.2f} ms  "
                     f"p99 {sample.p99_ms:6.2f} ms  ratio {sample.rps / direct.rps:.2f}")
    lines.append(f"  paced ~{args.connections * 1000 / delay_ms:.0f} req/s  direct p50 {paced_direct.p50_ms:6.2f} ms  "
                 f"p99 {paced_direct.p99_ms:6.2f} ms")
    for name in proxies:
        sample = paced[name]
        lines.append(f"              {name:6} p50 {sample.p50_ms:6.2f} ms  p99 {sample.p99_ms:6.2f} ms  "
                     f"added p99 {sample.p99_ms - paced_direct.p99_ms:+.2f} ms (alternating)")
    lines.append("  paced, direct and proxy at once (paired), added p99 per run:")
    for name in proxies:
        added = pairs[name]
        lines.append(f"              {name:6} median {statistics.median(added):+.2f} ms  "
                     f"runs {' '.join(f'{a:+.2f}' for a in added)}")
    if kept_stolen:
        over = sum(stolen > args.max_steal / 100 for stolen in kept_stolen)
        lines.append(f"  steal time of the runs kept: median {statistics.median(kept_stolen):.1%} of the CPUs, "
                     f"max {max(kept_stolen):.1%}; {repeated} runs taken again for more than {args.max_steal:g}%"
                     + (f", {over} kept over it after {STEAL_TRIES} tries" if over else ""))
    if "nginx" not in ports:
        lines.append("  (nginx not installed: no reference proxy)")
    if sum(failed):
        lines.append(f"  {sum(failed)} failed requests, in the runs kept and those taken again")
    return lines


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench router", description=__doc__.splitlines()[0])
    parser.add_argument("--apps", nargs="+", choices=APPS, default=list(APPS), help="apps to put behind the router")
    parser.add_argument("--connections", type=int, default=32, help="concurrent keep-alive connections (default 32)")
    parser.add_argument("--duration", type=float, default=4, help="seconds per run (default 4)")
    parser.add_argument("--runs", type=int, default=7, help="runs per measurement, median reported (default 7)")
    parser.add_argument("--max-steal", type=float, default=5,
                        help=f"repeat a run (up to {STEAL_TRIES} tries) while a VM's hypervisor steals more than "
                             "this percentage of the CPUs (default 5)")
    sub = parser.add_subparsers(dest="command", help="the benchmark's own processes (internal)")
    app = sub.add_parser("serve-app")
    app.add_argument("kind", choices=APPS)
    app.add_argument("port", type=int)
    router = sub.add_parser("serve-router")
    router.add_argument("port", type=int)
    router.add_argument("app_port", type=int)
    router.add_argument("run_dir", type=Path)
    load = sub.add_parser("load")
    for name, kind in (("port", int), ("connections", int), ("seconds", float), ("delay_ms", int)):
        load.add_argument(name, type=kind)
    args = parser.parse_args(argv)
    if args.runs < 1 or args.connections < 2 or args.duration <= 0 or not 0 <= args.max_steal <= 100:
        parser.error("--runs and --duration must be positive, --connections at least 2 (paired runs halve it), "
                     "--max-steal a percentage")

    if args.command == "serve-app":
        (serve_stdlib if args.kind == "stdlib" else serve_uvicorn)(args.port)
    elif args.command == "serve-router":
        serve_router(args.port, args.app_port, args.run_dir)
    elif args.command == "load":
        print(json.dumps(asdict(uvloop.run(_load(args.port, args.connections, args.seconds, args.delay_ms)))))
    else:
        loadavg = " ".join(f"{n:.1f}" for n in os.getloadavg())
        print(f"router benchmark on {os.cpu_count()} CPUs, load average {loadavg} before starting", flush=True)
        try:
            with tempfile.TemporaryDirectory(prefix="devflow-bench-router-") as tmp:
                for kind in args.apps:
                    print("\n".join(measure(kind, args, Path(tmp))), flush=True)
        except BenchError as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
