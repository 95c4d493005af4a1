//! Event accounting: how many events were received, accepted, rejected (by reason),
//! processed, dropped (by reason, deduplication among them) and stored.
//!
//! The counters are persisted with the state they describe: the ingest half by the log
//! writer in the same flush as the events it accepts, the pipeline half with the
//! pipeline's checkpoint. So after a crash they still add up:
//! `received = accepted + rejected` and `accepted = processed + pending`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Mutex, MutexGuard, PoisonError};

use serde::{Deserialize, Serialize};

/// Counters kept by the ingest side (HTTP handlers and log writer).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct IngestCounters {
    /// Events in requests that passed authentication and parsing.
    pub received: u64,
    /// Events appended to the durable log.
    pub accepted: u64,
    /// Events rejected one by one, by reason code.
    pub rejected: BTreeMap<String, u64>,
    /// Whole requests refused (bad key, unparseable, too large, rate limited), by code.
    pub requests_rejected: BTreeMap<String, u64>,
}

/// Counters kept by the pipeline.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PipelineCounters {
    /// Events the pipeline has run through every stage (stored or dropped).
    pub processed: u64,
    /// Events a stage dropped, by reason (`duplicate`...).
    pub dropped: BTreeMap<String, u64>,
    /// Events a stage moved to the failed-events store, by failure code.
    #[serde(default)]
    pub failed: BTreeMap<String, u64>,
}

impl PipelineCounters {
    /// Adds the outcome of one pipeline chunk.
    pub fn add(
        &mut self,
        processed: u64,
        dropped: &BTreeMap<String, u64>,
        failed: &BTreeMap<String, u64>,
    ) {
        self.processed += processed;
        for (reason, n) in dropped {
            add(&mut self.dropped, reason, *n);
        }
        for (code, n) in failed {
            add(&mut self.failed, code, *n);
        }
    }
}

/// The live counters, shared by handlers, log writer and pipeline.
#[derive(Debug, Default)]
pub struct Stats {
    ingest: Mutex<IngestCounters>,
    pipeline: Mutex<PipelineCounters>,
}

/// What `GET /v1/stats` answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatsReport {
    /// Events in requests that passed authentication and parsing.
    pub received: u64,
    /// Events durably accepted.
    pub accepted: u64,
    /// Events rejected one by one, by reason.
    pub rejected: BTreeMap<String, u64>,
    /// Requests refused whole, by reason.
    pub requests_rejected: BTreeMap<String, u64>,
    /// Accepted events dropped as duplicates of an earlier `(source, messageId)`.
    pub deduplicated: u64,
    /// Accepted events dropped by any stage, by reason.
    pub dropped: BTreeMap<String, u64>,
    /// Accepted events moved to the failed-events store, by failure code.
    pub failed: BTreeMap<String, u64>,
    /// Accepted events the pipeline has stored.
    pub stored: u64,
    /// Accepted events the pipeline has not processed yet.
    pub pending: u64,
}

/// The reason the deduplication stage gives for the events it drops.
pub const DUPLICATE: &str = "duplicate";

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn add(map: &mut BTreeMap<String, u64>, key: &str, n: u64) {
    *map.entry(key.to_owned()).or_default() += n;
}

impl Stats {
    /// Counters restored from what the store last persisted.
    pub fn restore(ingest: IngestCounters, pipeline: PipelineCounters) -> Self {
        Stats {
            ingest: Mutex::new(ingest),
            pipeline: Mutex::new(pipeline),
        }
    }

