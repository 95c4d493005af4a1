//! The stitching rules, one by one, on the in-memory store: merges with stable ids,
//! limit refusals, blocked values, split and delete with suppression; then a property
//! test (without refusals, the profiles do not depend on event order) and a generated
//! population whose profiles must equal the true people.

use std::collections::{BTreeMap, BTreeSet};

use kith_identity::graph::{Graph, Resolution};
use kith_identity::identifier::Identifier;
use kith_identity::profile::EventSummary;
use kith_identity::rules::{Config, Rules};
use kith_identity::store::{MemoryStore, Store};
use proptest::prelude::*;
use serde_json::{Value, json};

fn summary(graph: &Graph, seq: u64, message: Value) -> EventSummary {
    let mut message = message;
    message["messageId"] = json!(format!("m{seq}"));
    if message.get("timestamp").is_none() {
        message["timestamp"] = json!(format!("2024-01-01T00:00:{:02}Z", seq % 60));
    }
    EventSummary::of(seq, "src_web", &message, graph.rules())
}

struct World {
    graph: Graph,
    store: MemoryStore,
    seq: u64,
}

impl World {
    fn new() -> Self {
        Self::with(Rules::default())
    }

    fn with(rules: Rules) -> Self {
        World {
            graph: Graph::new(rules),
            store: MemoryStore::default(),
            seq: 0,
        }
    }

    fn send(&mut self, message: Value) -> Resolution {
        self.seq += 1;
        let event = summary(&self.graph, self.seq, message);
        self.graph
            .process(&mut self.store, &event)
            .expect("in memory")
    }

    fn profile_of(&self, id: &str) -> Option<String> {
        let id: Identifier = id.parse().expect("identifier");
        self.graph
            .find(&self.store, &id)
            .expect("in memory")
            .map(|p| p.id)
    }

    fn identifiers(&self, profile: &str) -> Vec<String> {
        let mut ids: Vec<String> = self
            .graph
            .live(&self.store, profile)
            .expect("in memory")
            .expect("profile")
            .identifiers
            .iter()
            .map(ToString::to_string)
            .collect();
        ids.sort();
        ids
    }
}

#[test]
fn identifiers_that_meet_merge_and_the_older_id_survives() {
    let mut w = World::new();
    let first = w
        .send(json!({"type": "page", "anonymousId": "a1"}))
        .profile
        .expect("profile");
    let second = w
        .send(json!({"type": "page", "anonymousId": "a2"}))
        .profile
        .expect("profile");
    assert_ne!(first, second);
    w.send(json!({"type": "identify", "userId": "u1", "anonymousId": "a2", "traits": {"email": "ann@example.com"}}));
    assert_eq!(
        w.profile_of("user_id:u1"),
        Some(second.clone()),
        "a new user id joins a2's profile"
    );
    let merge = w.send(json!({"type": "identify", "userId": "u1", "anonymousId": "a1"}));
    assert_eq!(merge.merges.len(), 1);
    assert_eq!(
        merge.profile,
        Some(first.clone()),
        "the older profile survives"
    );
    assert_eq!(merge.merges[0].merged, second);
    assert!(
        merge.merges[0].reason.contains("anonymous_id:a1"),
        "{:?}",
        merge.merges[0]
    );
    assert_eq!(merge.merges[0].merged_identifiers.len(), 3);
    for id in [
        "anonymous_id:a1",
        "anonymous_id:a2",
        "user_id:u1",
        "email:ann@example.com",
    ] {
        assert_eq!(w.profile_of(id), Some(first.clone()), "{id}");
    }
    // The merged id keeps resolving to the survivor.
    let merged = w
        .graph
        .live(&w.store, &second)
        .expect("store")
        .expect("resolves");
    assert_eq!(merged.id, first);
    assert_eq!(merged.events, 4);
    assert_eq!(w.store.events(&first).expect("store").len(), 4);
    assert_eq!(w.store.merges_of(&first).expect("store").len(), 1);
}

