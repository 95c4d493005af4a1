//! Evaluation of a segment condition against a profile at a moment.
//!
//! A missing trait or property makes every comparison false (`!=` included): test
//! absence with `not traits.x exists`. Numbers compare as numbers, strings as strings
//! (RFC 3339 UTC timestamps therefore compare in time order); other mixes are false.

use std::collections::BTreeSet;

use jiff::{SignedDuration, Timestamp};
use serde_json::{Map, Value};

use crate::ast::{Cmp, Events, Expr, Func, Which};

/// One event of a profile, as segments see it.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRecord {
    /// The event name.
    pub name: String,
    /// When it happened.
    pub timestamp: Timestamp,
    /// Its properties.
    pub properties: Map<String, Value>,
}

/// What a condition is evaluated against.
#[derive(Debug, Clone, Copy)]
pub struct Profile<'a> {
    /// The profile's traits.
    pub traits: &'a Map<String, Value>,
    /// The types of identifier it has (`email`, `user_id`, `push_token`...).
    pub identifiers: &'a BTreeSet<String>,
    /// Its events.
    pub events: &'a [EventRecord],
    /// The segments it is a member of.
    pub segments: &'a BTreeSet<String>,
}

fn lookup<'a>(root: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    let mut parts = path.split('.');
    let mut current = root.get(parts.next()?)?;
    for part in parts {
        current = current.get(part)?;
    }
    Some(current)
}

/// `traits.x` in a profile.
fn trait_value<'a>(profile: &Profile<'a>, path: &str) -> Option<&'a Value> {
    lookup(profile.traits, path.strip_prefix("traits.")?)
}

/// A field of an event: `properties.x` or `name`.
fn event_value<'a>(event: &'a EventRecord, path: &str) -> Option<&'a Value> {
    lookup(&event.properties, path.strip_prefix("properties.")?)
}

/// Whether `actual` compares to `expected` by `cmp`.
pub fn compare(actual: Option<&Value>, cmp: Cmp, expected: &Value) -> bool {
    let Some(actual) = actual else {
        return false;
    };
    let numbers = actual.as_f64().zip(expected.as_f64());
    match cmp {
        Cmp::Eq => numbers.map_or(actual == expected, |(a, b)| a == b),
        Cmp::Ne => numbers.map_or(actual != expected, |(a, b)| a != b),
        Cmp::Lt | Cmp::Le | Cmp::Gt | Cmp::Ge => {
            let ordering = match (numbers, actual.as_str().zip(expected.as_str())) {
                (Some((a, b)), _) => a.partial_cmp(&b),
                (None, Some((a, b))) => Some(a.cmp(b)),
                _ => None,
            };
            ordering.is_some_and(|o| match cmp {
                Cmp::Lt => o.is_lt(),
                Cmp::Le => o.is_le(),
                Cmp::Gt => o.is_gt(),
                _ => o.is_ge(),
            })
        }
        Cmp::Contains => match (actual, expected) {
            (Value::String(a), Value::String(b)) => a.contains(b.as_str()),
            (Value::Array(items), value) => items.contains(value),
            _ => false,
        },
        Cmp::StartsWith => actual
            .as_str()
            .zip(expected.as_str())
            .is_some_and(|(a, b)| a.starts_with(b)),
    }
}

fn window_start(now: Timestamp, secs: u64) -> Timestamp {
    let secs = i64::try_from(secs).unwrap_or(i64::MAX);
    now.checked_sub(SignedDuration::from_secs(secs))
        .unwrap_or(Timestamp::MIN)
}

/// The events matching a name and filters (and their own window, when `windowed`).
fn matching<'a>(
    profile: &Profile<'a>,
    events: &'a Events,
    now: Timestamp,
    windowed: bool,
) -> impl Iterator<Item = &'a EventRecord> {
    let since = events
        .within_secs
        .filter(|_| windowed)
        .map(|secs| window_start(now, secs));
    profile.events.iter().filter(move |event| {
        event.name == events.name
            && since.is_none_or(|since| event.timestamp >= since)
            && event.timestamp <= now
            && events
                .filters
                .iter()
                .all(|f| compare(event_value(event, &f.path), f.cmp, &f.value))
    })
}

