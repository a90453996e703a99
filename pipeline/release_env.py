"""What a release's processes are given: their environment, how many of each run, and their health checks."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

from pipeline.app_json import AppJson
from pipeline.errors import PipelineInputError
from pipeline.limits import CONFIG_BYTES_CEILING, MAX_ARG_STRLEN, Limits
from runtime.health import Check


@dataclass(frozen=True)
class Platform:
    """What the platform tells every process about where it runs."""

    domain: str
    router_port: int

    def url(self, app: str) -> str:
        port = "" if self.router_port == 80 else f":{self.router_port}"
        return f"http://{app}.{self.domain}{port}"


def process_env(base: Mapping[str, str], platform: Platform, app: str, version: int, home: str,
                build_env: Mapping[str, str], config: Mapping[str, str], app_json: Mapping) -> dict[str, str]:
    """The host's usable basics, app.json's defaults, what the build needs, the app's config, then the
    platform's own variables, which nothing overrides."""
    env = {**base, "HOME": home, **app_json.get("env", {}), **build_env, **config}
    env.update(DEVFLOW_APP=app, DEVFLOW_RELEASE=f"v{version}", DEVFLOW_URL=platform.url(app))
    return env


def check_environment(env: Mapping[str, str]) -> None:
    """What execve will take: each KEY=value under Linux's bound for one string, all of them well inside its
    bound for the whole (config vars are bounded on their own; app.json's env defaults and the build's
    variables join them here)."""
    total = 0
    for key, value in env.items():
        size = len(key.encode()) + len(value.encode()) + 2
        if size > MAX_ARG_STRLEN:
            raise PipelineInputError(f"the environment variable {key} would take {size} bytes; one variable can "
                                     f"hold at most {MAX_ARG_STRLEN // 1024} KiB")
        total += size
    if total > 2 * CONFIG_BYTES_CEILING:
        raise PipelineInputError(f"the processes' environment would take {total} bytes, more than a process can "
                                 "be started with; app.json's env holds most of it")


def check_formation(counts: Mapping[str, int], limits: Limits) -> None:
    """A release's formation (app.json's, then ps:scale's) within the limits per type and per app."""
    for kind, count in counts.items():
        if count > limits.max_replicas_per_type:
            raise limits.refuse("max_replicas_per_type", f"{kind}={count}")
    if sum(counts.values()) > limits.max_replicas_per_app:
        raise limits.refuse("max_replicas_per_app", f"{sum(counts.values())} processes in all")


def formation(processes: Mapping[str, str], app_json: Mapping, scaled: Mapping[str, int]) -> dict[str, int]:
    """One web process by default, app.json's formation over that, `ps:scale` over both; only declared types."""
    counts = {kind: 1 if kind == "web" else 0 for kind in processes}
    counts.update({k: v for k, v in app_json.get("formation", {}).items() if k in processes})
    counts.update({k: v for k, v in scaled.items() if k in processes})
    return counts


def check_scale(counts: Mapping[str, int], processes: Mapping[str, str], current: Mapping[str, int],
                limits: Limits) -> None:
    """`ps:scale` names types the live release has, within the limits per type and per app."""
    unknown = sorted(set(counts) - set(processes))
    if unknown:
        have = ", ".join(sorted(processes)) or "none"
        raise PipelineInputError(f"the live release has no {', '.join(unknown)} process type "
                                 f"(its process types: {have})")
    check_formation({**current, **counts}, limits)


def checks(app_json: Mapping) -> dict[str, list[Check]]:
    """A release's health checks by process type, from the app.json it keeps."""
    return {kind: [Check(**c) for c in entries] for kind, entries in app_json.get("healthchecks", {}).items()}


def app_json_record(app_json: AppJson) -> dict:
    """The parts of app.json a release keeps, as plain JSON."""
    return {
        "healthchecks": {kind: [asdict(c) for c in entries] for kind, entries in app_json.healthchecks.items()},
        "predeploy": app_json.predeploy,
        "postdeploy": app_json.postdeploy,
        "formation": dict(app_json.formation),
        "env": dict(app_json.env),
    }
