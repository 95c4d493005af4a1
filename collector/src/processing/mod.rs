//! Processing, per source: [`clean`]ing, [`transform`]ations and [`plan`] checks, run by
//! the [`Process`] pipeline stage before deduplication.
//!
//! Each source has its [`SourceRules`]; a source without rules of its own gets the
//! rules stored under [`DEFAULT_RULES`], and without those the built-in defaults
//! (cleaning on, no transformations, no plan). Rules come from the config file at start
//! and from the admin API at run time, and are persisted in the store.
//!
//! An event that is invalid after cleaning, that a transformation cannot be applied to,
//! that a blocking tracking plan refuses, or that no longer is a valid message after
//! processing fails: the runner moves it to the failed-events store with its reason,
//! where it can be replayed once the rules are fixed.

pub mod api;
pub mod clean;
pub mod path;
pub mod plan;
pub mod transform;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, PoisonError, RwLock};

use kith_sdk_core::protocol::Message;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::StoreError;
use crate::pipeline::{Outcome, Stage};
use crate::store::StoredEvent;
use clean::Cleaning;
use plan::{CompiledPlan, OnViolation, TrackingPlan};
use transform::{Transformation, Verdict};

/// The key of the rules that apply to sources without rules of their own.
pub const DEFAULT_RULES: &str = "default";

/// The reason counted for events a `drop_event` transformation dropped.
pub const TRANSFORMED_AWAY: &str = "transformation";

/// Failure codes, counted by code in the stats; the failed event keeps the full reason.
pub mod failure {
    /// A value stayed invalid after cleaning.
    pub const CLEANING: &str = "cleaning";
    /// A transformation could not be applied.
    pub const TRANSFORMATION: &str = "transformation";
    /// A blocking tracking plan refused the event.
    pub const TRACKING_PLAN: &str = "tracking_plan";
    /// The event is no longer a valid message after processing.
    pub const INVALID: &str = "invalid";
}

/// A source's processing rules, as configured.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SourceRules {
    /// Cleaning settings.
    pub cleaning: Cleaning,
    /// Transformations, applied in order after cleaning.
    pub transformations: Vec<Transformation>,
    /// The tracking plan, checked after the transformations.
    pub tracking_plan: Option<TrackingPlan>,
}

/// Rules checked and compiled, ready to run.
#[derive(Debug)]
pub struct CompiledRules {
    rules: SourceRules,
    plan: Option<CompiledPlan>,
}

/// Why processing did not keep an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// A `drop_event` transformation matched.
    Dropped,
    /// The event fails, with a failure code and the reason.
    Failed(&'static str, String),
}

impl SourceRules {
    /// Checks the rules and compiles their schemas.
    ///
    /// # Errors
    ///
    /// A sentence naming what is wrong.
    pub fn compile(self) -> Result<CompiledRules, String> {
        self.cleaning.validate()?;
        for (i, step) in self.transformations.iter().enumerate() {
            step.validate()
                .map_err(|e| format!("transformation {i}: {e}"))?;
        }
        let plan = self
            .tracking_plan
            .as_ref()
            .map(TrackingPlan::compile)
            .transpose()?;
        Ok(CompiledRules { rules: self, plan })
    }
}

/// Appends `items` to the array `context.kith.{key}` of `message`.
fn annotate(message: &mut Value, key: &str, items: Value) {
    if let Some(object) = message.as_object_mut() {
        let context = object.entry("context").or_insert_with(|| json!({}));
        if let Some(context) = context.as_object_mut() {
            let kith = context.entry("kith").or_insert_with(|| json!({}));
            if let Some(kith) = kith.as_object_mut() {
                kith.insert(key.to_owned(), items);
            }
        }
    }
}

impl CompiledRules {
    /// The rules as configured.
    pub fn rules(&self) -> &SourceRules {
        &self.rules
    }

