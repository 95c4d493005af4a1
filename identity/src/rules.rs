//! The guardrails of stitching, as Segment Unify and Adobe's identity service offer them:
//! identifier types ordered by priority, a per-profile limit per type, a cap on
//! identifiers per profile, blocked values that never link anything, traits configured
//! as identifiers, and the priority of sources when traits conflict.

use std::collections::BTreeMap;

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::identifier::{Identifier, kind};

/// Values that never identify anyone (compared case-insensitively, trimmed).
pub const BUILT_IN_BLOCKED: [&str; 13] = [
    "",
    "null",
    "undefined",
    "none",
    "nil",
    "0",
    "-1",
    "unknown",
    "n/a",
    "anonymous",
    "guest",
    "test@test.com",
    "test@example.com",
];

/// Identity settings, as configured (JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Identifier types from the highest priority to the lowest; types not listed come
    /// after them.
    pub priority: Vec<String>,
    /// At most this many identifiers of a type per profile; types not listed have
    /// `default_limit`.
    pub limits: BTreeMap<String, usize>,
    /// The limit of types not in `limits`.
    pub default_limit: usize,
    /// At most this many identifiers per profile.
    pub max_identifiers: usize,
    /// Values that never link, besides [`BUILT_IN_BLOCKED`] (case-insensitive).
    pub blocked_values: Vec<String>,
    /// Regular expressions; a value matching one never links.
    pub blocked_patterns: Vec<String>,
    /// Traits that are identifiers: trait name → identifier type.
    pub trait_identifiers: BTreeMap<String, String>,
    /// Sources (ids) whose traits win over others', highest first; among equals the
    /// newest value wins.
    pub source_priority: Vec<String>,
    /// Probabilistic matching of profiles that share no identifier, over their traits.
    pub matching: Option<crate::matching::MatchConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            priority: [
                kind::USER_ID,
                kind::EMAIL,
                kind::PHONE,
                kind::DEVICE_ID,
                kind::ANONYMOUS_ID,
            ]
            .map(str::to_owned)
            .to_vec(),
            limits: [
                (kind::USER_ID, 1),
                (kind::EMAIL, 5),
                (kind::PHONE, 5),
                (kind::DEVICE_ID, 10),
                (kind::ANONYMOUS_ID, 50),
            ]
            .into_iter()
            .map(|(k, n)| (k.to_owned(), n))
            .collect(),
            default_limit: 5,
            max_identifiers: 100,
            blocked_values: Vec::new(),
            blocked_patterns: Vec::new(),
            trait_identifiers: BTreeMap::new(),
            source_priority: Vec::new(),
            matching: None,
        }
    }
}

/// [`Config`] checked and compiled.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    config: Config,
    patterns: Vec<Regex>,
    trait_identifiers: Vec<(String, String)>,
}

/// Why settings are refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidConfig(pub String);

impl Config {
    /// Checks and compiles the settings.
    ///
    /// # Errors
    ///
    /// A bad regular expression, or a limit of 0.
    pub fn compile(self) -> Result<Rules, InvalidConfig> {
        let patterns = self
            .blocked_patterns
            .iter()
            .map(|p| {
                Regex::new(p).map_err(|e| InvalidConfig(format!("blocked pattern {p:?}: {e}")))
            })
            .collect::<Result<_, _>>()?;
        if let Some((kind, _)) = self.limits.iter().find(|(_, n)| **n == 0) {
            return Err(InvalidConfig(format!(
                "the limit of {kind} must be at least 1"
            )));
        }
        if let Some(matching) = &self.matching {
            matching.check().map_err(InvalidConfig)?;
        }
        if self.max_identifiers == 0 || self.default_limit == 0 {
            return Err(InvalidConfig(
                "max_identifiers and default_limit must be at least 1".to_owned(),
            ));
        }
        let trait_identifiers = self
            .trait_identifiers
            .iter()
            .map(|(t, k)| (t.clone(), k.clone()))
            .collect();
        Ok(Rules {
            config: self,
            patterns,
            trait_identifiers,
        })
    }
}

impl Rules {
    /// The settings.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Traits configured as identifiers, as (trait, type).
    pub fn trait_identifiers(&self) -> &[(String, String)] {
        &self.trait_identifiers
    }

    /// Why `id` may not link anything, if it may not.
    pub fn blocked(&self, id: &Identifier) -> Option<String> {
        let value = id.value.trim();
        let listed = BUILT_IN_BLOCKED
            .iter()
            .copied()
            .chain(self.config.blocked_values.iter().map(String::as_str))
            .any(|b| b.eq_ignore_ascii_case(value));
        if listed {
            return Some(format!("{id} is a blocked value"));
        }
        self.patterns
            .iter()
            .find(|p| p.is_match(&id.value))
            .map(|p| format!("{id} matches the blocked pattern {:?}", p.as_str()))
    }

