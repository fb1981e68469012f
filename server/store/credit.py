"""Volunteers' credit: validated results and their CPU time, opt-in nicknames, the public leaderboard.

A result counts as validated when the validator accepted it with a quorum of distinct volunteers
("valid") or from a trusted volunteer ("trusted"). Only those earn credit: the CPU seconds the
validator granted (``attempts.credit``: the least any member of the quorum claimed). A result
waiting for its replica ("pending"), a minority result ("invalid"), an error, and a result that
stood alone under replication 1 ("single", which nobody checked) earn none; a trusted volunteer
caught lying loses the credit of the lone results that go back to be re-checked. A volunteer with
no nickname is never listed.
"""

from __future__ import annotations

import re
import time
import unicodedata
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from server.store.models import Conflict, NotFound
from server.store.tables import attempts, volunteers

VALIDATED = ("valid", "trusted")  # attempt verdicts that count as validated results
MAX_NICKNAME = 32
NICKNAME = re.compile(r"^[\w][\w .\-]{0,31}$")  # letters/digits (any script), then also space . -
LEADERBOARD_SIZE = 50
LEADERBOARD_TTL = 10.0  # seconds the leaderboard is kept per process (its query scans attempts)


class InvalidNickname(ValueError):
    """A nickname that cannot be shown publicly; the message says why."""


def clean_nickname(value: Any) -> str | None:
    """A nickname as stored: None (not listed) for null or "", else 1-32 letters, digits, spaces,
    dots, dashes or underscores, NFC-normalised, with no leading or trailing space."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidNickname("'nickname' must be a string or null")
    text = unicodedata.normalize("NFC", value).strip()
    if not text:
        return None
    if len(text) > MAX_NICKNAME:
        raise InvalidNickname(f"'nickname' must be at most {MAX_NICKNAME} characters")
    if not NICKNAME.match(text):
        raise InvalidNickname("'nickname' may hold letters, digits, spaces, '.', '-' and '_' only")
    return text


class Credit:
    """Mixed into ``Storage``: the credit each volunteer earned and the public leaderboard."""

    engine: AsyncEngine
    _board: tuple[float, list[dict]] | None = None

    async def volunteer_credit(self, volunteer: str) -> dict:
        """Validated results and their CPU seconds, and the nickname (None: not listed)."""
        async with self.engine.connect() as conn:
            nickname = (
                await conn.execute(sa.select(volunteers.c.nickname).where(volunteers.c.id == volunteer))
            ).first()
            if nickname is None:
                raise NotFound(f"no volunteer {volunteer}")
            row = (
                await conn.execute(
                    sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(attempts.c.credit), 0.0)).where(
                        attempts.c.volunteer == volunteer, attempts.c.verdict.in_(VALIDATED)
                    )
                )
            ).one()  # an aggregate: always one row
        return {"nickname": nickname[0], "validated": int(row[0]), "validated_seconds": round(float(row[1]), 3)}

    async def set_nickname(self, volunteer: str, nickname: str | None) -> str | None:
        """Set (or with None clear) a volunteer's public nickname; ``Conflict`` if another has it."""
        try:
            async with self.engine.begin() as conn:
                result = await conn.execute(
                    volunteers.update().where(volunteers.c.id == volunteer).values(nickname=nickname)
                )
        except IntegrityError:
            raise Conflict(f"the nickname {nickname!r} is taken; choose another") from None
        if not result.rowcount:
            raise NotFound(f"no volunteer {volunteer}")
        self._board = None
        return nickname

    async def leaderboard(self) -> list[dict]:
        """The top volunteers with a nickname, by the CPU time of their validated results."""
        now = time.monotonic()
        if self._board is not None and now - self._board[0] < LEADERBOARD_TTL:
            return self._board[1]
        credited = sa.func.coalesce(sa.func.sum(attempts.c.credit), 0.0).label("credited")
        query = (
            sa.select(volunteers.c.nickname, credited, sa.func.count().label("validated"))
            .join(attempts, attempts.c.volunteer == volunteers.c.id)
            .where(volunteers.c.nickname.is_not(None), attempts.c.verdict.in_(VALIDATED))
            .group_by(volunteers.c.id, volunteers.c.nickname)
            .order_by(credited.desc(), volunteers.c.nickname)
            .limit(LEADERBOARD_SIZE)
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        board = [
            {
                "rank": rank,
                "nickname": r.nickname,
                "validated_seconds": round(float(r.credited), 3),
                "validated": r.validated,
            }
            for rank, r in enumerate(rows, start=1)
        ]
        self._board = (now, board)
        return board
