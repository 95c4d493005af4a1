//! The wire protocol fed arbitrary JSON and mutated messages: parsing never panics,
//! validation answers a code for anything it refuses, and a message that parses
//! serializes to the same JSON by hand (`into_value`) as by serde, which reads back.

use kith_sdk_core::protocol::{Batch, MAX_EVENT_DEPTH, Message};
use proptest::prelude::*;
use serde_json::{Map, Value, json};

const KEYS: &[&str] = &[
    "type",
    "event",
    "userId",
    "anonymousId",
    "messageId",
    "timestamp",
    "sentAt",
    "originalTimestamp",
    "receivedAt",
    "context",
    "properties",
    "traits",
    "integrations",
    "groupId",
    "previousId",
    "name",
    "extra",
];

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (-1e9f64..1e9).prop_map(Value::from),
        prop::sample::select(vec![
            "track",
            "identify",
            "page",
            "screen",
            "group",
            "alias",
            "2024-01-01T00:00:00Z",
            "2024-13-45T99:00:00Z",
            "",
            " "
        ])
        .prop_map(Value::from),
        ".{0,16}".prop_map(Value::from),
    ];
    leaf.prop_recursive(8, 128, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((prop::sample::select(KEYS.to_vec()), inner), 0..6).prop_map(
                |pairs| Value::Object(
                    pairs
                        .into_iter()
                        .map(|(k, v)| (k.to_owned(), v))
                        .collect::<Map<_, _>>()
                )
            ),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1_000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn any_json_parses_or_is_refused_and_what_parses_round_trips(value in json_value()) {
        if let Ok(message) = serde_json::from_value::<Message>(value.clone()) {
            if let Err(invalid) = message.validate() {
                prop_assert!(!invalid.code.is_empty() && !invalid.message.is_empty());
            }
            let by_serde = serde_json::to_value(&message).expect("serializes");
            prop_assert_eq!(message.clone().into_value(), by_serde.clone());
            let back: Message = serde_json::from_value(by_serde).expect("reads back");
            prop_assert_eq!(back, message);
        }
        let _ = serde_json::from_value::<Batch<Value>>(json!({"batch": [value.clone()], "context": value}));
    }

    #[test]
    fn nesting_past_the_limit_is_always_refused(levels in 1usize..120) {
        let nested = (0..levels).fold(json!(1), |inner, _| json!({"a": inner}));
        let message: Message = serde_json::from_value(
            json!({"type": "track", "event": "E", "userId": "u", "properties": nested}),
        ).expect("parses under serde's limit");
        let refused = message.validate().err().map(|e| e.code) == Some("too_deep");
        // The event is level 1 and `properties` level 2.
        prop_assert_eq!(refused, levels + 1 > MAX_EVENT_DEPTH);
    }
}
