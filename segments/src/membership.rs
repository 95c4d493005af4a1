//! Incremental membership (pure logic): which segments a change to a profile
//! re-evaluates, the enters and exits that result, and when time alone can next change
//! a membership (the moment a window timer must fire).
//!
//! A [`Catalog`] holds the segments in dependency order (a segment after the segments it
//! references), so one pass sees every `in_segment` input already updated. A profile's
//! [`State`] is what the last evaluation found: its memberships, its identifier types,
//! and per windowed segment the next moment its membership can change with time alone.
//! [`Catalog::update`] re-evaluates only the segments a [`Change`] touches, plus those
//! whose referenced memberships moved, and answers each enter and exit once: an
//! evaluation that finds what the state already says answers nothing.

use std::collections::{BTreeMap, BTreeSet};

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::ast::{Expr, Inputs};
use crate::eval::{self, EventRecord};

/// One segment, with what it reads.
#[derive(Debug, Clone)]
struct Definition {
    key: String,
    tree: Expr,
    inputs: Inputs,
    /// The top-level trait names it reads (`plan` for `traits.plan.tier`).
    traits: BTreeSet<String>,
}

/// Every segment, in dependency order.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    order: Vec<Definition>,
    /// The event names any segment reads.
    event_names: BTreeSet<String>,
    /// The identifier types any segment reads.
    identifier_types: BTreeSet<String>,
}

/// What changed on a profile since its last evaluation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Change {
    /// Top-level trait names an event set.
    pub traits: BTreeSet<String>,
    /// Names of `track` events added.
    pub events: BTreeSet<String>,
    /// Segments to re-evaluate whatever their inputs: a timer that came due, a segment
    /// being computed for existing profiles.
    pub segments: BTreeSet<String>,
    /// Everything may have changed (a merge, a split): re-evaluate every segment.
    pub everything: bool,
}

impl Change {
    /// Re-evaluate every segment.
    pub fn everything() -> Self {
        Change {
            everything: true,
            ..Change::default()
        }
    }

    /// Re-evaluate these segments.
    pub fn segments(keys: impl IntoIterator<Item = String>) -> Self {
        Change {
            segments: keys.into_iter().collect(),
            ..Change::default()
        }
    }

    /// Adds what `other` says changed.
    pub fn absorb(&mut self, other: Change) {
        self.traits.extend(other.traits);
        self.events.extend(other.events);
        self.segments.extend(other.segments);
        self.everything |= other.everything;
    }
}

/// What the last evaluation of a profile found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// The segments it is a member of.
    pub segments: BTreeSet<String>,
    /// Its identifier types then, so that a new type re-evaluates `has` conditions.
    #[serde(default)]
    pub identifiers: BTreeSet<String>,
    /// Per segment, the next moment time alone can change its membership.
    #[serde(default)]
    pub due: BTreeMap<String, Timestamp>,
}

impl State {
    /// The earliest moment a timer must re-evaluate this profile.
    pub fn next_due(&self) -> Option<Timestamp> {
        self.due.values().min().copied()
    }

    /// The segments whose moment has come at `now`.
    pub fn due_at(&self, now: Timestamp) -> BTreeSet<String> {
        self.due
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(key, _)| key.clone())
            .collect()
    }

    /// Forgets a segment (it was deleted): no exit is answered for it.
    pub fn forget(&mut self, key: &str) {
        self.segments.remove(key);
        self.due.remove(key);
    }

    /// Leaves every segment (the profile was merged away or deleted): the exits, in key
    /// order.
    pub fn leave_all(&mut self) -> Vec<Transition> {
        self.due.clear();
        std::mem::take(&mut self.segments)
            .into_iter()
            .map(|segment| Transition {
                segment,
                entered: false,
            })
            .collect()
    }
}

/// A profile entered or left a segment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    /// The segment.
    pub segment: String,
    /// Entered (`true`) or left.
    pub entered: bool,
}

/// What a profile is, for an update: its traits and identifier types now.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    /// Its traits.
    pub traits: &'a Map<String, Value>,
    /// Its identifier types.
    pub identifiers: &'a BTreeSet<String>,
}

fn top_level_traits(inputs: &Inputs) -> BTreeSet<String> {
    inputs
        .traits
        .iter()
        .filter_map(|path| path.strip_prefix("traits.")?.split('.').next())
        .map(str::to_owned)
        .collect()
}

impl Catalog {
    /// The segments, put in dependency order. A reference to a segment not given
    /// counts as "not a member"; segments in a cycle (which the API refuses) keep the
    /// memberships of the previous pass for each other.
    pub fn new(segments: impl IntoIterator<Item = (String, Expr)>) -> Self {
        let mut pending: BTreeMap<String, Definition> = segments
            .into_iter()
            .map(|(key, tree)| {
                let inputs = tree.inputs();
                let traits = top_level_traits(&inputs);
                (
                    key.clone(),
                    Definition {
                        key,
                        tree,
                        inputs,
                        traits,
                    },
                )
            })
            .collect();
        let mut order: Vec<Definition> = Vec::with_capacity(pending.len());
        while !pending.is_empty() {
            let ready: Vec<String> = pending
                .values()
                .filter(|d| d.inputs.segments.iter().all(|s| !pending.contains_key(s)))
                .map(|d| d.key.clone())
                .collect();
            let take = if ready.is_empty() {
                // A cycle: take what is left in key order.
                pending.keys().cloned().collect()
            } else {
                ready
            };
            for key in take {
                if let Some(definition) = pending.remove(&key) {
                    order.push(definition);
                }
            }
        }
        let event_names = order
            .iter()
            .flat_map(|d| d.inputs.events.iter().cloned())
            .collect();
        let identifier_types = order
            .iter()
            .flat_map(|d| d.inputs.identifiers.iter().cloned())
            .collect();
        Catalog {
            order,
            event_names,
            identifier_types,
        }
    }

