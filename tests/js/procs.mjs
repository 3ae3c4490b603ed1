// Small process helpers shared by browser-e2e.mjs and demo.mjs: free ports,
// child processes with their output captured to log files, waiting for a log
// line or an HTTP status, and stopping everything that was started.
//
// Only processes started through spawnLogged() are ever signalled, by pid.

import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const JS_DIR = path.dirname(fileURLToPath(import.meta.url));
export const REPO_ROOT = path.resolve(JS_DIR, '..', '..');

const started = new Set();

/** A port that was free on 127.0.0.1 a moment ago (bind port 0, close, reuse). */
export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

/** Several distinct free ports. */
export async function freePorts(n) {
  const ports = new Set();
  while (ports.size < n) ports.add(await freePort());
  return [...ports];
}

export const sleep = (ms) => new Promise((r) => { setTimeout(r, ms); });

/**
 * The environment for a gateway process: this process's, without PORTCULLIS_BIN (the
 * launcher's own setting, which names no configuration key and would only make the gateway
 * warn about an unknown PORTCULLIS_* variable), plus `extra`. Other PORTCULLIS_* variables
 * pass on: they are the user's overrides.
 */
export function gatewayEnv(extra = {}) {
  // spawnLogged() merges this into process.env: an undefined value leaves a variable out.
  return { PORTCULLIS_BIN: undefined, ...extra };
}

/**
 * Spawn `cmd args` with stdout+stderr appended to `<logDir>/<name>.log`.
 * Returns a handle:
 *   { name, child, pid, logFile, lines, exited (promise of {code, signal}),
 *     exitInfo (null while running), onLine(fn), waitForLine(re, ms), tail(n) }
 */
