// `make demo`: the OpenID provider, the demo app and portcullis, all on
// loopback, until Ctrl-C.
//
//   IdP      http://127.0.0.1:9000   (DEMO_IDP_PORT)  tests/js/idp.mjs
//   app      http://127.0.0.1:8081   (DEMO_APP_PORT)  tests/js/demo-app.mjs
//   gateway  http://127.0.0.1:4180   (DEMO_GW_PORT)   $PORTCULLIS_BIN --config config/demo.yaml
//   admin    http://127.0.0.1:4181   (DEMO_ADMIN_PORT) the gateway's /metrics /healthz /readyz
//
// With the default ports the gateway runs on config/demo.yaml; when a port is
// overridden, a copy of it with the ports replaced is written to a temp directory. The cookie
// key is generated per run and passed as PORTCULLIS_COOKIE_SECRETS.
// The admin listener is passed as PORTCULLIS_ADMIN_LISTEN: when its default
// port is taken (and DEMO_ADMIN_PORT is not set) a free one is used instead.
// The gateway's log is streamed to the terminal; the IdP's and the app's go to
// files in the temp directory.

import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import {
  JS_DIR, REPO_ROOT, freePort, gatewayEnv, spawnLogged, spawnReady, waitForHttp, killAll, sleep,
} from './procs.mjs';

// admin: next to the gateway, away from Prometheus' 9090 (the gateway's default).
const DEFAULTS = { idp: 9000, app: 8081, gw: 4180, admin: 4181 };
const DEMO_CONFIG = path.join(REPO_ROOT, 'config', 'demo.yaml');
const CLIENT_SECRET = 'portcullis-demo-secret'; // same as config/demo.yaml
// A fresh key per run, which wins over config/demo.yaml's published one (anyone could forge
// sessions with that; the gateway warns about it).
const COOKIE_SECRET = crypto.randomBytes(32).toString('base64');

function port(name, dflt) {
  const raw = process.env[name];
  if (!raw) return dflt;
  const p = Number.parseInt(raw, 10);
  if (!(p > 0 && p < 65536)) fail(`invalid ${name}=${raw}`);
  return p;
}

function fail(msg) {
  process.stderr.write(`demo: ${msg}\n`);
  process.exit(1);
}

function portFree(p) {
  return new Promise((resolve) => {
    const srv = net.createServer();
    srv.once('error', () => resolve(false));
    srv.listen(p, '127.0.0.1', () => srv.close(() => resolve(true)));
  });
}

function box(lines) {
  const width = Math.max(...lines.map((l) => [...l].length));
  const out = [`╭${'─'.repeat(width + 2)}╮`];
  for (const l of lines) out.push(`│ ${l}${' '.repeat(width - [...l].length)} │`);
  out.push(`╰${'─'.repeat(width + 2)}╯`);
  return out.join('\n');
}

const ports = {
  idp: port('DEMO_IDP_PORT', DEFAULTS.idp),
  app: port('DEMO_APP_PORT', DEFAULTS.app),
  gw: port('DEMO_GW_PORT', DEFAULTS.gw),
};
const bin = path.resolve(REPO_ROOT, process.env.PORTCULLIS_BIN || 'target/release/portcullis');
if (!fs.existsSync(bin)) fail(`gateway binary not found at ${bin}: run \`make build\` (or set PORTCULLIS_BIN)`);

for (const [name, envName] of [['idp', 'DEMO_IDP_PORT'], ['app', 'DEMO_APP_PORT'], ['gw', 'DEMO_GW_PORT']]) {
  if (!await portFree(ports[name])) {
    fail(`127.0.0.1:${ports[name]} is already in use; stop what runs there or set ${envName} to another port`);
  }
}
// Only metrics and probes live there: rather than refuse to start, take a free port.
if (process.env.DEMO_ADMIN_PORT) {
  ports.admin = port('DEMO_ADMIN_PORT', DEFAULTS.admin);
  if (!await portFree(ports.admin)) {
    fail(`127.0.0.1:${ports.admin} is already in use; stop what runs there or set DEMO_ADMIN_PORT to another port`);
  }
} else {
  ports.admin = DEFAULTS.admin;
  if (!await portFree(ports.admin)) {
    ports.admin = await freePort();
    process.stdout.write(`demo: 127.0.0.1:${DEFAULTS.admin} is in use; the admin listener takes 127.0.0.1:${ports.admin}\n`);
  }
}

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'portcullis-demo-'));
const defaultPorts = ports.idp === DEFAULTS.idp && ports.app === DEFAULTS.app && ports.gw === DEFAULTS.gw;
let configFile = DEMO_CONFIG;
if (!defaultPorts) {
  configFile = path.join(tmp, 'demo.yaml');
  let yaml = fs.readFileSync(DEMO_CONFIG, 'utf8');
  for (const name of ['gw', 'idp', 'app']) {
    yaml = yaml.replaceAll(`127.0.0.1:${DEFAULTS[name]}`, `127.0.0.1:${ports[name]}`);
  }
  fs.writeFileSync(configFile, yaml);
}
const gwUrl = `http://127.0.0.1:${ports.gw}/`;

