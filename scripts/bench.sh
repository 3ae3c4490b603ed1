#!/usr/bin/env bash
# `make bench`: criterion micro-benchmarks, then a wrk load test of the release gateway.
#
#   1. cargo bench --bench hot_path (short warm-up and measurement times)
#   2. on free loopback ports: an upstream nginx (single process), the OpenID provider
#      (tests/js/idp.mjs) and target/release/portcullis; log in with scripts/bench-login.py,
#      then wrk -t1 -c64 against
#        a. the upstream directly (/bench with a dummy bearer),
#        b. portcullis /bench with the session cookie (small session),
#        c. portcullis /bench with a ~8 KB chunked session (IdP restarted with
#           IDP_ACCESS_TOKEN_CHARS=6000, gateway restarted, logged in again),
#      each after a warm-up, and print a markdown table (req/s, latency, non-2xx responses,
#      server CPU time per request, server peak RSS).
#
# Fails (exit 1) when any request through portcullis was not answered 2xx (the upstream's
# /bench answers 401 without a bearer, so every measured request proves the bearer passed).
# Builds nothing: the Makefile target depends on `build` and `deps-node`. Installs curl, nginx
# and wrk (apt-get, as root) when they are missing.
#
# Environment:
#   BENCH_DURATION     measured wrk run per target (default 10s)
#   BENCH_WARMUP       wrk warm-up before each measured run (default 2s)
#   BENCH_CONNECTIONS  wrk connections (default 64)
#   BENCH_BIG_TOKEN_CHARS  access-token length for the big-session run (default 6000: ~9.6 KB
#                      of cookie in 3 chunks with tests/js/idp.mjs)
#   BENCH_CRITERION    0 skips the criterion micro-benchmarks (default 1)
#   BENCH_KEEP         1 keeps the temp dir (configs, logs, wrk output) (default 0)
#   PORTCULLIS_BIN     gateway binary (default target/release/portcullis)
#
# Pinning (when taskset exists and there are >= 2 CPUs): portcullis on CPU 0, wrk, the
# upstream nginx and the IdP on CPU 1. Every process started here is stopped on exit, by pid.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
export PATH="${HOME:-/root}/.cargo/bin:$PATH"

BIN=${PORTCULLIS_BIN:-target/release/portcullis}
DURATION=${BENCH_DURATION:-10s}
WARMUP=${BENCH_WARMUP:-2s}
CONNS=${BENCH_CONNECTIONS:-64}
CRITERION=${BENCH_CRITERION:-1}
KEEP=${BENCH_KEEP:-0}
BIG_TOKEN_CHARS=${BENCH_BIG_TOKEN_CHARS:-6000}

