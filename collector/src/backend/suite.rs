//! The shared backend suite: every backend runs it ([`crate::backend_suite!`] with an
//! expression that makes a fresh [`Fixture`]), so they keep one contract: rows and
//! ranges, the transaction's view of its own writes, atomic commits, idempotent replay
//! of a chunk, the log, deduplication windows, erase, and the ordering each table's
//! readers rely on.

use super::Backend;

/// A fresh backend, and what must live as long as it (a temporary directory).
pub struct Fixture {
    /// The backend.
    pub backend: Box<dyn Backend>,
    /// Kept alive with it.
    pub _keep: Option<tempfile::TempDir>,
}

/// Instantiates the suite for a backend: `backend_suite!(expression making a Fixture)`.
#[macro_export]
macro_rules! backend_suite {
    ($make:expr) => {
        mod suite {
            #[allow(unused_imports)]
            use super::*;
            use $crate::backend::suite::Fixture;

            fn fixture() -> Fixture {
                $make
            }

            #[test]
            fn rows_read_back_by_key_and_in_key_order() {
                $crate::backend::suite::rows_read_back_by_key_and_in_key_order(fixture());
            }

            #[test]
            fn a_transaction_reads_its_own_writes_over_committed_rows() {
                $crate::backend::suite::a_transaction_reads_its_own_writes_over_committed_rows(
                    fixture(),
                );
            }

            #[test]
            fn an_uncommitted_transaction_leaves_nothing_and_a_commit_lands_whole() {
                $crate::backend::suite::an_uncommitted_transaction_leaves_nothing_and_a_commit_lands_whole(fixture());
            }

            #[test]
            fn the_log_gives_consecutive_positions_and_trims_what_was_processed() {
                $crate::backend::suite::the_log_gives_consecutive_positions_and_trims_what_was_processed(fixture());
            }

            #[test]
            fn events_are_found_by_their_indexes_newest_first() {
                $crate::backend::suite::events_are_found_by_their_indexes_newest_first(fixture());
            }

            #[test]
            fn claims_deduplicate_within_the_window_and_a_replayed_chunk_is_no_duplicate() {
                $crate::backend::suite::claims_deduplicate_within_the_window_and_a_replayed_chunk_is_no_duplicate(fixture());
            }

            #[test]
            fn erased_events_leave_no_index_or_claim() {
                $crate::backend::suite::erased_events_leave_no_index_or_claim(fixture());
            }

            #[test]
            fn failed_events_are_listed_found_and_removed() {
                $crate::backend::suite::failed_events_are_listed_found_and_removed(fixture());
            }

            #[test]
            fn the_identity_graph_runs_on_a_transaction() {
                $crate::backend::suite::the_identity_graph_runs_on_a_transaction(fixture());
            }

            #[test]
            fn memberships_timers_and_the_feed_keep_their_order() {
                $crate::backend::suite::memberships_timers_and_the_feed_keep_their_order(fixture());
            }

            #[test]
            fn the_outbox_queue_caps_tokens_and_marks_keep_their_order() {
                $crate::backend::suite::the_outbox_queue_caps_tokens_and_marks_keep_their_order(fixture());
            }

            #[test]
            fn metadata_reads_back() {
                $crate::backend::suite::metadata_reads_back(fixture());
            }

            #[test]
            fn a_transaction_and_the_committed_state_agree_on_any_writes() {
                $crate::backend::suite::a_transaction_and_the_committed_state_agree_on_any_writes(fixture());
            }
        }
    };
}

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::Arc;

use jiff::Timestamp;
use kith_identity::graph::Graph;
use kith_identity::identifier::Identifier;
use kith_identity::profile::EventSummary;
use kith_segments::membership::State;
use proptest::prelude::*;
use serde_json::json;