    /// Adds the outcome of one committed ingest request.
    pub fn record_ingest(&self, received: u64, accepted: u64, rejected: &[&'static str]) {
        let mut ingest = lock(&self.ingest);
        ingest.received += received;
        ingest.accepted += accepted;
        for code in rejected {
            add(&mut ingest.rejected, code, 1);
        }
    }

    /// Counts a request refused whole.
    pub fn record_request_rejected(&self, code: &str) {
        add(&mut lock(&self.ingest).requests_rejected, code, 1);
    }

    /// A copy of the ingest counters, to persist.
    pub fn ingest(&self) -> IngestCounters {
        lock(&self.ingest).clone()
    }

    /// A copy of the pipeline counters, to persist.
    pub fn pipeline(&self) -> PipelineCounters {
        lock(&self.pipeline).clone()
    }

    /// Replaces the pipeline counters with the ones just persisted with a checkpoint.
    pub fn set_pipeline(&self, counters: PipelineCounters) {
        *lock(&self.pipeline) = counters;
    }

    /// The report served by `GET /v1/stats`.
    pub fn report(&self) -> StatsReport {
        let ingest = self.ingest();
        let pipeline = self.pipeline();
        let not_stored: u64 =
            pipeline.dropped.values().sum::<u64>() + pipeline.failed.values().sum::<u64>();
        StatsReport {
            received: ingest.received,
            accepted: ingest.accepted,
            rejected: ingest.rejected,
            requests_rejected: ingest.requests_rejected,
            deduplicated: pipeline.dropped.get(DUPLICATE).copied().unwrap_or(0),
            stored: pipeline.processed.saturating_sub(not_stored),
            pending: ingest.accepted.saturating_sub(pipeline.processed),
            dropped: pipeline.dropped,
            failed: pipeline.failed,
        }
    }

    /// The counters in Prometheus' text exposition format.
    pub fn prometheus(&self) -> String {
        let report = self.report();
        let mut out = String::new();
        let single = |n: u64| vec![(String::new(), n)];
        let labelled = |map: &BTreeMap<String, u64>| map.clone().into_iter().collect::<Vec<_>>();
        let families = [
            (
                "kith_events_received_total",
                "Events received in authenticated, parseable requests.",
                "",
                single(report.received),
            ),
            (
                "kith_events_accepted_total",
                "Events durably accepted.",
                "",
                single(report.accepted),
            ),
            (
                "kith_events_rejected_total",
                "Events rejected one by one.",
                "code",
                labelled(&report.rejected),
            ),
            (
                "kith_requests_rejected_total",
                "Requests refused whole.",
                "code",
                labelled(&report.requests_rejected),
            ),
            (
                "kith_events_dropped_total",
                "Accepted events dropped by a pipeline stage.",
                "reason",
                labelled(&report.dropped),
            ),
            (
                "kith_events_failed_total",
                "Accepted events moved to the failed-events store.",
                "code",
                labelled(&report.failed),
            ),
            (
                "kith_events_stored_total",
                "Events stored by the pipeline.",
                "",
                single(report.stored),
            ),
        ];
        for (name, help, label, values) in families {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (key, value) in values {
                if label.is_empty() {
                    let _ = writeln!(out, "{name} {value}");
                } else {
                    let _ = writeln!(out, "{name}{{{label}=\"{key}\"}} {value}");
                }
            }
        }
        let _ = writeln!(
            out,
            "# HELP kith_pipeline_pending Accepted events not yet processed.\n# TYPE kith_pipeline_pending gauge\nkith_pipeline_pending {}",
            report.pending
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_adds_up() {
        let stats = Stats::default();
        stats.record_ingest(5, 3, &["missing_event", "missing_event"]);
        stats.record_request_rejected("unauthorized");
        let mut dropped = BTreeMap::new();
        dropped.insert(DUPLICATE.to_owned(), 1);
        let mut pipeline = stats.pipeline();
        let mut failed = BTreeMap::new();
        failed.insert("cleaning".to_owned(), 1);
        pipeline.add(3, &dropped, &failed);
        stats.set_pipeline(pipeline);
        let report = stats.report();
        assert_eq!(report.received, 5);
        assert_eq!(report.accepted, 3);
        assert_eq!(report.rejected["missing_event"], 2);
        assert_eq!(report.requests_rejected["unauthorized"], 1);
        assert_eq!(report.deduplicated, 1);
        assert_eq!(report.failed["cleaning"], 1);
        assert_eq!(report.stored, 1);
        assert_eq!(report.pending, 0);
        let text = stats.prometheus();
        assert!(text.contains("kith_events_rejected_total{code=\"missing_event\"} 2"));
        assert!(text.contains("kith_pipeline_pending 0"));
        assert!(text.contains("kith_events_failed_total{code=\"cleaning\"} 1"));
        assert!(text.contains("kith_events_received_total 5"));
    }
}
