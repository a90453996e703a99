"""Parsing OpenSSH public keys into what gitd stores and shows."""

from __future__ import annotations

from dataclasses import dataclass

import asyncssh

from gitd.errors import InvalidInput

# The key types OpenSSH's ssh-keygen makes today, including security-key variants.
ALLOWED_ALGORITHMS = {
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "ssh-rsa",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
}
MIN_RSA_BITS = 2048


@dataclass(frozen=True)
class PublicKey:
    algorithm: str
    openssh: str  # "<algorithm> <base64>", without the comment
    fingerprint: str  # "SHA256:..."
    comment: str


def fingerprint_of(key: asyncssh.SSHKey) -> str:
    return key.get_fingerprint("sha256")


def parse_public_key(text: str) -> PublicKey:
    """Parse one authorized_keys-style line; refuse anything else with a reason."""
    # Checked first: a private key file has many lines, and "expected one line" would not say why.
    if "PRIVATE KEY" in text:
        raise InvalidInput("that is a private key; give the public key (the .pub file)")
    lines = [line.strip() for line in text.strip().splitlines() if line.strip() and not line.startswith("#")]
    if len(lines) != 1:
        raise InvalidInput("expected exactly one OpenSSH public key line (the contents of a .pub file)")
    line = lines[0]
    try:
        key = asyncssh.import_public_key(line)
    except (asyncssh.KeyImportError, ValueError) as exc:
        raise InvalidInput(f"not a valid OpenSSH public key: {exc}") from None
    algorithm = key.get_algorithm()
    if algorithm not in ALLOWED_ALGORITHMS:
        raise InvalidInput(f"key type {algorithm} is not accepted; use ed25519, ecdsa or rsa")
    if algorithm == "ssh-rsa" and key.pyca_key.key_size < MIN_RSA_BITS:
        raise InvalidInput(f"RSA keys need at least {MIN_RSA_BITS} bits")
    parts = line.split(None, 2)
    comment = parts[2] if len(parts) > 2 else ""
    openssh = key.export_public_key("openssh").decode().split()[:2]
    return PublicKey(algorithm, " ".join(openssh), fingerprint_of(key), comment[:256])