use super::activation::ActivationState as _;
use super::events::{EventFilter, EventStore as _, FailedEvent, StoredEvent};
use super::identity::{GraphView, IdentityState as _};
use super::membership::{CHANGE_NUMBER, MembershipState as _};
use super::meta::Metadata as _;
use super::{Durability, LogRecord, Rows as _, TableId, Tables as _, Txn, keys};
use crate::stats::{IngestCounters, PipelineCounters};

fn commit(backend: &dyn Backend, work: impl FnOnce(&mut Txn<'_>)) {
    backend
        .write(Durability::Now, |txn| {
            work(txn);
            Ok(())
        })
        .expect("commit");
}

fn keys_of(rows: Vec<(Vec<u8>, Vec<u8>)>) -> Vec<Vec<u8>> {
    rows.into_iter().map(|(k, _)| k).collect()
}

fn event(seq: u64, user: &str, message_id: &str) -> StoredEvent {
    StoredEvent {
        seq,
        source: "src".to_owned(),
        profile_id: Some(format!("prf_{user}")),
        message: serde_json::from_value(json!({
            "type": "track", "event": "E", "userId": user, "messageId": message_id,
            "anonymousId": format!("anon-{user}")
        }))
        .expect("message"),
    }
}

/// Rows by key and by range, forward and back, with limits and empty ranges.
pub fn rows_read_back_by_key_and_in_key_order(f: Fixture) {
    let backend = f.backend.as_ref();
    commit(backend, |txn| {
        for key in [b"b".as_slice(), b"a", b"c", b"ab"] {
            txn.put(TableId::Profiles, key.to_vec(), key.to_vec());
        }
        txn.put(TableId::Owners, b"a".to_vec(), b"other table".to_vec());
    });
    assert_eq!(
        backend.get(TableId::Profiles, b"ab").expect("get"),
        Some(b"ab".to_vec())
    );
    assert_eq!(backend.get(TableId::Profiles, b"zz").expect("get"), None);
    let all = |reverse| {
        keys_of(
            backend
                .scan(
                    TableId::Profiles,
                    Bound::Unbounded,
                    Bound::Unbounded,
                    10,
                    reverse,
                )
                .expect("scan"),
        )
    };
    assert_eq!(
        all(false),
        [b"a".to_vec(), b"ab".to_vec(), b"b".to_vec(), b"c".to_vec()]
    );
    assert_eq!(
        all(true),
        [b"c".to_vec(), b"b".to_vec(), b"ab".to_vec(), b"a".to_vec()]
    );
    let page = backend
        .scan(
            TableId::Profiles,
            Bound::Excluded(b"a"),
            Bound::Included(b"b"),
            10,
            false,
        )
        .expect("scan");
    assert_eq!(keys_of(page), [b"ab".to_vec(), b"b".to_vec()]);
    assert_eq!(
        keys_of(
            backend
                .scan_prefix(TableId::Profiles, b"a", None, 10)
                .expect("prefix")
        ),
        [b"a".to_vec(), b"ab".to_vec()]
    );
    assert_eq!(
        keys_of(
            backend
                .scan_prefix_rev(TableId::Profiles, b"", Some(b"b"), 1)
                .expect("rev")
        ),
        [b"ab".to_vec()]
    );
    let inverted = backend
        .scan(
            TableId::Profiles,
            Bound::Included(b"c"),
            Bound::Excluded(b"a"),
            10,
            false,
        )
        .expect("an inverted range is empty, not a panic");
    assert!(inverted.is_empty());
    assert_eq!(backend.count(TableId::Profiles, b"").expect("count"), 4);
    commit(backend, |txn| txn.delete(TableId::Profiles, b"ab".to_vec()));
    assert_eq!(backend.count(TableId::Profiles, b"").expect("count"), 3);
}

/// Pending puts and deletes are seen by get and by scans in both directions, limits
/// included.
pub fn a_transaction_reads_its_own_writes_over_committed_rows(f: Fixture) {
    let backend = f.backend.as_ref();
    commit(backend, |txn| {
        for i in [1u64, 3, 5, 7] {
            txn.put(TableId::Merges, keys::u64(i), vec![1]);
        }
    });
    let mut txn = backend.begin();
    txn.put(TableId::Merges, keys::u64(4), vec![2]);
    txn.delete(TableId::Merges, keys::u64(3));
    txn.put(TableId::Merges, keys::u64(9), vec![2]);
    let seen = |txn: &Txn<'_>, limit, reverse| -> Vec<u64> {
        txn.scan(
            TableId::Merges,
            Bound::Unbounded,
            Bound::Unbounded,
            limit,
            reverse,
        )
        .expect("scan")
        .into_iter()
        .map(|(k, _)| keys::read_u64(&k).expect("u64"))
        .collect()
    };
    assert_eq!(seen(&txn, 10, false), [1, 4, 5, 7, 9]);
    assert_eq!(seen(&txn, 2, false), [1, 4]);
    assert_eq!(seen(&txn, 3, true), [9, 7, 5]);
    assert_eq!(txn.get(TableId::Merges, &keys::u64(3)).expect("get"), None);
    assert_eq!(
        txn.get(TableId::Merges, &keys::u64(4)).expect("get"),
        Some(vec![2])
    );
    assert_eq!(
        backend.get(TableId::Merges, &keys::u64(3)).expect("get"),
        Some(vec![1]),
        "the committed state is untouched until the commit"
    );
    backend.commit(txn, Durability::Now).expect("commit");
    let all: Vec<u64> = backend
        .all(TableId::Merges, &[])
        .expect("all")
        .into_iter()
        .map(|(k, _)| keys::read_u64(&k).expect("u64"))
        .collect();
    assert_eq!(all, [1, 4, 5, 7, 9]);
}

