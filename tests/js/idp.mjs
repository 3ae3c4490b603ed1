// Test/demo OpenID Provider for portcullis.
//
// A real OP built on oidc-provider (version pinned in package.json). It keeps
// the library's development login/consent forms, which accept ANY username
// and ANY password, so both scripted clients and a real browser can sign in.
// It is meant for loopback only: tests and `make demo`.
//
// Environment (all optional):
//   IDP_PORT                       listen port on 127.0.0.1 (default 9000)
//   IDP_ISSUER                     issuer URL (default http://127.0.0.1:$IDP_PORT)
//   IDP_CLIENT_ID                  client id (default portcullis)
//   IDP_CLIENT_SECRET              client secret (default portcullis-demo-secret)
//   IDP_CLIENT_AUTH_METHOD         token endpoint auth method of that client:
//                                  client_secret_basic (default) or
//                                  client_secret_post
//   IDP_STRICT_CLIENT_AUTH         "1" refuses (401 invalid_client) a client
//                                  that authenticates with the other of
//                                  basic/post than it is registered for
//                                  (default: oidc-provider accepts either)
//   IDP_REDIRECT_URIS              the client's redirect URIs, comma separated
//                                  (default http://127.0.0.1:4180/oauth2/callback)
//   IDP_POST_LOGOUT_REDIRECT_URIS  extra post-logout redirect URIs, comma
//                                  separated. Always registered: for every
//                                  redirect URI, its origin + "/" and origin +
//                                  "/oauth2/signed_out".
//   IDP_BACKCHANNEL_LOGOUT_URI     the client's backchannel_logout_uri (with
//                                  backchannel_logout_session_required: true)
//   IDP_BACKCHANNEL_LOGOUT_SUB_ONLY "1": backchannel_logout_session_required
//                                  false (oidc-provider's default), so logout
//                                  tokens name the user (sub) and no sid
//   IDP_NO_SID                     "1": ID tokens carry no sid; logout tokens
//                                  still do (an inconsistent provider)
//   IDP_ROTATE_REFRESH_TOKEN       "1" rotates refresh tokens on every use
//                                  (default: never rotate)
//   IDP_NO_REFRESH_TOKEN           "1" issues no refresh token at all (default:
//                                  one to every client allowed the grant)
//   IDP_GRANTS_OUTLIVE_LOGOUT      "1": signing out at the provider leaves the
//                                  client's grant, and its refresh token, alive
//                                  (as offline tokens outlive the SSO session at
//                                  many providers); default: revoked with it
//   IDP_EXTRA_CLIENTS              JSON array of extra client metadata objects
//                                  registered as-is, e.g.
//                                  [{"client_id":"post","client_secret":"s",
//                                    "token_endpoint_auth_method":"client_secret_post",
//                                    "redirect_uris":["http://127.0.0.1:5000/oauth2/callback"]}]
//                                  (grant_types/response_types/scope default to
//                                  the main client's when omitted)
//   IDP_SIGNING_KID                the signing key's kid (default: a fresh UUID per
//                                  start; fixed, a restart replaces the key under it)
//   IDP_ACCESS_TOKEN_TTL           access token TTL in seconds (default 3600)
//   IDP_ID_TOKEN_TTL               ID token TTL in seconds (default = access TTL)
//   IDP_REFRESH_TOKEN_TTL          refresh token TTL in seconds (default 14 days)
//   IDP_ACCESS_TOKEN_CHARS         length of the (opaque) access token in
//                                  characters (default 43 = 256 bits); raise it
//                                  to mimic IdPs that issue large JWT tokens
//   IDP_REFRESH_TOKEN_CHARS        same for refresh tokens (default 43)
//   IDP_CONFORM_ID_TOKEN_CLAIMS    "1": scope claims (email, name, groups) in
//                                  userinfo only, as oidc-provider's default
//   IDP_USERINFO_SIGNED            "1": the client is registered with
//                                  userinfo_signed_response_alg RS256, so the
//                                  userinfo endpoint answers a signed JWT
//                                  (application/jwt, OIDC Core §5.3.2)
//   IDP_LOG                        "0" disables the per-request log line
//   IDP_EXTRA_GROUPS_FILE          a file holding a JSON array of groups added to
//                                  every user's, read at each token: claims that
//                                  change between a login and a refresh
//   IDP_TOKEN_OVERRIDE_FILE        while this file exists, POST /token answers with
//                                  what it says instead of an OAuth answer, as a
//                                  maintenance page or a WAF in front of a provider
//                                  does: "<status> <content-type>|- <body>", e.g.
//                                  "200 text/html <p>maintenance</p>", "404 - "
//   IDP_USERINFO_OVERRIDE_FILE     the same for the userinfo endpoint (GET/POST /me)
//
// Output on stdout:
//   READY issuer=... port=... ...       once listening
//   REQ <n> <iso time> <METHOD> <path> <status> <ms>ms   per HTTP request served
//   BCL ok|error client=... sid=... ...  per back-channel logout delivery
// Tests count REQ lines to prove the IdP was (not) contacted.
//
// Every ID token carries `sid` (the OP session id for the client), also for
// clients without a back-channel logout URI, so relying parties can always
// correlate a later logout token with their session.
//
// Grants can be revoked by tests through the standard revocation endpoint
// (POST /token/revocation with the client's credentials).