    /// The rank of a type: 0 is the highest priority.
    pub fn rank(&self, kind: &str) -> usize {
        self.config
            .priority
            .iter()
            .position(|k| k == kind)
            .unwrap_or(self.config.priority.len())
    }

    /// At most this many identifiers of `kind` per profile.
    pub fn limit(&self, kind: &str) -> usize {
        self.config
            .limits
            .get(kind)
            .copied()
            .unwrap_or(self.config.default_limit)
    }

    /// At most this many identifiers per profile.
    pub fn max_identifiers(&self) -> usize {
        self.config.max_identifiers
    }

    /// The rank of a source for traits: 0 is the highest.
    pub fn source_rank(&self, source: &str) -> usize {
        self.config
            .source_priority
            .iter()
            .position(|s| s == source)
            .unwrap_or(self.config.source_priority.len())
    }

    /// Why a profile holding `ids` would break a guardrail, if it would.
    pub fn breach(&self, ids: &[&Identifier]) -> Option<String> {
        if ids.len() > self.max_identifiers() {
            return Some(format!(
                "the profile would hold {} identifiers (cap {})",
                ids.len(),
                self.max_identifiers()
            ));
        }
        let mut counts: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for id in ids {
            counts.entry(&id.kind).or_default().push(&id.value);
        }
        counts.into_iter().find_map(|(kind, values)| {
            let limit = self.limit(kind);
            (values.len() > limit).then(|| {
                format!(
                    "the profile would hold {} {kind} identifiers ({}; limit {limit})",
                    values.len(),
                    values.join(", ")
                )
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocked_values_never_link() {
        let rules = Config {
            blocked_values: vec!["ACME-TEST".to_owned()],
            blocked_patterns: vec!["^test\\+.*@".to_owned()],
            ..Config::default()
        }
        .compile()
        .expect("valid");
        for (kind, value) in [
            ("user_id", ""),
            ("user_id", " NULL "),
            ("anonymous_id", "undefined"),
            ("user_id", "0"),
            ("anonymous_id", "Anonymous"),
            ("user_id", "guest"),
            ("email", "test@test.com"),
            ("user_id", "acme-test"),
            ("email", "test+1@example.com"),
        ] {
            assert!(
                rules.blocked(&Identifier::new(kind, value)).is_some(),
                "{kind}:{value}"
            );
        }
        assert_eq!(
            rules.blocked(&Identifier::new("email", "ann@example.com")),
            None
        );
        assert_eq!(rules.blocked(&Identifier::new("user_id", "10")), None);
    }

    #[test]
    fn priorities_limits_and_breaches() {
        let rules = Rules::default();
        assert!(rules.rank("user_id") < rules.rank("email"));
        assert!(rules.rank("email") < rules.rank("anonymous_id"));
        assert_eq!(rules.rank("loyalty_id"), 5);
        assert_eq!(rules.limit("user_id"), 1);
        assert_eq!(rules.limit("loyalty_id"), 5);
        let (u1, u2) = (
            Identifier::new("user_id", "u1"),
            Identifier::new("user_id", "u2"),
        );
        let breach = rules.breach(&[&u1, &u2]).expect("two user ids");
        assert!(
            breach.contains("u1, u2") && breach.contains("limit 1"),
            "{breach}"
        );
        assert_eq!(rules.breach(&[&u1]), None);
        let many: Vec<Identifier> = (0..101)
            .map(|i| Identifier::new("anonymous_id", format!("a{i}")))
            .collect();
        let capped = Config {
            limits: BTreeMap::from([("anonymous_id".to_owned(), 500)]),
            ..Config::default()
        }
        .compile()
        .expect("valid");
        assert!(
            capped
                .breach(&many.iter().collect::<Vec<_>>())
                .is_some_and(|b| b.contains("cap 100"))
        );
    }

    #[test]
    fn bad_settings_are_refused() {
        let bad = Config {
            blocked_patterns: vec!["(".to_owned()],
            ..Config::default()
        };
        assert!(bad.compile().is_err());
        let zero = Config {
            limits: BTreeMap::from([("email".to_owned(), 0)]),
            ..Config::default()
        };
        assert!(zero.compile().is_err_and(|e| e.0.contains("email")));
        assert!(serde_json::from_str::<Config>(r#"{"limitz": {}}"#).is_err());
    }
}
