//! Probabilistic matching evaluated on generated person records with typos, swapped
//! fields, missing values and duplicates, against the known truth: pairwise precision,
//! recall and F1 after clustering the matches.

use kith_identity::matching::run;
use kith_identity::synthetic::{person_config, population, score};

/// Matches a generated population; answers (precision, recall, F1).
fn evaluate(people: usize, seed: u64) -> (f64, f64, f64) {
    let (records, truth) = population(people, seed);
    let outcome = run(&person_config(), &records);
    let scores = score(&records, &truth, &outcome.matches);
    let (precision, recall, f1) = (scores.precision, scores.recall, scores.f1);
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
