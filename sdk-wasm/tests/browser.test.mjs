// The browser SDK in real headless Chromium (Debian's, driven by playwright-core),
// against the real kith-collector binary, both started here on 127.0.0.1 and port 0.
// Run by tests/run.sh after sdk-wasm/build.sh: `node --test sdk-wasm/tests/`.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, execFileSync } from 'node:child_process';
import { createServer } from 'node:http';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { createInterface } from 'node:readline';
import { tmpdir } from 'node:os';
import { extname, join, normalize } from 'node:path';
import { gzipSync } from 'node:zlib';
import { chromium } from 'playwright-core';

const REPO = new URL('../../', import.meta.url).pathname;
const WRITE_KEY = 'browser-write-key';
const ADMIN_TOKEN = 'browser-admin-token';
const SIZE_LIMIT = 64 * 1024;
const SIZE_TARGET = 45 * 1024;

async function startCollector(dataDir, listen = '127.0.0.1:0') {
  const child = spawn(join(REPO, 'target/debug/kith-collector'), [
    '--listen', listen, '--data-dir', dataDir, '--write-key', WRITE_KEY, '--admin-token', ADMIN_TOKEN,
    '--identity',
  ], { env: { ...process.env, RUST_LOG: 'warn' }, stdio: ['ignore', 'pipe', 'inherit'] });
  const exited = new Promise((resolve) => child.once('exit', resolve));
  const lines = createInterface({ input: child.stdout });
  for await (const line of lines) {
    if (line.startsWith('listening on ')) {
      const url = line.slice('listening on '.length).trim();
      return {
        url,
        port: Number(new URL(url).port),
        async stop() {
          child.kill('SIGKILL');
          await exited;
        },
      };
    }
  }
  throw new Error('the collector did not start');
}

const TYPES = { '.html': 'text/html', '.js': 'text/javascript', '.mjs': 'text/javascript', '.wasm': 'application/wasm' };

