"""Bounded app logs: rotation with several writing processes, and reading across it (tail, follow)."""

from __future__ import annotations

import asyncio
import multiprocessing
from pathlib import Path

from runtime.process_logs import ProcessLogs
from runtime.rotating_log import RotatingLog, rotated

LINE_BYTES = 100


def _write_lines(path: str, writer: int, count: int, max_bytes: int) -> None:
    log = RotatingLog(Path(path), max_bytes)
    for n in range(count):
        log.write(f"{writer:02d} {n:06d} ".encode().ljust(LINE_BYTES - 1, b"x") + b"\n")
    log.close()


def test_writers_in_several_processes_rotate_once_each_time_and_tear_no_line(tmp_path: Path) -> None:
    path, max_bytes, writers, count = tmp_path / "app.log", 64 * 1024, 4, 3000
    spawn = multiprocessing.get_context("spawn")
    procs = [spawn.Process(target=_write_lines, args=(str(path), w, count, max_bytes)) for w in range(writers)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
        assert proc.exitcode == 0
    current, previous = path.read_bytes(), rotated(path).read_bytes()
    # Bounded: each file at most the limit plus the lines written while a rotation was being decided.
    for data in (current, previous):
        assert len(data) <= max_bytes + writers * LINE_BYTES
    lines = (previous + current).splitlines()
    assert all(len(line) == LINE_BYTES - 1 and line.endswith(b"x") for line in lines)
    # The newest lines are kept, each writer's in its order, and the files hold at least a limit's worth.
    assert len(lines) >= max_bytes // LINE_BYTES
    last = []
    for w in range(writers):
        own = [int(line.split()[1]) for line in lines if line.startswith(b"%02d " % w)]
        assert own == sorted(own)
        last += own[-1:]
    assert count - 1 in last


def test_tail_reads_the_rotated_file_when_the_current_one_is_short(tmp_path: Path) -> None:
    logs = ProcessLogs(tmp_path, max_bytes=16 * 1024)
    for n in range(500):  # about 45 bytes each: one rotation
        logs.write("demo", "web.1", f"line {n}")
    assert rotated(logs.path("demo")).exists()
    current = len(logs.path("demo").read_text().splitlines())
    tail = logs.tail("demo", current + 10)
    assert [line.rsplit(" ", 1)[1] for line in tail] == [str(n) for n in range(490 - current, 500)]
    assert logs.tail("demo", 0)[-1].endswith("line 499")
    logs.forget("demo")
    assert not logs.path("demo").exists() and not rotated(logs.path("demo")).exists()


async def numbers_until(logs: ProcessLogs, last: int, tail: int = 0, seen: list[int] | None = None) -> list[int]:
    """The number ending each line that following the demo app's log shows, up to `last`, added to `seen` as
    they come."""
    seen = [] if seen is None else seen
    async for line in logs.follow("demo", tail):
        seen.append(int(line.rsplit(" ", 1)[1]))
        if seen[-1] == last:
            break
    return seen


def test_follow_goes_on_in_the_new_file_after_a_rotation(tmp_path: Path) -> None:
    logs = ProcessLogs(tmp_path, max_bytes=16 * 1024)

    async def follow_while_writing() -> list[int]:
        reader = asyncio.create_task(numbers_until(logs, 999))
        await asyncio.sleep(0.3)  # the reader is at the end of the file
        for n in range(1000):  # about 45 bytes each: past the limit, so the file rotates under the reader
            logs.write("demo", "web.1", f"line {n}")
            if n % 100 == 0:
                await asyncio.sleep(0.05)
        return await asyncio.wait_for(reader, 60)

    seen = asyncio.run(follow_while_writing())
    assert rotated(logs.path("demo")).exists()
    assert seen == list(range(1000))


def test_follow_with_a_tail_misses_no_line_written_as_it_starts_and_joins_a_line_being_written(tmp_path: Path) -> None:
    logs = ProcessLogs(tmp_path)
    for n in range(50):
        logs.write("demo", "web.1", f"line {n}")

    async def follow_while_writing() -> list[int]:
        seen: list[int] = []
        reader = asyncio.create_task(numbers_until(logs, 299, tail=5, seen=seen))
        for n in range(50, 300):  # written while the reader starts: after its tail, before it reaches the end
            if n == 150:  # a line caught half written: its end waits until the reader is at it
                with logs.path("demo").open("a") as log:
                    log.write("2026-11-26T00:00:00Z web.1 | line 1")
                    log.flush()
                    for _ in range(6000):  # up to a minute, as long as the reader may take
                        if 149 in seen or reader.done():
                            break
                        await asyncio.sleep(0.01)
                    await asyncio.sleep(0.3)  # a poll or two of the reader with the line half there
                    log.write("50\n")
                continue
            logs.write("demo", "web.1", f"line {n}")
            if n % 50 == 0:
                await asyncio.sleep(0)
        return await asyncio.wait_for(reader, 60)

    seen = asyncio.run(follow_while_writing())
    assert 45 <= seen[0] <= 145  # five lines of tail, from wherever the file ended when the reader started
    assert seen == list(range(seen[0], 300)), seen


def test_a_deployments_own_log_stops_at_the_bound_and_says_so(tmp_path: Path) -> None:
    logs = ProcessLogs(tmp_path, max_bytes=64 * 1024)
    for n in range(5000):  # about 200 KiB
        logs.post("demo", "build", f"line {n:05d} " + "x" * 30, deployment_id=7)
    logs.flush()
    kept = logs.deployment_path("demo", 7).read_bytes()
    assert len(kept) < 64 * 1024 + 200 and kept.endswith(b"passed --log-max-bytes]\n")
    assert kept.startswith(b"line 00000 ")
    assert logs.tail("demo", 1)[0].endswith("line 04999 " + "x" * 30)  # the app's log rotates instead
    logs.forget_deployments("demo", [7])
    assert not logs.deployment_path("demo", 7).exists()
