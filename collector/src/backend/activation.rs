//! Activation state: destinations, campaigns, the delivery outbox and its due queue,
//! frequency caps, push tokens, and the marks of campaigns events fired.
//!
//! Rows: `Destinations` id → the destination (JSON, secrets sealed by the activation
//! module); `Campaigns` id → a campaign; `Deliveries` number → a delivery; `Due` `(due
//! ms, number)` → nothing; `Caps` `(campaign, profile)` → the times it was sent to that
//! profile; `Tokens` `(profile, provider, token)` → the `seq` of the event that brought
//! it; `Fired` `(campaign, seq)` → nothing. The cursor in the membership feed and the
//! delivery numbers are numbers of [`super::meta`] (`activation:cursor`,
//! `activation:delivery`). Records are the activation module's types.

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{Rows, TableId, Tables, Txn, keys};
use crate::error::StoreError;

/// The number of the last membership change activation read.
pub const CURSOR: &str = "activation:cursor";
/// The number deliveries are counted with.
pub const DELIVERY_NUMBER: &str = "activation:delivery";

fn cap_key(campaign: &str, profile: &str) -> Vec<u8> {
    keys::Key::new().str(campaign).str(profile).done()
}

fn token_key(profile: &str, provider: &str, token: &str) -> Vec<u8> {
    keys::Key::new()
        .str(profile)
        .str(provider)
        .str(token)
        .done()
}

fn due_key(due_ms: u64, id: u64) -> Vec<u8> {
    keys::Key::new().u64(due_ms).u64(id).done()
}

fn json_rows<T: DeserializeOwned>(rows: Vec<super::Row>) -> Result<Vec<(Vec<u8>, T)>, StoreError> {
    rows.into_iter()
        .map(|(k, v)| Ok((k, serde_json::from_slice(&v)?)))
        .collect()
}

/// Reading activation state.
pub trait ActivationState: Tables {
    /// Every destination, as stored (by id order), one that is not JSON reported.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    #[allow(clippy::type_complexity)]
    fn destination_records(
        &self,
    ) -> Result<Vec<(String, Result<serde_json::Value, String>)>, StoreError> {
        self.all(TableId::Destinations, &[])?
            .into_iter()
            .map(|(k, v)| {
                Ok((
                    keys::read_str(&k)?,
                    serde_json::from_slice(&v).map_err(|e| e.to_string()),
                ))
            })
            .collect()
    }

    /// One destination, as stored.
    ///
    /// # Errors
    ///
    /// On a storage failure or a record that is not JSON.
    fn destination_record(&self, id: &str) -> Result<Option<serde_json::Value>, StoreError> {
        self.get_json(TableId::Destinations, &keys::str(id))
    }

    /// Every campaign, by id order, one that cannot be read reported.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    #[allow(clippy::type_complexity)]
    fn campaign_records<C: DeserializeOwned>(
        &self,
    ) -> Result<Vec<(String, Result<C, String>)>, StoreError> {
        self.all(TableId::Campaigns, &[])?
            .into_iter()
            .map(|(k, v)| {
                Ok((
                    keys::read_str(&k)?,
                    serde_json::from_slice(&v).map_err(|e| e.to_string()),
                ))
            })
            .collect()
    }

    /// One campaign.
    ///
    /// # Errors
    ///
    /// On a storage failure or an undecodable record.
    fn campaign_record<C: DeserializeOwned>(&self, id: &str) -> Result<Option<C>, StoreError> {
        self.get_json(TableId::Campaigns, &keys::str(id))
    }

    /// A delivery by number.
    ///
    /// # Errors
    ///
    /// On a storage failure or an undecodable record.
    fn delivery<D: DeserializeOwned>(&self, id: u64) -> Result<Option<D>, StoreError> {
        self.get_json(TableId::Deliveries, &keys::u64(id))
    }

    /// Deliveries numbered after `after`, oldest first, at most `limit`.
    ///
    /// # Errors
    ///
    /// On a storage failure or an undecodable record.
    fn deliveries<D: DeserializeOwned>(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<D>, StoreError> {
        let from = keys::u64(after);
        Ok(
            json_rows(self.scan_prefix(TableId::Deliveries, &[], Some((&from, true)), limit)?)?
                .into_iter()
                .map(|(_, d)| d)
                .collect(),
        )
    }

    /// The earliest entries of the due queue, as (due ms, delivery number).
    ///
    /// # Errors
    ///
    /// On a storage failure.
    fn due(&self, limit: usize) -> Result<Vec<(u64, u64)>, StoreError> {
        self.scan_prefix(TableId::Due, &[], None, limit)?
            .into_iter()
            .map(|(k, _)| {
                let mut parts = keys::Parts::of(&k);
                Ok((parts.u64()?, parts.u64()?))
            })
            .collect()
    }

    /// The times a campaign was sent to a profile.
    ///
    /// # Errors
    ///
    /// On a storage failure or an undecodable record.
    fn cap(&self, campaign: &str, profile: &str) -> Result<Vec<u64>, StoreError> {
        Ok(self
            .get_json(TableId::Caps, &cap_key(campaign, profile))?
            .unwrap_or_default())
    }

    /// Every frequency cap, as (campaign, profile).
    ///
    /// # Errors
    ///
    /// On a storage failure.
    fn caps(&self) -> Result<Vec<(String, String)>, StoreError> {
        self.all(TableId::Caps, &[])?
            .into_iter()
            .map(|(k, _)| {
                let mut parts = keys::Parts::of(&k);
                Ok((parts.str()?, parts.str()?))
            })
            .collect()
    }

    /// A profile's push tokens (its own record, not its merged profiles'), as
    /// (provider, token, seq), of one provider when given.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    fn tokens_of(
        &self,
        profile: &str,
        provider: Option<&str>,
    ) -> Result<Vec<(String, String, u64)>, StoreError> {
        let prefix = match provider {
            Some(provider) => keys::Key::new().str(profile).str(provider).done(),
            None => keys::str(profile),
        };
        self.all(TableId::Tokens, &prefix)?
            .into_iter()
            .map(|(k, v)| {
                let mut parts = keys::Parts::of(&k);
                parts.str()?;
                let seq = keys::read_u64(&v).unwrap_or(0);
                Ok((parts.str()?, parts.str()?, seq))
            })
            .collect()
    }