log() { printf 'bench: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ------------------------------------------------------------------ preconditions
# A tool from its Debian package, installed when missing (as root, with apt-get). Services the
# package would start (nginx's on port 80) stay stopped: policy-rc.d says no for the install.
ensure_tool() {
  local tool=$1 pkg=$2
  command -v "$tool" >/dev/null 2>&1 && return 0
  if [ "$(id -u)" -ne 0 ]; then
    die "$tool is not installed and this is not root: install it first (sudo apt-get install $pkg)"
  fi
  command -v apt-get >/dev/null 2>&1 || die "$tool is not installed and apt-get is not available"
  log "installing $pkg (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  local policy=/usr/sbin/policy-rc.d made=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 0755 "$policy" && made=1
  fi
  if ! apt-get install -y -q --no-install-recommends "$pkg" >&2; then
    apt-get update -q >&2
    apt-get install -y -q --no-install-recommends "$pkg" >&2 || true
  fi
  [ "$made" -eq 1 ] && rm -f "$policy"
  command -v "$tool" >/dev/null 2>&1 || die "$tool still missing after apt-get install $pkg"
}

[ -x "$BIN" ] || die "$BIN not found: run \`make build\` first (or set PORTCULLIS_BIN)"
[ -d tests/js/node_modules/oidc-provider ] || die "tests/js/node_modules is missing: run \`make deps-node\`"
for tool in node python3; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool not found"
done
ensure_tool curl curl
ensure_tool nginx nginx
ensure_tool wrk wrk

# ------------------------------------------------------- 1. criterion micro-benchmarks
if [ "$CRITERION" != 0 ]; then
  log "criterion micro-benchmarks (cargo bench --bench hot_path)"
  "${CARGO:-cargo}" bench --locked --bench hot_path -- --warm-up-time 1 --measurement-time 3
else
  log "BENCH_CRITERION=0: skipping the criterion micro-benchmarks"
fi

# ------------------------------------------------------------------ process control
TMP=$(mktemp -d "${TMPDIR:-/tmp}/portcullis-bench.XXXXXX")
PIDS=()
LAST_PID=""

stop_pid() { # pid: TERM, up to 5 s, then KILL
  local pid=$1 i
  [ -n "$pid" ] || return 0
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
  local keep=() p
  for p in "${PIDS[@]}"; do [ "$p" != "$pid" ] && keep+=("$p"); done
  PIDS=("${keep[@]+"${keep[@]}"}")
}

cleanup() {
  local rc=$? i
  trap - EXIT INT TERM
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do stop_pid "${PIDS[i]}"; done
  if [ "$KEEP" = 1 ]; then
    log "kept $TMP"
  else
    rm -rf "$TMP"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'log interrupted; exit 130' INT
trap 'log terminated; exit 143' TERM

PIN=0
if command -v taskset >/dev/null 2>&1 && [ "$(nproc)" -ge 2 ]; then
  PIN=1
fi
GW_CPU=0
LOAD_CPU=1

start() { # name cpu cmd... (output to $TMP/name.log, truncated); sets LAST_PID
  local name=$1 cpu=$2
  shift 2
  if [ "$PIN" = 1 ]; then
    taskset -c "$cpu" "$@" >"$TMP/$name.log" 2>&1 &
  else
    "$@" >"$TMP/$name.log" 2>&1 &
  fi
  LAST_PID=$!
  PIDS+=("$LAST_PID")
}

alive_or_die() { # pid name
  kill -0 "$1" 2>/dev/null && return 0
  tail -n 20 "$TMP/$2.log" >&2 || true
  die "$2 exited (log above)"
}

wait_line() { # name regex seconds pid
  local i
  for ((i = 0; i < $3 * 10; i++)); do
    grep -qE "$2" "$TMP/$1.log" 2>/dev/null && return 0
    alive_or_die "$4" "$1"
    sleep 0.1
  done
  tail -n 20 "$TMP/$1.log" >&2 || true
  die "$1 printed no line matching /$2/ within $3 s"
}

http_code() { # url [curl args...]
  local url=$1
  shift
  curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$@" "$url" || true
}

wait_http() { # name url code seconds pid
  local i code=""
  for ((i = 0; i < $4 * 10; i++)); do
    code=$(http_code "$2")
    [ "$code" = "$3" ] && return 0
    alive_or_die "$5" "$1"
    sleep 0.1
  done
  die "$1: $2 did not answer $3 within $4 s (last: ${code:-none})"
}

# Free ports on 127.0.0.1 (all bound at once so they are distinct, then released).
read -r UP_PORT IDP_PORT GW_PORT < <(python3 -c '
import socket
ss = [socket.socket() for _ in range(3)]
for s in ss:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in ss))
for s in ss:
    s.close()
')
GW="http://127.0.0.1:$GW_PORT"
UP="http://127.0.0.1:$UP_PORT"
ISSUER="http://127.0.0.1:$IDP_PORT"
CLIENT_SECRET=$(head -c 24 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')
COOKIE_SECRET=$("$BIN" secret)

# ------------------------------------------------------------------ upstream nginx
mkdir -p "$TMP/nginx-tmp"
cat >"$TMP/nginx.conf" <<EOF
daemon off;
master_process off;
worker_processes 1;
pid $TMP/nginx.pid;
error_log $TMP/nginx-error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    server_tokens off;
    default_type text/plain;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    large_client_header_buffers 4 32k;
    client_body_temp_path $TMP/nginx-tmp/body;
    proxy_temp_path $TMP/nginx-tmp/proxy;
    fastcgi_temp_path $TMP/nginx-tmp/fastcgi;
    uwsgi_temp_path $TMP/nginx-tmp/uwsgi;
    scgi_temp_path $TMP/nginx-tmp/scgi;
    server {
        listen 127.0.0.1:$UP_PORT;
        location = /bench {
            if (\$http_authorization !~ "^Bearer ") { return 401; }
            return 200 "ok\n";
        }
        location / { return 200 "ok\n"; }
    }
}
EOF
NGINX=(nginx -p "$TMP/" -e "$TMP/nginx-error.log" -c "$TMP/nginx.conf")
"${NGINX[@]}" -t -q 2>"$TMP/nginx-t.log" || { cat "$TMP/nginx-t.log" >&2; die "upstream nginx config invalid"; }
start upstream "$LOAD_CPU" "${NGINX[@]}"
UP_PID=$LAST_PID
wait_http upstream "$UP/" 200 10 "$UP_PID"
[ "$(http_code "$UP/bench")" = 401 ] || die "upstream /bench must answer 401 without a bearer"
[ "$(http_code "$UP/bench" -H 'Authorization: Bearer x')" = 200 ] || die "upstream /bench with a bearer must answer 200"

# ------------------------------------------------------------------ IdP and gateway
IDP_PID=""
GW_PID=""

GW_LOG_NAME=""

start_idp() { # log-name access-token-chars
  start "$1" "$LOAD_CPU" env IDP_PORT="$IDP_PORT" IDP_CLIENT_SECRET="$CLIENT_SECRET" \
    IDP_REDIRECT_URIS="$GW/oauth2/callback" IDP_LOG=0 IDP_ACCESS_TOKEN_CHARS="$2" \
    node tests/js/idp.mjs
  IDP_PID=$LAST_PID
  wait_line "$1" '^READY ' 30 "$IDP_PID"
}

cat >"$TMP/portcullis.yaml" <<EOF
listen: "127.0.0.1:$GW_PORT"
upstream: "$UP"
provider:
  issuer_url: "$ISSUER"
  client_id: "portcullis"
  client_secret: "$CLIENT_SECRET"
  scopes: ["openid", "email", "profile", "offline_access"]
redirect_url: "$GW/oauth2/callback"
cookie:
  secrets: ["$COOKIE_SECRET"]
  secure: false
admin: { listen: "" }
log: { level: warn }
lifecycle: { shutdown_delay: 0s }
EOF
"$BIN" check --config "$TMP/portcullis.yaml" >/dev/null || die "generated gateway config rejected"

start_gateway() { # log-name
  GW_LOG_NAME=$1
  start "$1" "$GW_CPU" "$BIN" --config "$TMP/portcullis.yaml"
  GW_PID=$LAST_PID
  wait_http "$1" "$GW/readyz" 200 30 "$GW_PID"
}

login() { # out-file: the Cookie header value
  python3 scripts/bench-login.py --user benchuser --expect ok "$GW/bench" >"$1" 2>"$1.err" \
    || { cat "$1.err" >&2; die "login through portcullis failed"; }
  [ "$(http_code "$GW/bench" -H "Cookie: $(cat "$1")")" = 200 ] \
    || die "portcullis /bench with the session cookie did not answer 200"
}

# ------------------------------------------------------------------ load
cat >"$TMP/count.lua" <<'EOF'
-- Counts responses that are not 2xx (wrk itself only reports status >= 400 as errors) and
-- prints one summary line for bench.sh.
local threads = {}

function setup(thread)
   table.insert(threads, thread)
end

function init(args)
   ok = 0
   bad = 0
   first_bad = "-"
end

function response(status, headers, body)
   if status >= 200 and status < 300 then
      ok = ok + 1
   else
      bad = bad + 1
      if first_bad == "-" then first_bad = tostring(status) end
   end
end

function done(summary, latency, requests)
   local ok_n, bad_n, first = 0, 0, "-"
   for _, t in ipairs(threads) do
      ok_n = ok_n + t:get("ok")
      bad_n = bad_n + t:get("bad")
      if first == "-" then first = t:get("first_bad") end
   end
   local e = summary.errors
   io.write(string.format(
      "BENCH requests=%d ok=%d non2xx=%d first_bad=%s sock_errors=%d duration_us=%d p50_us=%d p99_us=%d\n",
      summary.requests, ok_n, bad_n, first, e.connect + e.read + e.write + e.timeout,
      summary.duration, latency:percentile(50), latency:percentile(99)))
end
EOF

run_wrk() { # out-file duration url header
  local out=$1 d=$2 url=$3 hdr=$4
  local cmd=(wrk -t1 -c"$CONNS" -d"$d" --timeout 5s -s "$TMP/count.lua" -H "$hdr" "$url")
  if [ "$PIN" = 1 ]; then cmd=(taskset -c "$LOAD_CPU" "${cmd[@]}"); fi
  # in the background + wait, so that a signal reaches the trap at once
  "${cmd[@]}" >"$out" 2>&1 &
  local pid=$!
  PIDS+=("$pid")
  wait "$pid" || { cat "$out" >&2; die "wrk failed"; }
  stop_pid "$pid"
  grep -q '^BENCH ' "$out" || { cat "$out" >&2; die "wrk printed no BENCH line"; }
}

field() { # name file
  sed -n "s/^BENCH .*\\b$1=\\([^ ]*\\).*/\\1/p" "$2"
}

CLK_TCK=$(getconf CLK_TCK)
cpu_ticks() { # pid: utime + stime (all threads), in clock ticks
  local s f
  s=$(<"/proc/$1/stat")
  s=${s##*) }
  read -r -a f <<<"$s"
  echo $((f[11] + f[12]))
}

# busy and total jiffies of CPU $GW_CPU and CPU $LOAD_CPU (or of all CPUs without pinning)
cpu_snap() {
  local sel="cpu"
  [ "$PIN" = 1 ] && sel="cpu$GW_CPU cpu$LOAD_CPU"
  awk -v sel=" $sel " 'index(sel, " " $1 " ") {
      t = 0; for (i = 2; i <= 9 && i <= NF; i++) t += $i
      printf "%d %d ", t - $5 - $6, t
    }' /proc/stat
}

busy_desc() { # "before" "after" snapshots -> "CPU0 97% busy, CPU1 100% busy"
  awk -v a="$1" -v b="$2" -v pin="$PIN" -v c0="$GW_CPU" -v c1="$LOAD_CPU" 'BEGIN {
      n = split(a, x, " ")
      split(b, y, " ")
      out = ""
      for (i = 1; i < n; i += 2) {
        if (pin != 1) name = "all CPUs"
        else if (i == 1) name = "CPU" c0
        else name = "CPU" c1
        dt = y[i + 1] - x[i + 1]
        pct = 0
        if (dt > 0) pct = 100 * (y[i] - x[i]) / dt
        if (out != "") out = out ", "
        out = out sprintf("%s %.0f%% busy", name, pct)
      }
      print out
    }'
}

