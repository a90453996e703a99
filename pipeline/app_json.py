"""app.json parsing: the Heroku and Dokku keys DevFlow acts on, validated up front.

A typo in app.json should fail the push with the key's path, not surface later as a
health check that silently never ran. Like Dokku, app.json may have comments and trailing commas.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from pipeline.json_documents import JsonDocumentError, parse_json
from pipeline.limits import Limits
from runtime.health import Check as HealthCheck

CHECK_TYPES = ("startup", "liveness", "readiness")
MAX_CHECK_PATH = 2048  # a URL path any server takes
# Dokku check kinds the runtime cannot run; accepting them would pass checks that never ran.
UNSUPPORTED_CHECK_KEYS = ("command", "uptime", "listening")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
PROCESS_TYPE = re.compile(r"^[A-Za-z0-9_-]+$")


class AppJsonError(ValueError):
    """app.json is not valid JSON or a key has the wrong shape; the message names the key path."""


@dataclass(frozen=True)
class AppJson:
    healthchecks: dict[str, list[HealthCheck]] = field(default_factory=dict)
    predeploy: str | None = None
    postdeploy: str | None = None
    formation: dict[str, int] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    cron: list[dict] = field(default_factory=list)


def parse_app_json(text: str, limits: Limits) -> AppJson:
    try:
        data = parse_json(text, "app.json", comments=True)
    except JsonDocumentError as exc:
        raise AppJsonError(str(exc)) from None
    _expect(data, dict, "the top level", "an object")
    dokku_scripts = _object(_object(data, "scripts", "scripts"), "dokku", "scripts.dokku")
    return AppJson(
        healthchecks=_healthchecks(data.get("healthchecks"), limits),
        predeploy=_optional_command(dokku_scripts, "predeploy", "scripts.dokku.predeploy"),
        postdeploy=_optional_command(dokku_scripts, "postdeploy", "scripts.dokku.postdeploy"),
        formation=_formation(data.get("formation"), limits),
        env=_env(data.get("env")),
        cron=_cron(data.get("cron")),
    )


def _fail(path: str, what: str, value: Any) -> AppJsonError:
    return AppJsonError(f"app.json: {path} must be {what}, got {json.dumps(value)[:80]}")


def _expect(value: Any, kind: type | tuple[type, ...], path: str, what: str) -> None:
    # JSON true/false arrive as bool, a subclass of int: never accept them as numbers.
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise _fail(path, what, value)
    if not isinstance(value, kind):
        raise _fail(path, what, value)


def _object(parent: dict, key: str, path: str) -> dict:
    value = parent.get(key, {})
    _expect(value, dict, path, "an object")
    return value


def _optional_command(parent: dict, key: str, path: str) -> str | None:
    value = parent.get(key)
    if value is None:
        return None
    _expect(value, str, path, "a command string")
    return value.strip() or None


def _process_type(name: str, path: str) -> None:
    if not PROCESS_TYPE.match(name):
        raise AppJsonError(f"app.json: {path} is not a process type name (letters, digits, '-' or '_')")


def _number(check: dict, key: str, path: str, default: float, minimum: float, integer: bool = False) -> Any:
    value = check.get(key, default)
    what = f"an integer >= {minimum}" if integer else f"a number >= {minimum}"
    _expect(value, int if integer else (int, float), f"{path}.{key}", what)
    if value < minimum:
        raise _fail(f"{path}.{key}", what, value)
    return value


def _at_most(limits: Limits, name: str, count: int, what: str) -> None:
    if count > getattr(limits, name):
        raise AppJsonError(str(limits.refuse(name, f"app.json: {what}")))


def _healthchecks(value: Any, limits: Limits) -> dict[str, list[HealthCheck]]:
    if value is None:
        return {}
    _expect(value, dict, "healthchecks", "an object of process type -> list of checks")
    _at_most(limits, "max_process_types", len(value), f"healthchecks names {len(value)} process types")
    result: dict[str, list[HealthCheck]] = {}
    for kind, checks in value.items():
        _process_type(kind, f"healthchecks.{kind}")
        _expect(checks, list, f"healthchecks.{kind}", "a list of checks")
        _at_most(limits, "max_checks_per_type", len(checks), f"healthchecks.{kind} has {len(checks)} checks")
        result[kind] = [_healthcheck(check, kind, f"healthchecks.{kind}[{i}]", limits)
                        for i, check in enumerate(checks)]
    return result


def _healthcheck(check: Any, kind: str, path: str, limits: Limits) -> HealthCheck:
    _expect(check, dict, path, "an object")
    for key in UNSUPPORTED_CHECK_KEYS:
        if key in check:
            raise AppJsonError(f"app.json: {path}.{key}: {key} checks are not supported; "
                               "use a \"path\" check (HTTP GET, optionally with \"content\")")
    check_type = check.get("type", "startup")
    if check_type not in CHECK_TYPES:
        raise _fail(f"{path}.type", " or ".join(repr(t) for t in CHECK_TYPES), check_type)
    url_path = check.get("path", "/")
    _expect(url_path, str, f"{path}.path", "a string starting with '/'")
    if not url_path.startswith("/") or len(url_path) > MAX_CHECK_PATH:
        raise _fail(f"{path}.path", f"a string starting with '/', of at most {MAX_CHECK_PATH} characters", url_path)
    content = check.get("content")
    if content is not None:
        _expect(content, str, f"{path}.content", "a string")
    name = check.get("name", f"{kind} {check_type} {url_path}")
    _expect(name, str, f"{path}.name", "a string")
    parsed = HealthCheck(
        type=check_type, name=name[:200], path=url_path, content=content or None,
        attempts=_number(check, "attempts", path, 3, 1, integer=True),
        timeout=_number(check, "timeout", path, 5, 1),
        # A liveness check runs as long as the release does: at most once a second per process.
        wait=_number(check, "wait", path, 5, 1 if check_type == "liveness" else 0),
        initial_delay=_number(check, "initialDelay", path, 0, 0),
    )
    longest = parsed.initial_delay + parsed.attempts * (parsed.timeout + parsed.wait)
    if longest > limits.max_check_seconds:
        raise AppJsonError(str(limits.refuse("max_check_seconds", f"app.json: {path} may take {longest:g} seconds")))
    return parsed


def _formation(value: Any, limits: Limits) -> dict[str, int]:
    if value is None:
        return {}
    _expect(value, dict, "formation", "an object of process type -> {\"quantity\": n}")
    _at_most(limits, "max_process_types", len(value), f"formation names {len(value)} process types")
    result: dict[str, int] = {}
    for kind, entry in value.items():
        _process_type(kind, f"formation.{kind}")
        _expect(entry, dict, f"formation.{kind}", "an object like {\"quantity\": 1}")
        result[kind] = _number(entry, "quantity", f"formation.{kind}", 1, 0, integer=True)
        _at_most(limits, "max_replicas_per_type", result[kind], f"formation.{kind}.quantity is {result[kind]}")
    _at_most(limits, "max_replicas_per_app", sum(result.values()),
             f"formation asks for {sum(result.values())} processes in all")
    return result


def _env(value: Any) -> dict[str, str]:
    """Defaults only: entries without a value (required, generator) are for the user to set."""
    if value is None:
        return {}
    _expect(value, dict, "env", "an object of NAME -> value or {\"value\": ...}")
    result: dict[str, str] = {}
    for name, entry in value.items():
        if not ENV_NAME.match(name):
            raise AppJsonError(f"app.json: env.{name} is not an environment variable name")
        if isinstance(entry, dict):
            entry = entry.get("value")
            if entry is None:
                continue
            _expect(entry, str, f"env.{name}.value", "a string")
        else:
            _expect(entry, str, f"env.{name}", "a string or an object with a \"value\"")
        result[name] = entry
    return result


def _cron(value: Any) -> list[dict]:
    if value is None:
        return []
    _expect(value, list, "cron", "a list of {\"command\": ..., \"schedule\": ...}")
    for i, entry in enumerate(value):
        _expect(entry, dict, f"cron[{i}]", "an object")
        for key in ("command", "schedule"):
            _expect(entry.get(key), str, f"cron[{i}].{key}", "a string")
    return [dict(entry) for entry in value]
