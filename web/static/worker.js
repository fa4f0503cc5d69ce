// The page's worker: it holds the WebAssembly module (web/src/lib.rs), the GPU device, the data and
// the network, so that nothing heavy runs on the page's main thread. Messages in: {id, cmd, args};
// out: {id, ok} or {id, error} per command, and {type: ...} reports while one runs.
import init, * as wasm from './pkg/mnist_web.js';

// A panic in the WebAssembly (a bug) is reported to the page as an error.
self.reportPanic = (message) => postMessage({ type: 'fatal', error: message });

async function fetchBytes(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`cannot fetch ${url}: HTTP ${response.status}`);
  return new Uint8Array(await response.arrayBuffer());
}

async function adapterInfo() {
  if (!('gpu' in navigator)) {
    throw new Error('this browser has no WebGPU (navigator.gpu is missing). Use a recent Chrome or Edge, ' +
      'or Safari 26; in Chromium without a GPU, start it with --enable-unsafe-webgpu.');
  }
  const adapter = await navigator.gpu.requestAdapter({ powerPreference: 'high-performance' });
  if (!adapter) throw new Error('WebGPU is present but offers no adapter (is the GPU blocklisted or disabled?)');
  const i = adapter.info || {};
  return { vendor: i.vendor || '', architecture: i.architecture || '', description: i.description || '',
           device: i.device || '' };
}

async function start() {
  await init();
  const adapter = await adapterInfo();
  await wasm.open_gpu();
  const files = ['train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz', 't10k-images-idx3-ubyte.gz',
    't10k-labels-idx1-ubyte.gz'];
  const bytes = await Promise.all(files.map((f) => fetchBytes(`data/${f}`)));
  const counts = JSON.parse(wasm.set_data(...bytes));
  const shipped = JSON.parse(wasm.load_checkpoint(await fetchBytes('net3.safetensors'), 'net3.safetensors',
    'the documented run (docs/recipe.md), shipped with the page'));
  return { adapter, counts, network: shipped, models: JSON.parse(wasm.models()) };
}

const report = (message) => postMessage({ type: 'report', message: JSON.parse(message) });

const commands = {
  start,
  verify: async ({ batch, model }) => JSON.parse(await wasm.verify(batch, model)),
  steps: async ({ n, batch }) => JSON.parse(await wasm.steps(n, batch)),
  train: async (params) => JSON.parse(await wasm.train(JSON.stringify(params), report)),
  stop: async () => wasm.stop(),
  evaluate: async ({ test_images, batch }) => JSON.parse(await wasm.evaluate(test_images, batch)),
  predict: async ({ rgba, width, height }) => JSON.parse(await wasm.predict_rgba(rgba, width, height)),
  predictUrl: async ({ url }) => JSON.parse(await wasm.predict_file(await fetchBytes(url), url)),
  load: async ({ bytes, name }) => JSON.parse(wasm.load_checkpoint(bytes, name, `loaded from ${name}`)),
  loadUrl: async ({ url }) => JSON.parse(wasm.load_checkpoint(await fetchBytes(url), url, `loaded from ${url}`)),
  download: async () => wasm.checkpoint_bytes(),
};

self.onmessage = async ({ data: { id, cmd, args } }) => {
  try {
    const ok = await commands[cmd](args || {});
    postMessage({ id, ok });
  } catch (e) {
    postMessage({ id, error: e instanceof Error ? e.message : String(e) });
  }
};