ROWS=()
NOTES=()
FAILED=0
declare -A RPS CPU_US

# measure key label url header server-name server-pid strict(1: fail on any non-2xx)
measure() {
  local key=$1 label=$2 url=$3 hdr=$4 name=$5 pid=$6 strict=$7 t0 t1 out
  log "$label: warm-up $WARMUP, then $DURATION (wrk -t1 -c$CONNS $url)"
  run_wrk "$TMP/$key-warmup.out" "$WARMUP" "$url" "$hdr"
  alive_or_die "$pid" "$name"
  local s0 s1
  s0=$(cpu_snap)
  t0=$(cpu_ticks "$pid")
  out="$TMP/$key.out"
  run_wrk "$out" "$DURATION" "$url" "$hdr"
  t1=$(cpu_ticks "$pid")
  s1=$(cpu_snap)
  alive_or_die "$pid" "$name"
  local req non2xx sock dur p50 p99 hwm first wnon2xx wsock
  req=$(field requests "$out")
  non2xx=$(field non2xx "$out")
  sock=$(field sock_errors "$out")
  first=$(field first_bad "$out")
  dur=$(field duration_us "$out")
  p50=$(field p50_us "$out")
  p99=$(field p99_us "$out")
  wnon2xx=$(field non2xx "$TMP/$key-warmup.out")
  wsock=$(field sock_errors "$TMP/$key-warmup.out")
  hwm=$(awk '/^VmHWM:/ { print $2 }' "/proc/$pid/status")
  [ "${req:-0}" -gt 0 ] || die "$label: no requests completed"
  RPS[$key]=$(awk -v r="$req" -v d="$dur" 'BEGIN { printf "%.0f", r / (d / 1e6) }')
  CPU_US[$key]=$(awk -v t=$((t1 - t0)) -v hz="$CLK_TCK" -v r="$req" 'BEGIN { printf "%.1f", t * 1e6 / hz / r }')
  local bad="$non2xx"
  [ "$sock" = 0 ] || bad="$bad (+$sock socket errors)"
  ROWS+=("| $label | ${RPS[$key]} | $(awk -v u="$p50" 'BEGIN { printf "%.2f", u / 1000 }') | $(awk -v u="$p99" 'BEGIN { printf "%.2f", u / 1000 }') | $bad | ${CPU_US[$key]} | $(awk -v k="$hwm" 'BEGIN { printf "%.1f", k / 1024 }') |")
  NOTES+=("- $label: $(busy_desc "$s0" "$s1")")
  log "$label: ${RPS[$key]} req/s, $req requests, non-2xx $non2xx (first: $first), socket errors $sock; $(busy_desc "$s0" "$s1")"
  if [ "$strict" = 1 ] && [ "$((non2xx + sock + wnon2xx + wsock))" -ne 0 ]; then
    log "FAIL: $label: $non2xx non-2xx (first: $first) and $sock socket errors measured, $wnon2xx non-2xx and $wsock socket errors during the warm-up"
    FAILED=1
  fi
}

