"""The command table: parse a Dokku-style argv, call Operations, render text or JSON."""

from __future__ import annotations

import argparse
import json
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gitd.commands.operations import Operations
from gitd.errors import InvalidInput, NotFound

Runner = Callable[[Operations, argparse.Namespace, Callable[[], str]], Any]


@dataclass(frozen=True)
class Command:
    name: str
    summary: str
    run: Runner
    arguments: list[tuple[tuple[str, ...], dict]] = field(default_factory=list)
    columns: tuple[str, ...] = ()  # for list results: the table's columns
    text: Callable[[Any], str] | None = None  # plain output, where a table or key: value lines do not fit


def arg(*flags: str, **options: Any) -> tuple[tuple[str, ...], dict]:
    return flags, options


APP = arg("app", help="app name")


def _key_text(args: argparse.Namespace, read_stdin: Callable[[], str]) -> str:
    text = " ".join(args.key) if args.key else read_stdin()
    if not text.strip():
        raise InvalidInput("give the public key on standard input, e.g. keys:add < ~/.ssh/id_ed25519.pub")
    return text


def _bool(text: str) -> bool:
    if text.lower() in ("true", "yes", "on", "1"):
        return True
    if text.lower() in ("false", "no", "off", "0"):
        return False
    raise InvalidInput(f"expected true or false, got {text!r}")


def _destroy(ops: Operations, args: argparse.Namespace, _stdin: Callable[[], str]) -> dict:
    if not args.force and args.confirm != args.app:
        raise InvalidInput(f"destroying {args.app} deletes its repository; repeat with --force to confirm")
    return ops.apps_destroy(args.app)


COMMANDS: list[Command] = [
    Command("help", "list the commands", lambda ops, a, s: None),
    Command("whoami", "show who you are authenticated as", lambda ops, a, s: ops.whoami()),
    Command("apps:list", "list the apps you can access", lambda ops, a, s: ops.apps_list(),
            columns=("name", "role", "owner", "created_at")),
    Command("apps:create", "create an app and its repository", lambda ops, a, s: ops.apps_create(a.app), [APP]),
    Command("apps:info", "show an app", lambda ops, a, s: ops.apps_info(a.app), [APP]),
    Command("apps:destroy", "delete an app and its repository", _destroy,
            [APP, arg("--force", action="store_true", help="confirm the deletion"),
             arg("confirm", nargs="?", help="the app name again, to confirm")]),
    Command("apps:set", "change an app setting (deploy-branch, protected-branches)",
            lambda ops, a, s: ops.apps_set(a.app, a.setting, " ".join(a.value)),
            [APP, arg("setting"), arg("value", nargs="*")]),
    Command("keys:add", "add an SSH public key (from stdin); admins may name --user",
            lambda ops, a, s: ops.keys_add(_key_text(a, s), a.user),
            [arg("--user", help="owner of the key (admins only; creates the user)"),
             arg("key", nargs="*", help="the key line, if not on stdin")]),
    Command("keys:list", "list SSH keys", lambda ops, a, s: ops.keys_list(a.user),
            [arg("--user")], columns=("fingerprint", "user", "type", "comment")),
    Command("keys:remove", "remove an SSH key by fingerprint", lambda ops, a, s: ops.keys_remove(a.fingerprint),
            [arg("fingerprint", help="SHA256:...")]),
    Command("tokens:create", "create an HTTP token (shown once)",
            lambda ops, a, s: ops.tokens_create(a.user, a.description, a.expires_days),
            [arg("--user"), arg("--description", default=""), arg("--expires-days", type=int)]),
    Command("tokens:list", "list HTTP tokens", lambda ops, a, s: ops.tokens_list(a.user),
            [arg("--user")], columns=("id", "user", "prefix", "state", "expires_at", "description")),
    Command("tokens:revoke", "revoke an HTTP token by id", lambda ops, a, s: ops.tokens_revoke(a.id),
            [arg("id", type=int)]),
    Command("collaborators:list", "list an app's collaborators", lambda ops, a, s: ops.collaborators_list(a.app),
            [APP], columns=("user", "role")),
    Command("collaborators:add", "give a user a role (read, write, admin) on an app",
            lambda ops, a, s: ops.collaborators_add(a.app, a.user, a.role), [APP, arg("user"), arg("role")]),
    Command("collaborators:remove", "take a user's role on an app away",
            lambda ops, a, s: ops.collaborators_remove(a.app, a.user), [APP, arg("user")]),
    Command("config", "show an app's config vars", lambda ops, a, s: ops.config_show(a.app), [APP],
            text=lambda r: "".join(f"{k}={_shell_quote(v)}\n" for k, v in r.items()) or "(no config vars)\n"),
    Command("config:get", "print one config var's value", lambda ops, a, s: ops.config_get(a.app, a.key),
            [APP, arg("key")], text=lambda r: r["value"] + "\n"),
    Command("config:set", "set config vars (KEY=VALUE ...) and restart with a new release",
            lambda ops, a, s: ops.config_set(a.app, a.pairs, a.encoded, not a.no_restart),
            [arg("--encoded", action="store_true", help="values are base64"),
             arg("--no-restart", action="store_true", help="store only; the next release applies them"),
             APP, arg("pairs", nargs="+", metavar="KEY=VALUE")]),
    Command("config:unset", "remove config vars and restart with a new release",
            lambda ops, a, s: ops.config_unset(a.app, a.keys, not a.no_restart),
            [arg("--no-restart", action="store_true"), APP, arg("keys", nargs="+", metavar="KEY")]),
    Command("releases", "list an app's releases", lambda ops, a, s: ops.releases(a.app), [APP],
            columns=("version", "commit", "reason", "description", "user", "created_at")),
    Command("rollback", "make a new release from an old one's build and config",
            lambda ops, a, s: ops.rollback(a.app, a.version), [APP, arg("version", help="e.g. v3")]),
    Command("deploys", "list an app's deployments: state, failing stage, time per stage",
            lambda ops, a, s: ops.deployments_list(a.app), [APP],
            columns=("id", "commit", "state", "stage", "release", "seconds", "user", "created_at")),
    Command("ps", "show an app's processes", lambda ops, a, s: ops.ps(a.app), [APP],
            columns=("process", "release", "state", "port", "restarts", "pid")),
    Command("ps:scale", "set how many of each process type run (web=2 worker=1)",
            lambda ops, a, s: ops.ps_scale(a.app, a.pairs), [APP, arg("pairs", nargs="+", metavar="TYPE=N")]),
    Command("ps:restart", "restart an app's processes without downtime", lambda ops, a, s: ops.ps_restart(a.app),
            [APP]),
    Command("ps:stop", "stop an app's processes", lambda ops, a, s: ops.ps_stop(a.app), [APP]),
    Command("ps:start", "start an app's processes at its live release", lambda ops, a, s: ops.ps_start(a.app),
            [APP]),
    Command("logs", "show an app's build and process logs (-f to follow)",
            lambda ops, a, s: ops.logs(a.app, a.tail, a.process),
            [APP, arg("-f", "--follow", action="store_true"), arg("-p", "--process"),
             arg("-n", "--tail", type=int, default=100)],
            text=lambda r: "".join(line + "\n" for line in r)),
    Command("resources", "show an app's memory and CPU limits per process", lambda ops, a, s: ops.resources(a.app),
            [APP]),
    Command("resources:set", "limit each process: memory=512M cpu=0.5 (restarts the processes)",
            lambda ops, a, s: ops.resources_set(a.app, a.pairs), [APP, arg("pairs", nargs="+", metavar="KEY=VALUE")]),
    Command("resources:clear", "remove an app's limits (restarts the processes)",
            lambda ops, a, s: ops.resources_clear(a.app), [APP]),
    Command("domains", "list the host names an app answers to", lambda ops, a, s: ops.domains_list(a.app),
            [APP], columns=("domain",)),
    Command("domains:add", "route a custom host name to an app", lambda ops, a, s: ops.domains_add(a.app, a.domain),
            [APP, arg("domain")]),
    Command("domains:remove", "stop routing a custom host name", lambda ops, a, s: ops.domains_remove(a.app, a.domain),
            [APP, arg("domain")]),
    Command("users:list", "list users (admins)", lambda ops, a, s: ops.users_list(),
            columns=("name", "admin", "create_apps")),
    Command("users:set", "set a user flag: admin or create-apps, true or false (admins)",
            lambda ops, a, s: ops.users_set(a.name, a.flag, _bool(a.value)), [arg("name"), arg("flag"), arg("value")]),
]
BY_NAME = {c.name: c for c in COMMANDS}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise InvalidInput(f"{self.prog}: {message}")


