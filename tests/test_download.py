"""Results download: the page query walks the (job_id, idx) index, checked with EXPLAIN on MariaDB
(and the query that fills the ready queue its (job_id, state, idx) index),
and a download streams in input order across pages. Speed is measured by ``bench/download.py``."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa

from server.store.storage import PAGE, page_query, queued_page_query
from server.web import appkeys as K

CODE = "def main(x):\n    return x\n"


@pytest.mark.parametrize("backend", ["mariadb"])
async def test_page_query_uses_the_job_idx_index(serve, backend):
    api, app = await serve()
    first = await api.submit(CODE, {"range": [0, 3000]})
    job = await api.submit(CODE, {"range": [0, 3000]})
    engine = app[K.storage].engine
    queries = {
        "uq_tasks_job_idx": page_query(job, 2500, PAGE),
        "uq_tasks_job_idx ": page_query(job, 2500, PAGE, only_errors=True),
        "ix_tasks_job_state_idx": queued_page_query(job, 2500, 5000),  # filling the ready queue
    }
    for index, query in queries.items():
        sql = str(query.compile(dialect=engine.dialect, compile_kwargs={"literal_binds": True}))
        async with engine.connect() as conn:
            await conn.execute(sa.text("ANALYZE TABLE tasks"))
            plan = (await conn.execute(sa.text("EXPLAIN " + sql))).mappings().one()
        # a range on (job_id, idx): neither every row of the job read and filtered, nor a sort
        assert plan["key"] == index.strip(), plan
        assert plan["type"] == "range", plan
        assert "filesort" not in (plan["Extra"] or ""), plan
        assert int(plan["rows"]) < 1000, plan  # the 500 rows past idx 2500, not the job's 3000
    assert first != job


async def test_download_streams_every_page_in_order(serve, volunteers, backend):
    api, _app = await serve()
    n = PAGE + 7  # two pages
    job = await api.submit("def main(x):\n    return x * x + 1\n", {"range": [0, n]})
    volunteers(api.url, 4)
    assert (await api.wait(job, timeout=120))["state"] == "done"
    lines = (await api.results(job, "ndjson")).splitlines()
    assert [json.loads(line)["result"] for line in lines] == [x * x + 1 for x in range(n)]
