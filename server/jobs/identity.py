"""Server-issued volunteer identity: ``welcome`` hands out a signed id, later ``hello``s present it.

An id is ``v<20 hex>-<32 hex>``: a random public part and an HMAC-SHA256 of it (first 128 bits)
under a key derived from the data key (``UVM_KEY`` or ``data/secret.key``), so it survives
restarts and every instance on one database (which must share the data key anyway) accepts the
ids of the others. The public part is what the server stores and shows (``VolunteerSocket.volunteer``,
the volunteers table, leases); the whole signed id is a credential kept by the browser alone.
A missing, malformed or forged id gets a fresh one: a volunteer cannot choose its identity, so a
track record (reputation, lease strikes) cannot be borrowed from another volunteer.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

_SIGNED = re.compile(r"^(v[0-9a-f]{20})-([0-9a-f]{32})$")
_CONTEXT = b"uvm-compute volunteer id v1"


class VolunteerIds:
    """Issues and verifies signed volunteer ids."""

    def __init__(self, data_key: bytes) -> None:
        # A key of its own, derived (HMAC as a KDF) so the data key is never used for two purposes.
        self._key = hmac.new(data_key, _CONTEXT, hashlib.sha256).digest()

    def _mac(self, public: str) -> str:
        return hmac.new(self._key, public.encode(), hashlib.sha256).hexdigest()[:32]

    def issue(self) -> tuple[str, str]:
        """A fresh identity: (public id, signed id to hand to the volunteer)."""
        public = "v" + secrets.token_hex(10)
        return public, f"{public}-{self._mac(public)}"

    def verify(self, signed: str) -> str | None:
        """The public id of a genuine signed id; None for anything else."""
        match = _SIGNED.match(signed) if isinstance(signed, str) else None
        if match is None or not hmac.compare_digest(match.group(2), self._mac(match.group(1))):
            return None
        return match.group(1)

    def verify_or_issue(self, signed: str) -> tuple[str, str]:
        """(public id, signed id): the presented identity if genuine, else a fresh one."""
        public = self.verify(signed)
        return (public, signed) if public is not None else self.issue()