#[test]
fn a_limit_keeps_lower_priority_identifiers_out() {
    let mut w = World::new();
    let ann = w
        .send(json!({"type": "identify", "userId": "ann", "anonymousId": "shared-device"}))
        .profile;
    // Bo logs in on Ann's device: user_id (higher priority) wins, the anonymous id is
    // not merged, since one profile holds at most one user id.
    let bo = w.send(json!({"type": "identify", "userId": "bo", "anonymousId": "shared-device"}));
    assert_ne!(bo.profile, ann);
    assert!(bo.merges.is_empty());
    assert_eq!(bo.refusals.len(), 1);
    assert_eq!(
        bo.refusals[0].identifier.to_string(),
        "anonymous_id:shared-device"
    );
    assert!(
        bo.refusals[0].reason.contains("limit 1"),
        "{:?}",
        bo.refusals
    );
    assert_eq!(w.profile_of("anonymous_id:shared-device"), ann);
    assert_eq!(
        w.identifiers(bo.profile.as_deref().expect("bo")),
        ["user_id:bo"]
    );

    // Two existing profiles that would hold two user ids stay apart too.
    let cy = w
        .send(json!({"type": "identify", "userId": "cy", "traits": {"email": "cy@example.com"}}))
        .profile;
    let clash =
        w.send(json!({"type": "identify", "userId": "ann", "traits": {"email": "cy@example.com"}}));
    assert_eq!(clash.profile, ann);
    assert!(clash.merges.is_empty());
    assert!(
        clash.refusals[0]
            .reason
            .contains(cy.as_deref().expect("cy")),
        "{:?}",
        clash.refusals
    );

    // A per-type limit on a new identifier.
    let rules = Config {
        limits: BTreeMap::from([("email".to_owned(), 1)]),
        ..Config::default()
    }
    .compile()
    .expect("valid");
    let mut w = World::with(rules);
    let p = w
        .send(json!({"type": "identify", "userId": "u", "traits": {"email": "one@example.com"}}))
        .profile;
    let second =
        w.send(json!({"type": "identify", "userId": "u", "traits": {"email": "two@example.com"}}));
    assert_eq!(second.profile, p);
    assert_eq!(
        second.refusals[0].identifier.to_string(),
        "email:two@example.com"
    );
    assert_eq!(w.profile_of("email:two@example.com"), None);
}

#[test]
fn blocked_values_never_link_anything() {
    let rules = Config {
        blocked_patterns: vec!["@mailinator\\.com$".to_owned()],
        ..Config::default()
    }
    .compile()
    .expect("valid");
    let mut w = World::with(rules);
    let ann =
        w.send(json!({"type": "identify", "userId": "ann", "traits": {"email": "test@test.com"}}));
    let bo =
        w.send(json!({"type": "identify", "userId": "bo", "traits": {"email": "test@test.com"}}));
    assert_ne!(
        ann.profile, bo.profile,
        "a junk email does not merge two people"
    );
    assert!(
        bo.refusals[0].reason.contains("blocked"),
        "{:?}",
        bo.refusals
    );
    let cy = w.send(
        json!({"type": "identify", "userId": "cy", "anonymousId": "undefined",
                            "traits": {"email": "x@mailinator.com"}}),
    );
    assert_eq!(cy.refusals.len(), 2);
    assert_eq!(
        w.identifiers(cy.profile.as_deref().expect("cy")),
        ["user_id:cy"]
    );
    let nothing = w.send(json!({"type": "track", "event": "E", "anonymousId": "null"}));
    assert_eq!(nothing.profile, None, "no usable identifier, no profile");
}

#[test]
fn a_split_restores_both_profiles_and_their_events() {
    let mut w = World::new();
    let ann = w
        .send(json!({"type": "identify", "anonymousId": "a1", "traits": {"plan": "pro"}}))
        .profile
        .expect("ann");
    w.send(json!({"type": "track", "event": "Viewed", "anonymousId": "a1"}));
    let bo = w
        .send(json!({"type": "identify", "anonymousId": "b1", "traits": {"plan": "free", "email": "bo@example.com"}}))
        .profile
        .expect("bo");
    w.send(json!({"type": "track", "event": "Bought", "anonymousId": "b1"}));
    // A wrong link: an event carrying both anonymous ids.
    let wrong = w.send(json!({"type": "alias", "anonymousId": "a1", "previousId": "b1"}));
    let merge = wrong.merges.first().expect("merged").clone();
    assert_eq!(w.profile_of("email:bo@example.com"), Some(ann.clone()));

    let split = w.graph.split(&mut w.store, merge.id).expect("split");
    assert_eq!(
        (split.survivor.as_str(), split.restored.as_str()),
        (ann.as_str(), bo.as_str())
    );
    assert_eq!(w.profile_of("anonymous_id:b1"), Some(bo.clone()));
    assert_eq!(w.profile_of("email:bo@example.com"), Some(bo.clone()));
    assert_eq!(w.profile_of("anonymous_id:a1"), Some(ann.clone()));
    let ann_p = w.graph.live(&w.store, &ann).expect("store").expect("ann");
    let bo_p = w.graph.live(&w.store, &bo).expect("store").expect("bo");
    assert_eq!(ann_p.traits["plan"].value, "pro");
    assert_eq!(bo_p.traits["plan"].value, "free");
    assert_eq!(bo_p.event_counts.get("Bought"), Some(&1));
    assert_eq!(ann_p.event_counts.get("Viewed"), Some(&1));
    assert_eq!(ann_p.events + bo_p.events, 5);
    assert_eq!(bo_p.merged_into, None);

    // Not merged again automatically; the split cannot be repeated.
    let again = w.send(json!({"type": "alias", "anonymousId": "a1", "previousId": "b1"}));
    assert!(again.merges.is_empty());
    assert!(
        again.refusals[0].reason.contains("split"),
        "{:?}",
        again.refusals
    );
    assert!(w.graph.split(&mut w.store, merge.id).is_err());
    assert!(w.graph.split(&mut w.store, 9_999).is_err());
}