cookie_desc() { # cookie-file
  local c n
  c=$(cat "$1")
  n=$(tr ';' '\n' <"$1" | grep -c '=')
  echo "${#c} B cookie, $n cookie(s)"
}

LOADAVG=$(cut -d' ' -f1-3 /proc/loadavg)
log "ports: upstream $UP_PORT, IdP $IDP_PORT, portcullis $GW_PORT; temp dir $TMP"
log "pinning: $([ "$PIN" = 1 ] && echo "portcullis on CPU $GW_CPU; wrk, upstream nginx and IdP on CPU $LOAD_CPU" || echo "off (no taskset or < 2 CPUs)")"

start_idp idp 43
start_gateway portcullis
login "$TMP/cookie-small.txt"
SMALL_DESC=$(cookie_desc "$TMP/cookie-small.txt")
log "logged in: $SMALL_DESC"

measure direct "direct: upstream nginx (Bearer x)" "$UP/bench" "Authorization: Bearer x" upstream "$UP_PID" 0
measure small "portcullis ($SMALL_DESC)" "$GW/bench" "Cookie: $(cat "$TMP/cookie-small.txt")" "$GW_LOG_NAME" "$GW_PID" 1

log "restarting the IdP (IDP_ACCESS_TOKEN_CHARS=$BIG_TOKEN_CHARS) and portcullis for the big-session run"
stop_pid "$GW_PID"
stop_pid "$IDP_PID"
start_idp idp-big "$BIG_TOKEN_CHARS"
start_gateway portcullis-big
login "$TMP/cookie-big.txt"
BIG_DESC=$(cookie_desc "$TMP/cookie-big.txt")
log "logged in: $BIG_DESC"
measure big "portcullis, big session ($BIG_DESC)" "$GW/bench" "Cookie: $(cat "$TMP/cookie-big.txt")" "$GW_LOG_NAME" "$GW_PID" 1

