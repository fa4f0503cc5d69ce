// The page of scripts/web.sh in a real browser: headless Chromium (Debian's /usr/bin/chromium) with
// WebGPU on SwiftShader, driven by Playwright. Run by scripts/web-test.sh:
//
//   node browser.test.mjs --page DIR --bin MNIST_WGPU [--only NAME,...] [--train-run QUERY]
//
// Cases: webgpu, verify, steps, train (with the checkpoints' round trips), draw, predict, stop, errors.
//
// DIR is the folder `scripts/web.sh --out DIR --no-serve` wrote (the test writes its own files into
// DIR/test/); MNIST_WGPU the native binary, which trains and evaluates the same runs for comparison.
// Fails, saying how to get them, when Chromium or its WebGPU is missing: it never skips.
import { chromium } from 'playwright-core';
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, writeFileSync, createReadStream, statSync } from 'node:fs';
import { createServer } from 'node:http';
import { tmpdir } from 'node:os';
import { deflateSync, gunzipSync } from 'node:zlib';
import { extname, join, normalize, resolve } from 'node:path';

const args = Object.fromEntries(process.argv.slice(2).reduce((acc, a, i, all) =>
  (a.startsWith('--') ? [...acc, [a.slice(2), all[i + 1]]] : acc), []));
const pageDir = resolve(args.page || '../../target/web');
const bin = resolve(args.bin || '../../target/release/mnist-wgpu');
const only = args.only ? args.only.split(',') : null;
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';

function fail(message) {
  console.error(`browser test: ${message}`);
  process.exit(1);
}
if (!existsSync(CHROMIUM)) {
  fail(`no Chromium at ${CHROMIUM}: install Debian's (sudo apt-get install -y chromium) or set CHROMIUM=/path/to/chrome`);
}
if (!existsSync(join(pageDir, 'index.html'))) fail(`no page in ${pageDir}: build it with scripts/web.sh --out ${pageDir} --no-serve`);
if (!existsSync(bin)) fail(`no native binary at ${bin}: build it with cargo build --release`);

// A static server for the page's folder, as any static host would serve it.
const types = { '.html': 'text/html', '.js': 'text/javascript', '.mjs': 'text/javascript', '.css': 'text/css',
  '.wasm': 'application/wasm', '.png': 'image/png' };
const server = createServer((req, res) => {
  const path = normalize(decodeURIComponent(new URL(req.url, 'http://x').pathname)).replace(/^(\.\.[/\\])+/, '');
  const file = join(pageDir, path.endsWith('/') ? `${path}index.html` : path);
  if (!file.startsWith(pageDir) || !existsSync(file) || !statSync(file).isFile()) {
    res.writeHead(404).end('not found');
    return;
  }
  res.writeHead(200, { 'content-type': types[extname(file)] || 'application/octet-stream' });
  createReadStream(file).pipe(res);
});
await new Promise((ok) => server.listen(0, '127.0.0.1', ok));
const origin = `http://127.0.0.1:${server.address().port}`;
const testDir = join(pageDir, 'test');
mkdirSync(testDir, { recursive: true });

// Without the background-networking flags Chromium keeps trying hosts this machine cannot reach.
const BASE_FLAGS = ['--no-sandbox', '--disable-gpu-sandbox', '--no-first-run', '--disable-background-networking',
  '--disable-component-update', '--disable-sync'];
// WebGPU on SwiftShader, Chrome's software Vulkan (../shared/spec/webgpu-browser.md).
const WEBGPU_FLAGS = ['--enable-unsafe-webgpu', '--enable-features=Vulkan', '--use-webgpu-adapter=swiftshader'];
const browser = await chromium.launch({ executablePath: CHROMIUM, args: [...BASE_FLAGS, ...WEBGPU_FLAGS] });

async function openPage(query = '') {
  const page = await browser.newPage({ viewport: { width: 1280, height: 1000 } });
  page.on('pageerror', (e) => console.log(`  page error: ${e.message}`));
  page.on('console', (m) => m.type() === 'error' && console.log(`  console: ${m.text()}`));
  await page.goto(`${origin}/${query}`);
  return page;
}

