// The smallest JS that must exist: window.tabmesh (filled in by Python once it boots),
// start-up progress, and errors shown on the page instead of only in the console.
const handlers = new Map();
let resolveReady, rejectReady;
const ready = new Promise((res, rej) => { resolveReady = res; rejectReady = rej; });
ready.catch(() => {}); // a failed boot is shown on the page; callers still see the rejection

function showError(message) {
  const box = document.getElementById("errors");
  if (!box) return;
  const line = document.createElement("p");
  line.textContent = String(message);  // text, never HTML
  box.append(line);
}

function status(text) {
  const el = document.getElementById("status");
  if (el) el.textContent = text;
}

// Errors from the API keep OpenAI's shape: err.status, err.error = {message, type, param, code}.
function toError(value) {
  if (value && value.openai && value.openai.error) {
    const err = new Error(value.openai.error.message);
    err.status = value.status;
    err.error = value.openai.error;
    err.type = value.openai.error.type;
    err.code = value.openai.error.code;
    err.param = value.openai.error.param;
    return err;
  }
  return value;
}

function call(name, ...args) {
  const fn = handlers.get(name);
  if (!fn) return Promise.reject(new Error(`tabmesh.${name}() is not available yet: await tabmesh.ready first`));
  return new Promise((resolve, reject) => fn(resolve, (e) => reject(toError(e)), ...args));
}

// A chat.completion.chunk stream, shaped like the openai package's: `for await (const c of stream)`,
// stream.cancel() stops generation between tokens (a final chunk still arrives), break frees it.
function chatStream(sid) {
  let closed = false;
  return {
    id: sid,
    async next() {
      if (closed) return {done: true, value: undefined};
      const r = await call("chatNext", sid);
      if (r.done) { closed = true; return {done: true, value: undefined}; }
      return {done: false, value: r.value};
    },
    async return() {
      if (!closed) { closed = true; await call("chatClose", sid, false); }
      return {done: true, value: undefined};
    },
    cancel() { return call("chatClose", sid, true); },
    [Symbol.asyncIterator]() { return this; },
  };
}

function callSync(name, fallback, ...args) {
  const fn = handlers.get(name);
  return fn ? fn(...args) : fallback;
}

window.tabmesh = {
  ready,
  peers: () => callSync("peers", []),
  ping: (peerId) => call("ping", peerId),
  echo: (peerId, bytes) => call("echo", peerId, bytes),
  send: (peerId, bytes) => call("send", peerId, bytes),
  inbox: () => callSync("inbox", []),
  selfTest: () => call("selfTest"),
  stats: () => callSync("stats", {}),
  chat: { completions: { create: (request) => (request && request.stream)
    ? call("chatOpen", request).then(chatStream) : call("chatCreate", request) } },
  models: { list: () => call("modelsList") },
  llm: {
    load: (opts) => call("llmLoad", opts || {}),
    generate: (opts) => call("llmGenerate", opts),
    benchmark: (opts) => call("llmBenchmark", opts),
    info: () => callSync("llmInfo", null),
  },
  embed: (texts, opts) => call("embed", texts, opts || {}),
  // Mesh inference (pysrc/tabmesh/mesh_page.py): the room's plan, its stages, generation across tabs.
  mesh: {
    status: () => callSync("meshStatus", {ready: false}),
    join: () => call("meshJoin"),                         // take part (?mesh=1 does it at load)
    prepare: () => call("meshPrepare"),                   // ask for a plan, wait until its stages loaded
    generate: (opts) => call("meshGenerate", opts),     // {prompt, maxTokens=32, chat=false}: greedy
    throttle: (factor) => callSync("meshThrottle", null, factor),
  },
  // Private RAG (pysrc/tabmesh/rag_page.py): every call takes one options object.
  rag: {
    open: (o) => call("ragOpen", o || {}),             // {collection="default"}
    ingest: (o) => call("ragIngest", o || {}),         // {text, source, collection?}
    ingestMany: (o) => call("ragIngestMany", o || {}), // {docs: [{text, source}], collection?}
    documents: (o) => call("ragDocuments", o || {}),
    remove: (o) => call("ragRemove", o || {}),         // {docId, collection?}
    search: (o) => call("ragSearch", o || {}),         // {query, k=5, collection?}
    ask: (o) => call("ragAsk", o || {}),               // {question, k=4, maxTokens=64, collection?}
    share: (o) => call("ragShare", o || {}),           // {collection?, on=true}
    stats: () => call("ragStats"),
  },
  api: { serve: (on = true) => call("apiServe", on), status: () => callSync("apiStatus", null) },
  debug: { sendRawFrame: (peerId, bytes) => call("sendRawFrame", peerId, bytes) },
  errors: [],
  _register(name, fn) { handlers.set(name, fn); },
  _ready(info) { resolveReady(info); },
  _fail(message) { window.tabmesh.errors.push(String(message)); showError(message); rejectReady(new Error(message)); },
  _showError(message) { window.tabmesh.errors.push(String(message)); showError(message); },
  _status: status,
};

window.addEventListener("error", (e) => window.tabmesh._showError(e.message || String(e.error)));
window.addEventListener("unhandledrejection", (e) => window.tabmesh._showError(`unhandled: ${e.reason && e.reason.message || e.reason}`));
addEventListener("py:progress", (e) => status(`loading Python: ${e.detail}`));
addEventListener("py:ready", () => status("Python is ready; starting the node…"));
status("loading the Python runtime (Pyodide)…");
