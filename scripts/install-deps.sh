#!/usr/bin/env bash
# Idempotent install of the system packages that portcullis' tests, demo and
# benchmarks need on a Debian 12 machine (run as root; CI runs as root).
#
#   chromium, fonts-liberation  headless browser for tests/js/browser-e2e.mjs
#   redis-server                 session store backend tests
#   nginx                        reverse-proxy / upstream fixtures
#   prometheus                   scraping the /metrics endpoint in ops tests
#   openssl                      test certificates for the TLS tests
#   python3-venv                 the deploy checks' virtualenv (kubernetes-validate, from PyPI)
#   procps                       `kill`, with which the tests stop the servers they started
#   build-essential              only when there is no C compiler: cargo links with `cc`
#
# Packages are installed only when missing, `apt-get update` runs only when
# something is missing, and a temporary policy-rc.d keeps the packages from
# starting system services (tests start their own instances on loopback).
#
# Rust is not installed here (the toolchain is the machine's: https://rustup.rs),
# so a missing cargo is a hard error.
set -euo pipefail

if ! command -v cargo >/dev/null 2>&1 && [ ! -x "${HOME:-/root}/.cargo/bin/cargo" ]; then
  echo "install-deps: ERROR: cargo not found. Install a Rust toolchain (>= 1.88) first," >&2
  echo "install-deps:        e.g. from https://rustup.rs; this script installs no toolchain." >&2
  exit 1
fi
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  echo "install-deps: ERROR: node and npm (Node.js >= 20) are required for tests/js." >&2
  exit 1
fi

PACKAGES=(chromium fonts-liberation redis-server nginx prometheus openssl python3-venv procps)
# A Rust toolchain from rustup brings no linker of its own.
if ! command -v cc >/dev/null 2>&1; then
  PACKAGES+=(build-essential)
fi

is_installed() {
  [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" = "install ok installed" ]
}

missing=()
for p in "${PACKAGES[@]}"; do
  if ! is_installed "$p"; then
    missing+=("$p")
  fi
done

if [ "${#missing[@]}" -eq 0 ]; then
  echo "install-deps: system packages present: ${PACKAGES[*]}"
else
  echo "install-deps: installing missing packages: ${missing[*]}"
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
      SUDO="sudo"
    else
      echo "install-deps: ERROR: need root (or sudo) to apt-get install ${missing[*]}" >&2
      exit 1
    fi
  fi

  # Keep dpkg from starting services (nginx, redis, prometheus) while
  # installing; only if no policy is in place already, and removed afterwards.
  POLICY=/usr/sbin/policy-rc.d
  created_policy=0
  cleanup() {
    if [ "$created_policy" -eq 1 ]; then
      $SUDO rm -f "$POLICY"
    fi
  }
  trap cleanup EXIT
  if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\n# temporary, from portcullis scripts/install-deps.sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
    $SUDO chmod 0755 "$POLICY"
    created_policy=1
  fi

  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if ! command -v chromium >/dev/null 2>&1 || [ ! -x /usr/bin/chromium ]; then
  echo "install-deps: ERROR: /usr/bin/chromium is missing after install" >&2
  exit 1
fi
echo "install-deps: ok ($(/usr/bin/chromium --version 2>/dev/null | head -n1))"