import crypto from 'node:crypto';
import fs from 'node:fs';
import Provider, { errors } from 'oidc-provider';

const env = process.env;

function intEnv(name, dflt) {
  const raw = env[name];
  if (raw === undefined || raw === '') return dflt;
  const v = Number.parseInt(raw, 10);
  if (!Number.isFinite(v) || v < 0) {
    console.error(`idp: invalid ${name}=${raw}`);
    process.exit(2);
  }
  return v;
}

function listEnv(name) {
  return (env[name] || '').split(',').map((s) => s.trim()).filter(Boolean);
}

const PORT = intEnv('IDP_PORT', 9000);
const ISSUER = env.IDP_ISSUER || `http://127.0.0.1:${PORT}`;
const CLIENT_ID = env.IDP_CLIENT_ID || 'portcullis';
const CLIENT_SECRET = env.IDP_CLIENT_SECRET || 'portcullis-demo-secret';
const AUTH_METHOD = env.IDP_CLIENT_AUTH_METHOD || 'client_secret_basic';
const AT_TTL = intEnv('IDP_ACCESS_TOKEN_TTL', 3600);
const IDT_TTL = intEnv('IDP_ID_TOKEN_TTL', AT_TTL);
const RT_TTL = intEnv('IDP_REFRESH_TOKEN_TTL', 14 * 24 * 3600);
const AT_CHARS = intEnv('IDP_ACCESS_TOKEN_CHARS', 43);
const RT_CHARS = intEnv('IDP_REFRESH_TOKEN_CHARS', 43);
const ROTATE_RT = env.IDP_ROTATE_REFRESH_TOKEN === '1';
const NO_RT = env.IDP_NO_REFRESH_TOKEN === '1';
const GRANTS_OUTLIVE_LOGOUT = env.IDP_GRANTS_OUTLIVE_LOGOUT === '1';
const STRICT_CLIENT_AUTH = env.IDP_STRICT_CLIENT_AUTH === '1';
const BACKCHANNEL_URI = env.IDP_BACKCHANNEL_LOGOUT_URI || '';
const BACKCHANNEL_SUB_ONLY = env.IDP_BACKCHANNEL_LOGOUT_SUB_ONLY === '1';
const LOG = env.IDP_LOG !== '0';
// IDP_CONFORM_ID_TOKEN_CLAIMS=1: oidc-provider's default, where the scope claims (email,
// name, groups) go to userinfo only and the code flow's ID token carries just `sub`.
const CONFORM = env.IDP_CONFORM_ID_TOKEN_CLAIMS === '1';

const REDIRECT_URIS = listEnv('IDP_REDIRECT_URIS');
if (REDIRECT_URIS.length === 0) REDIRECT_URIS.push('http://127.0.0.1:4180/oauth2/callback');

const POST_LOGOUT_REDIRECT_URIS = [...new Set([
  ...REDIRECT_URIS.flatMap((u) => {
    const { origin } = new URL(u);
    return [`${origin}/`, `${origin}/oauth2/signed_out`];
  }),
  ...listEnv('IDP_POST_LOGOUT_REDIRECT_URIS'),
])];

const SCOPE = 'openid email profile offline_access';