#[test]
fn delete_erases_and_suppresses() {
    let mut w = World::new();
    let ann = w
        .send(json!({"type": "identify", "userId": "ann", "anonymousId": "a1", "traits": {"email": "ann@example.com"}}))
        .profile
        .expect("ann");
    w.send(
        json!({"type": "identify", "anonymousId": "a2", "traits": {"email": "ann@example.com"}}),
    );
    w.send(json!({"type": "track", "event": "E", "userId": "ann"}));
    let deleted = w
        .graph
        .delete(&mut w.store, &ann)
        .expect("store")
        .expect("deleted");
    assert_eq!(deleted.event_seqs, [1, 2, 3]);
    assert_eq!(deleted.identifiers.len(), 4);
    assert_eq!(w.profile_of("user_id:ann"), None);
    assert!(w.store.events(&ann).expect("store").is_empty());
    assert!(w.store.live_profiles().is_empty());
    for suppressed in [
        json!({"type": "track", "event": "E", "userId": "ann"}),
        json!({"type": "page", "anonymousId": "a2"}),
        json!({"type": "identify", "userId": "new-id", "traits": {"email": "ann@example.com"}}),
    ] {
        let resolution = w.send(suppressed.clone());
        assert!(resolution.suppressed.is_some(), "{suppressed}");
        assert_eq!(resolution.profile, None);
    }
    assert!(
        w.store.live_profiles().is_empty(),
        "suppressed events make no profile"
    );
    assert_eq!(w.graph.delete(&mut w.store, &ann).expect("store"), None);
}

#[test]
fn a_replayed_event_is_not_counted_twice() {
    let mut w = World::new();
    let event = summary(
        &w.graph,
        7,
        json!({"type": "track", "event": "E", "userId": "u"}),
    );
    let first = w.graph.process(&mut w.store, &event).expect("store");
    let again = w.graph.process(&mut w.store, &event).expect("store");
    assert_eq!(first.profile, again.profile);
    let profile = w
        .graph
        .live(&w.store, first.profile.as_deref().expect("p"))
        .expect("store")
        .expect("p");
    assert_eq!(profile.events, 1);
    assert_eq!(profile.event_counts["E"], 1);
}

/// The partition of identifiers into profiles, independent of ids.
fn partition(store: &MemoryStore) -> BTreeSet<BTreeSet<String>> {
    store
        .live_profiles()
        .iter()
        .map(|p| p.identifiers.iter().map(ToString::to_string).collect())
        .collect()
}

fn event_strategy() -> impl Strategy<Value = Value> {
    // Few values, so identifiers meet often.
    let anon = prop::option::of(0..6u8).prop_map(|o| o.map(|n| format!("a{n}")));
    let user = prop::option::of(0..3u8).prop_map(|o| o.map(|n| format!("u{n}")));
    let email = prop::option::of(0..4u8).prop_map(|o| o.map(|n| format!("e{n}@example.com")));
    (anon, user, email).prop_map(|(anon, user, email)| {
        let mut message = json!({"type": "identify", "traits": {}});
        if anon.is_none() && user.is_none() {
            message["anonymousId"] = json!("fallback");
        }
        if let Some(a) = anon {
            message["anonymousId"] = json!(a);
        }
        if let Some(u) = user {
            message["userId"] = json!(u);
        }
        if let Some(e) = email {
            message["traits"]["email"] = json!(e);
        }
        message
    })
}

/// Limits high enough that these events are never refused.
fn lenient() -> Rules {
    Config {
        limits: ["user_id", "email", "anonymous_id"]
            .iter()
            .map(|k| ((*k).to_owned(), 100))
            .collect(),
        ..Config::default()
    }
    .compile()
    .expect("valid")
}

