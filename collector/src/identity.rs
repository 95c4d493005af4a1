//! Identity resolution in the collector: kith-identity's [`Graph`] on the embedded store,
//! run as a pipeline stage, and the profile API.
//!
//! The graph lives in one sled tree (see [`crate::store`]). Writes go to an overlay that
//! reads see through; the pipeline applies a chunk's overlay in one atomic batch before
//! its checkpoint ([`Stage::end_chunk`]), and a failed chunk's overlay is dropped. Every
//! graph effect is idempotent per event `seq`, so a replayed chunk changes nothing
//! twice. Admin operations (split, delete) take the same lock and apply at once.
//!
//! Keys of the identity tree: `o\0{identifier}` → owner profile id; `p\0{id}` → profile;
//! `e\0{id}\0{seq}` → (nothing: the timeline; summaries are rebuilt from the log); `m\0{merge}` → merge; `x\0{id}\0{merge}` → the
//! merges of a profile; `s\0{identifier}` → suppressed; `g\0{a}\0{b}` → a suggested
//! merge; `d\0{id}` → the profile's make-up changed (merged, split, deleted) and its
//! segment memberships must be re-evaluated; `n` → the last number given.
//!
//! The `d` marks are written in the same batch as the change itself, so a crash between
//! the graph's write and the segments' cannot lose a re-evaluation.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use kith_identity::graph::{Deleted, Graph, Split, SplitError};
use kith_identity::identifier::Identifier;
use kith_identity::matching::{self, Record, Scored};
use kith_identity::profile::{EventSummary, Profile};
use kith_identity::rules::Rules;
use kith_identity::store::{Merge, Store as GraphStore};
use serde_json::{Value, json};

use crate::error::StoreError;
use crate::pipeline::{Outcome, Stage};
use crate::store::{Entries, Space, Store, StoredEvent, Writes, space_key as key};

/// A nonce for a change mark made by an admin operation.
fn admin_nonce() -> String {
    format!("admin:{}", jiff::Timestamp::now().as_nanosecond())
}

/// The reason counted for events dropped because they carry an erased identifier.
pub const SUPPRESSED: &str = "suppressed";

fn id_bytes(id: &Identifier) -> Vec<u8> {
    id.to_string().into_bytes()
}

/// The graph's view of the store: the tree, seen through the pending writes.
struct View<'a> {
    store: &'a Store,
    writes: &'a mut Writes,
    rules: &'a Rules,
}

impl View<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        match self.writes.get(key) {
            Some(pending) => Ok(pending.clone()),
            None => self.store.get(Space::Identity, key),
        }
    }

    fn get_json<T: for<'de> serde::Deserialize<'de>>(
        &self,
        key: &[u8],
    ) -> Result<Option<T>, StoreError> {
        self.get(key)?
            .map(|v| serde_json::from_slice(&v).map_err(StoreError::from))
            .transpose()
    }

    fn put(&mut self, key: Vec<u8>, value: Option<Vec<u8>>) {
        self.writes.insert(key, value);
    }

    /// The entries under `prefix`, pending writes included, in key order.
    fn scan(&self, prefix: &[u8]) -> Result<Entries, StoreError> {
        let mut entries: std::collections::BTreeMap<Vec<u8>, Vec<u8>> = self
            .store
            .scan(Space::Identity, prefix)?
            .into_iter()
            .collect();
        for (k, v) in self.writes.range(prefix.to_vec()..) {
            if !k.starts_with(prefix) {
                break;
            }
            match v {
                Some(v) => entries.insert(k.clone(), v.clone()),
                None => entries.remove(k),
            };
        }
        Ok(entries.into_iter().collect())
    }
}

