// The demo "legacy app" that sits behind portcullis (node:http only).
//
//   DEMO_APP_PORT   listen port on 127.0.0.1 (default 8081)
//   DEMO_APP_LOG    "0" disables the per-request log line on stdout
//
//   GET /echo, /api/echo   JSON {method, path, headers}
//   anything else          HTML page showing every request header it received,
//                          highlighting the ones the gateway adds
//
// It shows the Authorization header as received: it is a demo for a developer
// on loopback, never something to deploy.

import http from 'node:http';

const PORT = Number.parseInt(process.env.DEMO_APP_PORT || '8081', 10);
const LOG = process.env.DEMO_APP_LOG !== '0';

const HIGHLIGHT = new Set([
  'authorization',
  'x-forwarded-user',
  'x-forwarded-email',
  'x-forwarded-groups',
  'x-forwarded-preferred-username',
  'x-request-id',
]);

const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({
  '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;',
}[c]));

function headerPairs(req) {
  // rawHeaders keeps the received order, spelling and repeated headers
  const pairs = [];
  for (let i = 0; i < req.rawHeaders.length; i += 2) pairs.push([req.rawHeaders[i], req.rawHeaders[i + 1]]);
  return pairs;
}

function page(req) {
  const email = req.headers['x-forwarded-email'];
  const user = req.headers['x-forwarded-user'];
  // The gateway's headers first, then the browser's, each in the order received.
  const pairs = headerPairs(req);
  const ordered = [
    ...pairs.filter(([k]) => HIGHLIGHT.has(k.toLowerCase())),
    ...pairs.filter(([k]) => !HIGHLIGHT.has(k.toLowerCase())),
  ];
  const rows = ordered.map(([k, v]) => {
    const hl = HIGHLIGHT.has(k.toLowerCase());
    return `<tr${hl ? ' class="hl"' : ''}><th>${esc(k)}</th><td><code>${esc(v)}</code></td></tr>`;
  }).join('\n');
  const cookieNote = req.headers.cookie
    ? '<p class="note" id="cookie-note">The <code>Cookie</code> row holds other sites\' cookies, such as the demo provider\'s own session (<code>idp_session</code>): browsers share cookies between the ports of one host, and the gateway passes on what is not its own. The gateway\'s session cookie never reaches the app.</p>'
    : '';
  const signedIn = email
    ? `<p class="who" id="signed-in">Signed in as <strong>${esc(email)}</strong>${user ? ` (user <code>${esc(user)}</code>)` : ''}</p>`
    : '<p class="who" id="anonymous">No <code>X-Forwarded-Email</code> header: this request did not come through the gateway, or the gateway sends no identity headers.</p>';
  return `<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Demo app behind portcullis</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 60rem; padding: 0 1rem; color: #222; }
  h1 { font-size: 1.5rem; margin-bottom: .25rem; }
  .request { color: #555; margin-top: 0; }
  .who { font-size: 1.1rem; }
  nav a { margin-right: 1.25rem; }
  table { border-collapse: collapse; width: 100%; margin-top: 1rem; }
  th, td { text-align: left; vertical-align: top; padding: .35rem .6rem; border-bottom: 1px solid #ddd; }
  th { white-space: nowrap; font-weight: 600; }
  td code { word-break: break-all; }
  tr.hl { background: #fff4c2; }
  .note { color: #666; font-size: .9rem; }
</style>
</head>
<body>
<h1>Demo app behind portcullis</h1>
<p class="request">Request: <code id="request-line">${esc(req.method)} ${esc(req.url)}</code></p>
${signedIn}
<nav><a href="/oauth2/sign_out" id="sign-out">Sign out</a><a href="/oauth2/userinfo" id="userinfo">/oauth2/userinfo</a><a href="/echo">/echo (JSON)</a></nav>
<h2>Request headers received by the app</h2>
<p class="note">Highlighted, first: the headers the gateway sets (Authorization, X-Forwarded-User, X-Forwarded-Email, X-Forwarded-Groups, X-Forwarded-Preferred-Username, X-Request-Id). The demo provider makes the email up from the username you typed.</p>
${cookieNote}
<table id="headers">
${rows}
</table>
</body>
</html>
`;
}

const server = http.createServer((req, res) => {
  const t0 = process.hrtime.bigint();
  res.on('finish', () => {
    if (LOG) {
      const ms = Number(process.hrtime.bigint() - t0) / 1e6;
      process.stdout.write(`REQ ${new Date().toISOString()} ${req.method} ${req.url} ${res.statusCode} ${ms.toFixed(1)}ms\n`);
    }
  });
  // drain any request body; the app does not use it
  req.resume();
  req.on('end', () => {
    const pathname = (req.url || '/').split('?')[0];
    if (pathname === '/echo' || pathname === '/api/echo') {
      const body = JSON.stringify({ method: req.method, path: req.url, headers: req.headers }, null, 2);
      res.writeHead(200, {
        'content-type': 'application/json; charset=utf-8',
        'cache-control': 'no-store',
        'content-length': Buffer.byteLength(body),
      });
      res.end(req.method === 'HEAD' ? undefined : body);
      return;
    }
    const body = page(req);
    res.writeHead(200, {
      'content-type': 'text/html; charset=utf-8',
      'cache-control': 'no-store',
      'content-length': Buffer.byteLength(body),
    });
    res.end(req.method === 'HEAD' ? undefined : body);
  });
});

server.on('error', (err) => {
  console.error(`demo-app: listen on 127.0.0.1:${PORT} failed: ${err.message}`);
  process.exit(1);
});
server.listen(PORT, '127.0.0.1', () => {
  console.log(`READY demo-app http://127.0.0.1:${PORT}/`);
});

function shutdown() {
  server.close(() => process.exit(0));
  server.closeAllConnections?.();
  setTimeout(() => process.exit(0), 1000).unref();
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
