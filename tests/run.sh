#!/usr/bin/env bash
# Runs every Kith test, installing first what the tests need. Safe to run again: each
# install step is idempotent. This is the README's test command and what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "Rust components"
rustup component add rustfmt clippy
rustup target add wasm32-unknown-unknown

step "System packages: Debian's JNA (Kotlin bindings on the JVM), Chromium (browser SDK), PostgreSQL (warehouse source), venv (pytest)"
if [ ! -f /usr/share/java/jna.jar ] || [ ! -x /usr/bin/chromium ] \
  || ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
  || ! python3 -c 'import ensurepip' >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libjna-java chromium postgresql python3-venv
fi

step "wasm-bindgen-cli, pinned to the wasm-bindgen crate's version"
if [ "$(wasm-bindgen --version 2>/dev/null)" != "wasm-bindgen 0.2.130" ]; then
  cargo install wasm-bindgen-cli --version 0.2.130
fi

step "npm and PyPI packages (pinned): client libraries, Kotlin compiler, Playwright, tsc, binaryen, terser, pytest"
(cd tests/compat && npm ci --no-audit --no-fund --loglevel=error)
(cd sdk-mobile/tools && npm ci --no-audit --no-fund --loglevel=error)
(cd sdk-wasm/tests && npm ci --no-audit --no-fund --loglevel=error)
if [ ! -x tests/compat/.venv/bin/python ]; then
  python3 -m venv tests/compat/.venv
fi
tests/compat/.venv/bin/pip install --quiet --disable-pip-version-check -r tests/compat/requirements.txt

step "Formatting and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings

step "sdk-mobile: the committed Kotlin, Swift and Python bindings are current"
generated=$(mktemp -d)
trap 'rm -rf "$generated"' EXIT
bash sdk-mobile/generate.sh "$generated"
if ! diff -r sdk-mobile/bindings "$generated"; then
  echo "sdk-mobile/bindings differ from what sdk-mobile/generate.sh produces: run it and commit" >&2
  exit 1
fi
# No Swift compiler exists on Linux; the C header of the Swift bindings is checked with gcc.
gcc -fsyntax-only -Wno-pragma-once-outside-header -D_Nonnull= -D_Nullable= -x c sdk-mobile/bindings/swift/KithFFI.h

step "sdk-core and sdk-wasm lint clean for the browser (wasm32)"
cargo clippy --quiet -p kith-sdk-core -p kith-sdk-wasm --target wasm32-unknown-unknown -- -D warnings

step "Tests (unit, integration, property, fault injection, crash, client libraries)"
cargo test --workspace -- --include-ignored

step "Python bindings under pytest"
tests/compat/.venv/bin/python -m pytest -q sdk-mobile/tests/python

step "Browser SDK: the npm package, then real Chromium against the real collector"
bash sdk-wasm/build.sh
node --test sdk-wasm/tests/

step "Load tool smoke run (the real figures come from a release build, see BENCHMARKS.md)"
cargo build --quiet -p kith-collector --bins
target/debug/kith-load --events 5000 --clients 4