/// A dropped transaction writes nothing; a committed one writes every table it touched.
pub fn an_uncommitted_transaction_leaves_nothing_and_a_commit_lands_whole(f: Fixture) {
    let backend = f.backend.as_ref();
    {
        let mut txn = backend.begin();
        txn.set_checkpoint(9, &PipelineCounters::default())
            .expect("checkpoint");
        txn.store_event(&event(9, "u", "m9")).expect("store");
        // Dropped: a chunk that failed midway.
    }
    assert_eq!(backend.checkpoint().expect("checkpoint"), 0);
    assert_eq!(backend.event(9).expect("event"), None);
    let counters = PipelineCounters {
        processed: 1,
        ..PipelineCounters::default()
    };
    let mut txn = backend.begin();
    txn.store_event(&event(9, "u", "m9")).expect("store");
    txn.set_checkpoint(9, &counters).expect("checkpoint");
    txn.mark_changed("prf_u");
    backend.commit(txn, Durability::Now).expect("commit");
    assert_eq!(backend.checkpoint().expect("checkpoint"), 9);
    assert_eq!(backend.counters().expect("counters").1.processed, 1);
    assert!(backend.event(9).expect("event").is_some());
    assert_eq!(backend.changed_profiles().expect("changed"), ["prf_u"]);
}

/// Appends get consecutive positions, are read after a position, wake readers, and are
/// forgotten up to a processed position.
pub fn the_log_gives_consecutive_positions_and_trims_what_was_processed(f: Fixture) {
    let backend = f.backend.as_ref();
    let record = |n: u8| LogRecord {
        source: Arc::from("src"),
        message: vec![b'0' + n],
    };
    assert_eq!(backend.last().expect("last"), 0);
    let counters = IngestCounters {
        accepted: 3,
        ..IngestCounters::default()
    };
    assert_eq!(
        backend
            .append(&[record(1), record(2), record(3)], &counters)
            .expect("append"),
        3
    );
    assert!(
        backend.wake().wait(Some(std::time::Duration::ZERO)),
        "woken"
    );
    assert_eq!(backend.append(&[record(4)], &counters).expect("append"), 4);
    assert_eq!(backend.counters().expect("counters").0.accepted, 3);
    let read = backend.read(1, 2).expect("read");
    assert_eq!(read.iter().map(|e| e.seq).collect::<Vec<_>>(), [2, 3]);
    assert_eq!(read[0].message, b"2");
    assert_eq!(read[0].source, "src");
    backend.trim(2).expect("trim");
    assert_eq!(
        backend
            .read(0, 10)
            .expect("read")
            .iter()
            .map(|e| e.seq)
            .collect::<Vec<_>>(),
        [3, 4]
    );
    assert_eq!(backend.last().expect("last"), 4, "positions survive a trim");
    assert_eq!(backend.append(&[record(5)], &counters).expect("append"), 5);
}

