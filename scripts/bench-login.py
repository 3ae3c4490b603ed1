#!/usr/bin/env python3
"""Log in through portcullis like a browser would, for scripts/bench.sh.

    python3 scripts/bench-login.py [--user NAME] [--expect TEXT] URL

URL is a protected URL on the gateway (e.g. http://127.0.0.1:4180/bench). The walker
  1. GETs URL with `Accept: text/html` and follows the redirects to the OpenID provider
     (tests/js/idp.mjs, whose development login form accepts any user and password),
  2. submits the login form (prompt=login, login=<user>, password=x), then the consent
     form (prompt=consent), keeping every hidden field the forms carry,
  3. follows the redirects back through the gateway's /oauth2/callback to URL, which must
     answer 200 (and contain --expect TEXT when given),
  4. prints the value of a `Cookie:` header carrying only the gateway's session cookies
     (`_portcullis`, or its chunks `_portcullis_0`, `_portcullis_1`, ...).

Cookies are not port-scoped, so the provider's cookies (idp_*) live on the same host as the
gateway's in the jar; only `_portcullis*` names are printed (pending flow cookies, if any,
are left out). Standard library only. Exit status 0 on success, 1 on failure (diagnostics
on stderr).
"""

import argparse
import http.cookiejar
import sys
import urllib.error
import urllib.parse
import urllib.request
from html.parser import HTMLParser

COOKIE_PREFIX = "_portcullis"
FLOW_PREFIX = "_portcullis_flow_"


class Forms(HTMLParser):
    """Collects every <form> with its named <input> and <button> fields."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.forms = []
        self._cur = None

    def handle_starttag(self, tag, attrs):
        a = {k.lower(): (v or "") for k, v in attrs}
        if tag == "form":
            self._cur = {"action": a.get("action", ""), "method": a.get("method", "get").lower(),
                         "fields": {}}
            self.forms.append(self._cur)
        elif self._cur is not None and tag in ("input", "button") and a.get("name"):
            kind = a.get("type", "text" if tag == "input" else "submit").lower()
            if kind in ("submit", "button", "image", "checkbox", "radio"):
                return
            self._cur["fields"][a["name"]] = a.get("value", "")

    def handle_endtag(self, tag):
        if tag == "form":
            self._cur = None


class Fail(Exception):
    pass


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("url")
    ap.add_argument("--user", default="benchuser")
    ap.add_argument("--expect", default=None, help="text the final page must contain")
    ap.add_argument("--timeout", type=float, default=15.0)
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()

    trace = []

    def say(msg):
        trace.append(msg)
        if args.verbose:
            print(f"bench-login: {msg}", file=sys.stderr)

    gw = urllib.parse.urlsplit(args.url)
    gw_origin = (gw.scheme, gw.hostname, gw.port)
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    opener.addheaders = [("User-Agent", "portcullis-bench-login/1"),
                         ("Accept", "text/html,application/xhtml+xml;q=0.9,*/*;q=0.8")]

    def fetch(req):
        try:
            with opener.open(req, timeout=args.timeout) as r:
                return r.status, r.geturl(), r.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as e:
            return e.code, e.geturl(), e.read().decode("utf-8", "replace")
        except (urllib.error.URLError, OSError) as e:
            url = req if isinstance(req, str) else req.full_url
            raise Fail(f"request to {url} failed: {e}") from e

    def find_form(body, prompt):
        p = Forms()
        p.feed(body)
        return next((f for f in p.forms if f["fields"].get("prompt") == prompt), None)

    def has_form(body, prompt):
        return find_form(body, prompt) is not None

    def submit(url, body, prompt, fill):
        form = find_form(body, prompt)
        if form is None:
            raise Fail(f"no {prompt} form at {url} (HTTP page body starts: {body[:300]!r})")
        data = dict(form["fields"])
        data.update(fill)
        action = urllib.parse.urljoin(url, form["action"] or url)
        enc = urllib.parse.urlencode(data)
        say(f"submit {prompt} form: {form['method'].upper()} {action} fields={sorted(data)}")
        if form["method"] == "post":
            req = urllib.request.Request(action, data=enc.encode(), method="POST", headers={
                "Content-Type": "application/x-www-form-urlencoded"})
        else:
            req = urllib.request.Request(f"{action}{'&' if '?' in action else '?'}{enc}")
        return fetch(req)

    try:
        status, url, body = fetch(args.url)
        say(f"GET {args.url} -> {status} at {url}")
        if status != 200:
            raise Fail(f"expected the provider's login page, got HTTP {status} at {url}")
        status, url, body = submit(url, body, "login", {"login": args.user, "password": "x"})
        say(f"  -> {status} at {url}")
        if status == 200 and has_form(body, "consent"):
            status, url, body = submit(url, body, "consent", {})
            say(f"  -> {status} at {url}")
        here = urllib.parse.urlsplit(url)
        if (here.scheme, here.hostname, here.port) != gw_origin:
            raise Fail(f"did not come back to the gateway: ended at {url} with HTTP {status}: {body[:300]!r}")
        if status != 200:
            raise Fail(f"the gateway answered HTTP {status} at {url}: {body[:300]!r}")
        if args.expect is not None and args.expect not in body:
            raise Fail(f"final page at {url} does not contain {args.expect!r}: {body[:300]!r}")

        probe = urllib.request.Request(args.url)
        jar.add_cookie_header(probe)
        pairs = [kv.strip() for kv in (probe.get_header("Cookie") or "").split(";") if kv.strip()]
        kept = [kv for kv in pairs
                if kv.startswith(COOKIE_PREFIX) and not kv.startswith(FLOW_PREFIX)]
        if not kept:
            raise Fail(f"logged in, but no {COOKIE_PREFIX}* cookie in the jar for {args.url} "
                       f"(cookies: {[c.name for c in jar]})")
    except Fail as e:
        print(f"bench-login: FAILED: {e}", file=sys.stderr)
        for t in trace:
            print(f"bench-login:   {t}", file=sys.stderr)
        return 1
    say(f"session cookies: {[kv.split('=', 1)[0] for kv in kept]}")
    print("; ".join(kept))
    return 0


if __name__ == "__main__":
    sys.exit(main())
