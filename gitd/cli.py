"""The `devflow` command: run the daemon, bootstrap identity offline, or manage through the API."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from pydantic import ValidationError

from gitd import __version__
from gitd.commands import table
from gitd.commands.api_client import ApiClient
from gitd.errors import DevflowError

CLI_CONFIG = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "devflow" / "cli.json"


def _settings(args: argparse.Namespace):
    from gitd.settings import Settings

    from pipeline.limits import Limits

    fields = ("data_dir", "host", "ssh_port", "http_port", "router_port", "domain", "git_backend", "apps_dir",
              "extra_ca_certs", "app_user", "app_uid_base", "uids_dir", "reassign_uids", "max_concurrent_builds",
              *Limits.model_fields)
    given = {k: getattr(args, k) for k in fields if getattr(args, k, None) is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        raise DevflowError("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())) from None


def _directory(args: argparse.Namespace):
    from gitd.database import open_state
    from gitd.identity.directory import Directory

    settings = _settings(args)
    # Private until `devflow up` opens it for traversal: the state database holds keys and tokens.
    settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    return Directory(open_state(settings.state_url), settings.limits())


def cmd_up(args: argparse.Namespace) -> int:
    from gitd.daemon import serve

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    serve(_settings(args))
    return 0


def cmd_keys_add(args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
    record = _directory(args).add_key(args.user, text, admin=args.admin)
    print(json.dumps(record, indent=2) if args.json else
          f"added key {record['fingerprint']} for user {record['user']}{' (admin)' if args.admin else ''}")
    return 0


def cmd_tokens_create(args: argparse.Namespace) -> int:
    from datetime import timedelta

    from gitd.identity.directory import now

    if args.expires_days is not None and args.expires_days <= 0:
        # 0 would otherwise read as "no expiry": the opposite of what was asked.
        raise DevflowError("--expires-days must be a positive number of days")
    expires = now() + timedelta(days=args.expires_days) if args.expires_days else None
    record = _directory(args).create_token(args.user, args.description, expires, create_user=args.create_user)
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        print(f"token {record['id']} for {record['user']} (shown once, keep it safe):\n{record['token']}")
    return 0


def cmd_stop_apps(args: argparse.Namespace) -> int:
    import asyncio

    from gitd.data_dir_lock import DataDirLock
    from runtime.local.cgroups import Cgroups
    from runtime.local.scheduler import LocalScheduler
    from runtime.process_logs import ProcessLogs
    from runtime.router.process_impl import stop_routers

    settings = _settings(args)
    if not settings.data_dir.is_dir():
        raise SystemExit(f"devflow: {settings.data_dir} is not a DevFlow data directory")
    lock = DataDirLock(settings.data_dir)
    try:
        lock.acquire()
    except SystemExit:
        raise SystemExit(f"devflow: a daemon is serving {settings.data_dir}: stop it first, or it brings back "
                         "what stop-apps stops") from None
    try:
        scheduler = LocalScheduler(settings.run_dir / "processes",
                                   ProcessLogs(settings.logs_dir, settings.log_max_bytes), cgroups=Cgroups())
        instances = scheduler.instances()
        running = [i for i in instances if i.alive()]

        async def stop_all() -> None:
            # Those whose supervisor died too: what is left in their units goes.
            await asyncio.gather(*(scheduler.stop(i) for i in instances))
            await scheduler.stop_leftover_tasks()

        asyncio.run(stop_all())
        scheduler.units.prune()
        routers = stop_routers(settings.run_dir)
    finally:
        lock.release()
    print(f"stopped {len(running)} app process(es) and {routers} router process(es)")
    return 0


def cmd_login(args: argparse.Namespace) -> int:
    client = ApiClient(args.url, args.token)
    who = client.whoami()
    CLI_CONFIG.parent.mkdir(parents=True, exist_ok=True)
    CLI_CONFIG.touch(mode=0o600)
    CLI_CONFIG.chmod(0o600)  # touch's mode applies only to a new file; the token must not sit in an old 0644 one
    CLI_CONFIG.write_text(json.dumps({"url": args.url, "token": args.token}))
    print(f"logged in to {args.url} as {who['name']}")
    return 0


def _api_client() -> ApiClient:
    saved = json.loads(CLI_CONFIG.read_text()) if CLI_CONFIG.exists() else {}
    url = os.environ.get("DEVFLOW_URL") or saved.get("url") or "http://127.0.0.1:8000"
    token = os.environ.get("DEVFLOW_TOKEN") or saved.get("token")
    if not token:
        raise DevflowError("no API token: run `devflow login --url URL --token TOKEN` or set DEVFLOW_TOKEN")
    return ApiClient(url, token)


def build_parser() -> argparse.ArgumentParser:
    from pipeline.limits import Limits

    data_dir = argparse.ArgumentParser(add_help=False)
    data_dir.add_argument("--data-dir", type=Path, default=argparse.SUPPRESS,
                          help="state directory (default ~/.local/share/devflow, or DEVFLOW_DATA_DIR)")
    parser = argparse.ArgumentParser(
        prog="devflow", parents=[data_dir],
        description="DevFlow: self-hosted git push to deploy. Management commands (apps:create, keys:add, ...) "
                    "talk to a running daemon's API; run `devflow help` for them.",
    )
    parser.add_argument("--version", action="version", version=f"devflow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", parents=[data_dir], help="run the daemon in the foreground")
    up.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    up.add_argument("--ssh-port", type=int, help="SSH port (default 2222)")
    up.add_argument("--http-port", type=int, help="HTTP port (default 8000)")
    up.add_argument("--router-port", type=int, help="router port (default 8080)")
    up.add_argument("--domain", help="apps are served at <app>.<domain> (default localhost)")
    up.add_argument("--git-backend", choices=["auto", "cgit", "dulwich"], help="pack exchange (default auto)")
    up.add_argument("--apps-dir", type=Path, help="builds and dependency caches (default DATA_DIR/apps)")
    up.add_argument("--extra-ca-certs", type=Path,
                    help="PEM file of CA certificates builds trust besides the system's (TLS-intercepting proxies)")
    up.add_argument("--app-user", help="run every app's builds and processes as this user (root daemons; "
                                       "default: a uid of its own per app)")
    up.add_argument("--app-uid-base", type=int, help="first of the per-app uids (default 700000000)")
    up.add_argument("--uids-dir", type=Path, help="the host-wide record of which DevFlow holds each uid, shared "
                                                  "by every daemon on the host (default /var/lib/devflow/uids)")
    up.add_argument("--reassign-uids", action="store_true", default=None,
                    help="give apps whose uid another DevFlow on this host holds a fresh uid (their processes "
                         "restart as it) instead of refusing to start")
    up.add_argument("--max-concurrent-builds", type=int, help="builds at once over all apps (default 2)")
    limits = up.add_argument_group("limits", "bounds on what users control; each also DEVFLOW_<NAME>")
    for name, field in Limits.model_fields.items():
        kind = int if field.annotation is int else float
        limits.add_argument(f"--{name.replace('_', '-')}", type=kind,
                            help=f"{field.description} (default {field.default})")
    up.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    up.set_defaults(run=cmd_up)

    keys = sub.add_parser("keys", help="SSH keys, on the data directory (no daemon needed)")
    keys_sub = keys.add_subparsers(dest="action", required=True)
    add = keys_sub.add_parser("add", parents=[data_dir], help="add a public key for a user, creating the user")
    add.add_argument("--user", required=True)
    add.add_argument("--admin", action="store_true", help="make the user a platform admin")
    add.add_argument("--json", action="store_true")
    add.add_argument("file", help="public key file, or - for stdin")
    add.set_defaults(run=cmd_keys_add)

    tokens = sub.add_parser("tokens", help="HTTP tokens, on the data directory (no daemon needed)")
    tokens_sub = tokens.add_subparsers(dest="action", required=True)
    create = tokens_sub.add_parser("create", parents=[data_dir], help="create a token for a user")
    create.add_argument("--user", required=True)
    create.add_argument("--description", default="")
    create.add_argument("--expires-days", type=int)
    create.add_argument("--create-user", action="store_true", help="create the user if missing")
    create.add_argument("--json", action="store_true")
    create.set_defaults(run=cmd_tokens_create)

    stop_apps = sub.add_parser("stop-apps", parents=[data_dir],
                               help="stop every app process and the router (they keep running when the daemon "
                                    "stops); refused while the daemon runs")
    stop_apps.set_defaults(run=cmd_stop_apps)

    login = sub.add_parser("login", help="save the daemon URL and token the management commands use")
    login.add_argument("--url", required=True)
    login.add_argument("--token", required=True)
    login.set_defaults(run=cmd_login)
    return parser


def _follow_logs(argv: list[str]) -> int:
    """`devflow logs APP -f`: print lines as they come until Ctrl-C."""
    args = table.parser_for(table.BY_NAME["logs"]).parse_args(argv[1:])
    for line in _api_client().follow_logs(args.app, args.tail, args.process):
        print(line, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv and argv[0] == "help":
            sys.stdout.write(table.usage())
            return 0
        if argv and argv[0] == "logs" and {"-f", "--follow"} & set(argv):
            return _follow_logs(argv)
        if argv and argv[0] in table.BY_NAME:
            sys.stdout.write(table.run(argv, _api_client(), sys.stdin.read))
            return 0
        if argv and ":" in argv[0]:
            # A mistyped management command: argparse would list only up, keys, tokens and login.
            raise DevflowError(f"unknown command {argv[0][:80]!r}; run `devflow help` for the list")
        args = build_parser().parse_args(argv)
        return args.run(args)
    except DevflowError as exc:
        print(f"devflow: {exc.message}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"devflow: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