export function spawnLogged(name, cmd, args, { env, cwd = REPO_ROOT, logDir, echo = false } = {}) {
  if (!logDir) throw new Error('spawnLogged: logDir is required');
  const logFile = path.join(logDir, `${name}.log`);
  const log = fs.createWriteStream(logFile, { flags: 'a' });
  const child = spawn(cmd, args, {
    cwd,
    env: { ...process.env, ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const handle = {
    name,
    child,
    pid: child.pid,
    logFile,
    lines: [],
    exitInfo: null,
    listeners: new Set(),
    onLine(fn) { this.listeners.add(fn); return () => this.listeners.delete(fn); },
    waitForLine(re, ms = 30_000) { return waitForLine(this, re, ms); },
    tail(n = 30) { return this.lines.slice(-n).join('\n'); },
  };
  started.add(handle);

  const feed = (stream, tag) => {
    let buf = '';
    stream.setEncoding('utf8');
    stream.on('data', (chunk) => {
      log.write(chunk);
      buf += chunk;
      let i;
      while ((i = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, i).replace(/\r$/, '');
        buf = buf.slice(i + 1);
        handle.lines.push(line);
        if (handle.lines.length > 5000) handle.lines.splice(0, 1000);
        if (echo) process.stdout.write(`[${name}] ${line}\n`);
        for (const fn of handle.listeners) fn(line, tag);
      }
    });
    stream.on('end', () => {
      if (buf) {
        handle.lines.push(buf);
        for (const fn of handle.listeners) fn(buf, tag);
        buf = '';
      }
    });
  };
  feed(child.stdout, '');
  feed(child.stderr, ':err');

  handle.exited = new Promise((resolve) => {
    child.on('error', (err) => {
      handle.lines.push(`spawn error: ${err.message}`);
      handle.exitInfo = { code: null, signal: null, error: err };
      started.delete(handle);
      resolve(handle.exitInfo);
    });
    child.on('exit', (code, signal) => {
      handle.exitInfo = { code, signal };
      started.delete(handle);
      // let the pipes drain before closing the log
      setTimeout(() => log.end(), 50);
      resolve(handle.exitInfo);
    });
  });
  return handle;
}

/**
 * spawnLogged(), then wait for the process' `ready` line. A start that prints none within `ms`
 * is reported (with its threads' states, for the record), killed and made again, up to `tries`
 * starts in all; a process that exits is not retried. Rarely, on a busy CI machine, the IdP has
 * printed its first line and then nothing for over 30 s (cause not found: it never happened
 * where it could be looked at); such a start costs a retry rather than the run.
 */
export async function spawnReady(name, cmd, args, opts, { ready = /^READY /, ms = 20_000, tries = 3 } = {}) {
  for (let attempt = 1; ; attempt += 1) {
    const h = spawnLogged(name, cmd, args, opts);
    try {
      await h.waitForLine(ready, ms);
      return h;
    } catch (err) {
      if (h.exitInfo || attempt >= tries) throw err;
      process.stderr.write(`${name}: no line matching ${ready} within ${ms} ms (start ${attempt} of ${tries}; `
        + `threads: ${threadStates(h.pid)}); starting it again\n`);
      h.child.kill('SIGKILL');
      await h.exited;
    }
  }
}

/** "name state wchan" of each thread of a running process, from /proc (Linux). */
function threadStates(pid) {
  try {
    const dir = `/proc/${pid}/task`;
    return fs.readdirSync(dir).map((t) => {
      const stat = fs.readFileSync(`${dir}/${t}/stat`, 'utf8');
      const comm = stat.slice(stat.indexOf('(') + 1, stat.lastIndexOf(')'));
      const state = stat.slice(stat.lastIndexOf(')') + 2).split(' ')[0];
      let wchan = '';
      try { wchan = fs.readFileSync(`${dir}/${t}/wchan`, 'utf8'); } catch { /* not readable */ }
      return `${comm} ${state}${wchan && wchan !== '0' ? ` ${wchan}` : ''}`;
    }).join(', ');
  } catch (err) {
    return `unknown (${err.message})`;
  }
}

function describeExit(h) {
  const e = h.exitInfo;
  if (!e) return 'running';
  if (e.error) return `failed to start: ${e.error.message}`;
  return e.signal ? `killed by ${e.signal}` : `exited with code ${e.code}`;
}

/** Resolve with the first line (existing or future) matching `re`; reject on exit or timeout. */
export function waitForLine(h, re, ms = 30_000) {
  const existing = h.lines.find((l) => re.test(l));
  if (existing !== undefined) return Promise.resolve(existing);
  return new Promise((resolve, reject) => {
    let off = () => {};
    const timer = setTimeout(() => {
      off();
      reject(new Error(`${h.name}: no line matching ${re} within ${ms} ms; last output:\n${h.tail()}`));
    }, ms);
    off = h.onLine((line) => {
      if (re.test(line)) {
        clearTimeout(timer);
        off();
        resolve(line);
      }
    });
    h.exited.then(() => {
      // give buffered lines a moment to arrive
      setTimeout(() => {
        clearTimeout(timer);
        off();
        const hit = h.lines.find((l) => re.test(l));
        if (hit !== undefined) resolve(hit);
        else reject(new Error(`${h.name} ${describeExit(h)} before printing ${re}; last output:\n${h.tail()}`));
      }, 100);
    });
  });
}

/**
 * Poll `url` until it answers with `status` (default 200). `proc`, when given,
 * makes the wait fail as soon as that process exits.
 */
export async function waitForHttp(url, { status = 200, timeoutMs = 30_000, intervalMs = 200, proc } = {}) {
  const deadline = Date.now() + timeoutMs;
  let last = 'no answer';
  while (Date.now() < deadline) {
    if (proc?.exitInfo) {
      throw new Error(`${proc.name} ${describeExit(proc)} while waiting for ${url}; last output:\n${proc.tail()}`);
    }
    try {
      const res = await fetch(url, { redirect: 'manual', signal: AbortSignal.timeout(2000) });
      await res.arrayBuffer().catch(() => {});
      if (res.status === status) return res;
      last = `HTTP ${res.status}`;
    } catch (err) {
      last = err.cause?.code || err.message;
    }
    await sleep(intervalMs);
  }
  const extra = proc ? `; last output of ${proc.name}:\n${proc.tail()}` : '';
  throw new Error(`${url} did not answer ${status} within ${timeoutMs} ms (last: ${last})${extra}`);
}

/** SIGTERM one started process, SIGKILL after `graceMs`. */
export async function stop(h, graceMs = 3000) {
  if (!h || h.exitInfo) return;
  try { h.child.kill('SIGTERM'); } catch { /* already gone */ }
  const timer = setTimeout(() => {
    try { if (!h.exitInfo) h.child.kill('SIGKILL'); } catch { /* already gone */ }
  }, graceMs);
  await h.exited;
  clearTimeout(timer);
}

/** Stop every process started by spawnLogged() (in reverse start order). */
export async function killAll(graceMs = 3000) {
  const list = [...started].reverse();
  await Promise.all(list.map((h) => stop(h, graceMs)));
}

/** Synchronous last resort (process 'exit' handler): SIGKILL whatever is left. */
export function killAllSync() {
  for (const h of started) {
    try { if (!h.exitInfo) h.child.kill('SIGKILL'); } catch { /* already gone */ }
  }
}
process.on('exit', killAllSync);

/**
 * YAML config for the gateway, the way the tests and the demo run it.
 * Strings are emitted JSON-quoted (valid YAML double-quoted scalars).
 */
export function gatewayConfigYaml({
  gwPort, appPort, idpPort, clientId = 'portcullis', clientSecret, cookieSecret, logLevel,
  gwHost = '127.0.0.1', sameSite,
}) {
  const q = (s) => JSON.stringify(String(s));
  const lines = [
    `listen: ${q(`127.0.0.1:${gwPort}`)}`,
    `upstream: ${q(`http://127.0.0.1:${appPort}`)}`,
    'provider:',
    `  issuer_url: ${q(`http://127.0.0.1:${idpPort}`)}`,
    `  client_id: ${q(clientId)}`,
    `  client_secret: ${q(clientSecret)}`,
    '  scopes: ["openid", "email", "profile", "offline_access"]',
    `redirect_url: ${q(`http://${gwHost}:${gwPort}/oauth2/callback`)}`,
    'cookie:',
    `  secrets: [${q(cookieSecret)}]`,
    '  secure: false',
  ];
  if (sameSite) lines.push(`  same_site: ${sameSite}`);
  if (logLevel) lines.push(`log: { level: ${logLevel} }`);
  return `${lines.join('\n')}\n`;
}
