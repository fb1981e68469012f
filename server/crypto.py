"""Encryption at rest: AES-GCM with a key id, and associated data binding each value to its row.

A stored value is ``key_id || 0x00 || nonce(12) || ciphertext+tag``. The associated data names the
row and column (``b"task:17:result"``), so a ciphertext copied to another row does not decrypt.
Passwords and API tokens are not encrypted but hashed (scrypt and SHA-256).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM


class DecryptError(Exception):
    """A ciphertext that does not decrypt under any known key with its associated data."""


class Box:
    """Encrypts with the current key; decrypts with any key it knows (rotation)."""

    def __init__(self, keys: dict[str, bytes], current: str) -> None:
        if current not in keys:
            raise ValueError(f"current key id {current!r} has no key")
        self._aead = {kid: AESGCM(key) for kid, key in keys.items()}
        self.fingerprints = {kid: fingerprint(key) for kid, key in keys.items()}
        self.current = current
        self.prefix = current.encode() + b"\x00"

    def seal_again(self, blob: bytes, aad: str) -> bytes:
        """The same plaintext under the current key (key rotation)."""
        return self.seal(self.open(blob, aad), aad)

    def seal(self, plaintext: bytes, aad: str) -> bytes:
        nonce = os.urandom(12)
        return self.prefix + nonce + self._aead[self.current].encrypt(nonce, plaintext, aad.encode())

    def open(self, blob: bytes, aad: str) -> bytes:
        kid, sep, rest = bytes(blob).partition(b"\x00")
        aead = self._aead.get(kid.decode(errors="replace"))
        if not sep or aead is None or len(rest) < 28:
            raise DecryptError(f"unknown key id or malformed ciphertext for {aad}")
        try:
            return aead.decrypt(rest[:12], rest[12:], aad.encode())
        except InvalidTag:
            raise DecryptError(f"ciphertext does not match its row ({aad})") from None

    def opener(self) -> Callable[[bytes, bytes], bytes]:
        """``open`` for a loop over many values (a download opens 100,000 a second): associated data
        as bytes, and values under the current key decrypted without any detour."""
        prefix, at, aead, slow = self.prefix, len(self.prefix), self._aead[self.current], self.open

        def open_(blob: bytes, aad: bytes) -> bytes:
            if blob[:at] == prefix and len(blob) >= at + 28:
                try:
                    return aead.decrypt(blob[at : at + 12], blob[at + 12 :], aad)
                except InvalidTag:
                    pass  # slow() raises the error that names the row
            return slow(blob, aad.decode())

        return open_

    def seal_json(self, value: Any, aad: str) -> bytes:
        return self.seal(json.dumps(value, separators=(",", ":")).encode(), aad)

    def open_json(self, blob: bytes, aad: str) -> Any:
        return json.loads(self.open(blob, aad))

    def seal_text(self, text: str, aad: str) -> bytes:
        return self.seal(text.encode(), aad)

    def open_text(self, blob: bytes | None, aad: str) -> str:
        return "" if blob is None else self.open(blob, aad).decode()


def key_id_of(blob: bytes) -> str:
    """The key id a stored value was sealed with ('' if it is not a ciphertext of ours)."""
    kid, sep, _ = bytes(blob[:17]).partition(b"\x00")
    return kid.decode(errors="replace") if sep else ""


def fingerprint(key: bytes) -> str:
    """A value that identifies a key without revealing it (stored in the database per key id)."""
    return hmac.new(key, b"uvm-compute key fingerprint v1", hashlib.sha256).hexdigest()


def load_or_create_key(path: Path) -> bytes:
    """The embedded default's key: generated on first run into ``path`` with mode 0600."""
    if path.exists():
        key = bytes.fromhex(path.read_text().strip())
        if len(key) != 32:
            raise ValueError(f"{path} does not hold a 256-bit hex key")
        return key
    path.parent.mkdir(parents=True, exist_ok=True)
    key = AESGCM.generate_key(bit_length=256)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key.hex())
    return key


# ------------------------------------------------------------------------------ secrets at rest
def new_token() -> str:
    return "uvm_" + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def hash_password(password: str) -> str:
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=2**14, r=8, p=1)
    return f"scrypt${salt.hex()}${digest.hex()}"


def check_password(password: str, stored: str) -> bool:
    try:
        scheme, salt, digest = stored.split("$")
    except ValueError:
        return False
    if scheme != "scrypt":
        return False
    got = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt), n=2**14, r=8, p=1)
    return hmac.compare_digest(got.hex(), digest)


def code_hash(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()