/// Queries by index, newest first, with paging.
pub fn events_are_found_by_their_indexes_newest_first(f: Fixture) {
    let backend = f.backend.as_ref();
    commit(backend, |txn| {
        for seq in 1..=6 {
            let user = if seq % 2 == 0 { "even" } else { "odd" };
            let stored = event(seq, user, &format!("m{seq}"));
            txn.store_event(&stored).expect("store");
            txn.claim_message_id("src", &format!("m{seq}"), seq, Timestamp::UNIX_EPOCH, 1)
                .expect("claim");
        }
    });
    let seqs = |filter: EventFilter, before, limit| -> Vec<u64> {
        backend
            .query(&filter, before, limit)
            .expect("query")
            .iter()
            .map(|e| e.seq)
            .collect()
    };
    assert_eq!(seqs(EventFilter::All, None, 10), [6, 5, 4, 3, 2, 1]);
    assert_eq!(seqs(EventFilter::All, Some(4), 2), [3, 2]);
    assert_eq!(seqs(EventFilter::UserId("odd".into()), None, 10), [5, 3, 1]);
    assert_eq!(seqs(EventFilter::UserId("odd".into()), Some(5), 1), [3]);
    assert!(seqs(EventFilter::UserId("od".into()), None, 10).is_empty());
    assert_eq!(
        seqs(EventFilter::AnonymousId("anon-even".into()), None, 10),
        [6, 4, 2]
    );
    assert_eq!(seqs(EventFilter::MessageId("m3".into()), None, 10), [3]);
    let found = backend.event(3).expect("event").expect("stored");
    assert_eq!(
        found,
        event(3, "odd", "m3"),
        "read back whole, profile id included"
    );
}

/// Deduplication claims hold within the window only, per source; claiming again for
/// the same `seq` (a replayed chunk) is no duplicate; an id taken over after the window
/// still finds its earlier events.
pub fn claims_deduplicate_within_the_window_and_a_replayed_chunk_is_no_duplicate(f: Fixture) {
    let backend = f.backend.as_ref();
    let later = Timestamp::from_second(1_000_000 + 3600).expect("ts");
    fn chunk(backend: &dyn Backend) -> (Vec<bool>, super::Batch, Txn<'_>) {
        let t0 = Timestamp::from_second(1_000_000).expect("ts");
        let later = Timestamp::from_second(1_000_000 + 3600).expect("ts");
        let mut txn = backend.begin();
        let mut answers = Vec::new();
        for (source, id, seq, at) in [
            ("s", "m", 1, t0),
            ("s", "m", 2, t0),
            ("other", "m", 3, t0),
            ("s", "m-", 4, t0),
            ("s", "m", 5, later),
            ("s", "m", 6, later),
        ] {
            answers.push(
                txn.claim_message_id(source, id, seq, at, 60_000)
                    .expect("claim"),
            );
        }
        (answers, txn.batch().clone(), txn)
    }
    let (answers, first_batch, txn) = chunk(backend);
    assert_eq!(answers, [false, true, false, false, false, true]);
    backend.commit(txn, Durability::Now).expect("commit");
    // The same chunk again, after a crash: the same answers for the events that claimed.
    let (again, second_batch, txn) = chunk(backend);
    assert_eq!(again, [false, true, false, false, false, true]);
    assert!(!first_batch.is_empty());
    assert!(
        second_batch.is_empty(),
        "a replay finds its claims and writes nothing"
    );
    drop(txn);
    let claim = backend.claim("s", "m").expect("claim").expect("held");
    assert_eq!(claim.holders, [5, 1], "the holder first, earlier ones kept");
    assert!(
        backend
            .is_claimed("s", "m", later, 60_000)
            .expect("claimed")
    );
    assert!(
        !backend
            .is_claimed("s", "nope", later, 60_000)
            .expect("claimed")
    );
}

