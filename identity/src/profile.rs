//! Profiles and the events they are made of.
//!
//! A profile's traits, first and last seen and counts are derived from its events
//! ([`Profile::apply`]): traits merge with the highest-priority source winning, then the
//! newest value; so a split can rebuild both profiles from their events.

use std::collections::BTreeMap;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::identifier::{Identifier, identifiers_of};
use crate::rules::Rules;

/// What a profile keeps of one event: enough to rebuild the profile and show its
/// timeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventSummary {
    /// The event's position in the collector's log.
    pub seq: u64,
    /// Its `messageId`.
    pub message_id: String,
    /// The source that sent it.
    pub source: String,
    /// Its type (`track`, `identify`...).
    pub kind: String,
    /// The event name of a `track`, the name of a `page` or `screen`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// When it happened.
    pub timestamp: Timestamp,
    /// The traits it set (`traits`, or `context.traits`).
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub traits: Map<String, Value>,
    /// The identifiers it carried.
    pub identifiers: Vec<Identifier>,
}

impl EventSummary {
    /// The summary of a Segment message.
    pub fn of(seq: u64, source: &str, message: &Value, rules: &Rules) -> Self {
        let text = |key: &str| message.get(key).and_then(Value::as_str).map(str::to_owned);
        let kind = text("type").unwrap_or_default();
        let name = match kind.as_str() {
            "track" => text("event"),
            "page" | "screen" => text("name"),
            _ => None,
        };
        let traits = message
            .get("traits")
            .or_else(|| message.pointer("/context/traits"))
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        EventSummary {
            seq,
            message_id: text("messageId").unwrap_or_default(),
            source: source.to_owned(),
            kind,
            name,
            timestamp: text("timestamp")
                .and_then(|t| t.parse().ok())
                .unwrap_or(Timestamp::UNIX_EPOCH),
            traits,
            identifiers: identifiers_of(message, rules.trait_identifiers()),
        }
    }
}

/// One trait's value and where it came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraitValue {
    /// The value.
    pub value: Value,
    /// When the event that set it happened.
    pub updated_at: Timestamp,
    /// The source that set it.
    pub source: String,
}

/// A unified profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    /// Its stable id.
    pub id: String,
    /// Creation order: when two profiles merge, the older one survives.
    pub created: u64,
    /// Set when this profile was merged into another: that one answers for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merged_into: Option<String>,
    /// Its identifiers.
    pub identifiers: Vec<Identifier>,
    /// Its traits.
    pub traits: BTreeMap<String, TraitValue>,
    /// When its first event happened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_seen: Option<Timestamp>,
    /// When its last event happened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<Timestamp>,
    /// Events attributed to it.
    pub events: u64,
    /// `track` events by name.
    pub event_counts: BTreeMap<String, u64>,
    /// The highest `seq` applied (a replayed event is not counted twice).
    pub last_seq: u64,
    /// Profiles split from this one, which it never merges with automatically again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub split_from: Vec<String>,
}

impl Profile {
    /// A new, empty profile.
    pub fn new(id: String, created: u64) -> Self {
        Profile {
            id,
            created,
            merged_into: None,
            identifiers: Vec::new(),
            traits: BTreeMap::new(),
            first_seen: None,
            last_seen: None,
            events: 0,
            event_counts: BTreeMap::new(),
            last_seq: 0,
            split_from: Vec::new(),
        }
    }

    /// Adds one event's traits and counts.
    pub fn apply(&mut self, event: &EventSummary, rules: &Rules) {
        self.events += 1;
        self.last_seq = self.last_seq.max(event.seq);
        self.first_seen = Some(
            self.first_seen
                .map_or(event.timestamp, |t| t.min(event.timestamp)),
        );
        self.last_seen = Some(
            self.last_seen
                .map_or(event.timestamp, |t| t.max(event.timestamp)),
        );
        if event.kind == "track"
            && let Some(name) = &event.name
        {
            *self.event_counts.entry(name.clone()).or_default() += 1;
        }
        for (name, value) in &event.traits {
            let candidate = TraitValue {
                value: value.clone(),
                updated_at: event.timestamp,
                source: event.source.clone(),
            };
            self.set_trait(name, candidate, rules);
        }
    }

