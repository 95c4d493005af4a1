//! UniFFI's binding generator, built from the same uniffi version as the library:
//! `cargo run -p kith-sdk-mobile --features bindgen --bin uniffi-bindgen -- generate ...`
//! (`sdk-mobile/generate.sh` runs it).

fn main() {
    uniffi::uniffi_bindgen_main();
}
