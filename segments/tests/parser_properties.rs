//! The segment language's parser fed arbitrary text, token soup and mutations of valid
//! definitions: it never panics (nor overflows its stack), every error has a position
//! inside the text, and every tree it accepts reads back from its JSON form unchanged.

use kith_segments::parse;
use kith_segments::parser::MAX_NESTING;
use proptest::prelude::*;

/// Definitions that parse, to mutate.
const VALID: &[&str] = &[
    "traits.plan = \"pro\"",
    "traits.age >= 18 and not traits.banned exists",
    "has email or has push_token_fcm",
    "count(event \"Order Completed\" where properties.total > 50 within 30d) >= 3",
    "sum(event \"Order Completed\", properties.total within 7d) > 100",
    "last(event \"Signed In\") within 2w",
    "in_segment(\"vip\") and (traits.country in [\"FR\", \"DE\"] or traits.plan != \"free\")",
    "traits.email contains \"@example.com\" and traits.name starts_with \"A\"",
];

/// Pieces of the language, to make token soup from.
const TOKENS: &[&str] = &[
    "traits.",
    "plan",
    "=",
    "!=",
    "<",
    ">=",
    "and",
    "or",
    "not",
    "(",
    ")",
    "[",
    "]",
    ",",
    "\"",
    "\"pro\"",
    "12",
    "-3.5",
    "30d",
    "1e400",
    "count",
    "sum",
    "avg",
    "first",
    "last",
    "event",
    "where",
    "within",
    "has",
    "exists",
    "in",
    "in_segment",
    "contains",
    "starts_with",
    "true",
    "false",
    "\n",
    " ",
    "\u{1F600}",
    "\\",
    "~",
];

fn check(text: &str) {
    match parse(text) {
        Ok(tree) => {
            let json = serde_json::to_string(&tree).expect("a tree serializes");
            let back: kith_segments::Expr = serde_json::from_str(&json).expect("and reads back");
            assert_eq!(back, tree, "{text:?}");
        }
        Err(error) => {
            let lines = text.split('\n').count().max(1);
            assert!(error.line >= 1 && error.line <= lines, "{text:?}: {error}");
            assert!(error.column >= 1, "{text:?}: {error}");
            assert!(!error.message.is_empty());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_text_parses_or_fails_with_a_position(text in ".{0,200}") {
        check(&text);
    }

    #[test]
    fn token_soup_parses_or_fails_with_a_position(
        tokens in prop::collection::vec(prop::sample::select(TOKENS.to_vec()), 0..60),
    ) {
        check(&tokens.join(" "));
        check(&tokens.concat());
    }

    #[test]
    fn mutated_definitions_parse_or_fail_with_a_position(
        base in prop::sample::select(VALID.to_vec()),
        cuts in prop::collection::vec((any::<prop::sample::Index>(), prop::sample::select(TOKENS.to_vec())), 1..4),
    ) {
        let mut text: Vec<char> = base.chars().collect();
        for (at, token) in cuts {
            let i = at.index(text.len() + 1);
            text.splice(i..i, token.chars());
        }
        check(&text.into_iter().collect::<String>());
    }

    #[test]
    fn deep_nesting_is_refused_not_overflowed(depth in 0usize..5_000, nots in any::<bool>()) {
        let open = if nots { "not " } else { "(" };
        let close = if nots { "" } else { ")" };
        let text = format!("{}has email{}", open.repeat(depth), close.repeat(depth));
        let parsed = parse(&text);
        prop_assert_eq!(parsed.is_ok(), depth <= MAX_NESTING, "{}", depth);
    }
}
