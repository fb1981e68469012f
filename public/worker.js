// UVM Compute: one Pyodide web worker. Loads Pyodide once, then runs the tasks of ONE job,
// one at a time (a task of another job goes to a fresh worker: webapp/volunteer/pool.py).
//
// Started by the page as a module worker: /static/worker.js?pyodide=<url>&index=<url>.
// Messages follow Pyodide's worker guide: {id, type, payload} in, {id, result | error} out.
// It posts {type: "ready"} once Pyodide and the runner are loaded; the page sends work only
// after that, and anything that arrives earlier is queued, never lost.
// Served with its own Content-Security-Policy (see server/web/static.py): research code here can
// reach the Pyodide files and the package index, not our API.

const params = new URL(self.location.href).searchParams;
const pyodideURL = params.get("pyodide");
const packageIndexURL = params.get("index") || undefined;
// "index" (UVM_PACKAGE_LOCK): the operator's own Pyodide distribution, whose lock file lists its
// packages; otherwise the lock file of our pinned npm Pyodide checks every package loaded.
const lockFileURL = params.get("lock") === "index" && packageIndexURL ? `${packageIndexURL}pyodide-lock.json` : undefined;
const early = [];
let handle = (event) => early.push(event);
self.onmessage = (event) => handle(event);

// What research code must not reach, from a review of a dedicated worker's global scope in
// Chromium 156 (README, "What research code can reach"). CSP fences off the network (connect-src,
// worker-src); it cannot fence off these, so they are taken away before any research code runs.
const TAKEN_GLOBALS = [
  "indexedDB", // the origin's IndexedDB: the page keeps its encrypted vault and key there
  "caches", // the origin's Cache Storage
  "BroadcastChannel", // messages to every tab and worker of our origin
  "webkitRequestFileSystem", // the legacy sandboxed file system: files that outlive the worker
  "webkitRequestFileSystemSync",
  "webkitResolveLocalFileSystemURL",
  "webkitResolveLocalFileSystemSyncURL",
  "OffscreenCanvas", // WebGL: the volunteer's GPU, outside the CPU cap they chose
  "IdleDetector", // whether the volunteer is at the machine
  "PressureObserver", // the device's CPU pressure: a side channel
  "Notification", // notifications in the volunteer's name, if the origin was ever granted them
];
const TAKEN_NAVIGATOR = [
  "storage", // OPFS (getDirectory: files that survive the tab), quota and persistence
  "storageBuckets", // more IndexedDB, Cache Storage and OPFS, per bucket
  "locks", // Web Locks: shared with every tab and worker of our origin
  "gpu", // WebGPU
  "usb", // devices the volunteer once granted this origin
  "hid",
  "serial",
];

function takeAway(target, prototypes, names) {
  for (const name of names) {
    for (const owner of [target, ...prototypes]) {
      try {
        delete owner[name];
      } catch (err) {
        /* not configurable there: shadowed below */
      }
    }
    Object.defineProperty(target, name, { value: undefined, writable: false, configurable: false });
  }
}

// Fails closed: if anything is still reachable, no research code runs in this worker.
function contain() {
  takeAway(self, [DedicatedWorkerGlobalScope.prototype, WorkerGlobalScope.prototype], TAKEN_GLOBALS);
  takeAway(navigator, [WorkerNavigator.prototype], TAKEN_NAVIGATOR);
  const left = TAKEN_GLOBALS.filter((name) => self[name] !== undefined)
    .concat(TAKEN_NAVIGATOR.filter((name) => navigator[name] !== undefined).map((name) => `navigator.${name}`));
  if (left.length) throw new Error(`could not take away ${left.join(", ")}`);
}

async function boot() {
  const started = performance.now();
  const { loadPyodide } = await import(`${pyodideURL}pyodide.mjs`);
  const pyodide = await loadPyodide({ indexURL: pyodideURL, packageBaseUrl: packageIndexURL, lockFileURL });
  const source = await (await fetch("/py/runner.py")).text();
  contain();
  pyodide.FS.writeFile("/home/pyodide/uvm_runner.py", source);
  const runner = pyodide.pyimport("uvm_runner");
  const loaded = new Set(); // requirements already loaded in this worker
  // One job per worker (the page sends another job's tasks to a fresh worker): refused here too,
  // from module scope, which research code cannot reach.
  let owner = null;

  async function run(id, payload) {
    owner = owner === null ? payload.code_hash : owner;
    if (payload.code_hash !== owner) {
      return { id, error: "this worker has run another job's code: it runs no other" };
    }
    const requirements = (payload.requirements || []).filter((name) => !loaded.has(name));
    if (requirements.length) {
      const problems = [];
      await pyodide.loadPackage(requirements, {
        messageCallback: () => {},
        errorCallback: (message) => problems.push(message),
      });
      if (problems.length) {
        return { id, result: JSON.stringify({ error: `could not load requirements ${requirements.join(", ")} from ${packageIndexURL}: ${problems.join("; ")}`, output: "", result: null, elapsed: 0 }) };
      }
      requirements.forEach((name) => loaded.add(name));
    }
    const begun = performance.now();
    // The task's uvm updates (progress, checkpoint, partials; throttled by the runner) go to the
    // page while it runs, tagged with this request's id: the page knows which attempt that is.
    const emit = (text) => self.postMessage({ id, type: "update", result: String(text) });
    const answer = runner.handle(JSON.stringify(payload), emit);
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