impl View<'_> {
    /// Marks profiles whose make-up changed, for the segments to re-evaluate; `nonce`
    /// tells this mark from a later one ([`Identity::clear_changed`]).
    fn mark_changed<'p>(&mut self, profiles: impl IntoIterator<Item = &'p str>, nonce: &str) {
        for profile in profiles {
            self.put(
                key(b'd', &[profile.as_bytes()]),
                Some(nonce.as_bytes().to_vec()),
            );
        }
    }

    /// Every live (not merged) profile.
    fn live_profiles(&self) -> Result<Vec<Profile>, StoreError> {
        let mut live = Vec::new();
        for (_, value) in self.scan(&key(b'p', &[b""]))? {
            let profile: Profile = serde_json::from_slice(&value)?;
            if profile.merged_into.is_none() {
                live.push(profile);
            }
        }
        Ok(live)
    }
}

impl GraphStore for View<'_> {
    type Error = StoreError;

    fn owner(&self, id: &Identifier) -> Result<Option<String>, StoreError> {
        Ok(self
            .get(&key(b'o', &[&id_bytes(id)]))?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    fn set_owner(&mut self, id: &Identifier, profile: Option<&str>) -> Result<(), StoreError> {
        self.put(
            key(b'o', &[&id_bytes(id)]),
            profile.map(|p| p.as_bytes().to_vec()),
        );
        Ok(())
    }

    fn profile(&self, id: &str) -> Result<Option<Profile>, StoreError> {
        self.get_json(&key(b'p', &[id.as_bytes()]))
    }

    fn put_profile(&mut self, profile: &Profile) -> Result<(), StoreError> {
        self.put(
            key(b'p', &[profile.id.as_bytes()]),
            Some(serde_json::to_vec(profile)?),
        );
        Ok(())
    }

    fn delete_profile(&mut self, id: &str) -> Result<(), StoreError> {
        self.put(key(b'p', &[id.as_bytes()]), None);
        Ok(())
    }

    fn next_number(&mut self) -> Result<u64, StoreError> {
        let last = self
            .get(b"n")?
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map_or(0, u64::from_be_bytes);
        self.put(b"n".to_vec(), Some((last + 1).to_be_bytes().to_vec()));
        Ok(last + 1)
    }

    /// The timeline keeps only `seq`s; the summaries are rebuilt from the stored events,
    /// so the graph does not hold a second copy of every event.
    fn events(&self, profile: &str) -> Result<Vec<EventSummary>, StoreError> {
        let prefix = key(b'e', &[profile.as_bytes(), b""]);
        let seqs: Vec<u64> = self
            .scan(&prefix)?
            .into_iter()
            .filter_map(|(k, _)| <[u8; 8]>::try_from(&k[prefix.len()..]).ok())
            .map(u64::from_be_bytes)
            .collect();
        self.store
            .events_by_seq(&seqs)?
            .into_iter()
            .map(|event| {
                let message = serde_json::to_value(&event.message)?;
                Ok(EventSummary::of(
                    event.seq,
                    &event.source,
                    &message,
                    self.rules,
                ))
            })
            .collect()
    }

    fn put_event(&mut self, profile: &str, event: &EventSummary) -> Result<(), StoreError> {
        let seq = event.seq.to_be_bytes();
        self.put(key(b'e', &[profile.as_bytes(), &seq]), Some(Vec::new()));
        Ok(())
    }

    fn delete_events(&mut self, profile: &str) -> Result<(), StoreError> {
        for (k, _) in self.scan(&key(b'e', &[profile.as_bytes(), b""]))? {
            self.put(k, None);
        }
        Ok(())
    }

    fn put_merge(&mut self, merge: &Merge) -> Result<(), StoreError> {
        let number = merge.id.to_be_bytes();
        self.put(key(b'm', &[&number]), Some(serde_json::to_vec(merge)?));
        for profile in [&merge.survivor, &merge.merged] {
            self.put(key(b'x', &[profile.as_bytes(), &number]), Some(Vec::new()));
        }
        Ok(())
    }

    fn merge(&self, id: u64) -> Result<Option<Merge>, StoreError> {
        self.get_json(&key(b'm', &[&id.to_be_bytes()]))
    }

    fn delete_merge(&mut self, id: u64) -> Result<(), StoreError> {
        if let Some(merge) = self.merge(id)? {
            let number = id.to_be_bytes();
            for profile in [&merge.survivor, &merge.merged] {
                self.put(key(b'x', &[profile.as_bytes(), &number]), None);
            }
        }
        self.put(key(b'm', &[&id.to_be_bytes()]), None);
        Ok(())
    }

    fn merges_of(&self, profile: &str) -> Result<Vec<Merge>, StoreError> {
        let prefix = key(b'x', &[profile.as_bytes(), b""]);
        let mut merges = Vec::new();
        for (k, _) in self.scan(&prefix)? {
            let number = <[u8; 8]>::try_from(&k[prefix.len()..])
                .map(u64::from_be_bytes)
                .map_err(|_| StoreError::Corrupt("bad merge index key".to_owned()))?;
            if let Some(merge) = self.merge(number)? {
                merges.push(merge);
            }
        }
        Ok(merges)
    }

    fn is_suppressed(&self, id: &Identifier) -> Result<bool, StoreError> {
        Ok(self.get(&key(b's', &[&id_bytes(id)]))?.is_some())
    }

    fn suppress(&mut self, id: &Identifier) -> Result<(), StoreError> {
        self.put(key(b's', &[&id_bytes(id)]), Some(Vec::new()));
        Ok(())
    }
}

/// What a matching run did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct MatchReport {
    /// Live profiles considered.
    pub profiles: usize,
    /// Candidate pairs compared.
    pub compared: usize,
    /// Pairs merged.
    pub merged: usize,
    /// Pairs above the match probability that a guardrail kept apart.
    pub refused: usize,
    /// Pairs kept as suggestions.
    pub suggested: usize,
}

