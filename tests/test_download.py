"""Results download: the page query walks the (job_id, idx) index, checked with EXPLAIN on MariaDB
(and the query that fills the ready queue its (job_id, state, idx) index); a download streams in
input order across pages; and every format writes the bytes a parse-and-dump of each value would,
though the stored JSON is spliced in as text. Speed is measured by ``bench/download.py``."""

from __future__ import annotations

import csv
import io
import json

import pytest
import sqlalchemy as sa

from server.store import download
from server.store.engine import database_url
from server.store.storage import PAGE, finished_query, page_query, queued_page_query
from server.web import appkeys as K
from server.web.export import csv_cell

CODE = "def main(x):\n    return x\n"


@pytest.mark.parametrize("backend", ["mariadb"])
async def test_page_query_uses_the_job_idx_index(serve, backend):
    api, app = await serve()
    # One job that is the whole table, read from its middle: MariaDB then prefers `ref` on job_id
    # alone (every row of the job from its first, idx filtered after) unless told to walk the range.
    n = 4000
    job = await api.submit(CODE, list(range(n)))
    engine = app[K.storage].engine
    queries = {
        "uq_tasks_job_idx": page_query(job, n // 2, PAGE),
        "uq_tasks_job_idx ": page_query(job, n // 2, PAGE, only_errors=True),
        "ix_tasks_job_state_idx": queued_page_query(job, n // 2, 5000),  # filling the ready queue
        "uq_tasks_job_idx  ": finished_query(job, n // 2, 100_000),  # a client's incremental fetch
    }
    async with engine.connect() as conn:
        await conn.execute(sa.text("ANALYZE TABLE tasks"))
    for index, query in queries.items():
        sql = str(query.compile(dialect=engine.dialect, compile_kwargs={"literal_binds": True}))
        async with engine.connect() as conn:
            plan = (await conn.execute(sa.text("EXPLAIN " + sql))).mappings().one()
        # a range on (job_id, idx): neither every row of the job read and filtered, nor a sort
        assert plan["key"] == index.strip(), plan
        assert plan["type"] == "range", plan
        assert "filesort" not in (plan["Extra"] or ""), plan
        assert int(plan["rows"]) <= n // 2 + 100, plan  # the rows past the middle, not the job's n


async def test_download_streams_every_page_in_order(serve, volunteers, backend, monkeypatch):
    monkeypatch.setattr(download, "PAGE", 100)  # four pages of 100, 100, 100, 7
    api, _app = await serve()
    n = 307
    job = await api.submit("def main(x):\n    return x * x + 1\n", {"range": [0, n]})
    volunteers(api.url, 4)
    assert (await api.wait(job, timeout=120))["state"] == "done"
    lines = (await api.results(job, "ndjson")).split("\n")[:-1]
    assert [json.loads(line)["result"] for line in lines] == [x * x + 1 for x in range(n)]
    assert [json.loads(line)["input"] for line in lines] == list(range(n))
    # a window across two page boundaries, and one that runs past the end
    for start, limit, indices in ((80, 150, range(80, 230)), (300, 50, range(300, n))):
        url = f"{api.url}/api/jobs/{job}/results?format=json&start={start}&limit={limit}"
        async with api.session.get(url, headers=api.headers()) as resp:
            rows = await resp.json()
        assert [r["index"] for r in rows] == list(indices)
        assert [r["result"] for r in rows] == [x * x + 1 for x in indices]


# Values whose JSON differs between ensure_ascii on (how they are stored) and off (how they are
# exported), or that need escapes: the download splices stored text, so these are the hard cases.
AWKWARD = [
    "café",
    "line\u2028sep",
    "tab\tnew\nline",
    'quote" back\\slash',
    "\x01\x7f",
    "😀",
    {"k": [1, 2.5, None, True, "é"], "": {}},
    -0.0,
    1e300,
    12345678901234567890,
    "",
    [],
    "=1+1",
    "fail",
]
ECHO = "def main(x):\n    print('got', x)\n    if x == 'fail':\n        raise ValueError('bad é')\n    return x\n"


def _dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


async def test_every_format_writes_what_parse_and_dump_would(serve, volunteers, backend):
    api, _app = await serve()
    job = await api.submit(ECHO, AWKWARD, max_attempts=1)
    volunteers(api.url, 2)
    assert (await api.wait(job, timeout=60))["state"] == "failed"  # the one "fail" input
    failed = AWKWARD.index("fail")

    json_rows = json.loads(await api.results(job, "json"))
    ndjson = (await api.results(job, "ndjson")).split("\n")[:-1]  # not splitlines(): U+2028 is in a line
    assert [json.loads(line) for line in ndjson] == json_rows
    for i, (line, row) in enumerate(zip(ndjson, json_rows, strict=True)):
        assert line == _dumps(row)  # no \u escapes for what needs none, no spaces
        assert list(row) == ["index", "input", "state", "result", "error", "output", "accepted", "replicas", "partials"]
        assert row["index"] == i and row["input"] == AWKWARD[i]
        if i == failed:
            assert row["state"] == "failed" and row["result"] is None and "ValueError: bad é" in row["error"]
        else:
            assert row["state"] == "done" and row["result"] == AWKWARD[i] and row["error"] is None
            assert row["output"] == f"got {AWKWARD[i]}\n" and row["partials"] == []
    text = await api.results(job, "json")
    assert text == "[\n" + ",\n".join(ndjson) + "\n]\n"

    txt = (await api.results(job, "txt")).split("\n")
    assert txt[-1] == "" and len(txt) == len(AWKWARD) + 1
    for i, value in enumerate(AWKWARD):
        if i == failed:
            assert txt[i] == "ERROR: ValueError: bad é"
        else:
            expected = value if isinstance(value, str) else _dumps(value)
            assert txt[i] == expected.replace("\n", "\\n")

    table = list(csv.reader(io.StringIO(await api.results(job, "csv"), newline="")))
    assert table[0] == ["index", "input", "state", "result", "error", "accepted", "replicas"]
    for i, (cells, row) in enumerate(zip(table[1:], json_rows, strict=True)):
        result = "" if i == failed else csv_cell(_dumps(AWKWARD[i]))
        error = "ValueError: bad é" if i == failed else ""
        expected = [str(i), csv_cell(_dumps(AWKWARD[i])), row["state"], result, error, row["accepted"] or ""]
        assert cells == [*expected, str(row["replicas"])]


def test_both_mysql_driver_names_run_on_asyncmy():
    assert database_url("mysql+aiomysql://u:p@db:3306/uvm") == "mysql+asyncmy://u:p@db:3306/uvm"
    assert database_url("mysql+asyncmy://u:p@db:3306/uvm") == "mysql+asyncmy://u:p@db:3306/uvm"
    assert database_url("sqlite+aiosqlite:///x.db") == "sqlite+aiosqlite:///x.db"
