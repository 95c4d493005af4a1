#!/usr/bin/env bash
# Runs every Kith test, installing first what the tests need. Safe to run again: each
# install step is idempotent. This is the README's test command and what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "Rust components"
rustup component add rustfmt clippy
rustup target add wasm32-unknown-unknown

step "Client libraries for the compatibility tests (npm and PyPI, pinned)"
(cd tests/compat && npm ci --no-audit --no-fund --loglevel=error)
if [ ! -x tests/compat/.venv/bin/python ]; then
  python3 -m venv tests/compat/.venv
fi
tests/compat/.venv/bin/pip install --quiet --disable-pip-version-check -r tests/compat/requirements.txt

step "Formatting and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings

step "sdk-core builds for the browser (wasm32)"
cargo build --quiet -p kith-sdk-core --target wasm32-unknown-unknown

step "Tests (unit, integration, property, fault injection, crash, client libraries)"
cargo test --workspace -- --include-ignored

step "Load tool smoke run (the real figures come from a release build, see BENCHMARKS.md)"
cargo build --quiet -p kith-collector --bins
target/debug/kith-load --events 5000 --clients 4
