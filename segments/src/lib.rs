//! Kith's segments: a segment language, its evaluator and the inputs of each segment, as
//! pure logic.
//!
//! - [`ast`]: the segment tree, its JSON form, and what it reads ([`ast::Inputs`]).
//! - [`parser`]: the language, with errors at line and column.
//! - [`eval`]: evaluation against a profile at a moment, and the next moment time alone
//!   can change it.
//! - [`membership`]: incremental membership: which segments a profile change
//!   re-evaluates, the enters and exits, and window timers.
//!
//! The collector runs [`membership`] as a pipeline stage and serves the segments API.

pub mod ast;
pub mod eval;
pub mod membership;
pub mod parser;

pub use ast::Expr;
pub use parser::{ParseError, parse};
