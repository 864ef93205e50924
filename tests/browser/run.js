#!/usr/bin/env node
// Browser phones for tests/browser_phones.rs: two headless Chromium browsers, each with a
// JsSIP phone (phone.html) registered over WebSocket to the Strowger server under test,
// calling each other through it.
//
// Protocol (JSON lines):
//   1. Serves the page on http://127.0.0.1:<random port> and prints
//      {"event":"origin","origin":"http://127.0.0.1:PORT"} (the server's ws.allowed_origins).
//   2. Reads one line from stdin: {"ws": "wss://127.0.0.1:PORT", "domain": "strowger.test",
//      "cert": "/path/leaf.pem" or null, "workdir": "/tmp/...", "deadline_ms": 45000,
//      "phones": ["alice", "bob"],
//      "calls": [{"from": "alice", "to": "bob", "hangup": "caller" | "callee"}, ...]}
//   3. Prints every phone event ({"phone": "alice", "call": 1, "event": "confirmed", ...}),
//      a "media" event per phone and call, and at the end {"event":"done"} (exit 0) or
//      {"event":"error","message":...} (exit 1; 2 when the deadline passed).
//
// Each Chromium is spawned here, in this process's process group (the Rust test kills the
// group), with a profile under `workdir`; nothing listens or connects beyond 127.0.0.1.
'use strict';

const childProcess = require('child_process');
const crypto = require('crypto');
const fs = require('fs');
const http = require('http');
const path = require('path');
const readline = require('readline');

const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const HERE = __dirname;
const started = Date.now();

function emit(obj) {
  process.stdout.write(`${JSON.stringify(Object.assign({ t: Date.now() - started }, obj))}\n`);
}

// --- A small CommonJS bundler: JsSIP's npm package ships CommonJS modules only ----------

function bundle(entry) {
  const files = [];
  const ids = new Map();
  const isFile = (p) => fs.existsSync(p) && fs.statSync(p).isFile();
  const resolveFile = (p) => {
    for (const c of [p, `${p}.js`, `${p}.json`, path.join(p, 'index.js')]) {
      if (isFile(c)) return c;
    }
    throw new Error(`cannot resolve ${p}`);
  };
  const resolvePackage = (name, fromDir) => {
    for (let dir = fromDir; ; dir = path.dirname(dir)) {
      const pkgDir = path.join(dir, 'node_modules', name);
      if (fs.existsSync(path.join(pkgDir, 'package.json'))) {
        const pkg = JSON.parse(fs.readFileSync(path.join(pkgDir, 'package.json'), 'utf8'));
        const main = typeof pkg.browser === 'string' ? pkg.browser : pkg.main || 'index.js';
        return resolveFile(path.join(pkgDir, main));
      }
      if (path.dirname(dir) === dir) throw new Error(`cannot find package ${name}`);
    }
  };
  const add = (file) => {
    if (ids.has(file)) return ids.get(file);
    const id = files.length;
    ids.set(file, id);
    files.push(null);
    let src = fs.readFileSync(file, 'utf8');
    if (file.endsWith('.json')) src = `module.exports = ${src};`;
    const deps = {};
    const dir = path.dirname(file);
    for (const m of src.matchAll(/require\(\s*['"]([^'"]+)['"]\s*\)/g)) {
      const spec = m[1];
      if (spec in deps) continue;
      const target = spec.startsWith('.') ? resolveFile(path.join(dir, spec)) : resolvePackage(spec, dir);
      deps[spec] = add(target);
    }
    files[id] = `[function (require, module, exports) {\n${src}\n}, ${JSON.stringify(deps)}]`;
    return id;
  };
  add(entry);
  return `(function () {
var defs = [\n${files.join(',\n')}\n];
var cache = {};
function load(id) {
  if (cache[id]) return cache[id].exports;
  var module = (cache[id] = { exports: {} });
  var deps = defs[id][1];
  defs[id][0](function (spec) {
    if (!(spec in deps)) throw new Error('not bundled: ' + spec);
    return load(deps[spec]);
  }, module, module.exports);
  return module.exports;
}
window.JsSIP = load(0);
})();
`;
}

