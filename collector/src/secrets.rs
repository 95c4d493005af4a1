//! Secrets at rest: the credentials the collector generates (the dev write key, the
//! admin token) and those of destinations (webhook and export signing secrets, FCM
//! service-account keys, APNs `.p8` keys, VAPID keys) are stored sealed with
//! AES-256-GCM under one master key, never in clear.
//!
//! The master key comes from `KITH_SECRET_KEY` (64 hex digits), or from a key file
//! (`--secret-key-file`, by default `secret.key` in the data directory), created with
//! mode 0600 on first start when there is none. Keeping the key file apart from the
//! data (or the key in the environment) means a copy of the data directory alone
//! reveals no secret.

use std::io::Write as _;
use std::path::Path;

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use rand_core::RngCore as _;

use crate::error::StoreError;

/// What a sealed value starts with.
const SEALED: &str = "kith:sealed:v1:";
/// The nonce's length, in bytes.
const NONCE_BYTES: usize = 12;

/// The master key that seals and opens secrets.
pub struct MasterKey(Aes256Gcm);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

fn parse_hex(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    if text.len() != 64 {
        return None;
    }
    let mut key = [0u8; 32];
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(key)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl MasterKey {
    /// A key from 32 bytes.
    pub fn new(bytes: &[u8; 32]) -> Self {
        MasterKey(Aes256Gcm::new(aes_gcm::Key::<Aes256Gcm>::from_slice(bytes)))
    }

    /// The key given as 64 hex digits (`KITH_SECRET_KEY`), else the one in `file`,
    /// which is created (mode 0600) with a new random key when it does not exist.
    ///
    /// # Errors
    ///
    /// A given key that is not 64 hex digits, or a key file that cannot be read,
    /// created or parsed.
    pub fn load(given: Option<&str>, file: &Path) -> Result<Self, StoreError> {
        if let Some(text) = given {
            let key = parse_hex(text).ok_or_else(|| {
                StoreError::Start("KITH_SECRET_KEY: not 64 hex digits".to_owned())
            })?;
            return Ok(MasterKey::new(&key));
        }
        let bad = |e: String| StoreError::Start(format!("the key file {}: {e}", file.display()));
        match std::fs::read_to_string(file) {
            Ok(text) => {
                let key = parse_hex(&text).ok_or_else(|| bad("not 64 hex digits".to_owned()))?;
                Ok(MasterKey::new(&key))
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; 32];
                rand_core::OsRng.fill_bytes(&mut key);
                let mut options = std::fs::OpenOptions::new();
                options.write(true).create_new(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
                let mut out = options.open(file).map_err(|e| bad(e.to_string()))?;
                out.write_all(format!("{}\n", hex(&key)).as_bytes())
                    .and_then(|()| out.sync_all())
                    .map_err(|e| bad(e.to_string()))?;
                tracing::info!(file = %file.display(), "created the key that seals stored secrets");
                Ok(MasterKey::new(&key))
            }
            Err(error) => Err(bad(error.to_string())),
        }
    }

    /// `secret` sealed: `kith:sealed:v1:` and the base64 of a random nonce and the
    /// ciphertext.
    pub fn seal(&self, secret: &str) -> String {
        let mut nonce = [0u8; NONCE_BYTES];
        rand_core::OsRng.fill_bytes(&mut nonce);
        // Encryption only fails for inputs of gigabytes.
        let sealed = self
            .0
            .encrypt(Nonce::from_slice(&nonce), secret.as_bytes())
            .unwrap_or_default();
        let mut bytes = nonce.to_vec();
        bytes.extend_from_slice(&sealed);
        format!("{SEALED}{}", STANDARD_NO_PAD.encode(bytes))
    }

    /// Whether `value` is sealed.
    pub fn is_sealed(value: &str) -> bool {
        value.starts_with(SEALED)
    }

    /// The secret in a sealed `value`; a value that is not sealed (written by an
    /// earlier version) is answered as it is.
    ///
    /// # Errors
    ///
    /// A sealed value that does not open with this key (another key, or corrupt).
    pub fn open(&self, value: &str) -> Result<String, StoreError> {
        let Some(encoded) = value.strip_prefix(SEALED) else {
            return Ok(value.to_owned());
        };
        let wrong = || {
            StoreError::Corrupt(
                "a sealed secret does not open with this master key (KITH_SECRET_KEY or the key file changed?)"
                    .to_owned(),
            )
        };
        let bytes = STANDARD_NO_PAD.decode(encoded).map_err(|_| wrong())?;
        if bytes.len() < NONCE_BYTES {
            return Err(wrong());
        }
        let (nonce, sealed) = bytes.split_at(NONCE_BYTES);
        let plain = self
            .0
            .decrypt(Nonce::from_slice(nonce), sealed)
            .map_err(|_| wrong())?;
        String::from_utf8(plain).map_err(|_| wrong())
    }

    /// Seals, in place, the strings of `value` at these JSON pointers.
    pub fn seal_fields(&self, value: &mut serde_json::Value, pointers: &[&str]) {
        for pointer in pointers {
            if let Some(serde_json::Value::String(text)) = value.pointer_mut(pointer)
                && !Self::is_sealed(text)
            {
                *text = self.seal(text);
            }
        }
    }

    /// Opens, in place, the strings of `value` at these JSON pointers.
    ///
    /// # Errors
    ///
    /// As [`MasterKey::open`].
    pub fn open_fields(
        &self,
        value: &mut serde_json::Value,
        pointers: &[&str],
    ) -> Result<(), StoreError> {
        for pointer in pointers {
            if let Some(serde_json::Value::String(text)) = value.pointer_mut(pointer) {
                *text = self.open(text)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_seal_and_open_and_clear_values_pass_through() {
        let key = MasterKey::new(&[7; 32]);
        let sealed = key.seal("whsec-123");
        assert!(MasterKey::is_sealed(&sealed));
        assert!(!sealed.contains("whsec-123"));
        assert_ne!(sealed, key.seal("whsec-123"), "a fresh nonce each time");
        assert_eq!(key.open(&sealed).expect("opens"), "whsec-123");
        assert_eq!(key.open("plain").expect("as is"), "plain");
        let other = MasterKey::new(&[8; 32]);
        assert!(other.open(&sealed).is_err());
        let mut value = serde_json::json!({"a": {"secret": "s"}, "n": 1});
        key.seal_fields(&mut value, &["/a/secret", "/missing", "/n"]);
        assert!(MasterKey::is_sealed(
            value["a"]["secret"].as_str().expect("text")
        ));
        key.open_fields(&mut value, &["/a/secret"]).expect("opens");
        assert_eq!(value["a"]["secret"], "s");
    }

    #[test]
    fn the_key_file_is_made_once_with_mode_0600() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("secret.key");
        let first = MasterKey::load(None, &file).expect("created");
        let sealed = first.seal("x");
        let again = MasterKey::load(None, &file).expect("read");
        assert_eq!(again.open(&sealed).expect("same key"), "x");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&file).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let given = MasterKey::load(Some(&"ab".repeat(32)), &file).expect("given");
        assert!(given.open(&sealed).is_err(), "the given key wins");
        assert!(MasterKey::load(Some("short"), &file).is_err());
    }
}