    /// Whether the event at `seq` fired the campaign.
    ///
    /// # Errors
    ///
    /// On a storage failure.
    fn fired(&self, campaign: &str, seq: u64) -> Result<bool, StoreError> {
        Ok(self
            .get(
                TableId::Fired,
                &keys::Key::new().str(campaign).u64(seq).done(),
            )?
            .is_some())
    }

    /// Every fired mark, as (campaign, seq).
    ///
    /// # Errors
    ///
    /// On a storage failure.
    fn fired_marks(&self) -> Result<Vec<(String, u64)>, StoreError> {
        self.all(TableId::Fired, &[])?
            .into_iter()
            .map(|(k, _)| {
                let mut parts = keys::Parts::of(&k);
                Ok((parts.str()?, parts.u64()?))
            })
            .collect()
    }
}

impl<T: Tables + ?Sized> ActivationState for T {}

impl Txn<'_> {
    /// Stores a destination as given (secrets sealed), or removes it.
    ///
    /// # Errors
    ///
    /// When it cannot be encoded.
    pub fn put_destination_record(
        &mut self,
        id: &str,
        record: Option<&serde_json::Value>,
    ) -> Result<(), StoreError> {
        match record {
            Some(record) => self.put_json(TableId::Destinations, keys::str(id), record),
            None => {
                self.delete(TableId::Destinations, keys::str(id));
                Ok(())
            }
        }
    }

    /// Stores a campaign, or removes it.
    ///
    /// # Errors
    ///
    /// When it cannot be encoded.
    pub fn put_campaign_record<C: Serialize>(
        &mut self,
        id: &str,
        campaign: Option<&C>,
    ) -> Result<(), StoreError> {
        match campaign {
            Some(campaign) => self.put_json(TableId::Campaigns, keys::str(id), campaign),
            None => {
                self.delete(TableId::Campaigns, keys::str(id));
                Ok(())
            }
        }
    }

    /// Stores a delivery under its number.
    ///
    /// # Errors
    ///
    /// When it cannot be encoded.
    pub fn put_delivery<D: Serialize>(&mut self, id: u64, delivery: &D) -> Result<(), StoreError> {
        self.put_json(TableId::Deliveries, keys::u64(id), delivery)
    }

    /// Forgets a delivery.
    pub fn remove_delivery(&mut self, id: u64) {
        self.delete(TableId::Deliveries, keys::u64(id));
    }

    /// Queues a delivery at `due_ms`, or takes it off the queue.
    pub fn set_due(&mut self, due_ms: u64, id: u64, queued: bool) {
        if queued {
            self.put(TableId::Due, due_key(due_ms, id), Vec::new());
        } else {
            self.delete(TableId::Due, due_key(due_ms, id));
        }
    }

    /// Records when a campaign was sent to a profile (`None` forgets it).
    ///
    /// # Errors
    ///
    /// When it cannot be encoded.
    pub fn put_cap(
        &mut self,
        campaign: &str,
        profile: &str,
        sent: Option<&[u64]>,
    ) -> Result<(), StoreError> {
        match sent {
            Some(sent) => self.put_json(TableId::Caps, cap_key(campaign, profile), &sent),
            None => {
                self.delete(TableId::Caps, cap_key(campaign, profile));
                Ok(())
            }
        }
    }

    /// Keeps a push token on a profile (brought by the event at `seq`), or removes it.
    pub fn set_token(&mut self, profile: &str, provider: &str, token: &str, seq: Option<u64>) {
        let key = token_key(profile, provider, token);
        match seq {
            Some(seq) => self.put(TableId::Tokens, key, keys::u64(seq)),
            None => self.delete(TableId::Tokens, key),
        }
    }

    /// Marks that the event at `seq` fired the campaign, or forgets the mark.
    pub fn set_fired(&mut self, campaign: &str, seq: u64, fired: bool) {
        let key = keys::Key::new().str(campaign).u64(seq).done();
        if fired {
            self.put(TableId::Fired, key, Vec::new());
        } else {
            self.delete(TableId::Fired, key);
        }
    }
}
