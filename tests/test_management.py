"""Management commands through all three doors: SSH commands, the `devflow` CLI over the API, and the REST API.

The same command table serves SSH and the CLI, and the same permission checks serve all three, so each
behaviour is checked where a user meets it: plain text for people, --json for scripts, and errors that
say what went wrong in one line (SSH, CLI) or as {"error": ...} with a 4xx status (API).
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import Daemon, devflow, free_port, keygen
from gitd.commands.table import COMMANDS

FINGERPRINT = re.compile(r"^SHA256:[A-Za-z0-9+/]{43}$")


def _assert_refused(result: subprocess.CompletedProcess, prefix: str, fragments: tuple[str, ...]) -> None:
    """Non-zero exit, nothing on stdout, one `PREFIX...` line on stderr holding every fragment."""
    assert result.returncode != 0, result.stdout
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def assert_ssh_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    _assert_refused(result, "error: ", fragments)


def assert_cli_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    _assert_refused(result, "devflow: ", fragments)


def assert_api_error(response: httpx.Response, status: int, fragment: str = "") -> None:
    """A refused API call: the given status and a JSON body that is exactly {"error": message}."""
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"] and isinstance(body["error"], str) and fragment in body["error"], body


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def ssh_json(daemon: Daemon, *command: str, key: Path | None = None, input: str | None = None) -> Any:
    return json.loads(ok(daemon.ssh(*command, "--json", key=key, input=input)))


def ssh_keygen_fingerprint(pub: Path) -> str:
    """The fingerprint OpenSSH itself computes, which DevFlow must show the same way."""
    return subprocess.run(["ssh-keygen", "-lf", str(pub)], capture_output=True, text=True, check=True).stdout.split()[1]


def cli(daemon: Daemon, *args: str, token: str | None = None, input: str | None = None) -> subprocess.CompletedProcess:
    """The `devflow` CLI against the daemon, never reading the tester's own saved login."""
    env = {"DEVFLOW_URL": daemon.http, "DEVFLOW_TOKEN": daemon.token if token is None else token,
           "XDG_CONFIG_HOME": str(daemon.work / "no-config")}
    return devflow(*args, input=input, check=False, env=env)


def user_token(daemon: Daemon, user: str) -> str:
    return ssh_json(daemon, "tokens:create", "--user", user)["token"]


# SSH


def test_ssh_apps_create_list_info_destroy(cgit_daemon: Daemon) -> None:
    d = cgit_daemon
    out = ok(d.ssh("apps:create", "ssh-app"))
    assert "name: ssh-app\n" in out and "owner: admin\n" in out
    repo = d.data / "repos" / "ssh-app.git"
    assert (repo / "HEAD").is_file()

    listing = ok(d.ssh("apps:list"))
    assert listing.splitlines()[0].split() == ["NAME", "ROLE", "OWNER", "CREATED_AT"]
    assert any(line.split()[:3] == ["ssh-app", "owner", "admin"] for line in listing.splitlines()[1:])
    assert "ssh-app" in [a["name"] for a in ssh_json(d, "apps:list")]

    info = ssh_json(d, "apps:info", "ssh-app")
    assert info["name"] == "ssh-app" and info["repository"] == str(repo)
    assert info["collaborators"] == [{"user": "admin", "role": "owner"}]
    assert "repository: " + str(repo) in ok(d.ssh("apps:info", "ssh-app"))

    assert_ssh_error(d.ssh("apps:create", "ssh-app"), "already exists")
    assert_ssh_error(d.ssh("apps:create", "Bad_Name"), "invalid app name")
    assert_ssh_error(d.ssh("apps:info", "no-such-app"), "does not exist")

    # destroy deletes a repository: it needs --force or the name typed again.
    assert_ssh_error(d.ssh("apps:destroy", "ssh-app"), "--force")
    assert_ssh_error(d.ssh("apps:destroy", "ssh-app", "ssh-ap"), "--force")
    assert repo.is_dir()
    assert ssh_json(d, "apps:destroy", "ssh-app", "ssh-app")["name"] == "ssh-app"
    assert not repo.exists()
    assert_ssh_error(d.ssh("apps:info", "ssh-app"), "does not exist")

    ok(d.ssh("apps:create", "ssh-forced"))
    ok(d.ssh("apps:destroy", "--force", "ssh-forced"))
    assert not (d.data / "repos" / "ssh-forced.git").exists()
    assert "ssh-forced" not in ok(d.ssh("apps:list"))