/// Erasing events removes them with their lookup indexes and claims.
pub fn erased_events_leave_no_index_or_claim(f: Fixture) {
    let backend = f.backend.as_ref();
    commit(backend, |txn| {
        for seq in [1, 2] {
            txn.store_event(&event(seq, "u", &format!("m{seq}")))
                .expect("store");
            txn.claim_message_id("src", &format!("m{seq}"), seq, Timestamp::UNIX_EPOCH, 1)
                .expect("claim");
        }
    });
    commit(backend, |txn| txn.erase_events(&[1, 99]).expect("erase"));
    assert_eq!(backend.event(1).expect("event"), None);
    assert_eq!(
        backend
            .query(&EventFilter::UserId("u".into()), None, 10)
            .expect("query")
            .len(),
        1
    );
    assert!(backend.claim("src", "m1").expect("claim").is_none());
    assert!(backend.claim("src", "m2").expect("claim").is_some());
}

/// Failed events: newest first by source, by `seq`, oldest first, removed.
pub fn failed_events_are_listed_found_and_removed(f: Fixture) {
    let backend = f.backend.as_ref();
    commit(backend, |txn| {
        for seq in 1..=4 {
            let source = if seq == 2 { "b" } else { "a" };
            let failed = FailedEvent::new(
                seq,
                source,
                b"{\"type\":\"track\"}",
                "cleaning",
                "bad".to_owned(),
            )
            .expect("failed");
            txn.put_failed(&failed).expect("put");
        }
        txn.put(TableId::Failed, keys::u64(5), b"not json".to_vec());
    });
    let seqs = |events: Vec<FailedEvent>| events.iter().map(|e| e.seq).collect::<Vec<_>>();
    assert_eq!(
        seqs(backend.failed_events(Some("a"), None, 10).expect("list")),
        [4, 3, 1]
    );
    assert_eq!(
        seqs(backend.failed_events(None, Some(3), 1).expect("list")),
        [2]
    );
    assert_eq!(seqs(backend.failed_by_seq(&[3, 9]).expect("by seq")), [3]);
    let oldest = backend.failed_oldest(Some(3), 10).expect("oldest");
    assert_eq!(oldest.len(), 2);
    assert!(
        oldest[1].1.is_err(),
        "an unreadable one is reported with its seq"
    );
    commit(backend, |txn| txn.remove_failed(&[1, 5]));
    assert_eq!(
        seqs(backend.failed_events(None, None, 10).expect("list")),
        [4, 3, 2]
    );
}

