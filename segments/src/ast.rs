//! The segment tree: what the parser produces, what the evaluator runs, and its JSON form
//! (the same tree, serialised with serde).

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cmp {
    /// `=`
    Eq,
    /// `!=`
    Ne,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
    /// `contains`: a string containing a string, or an array containing a value.
    Contains,
    /// `starts_with`
    StartsWith,
}

/// An aggregate over events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Func {
    /// How many.
    Count,
    /// The sum of a numeric property.
    Sum,
    /// The average of a numeric property.
    Avg,
}

/// Which occurrence of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Which {
    /// The first one.
    First,
    /// The last one.
    Last,
}

/// A test on an event's field: `properties.total > 50`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Filter {
    /// The field, as a dot path (`properties.total`).
    pub path: String,
    /// The comparison.
    pub cmp: Cmp,
    /// The value compared with.
    pub value: Value,
}

/// The events a condition looks at: a name, filters, and a time window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Events {
    /// The event name (a `track` event).
    pub name: String,
    /// Every filter must hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<Filter>,
    /// Only events in the last this many seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub within_secs: Option<u64>,
}

/// A segment condition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Expr {
    /// Every condition holds.
    And {
        /// The conditions.
        all: Vec<Expr>,
    },
    /// At least one condition holds.
    Or {
        /// The conditions.
        any: Vec<Expr>,
    },
    /// The condition does not hold.
    Not {
        /// The condition.
        expr: Box<Expr>,
    },
    /// A trait compared with a value: `traits.plan = "pro"`.
    Compare {
        /// The trait, as a dot path (`traits.plan`).
        path: String,
        /// The comparison.
        cmp: Cmp,
        /// The value.
        value: Value,
    },
    /// A trait equal to one of the values: `traits.country in ["FR", "DE"]`.
    In {
        /// The trait.
        path: String,
        /// The values.
        values: Vec<Value>,
    },
    /// A trait is set: `traits.email exists`.
    Exists {
        /// The trait.
        path: String,
    },
    /// The profile has an identifier of this type, or a push token: `has email`.
    Has {
        /// `email`, `phone`, `user_id`, `push_token`...
        identifier: String,
    },
    /// The profile is a member of another segment: `in_segment("churned")`.
    InSegment {
        /// The other segment's key.
        segment: String,
    },
    /// An aggregate over events compared with a number:
    /// `count(event "Order Completed" within 30d) >= 2`,
    /// `sum(event "Order Completed", properties.total) > 100`.
    Aggregate {
        /// Count, sum or average.
        func: Func,
        /// The events.
        events: Events,
        /// The numeric property summed or averaged.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        property: Option<String>,
        /// The comparison.
        cmp: Cmp,
        /// The number.
        value: f64,
    },
    /// The first or last occurrence of an event happened in the last `within_secs`:
    /// `last(event "Signed In") within 7d`.
    Occurred {
        /// First or last.
        which: Which,
        /// The events.
        events: Events,
        /// The window, in seconds.
        within_secs: u64,
    },
}

/// What a segment's membership depends on, so that a profile change re-evaluates only
/// the segments whose inputs changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inputs {
    /// Trait paths read.
    pub traits: BTreeSet<String>,
    /// Event names counted or looked at.
    pub events: BTreeSet<String>,
    /// Identifier types looked for.
    pub identifiers: BTreeSet<String>,
    /// Other segments.
    pub segments: BTreeSet<String>,
    /// Time windows: membership can change with time alone.
    pub windowed: bool,
}

impl Expr {
    /// What the condition reads.
    pub fn inputs(&self) -> Inputs {
        let mut inputs = Inputs::default();
        self.collect(&mut inputs);
        inputs
    }

    fn collect(&self, inputs: &mut Inputs) {
        match self {
            Expr::And { all: items } | Expr::Or { any: items } => {
                for item in items {
                    item.collect(inputs);
                }
            }
            Expr::Not { expr } => expr.collect(inputs),
            Expr::Compare { path, .. } | Expr::In { path, .. } | Expr::Exists { path } => {
                inputs.traits.insert(path.clone());
            }
            Expr::Has { identifier } => {
                inputs.identifiers.insert(identifier.clone());
            }
            Expr::InSegment { segment } => {
                inputs.segments.insert(segment.clone());
            }
            Expr::Aggregate { events, .. } => {
                inputs.events.insert(events.name.clone());
                inputs.windowed |= events.within_secs.is_some();
            }
            Expr::Occurred { events, .. } => {
                inputs.events.insert(events.name.clone());
                inputs.windowed = true;
            }
        }
    }
}
