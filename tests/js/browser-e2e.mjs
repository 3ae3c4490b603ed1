// End-to-end test of portcullis with a real headless Chromium (playwright-core
// driving Debian's /usr/bin/chromium; no browser download).
//
// It starts its own processes on free loopback ports: the OpenID provider
// (idp.mjs), the demo upstream app (demo-app.mjs) and the gateway
// ($PORTCULLIS_BIN, default target/release/portcullis) with a generated
// config, then walks the browser through:
//   anonymous visit -> IdP login -> consent -> app page with Bearer token and
//   identity; reload without any IdP traffic; sign-out through the gateway and
//   the IdP's logout confirmation; the next visit needs a fresh IdP login;
//   logging in as another user shows that user; with cookie.same_site: strict
//   and the IdP on another site, one login lands on the app (no redirect loop).
//
// Output: one line per step, and as the last line
//   browser-e2e: N passed, M failed
// Exit code 0 only when every step passed. Logs, screenshots and the config
// are kept in the temp directory printed at the start.
//
//   PORTCULLIS_BIN     gateway binary (default target/release/portcullis,
//                      relative to the repository root)
//   CHROMIUM_BIN       browser (default /usr/bin/chromium)
//   E2E_HEADED=1       show the browser (needs a display)

import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';
import {
  JS_DIR, REPO_ROOT, freePorts, gatewayEnv, spawnLogged, spawnReady, waitForHttp, killAll, gatewayConfigYaml,
} from './procs.mjs';

const GLOBAL_TIMEOUT_MS = 120_000;
const STEP_TIMEOUT_MS = 20_000;
const CLIENT_SECRET = 'e2e-secret-' + crypto.randomBytes(8).toString('hex');

// --- what the test relies on --------------------------------------------------
// The gateway's own URLs and pages (keep this list short and obvious).
const GW = {
  readyz: '/readyz',
  callback: '/oauth2/callback',
  signOut: '/oauth2/sign_out',
  signedOut: '/oauth2/signed_out',
  // GET /oauth2/sign_out renders
  //   <form method="post" action="/oauth2/sign_out"> <input type="hidden" ...csrf>
  //   <button type="submit">Sign out</button></form>
  signOutButton: 'form[action="/oauth2/sign_out"] button[type="submit"]',
};
// oidc-provider 9 development interactions and default logout page.
const IDP = {
  loginUser: 'input[name="login"]',
  loginPassword: 'input[name="password"]',
  loginSubmit: 'form:has(input[name="login"]) button[type="submit"]', // "Sign-in"
  consentSubmit: 'form:has(input[name="prompt"][value="consent"]) button[type="submit"]', // "Continue"
  // <button type="submit" form="op.logoutForm" value="yes" name="logout">Yes, sign me out</button>
  logoutConfirm: 'button[name="logout"][value="yes"]',
};
// The demo app's page.
const APP = { title: 'Demo app behind portcullis' };
// -----------------------------------------------------------------------------

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'portcullis-e2e-'));
const profileDir = path.join(tmp, 'chromium-profile');
const results = [];
let context = null;
let page = null;
let finished = false;

const log = (msg) => process.stdout.write(`browser-e2e: ${msg}\n`);

function summaryAndExit(code) {
  if (finished) return;
  finished = true;
  const passed = results.filter((r) => r.ok).length;
  const failed = results.length - passed;
  log(`artifacts (logs, screenshots, config) in ${tmp}`);
  process.stdout.write(`browser-e2e: ${passed} passed, ${failed} failed\n`);
  process.exit(code ?? (failed ? 1 : 0));
}

async function cleanup() {
  if (context) {
    const c = context;
    context = null;
    await Promise.race([c.close().catch(() => {}), new Promise((r) => { setTimeout(r, 5000); })]);
  }
  await killAll();
  fs.rmSync(profileDir, { recursive: true, force: true });
}

const globalTimer = setTimeout(async () => {
  log(`FAIL global timeout of ${GLOBAL_TIMEOUT_MS / 1000} s reached${page ? ` (page at ${page.url()})` : ''}`);
  results.push({ name: 'global timeout', ok: false });
  await screenshot('timeout');
  await cleanup();
  summaryAndExit(1);
}, GLOBAL_TIMEOUT_MS);

for (const sig of ['SIGINT', 'SIGTERM']) {
  process.on(sig, async () => {
    log(`interrupted by ${sig}`);
    await cleanup();
    process.exit(130);
  });
}

async function screenshot(name) {
  if (!page) return null;
  const file = path.join(tmp, `${name}.png`);
  try {
    await page.screenshot({ path: file, fullPage: true, timeout: 5000 });
    return file;
  } catch {
    return null;
  }
}