// --- The page server ----------------------------------------------------------------------

function servePage(jssip) {
  const files = {
    '/': ['text/html', fs.readFileSync(path.join(HERE, 'phone.html'))],
    '/phone.html': ['text/html', fs.readFileSync(path.join(HERE, 'phone.html'))],
    '/phone.js': ['text/javascript', fs.readFileSync(path.join(HERE, 'phone.js'))],
    '/jssip.js': ['text/javascript', Buffer.from(jssip)],
  };
  const server = http.createServer((req, res) => {
    const f = files[req.url.split('?')[0]];
    if (req.url === '/favicon.ico') {
      res.writeHead(204);
      res.end();
      return;
    }
    if (!f) {
      res.writeHead(404, { 'Content-Type': 'text/plain' });
      res.end('not found');
      return;
    }
    res.writeHead(200, { 'Content-Type': f[0], 'Cache-Control': 'no-store' });
    res.end(f[1]);
  });
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve(server));
  });
}

// --- Chromium -----------------------------------------------------------------------------

const children = new Set();

function spkiHash(certFile) {
  const cert = new crypto.X509Certificate(fs.readFileSync(certFile));
  const der = cert.publicKey.export({ type: 'spki', format: 'der' });
  return crypto.createHash('sha256').update(der).digest('base64');
}

function chromiumArgs(profile, cert) {
  const args = [
    '--headless',
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--no-default-browser-check',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
    '--disable-default-apps',
    '--disable-extensions',
    '--disable-domain-reliability',
    '--disable-client-side-phishing-detection',
    '--disable-breakpad',
    '--disable-field-trial-config',
    '--no-pings',
    '--no-proxy-server',
    '--metrics-recording-only',
    '--password-store=basic',
    '--mute-audio',
    '--autoplay-policy=no-user-gesture-required',
    // Names never resolve (a stray lookup fails here instead of going out).
    '--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1',
    '--use-fake-device-for-media-stream',
    '--use-fake-ui-for-media-stream',
    // WebRTC: loopback host candidates are gathered, and host candidates are plain
    // addresses rather than mDNS names (resolving those would multicast on the LAN).
    '--allow-loopback-in-peer-connection',
    '--disable-features=WebRtcHideLocalIpsWithMdns,MediaRouter,Translate,OptimizationHints',
    '--remote-debugging-address=127.0.0.1',
    '--remote-debugging-port=0',
    `--user-data-dir=${profile}`,
  ];
  // Trust exactly the test server's key for wss://; nothing else is fetched over TLS.
  args.push(cert ? `--ignore-certificate-errors-spki-list=${spkiHash(cert)}` : '--ignore-certificate-errors');
  args.push('about:blank');
  return args;
}

// Spawns Chromium (in our process group) and resolves with its DevTools WebSocket URL.
function launchChromium(name, workdir, cert) {
  const profile = path.join(workdir, `profile-${name}`);
  fs.mkdirSync(profile, { recursive: true });
  const log = fs.createWriteStream(path.join(workdir, `chromium-${name}.log`));
  const child = childProcess.spawn(CHROMIUM, chromiumArgs(profile, cert), {
    stdio: ['ignore', 'pipe', 'pipe'],
    // Everything Chromium writes stays under workdir (which the test removes).
    env: Object.assign({}, process.env, {
      HOME: workdir,
      XDG_CONFIG_HOME: path.join(workdir, 'config'),
      XDG_CACHE_HOME: path.join(workdir, 'cache'),
    }),
  });
  children.add(child);
  child.on('exit', () => children.delete(child));
  emit({ phone: name, event: 'chromium', pid: child.pid });
  child.stdout.pipe(log);
  return new Promise((resolve, reject) => {
    let buf = '';
    child.stderr.on('data', (d) => {
      log.write(d);
      if (buf === null) return;
      buf += d.toString();
      const m = /DevTools listening on (ws:\/\/\S+)/.exec(buf);
      if (m) {
        buf = null;
        resolve({ child, endpoint: m[1] });
      }
    });
    child.on('exit', (code, signal) => {
      if (buf !== null) reject(new Error(`chromium for ${name} exited (${code ?? signal}) before DevTools was up; see ${workdir}/chromium-${name}.log`));
    });
    child.on('error', reject);
  });
}

