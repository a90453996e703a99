"""Identity without a daemon: public key parsing, tokens, and the names that become paths and hosts."""

from __future__ import annotations

import hashlib
import sqlite3
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import keygen

from gitd.apps import check_app_name
from gitd.database import open_state
from gitd.errors import Conflict, InvalidInput, NotFound
from gitd.identity import directory as directory_module
from gitd.identity.directory import Directory, check_user_name, now
from gitd.identity.public_keys import parse_public_key
from pipeline.limits import Limits


def ssh_keygen_fingerprint(pub: Path) -> str:
    """The SHA256:... that `ssh-keygen -lf` prints: what users compare against."""
    out = subprocess.run(["ssh-keygen", "-lf", str(pub)], capture_output=True, text=True, check=True).stdout
    return out.split()[1]


# public keys


@pytest.mark.parametrize(("kind", "bits", "algorithm"), [
    ("ed25519", None, "ssh-ed25519"),
    ("ecdsa", 256, "ecdsa-sha2-nistp256"),
    ("ecdsa", 384, "ecdsa-sha2-nistp384"),
    ("ecdsa", 521, "ecdsa-sha2-nistp521"),
    ("rsa", 2048, "ssh-rsa"),
    ("rsa", 3072, "ssh-rsa"),
])
def test_parses_keys_made_by_ssh_keygen(tmp_path: Path, kind: str, bits: int | None, algorithm: str) -> None:
    key = keygen(tmp_path / f"id_{kind}", kind, bits)
    pub = key.with_suffix(".pub")
    text = pub.read_text()
    parsed = parse_public_key(text)
    assert parsed.algorithm == algorithm
    assert parsed.fingerprint == ssh_keygen_fingerprint(pub)
    assert parsed.openssh == " ".join(text.split()[:2])
    assert parsed.comment == key.name


def test_key_comment_is_optional_and_surrounding_blank_lines_ignored(tmp_path: Path) -> None:
    pub = keygen(tmp_path / "k").with_suffix(".pub")
    bare = " ".join(pub.read_text().split()[:2])
    parsed = parse_public_key(f"\n\n  {bare}  \n\n")
    assert parsed.comment == ""
    assert parsed.fingerprint == ssh_keygen_fingerprint(pub)


def test_refuses_dsa(tmp_path: Path) -> None:
    made = subprocess.run(["ssh-keygen", "-q", "-t", "dsa", "-N", "", "-f", str(tmp_path / "dsa")],
                          capture_output=True)
    if made.returncode != 0:
        pytest.skip(reason="this ssh-keygen cannot make DSA keys any more")
    with pytest.raises(InvalidInput, match="ssh-dss is not accepted"):
        parse_public_key((tmp_path / "dsa.pub").read_text())


def test_refuses_short_rsa(tmp_path: Path) -> None:
    pub = keygen(tmp_path / "rsa1024", "rsa", 1024).with_suffix(".pub")
    with pytest.raises(InvalidInput, match="at least 2048 bits"):
        parse_public_key(pub.read_text())


def test_refuses_private_key_with_a_reason(tmp_path: Path) -> None:
    key = keygen(tmp_path / "k")
    with pytest.raises(InvalidInput, match="that is a private key"):
        parse_public_key(key.read_text())


@pytest.mark.parametrize("text", [
    "garbage",
    "ssh-ed25519 not*base64*at*all",
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI",  # a valid prefix, cut short
    "ssh-ed25519",
])
def test_refuses_garbage(text: str) -> None:
    with pytest.raises(InvalidInput, match="not a valid OpenSSH public key"):
        parse_public_key(text)


def test_refuses_two_keys_at_once(tmp_path: Path) -> None:
    one = keygen(tmp_path / "one").with_suffix(".pub").read_text()
    two = keygen(tmp_path / "two").with_suffix(".pub").read_text()
    with pytest.raises(InvalidInput, match="exactly one"):
        parse_public_key(one + two)


@pytest.mark.parametrize("text", ["", "   ", "\n\n", "# only a comment\n"])
def test_refuses_empty(text: str) -> None:
    with pytest.raises(InvalidInput, match="exactly one"):
        parse_public_key(text)


# the directory: keys and tokens in a real SQLite state database


@pytest.fixture
def state(tmp_path: Path) -> tuple[Directory, Path]:
    db = tmp_path / "state.db"
    return Directory(open_state(f"sqlite:///{db}"), Limits()), db


def test_key_belongs_to_its_user_and_is_unique(state: tuple[Directory, Path], tmp_path: Path) -> None:
    directory, _ = state
    pub = keygen(tmp_path / "k").with_suffix(".pub").read_text()
    record = directory.add_key("alice", pub)
    assert record["user"] == "alice"
    assert directory.key_owner(record["fingerprint"]) == "alice"
    with pytest.raises(Conflict, match="already registered to user alice"):
        directory.add_key("bob", pub)


def test_token_create_verify_revoke(state: tuple[Directory, Path]) -> None:
    directory, _ = state
    created = directory.create_token("alice", "ci", create_user=True)
    secret = created["token"]
    assert secret.startswith("dfp_") and created["state"] == "active"
    actor = directory.actor_for_token(secret)
    assert actor is not None and actor.name == "alice" and actor.via == f"token {created['prefix']}"

    assert directory.revoke_token(created["id"])["state"] == "revoked"
    assert directory.actor_for_token(secret) is None
    assert directory.list_tokens("alice")[0]["state"] == "revoked"