const mainClient = {
  client_id: CLIENT_ID,
  client_secret: CLIENT_SECRET,
  client_name: 'portcullis',
  redirect_uris: REDIRECT_URIS,
  post_logout_redirect_uris: POST_LOGOUT_REDIRECT_URIS,
  grant_types: ['authorization_code', 'refresh_token'],
  response_types: ['code'],
  token_endpoint_auth_method: AUTH_METHOD,
  ...(env.IDP_USERINFO_SIGNED === '1' ? { userinfo_signed_response_alg: 'RS256' } : {}),
  scope: SCOPE,
  ...(BACKCHANNEL_URI ? {
    backchannel_logout_uri: BACKCHANNEL_URI,
    backchannel_logout_session_required: !BACKCHANNEL_SUB_ONLY,
  } : {}),
};

let extraClients = [];
if (env.IDP_EXTRA_CLIENTS) {
  try {
    extraClients = JSON.parse(env.IDP_EXTRA_CLIENTS);
    if (!Array.isArray(extraClients)) throw new Error('not a JSON array');
  } catch (err) {
    console.error(`idp: invalid IDP_EXTRA_CLIENTS: ${err.message}`);
    process.exit(2);
  }
  extraClients = extraClients.map((c) => ({
    grant_types: ['authorization_code', 'refresh_token'],
    response_types: ['code'],
    scope: SCOPE,
    ...c,
  }));
}

// ---------------------------------------------------------------------------
// Unbounded in-memory adapter. oidc-provider's bundled memory adapter is an
// LRU capped at 1000 entries; tests that log in repeatedly must not have their
// grants/sessions/refresh tokens evicted, so we keep everything (with TTLs).
// ---------------------------------------------------------------------------
const store = new Map(); // key -> { value, exp (ms epoch or Infinity) }
const grantIndex = new Map(); // grantId -> Set(keys)

function sget(key) {
  const e = store.get(key);
  if (!e) return undefined;
  if (e.exp <= Date.now()) {
    store.delete(key);
    return undefined;
  }
  return e.value;
}
function sset(key, value, expiresIn) {
  const exp = typeof expiresIn === 'number' ? Date.now() + expiresIn * 1000 : Infinity;
  store.set(key, { value, exp });
}
// periodic sweep of expired entries
setInterval(() => {
  const now = Date.now();
  for (const [k, e] of store) if (e.exp <= now) store.delete(k);
}, 60_000).unref();

const grantable = new Set([
  'AccessToken', 'AuthorizationCode', 'RefreshToken', 'DeviceCode',
  'BackchannelAuthenticationRequest', 'PreAuthorizedCode',
]);

class MapAdapter {
  constructor(model) { this.model = model; }

  key(id) { return `${this.model}:${id}`; }

  async upsert(id, payload, expiresIn) {
    const key = this.key(id);
    if (this.model === 'Session') sset(`sessionUid:${payload.uid}`, id, expiresIn);
    if (grantable.has(this.model) && payload.grantId) {
      let set = grantIndex.get(payload.grantId);
      if (!set) { set = new Set(); grantIndex.set(payload.grantId, set); }
      set.add(key);
    }
    if (payload.userCode) sset(`userCode:${payload.userCode}`, id, expiresIn);
    sset(key, payload, expiresIn);
  }

  async find(id) { return sget(this.key(id)); }

  async findByUid(uid) {
    const id = sget(`sessionUid:${uid}`);
    return id === undefined ? undefined : this.find(id);
  }

  async findByUserCode(userCode) {
    const id = sget(`userCode:${userCode}`);
    return id === undefined ? undefined : this.find(id);
  }

  async consume(id) {
    const v = sget(this.key(id));
    if (v) v.consumed = Math.floor(Date.now() / 1000);
  }

  async destroy(id) { store.delete(this.key(id)); }

  async revokeByGrantId(grantId) {
    const set = grantIndex.get(grantId);
    if (set) for (const k of set) store.delete(k);
    grantIndex.delete(grantId);
  }
}

// ---------------------------------------------------------------------------
// Accounts: any username is valid. Claims are derived from the username; a
// username starting with "unverified" has an email the provider does not vouch
// for (email_verified: false).
// ---------------------------------------------------------------------------
function accountFor(sub) {
  const local = String(sub).replace(/[^A-Za-z0-9._-]/g, '_') || 'user';
  return {
    accountId: sub,
    async claims() {
      return {
        sub,
        email: `${local}@example.test`,
        email_verified: !local.startsWith('unverified'),
        name: `Test User ${local}`,
        preferred_username: local,
        groups: ['users', `user-${local}`, ...extraGroups()],
      };
    },
  };
}