let procs = {};

async function step(name, fn) {
  const t0 = Date.now();
  log(`STEP ${name} ...`);
  try {
    await fn();
    results.push({ name, ok: true });
    log(`PASS ${name} (${Date.now() - t0} ms)`);
    return true;
  } catch (err) {
    results.push({ name, ok: false });
    log(`FAIL ${name}: ${err.message}`);
    if (page) log(`     page URL: ${page.url()}`);
    const shot = await screenshot('failure');
    if (shot) log(`     screenshot: ${shot}`);
    for (const h of Object.values(procs)) {
      log(`     --- last lines of ${h.name} (${h.logFile}) ---`);
      for (const l of h.tail(15).split('\n')) process.stdout.write(`       ${l}\n`);
    }
    return false;
  }
}

// URLs for log lines: long query strings (id_token_hint, ...) cut short.
function short(url) {
  return url.length > 140 ? `${url.slice(0, 137)}...` : url;
}

function expect(cond, msg) {
  if (!cond) throw new Error(msg);
}

// Resolve with the label of the first of several waits that succeeds.
async function firstOf(waits) {
  const entries = Object.entries(waits);
  const ps = entries.map(([label, p]) => p.then(() => label));
  ps.forEach((p) => p.catch(() => {}));
  return Promise.any(ps).catch((agg) => {
    throw new Error(agg.errors.map((e) => e.message.split('\n')[0]).join('; '));
  });
}

