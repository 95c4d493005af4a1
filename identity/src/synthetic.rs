//! Generated person records with known truth, for evaluating probabilistic matching:
//! several records per person with realistic noise (typos, swapped first and last
//! names, day and month swapped, missing values), and people who share common names.
//! Deterministic for a seed.

use std::collections::{BTreeMap, HashMap};

use crate::matching::{Comparator, Field, KeyPart, MatchConfig, Record, Scored};

const FIRST: [&str; 40] = [
    "James",
    "Mary",
    "John",
    "Patricia",
    "Robert",
    "Jennifer",
    "Michael",
    "Linda",
    "William",
    "Elizabeth",
    "David",
    "Barbara",
    "Richard",
    "Susan",
    "Joseph",
    "Jessica",
    "Thomas",
    "Sarah",
    "Charles",
    "Karen",
    "Christopher",
    "Nancy",
    "Daniel",
    "Lisa",
    "Matthew",
    "Margaret",
    "Anthony",
    "Betty",
    "Mark",
    "Sandra",
    "Donald",
    "Ashley",
    "Steven",
    "Kimberly",
    "Paul",
    "Emily",
    "Andrew",
    "Donna",
    "Joshua",
    "Michelle",
];
const LAST: [&str; 40] = [
    "Smith",
    "Johnson",
    "Williams",
    "Brown",
    "Jones",
    "Garcia",
    "Miller",
    "Davis",
    "Rodriguez",
    "Martinez",
    "Hernandez",
    "Lopez",
    "Gonzalez",
    "Wilson",
    "Anderson",
    "Thomas",
    "Taylor",
    "Moore",
    "Jackson",
    "Martin",
    "Lee",
    "Perez",
    "Thompson",
    "White",
    "Harris",
    "Sanchez",
    "Clark",
    "Ramirez",
    "Lewis",
    "Robinson",
    "Walker",
    "Young",
    "Allen",
    "King",
    "Wright",
    "Scott",
    "Torres",
    "Nguyen",
    "Hill",
    "Flores",
];
const STREETS: [&str; 12] = [
    "High Street",
    "Station Road",
    "Main Street",
    "Park Road",
    "Church Lane",
    "Victoria Road",
    "Green Lane",
    "Manor Road",
    "Church Street",
    "Park Avenue",
    "Queens Road",
    "New Road",
];

/// A deterministic xorshift generator.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed | 1)
    }

    /// A number below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        (self.below(1_000_000) as f64) < p * 1_000_000.0
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len() as u64) as usize]
    }
}

/// One typo: a substituted, deleted, inserted or transposed letter.
fn typo(rng: &mut Rng, word: &str) -> String {
    let mut chars: Vec<char> = word.chars().collect();
    if chars.len() < 3 {
        return word.to_owned();
    }
    let i = 1 + rng.below(chars.len() as u64 - 2) as usize;
    let letter = (b'a' + rng.below(26) as u8) as char;
    match rng.below(4) {
        0 => chars[i] = letter,
        1 => {
            chars.remove(i);
        }
        2 => chars.insert(i, letter),
        _ => chars.swap(i, i + 1),
    }
    chars.into_iter().collect()
}

/// `people` people, each with one to four records; answers the records and each
/// record's person.
pub fn population(people: usize, seed: u64) -> (Vec<Record>, Vec<usize>) {
    let mut rng = Rng::new(seed);
    let mut records = Vec::new();
    let mut truth = Vec::new();
    for person in 0..people {
        let first = rng.pick(&FIRST).to_owned();
        let last = rng.pick(&LAST).to_owned();
        let dob = format!(
            "{}-{:02}-{:02}",
            1940 + rng.below(66),
            1 + rng.below(12),
            1 + rng.below(28)
        );
        let postcode = format!(
            "{}{} {}{}",
            ["N", "E", "SW", "W", "SE", "NW"][rng.below(6) as usize],
            1 + rng.below(20),
            1 + rng.below(9),
            ["AA", "AB", "BD", "HX", "QT"][rng.below(5) as usize]
        );
        let address = format!("{} {}", 1 + rng.below(200), rng.pick(&STREETS));
        let copies = 1 + [0, 0, 1, 1, 1, 2, 3][rng.below(7) as usize];
        for copy in 0..copies {
            let (mut f, mut l, mut d, mut p, mut a) = (
                first.clone(),
                last.clone(),
                Some(dob.clone()),
                Some(postcode.clone()),
                Some(address.clone()),
            );
            if copy > 0 {
                if rng.chance(0.3) {
                    f = typo(&mut rng, &f);
                }
                if rng.chance(0.3) {
                    l = typo(&mut rng, &l);
                }
                if rng.chance(0.08) {
                    std::mem::swap(&mut f, &mut l);
                }
                if rng.chance(0.1) {
                    let parts: Vec<&str> = dob.split('-').collect();
                    d = Some(format!("{}-{}-{}", parts[0], parts[2], parts[1]));
                }
                if rng.chance(0.1) {
                    d = None;
                }
                if rng.chance(0.15) {
                    p = None;
                }
                if rng.chance(0.2) {
                    a = a.map(|a| typo(&mut rng, &a));
                }
                if rng.chance(0.15) {
                    a = None;
                }
            }
            let mut fields =
                BTreeMap::from([("first_name".to_owned(), f), ("last_name".to_owned(), l)]);
            for (name, value) in [("dob", d), ("postcode", p), ("address", a)] {
                if let Some(value) = value {
                    fields.insert(name.to_owned(), value);
                }
            }
            records.push(Record {
                id: format!("r{}", records.len()),
                fields,
            });
            truth.push(person);
        }
    }
    // Shuffle, so duplicates are not neighbours.
    for i in (1..records.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        records.swap(i, j);
        truth.swap(i, j);
    }
    (records, truth)
}