/// Why matching cannot run or decide.
#[derive(Debug, thiserror::Error)]
pub enum MatchError {
    /// The identity settings have no `matching` section.
    #[error(
        "probabilistic matching is not configured: add a \"matching\" section to the identity settings"
    )]
    NotConfigured,
    /// The pair is not a suggested merge.
    #[error("no such suggested merge")]
    NoSuggestion,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// An identifier as logs show it: its type and the first 8 hex digits of the SHA-256
/// of its value (`email:3fa2c9d1`), so that a log line can be matched against a
/// known person without holding the value.
pub fn fingerprint(identifier: &Identifier) -> String {
    let digest = <sha2::Sha256 as sha2::Digest>::digest(identifier.value.as_bytes());
    let short: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
    format!("{}:{short}", identifier.kind)
}

/// The identity graph of a collector, shared by its pipeline stage and the profile API.
#[derive(Debug)]
pub struct Identity {
    graph: Graph,
    store: Arc<Store>,
    pending: Mutex<Writes>,
}

impl Identity {
    /// The graph with `rules` on `store`.
    pub fn new(store: Arc<Store>, rules: Rules) -> Self {
        Identity {
            graph: Graph::new(rules),
            store,
            pending: Mutex::new(Writes::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Writes> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `work` on the graph, then applies every pending write (a chunk's so far
    /// included: they are idempotent).
    fn write<T>(&self, work: impl FnOnce(&Graph, &mut View<'_>) -> T) -> Result<T, StoreError> {
        let mut pending = self.lock();
        let result = work(
            &self.graph,
            &mut View {
                store: &self.store,
                writes: &mut pending,
                rules: self.graph.rules(),
            },
        );
        self.store
            .apply(Space::Identity, std::mem::take(&mut *pending))?;
        self.store.flush()?;
        Ok(result)
    }

    /// Runs `work` reading the graph.
    fn read<T>(
        &self,
        work: impl FnOnce(&Graph, &View<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut pending = self.lock();
        work(
            &self.graph,
            &View {
                store: &self.store,
                writes: &mut pending,
                rules: self.graph.rules(),
            },
        )
    }

    /// The live profile answering for `id` (itself, or the one it was merged into).
    ///
    /// # Errors
    ///
    /// On a storage failure.
    pub fn profile(&self, id: &str) -> Result<Option<Profile>, StoreError> {
        self.read(|graph, view| graph.live(view, id))
    }

    /// Every live profile.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    pub fn live_profiles(&self) -> Result<Vec<Profile>, StoreError> {
        self.read(|_, view| view.live_profiles())
    }

    /// A page of live profile ids, in id order, after `after`.
    ///
    /// # Errors
    ///
    /// On a storage failure or an undecodable profile.
    pub fn live_profile_ids(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let prefix = key(b'p', &[b""]);
        let mut from = key(b'p', &[after.unwrap_or_default().as_bytes()]);
        if after.is_some() {
            from.push(0); // just after `after`
        }
        let mut ids = Vec::with_capacity(limit);
        let mut next = from;
        while ids.len() < limit {
            let page = self
                .store
                .scan_from(Space::Identity, &prefix, &next, limit)?;
            let Some((last, _)) = page.last() else {
                break;
            };
            next = last.clone();
            next.push(0);
            let full = page.len() < limit;
            for (_, value) in page {
                let profile: Profile = serde_json::from_slice(&value)?;
                if profile.merged_into.is_none() && ids.len() < limit {
                    ids.push(profile.id);
                }
            }
            if full {
                break;
            }
        }
        Ok(ids)
    }

    /// The live profile holding an identifier.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    pub fn find(&self, id: &Identifier) -> Result<Option<Profile>, StoreError> {
        self.read(|graph, view| graph.find(view, id))
    }

    /// The `seq`s of a live profile's events, oldest first.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    pub fn event_seqs(&self, id: &str) -> Result<Vec<u64>, StoreError> {
        self.read(|graph, view| match graph.live(view, id)? {
            Some(profile) => Ok(view.events(&profile.id)?.iter().map(|e| e.seq).collect()),
            None => Ok(Vec::new()),
        })
    }

    /// The merges a live profile took part in.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    pub fn merges(&self, id: &str) -> Result<Vec<Merge>, StoreError> {
        self.read(|graph, view| match graph.live(view, id)? {
            Some(profile) => view.merges_of(&profile.id),
            None => Ok(Vec::new()),
        })
    }

    /// Undoes a merge.
    ///
    /// # Errors
    ///
    /// An unknown or undone merge, or a storage failure.
    pub fn split(&self, merge: u64) -> Result<Split, SplitError<StoreError>> {
        self.write(|graph, view| {
            let split = graph.split(view, merge)?;
            view.mark_changed(
                [split.survivor.as_str(), split.restored.as_str()],
                &admin_nonce(),
            );
            Ok(split)
        })
        .map_err(SplitError::Store)?
    }

    /// The identifiers a message carries, by these identity rules.
    pub fn identifiers_in(&self, message: &Value) -> Vec<Identifier> {
        kith_identity::identifier::identifiers_of(message, self.graph.rules().trait_identifiers())
    }

    /// Erases a profile and its events, and suppresses its identifiers.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    pub fn delete(&self, id: &str) -> Result<Option<Deleted>, StoreError> {
        let deleted = self.write(|graph, view| {
            let deleted = graph.delete(view, id)?;
            if let Some(deleted) = &deleted {
                view.mark_changed([deleted.profile.as_str()], &admin_nonce());
            }
            Ok::<_, StoreError>(deleted)
        })??;
        if let Some(deleted) = &deleted {
            self.store.erase_events(&deleted.event_seqs)?;
        }
        Ok(deleted)
    }

    /// Runs probabilistic matching over the live profiles' traits: merges the pairs
    /// above the match probability (within the guardrails) and keeps the pairs in the
    /// review band as suggestions, replacing the previous ones.
    ///
    /// # Errors
    ///
    /// [`MatchError::NotConfigured`] without a `matching` section, or a storage failure.
    pub fn run_matching(&self) -> Result<MatchReport, MatchError> {
        let config = self
            .graph
            .rules()
            .config()
            .matching
            .clone()
            .ok_or(MatchError::NotConfigured)?;
        let names: Vec<&str> = config
            .fields
            .iter()
            .flat_map(|f| std::iter::once(f.name.as_str()).chain(f.also.as_deref()))
            .chain(config.blocking.iter().flatten().map(|k| k.field.as_str()))
            .collect();
        let report = self.write(|graph, view| -> Result<MatchReport, StoreError> {
            let records: Vec<Record> = view
                .live_profiles()?
                .into_iter()
                .map(|profile| Record {
                    fields: names
                        .iter()
                        .filter_map(|name| {
                            let value = &profile.traits.get(*name)?.value;
                            let text = match value {
                                Value::String(s) => s.clone(),
                                Value::Number(n) => n.to_string(),
                                _ => return None,
                            };
                            Some(((*name).to_owned(), text))
                        })
                        .collect(),
                    id: profile.id,
                })
                .collect();
            let mut outcome = matching::run(&config, &records);
            outcome.matches.sort_by(|x, y| y.probability.total_cmp(&x.probability));
            let mut report = MatchReport {
                profiles: records.len(),
                compared: outcome.compared,
                ..MatchReport::default()
            };
            for pair in &outcome.matches {
                let live = |id: &str| graph.live(&*view, id).map(|p| p.map(|p| p.id));
                if live(&pair.a)? == live(&pair.b)? {
                    continue; // joined already, through another pair
                }
                let reason = format!(
                    "probabilistic match: probability {:.4}, weight {:.2}",
                    pair.probability, pair.weight
                );
                match graph.merge_profiles(view, &pair.a, &pair.b, &reason)? {
                    Ok(merge) => {
                        view.mark_changed([merge.survivor.as_str(), merge.merged.as_str()], &admin_nonce());
                        report.merged += 1;
                    }
                    Err(why) => {
                        tracing::info!(a = %pair.a, b = %pair.b, %why, "probabilistic match not merged");
                        report.refused += 1;
                    }
                }
            }
            for (k, _) in view.scan(&key(b'g', &[b""]))? {
                view.put(k, None);
            }
            for pair in &outcome.suggestions {
                view.put(
                    key(b'g', &[pair.a.as_bytes(), pair.b.as_bytes()]),
                    Some(serde_json::to_vec(pair)?),
                );
                report.suggested += 1;
            }
            Ok(report)
        })??;
        Ok(report)
    }

    /// The suggested merges of the last matching run.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    pub fn suggestions(&self) -> Result<Vec<Scored>, StoreError> {
        self.read(|_, view| {
            view.scan(&key(b'g', &[b""]))?
                .into_iter()
                .map(|(_, v)| serde_json::from_slice(&v).map_err(StoreError::from))
                .collect()
        })
    }

