"""The researchers' dashboard: main-thread Python of ``/dashboard`` (PyScript on Pyodide).

Views are chosen by the URL's hash (``#/jobs``, ``#/new``, ``#/job/12``, ``#/admin``); each is a
``<section>`` of ``public/dashboard.html`` filled from the JSON API with ``views``.
The session is the ``uvm_session`` cookie (HttpOnly: this code never sees it). Live job status
comes over the events websocket. **Try** runs ``main`` on the first input in a Pyodide web
worker of this browser -- the volunteers' own ``public/worker.js`` and ``workers/runner.py``.
Every failure ends as a message on the page, never only in the console.
"""

from __future__ import annotations

import asyncio
import json
import time

import js
from pyodide.ffi import create_proxy
from pyscript import document, window

from . import inputs, verify, verify_ui, views
from .io import ApiError, TryWorker, api, ndjson_rows

EXAMPLE = '''"""A small working example: edit it, press Try, then Submit."""
import math


def main(x):
    # Called once per input; return anything JSON can hold.
    print("working on", x)
    return {"x": x, "square": x * x, "sqrt": round(math.sqrt(abs(x)), 6)}
'''
ADMIN_REFRESH = 3.0
RECONNECT = 2.0
OFFLINE = "Lost the connection to the server; trying again…"
SUMMARY_LIMIT = 200_000  # characters of pasted inputs summarised as they are typed
RESULTS_REFRESH = 2.0  # the results preview is fetched at most this often while a job runs
_proxies: list = []  # event handlers, kept alive for the page's lifetime


def _el(element_id: str):
    return document.getElementById(element_id)


def _on(element, name: str, handler) -> None:
    proxy = create_proxy(handler)
    _proxies.append(proxy)
    element.addEventListener(name, proxy)


def _absent(value: object) -> bool:
    """JS ``null`` arrives as ``JsNull`` in recent Pyodide, ``undefined`` as ``None``."""
    return value is None or type(value).__name__ in ("JsNull", "JsUndefined")


def _show(element_id: str, text: str | None) -> None:
    """Show ``text`` in a message element, or hide the element when ``text`` is empty."""
    el = _el(element_id)
    el.textContent = (text[:1].upper() + text[1:]) if text else ""
    el.hidden = not text


