// The page's main thread: the controls, the charts and the drawing pad. All the work runs in
// worker.js; this file sends it commands and shows what comes back. Opened with ?run=... (see
// runFromUrl) it runs one task without clicks and publishes the result on window.mnistResult.

const $ = (id) => document.getElementById(id);
const worker = new Worker('worker.js', { type: 'module' });
const pending = new Map();
let nextId = 0;
let onReport = () => {};

worker.onmessage = ({ data }) => {
  if (data.type === 'report') return onReport(data.message);
  if (data.type === 'fatal') return showError(data.error);
  const call = pending.get(data.id);
  pending.delete(data.id);
  if (call) 'error' in data ? call.reject(new Error(data.error)) : call.resolve(data.ok);
};
worker.onerror = (e) => showError(`the page's worker failed: ${e.message || 'it could not start'}`);

function call(cmd, args, transfer = []) {
  return new Promise((resolve, reject) => {
    const id = nextId++;
    pending.set(id, { resolve, reject });
    worker.postMessage({ id, cmd, args }, transfer);
  });
}

function showError(message) {
  const line = $('error');
  line.textContent = `Error: ${message}`;
  line.hidden = false;
}

const busyButtons = ['train', 'verify', 'evaluate', 'download'];
function setBusy(busy) {
  for (const id of busyButtons) $(id).disabled = busy;
  $('stop').disabled = !busy;
}

// ---- Verify ----
function checkRow(c) {
  const err = c.error === null ? 'non-finite' : c.error.toExponential(2);
  const tr = document.createElement('tr');
  for (const [text, cls] of [[c.kernel], [c.layer], [c.shape], [err, 'num'], [c.tolerance.toExponential(0), 'num'],
    [c.ok ? 'ok' : 'FAIL', c.ok ? 'ok' : 'fail']]) {
    const td = document.createElement('td');
    td.textContent = text;
    if (cls) td.className = cls;
    tr.append(td);
  }
  if (c.detail) tr.title = c.detail;
  return tr;
}

function showChecks(r, what) {
  $('checks').tBodies[0].replaceChildren(...r.rows.map(checkRow));
  const passed = r.checks - r.failed;
  $('verify-summary').textContent = `${what}: ${passed}/${r.checks} checks passed` +
    (r.failed ? `; ${r.failed} FAILED (rows marked FAIL)` : ` (largest error ${(100 * r.worst_ratio).toFixed(0)}% of its tolerance)`) +
    `. ${r.set_aside}.`;
}

async function verify(batch, model) {
  setBusy(true);
  $('verify-summary').textContent = `Running every kernel of ${model} at batch ${batch}, then whole training steps…`;
  try {
    const r = await call('verify', { batch, model });
    showChecks(r, `verify of ${model} at batch ${batch}`);
    return r;
  } finally {
    setBusy(false);
  }
}

// ---- Train ----
const curves = { loss: [], accuracy: [], test: [] };

function drawChart(canvas, series, { title, yMin, yMax, format }) {
  const g = canvas.getContext('2d');
  const [w, h, left, bottom] = [canvas.width, canvas.height, 44, 22];
  g.clearRect(0, 0, w, h);
  g.font = '11px system-ui, sans-serif';
  g.fillStyle = '#333';
  g.fillText(title, left, 12);
  const all = series.flatMap((s) => s.points);
  if (!all.length) return;
  const xMax = Math.max(...all.map((p) => p[0]), 1e-9);
  const lo = yMin ?? Math.min(...all.map((p) => p[1]));
  const hi = yMax ?? Math.max(...all.map((p) => p[1]), lo + 1e-9);
  const x = (v) => left + (v / xMax) * (w - left - 8);
  const y = (v) => h - bottom - ((v - lo) / (hi - lo)) * (h - bottom - 18);
  g.strokeStyle = '#ccc';
  g.beginPath(); g.moveTo(left, 18); g.lineTo(left, h - bottom); g.lineTo(w - 8, h - bottom); g.stroke();
  g.fillStyle = '#666';
  g.fillText(format(hi), 2, y(hi) + 4);
  g.fillText(format(lo), 2, y(lo));
  g.fillText(`epoch ${xMax.toFixed(xMax < 3 ? 1 : 0)}`, w - 60, h - 6);
  for (const s of series) {
    g.strokeStyle = s.color; g.fillStyle = s.color;
    g.beginPath();
    s.points.forEach(([px, py], i) => (i ? g.lineTo(x(px), y(py)) : g.moveTo(x(px), y(py))));
    g.stroke();
    if (s.dots) for (const [px, py] of s.points) g.fillRect(x(px) - 2, y(py) - 2, 5, 5);
    g.fillText(s.label, w - 140, 12 + 12 * series.indexOf(s));
  }
}