    /// Accepts (merges) or dismisses a suggested merge; answers the merge when
    /// accepted, or why the guardrails refused it.
    ///
    /// # Errors
    ///
    /// [`MatchError::NoSuggestion`] for a pair not suggested, or a storage failure.
    pub fn decide(
        &self,
        a: &str,
        b: &str,
        accept: bool,
    ) -> Result<Option<Result<Merge, String>>, MatchError> {
        let decided = self.write(
            |graph, view| -> Result<Option<Option<Result<Merge, String>>>, StoreError> {
                let suggestion = key(b'g', &[a.as_bytes(), b.as_bytes()]);
                let Some(raw) = view.get(&suggestion)? else {
                    return Ok(None);
                };
                let pair: Scored = serde_json::from_slice(&raw)?;
                view.put(suggestion, None);
                if !accept {
                    return Ok(Some(None));
                }
                let reason = format!(
                    "suggested merge accepted: probability {:.4}, weight {:.2}",
                    pair.probability, pair.weight
                );
                let merged = graph.merge_profiles(view, a, b, &reason)?;
                if let Ok(merge) = &merged {
                    view.mark_changed(
                        [merge.survivor.as_str(), merge.merged.as_str()],
                        &admin_nonce(),
                    );
                }
                Ok(Some(Some(merged)))
            },
        )??;
        decided.ok_or(MatchError::NoSuggestion)
    }

