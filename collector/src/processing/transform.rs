//! Declarative transformations, applied in order: rename, drop, set, copy, hash a field
//! with SHA-256, and drop events that match a condition. Each may carry a `when`
//! condition; conditions test fields (`equals`, `not_equals`, `in`, `exists`,
//! `contains`) and combine with `all`, `any` and `not`.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::path::FieldPath;

/// A test on a message. Either one field test (`path` and exactly one of `equals`,
/// `not_equals`, `in`, `exists`, `contains`) or one combination (`all`, `any`, `not`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    /// The field tested.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<FieldPath>,
    /// The field equals this value (`null` included).
    #[serde(
        default,
        deserialize_with = "given",
        skip_serializing_if = "Option::is_none"
    )]
    pub equals: Option<Value>,
    /// The field is missing or differs from this value (`null` included).
    #[serde(
        default,
        deserialize_with = "given",
        skip_serializing_if = "Option::is_none"
    )]
    pub not_equals: Option<Value>,
    /// The field equals one of these values.
    #[serde(default, rename = "in", skip_serializing_if = "Option::is_none")]
    pub one_of: Option<Vec<Value>>,
    /// The field is present (`true`) or absent (`false`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exists: Option<bool>,
    /// The field is a string containing this text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contains: Option<String>,
    /// Every condition holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub all: Option<Vec<Condition>>,
    /// At least one condition holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub any: Option<Vec<Condition>>,
    /// The condition does not hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not: Option<Box<Condition>>,
}

/// A value that is present, `null` included (a plain `Option` takes `null` for absent).
fn given<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(deserializer).map(Some)
}

impl Condition {
    /// Checks that the condition is exactly one test or one combination.
    pub fn validate(&self) -> Result<(), String> {
        let tests = [
            self.equals.is_some(),
            self.not_equals.is_some(),
            self.one_of.is_some(),
            self.exists.is_some(),
            self.contains.is_some(),
        ]
        .iter()
        .filter(|t| **t)
        .count();
        let combinations = [self.all.is_some(), self.any.is_some(), self.not.is_some()]
            .iter()
            .filter(|c| **c)
            .count();
        match (self.path.is_some(), tests, combinations) {
            (true, 1, 0) => Ok(()),
            (false, 0, 1) => {
                let nested = self.all.iter().chain(&self.any).flatten();
                nested
                    .chain(self.not.as_deref())
                    .try_for_each(Condition::validate)
            }
            (true, 0, _) => Err("a condition with a path needs one of equals, not_equals, in, exists, contains".to_owned()),
            (true, _, 0) => Err("a condition tests one thing: give only one of equals, not_equals, in, exists, contains".to_owned()),
            (false, 0, 0) => Err("a condition needs a path and a test, or one of all, any, not".to_owned()),
            _ => Err("a condition is either a field test (path and one test) or one of all, any, not".to_owned()),
        }
    }

    /// Whether `message` meets the condition.
    pub fn matches(&self, message: &Value) -> bool {
        if let Some(all) = &self.all {
            return all.iter().all(|c| c.matches(message));
        }
        if let Some(any) = &self.any {
            return any.iter().any(|c| c.matches(message));
        }
        if let Some(not) = &self.not {
            return !not.matches(message);
        }
        let value = self.path.as_ref().and_then(|p| p.get(message));
        if let Some(expected) = &self.equals {
            return value == Some(expected);
        }
        if let Some(unexpected) = &self.not_equals {
            return value != Some(unexpected);
        }
        if let Some(options) = &self.one_of {
            return value.is_some_and(|v| options.contains(v));
        }
        if let Some(exists) = self.exists {
            return value.is_some() == exists;
        }
        if let Some(text) = &self.contains {
            return value
                .and_then(Value::as_str)
                .is_some_and(|s| s.contains(text.as_str()));
        }
        false
    }
}

/// One transformation step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Transformation {
    /// Moves a field to another path.
    Rename {
        /// The field moved.
        from: FieldPath,
        /// Where it goes.
        to: FieldPath,
        /// Only when this holds.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        when: Option<Condition>,
    },
    /// Removes a field.
    Drop {
        /// The field removed.
        path: FieldPath,
        /// Only when this holds.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        when: Option<Condition>,
    },
    /// Sets a field to a value.
    Set {
        /// The field set.
        path: FieldPath,
        /// Its new value.
        value: Value,
        /// Only when this holds.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        when: Option<Condition>,
    },
    /// Copies a field to another path.
    Copy {
        /// The field copied.
        from: FieldPath,
        /// Where the copy goes.
        to: FieldPath,
        /// Only when this holds.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        when: Option<Condition>,
    },
    /// Replaces a field with the SHA-256 of its value (hex; strings hashed as they are,
    /// other values as their JSON text).
    Hash {
        /// The field hashed.
        path: FieldPath,
        /// Only when this holds.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        when: Option<Condition>,
    },
    /// Drops the whole event.
    DropEvent {
        /// The events dropped.
        when: Condition,
    },
}