let stopping = false;
const children = [];
async function stopAll(code, { interrupted = false } = {}) {
  if (stopping) return;
  stopping = true;
  process.stdout.write('\ndemo: stopping gateway, demo app and IdP ...\n');
  // Ctrl-C in the terminal reaches the children too (one process group): let them stop on
  // it, rather than send the gateway a second signal (which skips its drain). A SIGINT sent
  // to this process alone reaches no child: they get SIGTERM after the wait.
  if (interrupted) {
    await Promise.race([Promise.all(children.map((h) => h.exited)), sleep(2000)]);
  }
  await killAll();
  process.stdout.write(`demo: stopped (logs in ${tmp})\n`);
  process.exit(code);
}
process.on('SIGINT', () => stopAll(0, { interrupted: true }));
process.on('SIGTERM', () => stopAll(0));

function watch(h) {
  h.exited.then((info) => {
    if (stopping) return;
    process.stderr.write(`demo: ${h.name} stopped unexpectedly (${JSON.stringify(info)}); last output:\n${h.tail(20)}\n`);
    stopAll(1);
  });
}

try {
  process.stdout.write(`demo: starting IdP on 127.0.0.1:${ports.idp} and demo app on 127.0.0.1:${ports.app} ...\n`);
  // A start that hangs is made again (see spawnReady).
  const ready = { ms: 20_000, tries: 3 };
  const [idp, app] = await Promise.all([
    spawnReady('idp', process.execPath, [path.join(JS_DIR, 'idp.mjs')], {
      logDir: tmp,
      env: {
        IDP_PORT: String(ports.idp),
        IDP_CLIENT_ID: 'portcullis',
        IDP_CLIENT_SECRET: CLIENT_SECRET,
        IDP_REDIRECT_URIS: `http://127.0.0.1:${ports.gw}/oauth2/callback`,
      },
    }, ready),
    spawnReady('demo-app', process.execPath, [path.join(JS_DIR, 'demo-app.mjs')], {
      logDir: tmp,
      env: { DEMO_APP_PORT: String(ports.app) },
    }, ready),
  ]);
  watch(idp);
  watch(app);
  children.push(idp, app);

  const shown = (f) => (f.startsWith(`${REPO_ROOT}${path.sep}`) ? path.relative(REPO_ROOT, f) : f);
  process.stdout.write(`demo: starting ${shown(bin)} --config ${shown(configFile)}\n`);
  const gw = spawnLogged('portcullis', bin, ['--config', configFile], {
    logDir: tmp,
    echo: true,
    env: gatewayEnv({
      PORTCULLIS_ADMIN_LISTEN: `127.0.0.1:${ports.admin}`,
      PORTCULLIS_COOKIE_SECRETS: COOKIE_SECRET,
    }),
  });
  children.push(gw);
  await waitForHttp(`http://127.0.0.1:${ports.gw}/readyz`, { timeoutMs: 60_000, proc: gw });
  watch(gw);

  process.stdout.write(`\n${box([
    'portcullis demo is running',
    '',
    `Open ${gwUrl} — log in with any username/password`,
    '',
    `gateway   ${gwUrl}`,
    `IdP       http://127.0.0.1:${ports.idp}/  (log: ${idp.logFile})`,
    `demo app  http://127.0.0.1:${ports.app}/  (log: ${app.logFile})`,
    `sign out  ${gwUrl}oauth2/sign_out`,
    `metrics   http://127.0.0.1:${ports.admin}/metrics  (admin: /healthz /readyz)`,
    '',
    'Gateway log follows. Ctrl-C stops all three.',
  ])}\n\n`);
} catch (err) {
  process.stderr.write(`demo: ${err.message}\n`);
  await stopAll(1);
}