    /// The profiles whose make-up changed (merged, split, deleted) since their segment
    /// memberships were last re-evaluated, each with its mark's nonce.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    pub fn changed_profiles(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let prefix = key(b'd', &[b""]);
        self.read(|_, view| {
            Ok(view
                .scan(&prefix)?
                .into_iter()
                .map(|(k, nonce)| {
                    (
                        String::from_utf8_lossy(&k[prefix.len()..]).into_owned(),
                        nonce,
                    )
                })
                .collect())
        })
    }

    /// Clears the marks of [`Identity::changed_profiles`] that were re-evaluated: each
    /// only if no later change marked it again.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    pub fn clear_changed(&self, marks: &[(String, Vec<u8>)]) -> Result<(), StoreError> {
        if marks.is_empty() {
            return Ok(());
        }
        self.write(|_, view| -> Result<(), StoreError> {
            for (profile, nonce) in marks {
                let mark = key(b'd', &[profile.as_bytes()]);
                if view.get(&mark)?.as_ref() == Some(nonce) {
                    view.put(mark, None);
                }
            }
            Ok(())
        })?
    }

    /// The pipeline stage.
    pub fn stage(self: &Arc<Self>) -> Resolve {
        Resolve {
            identity: self.clone(),
        }
    }
}

/// The identity pipeline stage: attributes each event to its profile (written to the
/// stored event as `context.kith.profile_id`, with refused identifiers as
/// `context.kith.identity_refused`), and drops events carrying an erased identifier.
#[derive(Debug)]
pub struct Resolve {
    identity: Arc<Identity>,
}