    /// Cleans, transforms and checks `message` in place; answers whether it may have
    /// changed (cleaning changed something, a transformation ran, or violations were
    /// recorded).
    ///
    /// # Errors
    ///
    /// The [`Refusal`] when the event is not kept.
    pub fn apply(&self, message: &mut Value) -> Result<bool, Refusal> {
        let changes = self
            .rules
            .cleaning
            .apply(message)
            .map_err(|reason| Refusal::Failed(failure::CLEANING, reason))?;
        let mut changed = !changes.is_empty() || !self.rules.transformations.is_empty();
        if !changes.is_empty() {
            annotate(message, "cleaned", json!(changes));
        }
        match transform::apply_all(&self.rules.transformations, message) {
            Ok(Verdict::Keep) => {}
            Ok(Verdict::DropEvent) => return Err(Refusal::Dropped),
            Err(reason) => return Err(Refusal::Failed(failure::TRANSFORMATION, reason)),
        }
        if let Some(plan) = &self.plan {
            let violations = plan.violations(message);
            if !violations.is_empty() {
                if plan.on_violation == OnViolation::Block {
                    let reasons: Vec<String> = violations
                        .iter()
                        .map(|v| format!("{}: {}", v.path, v.message))
                        .collect();
                    return Err(Refusal::Failed(
                        failure::TRACKING_PLAN,
                        format!("tracking plan: {}", reasons.join("; ")),
                    ));
                }
                annotate(message, "violations", json!(violations));
                changed = true;
            }
        }
        Ok(changed)
    }
}

/// The rules of every source, shared by the processing stage and the admin API.
#[derive(Debug)]
pub struct Rules {
    by_source: RwLock<HashMap<String, Arc<CompiledRules>>>,
    built_in: Arc<CompiledRules>,
}

impl Default for Rules {
    fn default() -> Self {
        Rules {
            by_source: RwLock::default(),
            built_in: Arc::new(CompiledRules {
                rules: SourceRules::default(),
                plan: None,
            }),
        }
    }
}

impl Rules {
    /// The rules that apply to `source`: its own, else the default ones, else built in.
    pub fn for_source(&self, source: &str) -> Arc<CompiledRules> {
        let by_source = self
            .by_source
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        by_source
            .get(source)
            .or_else(|| by_source.get(DEFAULT_RULES))
            .unwrap_or(&self.built_in)
            .clone()
    }

    /// The rules configured for `source` (or [`DEFAULT_RULES`]), if any.
    pub fn configured(&self, source: &str) -> Option<SourceRules> {
        self.by_source
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(source)
            .map(|compiled| compiled.rules.clone())
    }

    /// Every configured rule set, by source.
    pub fn all(&self) -> BTreeMap<String, SourceRules> {
        self.by_source
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(source, compiled)| (source.clone(), compiled.rules.clone()))
            .collect()
    }

    /// Sets `source`'s rules.
    ///
    /// # Errors
    ///
    /// When the rules do not compile; the previous rules stay.
    pub fn set(&self, source: &str, rules: SourceRules) -> Result<(), String> {
        let compiled = Arc::new(rules.compile()?);
        self.by_source
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(source.to_owned(), compiled);
        Ok(())
    }

    /// Removes `source`'s own rules; answers whether it had any.
    pub fn remove(&self, source: &str) -> bool {
        self.by_source
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(source)
            .is_some()
    }
}

/// The pipeline stage running each event's source rules.
#[derive(Debug)]
pub struct Process {
    rules: Arc<Rules>,
}

impl Process {
    /// A stage running `rules`.
    pub fn new(rules: Arc<Rules>) -> Self {
        Process { rules }
    }
}

