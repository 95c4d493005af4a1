//! Probabilistic matching for profiles that share no identifier: Fellegi-Sunter record
//! linkage.
//!
//! Each configured field is compared with a [`Comparator`] that answers an agreement
//! level (0 = disagree, higher = closer) or nothing when a side is missing. Blocking keys
//! keep the comparisons to pairs that share at least one key. A pair's weight is the sum
//! over its fields of `log2(m / u)` for its level, where `m` is the probability of that
//! level among true matches and `u` among non-matches; `m` and `u` are estimated without
//! labels by expectation-maximisation over the candidate pairs ([`estimate`]), or set by
//! hand. A pair's match probability combines its weight with the estimated share of
//! matches among the candidates; pairs at or above [`MatchConfig::match_probability`]
//! merge, pairs between [`MatchConfig::review_probability`] and it are suggested for
//! review.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};

/// How a field's two values are compared.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Comparator {
    /// Equal after normalisation (lower case, no spaces or punctuation): levels
    /// disagree, agree.
    Exact,
    /// Names and words: Jaro-Winkler similarity; levels disagree, `>= low`, `>= high`,
    /// equal.
    JaroWinkler {
        /// The similarity of the middle level.
        low: f64,
        /// The similarity of the upper level.
        high: f64,
    },
    /// Dates as `YYYY-MM-DD`: levels disagree, same year, one part off or day and month
    /// swapped, equal.
    Date,
}

impl Comparator {
    /// The number of levels.
    pub fn levels(&self) -> usize {
        match self {
            Comparator::Exact => 2,
            Comparator::JaroWinkler { .. } | Comparator::Date => 4,
        }
    }

    /// The agreement level of two present values.
    pub fn compare(&self, a: &str, b: &str) -> usize {
        let (a, b) = (normalise(a), normalise(b));
        match self {
            Comparator::Exact => usize::from(a == b),
            Comparator::JaroWinkler { low, high } => {
                if a == b {
                    3
                } else {
                    let similarity = strsim::jaro_winkler(&a, &b);
                    if similarity >= *high {
                        2
                    } else if similarity >= *low {
                        1
                    } else {
                        0
                    }
                }
            }
            Comparator::Date => compare_dates(&a, &b),
        }
    }
}

fn normalise(value: &str) -> String {
    value
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == '-')
        .flat_map(char::to_lowercase)
        .collect()
}

fn compare_dates(a: &str, b: &str) -> usize {
    if a == b {
        return 3;
    }
    let parts = |d: &str| -> Option<(String, String, String)> {
        let mut it = d.split('-');
        Some((
            it.next()?.to_owned(),
            it.next()?.to_owned(),
            it.next()?.to_owned(),
        ))
    };
    let (Some((ay, am, ad)), Some((by, bm, bd))) = (parts(a), parts(b)) else {
        return 0;
    };
    let same = [ay == by, am == bm, ad == bd]
        .iter()
        .filter(|s| **s)
        .count();
    let swapped = ay == by && am == bd && ad == bm;
    if same == 2 || swapped {
        2
    } else if ay == by {
        1
    } else {
        0
    }
}

/// One compared field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Field {
    /// The trait compared.
    pub name: String,
    /// How.
    pub comparator: Comparator,
    /// Another field of the other record to compare with too, keeping the closer
    /// (`last_name` for `first_name`: names entered the wrong way round still agree).
    #[serde(default)]
    pub also: Option<String>,
    /// Hand-set `m` per level (lowest level first); estimated when absent.
    #[serde(default)]
    pub m: Option<Vec<f64>>,
    /// Hand-set `u` per level; estimated when absent.
    #[serde(default)]
    pub u: Option<Vec<f64>>,
}

/// A blocking key part: a field, optionally cut to a prefix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyPart {
    /// The field.
    pub field: String,
    /// Only its first characters (after normalisation).
    #[serde(default)]
    pub prefix: Option<usize>,
}

/// Matching settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchConfig {
    /// The compared fields.
    pub fields: Vec<Field>,
    /// Blocking keys: two records are compared when they share one whole key.
    pub blocking: Vec<Vec<KeyPart>>,
    /// Pairs this likely to be one person or more merge (default 0.5: the more likely
    /// answer wins).
    #[serde(default = "default_match_probability")]
    pub match_probability: f64,
    /// Pairs this likely or more, and less than `match_probability`, are suggested for
    /// review (default 0.1).
    #[serde(default = "default_review_probability")]
    pub review_probability: f64,
}

