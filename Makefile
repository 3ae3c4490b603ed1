# portcullis: build, test, lint and demo entry points (GNU make).
#
#   make deps    install system packages (chromium, redis, nginx, prometheus)
#                and the Node.js test/demo dependencies, when missing
#   make build   release build of the gateway
#   make test    deps + build + cargo tests + deploy checks + headless-browser
#                end-to-end test
#   make lint    rustfmt check + clippy with warnings as errors
#   make demo    IdP + demo app + gateway on 127.0.0.1 (open http://127.0.0.1:4180/)
#   make bench   criterion micro-benchmarks + wrk load test of the release gateway
#   make clean   remove build outputs and tests/js/node_modules

SHELL := /bin/bash
.DEFAULT_GOAL := build

# rustup installs cargo here; CI shells may not have it on PATH.
export PATH := $(HOME)/.cargo/bin:$(PATH)

CARGO ?= cargo
NODE ?= node
NPM ?= npm
JS_DIR := tests/js
PORTCULLIS_BIN ?= $(or $(CARGO_TARGET_DIR),target)/release/portcullis

# npm writes node_modules/.package-lock.json on every install: use it as the
# stamp, so `npm ci` runs only when node_modules is missing or older than the
# lock file.
JS_STAMP := $(JS_DIR)/node_modules/.package-lock.json

check-deploy: build
	PORTCULLIS_BIN=$(PORTCULLIS_BIN) bash scripts/check-deploy.sh

.PHONY: check-deploy all deps deps-system deps-node check-cargo build test e2e lint fmt demo bench clean

all: build

deps: deps-system deps-node

deps-system:
	./scripts/install-deps.sh

deps-node: $(JS_STAMP)

$(JS_STAMP): $(JS_DIR)/package-lock.json $(JS_DIR)/package.json
	cd $(JS_DIR) && $(NPM) ci --no-audit --no-fund
	touch $@

check-cargo:
	@command -v $(CARGO) >/dev/null 2>&1 || { \
	  echo "ERROR: cargo not found. Install a Rust toolchain (>= 1.88), e.g. from https://rustup.rs, then run make again." >&2; \
	  exit 1; }

build: check-cargo
	$(CARGO) build --release --locked

test: deps build
	$(CARGO) test --locked
	PORTCULLIS_BIN=$(PORTCULLIS_BIN) bash scripts/check-deploy.sh
	PORTCULLIS_BIN=$(PORTCULLIS_BIN) $(NODE) $(JS_DIR)/browser-e2e.mjs

# only the browser end-to-end test (against the release build)
e2e: deps build
	PORTCULLIS_BIN=$(PORTCULLIS_BIN) $(NODE) $(JS_DIR)/browser-e2e.mjs

lint: check-cargo
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets --locked -- -D warnings

fmt: check-cargo
	$(CARGO) fmt --all

demo: deps-node build
	PORTCULLIS_BIN=$(PORTCULLIS_BIN) $(NODE) $(JS_DIR)/demo.mjs

bench: build deps-node
	CARGO=$(CARGO) PORTCULLIS_BIN=$(PORTCULLIS_BIN) bash scripts/bench.sh

clean:
	-$(CARGO) clean
	rm -rf $(JS_DIR)/node_modules