/// Whether `profile` meets `expr` at `now`.
pub fn evaluate(expr: &Expr, profile: &Profile<'_>, now: Timestamp) -> bool {
    match expr {
        Expr::And { all } => all.iter().all(|e| evaluate(e, profile, now)),
        Expr::Or { any } => any.iter().any(|e| evaluate(e, profile, now)),
        Expr::Not { expr } => !evaluate(expr, profile, now),
        Expr::Compare { path, cmp, value } => compare(trait_value(profile, path), *cmp, value),
        Expr::In { path, values } => {
            let actual = trait_value(profile, path);
            values.iter().any(|v| compare(actual, Cmp::Eq, v))
        }
        Expr::Exists { path } => trait_value(profile, path).is_some_and(|v| !v.is_null()),
        Expr::Has { identifier } => profile.identifiers.contains(identifier),
        Expr::InSegment { segment } => profile.segments.contains(segment),
        Expr::Aggregate {
            func,
            events,
            property,
            cmp,
            value,
        } => {
            let selected = matching(profile, events, now, true);
            let result = match func {
                Func::Count => Some(selected.count() as f64),
                Func::Sum | Func::Avg => {
                    let path = property.as_deref().unwrap_or_default();
                    let numbers: Vec<f64> = selected
                        .filter_map(|e| event_value(e, path).and_then(Value::as_f64))
                        .collect();
                    match func {
                        Func::Sum => Some(numbers.iter().sum()),
                        _ if numbers.is_empty() => None,
                        _ => Some(numbers.iter().sum::<f64>() / numbers.len() as f64),
                    }
                }
            };
            result.is_some_and(|r| compare(Some(&Value::from(r)), *cmp, &Value::from(*value)))
        }
        Expr::Occurred {
            which,
            events,
            within_secs,
        } => {
            let times = matching(profile, events, now, false).map(|e| e.timestamp);
            let occurrence = match which {
                Which::First => times.min(),
                Which::Last => times.max(),
            };
            occurrence.is_some_and(|t| t >= window_start(now, *within_secs))
        }
    }
}

/// The events matching a name and filters, at any time.
fn named<'a>(profile: &Profile<'a>, events: &'a Events) -> impl Iterator<Item = &'a EventRecord> {
    profile.events.iter().filter(move |event| {
        event.name == events.name
            && events
                .filters
                .iter()
                .all(|f| compare(event_value(event, &f.path), f.cmp, &f.value))
    })
}

/// The first moment after `at` and `secs` have passed.
fn after_window(at: Timestamp, secs: u64) -> Option<Timestamp> {
    let secs = i64::try_from(secs).ok()?;
    at.checked_add(SignedDuration::from_secs(secs))
        .ok()?
        .checked_add(SignedDuration::from_nanos(1))
        .ok()
}