def test_token_expires(state: tuple[Directory, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """The clock is moved, not waited for: expiry is checked against directory.now()."""
    directory, _ = state
    expires = now() + timedelta(days=1)
    secret = directory.create_token("alice", expires_at=expires, create_user=True)["token"]
    assert directory.actor_for_token(secret) is not None

    monkeypatch.setattr(directory_module, "now", lambda: expires + timedelta(seconds=1))
    assert directory.actor_for_token(secret) is None
    assert directory.list_tokens("alice")[0]["state"] == "expired"


def test_token_expiry_must_be_in_the_future(state: tuple[Directory, Path]) -> None:
    directory, _ = state
    with pytest.raises(InvalidInput, match="in the future"):
        directory.create_token("alice", expires_at=now() - timedelta(seconds=1), create_user=True)


def test_token_for_unknown_user_is_refused(state: tuple[Directory, Path]) -> None:
    directory, _ = state
    with pytest.raises(NotFound, match="no user named 'nobody'"):
        directory.create_token("nobody")


@pytest.mark.parametrize("secret", ["", "dfp_", "dfp_doesnotexist", "not-even-a-token", "dfp_" + "A" * 40])
def test_unknown_token_is_nobody(state: tuple[Directory, Path], secret: str) -> None:
    directory, _ = state
    directory.create_token("alice", create_user=True)
    assert directory.actor_for_token(secret) is None


def test_tokens_are_stored_hashed(state: tuple[Directory, Path]) -> None:
    """A copy of the database must not hand out working tokens."""
    directory, db = state
    secret = directory.create_token("alice", "ci", create_user=True)["token"]
    with sqlite3.connect(db) as conn:
        digests = [row[0] for row in conn.execute("SELECT digest FROM tokens")]
        dump = "\n".join(conn.iterdump())
    assert digests == [hashlib.sha256(secret.encode()).hexdigest()]
    assert secret not in dump
    assert secret[len("dfp_"):] not in dump
    # A leaked digest is not a token either.
    assert directory.actor_for_token(digests[0]) is None
    assert directory.actor_for_token("dfp_" + digests[0]) is None


# names


@pytest.mark.parametrize("name", ["a", "my-app", "app2", "a1-b2-c3", "x" * 63])
def test_app_names_accepted(name: str) -> None:
    assert check_app_name(name) == name


@pytest.mark.parametrize("name", [
    "../x", "a/b", "x" * 300, "x" * 64, "MyApp", "APP", "café", "ａpp", "2app", "app-", "my--app", "", " ",
    "my app", " app", "app ", "-x", "a.b", "a_b", "app\n", "app\x00", ".", "..",
])
def test_app_names_refused(name: str) -> None:
    with pytest.raises(InvalidInput, match="invalid app name") as refused:
        check_app_name(name)
    # The message quotes the name, but never a huge one in full.
    assert len(refused.value.message) < 300


@pytest.mark.parametrize("name", ["a", "alice", "bob.smith", "x_1", "ci-bot", "0day", "u" * 64])
def test_user_names_accepted(name: str) -> None:
    assert check_user_name(name) == name


@pytest.mark.parametrize("name", [
    "", "Alice", "-x", ".x", "_x", "a b", "u" * 65, "ünï", "a/b", "../x", "a:b", "a@b", "a\n",
])
def test_user_names_refused(name: str) -> None:
    with pytest.raises(InvalidInput, match="invalid user name"):
        check_user_name(name)


def test_invalid_user_name_never_reaches_the_database(state: tuple[Directory, Path], tmp_path: Path) -> None:
    directory, _ = state
    pub = keygen(tmp_path / "k").with_suffix(".pub").read_text()
    with pytest.raises(InvalidInput, match="invalid user name"):
        directory.add_key("../Admin", pub)
    assert directory.list_users() == [] and directory.list_keys() == []


def test_keys_and_tokens_per_user_are_bounded(tmp_path: Path) -> None:
    directory = Directory(open_state(f"sqlite:///{tmp_path / 'state.db'}"), Limits(max_keys_per_user=2,
                                                                                     max_tokens_per_user=2))
    for name in ("k1", "k2"):
        directory.add_key("alice", keygen(tmp_path / name).with_suffix(".pub").read_text())
    third = keygen(tmp_path / "k3").with_suffix(".pub").read_text()
    with pytest.raises(InvalidInput, match=r"has 2 SSH keys already.*--max-keys-per-user"):
        directory.add_key("alice", third)
    assert len(directory.list_keys("alice")) == 2
    directory.add_key("bob", third)  # the bound is per user

    first = directory.create_token("alice")
    directory.create_token("alice")
    with pytest.raises(InvalidInput, match=r"has 2 active tokens already.*--max-tokens-per-user"):
        directory.create_token("alice")
    assert len(directory.list_tokens("alice")) == 2
    directory.revoke_token(first["id"])  # a revoked token no longer counts
    directory.create_token("alice")