function redrawCharts() {
  drawChart($('loss-chart'), [{ points: curves.loss, color: '#c0392b', label: 'training (epoch so far)' }],
    { title: 'loss', yMin: 0, format: (v) => v.toFixed(2) });
  drawChart($('accuracy-chart'), [
    { points: curves.accuracy, color: '#2471a3', label: 'training (epoch so far)' },
    { points: curves.test, color: '#1e8449', label: 'test accuracy', dots: true }],
  { title: 'accuracy (%)', yMax: 100, format: (v) => v.toFixed(0) });
}

function epochRow(e) {
  const tr = document.createElement('tr');
  for (const v of [e.epoch, e.train_loss.toFixed(4), `${e.train_accuracy.toFixed(2)}%`,
    `${e.test_accuracy.toFixed(2)}% (${e.test_correct}/${e.test_total})`, e.train_images_per_sec.toFixed(1),
    e.seconds.toFixed(1)]) {
    const td = document.createElement('td');
    td.textContent = v;
    td.className = 'num';
    tr.append(td);
  }
  return tr;
}

async function train(p) {
  setBusy(true);
  curves.loss = []; curves.accuracy = []; curves.test = [];
  $('epochs').tBodies[0].replaceChildren();
  redrawCharts();
  $('train-status').textContent = `Training ${p.model} on ${p.images} images, ${p.epochs} epochs, batch ${p.batch}…`;
  onReport = (m) => {
    if (m.type === 'progress' || m.type === 'epoch_started') {
      const at = m.epoch - 1 + m.done / m.batches;
      $('progress').value = at / p.epochs;
      if (m.type === 'progress') {
        curves.loss.push([at, m.loss]);
        curves.accuracy.push([at, m.accuracy]);
        redrawCharts();
        $('train-status').textContent = `epoch ${m.epoch}/${p.epochs}, batch ${m.done}/${m.batches}: loss ` +
          `${m.loss.toFixed(4)}, accuracy ${m.accuracy.toFixed(2)}%, ${m.images_per_sec.toFixed(1)} images/s`;
      }
    } else if (m.type === 'epoch') {
      curves.test.push([m.epoch, m.test_accuracy]);
      redrawCharts();
      $('epochs').tBodies[0].append(epochRow(m));
    } else if (m.type === 'stopped') {
      $('train-status').textContent = `Stopped in epoch ${m.epoch}, batch ${m.batch}.`;
    }
  };
  try {
    const r = await call('train', p);
    $('progress').value = r.stopped ? $('progress').value : 1;
    const acc = r.test_accuracy === null ? 'before the first epoch ended'
      : `test accuracy ${r.test_accuracy.toFixed(2)}% on ${r.test_images} images, ${r.images_per_s.toFixed(1)} images/s`;
    $('train-status').textContent = `${r.stopped ? 'Stopped' : 'Done'}: ${r.steps} steps, ${acc}. ` +
      'Draw and Download now use this network.';
    const origin = r.stopped ? `trained here, stopped after ${r.steps} steps`
      : `trained here (${r.epochs} epoch${r.epochs === 1 ? '' : 's'})`;
    showNetwork({ origin, test_accuracy: r.test_accuracy });
    return r;
  } finally {
    onReport = () => {};
    setBusy(false);
  }
}

