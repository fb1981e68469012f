// UVM Compute: one Pyodide web worker. Loads Pyodide once, then runs one task at a time.
//
// Started by the page as a module worker: /static/worker.js?pyodide=<url>&index=<url>.
// Messages follow Pyodide's worker guide: {id, type, payload} in, {id, result | error} out.
// It posts {type: "ready"} once Pyodide and the runner are loaded; the page sends work only
// after that, and anything that arrives earlier is queued, never lost.
// Served with its own Content-Security-Policy (see server/static.py): research code here can
// reach the Pyodide files and the package index, not our API.

const params = new URL(self.location.href).searchParams;
const pyodideURL = params.get("pyodide");
const packageIndexURL = params.get("index") || undefined;
const early = [];
let handle = (event) => early.push(event);
self.onmessage = (event) => handle(event);

// CSP cannot fence off storage: take the origin's IndexedDB (where the page keeps its vault and
// key) and Cache Storage away from this global before any research code runs here.
function shutStorage() {
  for (const name of ["indexedDB", "caches"]) {
    for (const owner of [self, Object.getPrototypeOf(self), WorkerGlobalScope.prototype]) {
      try {
        delete owner[name];
      } catch (err) {
        /* not configurable there: shadowed below */
      }
    }
    Object.defineProperty(self, name, { value: undefined, writable: false, configurable: false });
  }
}

async function boot() {
  const started = performance.now();
  const { loadPyodide } = await import(`${pyodideURL}pyodide.mjs`);
  const pyodide = await loadPyodide({ indexURL: pyodideURL, packageBaseUrl: packageIndexURL });
  const source = await (await fetch("/py/runner.py")).text();
  shutStorage();
  pyodide.FS.writeFile("/home/pyodide/uvm_runner.py", source);
  const runner = pyodide.pyimport("uvm_runner");
  const loaded = new Set(); // requirements already loaded in this worker

  async function run(id, payload) {
    const requirements = (payload.requirements || []).filter((name) => !loaded.has(name));
    if (requirements.length) {
      const problems = [];
      await pyodide.loadPackage(requirements, {
        messageCallback: () => {},
        errorCallback: (message) => problems.push(message),
      });
      if (problems.length) {
        return { id, result: JSON.stringify({ error: `could not load requirements ${requirements.join(", ")} from ${packageIndexURL}: ${problems.join("; ")}`, output: "", result: null, cpu: 0 }) };
      }
      requirements.forEach((name) => loaded.add(name));
    }
    const begun = performance.now();
    const answer = runner.handle(JSON.stringify(payload));
    return { id, result: answer, wall: (performance.now() - begun) / 1000 };
  }

  handle = async (event) => {
    const { id, type, payload } = event.data;
    try {
      if (type === "run") {
        self.postMessage(await run(id, payload));
      } else {
        self.postMessage({ id, error: `unknown request ${type}` });
      }
    } catch (err) {
      self.postMessage({ id, error: String(err && err.stack ? err.stack : err) });
    }
  };
  self.postMessage({ type: "ready", boot: (performance.now() - started) / 1000 });
  for (const event of early.splice(0)) handle(event);
}

boot().catch((err) => self.postMessage({ type: "fatal", error: String(err && err.stack ? err.stack : err) }));