fn default_match_probability() -> f64 {
    0.5
}

fn default_review_probability() -> f64 {
    0.1
}

/// A record to match: an id and its field values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The profile id.
    pub id: String,
    /// Field values by name.
    pub fields: BTreeMap<String, String>,
}

/// Per-field `m` and `u` by level, and the share of matches among candidate pairs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Parameters {
    /// `m[field][level]`.
    pub m: Vec<Vec<f64>>,
    /// `u[field][level]`.
    pub u: Vec<Vec<f64>>,
    /// The estimated share of matches among the candidate pairs.
    pub prior: f64,
}

/// A scored candidate pair.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scored {
    /// One record's id.
    pub a: String,
    /// The other's.
    pub b: String,
    /// The match weight (log2 likelihood ratio).
    pub weight: f64,
    /// The probability that the two are one person.
    pub probability: f64,
    /// The agreement level of each field (`None`: missing on a side).
    pub levels: Vec<Option<usize>>,
}

/// The outcome of a matching run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    /// Pairs to merge.
    pub matches: Vec<Scored>,
    /// Pairs to review.
    pub suggestions: Vec<Scored>,
    /// Pairs compared.
    pub compared: usize,
    /// The parameters used.
    pub parameters: Parameters,
}

impl MatchConfig {
    /// Checks what serde cannot: fields and keys present, probabilities in order, hand-set
    /// `m` and `u` with one value per level.
    ///
    /// # Errors
    ///
    /// A sentence saying what is wrong.
    pub fn check(&self) -> Result<(), String> {
        if self.fields.is_empty() || self.blocking.iter().all(Vec::is_empty) {
            return Err("matching needs fields and at least one blocking key".to_owned());
        }
        if !(0.0 < self.review_probability
            && self.review_probability <= self.match_probability
            && self.match_probability < 1.0)
        {
            return Err(
                "matching needs 0 < review_probability <= match_probability < 1".to_owned(),
            );
        }
        for field in &self.fields {
            for (which, values) in [("m", &field.m), ("u", &field.u)] {
                if let Some(values) = values
                    && (values.len() != field.comparator.levels()
                        || values.iter().any(|v| *v <= 0.0 || *v > 1.0))
                {
                    return Err(format!(
                        "{which} of {} needs {} probabilities in (0, 1], one per level",
                        field.name,
                        field.comparator.levels()
                    ));
                }
            }
        }
        Ok(())
    }
}

fn key_of(record: &Record, key: &[KeyPart]) -> Option<String> {
    let mut parts = Vec::with_capacity(key.len());
    for part in key {
        let value = normalise(record.fields.get(&part.field)?);
        if value.is_empty() {
            return None;
        }
        parts.push(match part.prefix {
            Some(n) => value.chars().take(n).collect(),
            None => value,
        });
    }
    Some(parts.join("\u{1f}"))
}

/// The candidate pairs: records sharing at least one blocking key (each pair once).
pub fn candidates(records: &[Record], blocking: &[Vec<KeyPart>]) -> Vec<(usize, usize)> {
    let mut pairs = HashSet::new();
    for key in blocking {
        let mut blocks: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, record) in records.iter().enumerate() {
            if let Some(k) = key_of(record, key) {
                blocks.entry(k).or_default().push(i);
            }
        }
        for members in blocks.values() {
            for (x, i) in members.iter().enumerate() {
                for j in &members[x + 1..] {
                    pairs.insert((*i.min(j), *i.max(j)));
                }
            }
        }
    }
    let mut pairs: Vec<(usize, usize)> = pairs.into_iter().collect();
    pairs.sort_unstable();
    pairs
}

fn levels(config: &MatchConfig, a: &Record, b: &Record) -> Vec<Option<usize>> {
    let present = |record: &'_ Record, name: &str| -> Option<String> {
        record
            .fields
            .get(name)
            .filter(|v| !v.trim().is_empty())
            .cloned()
    };
    config
        .fields
        .iter()
        .map(|field| {
            let x = present(a, &field.name)?;
            let direct = present(b, &field.name).map(|y| field.comparator.compare(&x, &y));
            let crossed = field
                .also
                .as_deref()
                .and_then(|other| present(b, other))
                .map(|y| field.comparator.compare(&x, &y));
            direct.max(crossed).or(direct)
        })
        .collect()
}

