// The page: picks or fetches model.bin and tokenizer.bin, hands them to the
// worker (which owns the WebAssembly module), and streams the story it sends.
const $ = (id) => document.getElementById(id);
const worker = new Worker("worker.js");
let ids = [];

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
  try {
    const [model, tok] = await Promise.all([getModel(), getTok()]);
    worker.postMessage({ type: "load", model, tok }, [model, tok]);
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
  worker.postMessage({
    type: "generate",
    prompt: $("prompt").value,
    steps: Number($("steps").value),
    temperature: Number($("temperature").value),
    topp: Number($("topp").value),
    seed: Number($("seed").value),
  });
};
$("stop").onclick = () => worker.postMessage({ type: "stop" });

worker.onmessage = ({ data: m }) => {
  switch (m.type) {
    case "loaded": {
      const c = m.config;
      const kind = c.version === 2 ? `int8 Q8_0 (group ${c.group_size})` : "fp32";
      $("modelInfo").textContent = `Loaded: dim ${c.dim}, ${c.n_layers} layers, ${c.n_heads} heads ` +
        `(${c.n_kv_heads} kv), vocab ${c.vocab_size}, seq_len ${c.seq_len}, version ${c.version} ${kind}.`;
      $("generate").dataset.ready = "1";
      setBusy(false);
      break;
    }
    case "text":
      $("story").textContent += m.text;
      ids.push(...m.ids);
      $("stats").textContent = `${m.tokps.toFixed(1)} tok/s`;
      break;
    case "done":
      $("stats").textContent = `${m.tokps.toFixed(1)} tok/s, ${m.count} tokens (SIMD128, 1 thread)`;
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
};