function killChildren() {
  for (const child of children) {
    try {
      child.kill('SIGKILL');
    } catch (_) {
      // already gone
    }
  }
}
process.on('exit', killChildren);

// --- Phones -------------------------------------------------------------------------------

const log = []; // every event: { seq, phone, call, event, ... }
const waiters = new Set();
let currentCall = 0;

function record(phone, e) {
  const entry = Object.assign({ seq: log.length, phone, call: currentCall }, e);
  log.push(entry);
  const { seq, ...shown } = entry;
  emit(shown);
  for (const w of waiters) {
    if (w.match(entry)) {
      waiters.delete(w);
      w.resolve(entry);
    }
  }
}

// The first event from `since` on that `match`es, or an error after `ms`.
function waitFor(what, since, match, ms) {
  const found = log.slice(since).find(match);
  if (found) return Promise.resolve(found);
  return new Promise((resolve, reject) => {
    const w = { match, resolve };
    waiters.add(w);
    setTimeout(() => {
      if (waiters.delete(w)) reject(new Error(`timed out after ${ms} ms waiting for ${what}`));
    }, ms);
  });
}

// A failure event from `since` on, for any phone: turns a wait into an early error.
function failureSince(since) {
  return waitFor('a failure', since, (e) => e.event === 'failed' || e.event === 'registrationFailed', 1e9).then((e) => {
    throw new Error(`${e.phone}: ${e.event} (${e.cause || ''} ${e.status || ''})`);
  });
}

async function openPhone(pw, name, origin, workdir, cert) {
  const { endpoint } = await launchChromium(name, workdir, cert);
  const browser = await pw.chromium.connectOverCDP(endpoint, { timeout: 15000 });
  const context = browser.contexts()[0] || (await browser.newContext());
  const page = await context.newPage();
  page.on('console', (m) => {
    if (m.type() === 'error' || m.type() === 'warning') record(name, { event: 'console', level: m.type(), text: m.text() });
  });
  page.on('pageerror', (err) => record(name, { event: 'pageerror', text: String(err) }));
  await page.exposeFunction('report', (e) => record(name, e));
  const since = log.length;
  await page.goto(`${origin}/phone.html`, { timeout: 10000 });
  await waitFor(`${name}'s page`, since, (e) => e.phone === name && e.event === 'loaded', 10000);
  return { name, browser, page };
}