function extraGroups() {
  const file = env.IDP_EXTRA_GROUPS_FILE;
  if (!file) return [];
  try {
    return JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch {
    return [];
  }
}

// Outgoing requests (back-channel logout) go to loopback in tests and the
// demo; oidc-provider's SSRF protection refuses special-use addresses such as
// 127.0.0.1, so drop its guarding dispatcher for loopback targets only.
function isLoopbackUrl(url) {
  const host = new URL(url).hostname.replace(/^\[|\]$/g, '');
  return host === 'localhost' || host === '::1' || /^127\.\d+\.\d+\.\d+$/.test(host);
}

// fresh signing key per IdP start (RS256)
const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
const signingJwk = { ...privateKey.export({ format: 'jwk' }), use: 'sig', alg: 'RS256', kid: env.IDP_SIGNING_KID || crypto.randomUUID() };

const configuration = {
  adapter: MapAdapter,
  clients: [mainClient, ...extraClients],
  jwks: { keys: [signingJwk] },
  cookies: {
    // distinct names so they never collide with a gateway cookie in the
    // browser's cookie jar (cookies are not port-scoped: IdP and gateway share
    // the host 127.0.0.1).
    names: { session: 'idp_session', interaction: 'idp_interaction', resume: 'idp_interaction_resume' },
    keys: [crypto.randomBytes(32).toString('base64url')],
  },
  scopes: ['openid', 'email', 'profile', 'offline_access'],
  claims: {
    openid: ['sub'],
    email: ['email', 'email_verified'],
    profile: ['name', 'preferred_username', 'groups'],
    // standalone claims (requestable via the claims parameter)
    sid: null,
    auth_time: null,
    acr: null,
    iss: null,
  },
  // put the scope claims into the ID token too (not only into userinfo), unless
  // IDP_CONFORM_ID_TOKEN_CLAIMS=1.
  conformIdTokenClaims: CONFORM,
  findAccount: async (_ctx, sub) => accountFor(sub),
  features: {
    devInteractions: { enabled: true }, // built-in login + consent forms
    introspection: { enabled: true },
    revocation: { enabled: true },
    userinfo: { enabled: true },
    jwtUserinfo: { enabled: env.IDP_USERINFO_SIGNED === '1' },
    // RP-initiated logout with the library's default confirmation page
    // ("Yes, sign me out" / "No, stay signed in").
    rpInitiatedLogout: { enabled: true },
    backchannelLogout: { enabled: true },
  },
  fetch: (url, options) => {
    if (isLoopbackUrl(url)) delete options.dispatcher;
    return globalThis.fetch(url, options);
  },
  pkce: {
    // PKCE is accepted (S256) but only required for public clients.
    required: (_ctx, client) => client.clientAuthMethod === 'none',
  },
  // issue a refresh token to every client allowed the refresh_token grant,
  // even when offline_access was dropped (e.g. prompt without consent);
  // none at all with IDP_NO_REFRESH_TOKEN=1.
  issueRefreshToken: async (_ctx, client) => !NO_RT && client.grantTypeAllowed('refresh_token'),
  // Codes without offline_access (dropped unless prompt=consent) tie the grant to the
  // provider session, which revokes it at logout; IDP_GRANTS_OUTLIVE_LOGOUT unties it.
  expiresWithSession: async (_ctx, source) => !GRANTS_OUTLIVE_LOGOUT && !source.scopes.has('offline_access'),
  formats: {
    // opaque token length: 6 bits per character
    bitsOfOpaqueRandomness: (_ctx, token) => {
      if (token.kind === 'AccessToken') return AT_CHARS * 6;
      if (token.kind === 'RefreshToken') return RT_CHARS * 6;
      return 256;
    },
  },
  responseTypes: ['code'],
  // default: never rotate refresh tokens (simpler to reason about in refresh
  // tests); IDP_ROTATE_REFRESH_TOKEN=1 rotates on every use.
  rotateRefreshToken: () => ROTATE_RT,
  ttl: {
    AccessToken: AT_TTL,
    AuthorizationCode: 60,
    IdToken: IDT_TTL,
    RefreshToken: RT_TTL,
    Interaction: 3600,
    Session: 14 * 24 * 3600,
    Grant: 14 * 24 * 3600,
  },
  renderError: async (ctx, out) => {
    ctx.type = 'html';
    ctx.body = `<!DOCTYPE html><html><head><title>IdP error</title></head><body><h1>IdP error</h1><pre>${
      Object.entries(out).map(([k, v]) => `${k}: ${String(v).replace(/[<>&]/g, '')}`).join('\n')
    }</pre></body></html>`;
  },
};

const provider = new Provider(ISSUER, configuration);

// oidc-provider puts `sid` into ID tokens only for clients registered with a
// back-channel logout URI (and session_required). Make every client do so.
// IDP_NO_SID=1: none does (logout tokens still name the sid, as session_required asks).
const INCLUDE_SID = process.env.IDP_NO_SID !== '1';
provider.Client.prototype.includeSid = function includeSid() { return INCLUDE_SID; };

// oidc-provider accepts client_secret_basic and client_secret_post alike for a
// client registered with either; IDP_STRICT_CLIENT_AUTH=1 holds it to its own.
if (STRICT_CLIENT_AUTH) {
  const compare = provider.Client.prototype.compareClientSecret;
  provider.Client.prototype.compareClientSecret = function strict(actual) {
    const used = Provider.ctx?.headers.authorization !== undefined ? 'client_secret_basic' : 'client_secret_post';
    if (used !== this.clientAuthMethod) {
      throw new errors.InvalidClientAuth(`${used} used, client registered for ${this.clientAuthMethod}`);
    }
    return compare.call(this, actual);
  };
}

let served = 0;
provider.use(async (ctx, next) => {
  const t0 = process.hrtime.bigint();
  try {
    await next();
  } finally {
    served += 1;
    if (LOG) {
      const ms = Number(process.hrtime.bigint() - t0) / 1e6;
      process.stdout.write(`REQ ${served} ${new Date().toISOString()} ${ctx.method} ${ctx.path} ${ctx.status} ${ms.toFixed(1)}ms\n`);
    }
  }
});

provider.use(async (ctx, next) => {
  const file = ctx.path === '/token' && ctx.method === 'POST' ? env.IDP_TOKEN_OVERRIDE_FILE
    : ctx.path === '/me' ? env.IDP_USERINFO_OVERRIDE_FILE : undefined;
  if (file && fs.existsSync(file)) {
    const [, status, type, body] = fs.readFileSync(file, 'utf8').match(/^(\d+) (\S+) ?([\s\S]*)$/) || [];
    if (status) {
      ctx.status = Number(status);
      if (type !== '-') ctx.type = type;
      ctx.body = body || '';
      return;
    }
  }
  await next();
});

provider.on('server_error', (_ctx, err) => { console.error('server_error', err); });
provider.on('grant.error', (_ctx, err) => { console.error('grant.error', err.message, err.error_description || ''); });
provider.on('backchannel.success', (_ctx, client, accountId, sid) => {
  console.log(`BCL ok client=${client.clientId} sub=${accountId} sid=${sid} uri=${client.backchannelLogoutUri}`);
});
provider.on('backchannel.error', (_ctx, err, client, accountId, sid) => {
  console.log(`BCL error client=${client.clientId} sub=${accountId} sid=${sid} uri=${client.backchannelLogoutUri} err=${JSON.stringify(err.message)}`);
});

const server = provider.listen(PORT, '127.0.0.1', () => {
  console.log(`READY issuer=${ISSUER} port=${PORT} client_id=${CLIENT_ID} auth=${AUTH_METHOD} at_ttl=${AT_TTL}s at_chars=${AT_CHARS} rt_chars=${RT_CHARS} rotate_rt=${ROTATE_RT ? 1 : 0} no_rt=${NO_RT ? 1 : 0} strict_auth=${STRICT_CLIENT_AUTH ? 1 : 0} backchannel=${BACKCHANNEL_URI || '-'}`);
  console.log(`redirect_uris=${REDIRECT_URIS.join(' ')}`);
  console.log(`post_logout_redirect_uris=${POST_LOGOUT_REDIRECT_URIS.join(' ')}`);
  if (extraClients.length) console.log(`extra_clients=${extraClients.map((c) => c.client_id).join(' ')}`);
});
server.on('error', (err) => {
  console.error(`idp: listen on 127.0.0.1:${PORT} failed: ${err.message}`);
  process.exit(1);
});

function shutdown() {
  server.close(() => process.exit(0));
  // keep-alive browser connections would hold close() open
  server.closeAllConnections?.();
  setTimeout(() => process.exit(0), 1000).unref();
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