/** Serves the repository (the example page and the built package) on 127.0.0.1:0. */
async function startSite() {
  const server = createServer(async (request, response) => {
    const path = normalize(decodeURIComponent(new URL(request.url, 'http://x').pathname));
    try {
      const body = await readFile(join(REPO, path));
      response.writeHead(200, { 'content-type': TYPES[extname(path)] ?? 'application/octet-stream' });
      response.end(body);
    } catch {
      response.writeHead(404).end();
    }
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  return { url: `http://127.0.0.1:${server.address().port}`, close: () => new Promise((r) => server.close(r)) };
}

/** A fresh browser profile: its own localStorage, so tests do not share queues. */
async function launchBrowser() {
  const profile = await mkdtemp(join(tmpdir(), 'kith-chromium-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: '/usr/bin/chromium',
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  return {
    context,
    async close() {
      await context.close();
      await rm(profile, { recursive: true, force: true });
    },
  };
}

async function admin(collector, path) {
  const response = await fetch(collector.url + path, { headers: { authorization: `Bearer ${ADMIN_TOKEN}` } });
  return response.json();
}

async function waitFor(what, check, timeoutMs = 60_000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

/** Every stored event (message), once the pipeline has caught up. */
async function storedEvents(collector) {
  await waitFor('the pipeline', async () => (await admin(collector, '/v1/stats')).pending === 0);
  const events = [];
  let path = '/v1/events?limit=1000';
  for (;;) {
    const page = await admin(collector, path);
    events.push(...page.events.map((e) => e.message));
    if (page.next_before == null) return events;
    path = `/v1/events?limit=1000&before=${page.next_before}`;
  }
}

async function waitForIds(collector, ids) {
  return waitFor(`${ids.length} events at the collector`, async () => {
    const events = await storedEvents(collector);
    const seen = new Map();
    for (const e of events) seen.set(e.messageId, (seen.get(e.messageId) ?? 0) + 1);
    return ids.every((id) => seen.has(id)) ? { events, seen } : null;
  });
}

async function openExample(context, site, endpoint, params = {}) {
  const page = await context.newPage();
  const query = new URLSearchParams({ endpoint, writeKey: WRITE_KEY, ...params });
  await page.goto(`${site.url}/examples/web/index.html?${query}`);
  await page.waitForFunction(() => window.kithReady === true);
  return page;
}

async function withSetup(body) {
  const dataDir = await mkdtemp(join(tmpdir(), 'kith-collector-'));
  const collector = await startCollector(dataDir);
  const site = await startSite();
  const browser = await launchBrowser();
  try {
    await body({ collector, site, browser, dataDir });
  } finally {
    await browser.close();
    await site.close();
    await collector.stop();
    await rm(dataDir, { recursive: true, force: true });
  }
}

test('the example page sends events the collector stores, with page context', () =>
  withSetup(async ({ collector, site, browser }) => {
    const page = await openExample(browser.context, site, collector.url, { flushIntervalMs: '100' });
    // What the engine's JSON writer must get right: escapes, Unicode, floats (written by
    // the page's JSON.stringify), integers, nesting.
    const properties = {
      total: 42.5, items: [{ sku: 'a' }], small: 0.1, tiny: -2.5e-7, huge: 1e21, big: 9007199254740991,
      text: 'quote " backslash \\ line\nbreak tab\t bell \u0007 é 日本 🎉', flags: [true, false],
      nested: { empty: {}, list: [] },
    };
    const ids = await page.evaluate((properties) => [
      window.kith.track('Order Completed', properties),
      window.kith.identify('web-user', { email: 'ann@example.com' }),
    ], properties);
    const anonymousId = await page.evaluate(() => window.kith.anonymousId);
    const { events, seen } = await waitForIds(collector, ids);
    assert.ok(ids.every((id) => seen.get(id) === 1));
    const order = events.find((e) => e.messageId === ids[0]);
    assert.equal(order.event, 'Order Completed');
    assert.deepEqual(order.properties, properties);
    assert.equal(order.anonymousId, anonymousId);
    assert.equal(order.context.page.path, '/examples/web/index.html');
    assert.match(order.context.page.url, /index\.html\?endpoint=/);
    assert.equal(order.context.page.title, 'Kith browser SDK example');
    assert.match(order.context.userAgent, /Chrome/);
    assert.ok(order.context.locale);
    assert.ok(order.context.timezone);
    assert.ok(order.context.screen.width > 0);
    assert.equal(order.context.library.name, 'kith-sdk-core');
    const autoPage = await waitFor('the automatic page call', async () =>
      (await storedEvents(collector)).find((e) => e.type === 'page' && e.anonymousId === anonymousId));
    assert.equal(autoPage.properties.path, '/examples/web/index.html');
    const identify = events.find((e) => e.messageId === ids[1]);
    assert.equal(identify.userId, 'web-user');
    assert.equal(identify.traits.email, 'ann@example.com');
  }));

test('offline, reload, online: every event arrives exactly once', () =>
  withSetup(async ({ collector, site, browser, dataDir }) => {
    const port = collector.port;
    await collector.stop();
    const page = await openExample(browser.context, site, `http://127.0.0.1:${port}`, { autoPage: 'false', flushIntervalMs: '100' });
    const ids = await page.evaluate(() => Array.from({ length: 5 }, (_, i) => window.kith.track('Offline', { i })));
    await page.waitForFunction(() => window.kith.stats().failures > 0);
    await page.reload();
    await page.waitForFunction(() => window.kithReady === true);
    const back = await startCollector(dataDir, `127.0.0.1:${port}`);
    try {
      const { seen } = await waitForIds(back, ids);
      for (const id of ids) assert.equal(seen.get(id), 1, `${id} stored once`);
      await page.waitForFunction(() => window.kith.stats().pending === 0);
    } finally {
      await back.stop();
    }
  }));

test('a tab closed right after track() still delivers the event', () =>
  withSetup(async ({ collector, site, browser }) => {
    const page = await openExample(browser.context, site, collector.url, { autoPage: 'false', flushIntervalMs: '600000' });
    const id = await page.evaluate(() => window.kith.track('Closing', { now: true }));
    await page.close({ runBeforeUnload: true });
    const { seen } = await waitForIds(collector, [id]);
    assert.equal(seen.get(id), 1);
  }));

test('two tabs capturing at once: every event delivered exactly once, none sent twice', () =>
  withSetup(async ({ collector, site, browser }) => {
    const params = { autoPage: 'false', flushIntervalMs: '50' };
    const [a, b] = [await openExample(browser.context, site, collector.url, params),
      await openExample(browser.context, site, collector.url, params)];
    const capture = (page, tab) => page.evaluate(async (tab) => {
      const ids = [];
      for (let i = 0; i < 60; i++) {
        ids.push(window.kith.track('Two Tabs', { tab, i }));
        if (i % 10 === 0) await new Promise((resolve) => setTimeout(resolve, 5));
      }
      return ids;
    }, tab);
    const ids = (await Promise.all([capture(a, 'a'), capture(b, 'b')])).flat();
    const { seen } = await waitForIds(collector, ids);
    for (const id of ids) assert.equal(seen.get(id), 1);
    const stats = await admin(collector, '/v1/stats');
    assert.equal(stats.deduplicated, 0, 'no event was sent twice');
    assert.equal(stats.accepted, 120);
  }));

test('bad input throws a clear error and leaves the queue untouched', () =>
  withSetup(async ({ collector, site, browser }) => {
    const page = await openExample(browser.context, site, collector.url, { autoPage: 'false', flushIntervalMs: '600000' });
    const outcome = await page.evaluate(() => {
      const errors = {};
      const attempt = (name, call) => {
        try { call(); errors[name] = null; } catch (e) { errors[name] = String(e.message ?? e); }
      };
      const cyclic = {}; cyclic.self = cyclic;
      attempt('emptyName', () => window.kith.track(''));
      attempt('cyclic', () => window.kith.track('Cyclic', cyclic));
      attempt('bigint', () => window.kith.track('BigInt', { n: 10n }));
      attempt('huge', () => window.kith.track('Huge', { blob: 'x'.repeat(40_000) }));
      attempt('group', () => window.kith.group('', {}));
      attempt('push', () => window.kith.registerPushSubscription({ endpoint: 'https://push.example' }));
      return { errors, stats: window.kith.stats() };
    });
    assert.match(outcome.errors.emptyName, /missing_event/);
    assert.match(outcome.errors.cyclic, /cannot be serialised/);
    assert.match(outcome.errors.bigint, /cannot be serialised/);
    assert.match(outcome.errors.huge, /at most 32768/);
    assert.match(outcome.errors.group, /missing_group_id/);
    assert.match(outcome.errors.push, /keys\.p256dh/);
    assert.equal(outcome.stats.captured, 0);
    assert.equal(outcome.stats.pending, 0);
  }));

test('a Web Push subscription reaches the collector and the profile', () =>
  withSetup(async ({ collector, site, browser }) => {
    const page = await openExample(browser.context, site, collector.url, { autoPage: 'false', flushIntervalMs: '100' });
    const id = await page.evaluate(() => window.kith.registerPushSubscription({
      endpoint: 'https://push.example/send/abc', expirationTime: null, keys: { p256dh: 'BPk', auth: 'c2VjcmV0' },
    }));
    const { events } = await waitForIds(collector, [id]);
    const identify = events.find((e) => e.messageId === id);
    assert.equal(identify.type, 'identify');
    assert.equal(identify.context.device.tokenProvider, 'webpush');
    assert.deepEqual(JSON.parse(identify.context.device.token),
      { endpoint: 'https://push.example/send/abc', keys: { p256dh: 'BPk', auth: 'c2VjcmV0' } });
    const profile = await admin(collector, `/v1/profiles?identifier=anonymous_id:${identify.anonymousId}`);
    const { tokens } = await admin(collector, `/v1/profiles/${profile.id}/push-tokens`);
    assert.deepEqual(tokens.map((t) => [t.provider, JSON.parse(t.token).endpoint]),
      [['webpush', 'https://push.example/send/abc']]);
  }));

test('the shipped types check against a TypeScript usage example, with no any', async () => {
  execFileSync(join(REPO, 'sdk-wasm/tests/node_modules/.bin/tsc'), ['-p', join(REPO, 'sdk-wasm/tests/tsconfig.json')], { stdio: 'inherit' });
  const types = await readFile(join(REPO, 'sdk-wasm/pkg/kith.d.ts'), 'utf8');
  const publicPart = types.split('export type InitInput')[0];
  assert.doesNotMatch(publicPart, /\bany\b/, 'no `any` in the public surface');
});

// Measured and printed on every run; over the 64 KiB budget fails the build.
test('the package stays small (gzipped wasm + JS)', async () => {
  const wasm = await readFile(join(REPO, 'sdk-wasm/pkg/kith_bg.wasm'));
  const js = await readFile(join(REPO, 'sdk-wasm/pkg/kith.js'));
  const size = gzipSync(wasm, { level: 9 }).length + gzipSync(js, { level: 9 }).length;
  console.log(`# package size: ${(size / 1024).toFixed(1)} KiB gzipped (limit 64, target ${SIZE_TARGET / 1024})`);
  assert.ok(size <= SIZE_LIMIT, `${size} bytes is over the 64 KiB limit`);
});

test('time per track() over 10,000 events, against a localStorage baseline', () =>
  withSetup(async ({ collector, site, browser }) => {
    const page = await openExample(browser.context, site, collector.url, { autoPage: 'false', flushIntervalMs: '600000' });
    const result = await page.evaluate(() => {
      const properties = { product_id: 'sku-42', name: 'Monopoly', price: 18.99, quantity: 1 };
      const n = 10_000;
      let start = performance.now();
      for (let i = 0; i < n; i++) {
        localStorage.setItem(`baseline:${i % 1000}`, JSON.stringify({ type: 'track', event: 'Product Added', properties, i }));
      }
      const baseline = (performance.now() - start) / n;
      for (let i = 0; i < 1000; i++) localStorage.removeItem(`baseline:${i}`);
      start = performance.now();
      for (let i = 0; i < n; i++) window.kith.track('Product Added', properties);
      const track = (performance.now() - start) / n;
      return { baseline, track, stats: window.kith.stats() };
    });
    console.log(`# track(): ${(result.track * 1000).toFixed(1)} µs per call; baseline (JSON.stringify + localStorage.setItem): ${(result.baseline * 1000).toFixed(1)} µs; ratio ${(result.track / result.baseline).toFixed(1)}`);
    assert.equal(result.stats.captured, 10_000);
  }));
