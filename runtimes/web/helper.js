// A helper thread (started by worker.js): its own instance of
// llama-threads.wasm on the shared memory, which runs its part of every matmul
// of every token; helperMain never returns.
onmessage = ({ data: { module, memory, index, stack } }) => {
  const env = { memory, now: () => performance.now() };
  const { exports } = new WebAssembly.Instance(module, { env });
  postMessage("ready");
  exports.helperMain(index, stack);
};
