#!/usr/bin/env bash
# Builds the npm package into sdk-wasm/pkg: the wasm module with the size profile,
# wasm-bindgen's ES module glue and types, wasm-opt -Oz, the glue minified by terser (the
# .d.ts keeps the documentation), then package.json and README.
# Needs wasm-bindgen-cli 0.2.130 (the version of the wasm-bindgen crate) and npm binaryen's
# wasm-opt (Debian's binaryen 108 breaks wasm-bindgen's externref table),
# which tests/run.sh installs.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet -p kith-sdk-wasm --target wasm32-unknown-unknown --profile wasm-release
rm -rf sdk-wasm/pkg
wasm-bindgen --target web --remove-name-section --out-dir sdk-wasm/pkg --out-name kith \
  target/wasm32-unknown-unknown/wasm-release/kith_sdk_wasm.wasm
tools=sdk-wasm/tests/node_modules/.bin
"$tools/wasm-opt" -Oz --converge --strip-producers sdk-wasm/pkg/kith_bg.wasm -o sdk-wasm/pkg/kith_bg.wasm
"$tools/terser" sdk-wasm/pkg/kith.js --module --compress --mangle -o sdk-wasm/pkg/kith.js
cp sdk-wasm/npm/package.json sdk-wasm/npm/README.md sdk-wasm/pkg/
echo "npm package built in sdk-wasm/pkg"