/// kith-identity's graph stitches and merges on a transaction's view; the merge and
/// its marks land with the commit; the chunk's summaries stand in for unstored events.
pub fn the_identity_graph_runs_on_a_transaction(f: Fixture) {
    let backend = f.backend.as_ref();
    let graph = Graph::default();
    let summary = |seq: u64, message: serde_json::Value| {
        EventSummary::of(seq, "src", &message, graph.rules())
    };
    let events = [
        summary(
            1,
            json!({"type": "identify", "userId": "u1", "messageId": "a"}),
        ),
        summary(
            2,
            json!({"type": "page", "anonymousId": "x", "messageId": "b"}),
        ),
        summary(
            3,
            json!({"type": "identify", "userId": "u1", "anonymousId": "x", "messageId": "c"}),
        ),
    ];
    let chunk: HashMap<u64, EventSummary> = events.iter().map(|e| (e.seq, e.clone())).collect();
    let mut txn = backend.begin();
    let mut view = GraphView {
        txn: &mut txn,
        rules: graph.rules(),
        chunk: Some(&chunk),
    };
    let mut merges = Vec::new();
    for event in &events {
        merges.extend(graph.process(&mut view, event).expect("process").merges);
    }
    assert_eq!(merges.len(), 1);
    let survivor = merges[0].survivor.clone();
    txn.mark_changed(&survivor);
    backend.commit(txn, Durability::Now).expect("commit");
    let mut read = Txn::scratch(backend);
    let view = GraphView {
        txn: &mut read,
        rules: graph.rules(),
        chunk: None,
    };
    let found = graph
        .find(&view, &Identifier::new("anonymous_id", "x"))
        .expect("find")
        .expect("found");
    assert_eq!(found.id, survivor);
    assert_eq!(
        backend.profile_event_seqs(&survivor).expect("seqs"),
        [1, 2, 3]
    );
    assert_eq!(
        backend.profile_count().expect("count"),
        2,
        "the merged one stays"
    );
    let live: Vec<String> = backend
        .profile_records(None, 10)
        .expect("records")
        .into_iter()
        .filter(|p| p.merged_into.is_none())
        .map(|p| p.id)
        .collect();
    assert_eq!(live, std::slice::from_ref(&survivor));
    assert_eq!(backend.changed_profiles().expect("changed"), [survivor]);
}

/// States, the member index in profile order, the feed in number order, timers
/// earliest first.
pub fn memberships_timers_and_the_feed_keep_their_order(f: Fixture) {
    let backend = f.backend.as_ref();
    commit(backend, |txn| {
        let mut state = State::default();
        state.segments.insert("pro".to_owned());
        txn.put_member_state("p2", &state).expect("state");
        txn.put_member_state("p1", &state).expect("state");
        txn.put_member_state("p3", &State::default())
            .expect("empty");
        for profile in ["p2", "p10", "p1"] {
            txn.set_member("pro", profile, true);
        }
        txn.set_member("pr", "p9", true);
        for _ in 0..3 {
            let n = txn.next_number(CHANGE_NUMBER).expect("number");
            txn.put_change(n, &json!({"id": n})).expect("change");
        }
        txn.set_timer(500, "p2", true);
        txn.set_timer(20, "p1", true);
        txn.set_computed("pro", Some("v1"));
    });
    assert!(
        backend
            .member_state("p1")
            .expect("state")
            .segments
            .contains("pro")
    );
    assert_eq!(backend.member_state("p3").expect("state"), State::default());
    assert_eq!(
        backend
            .member_states(None, 10)
            .expect("states")
            .iter()
            .map(|(p, _)| p.as_str())
            .collect::<Vec<_>>(),
        ["p1", "p2"],
        "an empty state is not stored"
    );
    assert_eq!(
        backend.members("pro", None, 10).expect("members"),
        ["p1", "p10", "p2"]
    );
    assert_eq!(
        backend.members("pro", Some("p1"), 1).expect("page"),
        ["p10"]
    );
    assert_eq!(backend.member_count("pro").expect("count"), 3);
    let changes: Vec<serde_json::Value> = backend.changes(1, 10).expect("changes");
    assert_eq!(changes, [json!({"id": 2}), json!({"id": 3})]);
    assert_eq!(backend.last_change().expect("last"), 3);
    assert_eq!(
        backend.timers(10).expect("timers"),
        [(20, "p1".to_owned()), (500, "p2".to_owned())]
    );
    assert_eq!(
        backend.computed("pro").expect("computed").as_deref(),
        Some("v1")
    );
    commit(backend, |txn| {
        txn.set_member("pro", "p10", false);
        txn.set_timer(20, "p1", false);
        txn.remove_change(2);
    });
    assert_eq!(backend.member_count("pro").expect("count"), 2);
    assert_eq!(backend.timers(10).expect("timers").len(), 1);
    assert_eq!(
        backend
            .changes::<serde_json::Value>(0, 10)
            .expect("changes")
            .len(),
        2
    );
}