/// What a transformation list decided for an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Keep the (transformed) event.
    Keep,
    /// Drop it: a `drop_event` matched.
    DropEvent,
}

/// The SHA-256 of a value, in lower-case hex.
pub fn sha256_hex(value: &Value) -> String {
    let digest = match value {
        Value::String(s) => Sha256::digest(s.as_bytes()),
        other => Sha256::digest(other.to_string().as_bytes()),
    };
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

impl Transformation {
    /// Checks what serde cannot: protected fields and well-formed conditions.
    pub fn validate(&self) -> Result<(), String> {
        let (writes, when): (Vec<&FieldPath>, Option<&Condition>) = match self {
            Transformation::Rename { from, to, when } => (vec![from, to], when.as_ref()),
            Transformation::Copy { to, when, .. } => (vec![to], when.as_ref()),
            Transformation::Drop { path, when }
            | Transformation::Set { path, when, .. }
            | Transformation::Hash { path, when } => (vec![path], when.as_ref()),
            Transformation::DropEvent { when } => (Vec::new(), Some(when)),
        };
        writes.into_iter().try_for_each(FieldPath::check_writable)?;
        when.map_or(Ok(()), Condition::validate)
    }

    fn when(&self) -> Option<&Condition> {
        match self {
            Transformation::Rename { when, .. }
            | Transformation::Drop { when, .. }
            | Transformation::Set { when, .. }
            | Transformation::Copy { when, .. }
            | Transformation::Hash { when, .. } => when.as_ref(),
            Transformation::DropEvent { when } => Some(when),
        }
    }

    /// Applies this step to `message`; a missing source field leaves it unchanged.
    fn apply(&self, message: &mut Value) -> Result<Verdict, String> {
        if self.when().is_some_and(|c| !c.matches(message)) {
            return Ok(Verdict::Keep);
        }
        match self {
            Transformation::Rename { from, to, .. } => {
                if let Some(value) = from.take(message) {
                    to.set(message, value)?;
                }
            }
            Transformation::Drop { path, .. } => {
                path.take(message);
            }
            Transformation::Set { path, value, .. } => path.set(message, value.clone())?,
            Transformation::Copy { from, to, .. } => {
                if let Some(value) = from.get(message).cloned() {
                    to.set(message, value)?;
                }
            }
            Transformation::Hash { path, .. } => {
                if let Some(value) = path.get_mut(message)
                    && !value.is_null()
                {
                    *value = Value::String(sha256_hex(value));
                }
            }
            Transformation::DropEvent { .. } => return Ok(Verdict::DropEvent),
        }
        Ok(Verdict::Keep)
    }
}

/// Applies `steps` in order; stops at the first `drop_event` that matches.
///
/// # Errors
///
/// When a step cannot be applied (setting a field inside a non-object), with the step's
/// position.
pub fn apply_all(steps: &[Transformation], message: &mut Value) -> Result<Verdict, String> {
    for (i, step) in steps.iter().enumerate() {
        if step
            .apply(message)
            .map_err(|e| format!("transformation {i}: {e}"))?
            == Verdict::DropEvent
        {
            return Ok(Verdict::DropEvent);
        }
    }
    Ok(Verdict::Keep)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn steps(json: Value) -> Vec<Transformation> {
        let steps: Vec<Transformation> = serde_json::from_value(json).expect("steps parse");
        for step in &steps {
            step.validate().expect("valid step");
        }
        steps
    }

    fn condition(json: Value) -> Condition {
        let c: Condition = serde_json::from_value(json).expect("condition parses");
        c.validate().expect("valid condition");
        c
    }

    #[test]
    fn steps_apply_in_order() {
        let steps = steps(json!([
            {"op": "rename", "from": "properties.price", "to": "properties.revenue"},
            {"op": "copy", "from": "properties.revenue", "to": "properties.amount"},
            {"op": "set", "path": "context.app.env", "value": "prod"},
            {"op": "drop", "path": "context.ip"},
            {"op": "hash", "path": "traits.email"},
            {"op": "rename", "from": "properties.absent", "to": "properties.still_absent"},
            {"op": "hash", "path": "traits.absent"}
        ]));
        let mut message = json!({"type": "track", "event": "E", "properties": {"price": 9.5},
                                 "context": {"ip": "1.2.3.4"}, "traits": {"email": "ann@example.com"}});
        assert_eq!(apply_all(&steps, &mut message), Ok(Verdict::Keep));
        assert_eq!(
            message,
            json!({"type": "track", "event": "E", "properties": {"revenue": 9.5, "amount": 9.5},
                   "context": {"app": {"env": "prod"}},
                   "traits": {"email": "71d4f55f72fa128dfb468a1a3901507c804b74316488744d769d7f4b16696476"}})
        );
    }

    #[test]
    fn hashing_is_sha256_of_the_text() {
        assert_eq!(
            sha256_hex(&json!("abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(sha256_hex(&json!(42)), sha256_hex(&json!("42")));
    }

    #[test]
    fn conditions_guard_steps_and_drop_events() {
        let steps = steps(json!([
            {"op": "drop_event", "when": {"any": [
                {"path": "event", "in": ["Test", "Debug"]},
                {"path": "properties.internal", "equals": true}]}},
            {"op": "set", "path": "properties.big", "value": true,
             "when": {"all": [{"path": "properties.total", "exists": true},
                              {"not": {"path": "properties.currency", "equals": "JPY"}}]}},
            {"op": "set", "path": "properties.shop", "value": true,
             "when": {"path": "context.page.url", "contains": "/shop/"}},
            {"op": "set", "path": "properties.known", "value": true,
             "when": {"path": "userId", "not_equals": null}}
        ]));
        for dropped in [
            json!({"event": "Test"}),
            json!({"event": "Debug"}),
            json!({"event": "Real", "properties": {"internal": true}}),
        ] {
            let mut message = dropped;
            assert_eq!(apply_all(&steps, &mut message), Ok(Verdict::DropEvent));
        }
        let mut kept = json!({"event": "Real", "userId": "u", "properties": {"total": 1, "currency": "EUR", "internal": false},
                              "context": {"page": {"url": "https://x/shop/1"}}});
        assert_eq!(apply_all(&steps, &mut kept), Ok(Verdict::Keep));
        assert_eq!(kept["properties"]["big"], true);
        assert_eq!(kept["properties"]["shop"], true);
        assert_eq!(kept["properties"]["known"], true);
        let mut yen = json!({"event": "Real", "properties": {"total": 1, "currency": "JPY"}});
        assert_eq!(apply_all(&steps, &mut yen), Ok(Verdict::Keep));
        assert_eq!(yen["properties"].get("big"), None);
        assert_eq!(yen["properties"].get("shop"), None);
        assert_eq!(
            yen["properties"]["known"], true,
            "a missing field is not equal to null"
        );
        assert!(!condition(json!({"path": "x", "exists": false})).matches(&json!({"x": 1})));
        assert!(condition(json!({"path": "x", "exists": false})).matches(&json!({})));
    }

    #[test]
    fn a_step_that_cannot_apply_says_which() {
        let steps = steps(json!([
            {"op": "set", "path": "properties.a", "value": 1},
            {"op": "set", "path": "event.name", "value": 1}
        ]));
        let mut message = json!({"event": "E"});
        let error = apply_all(&steps, &mut message).expect_err("event is a string");
        assert!(error.starts_with("transformation 1: "), "{error}");
    }

    #[test]
    fn bad_steps_and_conditions_are_refused_with_a_reason() {
        for (bad, says) in [
            (json!({"op": "explode", "path": "a"}), "explode"),
            (json!({"op": "drop"}), "path"),
            (json!({"op": "set", "path": "a"}), "value"),
            (json!({"op": "drop", "path": "a", "extra": 1}), "extra"),
            (json!({"op": "drop", "path": "a..b"}), "field path"),
            (json!({"op": "drop_event"}), "when"),
        ] {
            let error = serde_json::from_value::<Transformation>(bad.clone())
                .expect_err(&format!("{bad} is refused"));
            assert!(error.to_string().contains(says), "{bad}: {error}");
        }
        for (bad, says) in [
            (json!({"op": "drop", "path": "messageId"}), "messageId"),
            (json!({"op": "set", "path": "type", "value": "x"}), "type"),
            (
                json!({"op": "drop_event", "when": {"path": "a"}}),
                "needs one of",
            ),
            (
                json!({"op": "drop_event", "when": {"path": "a", "equals": 1, "exists": true}}),
                "only one",
            ),
            (json!({"op": "drop_event", "when": {}}), "needs a path"),
            (
                json!({"op": "drop_event", "when": {"all": [], "any": []}}),
                "either",
            ),
            (
                json!({"op": "drop_event", "when": {"not": {"path": "a"}}}),
                "needs one of",
            ),
        ] {
            let step: Transformation = serde_json::from_value(bad.clone()).expect("parses");
            let error = step.validate().expect_err(&format!("{bad} is refused"));
            assert!(error.contains(says), "{bad}: {error}");
        }
    }
}