/// The matching settings used on these records: names by Jaro-Winkler, date of birth,
/// postcode and address; blocked on date of birth, on postcode, and on name prefixes.
pub fn person_config() -> MatchConfig {
    let jw = || Comparator::JaroWinkler {
        low: 0.80,
        high: 0.92,
    };
    let field = |name: &str, comparator: Comparator, also: Option<&str>| Field {
        name: name.to_owned(),
        comparator,
        also: also.map(str::to_owned),
        m: None,
        u: None,
    };
    let part = |field: &str, prefix: Option<usize>| KeyPart {
        field: field.to_owned(),
        prefix,
    };
    MatchConfig {
        fields: vec![
            field("first_name", jw(), Some("last_name")),
            field("last_name", jw(), Some("first_name")),
            field("dob", Comparator::Date, None),
            field("postcode", Comparator::Exact, None),
            field("address", jw(), None),
        ],
        blocking: vec![
            vec![part("dob", None)],
            vec![part("postcode", None)],
            vec![part("last_name", Some(3)), part("dob", Some(4))],
            vec![part("first_name", Some(3)), part("address", Some(3))],
        ],
        match_probability: 0.5,
        review_probability: 0.1,
    }
}

/// Pairwise scores of a matching against the truth.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scores {
    /// Share of the pairs put together that are one person.
    pub precision: f64,
    /// Share of the pairs that are one person that were put together.
    pub recall: f64,
    /// Their harmonic mean.
    pub f1: f64,
}

/// Clusters the matched pairs (transitively) and scores the clusters pairwise against
/// `truth` (each record's person).
pub fn score(records: &[Record], truth: &[usize], matches: &[Scored]) -> Scores {
    let index: HashMap<&str, usize> = records
        .iter()
        .enumerate()
        .map(|(i, r)| (r.id.as_str(), i))
        .collect();
    let mut parent: Vec<usize> = (0..records.len()).collect();
    fn root(parent: &mut [usize], mut i: usize) -> usize {
        while parent[i] != i {
            parent[i] = parent[parent[i]];
            i = parent[i];
        }
        i
    }
    for pair in matches {
        let (a, b) = (
            root(&mut parent, index[pair.a.as_str()]),
            root(&mut parent, index[pair.b.as_str()]),
        );
        parent[a.max(b)] = a.min(b);
    }
    let predicted: Vec<usize> = (0..records.len()).map(|i| root(&mut parent, i)).collect();
    let pairs = |labels: &mut dyn Iterator<Item = (usize, usize)>| -> u64 {
        let mut sizes: HashMap<(usize, usize), u64> = HashMap::new();
        for label in labels {
            *sizes.entry(label).or_default() += 1;
        }
        sizes.values().map(|n| n * (n - 1) / 2).sum()
    };
    let together = pairs(&mut predicted.iter().zip(truth).map(|(p, t)| (*p, *t))) as f64;
    let predicted_pairs = pairs(&mut predicted.iter().map(|p| (*p, 0))) as f64;
    let true_pairs = pairs(&mut truth.iter().map(|t| (*t, 0))) as f64;
    let precision = together / predicted_pairs;
    let recall = together / true_pairs;
    Scores {
        precision,
        recall,
        f1: 2.0 * precision * recall / (precision + recall),
    }
}