/// Deliveries by number, the due queue earliest first, caps, tokens per provider,
/// fired marks.
pub fn the_outbox_queue_caps_tokens_and_marks_keep_their_order(f: Fixture) {
    let backend = f.backend.as_ref();
    commit(backend, |txn| {
        for id in [3u64, 1, 2] {
            txn.put_delivery(id, &json!({"id": id})).expect("delivery");
        }
        txn.set_due(900, 1, true);
        txn.set_due(100, 3, true);
        txn.set_due(100, 2, true);
        txn.put_cap("c1", "p1", Some(&[5, 6])).expect("cap");
        txn.set_token("p1", "fcm", "t1", Some(7));
        txn.set_token("p1", "apns", "t2", Some(8));
        txn.set_token("p11", "fcm", "t3", Some(9));
        txn.set_fired("c1", 42, true);
        txn.put_destination_record("d1", Some(&json!({"id": "d1"})))
            .expect("destination");
        txn.put_campaign_record("c1", Some(&json!({"id": "c1"})))
            .expect("campaign");
    });
    let ids: Vec<serde_json::Value> = backend.deliveries(1, 10).expect("deliveries");
    assert_eq!(ids, [json!({"id": 2}), json!({"id": 3})]);
    assert_eq!(
        backend.due(10).expect("due"),
        [(100, 2), (100, 3), (900, 1)]
    );
    assert_eq!(backend.cap("c1", "p1").expect("cap"), [5, 6]);
    assert!(backend.cap("c1", "p2").expect("cap").is_empty());
    assert_eq!(
        backend.caps().expect("caps"),
        [("c1".to_owned(), "p1".to_owned())]
    );
    assert_eq!(
        backend.tokens_of("p1", None).expect("tokens"),
        [
            ("apns".to_owned(), "t2".to_owned(), 8),
            ("fcm".to_owned(), "t1".to_owned(), 7)
        ],
        "p1's own, not p11's"
    );
    assert_eq!(
        backend.tokens_of("p1", Some("fcm")).expect("tokens").len(),
        1
    );
    assert!(backend.fired("c1", 42).expect("fired"));
    assert!(!backend.fired("c1", 43).expect("fired"));
    assert_eq!(
        backend.fired_marks().expect("marks"),
        [("c1".to_owned(), 42)]
    );
    assert_eq!(
        backend.destination_records().expect("destinations").len(),
        1
    );
    let campaign: Option<serde_json::Value> = backend.campaign_record("c1").expect("campaign");
    assert!(campaign.is_some());
    commit(backend, |txn| {
        txn.set_due(100, 2, false);
        txn.remove_delivery(2);
        txn.set_token("p1", "fcm", "t1", None);
    });
    assert_eq!(backend.due(10).expect("due"), [(100, 3), (900, 1)]);
    assert!(
        backend
            .delivery::<serde_json::Value>(2)
            .expect("delivery")
            .is_none()
    );
    assert_eq!(backend.tokens_of("p1", None).expect("tokens").len(), 1);
}