/// Estimates `m`, `u` and the prior by expectation-maximisation over the comparison
/// vectors, assuming fields independent given the match status. Hand-set values stay.
pub fn estimate(config: &MatchConfig, vectors: &[Vec<Option<usize>>]) -> Parameters {
    const FLOOR: f64 = 1e-4;
    let mut m: Vec<Vec<f64>> = Vec::new();
    let mut u: Vec<Vec<f64>> = Vec::new();
    for field in &config.fields {
        let n = field.comparator.levels();
        // Start: matches mostly agree fully, non-matches mostly disagree.
        let mut start_m = vec![0.1 / (n as f64 - 1.0).max(1.0); n];
        start_m[n - 1] = 0.9;
        let mut start_u = vec![0.1 / (n as f64 - 1.0).max(1.0); n];
        start_u[0] = 0.9;
        m.push(field.m.clone().unwrap_or(start_m));
        u.push(field.u.clone().unwrap_or(start_u));
    }
    let mut prior = 0.1;
    for _ in 0..100 {
        let mut m_counts: Vec<Vec<f64>> = m.iter().map(|l| vec![FLOOR; l.len()]).collect();
        let mut u_counts: Vec<Vec<f64>> = u.iter().map(|l| vec![FLOOR; l.len()]).collect();
        let mut expected_matches = 0.0;
        for vector in vectors {
            let (mut pm, mut pu) = (prior, 1.0 - prior);
            for (k, level) in vector.iter().enumerate() {
                if let Some(l) = level {
                    pm *= m[k][*l];
                    pu *= u[k][*l];
                }
            }
            let g = if pm + pu > 0.0 { pm / (pm + pu) } else { 0.0 };
            expected_matches += g;
            for (k, level) in vector.iter().enumerate() {
                if let Some(l) = level {
                    m_counts[k][*l] += g;
                    u_counts[k][*l] += 1.0 - g;
                }
            }
        }
        let new_prior = (expected_matches / vectors.len().max(1) as f64).clamp(FLOOR, 1.0 - FLOOR);
        let normalise = |counts: Vec<f64>| {
            let total: f64 = counts.iter().sum();
            counts.into_iter().map(|c| c / total).collect::<Vec<f64>>()
        };
        for (k, field) in config.fields.iter().enumerate() {
            if field.m.is_none() {
                m[k] = normalise(std::mem::take(&mut m_counts[k]));
            }
            if field.u.is_none() {
                u[k] = normalise(std::mem::take(&mut u_counts[k]));
            }
        }
        let converged = (new_prior - prior).abs() < 1e-7;
        prior = new_prior;
        if converged {
            break;
        }
    }
    Parameters { m, u, prior }
}

/// The weight of a comparison vector.
pub fn weight(parameters: &Parameters, vector: &[Option<usize>]) -> f64 {
    vector
        .iter()
        .enumerate()
        .filter_map(|(k, level)| level.map(|l| (parameters.m[k][l] / parameters.u[k][l]).log2()))
        .sum()
}