class Dashboard:
    def __init__(self, worker_url: str) -> None:
        self.me: dict | None = None
        self.view = "loading"
        self.jobs: dict[int, dict] = {}
        self.job_id: int | None = None
        self.job: dict | None = None
        self.editor = None
        self.mode = "json"
        self.chain_preset: tuple[str, int] | None = None
        self.events = None
        self.try_worker = TryWorker(worker_url)
        self.results_loaded_at = 0.0
        self.results_done: tuple[int, ...] = ()
        self.results_pending = False
        self.progress_seen: dict[tuple[int, int], tuple[float, float]] = {}  # (job, task) -> first (fraction, at)
        self.errors_failed = -1
        self.no_agreement = 0  # failed tasks whose volunteers never agreed (from the error groups)
        self.admin_task: asyncio.Task | None = None
        self.busy = False
        self.offline = False

    # ----------------------------------------------------------------------- plumbing
    def flash(self, message: str | None, ok: bool = False) -> None:
        """Show a message over the page: a problem (red), or with ``ok`` news of what was done (green)."""
        _show("flash", message)
        _el("flash").classList.toggle("ok", ok)

    def run(self, coroutine) -> None:
        """Run a handler's coroutine; any error it raises ends as a message on the page."""
        asyncio.ensure_future(self._guard(coroutine))

    async def _guard(self, coroutine) -> None:
        try:
            await coroutine
        except ApiError as exc:
            if exc.status == 401 and self.me is not None:
                self.signed_out("Your session has ended; please sign in again.")
            elif exc.status == 403 and "not approved" in str(exc) and self.me is not None:
                self.signed_out("This account is no longer approved; ask an operator.")
            else:
                self.flash(str(exc))
        except Exception as exc:  # noqa: BLE001 -- never a blank page or a console-only error
            self.flash(f"Something went wrong in the page: {type(exc).__name__}: {exc}")
            js.console.error(str(exc))

    def show(self, view: str) -> None:
        self.view = view
        document.body.dataset.view = view
        for section in document.querySelectorAll("section.view"):
            section.hidden = section.getAttribute("data-for") != view
        for link in document.querySelectorAll("[data-nav]"):
            link.classList.toggle("active", link.dataset.nav == view)
        _el("nav").hidden = self.me is None
        if view != "admin" and self.admin_task is not None:
            self.admin_task.cancel()
            self.admin_task = None

    # ------------------------------------------------------------------------- start
    async def start(self) -> None:
        self.bind()
        try:
            self.me = await api("GET", "/api/me")
        except ApiError as exc:
            self.me = None
            if exc.status == 403:
                _show("login-error", "This account is not approved yet; ask an operator.")
            elif exc.status != 401:
                self.flash(str(exc))
        _el("login-button").disabled = False
        document.body.dataset.ready = "1"
        if self.me is not None:
            self.signed_in()
        await self.route()

    def bind(self) -> None:
        _on(_el("login-form"), "submit", lambda e: self.run(self.login()))
        _on(document.body, "click", self.click)
        _on(window, "hashchange", lambda e: self.run(self.route()))
        for tab in document.querySelectorAll("#input-tabs [data-mode]"):
            _on(tab, "click", lambda e: self.set_mode(e.currentTarget.dataset.mode))
        for mode in ("json", "csv", "lines"):
            _on(_el(f"file-{mode}"), "change", lambda e, m=mode: self.run(self.load_file(m, e.target)))
        for element_id in ("inputs-json", "inputs-csv", "inputs-lines", "range-start", "range-stop", "range-step"):
            _on(_el(element_id), "input", lambda e: self.summarise_inputs())
        for element_id in ("chain-job", "chain-kind"):
            _on(_el(element_id), "change", lambda e: self.summarise_inputs())
        verify_ui.bind(_on)

    def click(self, event) -> None:
        target = event.target.closest("[data-action]") if hasattr(event.target, "closest") else None
        if _absent(target):
            return
        action = target.dataset.action
        handlers = {
            "logout": self.logout,
            "try": self.try_code,
            "submit": self.submit,
            "cancel": self.cancel,
            "retry": self.retry,
            "copy-volunteer-link": self.copy_volunteer_link,
            "chain-results": lambda: self.chain("results_of"),
            "chain-after": lambda: self.chain("after"),
            "approve": lambda: self.set_approved(target.dataset.id, True),
            "revoke": lambda: self.set_approved(target.dataset.id, False),
            "admin-cancel": self.cancel_any_job,
        }
        if action in handlers:
            event.preventDefault()
            self.run(handlers[action]())

    async def route(self) -> None:
        self.flash(None)
        if self.me is None:
            self.show("login")
            _el("login-email").focus()
            return
        parts = [p for p in str(window.location.hash).lstrip("#").split("/") if p]
        name = parts[0] if parts else "jobs"
        if name == "job" and len(parts) > 1 and parts[1].isdigit():
            await self.open_job(int(parts[1]))
        elif name == "new":
            await self.open_new()
        elif name == "admin" and self.me.get("operator"):
            self.open_admin()
        else:
            await self.open_jobs()

    # ------------------------------------------------------------------------ session
    async def login(self) -> None:
        email = str(_el("login-email").value).strip()
        password = str(_el("login-password").value)
        if not email or not password:
            _show("login-error", "Enter your email and password.")
            return
        button = _el("login-button")
        button.disabled = True
        try:
            self.me = await api("POST", "/api/login", {"email": email, "password": password})
        except ApiError as exc:
            _show("login-error", str(exc)[:1].upper() + str(exc)[1:] + ".")
            return
        finally:
            button.disabled = False
        _show("login-error", None)
        _el("login-password").value = ""
        self.signed_in()
        await self.route()

    def signed_in(self) -> None:
        _el("who").textContent = self.me["email"]
        _el("nav-admin").hidden = not self.me.get("operator")
        self.connect_events()

    async def logout(self) -> None:
        await api("POST", "/api/logout")
        self.signed_out(None)

    def signed_out(self, message: str | None) -> None:
        self.me = None
        self.jobs.clear()
        if self.events is not None:
            events, self.events = self.events, None
            events.onclose = None
            events.close()
        window.location.hash = "#/jobs"
        self.show("login")
        _show("login-error", message)

    # ------------------------------------------------------------------------- events
    def connect_events(self) -> None:
        if self.events is not None or self.me is None:
            return
        url = str(window.location.origin).replace("http", "ws", 1) + "/api/events"
        socket = js.WebSocket.new(url)
        socket.onmessage = create_proxy(self.on_event)
        socket.onclose = create_proxy(self.on_events_closed)
        self.events = socket

    def on_events_closed(self, _event) -> None:
        self.events = None
        if self.me is not None:
            asyncio.get_event_loop().call_later(RECONNECT, lambda: self.run(self.reconnect_events()))

    async def reconnect_events(self) -> None:
        """Reconnect if the session still holds (an ended session shows the sign-in form)."""
        if self.me is None or self.events is not None:
            return
        try:
            await api("GET", "/api/me")  # 401 -> signed out, with a message
        except ApiError as exc:
            if exc.status not in (0, 502, 503, 504):
                raise
            self.offline = True
            self.flash(OFFLINE)
            asyncio.get_event_loop().call_later(RECONNECT * 2, lambda: self.run(self.reconnect_events()))
            return
        if self.offline:
            self.offline = False
            self.flash(None)
        self.connect_events()

    def on_event(self, event) -> None:
        try:
            data = json.loads(str(event.data))
        except ValueError:
            return
        if data.get("type") != "job":
            return
        data.pop("type")
        self.jobs[data["id"]] = data
        if self.view == "jobs":
            self.render_jobs()
        elif self.view == "job" and data["id"] == self.job_id:
            self.run(self.update_job(data))

    # --------------------------------------------------------------------------- jobs
    async def open_jobs(self) -> None:
        self.show("jobs")
        listed = (await api("GET", "/api/jobs"))["jobs"]
        self.jobs = {job["id"]: {**self.jobs.get(job["id"], {}), **job} for job in listed}
        self.render_jobs()
        running = [job["id"] for job in listed if job["state"] == "running"][:20]
        for job_id in running:  # the list has no throughput; the status has
            self.jobs[job_id] = await api("GET", f"/api/jobs/{job_id}")
        if running:
            self.render_jobs()

    def render_jobs(self) -> None:
        ordered = sorted(self.jobs.values(), key=lambda j: -j["id"])
        _el("jobs-table").innerHTML = views.jobs_table(ordered)

    async def open_job(self, job_id: int) -> None:
        if self.job_id != job_id:
            self.job_id, self.job = job_id, None
            self.results_done, self.errors_failed, self.results_loaded_at = (), -1, 0.0
            self.no_agreement = 0
            _el("job-validation").innerHTML = ""
            _el("job-title").textContent = f"Job {job_id}"
            _el("job-state").textContent = "…"
            _el("job-state").className = "state"
            _el("job-stats").innerHTML = ""
            _el("job-results").innerHTML = '<p class="muted">No results yet.</p>'
            _el("job-errors-card").hidden = True
        self.show("job")
        try:
            job = await api("GET", f"/api/jobs/{job_id}")
        except ApiError as exc:
            if exc.status == 404:
                self.flash(f"There is no job {job_id} of yours.")
                _el("job-stats").innerHTML = ""
                return
            raise
        await self.update_job(job, force=True)

    async def update_job(self, job: dict, force: bool = False) -> None:
        self.jobs[job["id"]] = job
        if job["id"] != self.job_id:  # an answer that arrived after another job was opened
            return
        self.job = job
        _el("job-title").textContent = views.job_name(job)
        state = _el("job-state")
        text, css = views.state_label(job)
        state.textContent = text
        state.className = f"state state-{css}"
        done, failed = views.progress(job)
        _el("job-bar-done").style.width = f"{done * 100:.2f}%"
        _el("job-bar-failed").style.width = f"{failed * 100:.2f}%"
        task_etas = self._task_etas(job)
        hint = views.no_volunteer_hint(job, f"{window.location.origin}/")
        subtitle = f'<p class="muted subtitle">{views.job_subtitle(job)}</p>'
        _el("job-stats").innerHTML = subtitle + hint + views.job_stats(job, task_etas=task_etas)
        _el("job-running").innerHTML = views.running_tasks(job)
        _el("job-validation").innerHTML = verify.validation_html(job, self.no_agreement)
        terminal = job["state"] in views.TERMINAL
        _el("cancel-button").hidden = terminal
        _el("retry-button").hidden = job["counts"]["failed"] == 0
        _el("chain-results-button").hidden = job["state"] not in ("done", "failed")
        _el("chain-after-button").hidden = job["state"] == "cancelled"
        _el("downloads").innerHTML = views.downloads(job["id"])
        if job["counts"]["failed"] != self.errors_failed:
            self.errors_failed = job["counts"]["failed"]
            await self.load_errors(job["id"])
        now = time.monotonic()
        changed = verify.results_key(job) != self.results_done
        if changed and (force or terminal or now - self.results_loaded_at > RESULTS_REFRESH):
            self.results_done = verify.results_key(job)
            self.results_loaded_at = now
            await self.load_results(job)
        elif changed and not self.results_pending:
            # Throttled: look again when the interval is up, even if no further event comes.
            self.results_pending = True
            asyncio.get_event_loop().call_later(RESULTS_REFRESH, self._refresh_results, job["id"])

    def _task_etas(self, job: dict) -> list[float]:
        """Each running task's own estimate, from its first progress seen here and its latest."""
        etas = []
        for entry in job.get("progress") or []:
            key = (job["id"], entry["index"])
            latest = (float(entry["progress"]), float(entry["at"]))
            first = self.progress_seen.setdefault(key, latest)
            if latest[0] < first[0]:  # a new attempt started over (or resumed from an earlier checkpoint)
                first = self.progress_seen[key] = latest
            left = views.task_eta(first, latest)
            if left is not None:
                etas.append(left)
        return etas

    def _refresh_results(self, job_id: int) -> None:
        self.results_pending = False
        if self.view == "job" and self.job_id == job_id and self.job is not None:
            self.run(self.update_job(self.job))

    async def load_errors(self, job_id: int) -> None:
        body = await api("GET", f"/api/jobs/{job_id}/errors")
        if self.job_id != job_id:  # another job was opened meanwhile: this answer is not its
            return
        _el("job-errors-card").hidden = not body.get("groups")
        _el("job-errors").innerHTML = views.errors_html(body)
        self.no_agreement = sum(g.get("count", 0) for g in body.get("groups") or [] if g.get("type") == "NoAgreement")
        if self.job is not None and self.job.get("id") == job_id:
            _el("job-validation").innerHTML = verify.validation_html(self.job, self.no_agreement)

    async def load_results(self, job: dict) -> None:
        if not any(verify.results_key(job)):
            return
        rows = await ndjson_rows(f"/api/jobs/{job['id']}/results?format=ndjson", limit=views.PREVIEW_ROWS)
        if self.job_id != job["id"]:  # another job was opened meanwhile
            return
        _el("job-results").innerHTML = views.results_table(rows, job["n_tasks"])

    async def cancel(self) -> None:
        name = views.job_name(self.job) if self.job else f"job {self.job_id}"
        if not window.confirm(f"Cancel {name}? Its unfinished tasks will not run; this cannot be undone."):
            return
        job = await api("POST", f"/api/jobs/{self.job_id}/cancel")
        job.pop("cancelled", None)
        await self.update_job(job, force=True)

    async def retry(self) -> None:
        body = await api("POST", f"/api/jobs/{self.job_id}/retry")
        n = body["retried"]
        self.flash(
            f"{views.plural(n, 'failed task')} queued again." if n else "Nothing was retried: no task has failed.",
            ok=bool(n),
        )
        await self.update_job(await api("GET", f"/api/jobs/{self.job_id}"), force=True)

    async def copy_volunteer_link(self) -> None:
        await window.navigator.clipboard.writeText(f"{window.location.origin}/")
        self.flash("Link copied: share it, and whoever opens it can volunteer.", ok=True)

    async def chain(self, kind: str) -> None:
        self.chain_preset = (kind, self.job_id)
        window.location.hash = "#/new"

    # ------------------------------------------------------------------------ new job
    async def open_new(self) -> None:
        self.show("new")
        for element_id in ("code-error", "inputs-error", "submit-error"):
            _show(element_id, None)
        _el("try-output").hidden = True
        _el("try-status").textContent = "Runs here, in a Python worker in this browser."
        preset, self.chain_preset = self.chain_preset, None
        note = _el("chain-note")
        note.hidden = preset is None
        if preset is not None:  # before any await: the form never shows a stale choice
            kind, job_id = preset
            _el("chain-kind").value = kind
            self.set_mode("chain")
            name = views.job_name(self.jobs.get(job_id, {"id": job_id}))
            note.textContent = ("Pipeline stage after " if kind == "after" else "Inputs: results of ") + name
        verify_ui.preset(self.me.get("default_replication", verify.ADAPTIVE) if self.me else verify.ADAPTIVE)
        await self.ensure_editor()
        self.try_worker.start()  # warm Python up while the researcher types
        listed = (await api("GET", "/api/jobs"))["jobs"]
        for job in listed:
            self.jobs[job["id"]] = {**self.jobs.get(job["id"], {}), **job}
        select = _el("chain-job")
        chosen = str(preset[1]) if preset is not None else str(select.value)
        select.innerHTML = (
            "".join(
                f'<option value="{job["id"]}">#{job["id"]} {views.esc(views.job_name(job))} ({job["state"]})</option>'
                for job in listed
                if job["state"] != "cancelled"
            )
            or '<option value="">(no jobs yet)</option>'
        )
        if chosen:
            select.value = chosen
        select.dataset.loaded = "1"
        self.summarise_inputs()

    async def ensure_editor(self) -> None:
        if self.editor is not None:
            return
        for _ in range(200):
            if getattr(window, "uvmMakeEditor", None) is not None:
                break
            await asyncio.sleep(0.05)
        else:
            raise RuntimeError("the code editor did not load")
        self.editor = window.uvmMakeEditor(_el("editor"), EXAMPLE)

    def set_mode(self, mode: str) -> None:
        self.mode = mode
        for tab in document.querySelectorAll("#input-tabs [data-mode]"):
            tab.setAttribute("aria-selected", "true" if tab.dataset.mode == mode else "false")
        for panel in document.querySelectorAll("[data-mode-panel]"):
            panel.hidden = panel.dataset.modePanel != mode
        _show("inputs-error", None)
        self.summarise_inputs()

    def summarise_inputs(self) -> None:
        """How many tasks the inputs make, as the researcher edits them (big pastes: on submit)."""
        summary = _el("inputs-summary")
        if self.mode in ("json", "csv", "lines") and len(str(_el(f"inputs-{self.mode}").value)) > SUMMARY_LIMIT:
            summary.textContent = ""
            return
        try:
            text = inputs.summary(self.read_inputs())
            summary.textContent = text[:1].upper() + text[1:]
            _show("inputs-error", None)
        except inputs.InputError as exc:  # said as they type, with where (JSON: line and column)
            summary.textContent = ""
            typed = self.mode not in ("json", "csv", "lines") or str(_el(f"inputs-{self.mode}").value).strip()
            _show("inputs-error", str(exc) if typed else None)

    async def load_file(self, mode: str, field) -> None:
        files = field.files
        if not files or files.length == 0:
            return
        file = files.item(0)
        if file.size > 64 * 1024 * 1024:
            _show("inputs-error", f"{file.name} is larger than 64 MB; use the Python client for big inputs.")
            return
        _el(f"inputs-{mode}").value = await file.text()
        _show("inputs-error", None)
        self.summarise_inputs()

    def read_inputs(self) -> object:
        fields = {
            "json": _el("inputs-json").value,
            "csv": _el("inputs-csv").value,
            "lines": _el("inputs-lines").value,
            "start": _el("range-start").value,
            "stop": _el("range-stop").value,
            "step": _el("range-step").value,
            "job": _el("chain-job").value,
            "kind": _el("chain-kind").value,
        }
        return inputs.parse(self.mode, {k: str(v) for k, v in fields.items()})

    def read_options(self) -> dict:
        def number(element_id: str, label: str, kind=int):
            raw = str(_el(element_id).value).strip()
            try:
                return kind(raw)
            except ValueError:
                raise inputs.InputError(f"{label} must be a number") from None

        requirements = [r.strip() for r in str(_el("opt-requirements").value).replace(",", " ").split() if r.strip()]
        return {
            "name": str(_el("opt-name").value).strip(),
            "description": str(_el("opt-description").value).strip(),
            "timeout": number("opt-timeout", "the timeout", float),
            "max_attempts": number("opt-attempts", "attempts per task"),
            "priority": number("opt-priority", "the priority"),
            "requirements": requirements,
        }

    async def first_input(self, value: object) -> object:
        """The input Try uses; for chained inputs, the first result of that job."""
        if isinstance(value, dict) and ("results_of" in value or "after" in value):
            job_id = value.get("results_of", value.get("after"))
            path = f"/api/jobs/{job_id}/results?format=ndjson"
            done = await ndjson_rows(path, want=lambda row: row.get("state") == "done", limit=1)
            if done:
                return done[0]["result"]
            raise inputs.InputError(f"job {job_id} has no result yet to try on; press Try again once one is done")
        return inputs.first(value)

    async def try_code(self) -> None:
        _show("code-error", None)
        status, out = _el("try-status"), _el("try-output")
        try:
            parsed = self.read_inputs()
            options = self.read_options()
            value = await self.first_input(parsed)
        except inputs.InputError as exc:
            _show("inputs-error", str(exc))
            return
        button = _el("try-button")
        button.disabled = True
        booted = self.try_worker.start().done()
        status.textContent = "Running…" if booted else "Starting Python in a worker…"
        try:
            started = time.monotonic()
            answer = await self.try_worker.run(
                str(self.editor.get()), value, options["timeout"], options["requirements"]
            )
            seconds = time.monotonic() - started
        finally:
            button.disabled = False
        status.textContent = f"main({views._short(value, 40)}) ran in this browser."
        out.innerHTML = views.try_html(answer, seconds)
        out.classList.remove("stale")
        out.hidden = False
        out.dataset.outcome = "error" if answer.get("error") else "ok"

    async def submit(self) -> None:
        if self.busy:
            return
        for element_id in ("code-error", "inputs-error", "submit-error"):
            _show(element_id, None)
        try:
            parsed = self.read_inputs()
        except inputs.InputError as exc:
            _show("inputs-error", str(exc))
            return
        try:
            options = self.read_options()
        except inputs.InputError as exc:
            _show("submit-error", str(exc))
            return
        try:
            options.update(verify_ui.read())
        except verify.VerifyError:
            return  # verify_ui says what to fix, beside the field
        body = {"code": str(self.editor.get()), "inputs": parsed, **options}
        self.busy = True
        _el("submit-button").disabled = True
        try:
            created = await api("POST", "/api/jobs", body)
        except ApiError as exc:
            self.show_submit_error(exc)
            return
        finally:
            self.busy = False
            _el("submit-button").disabled = False
        window.location.hash = f"#/job/{created['id']}"

    def show_submit_error(self, exc: ApiError) -> None:
        field, line = exc.body.get("field"), exc.body.get("line")
        if line is not None:
            _show("code-error", f"{exc} — see line {line}")
            self.editor.markLine(int(line))
        elif field == "code":
            _show("code-error", str(exc))
        elif field == "inputs":
            _show("inputs-error", str(exc))
        elif field in ("replication", "quorum", "max_replicas", "tolerance"):
            verify_ui.show_error(str(exc), field)
        else:
            _show("submit-error", str(exc))

    # -------------------------------------------------------------------------- admin
    def open_admin(self) -> None:
        self.show("admin")
        if self.admin_task is None:
            self.admin_task = asyncio.ensure_future(self._admin_loop())

    async def _admin_loop(self) -> None:
        while self.view == "admin":
            await self._guard(self.load_admin())
            await asyncio.sleep(ADMIN_REFRESH)

    async def load_admin(self) -> None:
        people = (await api("GET", "/api/admin/researchers"))["researchers"]
        vols = await api("GET", "/api/admin/volunteers")
        _el("admin-researchers").innerHTML = views.researchers_table(people, self.me["id"])
        _el("admin-volunteers").innerHTML = views.volunteers_table(vols)
        _el("admin-stats").innerHTML = views.admin_stats(vols)

    async def cancel_any_job(self) -> None:
        raw = str(_el("admin-cancel-job").value).strip()
        if not raw.isdigit():
            self.flash("Enter a job id (a number).")
            return
        job = await api("POST", f"/api/admin/jobs/{raw}/cancel")
        self.flash(f"Job {raw}: {job['state']}" + ("" if job["cancelled"] else " (unchanged)"))

    async def set_approved(self, researcher_id: str, approved: bool) -> None:
        await api("POST", f"/api/admin/researchers/{researcher_id}/{'approve' if approved else 'revoke'}")
        await self.load_admin()


async def main() -> None:
    config = _el("uvm-config").dataset
    base = str(window.location.origin)
    worker_url = (
        f"{base}/static/worker.js?pyodide={js.encodeURIComponent(config.pyodide)}"
        f"&index={js.encodeURIComponent(config.packageIndex)}&lock={js.encodeURIComponent(config.packageLock)}"
    )
    app = Dashboard(worker_url)
    window.uvm_dashboard = create_proxy(lambda: json.dumps({"view": app.view, "me": app.me, "job": app.job}))
    try:
        await app.start()
    except Exception as exc:  # noqa: BLE001
        app.flash(f"The dashboard could not start: {type(exc).__name__}: {exc}")
        raise


def start() -> None:
    """Run the dashboard (called once by ``public/dashboard.html``)."""
    asyncio.ensure_future(main())