// ---- Draw ----
const pad = $('pad');
const ink = pad.getContext('2d', { willReadFrequently: true });
let drawing = false;
let inked = false;
let dirty = false;
let predicting = false;

function note(text) {
  return Object.assign(document.createElement('li'), { textContent: text, className: 'note' });
}

function clearPad() {
  ink.fillStyle = '#fff';
  ink.fillRect(0, 0, pad.width, pad.height);
  inked = false;
  dirty = false;
  $('top3').replaceChildren(note('Draw a digit.'));
  $('seen').getContext('2d').clearRect(0, 0, 84, 84);
}

function padPoint(e) {
  const r = pad.getBoundingClientRect();
  return [(e.clientX - r.left) * (pad.width / r.width), (e.clientY - r.top) * (pad.height / r.height)];
}

pad.addEventListener('pointerdown', (e) => {
  drawing = true;
  pad.setPointerCapture(e.pointerId);
  const [x, y] = padPoint(e);
  ink.beginPath();
  ink.moveTo(x, y);
  ink.lineTo(x + 0.1, y);
  stroke();
});
pad.addEventListener('pointermove', (e) => {
  if (!drawing) return;
  const [x, y] = padPoint(e);
  ink.lineTo(x, y);
  stroke();
});
for (const type of ['pointerup', 'pointercancel']) pad.addEventListener(type, () => { drawing = false; });

function stroke() {
  ink.strokeStyle = '#000';
  ink.lineWidth = 20;
  ink.lineCap = 'round';
  ink.lineJoin = 'round';
  ink.stroke();
  inked = true;
  dirty = true;
  predictDrawing();
}

// One prediction at a time; a drawing that changed meanwhile is predicted again when it is back.
async function predictDrawing() {
  if (predicting || !dirty) return;
  predicting = true;
  dirty = false;
  const pixels = ink.getImageData(0, 0, pad.width, pad.height).data;
  try {
    showPrediction(await call('predict', { rgba: pixels, width: pad.width, height: pad.height }, [pixels.buffer]));
  } catch (e) {
    $('top3').replaceChildren(note(e.message));
  } finally {
    predicting = false;
    if (dirty) predictDrawing();
  }
}

function showPrediction(r) {
  $('top3').replaceChildren(...r.top.map((t) =>
    Object.assign(document.createElement('li'), { textContent: `${t.class}  (${(100 * t.p).toFixed(1)}%)` })));
  const seen = new ImageData(28, 28);
  r.pixels.forEach((v, i) => seen.data.set([v, v, v, 255], 4 * i));
  const small = document.createElement('canvas');
  small.width = small.height = 28;
  small.getContext('2d').putImageData(seen, 0, 0);
  const g = $('seen').getContext('2d');
  g.imageSmoothingEnabled = false;
  g.drawImage(small, 0, 0, 84, 84);
  window.mnistPrediction = r;
}

$('clear').onclick = clearPad;

// ---- Checkpoints ----
function showNetwork(n) {
  const acc = n.test_accuracy == null ? '' : `, test accuracy ${n.test_accuracy.toFixed(2)}% when saved`;
  $('network').textContent = `Network: ${n.origin}${acc}.`;
  // A drawing on the pad is predicted again with the new network.
  dirty = inked;
  predictDrawing();
}

async function download() {
  const bytes = await call('download');
  const link = document.createElement('a');
  link.href = URL.createObjectURL(new Blob([bytes], { type: 'application/octet-stream' }));
  link.download = 'mnist-net3.safetensors';
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
}

async function evaluate(testImages) {
  setBusy(true);
  $('checkpoint-status').textContent = `Evaluating on ${testImages || 'all'} test images…`;
  try {
    const r = await call('evaluate', { test_images: testImages, batch: 100 });
    $('checkpoint-status').textContent = `Test accuracy ${r.test_accuracy.toFixed(2)}% ` +
      `(${r.correct}/${r.test_images}), average loss ${r.test_loss.toFixed(4)}.`;
    return r;
  } finally {
    setBusy(false);
  }
}