def test_ssh_apps_set_protected_branches(cgit_daemon: Daemon) -> None:
    d = cgit_daemon
    ok(d.ssh("apps:create", "guarded"))
    result = ssh_json(d, "apps:set", "guarded", "protected-branches", "main", "'release/*'")
    assert result["protected_branches"] == ["main", "release/*"]
    assert ssh_json(d, "apps:info", "guarded")["protected_branches"] == ["main", "release/*"]
    assert "protected_branches: main, release/*" in ok(d.ssh("apps:info", "guarded"))

    ok(d.ssh("apps:set", "guarded", "protected-branches", "main,prod"))
    assert ssh_json(d, "apps:info", "guarded")["protected_branches"] == ["main", "prod"]
    ok(d.ssh("apps:set", "guarded", "protected-branches"))
    assert ssh_json(d, "apps:info", "guarded")["protected_branches"] == []

    assert_ssh_error(d.ssh("apps:set", "guarded", "protected-branches", "'bad;name'"), "invalid branch pattern")
    assert_ssh_error(d.ssh("apps:set", "guarded", "colour", "blue"), "unknown app setting")


def test_ssh_keys_add_list_remove(cgit_daemon: Daemon) -> None:
    d = cgit_daemon
    # On stdin, for yourself: the second key logs in as the same user.
    second = keygen(d.work / "admin_second")
    added = ssh_json(d, "keys:add", input=second.with_suffix(".pub").read_text())
    assert added["user"] == "admin" and added["fingerprint"] == ssh_keygen_fingerprint(second.with_suffix(".pub"))
    assert ssh_json(d, "whoami", key=second)["name"] == "admin"

    # Inline, for a user who does not exist yet: an admin creates them.
    newbie = keygen(d.work / "newbie_key")
    out = ok(d.ssh("keys:add", "--user", "newbie", *newbie.with_suffix(".pub").read_text().split()))
    assert "user: newbie" in out
    assert "newbie" in [u["name"] for u in ssh_json(d, "users:list")]
    assert ssh_json(d, "whoami", key=newbie) == {
        "name": "newbie", "admin": False, "create_apps": True,
        "via": f"ssh-key {ssh_keygen_fingerprint(newbie.with_suffix('.pub'))}"}

    listing = ok(d.ssh("keys:list"))
    assert listing.splitlines()[0].split() == ["FINGERPRINT", "USER", "TYPE", "COMMENT"]
    keys = ssh_json(d, "keys:list")
    assert keys and all(FINGERPRINT.match(k["fingerprint"]) for k in keys)
    assert all(k["fingerprint"] in listing for k in keys)
    assert {k["user"] for k in ssh_json(d, "keys:list", "--user", "newbie")} == {"newbie"}
    # A user sees only their own keys, and may not ask for someone else's.
    assert {k["user"] for k in ssh_json(d, "keys:list", key=newbie)} == {"newbie"}
    assert_ssh_error(d.ssh("keys:list", "--user", "admin", key=newbie), "only an admin")

    assert_ssh_error(d.ssh("keys:add", input=second.with_suffix(".pub").read_text()), "already registered")
    assert_ssh_error(d.ssh("keys:add", input="not a key\n"), "not a valid OpenSSH public key")
    assert_ssh_error(d.ssh("keys:add", input=second.read_text()), "private key")
    assert_ssh_error(d.ssh("keys:add"), "standard input")

    removed = ssh_json(d, "keys:remove", added["fingerprint"])
    assert removed["fingerprint"] == added["fingerprint"]
    assert added["fingerprint"] not in ok(d.ssh("keys:list"))
    assert d.ssh("whoami", key=second).returncode == 255  # the server now refuses the key
    assert_ssh_error(d.ssh("keys:remove", added["fingerprint"]), "no key with fingerprint")