    /// The segments' keys, in dependency order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.order.iter().map(|d| d.key.as_str())
    }

    /// The names of the events any segment reads: the only events an update needs.
    pub fn event_names(&self) -> &BTreeSet<String> {
        &self.event_names
    }

    /// The identifier types any segment reads (`has ...`).
    pub fn identifier_types(&self) -> &BTreeSet<String> {
        &self.identifier_types
    }

    /// Re-evaluates, at `now`, the segments `change` touches for a profile whose last
    /// evaluation is `state`, and updates `state`. `events` loads the profile's events
    /// (only those named in [`Catalog::event_names`] are needed); it is called at most
    /// once, and only when a segment to re-evaluate reads events. Answers the enters and
    /// exits, in dependency order.
    ///
    /// # Errors
    ///
    /// What `events` answers.
    pub fn update<E>(
        &self,
        state: &mut State,
        change: &Change,
        subject: Subject<'_>,
        events: impl FnOnce() -> Result<Vec<EventRecord>, E>,
        now: Timestamp,
    ) -> Result<Vec<Transition>, E> {
        let identifiers_changed = state.identifiers != *subject.identifiers;
        if identifiers_changed {
            state.identifiers = subject.identifiers.clone();
        }
        let mut load = Some(events);
        let mut loaded: Vec<EventRecord> = Vec::new();
        let mut moved: BTreeSet<&str> = BTreeSet::new();
        let mut transitions = Vec::new();
        for definition in &self.order {
            let inputs = &definition.inputs;
            let touched = change.everything
                || change.segments.contains(&definition.key)
                || !definition.traits.is_disjoint(&change.traits)
                || !inputs.events.is_disjoint(&change.events)
                || (identifiers_changed && !inputs.identifiers.is_empty())
                || inputs.segments.iter().any(|s| moved.contains(s.as_str()));
            if !touched {
                continue;
            }
            if !inputs.events.is_empty()
                && let Some(load) = load.take()
            {
                loaded = load()?;
            }
            let profile = eval::Profile {
                traits: subject.traits,
                identifiers: subject.identifiers,
                events: &loaded,
                segments: &state.segments,
            };
            let member = eval::evaluate(&definition.tree, &profile, now);
            match eval::next_change(&definition.tree, &profile, now) {
                Some(at) => state.due.insert(definition.key.clone(), at),
                None => state.due.remove(&definition.key),
            };
            if member != state.segments.contains(&definition.key) {
                if member {
                    state.segments.insert(definition.key.clone());
                } else {
                    state.segments.remove(&definition.key);
                }
                moved.insert(&definition.key);
                transitions.push(Transition {
                    segment: definition.key.clone(),
                    entered: member,
                });
            }
        }
        Ok(transitions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parser::parse;
    use serde_json::json;
    use std::convert::Infallible;

    fn at(text: &str) -> Timestamp {
        text.parse().expect("timestamp")
    }

    fn catalog(segments: &[(&str, &str)]) -> Catalog {
        Catalog::new(
            segments
                .iter()
                .map(|(k, d)| ((*k).to_owned(), parse(d).expect("parses"))),
        )
    }

    fn order(name: &str, when: &str) -> EventRecord {
        EventRecord {
            name: name.to_owned(),
            timestamp: at(when),
            properties: Map::new(),
        }
    }

    /// A profile: traits, identifier types and events, updated through a catalog.
    struct Person {
        traits: Map<String, Value>,
        identifiers: BTreeSet<String>,
        events: Vec<EventRecord>,
        state: State,
        loads: usize,
    }

    impl Person {
        fn new() -> Self {
            Person {
                traits: Map::new(),
                identifiers: ["user_id".to_owned()].into(),
                events: Vec::new(),
                state: State::default(),
                loads: 0,
            }
        }

        fn update(&mut self, catalog: &Catalog, change: &Change, now: &str) -> Vec<(String, bool)> {
            let events = self.events.clone();
            let loads = &mut self.loads;
            catalog
                .update(
                    &mut self.state,
                    change,
                    Subject {
                        traits: &self.traits,
                        identifiers: &self.identifiers,
                    },
                    || -> Result<_, Infallible> {
                        *loads += 1;
                        Ok(events)
                    },
                    at(now),
                )
                .expect("infallible")
                .into_iter()
                .map(|t| (t.segment, t.entered))
                .collect()
        }
    }

    fn traits(names: &[&str]) -> Change {
        Change {
            traits: names.iter().map(|n| (*n).to_owned()).collect(),
            ..Change::default()
        }
    }

    #[test]
    fn dependency_order_puts_referenced_segments_first() {
        let c = catalog(&[
            ("a", r#"in_segment("b") and in_segment("c")"#),
            ("b", r#"in_segment("c")"#),
            ("c", "traits.x = 1"),
        ]);
        assert_eq!(c.keys().collect::<Vec<_>>(), ["c", "b", "a"]);
        let cycle = catalog(&[("x", r#"in_segment("y")"#), ("y", r#"in_segment("x")"#)]);
        assert_eq!(cycle.keys().count(), 2, "a cycle does not lose segments");
    }

    #[test]
    fn only_touched_segments_are_re_evaluated_and_each_transition_is_answered_once() {
        let c = catalog(&[
            ("pro", r#"traits.plan = "pro""#),
            ("buyers", r#"count(event "Order Completed") >= 2"#),
            (
                "pro_buyers",
                r#"in_segment("pro") and in_segment("buyers")"#,
            ),
            ("emailable", "has email"),
        ]);
        let mut p = Person::new();
        let now = "2026-11-29T12:00:00Z";
        p.traits.insert("plan".into(), json!("pro"));
        assert_eq!(
            p.update(&c, &traits(&["plan"]), now),
            [("pro".into(), true)]
        );
        assert_eq!(p.loads, 0, "no segment that reads events was touched");
        assert!(
            p.update(&c, &traits(&["plan"]), now).is_empty(),
            "no repeat"
        );

        // An event another segment reads does not touch "pro".
        p.traits.insert("plan".into(), json!("free"));
        p.events
            .push(order("Order Completed", "2026-11-29T11:00:00Z"));
        let orders = Change {
            events: ["Order Completed".to_owned()].into(),
            ..Change::default()
        };
        assert!(p.update(&c, &orders, now).is_empty());
        assert!(p.state.segments.contains("pro"), "plan was not re-read");
        p.traits.insert("plan".into(), json!("pro"));

        p.events
            .push(order("Order Completed", "2026-11-29T11:30:00Z"));
        assert_eq!(
            p.update(&c, &orders, now),
            [("buyers".into(), true), ("pro_buyers".into(), true)],
            "a dependent segment follows in the same pass"
        );
        assert_eq!(p.loads, 2);

        p.traits.insert("plan".into(), json!("free"));
        assert_eq!(
            p.update(&c, &traits(&["plan", "name"]), now),
            [("pro".into(), false), ("pro_buyers".into(), false)]
        );
        assert_eq!(p.loads, 2, "pro_buyers reads no events itself");

        // A new identifier type is noticed without being named in the change.
        p.identifiers.insert("email".into());
        assert_eq!(
            p.update(&c, &Change::default(), now),
            [("emailable".into(), true)]
        );
        assert!(p.update(&c, &Change::default(), now).is_empty());

        let mut gone = p.state.clone();
        assert_eq!(
            gone.leave_all()
                .into_iter()
                .map(|t| (t.segment, t.entered))
                .collect::<Vec<_>>(),
            [("buyers".into(), false), ("emailable".into(), false)]
        );
        assert!(gone.segments.is_empty());
    }

    #[test]
    fn a_windowed_segment_is_due_when_its_window_passes() {
        let c = catalog(&[("active", r#"count(event "Signed In" within 7d) >= 1"#)]);
        let mut p = Person::new();
        p.events.push(order("Signed In", "2026-11-28T09:00:00Z"));
        let change = Change {
            events: ["Signed In".to_owned()].into(),
            ..Change::default()
        };
        assert_eq!(
            p.update(&c, &change, "2026-11-29T12:00:00Z"),
            [("active".into(), true)]
        );
        let due = p.state.next_due().expect("a timer");
        assert_eq!(due, at("2026-12-05T09:00:00.000000001Z"));
        assert!(p.state.due_at(at("2026-12-05T09:00:00Z")).is_empty());
        let keys = p.state.due_at(due);
        assert_eq!(keys, ["active".to_owned()].into());
        assert_eq!(
            p.update(&c, &Change::segments(keys), "2026-12-05T09:00:00.001Z"),
            [("active".into(), false)]
        );
        assert_eq!(p.state.next_due(), None, "no event left to leave a window");
    }

    #[test]
    fn everything_re_evaluates_all_and_forget_drops_silently() {
        let c = catalog(&[("a", "traits.x = 1"), ("b", "traits.y = 1")]);
        let mut p = Person::new();
        p.traits.insert("x".into(), json!(1));
        p.traits.insert("y".into(), json!(1));
        let now = "2026-11-29T12:00:00Z";
        assert_eq!(
            p.update(&c, &Change::everything(), now),
            [("a".into(), true), ("b".into(), true)]
        );
        p.state.forget("a");
        assert_eq!(p.state.segments, ["b".to_owned()].into());
        assert_eq!(
            p.update(&c, &Change::segments(["a".to_owned()]), now),
            [("a".into(), true)],
            "a segment computed again enters again"
        );
    }
}
