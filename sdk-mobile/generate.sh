#!/usr/bin/env bash
# Generates the Kotlin (dev.kith.sdk), Swift (Kith) and Python (kith) bindings of
# sdk-mobile from the unstripped debug library, into sdk-mobile/bindings (or into the
# directory given as $1, which CI uses to check that the committed bindings are current).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-sdk-mobile/bindings}"
cargo build --quiet -p kith-sdk-mobile --features bindgen --bin uniffi-bindgen
cargo build --quiet -p kith-sdk-mobile --lib
for language in kotlin swift python; do
  rm -rf "${out:?}/$language"
  target/debug/uniffi-bindgen generate target/debug/libkith.so \
    --language "$language" --out-dir "$out/$language" --no-format
done
echo "bindings generated in $out"