async function main() {
  // --- preconditions ----------------------------------------------------------
  const bin = path.resolve(REPO_ROOT, process.env.PORTCULLIS_BIN || 'target/release/portcullis');
  const chromiumBin = process.env.CHROMIUM_BIN || '/usr/bin/chromium';
  log(`temp dir ${tmp}`);
  const pre = await step('preconditions (gateway binary, chromium)', async () => {
    expect(fs.existsSync(bin), `gateway binary not found at ${bin} — build it (cargo build --release) or set PORTCULLIS_BIN`);
    fs.accessSync(bin, fs.constants.X_OK);
    expect(fs.existsSync(chromiumBin), `${chromiumBin} not found — run \`make deps\` (installs Debian's chromium)`);
  });
  if (!pre) return;

  // --- processes ----------------------------------------------------------------
  const [idpPort, appPort, gwPort, adminPort, strictPort, strictAdminPort] = await freePorts(6);
  const idpOrigin = `http://127.0.0.1:${idpPort}`;
  const gwOrigin = `http://127.0.0.1:${gwPort}`;
  const appOrigin = `http://127.0.0.1:${appPort}`;
  // A second gateway with SameSite=Strict cookies, on "localhost": another site than the IdP
  // on 127.0.0.1 for Chromium, so the IdP's redirect back is a cross-site navigation.
  const strictOrigin = `http://localhost:${strictPort}`;
  const configFile = path.join(tmp, 'portcullis.yaml');

  const started = await step('start IdP, demo app and gateway; gateway /readyz is 200', async () => {
    [procs.idp, procs.app] = await Promise.all([
      spawnReady('idp', process.execPath, [path.join(JS_DIR, 'idp.mjs')], {
        logDir: tmp,
        env: {
          IDP_PORT: String(idpPort),
          IDP_CLIENT_ID: 'portcullis',
          IDP_CLIENT_SECRET: CLIENT_SECRET,
          IDP_REDIRECT_URIS: `${gwOrigin}${GW.callback},${strictOrigin}${GW.callback}`,
        },
      }),
      spawnReady('demo-app', process.execPath, [path.join(JS_DIR, 'demo-app.mjs')], {
        logDir: tmp,
        env: { DEMO_APP_PORT: String(appPort) },
      }),
    ]);

    fs.writeFileSync(configFile, gatewayConfigYaml({
      gwPort, appPort, idpPort,
      clientSecret: CLIENT_SECRET,
      cookieSecret: crypto.randomBytes(32).toString('base64'),
    }));
    procs.gw = spawnLogged('portcullis', bin, ['--config', configFile], {
      logDir: tmp,
      env: gatewayEnv({ RUST_BACKTRACE: '1', PORTCULLIS_ADMIN_LISTEN: `127.0.0.1:${adminPort}` }),
    });
    await waitForHttp(`${gwOrigin}${GW.readyz}`, { timeoutMs: 30_000, proc: procs.gw });
    log(`     idp ${idpOrigin}  app ${appOrigin}  gateway ${gwOrigin}`);
  });
  if (!started) return;

  // --- browser --------------------------------------------------------------------
  context = await chromium.launchPersistentContext(profileDir, {
    executablePath: chromiumBin,
    headless: process.env.E2E_HEADED !== '1',
    args: [
      '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--disable-quic',
      // the IdP's pages @import a web font from the internet: fail every
      // host name lookup at once instead of waiting on the closed network
      '--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost',
    ],
    viewport: { width: 1280, height: 900 },
  });
  context.setDefaultTimeout(STEP_TIMEOUT_MS);
  context.setDefaultNavigationTimeout(STEP_TIMEOUT_MS);
  const requests = [];
  context.on('request', (r) => requests.push({ url: r.url(), method: r.method(), nav: r.isNavigationRequest() }));
  page = context.pages()[0] || await context.newPage();

  const onGateway = (u) => u.origin === gwOrigin;
  const onApp = (u) => onGateway(u) && !u.pathname.startsWith('/oauth2/');
  const onIdp = (u) => u.origin === idpOrigin;

  async function expectIdpLogin() {
    await page.waitForURL(onIdp);
    await page.locator(IDP.loginUser).waitFor({ state: 'visible' });
  }

  // From the IdP login page: sign in, consent when asked, land on the app.
  async function loginAs(user, isApp = onApp) {
    await page.fill(IDP.loginUser, user);
    await page.fill(IDP.loginPassword, 'any-password');
    await page.click(IDP.loginSubmit);
    const next = await firstOf({
      consent: page.locator(IDP.consentSubmit).waitFor({ state: 'visible' }),
      app: page.waitForURL(isApp),
    });
    if (next === 'consent') {
      log('     consent page: clicking "Continue"');
      await page.click(IDP.consentSubmit);
      await page.waitForURL(isApp);
    }
    await page.waitForLoadState('load');
  }

  async function expectAppFor(email, isApp = onApp) {
    const u = new URL(page.url());
    expect(isApp(u), `expected to be on the app behind the gateway, at ${page.url()}`);
    expect(await page.title() === APP.title, `page title is "${await page.title()}", expected "${APP.title}"`);
    const html = await page.content();
    expect(html.includes('Bearer '), 'app page shows no "Bearer " Authorization header');
    expect(html.includes(email), `app page does not show ${email}`);
    const who = await page.locator('#signed-in').innerText().catch(() => '');
    expect(who.includes(email), `app page has no "Signed in as ${email}" line (X-Forwarded-Email)`);
  }

  let ok = await step('anonymous GET / redirects to the IdP login page', async () => {
    await page.goto(`${gwOrigin}/`);
    await expectIdpLogin();
  });
  if (!ok) return;

  ok = await step('log in as alice (+ consent) and land on the app with Bearer token and alice@example.test', async () => {
    await loginAs('alice');
    expect(new URL(page.url()).pathname === '/', `expected to return to "/", at ${page.url()}`);
    await expectAppFor('alice@example.test');
    const shot = await screenshot('app-logged-in');
    log(`     screenshot: ${shot}`);
  });
  if (!ok) return;

  ok = await step('reload shows the app again without any request to the IdP', async () => {
    const before = requests.length;
    const idpLinesBefore = procs.idp.lines.filter((l) => l.startsWith('REQ ')).length;
    const res = await page.reload({ waitUntil: 'load' });
    expect(res && res.status() === 200, `reload answered ${res ? res.status() : 'nothing'}`);
    await expectAppFor('alice@example.test');
    const during = requests.slice(before);
    const toIdp = during.filter((r) => onIdp(new URL(r.url)));
    expect(during.length > 0, 'no request recorded during the reload');
    expect(toIdp.length === 0, `browser contacted the IdP during reload: ${toIdp.map((r) => `${r.method} ${r.url}`).join(', ')}`);
    const idpLinesAfter = procs.idp.lines.filter((l) => l.startsWith('REQ ')).length;
    log(`     ${during.length} browser request(s), 0 to the IdP; IdP served ${idpLinesAfter - idpLinesBefore} request(s) meanwhile`);
  });
  if (!ok) return;

  ok = await step('sign out: gateway form -> IdP logout confirmation -> back to the gateway', async () => {
    await page.goto(`${gwOrigin}${GW.signOut}`);
    await page.locator(GW.signOutButton).waitFor({ state: 'visible' });
    const mark = requests.length;
    await page.click(GW.signOutButton);
    const at = await firstOf({
      confirm: page.locator(IDP.logoutConfirm).waitFor({ state: 'visible' }),
      gateway: page.waitForURL((u) => onGateway(u) && u.pathname !== GW.signOut),
    });
    expect(at === 'confirm', `expected the IdP's logout confirmation page, got ${page.url()}`);
    expect(onIdp(new URL(page.url())), `logout confirmation not on the IdP: ${page.url()}`);
    log(`     IdP logout page ${new URL(page.url()).pathname}: clicking "Yes, sign me out"`);
    const confirmMark = requests.length;
    await page.click(IDP.logoutConfirm);
    // post_logout_redirect_uri is the gateway: either its signed-out page, or
    // "/" which (signed out) sends the browser straight on to the IdP login.
    const end = await firstOf({
      gateway: page.waitForURL((u) => onGateway(u) && u.pathname !== GW.signOut),
      login: page.locator(IDP.loginUser).waitFor({ state: 'visible' }),
    });
    await page.waitForLoadState('load');
    const navs = requests.slice(confirmMark).filter((r) => r.nav).map((r) => r.url);
    const backOnGw = navs.find((u) => onGateway(new URL(u)));
    expect(backOnGw, `after confirming, the browser never came back to the gateway (navigations: ${navs.map(short).join(' -> ') || 'none'})`);
    const p = new URL(backOnGw).pathname;
    expect(p === '/' || p === GW.signedOut, `IdP sent the browser back to ${backOnGw}, expected ${gwOrigin}/ or ${gwOrigin}${GW.signedOut}`);
    const chain = requests.slice(mark).filter((r) => r.nav).map((r) => r.url);
    log(`     navigation chain: ${chain.map(short).join(' -> ')}`);
    log(`     ended on ${end === 'gateway' ? 'the gateway' : 'the IdP login page'}: ${page.url()}`);
    await screenshot('signed-out');
  });
  if (!ok) return;

  ok = await step('after sign-out, GET / needs a fresh IdP login', async () => {
    await page.goto(`${gwOrigin}/`);
    await expectIdpLogin();
  });
  if (!ok) return;

  ok = await step('log in as bob and see bob (not alice) on the app', async () => {
    await loginAs('bob');
    await expectAppFor('bob@example.test');
    const html = await page.content();
    expect(!html.includes('alice@example.test'), 'app page still shows alice@example.test');
    await screenshot('app-logged-in-bob');
  });
  if (!ok) return;

  // A Strict session cookie is not sent on the redirect chain the IdP starts (another site):
  // a plain 302 from the callback would loop between the gateway and the IdP.
  await step('cookie.same_site: strict, IdP on another site: one login lands on the app', async () => {
    const strictConfig = path.join(tmp, 'portcullis-strict.yaml');
    fs.writeFileSync(strictConfig, gatewayConfigYaml({
      gwPort: strictPort, appPort, idpPort, gwHost: 'localhost', sameSite: 'strict',
      clientSecret: CLIENT_SECRET,
      cookieSecret: crypto.randomBytes(32).toString('base64'),
    }));
    procs.gwStrict = spawnLogged('portcullis-strict', bin, ['--config', strictConfig], {
      logDir: tmp,
      env: gatewayEnv({ RUST_BACKTRACE: '1', PORTCULLIS_ADMIN_LISTEN: `127.0.0.1:${strictAdminPort}` }),
    });
    await waitForHttp(`http://127.0.0.1:${strictPort}${GW.readyz}`, { timeoutMs: 30_000, proc: procs.gwStrict });
    await context.clearCookies(); // a fresh IdP login, too
    const onStrictApp = (u) => u.origin === strictOrigin && !u.pathname.startsWith('/oauth2/');
    const mark = requests.length;
    await page.goto(`${strictOrigin}/app?x=1`);
    await expectIdpLogin();
    await loginAs('alice', onStrictApp);
    await expectAppFor('alice@example.test', onStrictApp);
    expect(new URL(page.url()).pathname === '/app', `expected to return to "/app", at ${page.url()}`);
    const navs = requests.slice(mark).filter((r) => r.nav).map((r) => new URL(r.url));
    const logins = navs.filter((u) => u.origin === strictOrigin && (u.pathname === '/app' || u.pathname === GW.callback));
    log(`     gateway navigations: ${logins.map((u) => u.pathname).join(' -> ')}`);
    expect(navs.filter((u) => u.pathname === GW.callback).length === 1, 'more than one callback: a login loop');
    expect(navs.filter((u) => onIdp(u) && u.pathname === '/auth').length === 1, 'more than one authorization request');
    await screenshot('app-logged-in-strict');
  });
}

try {
  await main();
} catch (err) {
  results.push({ name: 'harness', ok: false });
  log(`FAIL harness error: ${err.stack || err.message}`);
}
clearTimeout(globalTimer);
await cleanup();
summaryAndExit();
