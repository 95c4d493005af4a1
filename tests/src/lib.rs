//! End-to-end tests that cross Kith's crates and processes live in `tests/tests/`; this
//! library holds what they share.