impl Stage for Process {
    fn name(&self) -> &'static str {
        "process"
    }

    fn process(&self, event: &mut StoredEvent) -> Result<Outcome, StoreError> {
        let rules = self.rules.for_source(&event.source);
        let mut message = serde_json::to_value(&event.message)?;
        match rules.apply(&mut message) {
            // Unchanged: the message is the valid one ingest stored; no need to rebuild it.
            Ok(false) => return Ok(Outcome::Continue),
            Ok(true) => {}
            Err(Refusal::Dropped) => return Ok(Outcome::Drop(TRANSFORMED_AWAY)),
            Err(Refusal::Failed(code, reason)) => return Ok(Outcome::Fail(code, reason)),
        }
        let processed = serde_json::from_value::<Message>(message)
            .map_err(|e| e.to_string())
            .and_then(|m| m.validate().map(|()| m).map_err(|e| e.message));
        Ok(match processed {
            Ok(message) => {
                event.message = message;
                Outcome::Continue
            }
            Err(why) => Outcome::Fail(
                failure::INVALID,
                format!("not a valid message after processing: {why}"),
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(message: Value) -> StoredEvent {
        StoredEvent {
            seq: 1,
            source: "src_a".to_owned(),
            message: serde_json::from_value(message).expect("message"),
        }
    }

    fn rules(json: Value) -> SourceRules {
        serde_json::from_value(json).expect("rules parse")
    }

    #[test]
    fn the_stage_cleans_transforms_checks_and_records() {
        let registry = Arc::new(Rules::default());
        registry
            .set(
                "src_a",
                rules(json!({
                    "transformations": [{"op": "hash", "path": "traits.email"},
                                        {"op": "drop_event", "when": {"path": "traits.test", "equals": true}}],
                    "tracking_plan": {"identify": {"properties": {"age": {"type": "integer"}}}}
                })),
            )
            .expect("valid rules");
        let stage = Process::new(registry.clone());
        let mut identify = event(json!({"type": "identify", "userId": " u1 ",
                                        "traits": {"email": "Ann@Example.com", "age": "x", "junk": "N/A"}}));
        assert_eq!(
            stage.process(&mut identify).expect("runs"),
            Outcome::Continue
        );
        let stored = serde_json::to_value(&identify.message).expect("json");
        assert_eq!(stored["userId"], "u1");
        assert_eq!(
            stored["traits"]["email"],
            transform::sha256_hex(&json!("ann@example.com"))
        );
        assert_eq!(stored["traits"].get("junk"), None);
        let kith = &stored["context"]["kith"];
        assert_eq!(
            kith["cleaned"],
            json!([{"field": "userId", "rule": "trim"}, {"field": "traits.junk", "rule": "junk"},
                   {"field": "traits.email", "rule": "email"}])
        );
        assert_eq!(kith["violations"][0]["path"], "/traits/age");

        let mut test = event(json!({"type": "identify", "userId": "u", "traits": {"test": true}}));
        assert_eq!(
            stage.process(&mut test).expect("runs"),
            Outcome::Drop(TRANSFORMED_AWAY)
        );

        let mut bad_email =
            event(json!({"type": "identify", "userId": "u", "traits": {"email": "nope"}}));
        let Outcome::Fail(code, reason) = stage.process(&mut bad_email).expect("runs") else {
            panic!("an invalid email fails the event");
        };
        assert_eq!(code, failure::CLEANING);
        assert!(reason.contains("traits.email"), "{reason}");
    }

    #[test]
    fn an_event_nothing_changes_is_kept_as_it_is() {
        let stage = Process::new(Arc::new(Rules::default()));
        let mut clean = event(json!({"type": "track", "event": "E", "userId": "u",
                                     "properties": {"email": "ann@example.com", "n": 1}}));
        let before = clean.message.clone();
        assert_eq!(stage.process(&mut clean).expect("runs"), Outcome::Continue);
        assert_eq!(clean.message, before);
        let mut dirty = event(json!({"type": "track", "event": " E ", "userId": "u"}));
        assert_eq!(stage.process(&mut dirty).expect("runs"), Outcome::Continue);
        assert_ne!(dirty.message, before, "a trimmed event is rewritten");
    }

    #[test]
    fn an_event_broken_by_processing_fails() {
        let registry = Arc::new(Rules::default());
        registry
            .set(
                DEFAULT_RULES,
                rules(json!({"transformations": [{"op": "drop", "path": "event"}]})),
            )
            .expect("valid rules");
        let mut track = event(json!({"type": "track", "event": "E", "userId": "u"}));
        let outcome = Process::new(registry).process(&mut track).expect("runs");
        let Outcome::Fail(code, reason) = outcome else {
            panic!("a track without event is invalid: {outcome:?}");
        };
        assert_eq!(code, failure::INVALID);
        assert!(reason.contains("event"), "{reason}");
    }

    #[test]
    fn sources_get_their_own_rules_else_the_default_else_built_in() {
        let registry = Rules::default();
        let off = rules(json!({"cleaning": {"trim": false}}));
        assert!(registry.for_source("src_x").rules().cleaning.trim);
        registry.set(DEFAULT_RULES, off.clone()).expect("valid");
        assert!(!registry.for_source("src_x").rules().cleaning.trim);
        registry
            .set("src_x", SourceRules::default())
            .expect("valid");
        assert!(registry.for_source("src_x").rules().cleaning.trim);
        assert_eq!(registry.configured(DEFAULT_RULES), Some(off));
        assert!(registry.remove("src_x"));
        assert!(!registry.remove("src_x"));
        assert_eq!(registry.all().len(), 1);
        let bad = rules(json!({"transformations": [{"op": "drop", "path": "messageId"}]}));
        let error = registry.set("src_x", bad).expect_err("protected field");
        assert!(error.starts_with("transformation 0: "), "{error}");
    }
}