proptest! {
    #[test]
    fn without_refusals_profiles_do_not_depend_on_event_order(
        events in prop::collection::vec(event_strategy(), 1..40),
        seed in any::<u64>(),
    ) {
        let mut shuffled = events.clone();
        let mut state = seed | 1;
        for i in (1..shuffled.len()).rev() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            shuffled.swap(i, (state % (i as u64 + 1)) as usize);
        }
        let mut a = World::with(lenient());
        let mut b = World::with(lenient());
        let mut refused = false;
        for e in &events {
            refused |= !a.send(e.clone()).refusals.is_empty();
        }
        for e in &shuffled {
            refused |= !b.send(e.clone()).refusals.is_empty();
        }
        prop_assert!(!refused, "lenient limits never refuse");
        prop_assert_eq!(partition(&a.store), partition(&b.store));
        let total = |w: &World| w.store.live_profiles().iter().map(|p| p.events).sum::<u64>();
        prop_assert_eq!(total(&a), events.len() as u64);
        prop_assert_eq!(total(&b), events.len() as u64);
    }
}

/// A generated population: each person has a user id, one to three emails, a phone and
/// several devices (anonymous ids); events carry subsets of these, shuffled, with noise:
/// junk values shared by many people ("undefined", "test@test.com", "guest").
#[test]
fn a_generated_population_is_stitched_into_exactly_its_people() {
    const PEOPLE: usize = 300;
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move |n: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % n
    };
    let mut truth: BTreeMap<String, usize> = BTreeMap::new();
    let mut events: Vec<Value> = Vec::new();
    for person in 0..PEOPLE {
        let user = format!("user-{person}");
        let emails: Vec<String> = (0..=next(2))
            .map(|i| format!("p{person}.{i}@example.com"))
            .collect();
        let phone = format!("+1415555{person:04}");
        let devices: Vec<String> = (0..2 + next(3))
            .map(|d| format!("anon-{person}-{d}"))
            .collect();
        truth.insert(format!("user_id:{user}"), person);
        for e in &emails {
            truth.insert(format!("email:{e}"), person);
        }
        truth.insert(format!("phone:{phone}"), person);
        for d in &devices {
            truth.insert(format!("anonymous_id:{d}"), person);
        }
        // Browsing on each device, then logging in on each (which links it).
        for d in &devices {
            events.push(json!({"type": "page", "anonymousId": d}));
            let email = &emails[next(emails.len() as u64) as usize];
            events.push(json!({"type": "identify", "anonymousId": d, "userId": user, "traits": {"email": email}}));
        }
        events.push(json!({"type": "identify", "userId": user, "traits": {"email": emails[0], "phone": phone}}));
        for e in &emails {
            events.push(json!({"type": "identify", "userId": user, "traits": {"email": e}}));
        }
        // Noise: junk identifiers many people share.
        events.push(
            json!({"type": "track", "event": "E", "userId": user, "anonymousId": "undefined",
                           "context": {"traits": {"email": "test@test.com"}}}),
        );
        events.push(
            json!({"type": "identify", "anonymousId": devices[0], "traits": {"phone": "guest"}}),
        );
    }
    for i in (1..events.len()).rev() {
        events.swap(i, next(i as u64 + 1) as usize);
    }
    let mut w = World::new();
    for event in &events {
        let resolution = w.send(event.clone());
        assert!(
            resolution
                .refusals
                .iter()
                .all(|r| r.reason.contains("blocked")),
            "{:?}",
            resolution.refusals
        );
    }
    // Pairwise precision and recall over identifiers: two identifiers share a profile
    // exactly when they belong to one person.
    let profile_of: BTreeMap<&String, String> = truth
        .keys()
        .map(|id| {
            (
                id,
                w.profile_of(id)
                    .unwrap_or_else(|| panic!("{id} has no profile")),
            )
        })
        .collect();
    let ids: Vec<&String> = truth.keys().collect();
    let (mut true_pos, mut false_pos, mut false_neg) = (0u64, 0u64, 0u64);
    for (i, a) in ids.iter().enumerate() {
        for b in &ids[i + 1..] {
            match (truth[*a] == truth[*b], profile_of[a] == profile_of[b]) {
                (true, true) => true_pos += 1,
                (false, true) => false_pos += 1,
                (true, false) => false_neg += 1,
                (false, false) => {}
            }
        }
    }
    let precision = true_pos as f64 / (true_pos + false_pos) as f64;
    let recall = true_pos as f64 / (true_pos + false_neg) as f64;
    println!(
        "population of {PEOPLE}: {} events, pairwise precision {precision}, recall {recall}",
        events.len()
    );
    assert_eq!((false_pos, false_neg), (0, 0));
    assert_eq!(w.store.live_profiles().len(), PEOPLE);
}