async function media(phone) {
  return phone.page.evaluate(() => window.phone.media());
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// Waits until both ends have ICE connected and audio arriving, then reports each side.
async function waitMedia(a, b, ms) {
  const until = Date.now() + ms;
  let last = [];
  for (;;) {
    last = await Promise.all([media(a), media(b)]);
    const ok = last.every(
      (m) => m && (m.ice === 'connected' || m.ice === 'completed') && m.pair && m.packetsReceived >= 25,
    );
    if (ok) break;
    if (Date.now() > until) {
      throw new Error(`media did not flow within ${ms} ms: ${JSON.stringify(last)}`);
    }
    await sleep(200);
  }
  return last;
}

async function runCall(phones, domain, spec, index) {
  currentCall = index;
  const caller = phones[spec.from];
  const callee = phones[spec.to];
  const since = log.length;
  const failure = failureSince(since);
  const race = (p) => Promise.race([p, failure]);
  const t0 = Date.now();
  await caller.page.evaluate((target) => window.phone.call(target), `sip:${spec.to}@${domain}`);
  await race(waitFor(`${callee.name}'s incoming call`, since, (e) => e.phone === callee.name && e.event === 'incoming', 10000));
  const tRing = Date.now();
  await callee.page.evaluate(() => window.phone.answer());
  await race(Promise.all([caller, callee].map((p) => waitFor(`${p.name}'s confirmed`, since, (e) => e.phone === p.name && e.event === 'confirmed', 10000))));
  const tConfirmed = Date.now();
  const [mCaller, mCallee] = await race(waitMedia(caller, callee, 10000));
  const tMedia = Date.now();
  record(caller.name, Object.assign({ event: 'media' }, mCaller));
  record(callee.name, Object.assign({ event: 'media' }, mCallee));
  // A little more talk, so both directions carry audio for a while.
  await sleep(500);
  const hanger = spec.hangup === 'callee' ? callee : caller;
  const tHang = Date.now();
  await hanger.page.evaluate(() => window.phone.hangup());
  await race(Promise.all([caller, callee].map((p) => waitFor(`${p.name}'s ended`, since, (e) => e.phone === p.name && e.event === 'ended', 10000))));
  const tEnded = Date.now();
  emit({
    event: 'call',
    call: index,
    from: spec.from,
    to: spec.to,
    hangup: spec.hangup,
    ms_to_ring: tRing - t0,
    ms_to_confirmed: tConfirmed - t0,
    ms_to_media: tMedia - t0,
    ms_to_ended: tEnded - tHang,
  });
  failure.catch(() => {});
}

async function main() {
  const jssip = bundle(require.resolve('jssip'));
  const server = await servePage(jssip);
  const origin = `http://127.0.0.1:${server.address().port}`;
  emit({ event: 'origin', origin });

  const rl = readline.createInterface({ input: process.stdin });
  const line = await new Promise((resolve, reject) => {
    rl.once('line', resolve);
    rl.once('close', () => reject(new Error('stdin closed before the configuration line')));
  });
  const cfg = JSON.parse(line);
  const deadline = setTimeout(() => {
    emit({ event: 'error', message: `deadline of ${cfg.deadline_ms} ms passed` });
    killChildren();
    process.exit(2);
  }, cfg.deadline_ms || 45000);

  const pw = require('playwright-core');
  const workdir = cfg.workdir || fs.mkdtempSync(path.join(require('os').tmpdir(), 'strowger-browser-'));
  const names = cfg.phones || ['alice', 'bob'];
  const list = await Promise.all(names.map((n) => openPhone(pw, n, origin, workdir, cfg.cert)));
  const phones = Object.fromEntries(list.map((p) => [p.name, p]));
  emit({ event: 'browsers', version: list[0].browser.version(), ms: Date.now() - started });

  const since = log.length;
  const failure = failureSince(since);
  await Promise.race([
    Promise.all(list.map((p) => p.page.evaluate(([ws, uri]) => window.phone.start(ws, uri), [cfg.ws, `sip:${p.name}@${cfg.domain}`]))),
    failure,
    sleep(10000).then(() => {
      throw new Error('the phones did not register within 10 s');
    }),
  ]);
  failure.catch(() => {});

  let index = 0;
  for (const spec of cfg.calls || []) {
    index += 1;
    await runCall(phones, cfg.domain, spec, index);
  }
  currentCall = 0;

  // Unregister (best effort), then close the browsers.
  const unreg = log.length;
  await Promise.all(list.map((p) => p.page.evaluate(() => window.phone.stop())));
  await Promise.all(
    list.map((p) =>
      waitFor(`${p.name} unregistered`, unreg, (e) => e.phone === p.name && e.event === 'unregistered', 3000).catch(() => {}),
    ),
  );
  // Close each browser (CDP Browser.close: over connectOverCDP, browser.close() would only
  // disconnect), then wait a little for the processes to go; what is left is killed.
  const exits = [...children].map((child) => Promise.race([new Promise((r) => child.once('exit', r)), sleep(3000)]));
  await Promise.all(
    list.map(async (p) => {
      try {
        const cdp = await p.browser.newBrowserCDPSession();
        await cdp.send('Browser.close');
      } catch (_) {
        // gone already
      }
    }),
  );
  await Promise.all(exits);
  clearTimeout(deadline);
  server.close();
  emit({ event: 'done', ms: Date.now() - started });
  killChildren();
  process.exit(0);
}

main().catch((err) => {
  emit({ event: 'error', message: String(err && err.stack ? err.stack : err) });
  killChildren();
  process.exit(1);
});