def parser_for(command: Command) -> argparse.ArgumentParser:
    # exit_on_error stays on: argparse then routes type errors (e.g. "abc" for an int) to error() too.
    parser = _Parser(prog=command.name, description=command.summary, add_help=False)
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    for flags, options in command.arguments:
        parser.add_argument(*flags, **options)
    return parser


def usage() -> str:
    width = max(len(c.name) for c in COMMANDS)
    lines = ["DevFlow commands (add --json for machine-readable output):"]
    lines += [f"  {c.name.ljust(width)}  {c.summary}" for c in COMMANDS]
    return "\n".join(lines) + "\n"


def render(command: Command, result: Any, as_json: bool) -> str:
    if command.name == "help":
        return usage()
    if as_json:
        return json.dumps(result, indent=2, sort_keys=True) + "\n"
    if command.text is not None:
        return command.text(result)
    if isinstance(result, list):
        return _table(result, command.columns)
    lines = "".join(line + "\n" for line in result.get("output", []))
    return lines + "".join(f"{k}: {_plain(v)}\n" for k, v in result.items() if k != "output")


def _shell_quote(value: str) -> str:
    return shlex.quote(value) if value else "''"


def _plain(value: Any) -> str:
    if isinstance(value, dict):
        return " ".join(f"{k}={_plain(v)}" for k, v in value.items()) or "(none)"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(_plain(v) if not isinstance(v, dict) else " ".join(map(str, v.values())) for v in value)
    return "" if value is None else str(value)


def _table(rows: list[dict], columns: tuple[str, ...]) -> str:
    if not rows:
        return "(none)\n"
    cells = [[c.upper() for c in columns]] + [[_plain(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "".join("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() + "\n" for row in cells)


def run(argv: list[str], ops: Operations, read_stdin: Callable[[], str]) -> str:
    """Run one command line; raises DevflowError with a message for the user."""
    if not argv:
        return usage()
    command = BY_NAME.get(argv[0])
    if command is None:
        raise NotFound(f"unknown command {argv[0][:80]!r}; run 'help' for the list")
    args = parser_for(command).parse_args(argv[1:])
    return render(command, command.run(ops, args, read_stdin), args.json)