    fn set_trait(&mut self, name: &str, candidate: TraitValue, rules: &Rules) {
        let wins = match self.traits.get(name) {
            None => true,
            Some(current) => {
                let rank = |t: &TraitValue| {
                    (
                        std::cmp::Reverse(rules.source_rank(&t.source)),
                        t.updated_at,
                    )
                };
                rank(&candidate) >= rank(current)
            }
        };
        if wins {
            self.traits.insert(name.to_owned(), candidate);
        }
    }

    /// Takes in another profile's traits and counts (a merge).
    pub fn absorb(&mut self, other: &Profile, rules: &Rules) {
        for id in &other.identifiers {
            if !self.identifiers.contains(id) {
                self.identifiers.push(id.clone());
            }
        }
        for (name, value) in &other.traits {
            self.set_trait(name, value.clone(), rules);
        }
        self.first_seen = match (self.first_seen, other.first_seen) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.last_seen = self.last_seen.max(other.last_seen);
        self.events += other.events;
        for (name, n) in &other.event_counts {
            *self.event_counts.entry(name.clone()).or_default() += n;
        }
        self.last_seq = self.last_seq.max(other.last_seq);
    }

    /// Forgets what events gave it (before rebuilding it from its events).
    pub fn reset_derived(&mut self) {
        self.traits.clear();
        self.first_seen = None;
        self.last_seen = None;
        self.events = 0;
        self.event_counts.clear();
        self.last_seq = 0;
    }

    /// The traits as a plain object.
    pub fn trait_values(&self) -> Map<String, Value> {
        self.traits
            .iter()
            .map(|(k, v)| (k.clone(), v.value.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::Config;
    use serde_json::json;

    fn event(seq: u64, source: &str, at: &str, traits: Value) -> EventSummary {
        EventSummary::of(
            seq,
            source,
            &json!({"type": "identify", "userId": "u", "timestamp": at, "traits": traits}),
            &Rules::default(),
        )
    }

    #[test]
    fn the_newest_trait_wins_within_a_source_priority() {
        let rules = Config {
            source_priority: vec!["crm".to_owned()],
            ..Config::default()
        }
        .compile()
        .expect("valid");
        let mut profile = Profile::new("p".to_owned(), 1);
        profile.apply(
            &event(
                1,
                "web",
                "2024-01-02T00:00:00Z",
                json!({"plan": "pro", "name": "Ann"}),
            ),
            &rules,
        );
        profile.apply(
            &event(2, "web", "2024-01-01T00:00:00Z", json!({"plan": "free"})),
            &rules,
        );
        assert_eq!(profile.traits["plan"].value, "pro", "an older value loses");
        profile.apply(
            &event(
                3,
                "crm",
                "2023-01-01T00:00:00Z",
                json!({"plan": "enterprise"}),
            ),
            &rules,
        );
        assert_eq!(
            profile.traits["plan"].value, "enterprise",
            "the priority source wins even when older"
        );
        profile.apply(
            &event(
                4,
                "web",
                "2025-01-01T00:00:00Z",
                json!({"plan": "team", "name": "Annie"}),
            ),
            &rules,
        );
        assert_eq!(profile.traits["plan"].value, "enterprise");
        assert_eq!(profile.traits["name"].value, "Annie");
        assert_eq!(profile.events, 4);
        assert_eq!(
            profile.first_seen.map(|t| t.to_string()).as_deref(),
            Some("2023-01-01T00:00:00Z")
        );
        assert_eq!(
            profile.last_seen.map(|t| t.to_string()).as_deref(),
            Some("2025-01-01T00:00:00Z")
        );
    }

    #[test]
    fn tracks_are_counted_by_name() {
        let rules = Rules::default();
        let mut profile = Profile::new("p".to_owned(), 1);
        for (seq, name) in [
            (1, "Order Completed"),
            (2, "Order Completed"),
            (3, "Signed Up"),
        ] {
            let summary = EventSummary::of(
                seq,
                "web",
                &json!({"type": "track", "event": name, "anonymousId": "a", "timestamp": "2024-01-01T00:00:00Z"}),
                &rules,
            );
            profile.apply(&summary, &rules);
        }
        assert_eq!(profile.event_counts["Order Completed"], 2);
        assert_eq!(profile.event_counts["Signed Up"], 1);
        assert_eq!(profile.last_seq, 3);
    }
}