impl Stage for Resolve {
    fn name(&self) -> &'static str {
        "identity"
    }

    fn begin_chunk(&self) {
        self.identity.lock().clear();
    }

    fn process(&self, event: &mut StoredEvent) -> Result<Outcome, StoreError> {
        let identity = &self.identity;
        let message = serde_json::to_value(&event.message)?;
        let summary = EventSummary::of(event.seq, &event.source, &message, identity.graph.rules());
        let resolution = {
            let mut pending = identity.lock();
            let mut view = View {
                store: &identity.store,
                writes: &mut pending,
                rules: identity.graph.rules(),
            };
            let resolution = identity.graph.process(&mut view, &summary)?;
            let nonce = format!("event:{}", event.seq);
            for merge in &resolution.merges {
                view.mark_changed([merge.survivor.as_str(), merge.merged.as_str()], &nonce);
            }
            resolution
        };
        // Logs name identifiers by fingerprint only: they are personal data.
        if let Some(id) = resolution.suppressed {
            tracing::info!(seq = event.seq, identifier = %fingerprint(&id), "event dropped: it carries an erased identifier");
            return Ok(Outcome::Drop(SUPPRESSED));
        }
        for refusal in &resolution.refusals {
            tracing::info!(seq = event.seq, identifier = %fingerprint(&refusal.identifier),
                           "identifier not linked (the reason is on the event: context.kith.identity_refused)");
        }
        for merge in &resolution.merges {
            tracing::info!(seq = event.seq, survivor = %merge.survivor, merged = %merge.merged, "profiles merged");
        }
        if let Some(profile) = resolution.profile {
            let context = event
                .message
                .common_mut()
                .context
                .get_or_insert_with(Default::default);
            let kith = context.entry("kith").or_insert_with(|| json!({}));
            if let Value::Object(kith) = kith {
                kith.insert("profile_id".to_owned(), Value::String(profile));
                if !resolution.refusals.is_empty() {
                    kith.insert("identity_refused".to_owned(), json!(resolution.refusals));
                }
            }
        }
        Ok(Outcome::Continue)
    }

    fn end_chunk(&self) -> Result<(), StoreError> {
        let writes = std::mem::take(&mut *self.identity.lock());
        self.identity.store.apply(Space::Identity, writes)
    }
}
