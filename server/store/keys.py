"""The encryption keys a server may use, checked against the fingerprints its database remembers.

Two servers on one database with different keys would each write rows the other cannot decrypt,
so a server whose key does not match the fingerprint stored for its key id refuses to start, and
on MySQL (where several servers share a database) the key must be given explicitly.
"""

from __future__ import annotations

import logging

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from server.config import Config
from server.crypto import Box, DecryptError, key_id_of, load_or_create_key
from server.store.models import now
from server.store.tables import jobs, key_fingerprints

logger = logging.getLogger(__name__)
MAKE_KEY = "python3 -c 'import os; print(os.urandom(32).hex())'"


class KeyProblem(Exception):
    """The server's keys cannot safely be used with this database; the message says what to do."""


def box_for(config: Config) -> Box:
    """The ``Box`` of this configuration: the current key plus ``UVM_OLD_KEYS`` for decryption."""
    if config.key is None and config.database_url.startswith("mysql"):
        raise KeyProblem(
            "UVM_KEY is not set. On MySQL every server process shares one database, and a key generated "
            "into each server's own data folder would make rows that the other servers cannot decrypt. "
            f"Make one key ({MAKE_KEY}), keep it safe with the database backups, and give the same "
            "UVM_KEY to every server."
        )
    key = config.key or load_or_create_key(config.data_dir / "secret.key")
    return Box({config.key_id: key, **dict(config.old_keys)}, config.key_id)


async def check_keys(engine: AsyncEngine, box: Box, record: bool = True) -> list[str]:
    """Record unseen key ids (unless ``record`` is false), refuse a key that differs from the stored
    one; returns old key ids that ``rotate-key`` found unused (the caller says they can go)."""
    try:
        return await _check_keys(engine, box, record)
    except IntegrityError:  # another server recorded the same key id first: compare with its key
        return await _check_keys(engine, box, record)


async def _check_keys(engine: AsyncEngine, box: Box, record: bool) -> list[str]:
    async with engine.begin() as conn:
        stored = {r.key_id: r for r in (await conn.execute(sa.select(key_fingerprints))).all()}
        for kid, fp in box.fingerprints.items():
            row = stored.get(kid)
            if row is not None and row.fingerprint != fp:
                raise KeyProblem(
                    f"the key given for key id {kid!r} is not the key this database has used under that id "
                    f"(stored fingerprint {row.fingerprint[:12]}..., this key's {fp[:12]}...). Every server on "
                    f"one database needs the same UVM_KEY{'' if kid == box.current else ' and UVM_OLD_KEYS'}; "
                    "a new key needs a new UVM_KEY_ID (then run `uvm-compute rotate-key`)."
                )
            if row is None:
                await _check_existing_rows(conn, box, kid)
            if row is None and record:
                await conn.execute(key_fingerprints.insert().values(key_id=kid, fingerprint=fp, first_seen=now()))
    retired = [kid for kid, r in stored.items() if r.retired_at is not None and kid in box.fingerprints]
    return [kid for kid in retired if kid != box.current]


async def _check_existing_rows(conn: AsyncConnection, box: Box, kid: str) -> None:
    """A database from before fingerprints: the newest job sealed under ``kid`` must open with our key."""
    rows = (await conn.execute(sa.select(jobs.c.id, jobs.c.code_ct).order_by(jobs.c.id.desc()).limit(50))).all()
    for row in rows:
        if row.code_ct and key_id_of(row.code_ct) == kid:
            try:
                box.open(row.code_ct, f"job:{row.id}:code")
            except DecryptError:
                raise KeyProblem(
                    f"the key given for key id {kid!r} does not decrypt job {row.id}, written under that id: "
                    "this is not the key this database was written with"
                ) from None
            return


async def retire(engine: AsyncEngine, key_ids: list[str]) -> None:
    """Mark key ids as no longer used by any row (``rotate-key`` checked)."""
    if key_ids:
        async with engine.begin() as conn:
            await conn.execute(
                key_fingerprints.update()
                .where(key_fingerprints.c.key_id.in_(key_ids), key_fingerprints.c.retired_at.is_(None))
                .values(retired_at=now())
            )
