"""A results download: a job's tasks in input order, page by page, with JSON values left as JSON text.

The export (``server.web.export``) splices each stored JSON text into its line as it is, so a row
costs one decryption per stored value and no ``json.loads``/``json.dumps`` round trip: this is what
lets a download pass 100,000 rows/s (``bench/download.py``). The texts are the ones the server sealed
(``json.dumps`` with compact separators), so the bytes are those a parse-and-dump would give, but for
``\\uXXXX`` escapes, which are re-encoded as the characters (``ensure_ascii=False``, as before).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import TYPE_CHECKING, NamedTuple

from server.store import live
from server.store.models import NotFound
from server.store.storage import page_query
from server.store.tables import tasks

if TYPE_CHECKING:
    from server.store.storage import Storage

PAGE = 5000  # rows per page of a download: one query, one chunk of the export
NONE: tuple[str, ...] = ()  # the partials of a task that has none (shared: no object per row)


class ResultRow(NamedTuple):
    """One task of a download. ``input``, ``result`` and each of ``partials`` are JSON text."""

    idx: int  # the task's index in the job (its input's position)
    input: str
    state: str
    result: str | None  # None: no result stored (the export writes null)
    error: str | None  # None: no error, or an empty one
    output: str
    accepted: str | None
    replicas: int
    partials: Sequence[str]


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """No cyclic garbage collection while a page is decrypted (synchronous: nothing else runs).
    Its ~15,000 new objects would otherwise trigger a collection every 700 and be scanned again
    and again as they age: a third of a download's CPU, measured by ``bench/download.py``."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def json_text(plain: bytes) -> str:
    """Stored JSON as the export writes it: non-ASCII characters as themselves, not as escapes."""
    text = plain.decode()
    return text if "\\u" not in text else json.dumps(json.loads(text), separators=(",", ":"), ensure_ascii=False)


async def _partial_texts(storage: Storage, job_id: int, first: int, last: int) -> dict[int, list[str]]:
    """The partial results of the job's tasks ``first``..``last`` (one page), by task index."""
    out: dict[int, list[str]] = {}
    for r in await live.partial_rows(storage, job_id, tasks.c.idx.between(first, last)):
        out.setdefault(r.idx, []).append(json_text(storage.box.open(r.value_ct, f"partial:{r.task_id}:{r.seq}")))
    return out


async def result_pages(
    storage: Storage, job_id: int, start: int = 0, limit: int | None = None, page: int | None = None
) -> AsyncIterator[list[ResultRow]]:
    """The tasks of a job from index ``start`` in input order (at most ``limit``), decrypted, one page
    of ``page`` (default ``PAGE``) rows at a time, the next page read while this one is rendered: memory
    stays that of two pages whatever the job's size."""
    page = page or PAGE
    info = await storage.job_info(job_id)
    window = await storage.window_of(job_id)
    if info is None or window is None:
        raise NotFound(f"no job {job_id}")
    # a range job's inputs are not stored; a job of no inputs has the one input None
    first, step = (info.range_start, info.range_step) if info.inputs_kind == "range" else (None, 0)
    open_, new_row = storage.box.opener(), tuple.__new__  # (the hot loop below: ~1 µs a row saved each)

    async def fetch(after: int, n: int) -> list:
        async with storage.engine.connect() as conn:
            return list((await conn.execute(page_query(job_id, after, n))).all())

    # The next page's query runs (in the database, on another core) while this page is decrypted
    # and rendered: two pages in memory at most, and the database's time hidden behind ours.
    left = limit
    pending: asyncio.Future | None = asyncio.ensure_future(fetch(start - 1, page if left is None else min(page, left)))
    try:
        while pending is not None:
            rows = await pending
            pending = None
            if not rows:
                if first is not None:  # a range job's indices that hand-out has not reached: no rows yet
                    async for out in _unmaterialised(window, first, step, start, left, page):
                        yield out
                return
            start = rows[-1].idx + 1
            if left is not None:
                left -= len(rows)
            if left is None or left > 0:
                pending = asyncio.ensure_future(fetch(start - 1, page if left is None else min(page, left)))
            parts = await _partial_texts(storage, job_id, rows[0].idx, rows[-1].idx)
            with _collector_paused():
                out = []
                # one decryption per stored value, no call for a NULL column
                for tid, idx, state, _attempts, input_ct, result_ct, output_ct, error_ct, replicas, accepted in rows:
                    if input_ct is not None:
                        input_text = json_text(open_(input_ct, b"job:%d:input:%d" % (job_id, idx)))
                    else:
                        input_text = "null" if first is None else str(first + idx * step)
                    result = json_text(open_(result_ct, b"task:%d:result" % tid)) if result_ct is not None else None
                    error = (open_(error_ct, b"task:%d:error" % tid).decode() or None) if error_ct is not None else None
                    output = open_(output_ct, b"task:%d:output" % tid).decode() if output_ct is not None else ""
                    fields = (idx, input_text, state, result, error, output, accepted, replicas, parts.get(idx, NONE))
                    out.append(new_row(ResultRow, fields))
            yield out
    finally:
        if pending is not None:  # the reader went away (a closed download): no query left running
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pending


async def _unmaterialised(
    window: tuple[str, int, int], first: int, step: int, start: int, limit: int | None, page: int
) -> AsyncIterator[list[ResultRow]]:
    """Rows for a range job's indices from ``start`` that have no task row yet (server/jobs/feeder.py):
    "open" with their input (or "cancelled", once the job was), so a download lists every index."""
    job_state, _materialised, n_tasks = window
    state = "cancelled" if job_state == "cancelled" else "open"
    stop = n_tasks if limit is None else min(n_tasks, start + limit)
    for lo in range(start, stop, page):
        yield [
            ResultRow(idx, str(first + idx * step), state, None, None, "", None, 0, NONE)
            for idx in range(lo, min(stop, lo + page))
        ]
