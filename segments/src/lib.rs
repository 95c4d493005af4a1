//! Kith's segments: a segment language, its evaluator and the inputs of each segment, as
//! pure logic.
//!
//! - [`ast`]: the segment tree, its JSON form, and what it reads ([`ast::Inputs`]).
//! - [`parser`]: the language, with errors at line and column.
//! - [`eval`]: evaluation against a profile at a moment.
//!
//! The collector does not run segments yet (real-time membership and the segments API
//! are the rest of the segments issue).

pub mod ast;
pub mod eval;
pub mod parser;

pub use ast::Expr;
pub use parser::{ParseError, parse};