// Opens the page with ?QUERY and waits for its result (window.mnistResult, title done or failed).
// With `shot`, a screenshot of the page at the end goes to DIR/test/SHOT.
async function runPage(query, minutes, shot) {
  const page = await openPage(`?${query}`);
  await page.waitForFunction(() => ['done', 'failed'].includes(document.title), null, { timeout: minutes * 60_000 });
  const result = await page.evaluate(() => window.mnistResult);
  const title = await page.title();
  const shown = await page.locator('#error').textContent();
  if (shot) await page.screenshot({ path: join(testDir, shot) });
  await page.close();
  return { title, result, shown };
}

function assert(condition, message) {
  if (!condition) throw new Error(message);
}

const native = (...a) => execFileSync(bin, a, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
/** `eval`'s accuracy line: `Accuracy: 934/1000 (93.40%)`. */
function nativeEval(file, testImages) {
  const out = native('eval', file, '--backend', 'cpu', '--test-images', String(testImages));
  const m = out.match(/(\d+)\/(\d+) \((\d+\.\d+)%\)/);
  assert(m, `no accuracy in eval's output:\n${out}`);
  return { correct: Number(m[1]), total: Number(m[2]), accuracy: Number(m[3]) };
}

const cases = {
  async webgpu() {
    const page = await openPage();
    const info = await page.evaluate(async () => {
      if (!navigator.gpu) return null;
      const a = await navigator.gpu.requestAdapter();
      return a && { vendor: a.info.vendor, architecture: a.info.architecture };
    });
    await page.close();
    assert(info, 'Chromium offers no WebGPU adapter: it needs --enable-unsafe-webgpu --enable-features=Vulkan ' +
      '--use-webgpu-adapter=swiftshader and its SwiftShader (/usr/lib/chromium/libvk_swiftshader.so)');
    return `adapter ${info.vendor} ${info.architecture}`;
  },

  async verify() {
    const { title, result: r, shown } = await runPage('run=verify&batch=8', 10);
    assert(title === 'done', `the page failed: ${shown}`);
    const failed = r.rows.filter((c) => !c.ok).map((c) => `${c.kernel} ${c.layer} ${c.error} (${c.detail})`);
    assert(r.failed === 0 && failed.length === 0, `${r.failed} of ${r.checks} checks failed:\n${failed.join('\n')}`);
    assert(r.checks >= 250, `only ${r.checks} checks ran`);
    // A network without batchnorm: its ReLUs on their own and in a linear layer's epilogue.
    const mlp = await runPage('run=verify&batch=8&model=mlp3', 10);
    assert(mlp.title === 'done', `the page failed on mlp3: ${mlp.shown}`);
    const mlpFailed = mlp.result.rows.filter((c) => !c.ok).map((c) => `${c.kernel} ${c.layer} ${c.error} (${c.detail})`);
    assert(mlp.result.failed === 0, `mlp3: ${mlp.result.failed} checks failed:\n${mlpFailed.join('\n')}`);
    assert(mlp.result.rows.some((c) => c.kernel.endsWith('forward_relu')), 'mlp3: no forward_relu row');
    // The fast recipe's network: ReLUs after max poolings, biases; every net's rows include Adam's.
    const fast = await runPage('run=verify&batch=8&model=fast-recipe', 10);
    assert(fast.title === 'done', `the page failed on fast-recipe: ${fast.shown}`);
    const fastFailed = fast.result.rows.filter((c) => !c.ok).map((c) => `${c.kernel} ${c.layer} ${c.error} (${c.detail})`);
    assert(fast.result.failed === 0, `fast-recipe: ${fast.result.failed} checks failed:\n${fastFailed.join('\n')}`);
    assert(fast.result.rows.some((c) => c.kernel.startsWith('adam.update')), 'fast-recipe: no adam.update row');
    return `${r.checks}/${r.checks} checks passed, largest error ${(100 * r.worst_ratio).toFixed(0)}% of its tolerance; ` +
      `mlp3: ${mlp.result.checks}/${mlp.result.checks}; fast-recipe: ${fast.result.checks}/${fast.result.checks}`;
  },

  async steps() {
    const { title, result: r, shown } = await runPage('run=steps&n=10&batch=8', 10);
    assert(title === 'done', `the page failed: ${shown}`);
    assert(r.steps === 10, `${r.steps} steps ran, not 10`);
    const failed = r.rows.filter((c) => !c.ok).map((c) => `${c.kernel} ${c.layer} ${c.error} (${c.detail})`);
    assert(r.failed === 0, `${r.failed} comparisons failed:\n${failed.join('\n')}`);
    return `10 steps agree with the CPU reference, largest error ${(100 * r.worst_ratio).toFixed(0)}% of its tolerance, ` +
      `${r.seconds.toFixed(1)} s`;
  },

  // Trains in the page and natively (CPU backend) on the same data, seed and batch; then the page's
  // checkpoint goes to native eval and back to the page, and the native run's checkpoint to the page.
  async train() {
    const p = Object.fromEntries(new URLSearchParams(TRAIN_RUN).entries());
    const [images, epochs, batch, testImages] = [+p.images, +p.epochs, +p.batch, +p.test_images];
    const { title, result: r, shown } = await runPage(`run=train&${TRAIN_RUN}`, 30, 'train.png');
    assert(title === 'done', `the page failed: ${shown}`);
    const out = mkdtempSync(join(tmpdir(), 'mnist-web-native-'));
    native('train', '--backend', 'cpu', '--epochs', p.epochs, '--batch-size', p.batch, '--seed', p.seed,
      '--train-images', p.images, '--test-images', p.test_images, '--out', out, ...(p.model ? ['--model', p.model] : []));
    const records = readFileSync(join(out, 'metrics.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l));
    const nativeAccuracy = records.at(-1).test_accuracy;
    const steps = epochs * Math.ceil(images / batch);
    assert(r.steps === steps, `the page ran ${r.steps} steps, not ${steps}`);
    assert(Math.abs(r.test_accuracy - nativeAccuracy) <= 2,
      `the page trained to ${r.test_accuracy}%, the native CPU backend to ${nativeAccuracy}% (more than 2 points apart)`);

    // Page -> native eval -> page.
    const file = join(testDir, 'page.safetensors');
    writeFileSync(file, Buffer.from(r.checkpoint_base64, 'base64'));
    const evaluated = nativeEval(file, testImages);
    const back = await runPage(`run=eval&checkpoint=test/page.safetensors&test_images=${testImages}`, 5);
    assert(back.title === 'done', `the page could not evaluate its own checkpoint: ${back.shown}`);
    assert(back.result.test_accuracy === r.test_accuracy,
      `the page's checkpoint, loaded back, scores ${back.result.test_accuracy}%, not ${r.test_accuracy}% as trained`);
    assert(Math.abs(evaluated.correct - back.result.correct) <= ROUNDING_IMAGES,
      `native eval of the page's checkpoint: ${evaluated.correct}/${testImages}, the page: ${back.result.correct}`);

    // A native run's checkpoint in the page.
    writeFileSync(join(testDir, 'native.safetensors'), readFileSync(join(out, 'last.safetensors')));
    const nativeEvaluated = nativeEval(join(out, 'last.safetensors'), testImages);
    const inPage = await runPage(`run=eval&checkpoint=test/native.safetensors&test_images=${testImages}`, 5);
    assert(inPage.title === 'done', `the page could not evaluate the native checkpoint: ${inPage.shown}`);
    assert(Math.abs(nativeEvaluated.correct - inPage.result.correct) <= ROUNDING_IMAGES,
      `the native checkpoint: eval ${nativeEvaluated.correct}/${testImages}, the page ${inPage.result.correct}`);
    return `${TRAIN_RUN}: page ${r.test_accuracy.toFixed(1)}%, native CPU ${nativeAccuracy.toFixed(1)}% ` +
      `(${r.images_per_s.toFixed(1)} training images/s in the page); the page's checkpoint: native eval ` +
      `${evaluated.correct}, page ${back.result.correct}; the native run's: eval ${nativeEvaluated.correct}, page ` +
      `${inPage.result.correct} (of ${testImages})`;
  },

  // Draw: strokes with the mouse on the pad, predicted with the shipped network.
  async draw() {
    const page = await openPage();
    await page.waitForFunction(() => document.getElementById('adapter').textContent.startsWith('WebGPU adapter'),
      null, { timeout: 120_000 });
    const results = [];
    for (const [digit, path] of DRAWINGS) {
      await page.click('#clear');
      await page.evaluate(() => { window.mnistPrediction = null; });
      // Where the pad is now that Clear's click has scrolled the page.
      await page.locator('#pad').scrollIntoViewIfNeeded();
      const pad = await page.locator('#pad').boundingBox();
      await page.mouse.move(pad.x + path[0][0], pad.y + path[0][1]);
      await page.mouse.down();
      for (const [x, y] of path.slice(1)) await page.mouse.move(pad.x + x, pad.y + y, { steps: 4 });
      await page.mouse.up();
      // The last prediction is of the whole drawing once none is in flight.
      await page.waitForFunction(() => window.mnistPrediction, null, { timeout: 60_000 });
      await page.waitForTimeout(1500);
      const top = await page.evaluate(() => window.mnistPrediction.top);
      const shownTop = await page.locator('#top3 li').first().textContent();
      assert(top[0].class === digit, `a drawn ${digit} was predicted ${JSON.stringify(top)}`);
      assert(shownTop.startsWith(String(digit)), `the page shows "${shownTop}" for a drawn ${digit}`);
      results.push(`${digit} (${(100 * top[0].p).toFixed(0)}%)`);
    }
    await page.screenshot({ path: join(testDir, 'draw.png') });
    await page.close();
    return `drawn digits predicted: ${results.join(', ')}`;
  },

  // ?run=predict with a picture file: a test digit, dark on light and 4x as large, as a user's
  // photo would be; the page and native `predict` rank the classes alike.
  async predict() {
    const images = gunzipSync(readFileSync(join(pageDir, 'data', 't10k-images-idx3-ubyte.gz')));
    const labels = gunzipSync(readFileSync(join(pageDir, 'data', 't10k-labels-idx1-ubyte.gz')));
    const [index, scale] = [0, 4];
    const side = 28 * scale;
    const rows = [];
    for (let y = 0; y < side; y++) {
      const row = Buffer.alloc(side + 1);
      for (let x = 0; x < side; x++) row[x + 1] = 255 - images[16 + 784 * index + 28 * Math.floor(y / scale) + Math.floor(x / scale)];
      rows.push(row);
    }
    const file = join(testDir, 'digit.png');
    writeFileSync(file, png(side, side, Buffer.concat(rows)));
    const { title, result: r, shown } = await runPage('run=predict&checkpoint=net3.safetensors&image=test/digit.png', 2);
    assert(title === 'done', `the page failed: ${shown}`);
    const out = native('predict', join(pageDir, 'net3.safetensors'), file, '--backend', 'cpu');
    const nativeTop = [...out.matchAll(/(\d) \(/g)].map((m) => Number(m[1]));
    const pageTop = r.top.map((t) => t.class);
    assert(pageTop[0] === labels[8 + index], `a test ${labels[8 + index]} was predicted ${JSON.stringify(r.top)}`);
    // Only the first: the others hold probabilities near 1e-6, which rounding may reorder.
    assert(pageTop[0] === nativeTop[0], `the page ranks ${pageTop}, native predict ${nativeTop}`);
    return `a test ${labels[8 + index]} as a 112x112 PNG: the page ranks ${pageTop.join(', ')}, native predict ` +
      `${nativeTop.join(', ')}`;
  },

  // Train from the form, Stop, then Download: the main thread answers while the worker trains.
  async stop() {
    const page = await openPage();
    await page.waitForFunction(() => document.getElementById('adapter').textContent.startsWith('WebGPU adapter'),
      null, { timeout: 120_000 });
    await page.fill('input[name=epochs]', '2');
    await page.fill('input[name=images]', '500');
    await page.fill('input[name=test_images]', '100');
    await page.click('#train');
    await page.waitForFunction(() => document.getElementById('train-status').textContent.startsWith('epoch'),
      null, { timeout: 120_000 });
    // The main thread runs a script at once (frames are another matter: on this machine SwiftShader
    // draws the page too, on the cores the training takes).
    const times = [];
    for (let i = 0; i < 5; i++) {
      const started = Date.now();
      await page.evaluate(() => document.getElementById('train-status').textContent);
      times.push(Date.now() - started);
      await page.waitForTimeout(200);
    }
    const answered = times.sort((a, b) => a - b)[2];
    assert(answered < 100, `the page's main thread took ${answered} ms (median of 5) to answer while training`);
    await page.click('#stop');
    await page.waitForFunction(() => /^(Stopped|Done)/.test(document.getElementById('train-status').textContent),
      null, { timeout: 120_000 });
    const status = await page.locator('#train-status').textContent();
    assert(status.startsWith('Stopped'), `after Stop the page says "${status}"`);
    const [download] = await Promise.all([page.waitForEvent('download'), page.click('#download')]);
    const file = join(testDir, 'stopped.safetensors');
    await download.saveAs(file);
    await page.close();
    const evaluated = nativeEval(file, 100);
    return `"${status}"; the main thread answered in ${answered} ms while training; the network downloaded, ` +
      `native eval ${evaluated.correct}/100`;
  },

  async errors() {
    writeFileSync(join(testDir, 'bad.safetensors'), 'not a checkpoint');
    const { title, shown } = await runPage('run=eval&checkpoint=test/bad.safetensors', 2);
    assert(title === 'failed', 'a bad checkpoint was accepted');
    assert(/not a safetensors file/.test(shown), `the page shows "${shown}" for a bad checkpoint`);
    // A browser without WebGPU.
    const plain = await chromium.launch({ executablePath: CHROMIUM, args: [...BASE_FLAGS, '--disable-blink-features=WebGPU'] });
    const page = await plain.newPage();
    await page.goto(`${origin}/`);
    await page.waitForFunction(() => !document.getElementById('error').hidden, null, { timeout: 60_000 });
    const noGpu = await page.locator('#error').textContent();
    await plain.close();
    assert(/no WebGPU|offers no adapter/.test(noGpu), `a browser without WebGPU shows "${noGpu}"`);
    return `a bad checkpoint is shown as "${shown}"; no WebGPU as "${noGpu}"`;
  },
};

// The training run of the train case. The page's full run, `images=2000&epochs=3&batch=50&seed=1&test_images=1000`,
// takes about 14 minutes on SwiftShader with 2 cores (--train-run gives it); CI trains this smaller run:
// 40 steps, about 6 s each there whatever the batch (SwiftShader pays per workgroup, and most launches
// have a fixed grid), to about 51% on the native CPU backend, where the accuracy still climbs fast.
const TRAIN_RUN = args['train-run'] || 'images=2000&epochs=1&batch=50&seed=1&test_images=500';

/** A greyscale PNG of `width` x `height` from filtered scanlines (a 0 byte, then the row). */
function png(width, height, scanlines) {
  const crcTable = Array.from({ length: 256 }, (_, n) => {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    return c >>> 0;
  });
  const crc = (bytes) => {
    let c = 0xffffffff;
    for (const b of bytes) c = crcTable[(c ^ b) & 0xff] ^ (c >>> 8);
    return (c ^ 0xffffffff) >>> 0;
  };
  const chunk = (type, data) => {
    const body = Buffer.concat([Buffer.from(type), data]);
    const out = Buffer.alloc(8 + data.length + 4);
    out.writeUInt32BE(data.length, 0);
    body.copy(out, 4);
    out.writeUInt32BE(crc(body), 8 + data.length);
    return out;
  };
  const header = Buffer.alloc(13);
  header.writeUInt32BE(width, 0);
  header.writeUInt32BE(height, 4);
  header[8] = 8; // bit depth; colour type 0 (grey), default compression, filter, no interlace
  return Buffer.concat([Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]), chunk('IHDR', header),
    chunk('IDAT', deflateSync(scanlines)), chunk('IEND', Buffer.alloc(0))]);
}

// Native eval runs on the CPU and the page on the GPU: at most this many of 1,000 predictions may
// differ, where two classes' logits are within rounding of each other.
const ROUNDING_IMAGES = 1;

// Pen strokes on the 280x280 pad: a 1 (one stroke down) and a 7 (across, then down to the left).
const DRAWINGS = [
  [1, [[140, 50], [140, 140], [140, 230]]],
  [7, [[80, 60], [150, 60], [210, 60], [180, 140], [150, 230]]],
];

let failures = 0;
for (const [name, test] of Object.entries(cases)) {
  if (only && !only.includes(name)) continue;
  const started = Date.now();
  try {
    const what = await test();
    console.log(`ok   ${name} (${((Date.now() - started) / 1000).toFixed(0)} s): ${what}`);
  } catch (e) {
    failures++;
    console.log(`FAIL ${name} (${((Date.now() - started) / 1000).toFixed(0)} s): ${e.message}`);
    if (name === 'webgpu') break;
  }
}
await browser.close();
server.close();
if (failures) fail(`${failures} case(s) failed`);
console.log('browser test: all cases passed');