/// Credentials, cursors, numbers, rules, segment definitions and imports.
pub fn metadata_reads_back(f: Fixture) {
    let backend = f.backend.as_ref();
    commit(backend, |txn| {
        txn.put_credential("admin_token", "sealed");
        txn.put_cursor("postgres:crm", "2024-01-01");
        txn.set_number("n", 41);
        txn.next_number("n").expect("number");
        txn.put_rules("src_a", Some(&json!({"cleaning": {}})))
            .expect("rules");
        txn.put_segment("pro", Some(&json!({"key": "pro"})))
            .expect("segment");
        for id in ["imp_1", "imp_3", "imp_2"] {
            txn.put_import(id, &json!({"id": id})).expect("import");
        }
    });
    assert_eq!(
        backend.credential("admin_token").expect("cred").as_deref(),
        Some("sealed")
    );
    assert_eq!(backend.credential("other").expect("cred"), None);
    assert_eq!(
        backend.cursor("postgres:crm").expect("cursor").as_deref(),
        Some("2024-01-01")
    );
    assert_eq!(backend.number("n").expect("number"), 42);
    assert_eq!(backend.number("unused").expect("number"), 0);
    assert_eq!(
        backend.rules().expect("rules"),
        [("src_a".to_owned(), json!({"cleaning": {}}))]
    );
    assert_eq!(backend.segment_definitions().expect("segments").len(), 1);
    let newest: Vec<serde_json::Value> = backend.imports(2).expect("imports");
    assert_eq!(newest, [json!({"id": "imp_3"}), json!({"id": "imp_2"})]);
    let one: Option<serde_json::Value> = backend.import("imp_1").expect("import");
    assert_eq!(one, Some(json!({"id": "imp_1"})));
    commit(backend, |txn| {
        txn.put_rules::<serde_json::Value>("src_a", None)
            .expect("rules");
        txn.put_segment::<serde_json::Value>("pro", None)
            .expect("segment");
    });
    assert!(backend.rules().expect("rules").is_empty());
    assert!(backend.segment_definitions().expect("segments").is_empty());
}

/// Any committed rows and any pending writes: what the transaction reads (by key and
/// every range, both ways, any limit) is what the state reads once it is committed.
pub fn a_transaction_and_the_committed_state_agree_on_any_writes(f: Fixture) {
    let backend = f.backend.as_ref();
    let writes = prop::collection::vec((0u8..24, prop::option::of(any::<u8>())), 0..40);
    let mut runner = proptest::test_runner::TestRunner::new(proptest::test_runner::Config {
        cases: 64,
        failure_persistence: None,
        ..proptest::test_runner::Config::default()
    });
    runner
        .run(
            &(
                writes.clone(),
                writes,
                0u8..26,
                0u8..26,
                0usize..12,
                any::<bool>(),
            ),
            |(committed, pending, low, high, limit, reverse)| {
                let apply = |txn: &mut Txn<'_>, writes: &[(u8, Option<u8>)]| {
                    for (key, value) in writes {
                        match value {
                            Some(v) => txn.put(TableId::Suppressed, vec![*key], vec![*v]),
                            None => txn.delete(TableId::Suppressed, vec![*key]),
                        }
                    }
                };
                // Start empty each case.
                backend
                    .write(Durability::Later, |txn| {
                        for (k, _) in txn.all(TableId::Suppressed, &[])? {
                            txn.delete(TableId::Suppressed, k);
                        }
                        Ok(())
                    })
                    .expect("clear");
                backend
                    .write(Durability::Later, |txn| {
                        apply(txn, &committed);
                        Ok(())
                    })
                    .expect("commit");
                let (low, high) = ([low], [high]);
                let read = |tables: &dyn super::Tables| {
                    tables
                        .scan(
                            TableId::Suppressed,
                            Bound::Included(&low),
                            Bound::Excluded(&high),
                            limit,
                            reverse,
                        )
                        .expect("scan")
                };
                let mut txn = backend.begin();
                apply(&mut txn, &pending);
                let through_txn = read(&txn);
                let by_key: BTreeMap<u8, Option<Vec<u8>>> = (0..24)
                    .map(|k| (k, txn.get(TableId::Suppressed, &[k]).expect("get")))
                    .collect();
                backend.commit(txn, Durability::Later).expect("commit");
                prop_assert_eq!(through_txn, read(backend));
                for (k, v) in by_key {
                    prop_assert_eq!(v, backend.get(TableId::Suppressed, &[k]).expect("get"));
                }
                Ok(())
            },
        )
        .expect("the transaction and the committed state agree");
}
