"""Key rotation: re-encrypt every stored ciphertext under the current key, in batches, while servers run.

Each value is rewritten with a compare-and-swap (``UPDATE ... WHERE id = ? AND col = <old value>``), so
a value a running server changed meanwhile is never overwritten with stale plaintext. Rows already
under the current key are skipped by the query itself, so an interrupted run simply starts again and
goes on where it stopped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from server.crypto import Box, key_id_of
from server.store.tables import attempts, jobs, tasks


@dataclasses.dataclass(frozen=True)
class Sealed:
    """A table whose columns hold ciphertext, and the associated data of each column's value."""

    table: sa.Table
    columns: tuple[str, ...]
    extra: tuple[str, ...]  # other columns the associated data needs
    aad: Callable[[Any, str], str]  # (row, column) -> associated data
    before_first: Any = 0  # a value below every id (ids are integers, or strings for attempts)


# Every ciphertext column of the schema. A new encrypted column must be listed here, or rotate-key
# would leave it under the old key (tests/test_keys.py checks every row afterwards).
SEALED = (
    Sealed(jobs, ("code_ct",), (), lambda r, c: f"job:{r.id}:code"),
    Sealed(
        tasks,
        ("input_ct", "result_ct", "output_ct", "error_ct"),
        ("job_id", "idx"),
        lambda r, c: f"job:{r.job_id}:input:{r.idx}" if c == "input_ct" else f"task:{r.id}:{c[:-3]}",
    ),
    # What each replica reported, kept until its task is decided (server/jobs/validator.py).
    Sealed(attempts, ("reported_ct",), (), lambda r, c: f"attempt:{r.id}:reported", before_first=""),
)


@dataclasses.dataclass
class Report:
    rewritten: int = 0  # values re-encrypted under the current key
    raced: int = 0  # values a server changed while we worked (written under its own key)
    stopped_early: bool = False  # --max-rows reached: run again to continue
    remaining: dict[str, int] = dataclasses.field(default_factory=dict)  # key id -> values still under it


def _stale(spec: Sealed, prefix: bytes) -> sa.ColumnElement[bool]:
    """Rows with at least one value not under the current key (NULL and empty values are not values)."""
    conds = []
    for name in spec.columns:
        col = spec.table.c[name]
        conds.append(sa.and_(sa.func.length(col) > 0, sa.func.substr(col, 1, len(prefix)) != prefix))
    return sa.or_(*conds)


async def pending(engine: AsyncEngine, box: Box) -> int:
    """How many rows hold a value not under the current key."""
    total = 0
    async with engine.connect() as conn:
        for spec in SEALED:
            query = sa.select(sa.func.count()).select_from(spec.table).where(_stale(spec, box.prefix))
            total += int((await conn.execute(query)).scalar() or 0)
    return total


async def rotate(
    engine: AsyncEngine,
    box: Box,
    batch: int = 500,
    max_rows: int | None = None,
    progress: Callable[[int], None] = lambda n: None,
) -> Report:
    """Re-encrypt every value under ``box``'s current key; ``progress(n)`` after each batch of n rows."""
    report = Report()
    done_rows = 0
    for spec in SEALED:
        last = spec.before_first
        while max_rows is None or done_rows < max_rows:
            size = batch if max_rows is None else min(batch, max_rows - done_rows)
            cols = [spec.table.c.id, *(spec.table.c[c] for c in spec.extra + spec.columns)]
            query = (
                sa.select(*cols)
                .where(spec.table.c.id > last, _stale(spec, box.prefix))
                .order_by(spec.table.c.id)
                .limit(size)
            )
            async with engine.begin() as conn:
                rows = (await conn.execute(query)).all()
                await _rewrite(conn, spec, rows, box, report)
            if not rows:
                break
            last = rows[-1].id
            done_rows += len(rows)
            progress(len(rows))
        else:
            report.stopped_early = True
            break
    report.remaining = await usage(engine, box)
    return report


async def _rewrite(conn: Any, spec: Sealed, rows: Sequence[Any], box: Box, report: Report) -> None:
    """One compare-and-swap UPDATE per value, sent as one executemany per column."""
    table = spec.table
    for name in spec.columns:
        params = [
            {"id_": row.id, "old": old, "new": box.seal_again(old, spec.aad(row, name))}
            for row in rows
            if (old := getattr(row, name)) and key_id_of(old) != box.current
        ]
        if not params:
            continue
        result = await conn.execute(
            table.update()
            .where(table.c.id == sa.bindparam("id_"), table.c[name] == sa.bindparam("old"))
            .values({name: sa.bindparam("new")}),
            params,
        )
        changed = max(result.rowcount, 0)
        report.rewritten += changed
        report.raced += len(params) - changed


async def usage(engine: AsyncEngine, box: Box) -> dict[str, int]:
    """Values still sealed under each key id other than the current one (0 for those unused)."""
    counts: dict[str, int] = {kid: 0 for kid in box.fingerprints if kid != box.current}
    async with engine.connect() as conn:
        for spec in SEALED:
            for name in spec.columns:
                col = spec.table.c[name]
                query = (
                    sa.select(sa.func.count())
                    .select_from(spec.table)
                    .where(sa.func.length(col) > 0, sa.func.substr(col, 1, len(box.prefix)) != box.prefix)
                )
                if int((await conn.execute(query)).scalar() or 0) == 0:
                    continue
                for kid in counts:
                    prefix = kid.encode() + b"\x00"
                    q = sa.select(sa.func.count()).where(sa.func.substr(col, 1, len(prefix)) == prefix)
                    counts[kid] += int((await conn.execute(q.select_from(spec.table))).scalar() or 0)
    return counts
