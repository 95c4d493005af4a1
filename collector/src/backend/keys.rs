//! Row keys made of parts, encoded so that keys sort as their parts do and no key's
//! parts run into the next: a string is its bytes with each 0x00 written 0x00 0xFF,
//! then 0x00 0x01 (so `"a"` sorts before `"a\0"` and `"ab"`, and the encoding of one
//! string is never a prefix of another's); a number is 8 big-endian bytes. The
//! encoding of a key's first parts is the prefix of every key that starts with them.

use crate::error::StoreError;

/// A key being built, part by part.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Key(Vec<u8>);

impl Key {
    /// An empty key.
    pub fn new() -> Self {
        Key(Vec::new())
    }

    /// Adds a string part.
    #[must_use]
    pub fn str(mut self, part: &str) -> Self {
        for byte in part.as_bytes() {
            self.0.push(*byte);
            if *byte == 0 {
                self.0.push(0xFF);
            }
        }
        self.0.extend_from_slice(&[0, 1]);
        self
    }

    /// Adds a number part.
    #[must_use]
    pub fn u64(mut self, part: u64) -> Self {
        self.0.extend_from_slice(&part.to_be_bytes());
        self
    }

    /// The encoded key.
    pub fn done(self) -> Vec<u8> {
        self.0
    }
}

/// Reads a key's parts back, in order.
#[derive(Debug, Clone)]
pub struct Parts<'a>(&'a [u8]);

impl<'a> Parts<'a> {
    /// The parts of `key`.
    pub fn of(key: &'a [u8]) -> Self {
        Parts(key)
    }

    fn corrupt() -> StoreError {
        StoreError::Corrupt("a row key does not decode".to_owned())
    }

    /// The next part, a string.
    ///
    /// # Errors
    ///
    /// When the key does not hold one here.
    pub fn str(&mut self) -> Result<String, StoreError> {
        let mut out = Vec::new();
        let mut i = 0;
        loop {
            match (self.0.get(i), self.0.get(i + 1)) {
                (Some(0), Some(1)) => {
                    self.0 = &self.0[i + 2..];
                    return String::from_utf8(out).map_err(|_| Self::corrupt());
                }
                (Some(0), Some(0xFF)) => {
                    out.push(0);
                    i += 2;
                }
                (Some(byte), _) if *byte != 0 => {
                    out.push(*byte);
                    i += 1;
                }
                _ => return Err(Self::corrupt()),
            }
        }
    }

    /// The next part, a number.
    ///
    /// # Errors
    ///
    /// When the key does not hold one here.
    pub fn u64(&mut self) -> Result<u64, StoreError> {
        let (bytes, rest) = self.0.split_first_chunk::<8>().ok_or_else(Self::corrupt)?;
        self.0 = rest;
        Ok(u64::from_be_bytes(*bytes))
    }
}

/// A one-string key.
pub fn str(part: &str) -> Vec<u8> {
    Key::new().str(part).done()
}

/// A one-number key.
pub fn u64(part: u64) -> Vec<u8> {
    Key::new().u64(part).done()
}

/// Reads a one-number key.
///
/// # Errors
///
/// When the key is not one.
pub fn read_u64(key: &[u8]) -> Result<u64, StoreError> {
    Parts::of(key).u64()
}

/// Reads a one-string key.
///
/// # Errors
///
/// When the key is not one.
pub fn read_str(key: &[u8]) -> Result<String, StoreError> {
    Parts::of(key).str()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parts_read_back_and_strings_never_run_into_the_next_part() {
        let key = Key::new().str("a\0b").u64(7).str("").done();
        let mut parts = Parts::of(&key);
        assert_eq!(parts.str().expect("str"), "a\0b");
        assert_eq!(parts.u64().expect("u64"), 7);
        assert_eq!(parts.str().expect("str"), "");
        assert!(parts.u64().is_err());
        assert!(
            !str("ab").starts_with(&str("a")),
            "one string is no prefix of another"
        );
        assert!(Key::new().str("a").u64(1).done().starts_with(&str("a")));
    }

    proptest! {
        #[test]
        fn keys_sort_as_their_parts(
            a in (".{0,8}", any::<u64>()), b in (".{0,8}", any::<u64>())
        ) {
            let ka = Key::new().str(&a.0).u64(a.1).done();
            let kb = Key::new().str(&b.0).u64(b.1).done();
            prop_assert_eq!(ka.cmp(&kb), (a.0.as_bytes(), a.1).cmp(&(b.0.as_bytes(), b.1)));
            let mut parts = Parts::of(&ka);
            prop_assert_eq!(parts.str().expect("str"), a.0);
            prop_assert_eq!(parts.u64().expect("u64"), a.1);
        }
    }
}