# ------------------------------------------------------------------ report
{
  echo
  echo "## portcullis load test ($(date -Iseconds))"
  echo
  echo "wrk -t1 -c$CONNS -d$DURATION (after a $WARMUP warm-up) on 127.0.0.1; GET /bench, 2-byte body."
  echo "Load average before the run: $LOADAVG (other work on this machine skews req/s; CPU-µs/req less so)."
  echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //') x $(nproc);" \
    "$([ "$PIN" = 1 ] && echo "portcullis pinned to CPU $GW_CPU, wrk + upstream nginx + IdP to CPU $LOAD_CPU" || echo "no CPU pinning")."
  echo "CPU-µs/req and RSS (peak, VmHWM) are the server's: nginx for the direct row, portcullis for the others."
  echo
  echo "| target | req/s | p50 ms | p99 ms | non-2xx | CPU-µs/req | RSS MiB |"
  echo "|---|---:|---:|---:|---:|---:|---:|"
  printf '%s\n' "${ROWS[@]}"
  echo
  awk -v g="${RPS[small]}" -v d="${RPS[direct]}" \
    'BEGIN { printf "portcullis req/s / direct req/s: %.2f\n", g / d }'
  awk -v b="${CPU_US[big]}" -v s="${CPU_US[small]}" \
    'BEGIN { printf "portcullis CPU-µs/req, big session / small session: %.2f\n", b / s }'
  echo
  echo "CPU use during the measured runs (wrk's own share included; near 100% on the load CPU means"
  echo "the numbers are bounded by the load generator, not by the server):"
  printf '%s\n' "${NOTES[@]}"
}

if [ "$FAILED" = 1 ]; then
  die "requests through portcullis were not all answered 2xx (see above)"
fi
