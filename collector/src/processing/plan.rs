//! Tracking plans: a JSON Schema per event name (checked against a `track` event's
//! `properties`) and one for `identify` traits, per source. A violation blocks the event
//! or lets it through with the violation recorded, by [`TrackingPlan::on_violation`].

use std::collections::BTreeMap;

use jsonschema::Validator;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// What happens to an event that breaks the plan.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnViolation {
    /// The event goes on, its violations recorded in `context.kith.violations`.
    #[default]
    Record,
    /// The event goes to the failed-events store.
    Block,
}

/// A source's tracking plan, as configured.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrackingPlan {
    /// JSON Schema of the `properties` of each planned `track` event, by event name.
    pub events: BTreeMap<String, Value>,
    /// JSON Schema of `identify` traits.
    pub identify: Option<Value>,
    /// Whether `track` events missing from `events` are allowed (default) or violations.
    pub allow_unplanned: Option<bool>,
    /// Block or record violations.
    pub on_violation: OnViolation,
}

/// One way an event breaks the plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Violation {
    /// Where, as a JSON pointer into the message (`/properties/price`).
    pub path: String,
    /// What is wrong.
    pub message: String,
}

/// A tracking plan with its schemas compiled.
#[derive(Debug)]
pub struct CompiledPlan {
    events: BTreeMap<String, Validator>,
    identify: Option<Validator>,
    allow_unplanned: bool,
    /// Block or record.
    pub on_violation: OnViolation,
}

impl TrackingPlan {
    /// Compiles the schemas.
    ///
    /// # Errors
    ///
    /// When a schema is not a valid JSON Schema, naming the event.
    pub fn compile(&self) -> Result<CompiledPlan, String> {
        let compile = |what: &str, schema: &Value| {
            jsonschema::validator_for(schema)
                .map_err(|e| format!("the tracking plan's schema for {what} is invalid: {e}"))
        };
        Ok(CompiledPlan {
            events: self
                .events
                .iter()
                .map(|(name, schema)| Ok((name.clone(), compile(&format!("{name:?}"), schema)?)))
                .collect::<Result<_, String>>()?,
            identify: self
                .identify
                .as_ref()
                .map(|schema| compile("identify traits", schema))
                .transpose()?,
            allow_unplanned: self.allow_unplanned.unwrap_or(true),
            on_violation: self.on_violation,
        })
    }
}

/// The violations of `validator` on `message[field]` (an absent field is `{}`).
fn check(validator: &Validator, message: &Value, field: &str) -> Vec<Violation> {
    let empty = json!({});
    let instance = message.get(field).unwrap_or(&empty);
    validator
        .iter_errors(instance)
        .map(|error| Violation {
            path: format!("/{field}{}", error.instance_path()),
            message: error.to_string(),
        })
        .collect()
}

impl CompiledPlan {
    /// How `message` breaks the plan; empty when it does not.
    pub fn violations(&self, message: &Value) -> Vec<Violation> {
        match message.get("type").and_then(Value::as_str) {
            Some("track") => {
                let name = message.get("event").and_then(Value::as_str).unwrap_or("");
                match self.events.get(name) {
                    Some(validator) => check(validator, message, "properties"),
                    None if self.allow_unplanned => Vec::new(),
                    None => vec![Violation {
                        path: "/event".to_owned(),
                        message: format!("{name:?} is not in the tracking plan"),
                    }],
                }
            }
            Some("identify") => self
                .identify
                .as_ref()
                .map(|validator| check(validator, message, "traits"))
                .unwrap_or_default(),
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(json: Value) -> CompiledPlan {
        serde_json::from_value::<TrackingPlan>(json)
            .expect("plan parses")
            .compile()
            .expect("plan compiles")
    }

    fn order_plan() -> Value {
        json!({
            "events": {"Order Completed": {
                "type": "object",
                "properties": {"total": {"type": "number", "minimum": 0}, "currency": {"enum": ["EUR", "USD"]}},
                "required": ["total"]
            }},
            "identify": {"type": "object", "properties": {"age": {"type": "integer"}}}
        })
    }

    #[test]
    fn planned_events_are_checked_against_their_schema() {
        let plan = plan(order_plan());
        let ok = json!({"type": "track", "event": "Order Completed", "properties": {"total": 3, "currency": "EUR"}});
        assert_eq!(plan.violations(&ok), []);

        let bad = json!({"type": "track", "event": "Order Completed", "properties": {"total": "3", "currency": "GBP"}});
        let violations = plan.violations(&bad);
        let mut paths: Vec<&str> = violations.iter().map(|v| v.path.as_str()).collect();
        paths.sort_unstable();
        assert_eq!(
            paths,
            ["/properties/currency", "/properties/total"],
            "{violations:?}"
        );
        let total = violations.iter().find(|v| v.path == "/properties/total");
        assert!(
            total.is_some_and(|v| v.message.contains("number")),
            "{violations:?}"
        );

        let missing = json!({"type": "track", "event": "Order Completed"});
        let violations = plan.violations(&missing);
        assert_eq!(violations.len(), 1);
        assert!(violations[0].message.contains("total"), "{violations:?}");

        let traits = json!({"type": "identify", "traits": {"age": "old"}});
        assert_eq!(plan.violations(&traits)[0].path, "/traits/age");
        assert_eq!(
            plan.violations(&json!({"type": "page", "properties": {"total": "x"}})),
            []
        );
    }

    #[test]
    fn unplanned_events_pass_unless_the_plan_says_otherwise() {
        let unplanned = json!({"type": "track", "event": "Something Else"});
        assert_eq!(plan(order_plan()).violations(&unplanned), []);
        let mut strict = order_plan();
        strict["allow_unplanned"] = json!(false);
        strict["on_violation"] = json!("block");
        let strict = plan(strict);
        assert_eq!(strict.on_violation, OnViolation::Block);
        let violations = strict.violations(&unplanned);
        assert_eq!(violations[0].path, "/event");
        assert!(violations[0].message.contains("Something Else"));
    }

    #[test]
    fn a_bad_schema_is_refused_when_the_plan_is_set() {
        let bad = json!({"events": {"E": {"type": "no-such-type"}}});
        let error = serde_json::from_value::<TrackingPlan>(bad)
            .expect("parses")
            .compile()
            .expect_err("bad schema");
        assert!(error.contains("\"E\""), "{error}");
        assert!(serde_json::from_value::<TrackingPlan>(json!({"on_violation": "ignore"})).is_err());
    }
}
