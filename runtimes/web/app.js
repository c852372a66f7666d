// The page: picks or fetches model.bin and tokenizer.bin, hands them to the
// worker (which owns the WebAssembly module), and streams the story it sends.
const $ = (id) => document.getElementById(id);
let worker = null;
let workerThreads = 0;
let ids = [];
let threadsUsed = 1;

// A worker keeps its thread count for life, so a new count means a new worker.
function workerFor(threads) {
  if (worker && workerThreads === threads) return worker;
  if (worker) worker.terminate(); // and its helpers with it
  worker = new Worker("worker.js");
  worker.onmessage = onMessage;
  workerThreads = threads;
  delete $("generate").dataset.ready;
  return worker;
}

$("threads").value = Math.min(navigator.hardwareConcurrency || 1, 4);

// The dot blinks from this thread's timer, so it stops if the page ever
// freezes. (A CSS animation would go on on the compositor regardless, and
// without a GPU its 60 frames a second took most of a core from generation.)
setInterval(() => $("alive").classList.toggle("dim"), 500);

function showError(msg) {
  $("error").textContent = msg;
  $("error").hidden = !msg;
}

function setBusy(busy) {
  $("generate").disabled = busy || !$("generate").dataset.ready;
  $("stop").disabled = !busy;
  $("loadFiles").disabled = $("loadUrls").disabled = busy;
}

async function loadFrom(getModel, getTok) {
  showError("");
  $("modelInfo").textContent = "Loading...";
  delete $("generate").dataset.ready; // a load replaces the model, or fails without one
  setBusy(false);
  try {
    const threads = Math.round(Number($("threads").value));
    if (!(threads >= 1 && threads <= 64)) throw new Error("threads must be a whole number from 1 to 64");
    const [model, tok] = await Promise.all([getModel(), getTok()]);
    workerFor(threads).postMessage({ type: "load", model, tok, threads }, [model, tok]);
  } catch (e) {
    $("modelInfo").textContent = "No model loaded.";
    showError(String(e.message || e));
  }
}

async function fetchBytes(url) {
  const r = await fetch(url);
  if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`);
  return r.arrayBuffer();
}

function fileBytes(input, what) {
  const f = input.files[0];
  if (!f) return Promise.reject(new Error(`choose a ${what} file first`));
  return f.arrayBuffer();
}

$("loadFiles").onclick = () =>
  loadFrom(() => fileBytes($("modelFile"), "model.bin"), () => fileBytes($("tokFile"), "tokenizer.bin"));
$("loadUrls").onclick = () => loadFrom(() => fetchBytes($("modelUrl").value), () => fetchBytes($("tokUrl").value));

$("generate").onclick = () => {
  showError("");
  ids = [];
  $("story").textContent = "";
  $("stats").textContent = "";
  $("ids").value = "";
  delete document.body.dataset.done;
  setBusy(true);
  // the fields' text as typed (a number field gives "" for text that is no number): the
  // module reads it by the command line's rules, so that it refuses what run refuses
  worker.postMessage({
    type: "generate",
    prompt: $("prompt").value,
    settings: ["temperature", "topp", "seed", "steps"].map((id) => $(id).value),
  });
};
$("stop").onclick = () => worker.postMessage({ type: "stop" });

function onMessage({ data: m }) {
  switch (m.type) {
    case "loaded": {
      const c = m.config;
      const kind = c.version === 2 ? `int8 Q8_0 (group ${c.group_size})` : "fp32";
      threadsUsed = m.threads;
      const note = m.fewerThreads ? ` (${m.fewerThreads})` : "";
      $("modelInfo").textContent = `Loaded: dim ${c.dim}, ${c.n_layers} layers, ${c.n_heads} heads ` +
        `(${c.n_kv_heads} kv), vocab ${c.vocab_size}, seq_len ${c.seq_len}, version ${c.version} ${kind}; ` +
        `${m.threads} thread${m.threads > 1 ? "s" : ""}${note}.`;
      $("generate").dataset.ready = "1";
      setBusy(false);
      break;
    }
    case "text":
      $("story").append(m.text); // a text node more, rather than the whole story anew
      ids.push(...m.ids);
      $("stats").textContent = `${m.tokps.toFixed(1)} tok/s`;
      break;
    case "done":
      $("stats").textContent = `${m.tokps.toFixed(1)} tok/s, ${m.count} tokens ` +
        `(SIMD128, ${threadsUsed} thread${threadsUsed > 1 ? "s" : ""})`;
      $("ids").value = JSON.stringify(ids);
      document.body.dataset.done = "1";
      setBusy(false);
      break;
    case "error":
      if (!$("generate").dataset.ready) $("modelInfo").textContent = "No model loaded.";
      showError(m.message);
      document.body.dataset.done = "error";
      setBusy(false);
      break;
  }
}