/// The earliest moment after `now` at which time alone can change whether `profile`
/// meets `expr`: an event leaving a window, or an event stamped in the future coming
/// into view. `None` when no such moment exists (only new input can change it).
pub fn next_change(expr: &Expr, profile: &Profile<'_>, now: Timestamp) -> Option<Timestamp> {
    let later = |t: Timestamp| (t > now).then_some(t);
    match expr {
        Expr::And { all: items } | Expr::Or { any: items } => items
            .iter()
            .filter_map(|e| next_change(e, profile, now))
            .min(),
        Expr::Not { expr } => next_change(expr, profile, now),
        Expr::Aggregate { events, .. } => named(profile, events)
            .flat_map(|e| {
                let leaves = events
                    .within_secs
                    .and_then(|secs| after_window(e.timestamp, secs));
                [later(e.timestamp), leaves.and_then(later)]
            })
            .flatten()
            .min(),
        Expr::Occurred {
            which,
            events,
            within_secs,
        } => {
            let times: Vec<Timestamp> = named(profile, events).map(|e| e.timestamp).collect();
            let coming = times.iter().copied().filter_map(later).min();
            let seen = times.into_iter().filter(|t| *t <= now);
            let occurrence = match which {
                Which::First => seen.min(),
                Which::Last => seen.max(),
            };
            let leaves = occurrence
                .and_then(|t| after_window(t, *within_secs))
                .and_then(later);
            coming.into_iter().chain(leaves).min()
        }
        Expr::Compare { .. }
        | Expr::In { .. }
        | Expr::Exists { .. }
        | Expr::Has { .. }
        | Expr::InSegment { .. } => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parser::parse;
    use serde_json::json;

    fn at(text: &str) -> Timestamp {
        text.parse().expect("timestamp")
    }

    fn event(name: &str, when: &str, properties: Value) -> EventRecord {
        EventRecord {
            name: name.to_owned(),
            timestamp: at(when),
            properties: properties.as_object().cloned().unwrap_or_default(),
        }
    }

    struct Fixture {
        traits: Map<String, Value>,
        identifiers: BTreeSet<String>,
        events: Vec<EventRecord>,
        segments: BTreeSet<String>,
    }

    impl Fixture {
        fn new() -> Self {
            Fixture {
                traits: json!({"plan": "pro", "age": 34, "name": "Annabel", "country": "FR",
                               "tags": ["vip", "beta"], "signed_up": "2026-01-10T00:00:00Z",
                               "address": {"city": "Lyon"}, "gone": null})
                .as_object()
                .cloned()
                .unwrap_or_default(),
                identifiers: ["email", "user_id"].map(str::to_owned).into(),
                events: vec![
                    event(
                        "Order Completed",
                        "2026-11-01T10:00:00Z",
                        json!({"total": 30, "currency": "EUR"}),
                    ),
                    event(
                        "Order Completed",
                        "2026-11-20T10:00:00Z",
                        json!({"total": 70.5, "currency": "EUR"}),
                    ),
                    event(
                        "Order Completed",
                        "2026-06-01T10:00:00Z",
                        json!({"total": 200, "currency": "USD"}),
                    ),
                    event("Signed In", "2026-11-28T09:00:00Z", json!({})),
                    event("Signed Up", "2026-01-10T00:00:00Z", json!({})),
                ],
                segments: ["newsletter"].map(str::to_owned).into(),
            }
        }

        fn profile(&self) -> Profile<'_> {
            Profile {
                traits: &self.traits,
                identifiers: &self.identifiers,
                events: &self.events,
                segments: &self.segments,
            }
        }

        fn holds(&self, text: &str) -> bool {
            evaluate(
                &parse(text).unwrap_or_else(|e| panic!("{text}: {e}")),
                &self.profile(),
                at("2026-11-29T12:00:00Z"),
            )
        }
    }

    #[test]
    fn trait_comparisons() {
        let f = Fixture::new();
        for (text, expected) in [
            (r#"traits.plan = "pro""#, true),
            (r#"traits.plan = "free""#, false),
            (r#"traits.plan != "free""#, true),
            ("traits.age = 34.0", true),
            ("traits.age > 30", true),
            ("traits.age >= 34", true),
            ("traits.age < 34", false),
            ("traits.age <= 34", true),
            (r#"traits.age > "30""#, false),
            (r#"traits.name contains "nab""#, true),
            (r#"traits.tags contains "vip""#, true),
            (r#"traits.tags contains "gold""#, false),
            (r#"traits.name starts_with "Ann""#, true),
            (r#"traits.name starts_with "nn""#, false),
            (r#"traits.signed_up < "2026-02-01T00:00:00Z""#, true),
            (r#"traits.country in ["DE", "FR"]"#, true),
            (r#"traits.country in ["DE", "IT"]"#, false),
            (r#"traits.address.city = "Lyon""#, true),
            ("traits.plan exists", true),
            ("traits.gone exists", false),
            ("traits.missing exists", false),
            (r#"traits.missing != "x""#, false),
            (r#"not traits.missing exists"#, true),
        ] {
            assert_eq!(f.holds(text), expected, "{text}");
        }
    }

    #[test]
    fn identifiers_segments_and_logic() {
        let f = Fixture::new();
        assert!(f.holds("has email"));
        assert!(!f.holds("has push_token"));
        assert!(f.holds(r#"in_segment("newsletter")"#));
        assert!(!f.holds(r#"in_segment("churned")"#));
        assert!(f.holds(r#"has email and (traits.plan = "free" or traits.age > 30)"#));
        assert!(!f.holds(r#"has email and not (traits.plan = "free" or traits.age > 30)"#));
        assert!(f.holds(r#"not in_segment("churned")"#));
    }

    #[test]
    fn event_aggregates_with_filters_and_windows() {
        let f = Fixture::new();
        for (text, expected) in [
            (r#"count(event "Order Completed") = 3"#, true),
            (r#"count(event "Order Completed" within 30d) >= 2"#, true),
            (r#"count(event "Order Completed" within 10d) = 1"#, true),
            (
                r#"count(event "Order Completed" where properties.currency = "EUR") = 2"#,
                true,
            ),
            (
                r#"count(event "Order Completed" where properties.currency = "EUR" and properties.total > 50) = 1"#,
                true,
            ),
            (r#"count(event "Refunded") = 0"#, true),
            (
                r#"sum(event "Order Completed", properties.total) = 300.5"#,
                true,
            ),
            (
                r#"sum(event "Order Completed" within 30d, properties.total) = 100.5"#,
                true,
            ),
            (
                r#"avg(event "Order Completed" where properties.currency = "EUR", properties.total) = 50.25"#,
                true,
            ),
            (r#"avg(event "Refunded", properties.total) >= 0"#, false),
            (r#"sum(event "Refunded", properties.total) = 0"#, true),
        ] {
            assert_eq!(f.holds(text), expected, "{text}");
        }
    }

    #[test]
    fn first_and_last_occurrences_within_a_window() {
        let f = Fixture::new();
        assert!(f.holds(r#"last(event "Signed In") within 7d"#));
        assert!(!f.holds(r#"last(event "Signed In") within 1h"#));
        assert!(
            !f.holds(r#"first(event "Signed Up") within 30d"#),
            "signed up in January"
        );
        assert!(f.holds(r#"first(event "Signed Up") within 52w"#));
        assert!(f.holds(
            r#"last(event "Order Completed" where properties.currency = "USD") within 26w"#
        ));
        assert!(
            !f.holds(
                r#"last(event "Order Completed" where properties.currency = "USD") within 4w"#
            )
        );
        assert!(!f.holds(r#"last(event "Never") within 52w"#));
    }

    #[test]
    fn inputs_say_what_a_segment_reads() {
        let expr = parse(
            r#"traits.plan = "pro" and count(event "Order Completed" within 30d) >= 2 and has email and not in_segment("churned")"#,
        )
        .expect("parses");
        let inputs = expr.inputs();
        assert_eq!(inputs.traits, ["traits.plan".to_owned()].into());
        assert_eq!(inputs.events, ["Order Completed".to_owned()].into());
        assert_eq!(inputs.identifiers, ["email".to_owned()].into());
        assert_eq!(inputs.segments, ["churned".to_owned()].into());
        assert!(inputs.windowed);
        assert!(
            !parse(r#"count(event "E") > 1"#)
                .expect("parses")
                .inputs()
                .windowed
        );
    }

    #[test]
    fn next_change_is_when_a_window_lets_an_event_go() {
        let mut f = Fixture::new();
        f.events
            .push(event("Signed In", "2026-12-24T00:00:00Z", json!({})));
        let now = at("2026-11-29T12:00:00Z");
        let next = |text: &str| next_change(&parse(text).expect("parses"), &f.profile(), now);
        let count = r#"count(event "Order Completed" within 30d) >= 2"#;
        // The 1 November order leaves the 30-day window one instant after 1 December 10:00.
        let leaves = at("2026-12-01T10:00:00.000000001Z");
        assert_eq!(next(count), Some(leaves));
        let holds_at =
            |when: Timestamp| evaluate(&parse(count).expect("parses"), &f.profile(), when);
        assert!(holds_at(at("2026-12-01T10:00:00Z")));
        assert!(!holds_at(leaves));
        // The last sign-in (28 November) leaves a 7-day window on 5 December; the one
        // stamped 24 December comes into view later.
        assert_eq!(
            next(r#"last(event "Signed In") within 7d"#),
            Some(at("2026-12-05T09:00:00.000000001Z"))
        );
        // An unwindowed count changes when the future-stamped event comes into view.
        assert_eq!(
            next(r#"count(event "Signed In") >= 2"#),
            Some(at("2026-12-24T00:00:00Z"))
        );
        assert_eq!(
            next(r#"not (traits.plan = "pro" or count(event "Order Completed" within 30d) >= 2)"#),
            Some(leaves)
        );
        assert_eq!(next(r#"traits.plan = "pro" and has email"#), None);
    }
}