/// Compares the candidate pairs, estimates the parameters and classifies the pairs.
pub fn run(config: &MatchConfig, records: &[Record]) -> Outcome {
    let pairs = candidates(records, &config.blocking);
    let vectors: Vec<Vec<Option<usize>>> = pairs
        .iter()
        .map(|(i, j)| levels(config, &records[*i], &records[*j]))
        .collect();
    let parameters = estimate(config, &vectors);
    let mut matches = Vec::new();
    let mut suggestions = Vec::new();
    let prior_odds = (parameters.prior / (1.0 - parameters.prior)).log2();
    for ((i, j), vector) in pairs.iter().zip(vectors) {
        let w = weight(&parameters, &vector);
        let probability = 1.0 / (1.0 + (-(w + prior_odds)).exp2());
        let scored = Scored {
            a: records[*i].id.clone(),
            b: records[*j].id.clone(),
            weight: w,
            probability,
            levels: vector,
        };
        if probability >= config.match_probability {
            matches.push(scored);
        } else if probability >= config.review_probability {
            suggestions.push(scored);
        }
    }
    Outcome {
        matches,
        suggestions,
        compared: pairs.len(),
        parameters,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comparators_grade_agreement() {
        let jw = Comparator::JaroWinkler {
            low: 0.85,
            high: 0.93,
        };
        assert_eq!(jw.compare("Catherine", "catherine"), 3);
        assert_eq!(jw.compare("Catherine", "Catherina"), 2);
        assert_eq!(jw.compare("Jonathan", "Jonatan"), 2);
        assert_eq!(jw.compare("Smith", "Jones"), 0);
        assert_eq!(Comparator::Exact.compare("SW1A 1AA", "sw1a1aa"), 1);
        assert_eq!(Comparator::Exact.compare("SW1A 1AA", "SW1A 2AA"), 0);
        assert_eq!(Comparator::Date.compare("1980-03-04", "1980-03-04"), 3);
        assert_eq!(
            Comparator::Date.compare("1980-03-04", "1980-04-03"),
            2,
            "day and month swapped"
        );
        assert_eq!(Comparator::Date.compare("1980-03-04", "1980-03-05"), 2);
        assert_eq!(Comparator::Date.compare("1980-03-04", "1980-11-21"), 1);
        assert_eq!(Comparator::Date.compare("1980-03-04", "1991-11-21"), 0);
        assert_eq!(Comparator::Date.compare("1980-03-04", "soon"), 0);
    }

    #[test]
    fn hand_set_weights_are_kept_and_em_separates_matches() {
        let field = |name: &str, m: Option<Vec<f64>>, u: Option<Vec<f64>>| Field {
            name: name.to_owned(),
            comparator: Comparator::Exact,
            also: None,
            m,
            u,
        };
        let config = MatchConfig {
            fields: vec![
                field("a", Some(vec![0.05, 0.95]), Some(vec![0.9, 0.1])),
                field("b", None, None),
            ],
            blocking: vec![vec![KeyPart {
                field: "a".to_owned(),
                prefix: None,
            }]],
            match_probability: 0.5,
            review_probability: 0.1,
        };
        assert_eq!(config.check(), Ok(()));
        // 30 pairs agreeing on both fields, 70 disagreeing on both.
        let vectors: Vec<Vec<Option<usize>>> = (0..100)
            .map(|i| {
                if i < 30 {
                    vec![Some(1), Some(1)]
                } else {
                    vec![Some(0), Some(0)]
                }
            })
            .collect();
        let parameters = estimate(&config, &vectors);
        assert_eq!(parameters.m[0], vec![0.05, 0.95], "hand-set m stays");
        assert_eq!(parameters.u[0], vec![0.9, 0.1], "hand-set u stays");
        assert!(parameters.m[1][1] > 0.9, "{parameters:?}");
        assert!(parameters.u[1][0] > 0.9, "{parameters:?}");
        assert!((parameters.prior - 0.3).abs() < 0.05, "{parameters:?}");
        assert!(weight(&parameters, &[Some(1), Some(1)]) > 5.0);
        assert!(weight(&parameters, &[Some(0), Some(0)]) < -5.0);
        assert_eq!(
            weight(&parameters, &[None, None]),
            0.0,
            "missing values weigh nothing"
        );

        let mut bad = config.clone();
        bad.fields[0].m = Some(vec![0.5]);
        assert!(bad.check().is_err_and(|e| e.contains("one per level")));
        bad = config.clone();
        bad.review_probability = 0.9;
        bad.match_probability = 0.5;
        assert!(bad.check().is_err());
    }

    #[test]
    fn blocking_keeps_comparisons_to_shared_keys() {
        let record = |id: &str, last: &str, zip: &str| Record {
            id: id.to_owned(),
            fields: [
                ("last".to_owned(), last.to_owned()),
                ("zip".to_owned(), zip.to_owned()),
            ]
            .into(),
        };
        let records = [
            record("a", "Smith", "1"),
            record("b", "Smyth", "1"),
            record("c", "Smith", "2"),
            record("d", "Jones", "3"),
        ];
        let blocking = vec![
            vec![KeyPart {
                field: "zip".to_owned(),
                prefix: None,
            }],
            vec![KeyPart {
                field: "last".to_owned(),
                prefix: Some(3),
            }],
        ];
        assert_eq!(candidates(&records, &blocking), [(0, 1), (0, 2)]);
    }
}
