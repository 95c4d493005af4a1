//! Probabilistic matching evaluated on generated person records with typos, swapped
//! fields, missing values and duplicates, against the known truth: pairwise precision,
//! recall and F1 after clustering the matches.

use std::collections::HashMap;

use kith_identity::matching::{Record, run};
use kith_identity::synthetic::{person_config, population};

/// Union-find clusters of the matched pairs; answers each record's cluster.
fn clusters(records: &[Record], pairs: &[(String, String)]) -> Vec<usize> {
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
    for (a, b) in pairs {
        let (ra, rb) = (
            root(&mut parent, index[a.as_str()]),
            root(&mut parent, index[b.as_str()]),
        );
        parent[ra.max(rb)] = ra.min(rb);
    }
    (0..records.len()).map(|i| root(&mut parent, i)).collect()
}

/// Pairwise precision and recall of `predicted` clusters against `truth`.
fn pairwise(predicted: &[usize], truth: &[usize]) -> (f64, f64) {
    let count_pairs = |labels: &[usize]| -> HashMap<usize, u64> {
        let mut sizes = HashMap::new();
        for l in labels {
            *sizes.entry(*l).or_insert(0u64) += 1;
        }
        sizes
    };
    let pairs = |sizes: HashMap<usize, u64>| sizes.values().map(|n| n * (n - 1) / 2).sum::<u64>();
    let both: Vec<usize> = predicted
        .iter()
        .zip(truth)
        .map(|(p, t)| p * 1_000_003 + t)
        .collect();
    let true_pos = pairs(count_pairs(&both)) as f64;
    let predicted_pairs = pairs(count_pairs(predicted)) as f64;
    let true_pairs = pairs(count_pairs(truth)) as f64;
    (true_pos / predicted_pairs, true_pos / true_pairs)
}

/// Matches a generated population; answers (precision, recall, F1).
fn evaluate(people: usize, seed: u64) -> (f64, f64, f64) {
    let (records, truth) = population(people, seed);
    let outcome = run(&person_config(), &records);
    let pairs: Vec<(String, String)> = outcome
        .matches
        .iter()
        .map(|m| (m.a.clone(), m.b.clone()))
        .collect();
    let predicted = clusters(&records, &pairs);
    let (precision, recall) = pairwise(&predicted, &truth);
    let f1 = 2.0 * precision * recall / (precision + recall);
    println!(
        "seed {seed}: {} records of {people} people: {} pairs compared, {} matched, {} suggested; precision {precision:.4}, recall {recall:.4}, F1 {f1:.4}",
        records.len(),
        outcome.compared,
        outcome.matches.len(),
        outcome.suggestions.len()
    );
    assert!(
        outcome.compared < records.len() * records.len() / 20,
        "blocking keeps comparisons down"
    );
    assert!(outcome.parameters.prior > 0.0 && outcome.parameters.prior < 1.0);
    (precision, recall, f1)
}

#[test]
fn matching_finds_the_same_people_with_f1_of_at_least_0_99() {
    for seed in [7, 42, 2026] {
        let (precision, recall, f1) = evaluate(2_000, seed);
        assert!(
            f1 >= 0.99,
            "seed {seed}: F1 {f1:.4} (precision {precision:.4}, recall {recall:.4})"
        );
    }
}