$('load').onchange = async (e) => {
  const file = e.target.files[0];
  if (!file) return;
  try {
    const bytes = new Uint8Array(await file.arrayBuffer());
    showNetwork(await call('load', { bytes, name: file.name }, [bytes.buffer]));
    $('checkpoint-status').textContent = `Loaded ${file.name}; Draw and Download now use it.`;
  } catch (err) {
    showError(err.message);
  }
};

const guarded = (f) => async (...a) => { try { await f(...a); } catch (e) { showError(e.message); } };
$('download').onclick = guarded(download);
$('evaluate').onclick = guarded(() => evaluate(Number($('train-form').test_images.value)));
$('verify').onclick = guarded(() => verify(Number($('verify-batch').value), $('train-form').model.value));
$('stop').onclick = () => call('stop');
$('train-form').onsubmit = guarded(async (e) => {
  e.preventDefault();
  const f = e.target;
  await train({ epochs: +f.epochs.value, batch: +f.batch.value, images: +f.images.value,
    test_images: +f.test_images.value, seed: +f.seed.value, model: f.model.value });
});

// ---- Without clicks: ?run=verify|steps|train|eval|predict ----
function toBase64(bytes) {
  let text = '';
  for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(text);
}

async function runFromUrl(q, adapter) {
  const num = (k, d) => (q.has(k) ? Number(q.get(k)) : d);
  switch (q.get('run')) {
    case 'verify': {
      const r = await verify(num('batch', 8), q.get('model') || 'net3');
      return { adapter, checks: r.checks, failed: r.failed, worst_ratio: r.worst_ratio, rows: r.rows };
    }
    case 'steps': {
      const r = await call('steps', { n: num('n', 10), batch: num('batch', 8) });
      showChecks(r, `${r.steps} training steps at batch ${num('batch', 8)}`);
      return { adapter, steps: r.steps, failed: r.failed, worst_ratio: r.worst_ratio, seconds: r.seconds, rows: r.rows };
    }
    case 'train': {
      const p = { images: num('images', 2000), epochs: num('epochs', 3), batch: num('batch', 50), seed: num('seed', 1),
        test_images: num('test_images', 1000), model: q.get('model') || 'net3' };
      for (const [k, v] of Object.entries(p)) $('train-form')[k].value = v;
      const r = await train(p);
      const checkpoint = toBase64(await call('download'));
      return { adapter, steps: r.steps, final_loss: r.final_loss, test_accuracy: r.test_accuracy,
        images_per_s: r.images_per_s, records: r.records, checkpoint_base64: checkpoint };
    }
    case 'eval': {
      showNetwork(await call('loadUrl', { url: q.get('checkpoint') }));
      const r = await evaluate(num('test_images', 0));
      return { adapter, test_accuracy: r.test_accuracy, correct: r.correct, test_images: r.test_images };
    }
    case 'predict': {
      if (q.has('checkpoint')) showNetwork(await call('loadUrl', { url: q.get('checkpoint') }));
      const r = await call('predictUrl', { url: q.get('image') });
      showPrediction(r);
      return { adapter, top: r.top };
    }
    default:
      throw new Error(`unknown ?run=${q.get('run')} (verify, steps, train, eval or predict)`);
  }
}

async function main() {
  clearPad();
  redrawCharts();
  const q = new URLSearchParams(location.search);
  let adapter = null;
  try {
    const s = await call('start');
    adapter = s.adapter;
    $('adapter').textContent = `WebGPU adapter: ${[s.adapter.vendor, s.adapter.architecture, s.adapter.description]
      .filter(Boolean).join(', ') || 'unnamed'} · ${s.counts.train} training and ${s.counts.test} test images loaded`;
    showNetwork(s.network);
    const select = $('train-form').model;
    for (const name of s.models) select.add(new Option(name, name));
    setBusy(false);
    if (!q.has('run')) return;
    window.mnistResult = await runFromUrl(q, adapter);
    document.title = 'done';
  } catch (e) {
    showError(e.message);
    window.mnistResult = { adapter, error: e.message };
    document.title = 'failed';
  }
}

main();