def test_removed_key_loses_access_on_a_connection_kept_open(cgit_daemon: Daemon) -> None:
    """ssh's ControlMaster keeps one connection for many commands; each command checks the key again."""
    d = cgit_daemon
    key = d.add_user("multiplexer")
    fp = ssh_keygen_fingerprint(key.with_suffix(".pub"))
    control = d.work / "cm.sock"
    base = [*d.ssh_command(key).split(), "-o", f"ControlPath={control}"]
    master = subprocess.Popen([*base, "-o", "ControlMaster=yes", "-N", "git@127.0.0.1"], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(300):
            assert master.poll() is None, master.stderr.read() if master.stderr else ""
            if control.exists():
                break
            time.sleep(0.1)
        through_master = [*base, "-o", "ControlMaster=no", "git@127.0.0.1", "whoami", "--json"]
        first = subprocess.run(through_master, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        assert json.loads(ok(first))["name"] == "multiplexer"

        ok(d.ssh("keys:remove", fp))
        refused = subprocess.run(through_master, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        assert refused.returncode == 255 and "this SSH key was removed" in refused.stderr, refused
        master.wait(timeout=30)  # the server closed the connection the removed key opened
    finally:
        master.kill()
        master.communicate(timeout=30)


def test_ssh_non_admin_keys_only_for_themselves(cgit_daemon: Daemon) -> None:
    d = cgit_daemon
    mallory = d.add_user("mallory")
    other = keygen(d.work / "victim_key")
    assert_ssh_error(d.ssh("keys:add", "--user", "victim", key=mallory, input=other.with_suffix(".pub").read_text()),
                     "only an admin can add keys for another user")
    assert "victim" not in [u["name"] for u in ssh_json(d, "users:list")]

    # Their own second key is fine, and so is removing it; removing someone else's is not.
    own = ssh_json(d, "keys:add", key=mallory, input=keygen(d.work / "mallory_2").with_suffix(".pub").read_text())
    assert own["user"] == "mallory"
    ok(d.ssh("keys:remove", own["fingerprint"], key=mallory))
    admin_fp = ssh_keygen_fingerprint(d.admin_key.with_suffix(".pub"))
    assert_ssh_error(d.ssh("keys:remove", admin_fp, key=mallory), "only an admin")
    assert ssh_json(d, "whoami")["name"] == "admin"


def test_ssh_tokens_create_list_revoke(cgit_daemon: Daemon) -> None:
    d = cgit_daemon
    ok(d.ssh("apps:create", "tokened"))
    created = ssh_json(d, "tokens:create", "--description", "ci")
    secret = created["token"]
    assert secret.startswith("dfp_") and created["user"] == "admin" and created["state"] == "active"

    with d.api(secret) as api:
        assert api.get("whoami").json()["name"] == "admin"
    url = f"{d.http_url(secret)}/tokened.git"
    assert d.git("ls-remote", url).returncode == 0

    # The secret is shown once; listings show only its prefix.
    listing = ok(d.ssh("tokens:list"))
    tokens = ssh_json(d, "tokens:list")
    assert secret not in listing and secret not in json.dumps(tokens)
    assert all("token" not in t for t in tokens)
    row = next(t for t in tokens if t["id"] == created["id"])
    assert secret.startswith(row["prefix"]) and row["description"] == "ci" and row["state"] == "active"
    assert row["prefix"] in listing

    revoked = ssh_json(d, "tokens:revoke", str(created["id"]))
    assert revoked["state"] == "revoked"
    with d.api(secret) as api:
        assert_api_error(api.get("whoami"), 401, "revoked")
    assert d.git("ls-remote", url, check=False).returncode != 0
    assert next(t for t in ssh_json(d, "tokens:list") if t["id"] == created["id"])["state"] == "revoked"

    assert_ssh_error(d.ssh("tokens:revoke", "999999"), "no token with id")
    assert_ssh_error(d.ssh("tokens:revoke", "abc"), "invalid int value")
    assert_ssh_error(d.ssh("tokens:create", "--expires-days", "0"), "positive")


def test_ssh_tokens_for_other_users(cgit_daemon: Daemon) -> None:
    d = cgit_daemon
    trent_key = d.add_user("trent")
    token = ssh_json(d, "tokens:create", "--user", "trent")
    with d.api(token["token"]) as api:
        assert api.get("whoami").json()["name"] == "trent"
    assert {t["user"] for t in ssh_json(d, "tokens:list", key=trent_key)} == {"trent"}
    assert_ssh_error(d.ssh("tokens:create", "--user", "admin", key=trent_key), "only an admin")
    assert_ssh_error(d.ssh("tokens:list", "--user", "admin", key=trent_key), "only an admin")
    admin_token_id = next(t["id"] for t in ssh_json(d, "tokens:list", "--user", "admin"))
    assert_ssh_error(d.ssh("tokens:revoke", str(admin_token_id), key=trent_key), "only an admin")
    assert_ssh_error(d.ssh("tokens:create", "--user", "nobody-here"), "no user named")


def test_ssh_collaborators_and_roles(cgit_daemon: Daemon) -> None:
    d = cgit_daemon
    ok(d.ssh("apps:create", "team-app"))
    carol = d.add_user("carol")
    assert_ssh_error(d.ssh("apps:info", "team-app", key=carol), "does not exist or you have no access")

    assert ssh_json(d, "collaborators:add", "team-app", "carol", "read") == {
        "app": "team-app", "user": "carol", "role": "read"}
    listing = ok(d.ssh("collaborators:list", "team-app"))
    assert listing.splitlines()[0].split() == ["USER", "ROLE"]
    assert ["carol", "read"] in [line.split() for line in listing.splitlines()]
    assert ssh_json(d, "apps:info", "team-app", key=carol)["role"] == "read"
    assert_ssh_error(d.ssh("collaborators:add", "team-app", "carol", "admin", key=carol),
                     "has the read role", "needs admin")

    ok(d.ssh("collaborators:add", "team-app", "carol", "write"))
    assert {"user": "carol", "role": "write"} in ssh_json(d, "collaborators:list", "team-app")
    assert_ssh_error(d.ssh("apps:destroy", "--force", "team-app", key=carol), "has the write role")

    ok(d.ssh("collaborators:add", "team-app", "carol", "admin"))
    ok(d.ssh("apps:set", "team-app", "protected-branches", "main", key=carol))

    assert_ssh_error(d.ssh("collaborators:add", "team-app", "carol", "owner"), "unknown role", "read, write or admin")
    assert_ssh_error(d.ssh("collaborators:add", "team-app", "nobody-here", "read"), "no user named")
    assert_ssh_error(d.ssh("collaborators:add", "team-app", "carol"), "required")

    assert ssh_json(d, "collaborators:remove", "team-app", "carol")["removed"] is True
    assert [c["user"] for c in ssh_json(d, "collaborators:list", "team-app")] == ["admin"]
    assert_ssh_error(d.ssh("apps:info", "team-app", key=carol), "does not exist or you have no access")
    assert_ssh_error(d.ssh("collaborators:remove", "team-app", "carol"), "not a collaborator")


def test_ssh_users_are_for_admins(cgit_daemon: Daemon) -> None:
    d = cgit_daemon
    dave = d.add_user("dave")
    users = ssh_json(d, "users:list")
    assert {"name": "dave", "admin": False, "create_apps": True} in users
    assert ok(d.ssh("users:list")).splitlines()[0].split() == ["NAME", "ADMIN", "CREATE_APPS"]
    assert_ssh_error(d.ssh("users:list", key=dave), "only an admin")
    assert_ssh_error(d.ssh("users:set", "dave", "admin", "true", key=dave), "only an admin")

    assert ssh_json(d, "users:set", "dave", "create-apps", "false")["create_apps"] is False
    assert_ssh_error(d.ssh("apps:create", "daves-app", key=dave), "may not create apps")
    ok(d.ssh("users:set", "dave", "admin", "yes"))
    assert ssh_json(d, "whoami", key=dave)["admin"] is True
    ok(d.ssh("users:set", "dave", "admin", "off"))
    assert ssh_json(d, "whoami", key=dave)["admin"] is False

    assert_ssh_error(d.ssh("users:set", "dave", "colour", "true"), "unknown user flag")
    assert_ssh_error(d.ssh("users:set", "dave", "admin", "maybe"), "expected true or false")
    assert_ssh_error(d.ssh("users:set", "nobody-here", "admin", "true"), "no user named")
    assert_ssh_error(d.ssh("users:set", "admin", "admin", "false"), "your own admin right")


def test_ssh_whoami_and_help(cgit_daemon: Daemon) -> None:
    d = cgit_daemon
    out = ok(d.ssh("whoami"))
    assert "name: admin\n" in out and "via: ssh-key SHA256:" in out
    assert ssh_json(d, "whoami")["name"] == "admin"

    usage = ok(d.ssh("help"))
    assert usage.startswith("DevFlow commands")
    listed = {line.split()[0] for line in usage.splitlines()[1:]}
    assert listed == {c.name for c in COMMANDS}
    assert_ssh_error(d.ssh("deploy:everything"), "unknown command", "help")
    assert_ssh_error(d.ssh("apps:create"), "required")
    assert_ssh_error(d.ssh("apps:list", "--bogus"), "unrecognized arguments")
    assert_ssh_error(d.ssh("apps:create", "'unterminated"), "cannot parse")


@pytest.fixture(scope="module")
def json_app(cgit_daemon: Daemon) -> str:
    ok(cgit_daemon.ssh("apps:create", "json-app"))
    return "json-app"


@pytest.mark.parametrize("command, kind", [
    (("whoami",), dict), (("apps:list",), list), (("keys:list",), list), (("tokens:list",), list),
    (("users:list",), list), (("collaborators:list", "json-app"), list), (("apps:info", "json-app"), dict),
])
def test_json_output_parses_over_ssh_and_cli(cgit_daemon: Daemon, json_app: str, command: tuple[str, ...],
                                            kind: type) -> None:
    d = cgit_daemon
    over_ssh = ssh_json(d, *command)
    over_cli = json.loads(ok(cli(d, *command, "--json")))
    assert isinstance(over_ssh, kind) and isinstance(over_cli, kind)
    if kind is list:
        assert over_ssh and over_cli
    # The plain form is for people: not JSON.
    plain = ok(d.ssh(*command))
    with pytest.raises(json.JSONDecodeError):
        json.loads(plain)


# The devflow CLI, talking to the daemon's API


def test_cli_apps_keys_tokens(cgit_daemon: Daemon) -> None:
    d = cgit_daemon
    out = ok(cli(d, "apps:create", "cli-app"))
    assert "name: cli-app\n" in out
    assert (d.data / "repos" / "cli-app.git").is_dir()
    assert "cli-app" in [a["name"] for a in json.loads(ok(cli(d, "apps:list", "--json")))]
    assert "cli-app" in ok(cli(d, "apps:list"))
    assert json.loads(ok(cli(d, "apps:info", "cli-app", "--json")))["owner"] == "admin"
    assert_cli_error(cli(d, "apps:create", "cli-app"), "already exists")
    assert_cli_error(cli(d, "apps:info", "no-such-app"), "does not exist")
    assert_cli_error(cli(d, "apps:create"), "required")
    assert_cli_error(cli(d, "apps:destroy", "cli-app"), "--force")
    ok(cli(d, "apps:destroy", "cli-app", "cli-app"))
    assert not (d.data / "repos" / "cli-app.git").exists()

    key = keygen(d.work / "cli_user_key")
    pub = key.with_suffix(".pub").read_text()
    added = json.loads(ok(cli(d, "keys:add", "--user", "cli-user", "--json", input=pub)))
    assert added["user"] == "cli-user" and FINGERPRINT.match(added["fingerprint"])
    assert ssh_json(d, "whoami", key=key)["name"] == "cli-user"
    assert added["fingerprint"] in ok(cli(d, "keys:list"))
    assert_cli_error(cli(d, "keys:add", "--user", "cli-user", input=pub), "already registered")
    assert added["fingerprint"] == json.loads(ok(cli(d, "keys:remove", added["fingerprint"], "--json")))["fingerprint"]
    assert_cli_error(cli(d, "keys:remove", added["fingerprint"]), "no key with fingerprint")
    # A fingerprint's base64 may hold '/' and '+'; the CLI must send it as one path segment.
    assert_cli_error(cli(d, "keys:remove", "SHA256:ab/cd+ef"), "no key with fingerprint SHA256:ab/cd+ef")

    created = json.loads(ok(cli(d, "tokens:create", "--user", "cli-user", "--json")))
    assert json.loads(ok(cli(d, "whoami", "--json", token=created["token"])))["name"] == "cli-user"
    assert created["token"] not in ok(cli(d, "tokens:list"))
    ok(cli(d, "tokens:revoke", str(created["id"])))
    assert_cli_error(cli(d, "whoami", token=created["token"]), "invalid, expired or revoked token")



def test_cli_collaborators_users_whoami_help(cgit_daemon: Daemon) -> None:
    d = cgit_daemon
    ok(cli(d, "apps:create", "cli-team"))
    d.add_user("erin")
    ok(cli(d, "collaborators:add", "cli-team", "erin", "write"))
    assert {"user": "erin", "role": "write"} in json.loads(ok(cli(d, "collaborators:list", "cli-team", "--json")))
    assert_cli_error(cli(d, "collaborators:add", "cli-team", "erin", "boss"), "unknown role")
    ok(cli(d, "collaborators:remove", "cli-team", "erin"))
    assert "erin" not in ok(cli(d, "collaborators:list", "cli-team"))

    assert "erin" in ok(cli(d, "users:list"))
    erin_token = user_token(d, "erin")
    assert_cli_error(cli(d, "users:list", token=erin_token), "only an admin")
    assert json.loads(ok(cli(d, "users:set", "erin", "create-apps", "false", "--json")))["create_apps"] is False
    assert_cli_error(cli(d, "apps:create", "erins-app", token=erin_token), "may not create apps")

    out = ok(cli(d, "whoami"))
    assert "name: admin\n" in out and "via: token dfp_" in out
    assert ok(cli(d, "help")) == ok(d.ssh("help"))
    assert_cli_error(cli(d, "apps:lst"), "unknown command 'apps:lst'", "devflow help")
    assert_cli_error(cli(d, "tokens:revoke", "abc"), "invalid int value")


def test_cli_login_saves_url_and_token(cgit_daemon: Daemon, tmp_path: Path) -> None:
    d = cgit_daemon
    no_env = {"DEVFLOW_URL": "", "DEVFLOW_TOKEN": "", "XDG_CONFIG_HOME": str(tmp_path)}
    refused = devflow("login", "--url", d.http, "--token", "dfp_wrong", check=False, env=no_env)
    assert_cli_error(refused, "invalid, expired or revoked token")
    saved = tmp_path / "devflow" / "cli.json"
    assert not saved.exists()
    # A config file left readable by others (an older login, a copied dotfile) is tightened, not reused as is.
    saved.parent.mkdir()
    saved.write_text("{}")
    saved.chmod(0o644)

    out = ok(devflow("login", "--url", d.http, "--token", d.token, check=False, env=no_env))
    assert out == f"logged in to {d.http} as admin\n"
    assert saved.stat().st_mode & 0o077 == 0  # the token is a secret: owner-only
    assert json.loads(ok(devflow("whoami", "--json", check=False, env=no_env)))["name"] == "admin"
    # The environment overrides the saved login.
    d.add_user("frank")
    other = user_token(d, "frank")
    assert json.loads(ok(devflow("whoami", "--json", check=False, env={**no_env, "DEVFLOW_TOKEN": other})))[
        "name"] == "frank"


def test_cli_without_token_or_daemon(cgit_daemon: Daemon, tmp_path: Path) -> None:
    d = cgit_daemon
    result = devflow("apps:list", check=False,
                     env={"DEVFLOW_URL": d.http, "DEVFLOW_TOKEN": "", "XDG_CONFIG_HOME": str(tmp_path)})
    assert_cli_error(result, "no API token", "devflow login --url URL --token TOKEN", "DEVFLOW_TOKEN")

    nowhere = f"http://127.0.0.1:{free_port()}"
    result = devflow("apps:list", check=False,
                     env={"DEVFLOW_URL": nowhere, "DEVFLOW_TOKEN": d.token, "XDG_CONFIG_HOME": str(tmp_path)})
    assert_cli_error(result, "cannot reach the DevFlow daemon", nowhere)


# The REST API


def test_api_authentication(cgit_daemon: Daemon) -> None:
    d = cgit_daemon
    assert_api_error(httpx.get(d.http + "/api/apps"), 401, "authentication required")
    with d.api("dfp_not-a-real-token") as api:
        assert_api_error(api.get("apps"), 401, "invalid")
    with d.api("not even the right shape") as api:
        assert_api_error(api.get("whoami"), 401)
    response = httpx.get(d.http + "/api/whoami", auth=("anyone", d.token))
    assert response.status_code == 200 and response.json()["name"] == "admin"


def test_api_apps(cgit_daemon: Daemon) -> None:
    d = cgit_daemon
    with d.api() as api:
        created = api.post("apps", json={"name": "api-app"})
        assert created.status_code == 201 and created.json()["name"] == "api-app"
        assert_api_error(api.post("apps", json={"name": "api-app"}), 409, "already exists")
        assert_api_error(api.post("apps", json={"name": "API app"}), 400, "invalid app name")
        assert_api_error(api.post("apps", json={}), 400, "'name'")
        assert_api_error(api.post("apps", json={"name": 7}), 400, "'name'")
        assert_api_error(api.post("apps", content=b"{not json", headers={"content-type": "application/json"}),
                         400, "not valid JSON")
        assert_api_error(api.post("apps", json=["api-app"]), 400, "JSON object")
        assert_api_error(api.get("apps/no-such-app"), 404, "does not exist")

        assert "api-app" in [a["name"] for a in api.get("apps").json()]
        assert api.get("apps/api-app").json()["collaborators"] == [{"user": "admin", "role": "owner"}]
        set_ = api.put("apps/api-app/settings/protected-branches", json={"value": "main release/*"})
        assert set_.status_code == 200 and set_.json()["protected_branches"] == ["main", "release/*"]
        assert_api_error(api.put("apps/api-app/settings/colour", json={"value": "x"}), 400, "unknown app setting")
        assert_api_error(api.put("apps/api-app/settings/protected-branches", json={}), 400, "'value'")

        assert api.delete("apps/api-app").status_code == 200
        assert not (d.data / "repos" / "api-app.git").exists()
        assert_api_error(api.delete("apps/api-app"), 404)


def test_api_roles(cgit_daemon: Daemon) -> None:
    d = cgit_daemon
    d.add_user("grace")
    ok(d.ssh("apps:create", "api-team"))
    ok(d.ssh("collaborators:add", "api-team", "grace", "read"))
    with d.api(user_token(d, "grace")) as grace:
        assert grace.get("apps/api-team").json()["role"] == "read"
        assert_api_error(grace.put("apps/api-team/collaborators/grace", json={"role": "admin"}), 403, "needs admin")
        assert_api_error(grace.delete("apps/api-team"), 403)
        assert_api_error(grace.get("users"), 403, "only an admin")
        assert_api_error(grace.patch("users/grace", json={"flag": "admin", "value": True}), 403)
        assert_api_error(grace.post("tokens", json={"user": "admin"}), 403)
        assert_api_error(grace.get("apps/no-such-app"), 404)
    with d.api() as api:
        assert_api_error(api.put("apps/api-team/collaborators/grace", json={"role": "boss"}), 400, "unknown role")
        assert_api_error(api.put("apps/api-team/collaborators/nobody-here", json={"role": "read"}), 404)
        added = api.put("apps/api-team/collaborators/grace", json={"role": "write"})
        assert added.json() == {"app": "api-team", "user": "grace", "role": "write"}
        assert {"user": "grace", "role": "write"} in api.get("apps/api-team/collaborators").json()
        assert api.delete("apps/api-team/collaborators/grace").status_code == 200
        assert_api_error(api.delete("apps/api-team/collaborators/grace"), 404)
        assert_api_error(api.patch("users/grace", json={"flag": "admin", "value": "yes"}), 400, "'value'")
        patched = api.patch("users/grace", json={"flag": "create-apps", "value": False})
        assert patched.json() == {"name": "grace", "admin": False, "create_apps": False}


def test_api_keys_and_tokens(cgit_daemon: Daemon) -> None:
    d = cgit_daemon
    pub = keygen(d.work / "api_key").with_suffix(".pub").read_text()
    with d.api() as api:
        added = api.post("keys", json={"key": pub, "user": "heidi"})
        assert added.status_code == 201 and added.json()["user"] == "heidi"
        fingerprint = added.json()["fingerprint"]
        assert_api_error(api.post("keys", json={"key": pub, "user": "heidi"}), 409, "already registered")
        assert_api_error(api.post("keys", json={"key": "ssh-ed25519 AAAA"}), 400, "not a valid")
        assert_api_error(api.post("keys", json={"user": "heidi"}), 400, "'key'")
        assert fingerprint in [k["fingerprint"] for k in api.get("keys", params={"user": "heidi"}).json()]
        assert_api_error(api.delete("keys/SHA256:ab%2Fcd"), 404, "no key with fingerprint SHA256:ab/cd")

        token = api.post("tokens", json={"user": "heidi", "description": "api"})
        assert token.status_code == 201
        secret, token_id = token.json()["token"], token.json()["id"]
        assert_api_error(api.post("tokens", json={"expires_days": "soon"}), 400, "'expires_days'")
        assert_api_error(api.post("tokens", json={"expires_days": -1}), 400, "positive")
        assert secret not in api.get("tokens").text
        with d.api(secret) as heidi:
            assert heidi.get("whoami").json()["name"] == "heidi"
            assert_api_error(heidi.post("keys", json={"key": pub, "user": "admin"}), 403, "only an admin")
            assert api.delete(f"tokens/{token_id}").json()["state"] == "revoked"
            assert_api_error(heidi.get("whoami"), 401)
        assert_api_error(api.delete("tokens/999999"), 404)
        assert api.delete(f"keys/{fingerprint}").status_code == 200
        assert_api_error(api.delete(f"keys/{fingerprint}"), 404)
