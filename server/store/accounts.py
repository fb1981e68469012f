"""Researchers, their sessions, and volunteers: the accounts half of the storage layer."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.mysql import insert as mysql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from server.store.models import LIMIT_FIELDS, Conflict, Limits, NotFound, Researcher, inserted_id
from server.store.models import now as _now
from server.store.tables import jobs, reputation, researchers, sessions, volunteers


class Accounts:
    """Mixed into ``Storage``; uses its ``engine`` and ``_retry``."""

    engine: AsyncEngine
    _retry: Callable[..., Awaitable[Any]]  # Storage._retry

    async def add_researcher(self, email: str, password_hash: str, token_hash: str, operator: bool = False) -> int:
        try:
            async with self.engine.begin() as conn:
                result = await conn.execute(
                    researchers.insert().values(
                        email=email,
                        password_hash=password_hash,
                        token_hash=token_hash,
                        approved=True,
                        operator=operator,
                        created_at=_now(),
                    )
                )
                return inserted_id(result)
        except IntegrityError:
            raise Conflict(f"a researcher with email {email} exists") from None

    async def researcher_by_token(self, token_hash: str) -> Researcher | None:
        return await self._researcher(researchers.c.token_hash == token_hash)

    async def researcher_by_email(self, email: str) -> tuple[Researcher, str] | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(sa.select(researchers).where(researchers.c.email == email))).first()
        if row is None:
            return None
        return _as_researcher(row), row.password_hash

    async def researcher_by_session(self, id_hash: str) -> Researcher | None:
        query = (
            sa.select(researchers)
            .join(sessions, sessions.c.researcher_id == researchers.c.id)
            .where(sessions.c.id_hash == id_hash, sessions.c.expires_at > _now())
        )
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).first()
        return None if row is None else _as_researcher(row)

    async def _researcher(self, where: Any) -> Researcher | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(sa.select(researchers).where(where))).first()
        return None if row is None else _as_researcher(row)

    async def add_session(self, id_hash: str, researcher_id: int, ttl: float) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                sessions.insert().values(id_hash=id_hash, researcher_id=researcher_id, expires_at=_now() + ttl)
            )

    async def drop_session(self, id_hash: str) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(sessions.delete().where(sessions.c.id_hash == id_hash))

    async def drop_sessions(self, researcher_id: int) -> None:
        """Sign a researcher out everywhere (revoked)."""
        async with self.engine.begin() as conn:
            await conn.execute(sessions.delete().where(sessions.c.researcher_id == researcher_id))

    async def unfinished_jobs(self, researcher_id: int) -> list[int]:
        """Ids of a researcher's jobs still queued or running."""
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                sa.select(jobs.c.id).where(
                    jobs.c.researcher_id == researcher_id, jobs.c.state.in_(["queued", "running"])
                )
            )
            return [r.id for r in rows]

    async def set_approved(self, researcher_id: int, approved: bool) -> None:
        async with self.engine.begin() as conn:
            result = await conn.execute(
                researchers.update().where(researchers.c.id == researcher_id).values(approved=approved)
            )
        if result.rowcount == 0:
            raise NotFound(f"no researcher {researcher_id}")

    async def limits(self, researcher_id: int) -> Limits:
        """A researcher's share and quotas as set by an operator (None: the server default)."""
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    sa.select(*(researchers.c[f] for f in LIMIT_FIELDS)).where(researchers.c.id == researcher_id)
                )
            ).first()
        if row is None:
            raise NotFound(f"no researcher {researcher_id}")
        return Limits(*row)

    async def set_limits(self, researcher_id: int, values: dict[str, Any]) -> Limits:
        """Change some of a researcher's limits (None: back to the default); values already checked."""
        if values:
            async with self.engine.begin() as conn:
                result = await conn.execute(
                    researchers.update().where(researchers.c.id == researcher_id).values(**values)
                )
            if result.rowcount == 0:
                raise NotFound(f"no researcher {researcher_id}")
        return await self.limits(researcher_id)

    async def shares(self) -> dict[int, float]:
        """Every share an operator set: what the ready queue is given after a rebuild."""
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                sa.select(researchers.c.id, researchers.c.share).where(researchers.c.share.is_not(None))
            )
            return {r.id: r.share for r in rows}

    async def usage(self, researcher_id: int) -> tuple[int, int]:
        """(tasks not yet finished over the researcher's unfinished jobs, result bytes stored)."""
        unfinished = jobs.c.state.in_(["queued", "running"])
        left = jobs.c.n_tasks - jobs.c.n_done - jobs.c.n_failed
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    sa.select(
                        sa.func.coalesce(sa.func.sum(sa.case((unfinished, left), else_=0)), 0),
                        sa.func.coalesce(sa.func.sum(jobs.c.result_bytes), 0),
                    ).where(jobs.c.researcher_id == researcher_id)
                )
            ).one()
        return int(row[0]), int(row[1])

    async def list_researchers(self) -> list[dict]:
        async with self.engine.connect() as conn:
            rows = (await conn.execute(sa.select(researchers).order_by(researchers.c.id))).all()
        return [
            {"id": r.id, "email": r.email, "approved": r.approved, "operator": r.operator, "created_at": r.created_at}
            for r in rows
        ]

    async def volunteers_seen(self, seen: dict[str, dict]) -> None:
        """Insert or update volunteers who said hello, many in one statement (a burst of connections);
        one upsert, not a read-then-insert (that deadlocks on MySQL). An existing row keeps its throttle."""
        await self._upsert_volunteers(seen, None)

    async def volunteer_throttle(self, volunteer: str, capabilities: dict, state: dict) -> None:
        """Record a volunteer's throttle state. An upsert too: its hello's row may still be on its way
        (written in the background), and an UPDATE that finds no row would lose the state."""
        await self._upsert_volunteers({volunteer: capabilities}, state)

    async def _upsert_volunteers(self, seen: dict[str, dict], throttle: dict | None) -> None:
        if not seen:
            return
        now = _now()
        rows = [
            {
                "id": volunteer,
                "first_seen": now,
                "last_seen": now,
                "capabilities": json.dumps(capabilities)[:4000],
                "throttle": json.dumps(throttle or {})[:4000],
                "tasks_done": 0,
                "task_seconds": 0.0,
            }
            for volunteer, capabilities in seen.items()
        ]
        stmt: Any
        if self.engine.dialect.name in ("mysql", "mariadb"):
            stmt = mysql_insert(volunteers).values(rows)
            update = {"last_seen": stmt.inserted.last_seen, "capabilities": stmt.inserted.capabilities}
            if throttle is not None:
                update["throttle"] = stmt.inserted.throttle
            stmt = stmt.on_duplicate_key_update(**update)
        else:
            stmt = sqlite_insert(volunteers).values(rows)
            update = {"last_seen": stmt.excluded.last_seen, "capabilities": stmt.excluded.capabilities}
            if throttle is not None:
                update["throttle"] = stmt.excluded.throttle
            stmt = stmt.on_conflict_do_update(index_elements=["id"], set_=update)
        await self._retry(lambda conn: conn.execute(stmt))

    async def reputation_of(self, volunteer: str, trust_after: int) -> dict:
        """What the validator holds of a volunteer: validated streak, totals, trusted or not."""
        async with self.engine.connect() as conn:
            row = (await conn.execute(sa.select(reputation).where(reputation.c.volunteer == volunteer))).first()
        consecutive, validated, invalid, last = row[1:] if row is not None else (0, 0, 0, None)
        return {
            "consecutive_validated": consecutive,
            "validated": validated,
            "invalid": invalid,
            "last_invalid_at": last,
            "trusted": consecutive >= trust_after,
        }

    async def volunteer_stats(self, volunteer: str) -> dict:
        async with self.engine.connect() as conn:
            row = (await conn.execute(sa.select(volunteers).where(volunteers.c.id == volunteer))).first()
        if row is None:
            raise NotFound(f"no volunteer {volunteer}")
        return {
            "id": row.id,
            "tasks_done": row.tasks_done,
            "task_seconds": row.task_seconds,
            "throttle": json.loads(row.throttle),
            "first_seen": row.first_seen,
            "last_seen": row.last_seen,
        }


def _as_researcher(row: Any) -> Researcher:
    return Researcher(row.id, row.email, row.approved, row.operator, row.max_requests_per_second)
