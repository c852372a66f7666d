// The Web Worker: owns the WebAssembly module (run_web.zig) and generates one
// token per step() call, posting text in batches so the page stays responsive.
// With more than one thread it runs llama-threads.wasm on a shared memory and
// starts a helper worker (helper.js) per extra thread; each matmul's rows are
// split over them. A shared memory needs a cross-origin isolated page
// (COOP/COEP headers, as runtimes/web/serve.py sends); without one it runs 1 thread.
let wasm = null;
let memory = null;
let threads = 1;
let fewerThreads = ""; // why there are fewer threads than asked for
let stopRequested = false;
const encoder = new TextEncoder();

async function instance(wanted) {
  if (wasm) return;
  try {
    await instantiate(wanted);
  } catch (e) {
    wasm = null; // try afresh on the next load
    throw e;
  }
}

// A shared memory of up to 4 GiB (as the Makefile's build), or null and why not.
function sharedMemory() {
  if (!self.crossOriginIsolated) {
    fewerThreads = "more threads need a cross-origin isolated page: the COOP/COEP headers runtimes/web/serve.py sends";
    return null;
  }
  try {
    return new WebAssembly.Memory({ initial: 256, maximum: 65536, shared: true });
  } catch (e) {
    fewerThreads = `no shared memory for threads here: ${e.message || e}`;
    return null;
  }
}

async function instantiate(wanted) {
  if (wanted > 1 && (memory = sharedMemory())) {
    const module = await WebAssembly.compileStreaming(fetch("llama-threads.wasm"));
    const env = { memory, now: () => performance.now() };
    wasm = (await WebAssembly.instantiate(module, { env })).exports;
    if (wasm.threads(wanted) !== 0) throw new Error(lastError());
    const started = [];
    for (let index = 1; index < wanted; index++) {
      const stack = wasm.helperStack();
      if (!stack) throw new Error(`out of memory for ${wanted} threads`);
      const helper = new Worker("helper.js");
      started.push(new Promise((ready, failed) => {
        helper.onmessage = ready; // sent once its instance is up, before it starts serving
        helper.onerror = (e) => failed(new Error(`helper thread ${index}: ${e.message}`));
      }));
      helper.postMessage({ module, memory, index, stack });
    }
    await Promise.all(started);
    threads = wanted;
  } else {
    const { instance } = await WebAssembly.instantiateStreaming(fetch("llama.wasm"), {});
    wasm = instance.exports;
    memory = wasm.memory;
  }
}

// A view of wasm memory (made afresh: the memory may have grown since)
const bytes = (ptr, len) => new Uint8Array(memory.buffer, ptr, len);
const lastError = () => new TextDecoder().decode(bytes(wasm.errorPtr(), wasm.errorLen()).slice());

// Copy an ArrayBuffer into a fresh 64-byte aligned wasm buffer.
function copyIn(buf) {
  const ptr = wasm.alloc(buf.byteLength);
  if (!ptr) throw new Error(`out of memory for ${buf.byteLength} bytes`);
  bytes(ptr, buf.byteLength).set(new Uint8Array(buf));
  return ptr;
}

async function load({ model, tok, threads: wanted }) {
  await instance(wanted);
  const mp = copyIn(model);
  const tp = copyIn(tok);
  const rc = wasm.load(mp, model.byteLength, tp, tok.byteLength); // takes the model buffer
  wasm.free(tp, tok.byteLength);
  if (rc !== 0) throw new Error(lastError());
  const names = ["dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len", "version", "group_size"];
  const config = Object.fromEntries(names.map((n, i) => [n, wasm.configField(i)]));
  postMessage({ type: "loaded", config, threads, fewerThreads: threads < wanted ? fewerThreads : "" });
}

const tick = () => new Promise((r) => setTimeout(r, 0));

// A seed of 0 means the clock's seconds, as llama2.c's -s 0 (the sampler's
// xorshift would stay at 0); any other seed is used as it is.
const seedOrClock = (seed) => (/^[+-]?0+$/.test(seed) ? String(Math.floor(Date.now() / 1000)) : seed);

// settings: the text of the temperature, top-p, seed and steps fields
async function generate({ prompt, settings }) {
  if (!wasm) throw new Error("load a model first");
  const text = encoder.encode(prompt);
  const [temperature, topp, seed, steps] = settings;
  const fields = encoder.encode([temperature, topp, seedOrClock(seed), steps].join("\n"));
  const pp = wasm.alloc(text.length);
  const sp = wasm.alloc(fields.length);
  if (!pp || !sp) throw new Error("out of memory for the prompt");
  bytes(pp, text.length).set(text);
  bytes(sp, fields.length).set(fields);
  const np = wasm.start(pp, text.length, sp, fields.length);
  wasm.free(pp, text.length);
  wasm.free(sp, fields.length);
  if (np < 0) throw new Error(lastError());
  const decoder = new TextDecoder();
  let pending = "", pendingIds = [], count = 0, start = 0, lastPost = performance.now();
  const rate = () => (count > 1 ? (count - 1) / ((performance.now() - start) / 1000) : 0);
  stopRequested = false;
  for (;;) {
    const id = wasm.step();
    if (id === -2) throw new Error(lastError());
    if (id === -1) break;
    count++;
    if (count === 1) start = performance.now(); // from the second token, as run.c
    // (a copy: TextDecoder refuses views of shared memory)
    pending += decoder.decode(bytes(wasm.piecePtr(), wasm.pieceLen()).slice(), { stream: true });
    pendingIds.push(id);
    const now = performance.now();
    if (now - lastPost > 200) { // batch the messages; let a "stop" in
      postMessage({ type: "text", text: pending, ids: pendingIds, tokps: rate() });
      pending = "";
      pendingIds = [];
      lastPost = now;
      await tick();
      if (stopRequested) break;
    }
  }
  pending += decoder.decode();
  postMessage({ type: "text", text: pending, ids: pendingIds, tokps: rate() });
  postMessage({ type: "done", tokps: rate(), count });
}

onmessage = async ({ data: m }) => {
  try {
    if (m.type === "load") await load(m);
    else if (m.type === "generate") await generate(m);
    else if (m.type === "stop") stopRequested = true;
  } catch (e) {
    postMessage({ type: "error", message: String(e.message || e) });
  }
};
