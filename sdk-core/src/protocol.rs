//! The Segment-spec wire protocol: message types, the batch envelope, limits and
//! validation.
//!
//! This module owns the one definition of what Kith's SDKs send and what the collector
//! accepts. It does no I/O and depends only on serde and jiff, so it builds for every
//! target, `wasm32-unknown-unknown` included.
//!
//! Unknown keys are kept (in [`Common::extra`]) rather than refused, as Segment's own
//! API does, so a message passes through Kith unchanged apart from the fields Kith sets.
//!
//! # Example
//!
//! ```
//! use kith_sdk_core::protocol::Message;
//!
//! let message: Message = serde_json::from_str(
//!     r#"{"type":"track","event":"Signed Up","userId":"u1","properties":{"plan":"pro"}}"#,
//! )?;
//! assert!(message.validate().is_ok());
//! assert_eq!(message.kind().as_str(), "track");
//! # Ok::<(), serde_json::Error>(())
//! ```

use std::fmt;
use std::str::FromStr;

use jiff::Timestamp;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

/// A JSON object, as used for `properties`, `traits`, `context` and `integrations`.
pub type Map = serde_json::Map<String, Value>;

/// The largest serialized event accepted, in bytes (Segment's limit).
pub const MAX_EVENT_BYTES: usize = 32 * 1024;
/// The largest batch request body accepted, in bytes, after decompression.
pub const MAX_BATCH_BYTES: usize = 500 * 1024;
/// The most events one batch may carry.
pub const MAX_BATCH_EVENTS: usize = 2_500;
/// The longest `messageId` accepted, in characters.
pub const MAX_MESSAGE_ID_CHARS: usize = 100;
/// The deepest nesting of objects and arrays accepted in an event, the event object
/// itself counting as level 1. Well under serde_json's parsing limit of 128, so that
/// every form a stored event takes (wrapped in a profile, a failed-event record) still
/// reads back.
pub const MAX_EVENT_DEPTH: usize = 32;

/// The six Segment message types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageType {
    /// An action the user performed.
    Track,
    /// Who the user is, and their traits.
    Identify,
    /// A web page view.
    Page,
    /// A mobile screen view.
    Screen,
    /// The user's membership of a group (account, company).
    Group,
    /// Links a previous identity to the current user id.
    Alias,
}

impl MessageType {
    /// Every message type, in Segment's documentation order.
    pub const ALL: [MessageType; 6] = [
        MessageType::Track,
        MessageType::Identify,
        MessageType::Page,
        MessageType::Screen,
        MessageType::Group,
        MessageType::Alias,
    ];

    /// The type's wire name, as in `"type": "track"`.
    pub fn as_str(self) -> &'static str {
        match self {
            MessageType::Track => "track",
            MessageType::Identify => "identify",
            MessageType::Page => "page",
            MessageType::Screen => "screen",
            MessageType::Group => "group",
            MessageType::Alias => "alias",
        }
    }
}

impl fmt::Display for MessageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for MessageType {
    type Err = UnknownMessageType;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        MessageType::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| UnknownMessageType(s.to_owned()))
    }
}

/// A `type` that is not one of the six Segment message types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownMessageType(pub String);

impl fmt::Display for UnknownMessageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown message type {:?}", self.0)
    }
}

impl std::error::Error for UnknownMessageType {}

/// The fields every message type shares.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Common {
    /// Unique id of the message, used for deduplication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    /// A pseudo-unique id for a user not yet known by `userId`.
    #[serde(
        default,
        deserialize_with = "id_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub anonymous_id: Option<String>,
    /// The user's id in the customer's own database.
    #[serde(
        default,
        deserialize_with = "id_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub user_id: Option<String>,
    /// When the message happened. The collector corrects it for client clock skew.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<Timestamp>,
    /// The `timestamp` as the client sent it, before clock-skew correction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_timestamp: Option<Timestamp>,
    /// When the client sent the message, by the client's clock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_at: Option<Timestamp>,
    /// When the collector received the message, by the collector's clock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received_at: Option<Timestamp>,
    /// Context: library, device, page, ip, locale...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<Map>,
    /// Which destinations the message is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub integrations: Option<Map>,
    /// Any other key the sender included, kept as it came.
    #[serde(flatten)]
    pub extra: Map,
}

/// A `track` message: an action the user performed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Track {
    /// The fields every message shares.
    #[serde(flatten)]
    pub common: Common,
    /// The action's name, such as `"Order Completed"`. Required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    /// Properties of the action.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties: Option<Map>,
}

/// An `identify` message: who the user is.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Identify {
    /// The fields every message shares.
    #[serde(flatten)]
    pub common: Common,
    /// Traits of the user: email, name, plan...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traits: Option<Map>,
}

/// A `page` message: a web page view.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Page {
    /// The fields every message shares.
    #[serde(flatten)]
    pub common: Common,
    /// The page's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Properties of the page view: url, path, referrer, title...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties: Option<Map>,
}

/// A `screen` message: a mobile screen view.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Screen {
    /// The fields every message shares.
    #[serde(flatten)]
    pub common: Common,
    /// The screen's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Properties of the screen view.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties: Option<Map>,
}

/// A `group` message: the user belongs to a group (account, company).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Group {
    /// The fields every message shares.
    #[serde(flatten)]
    pub common: Common,
    /// The group's id. Required.
    #[serde(
        default,
        deserialize_with = "id_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub group_id: Option<String>,
    /// Traits of the group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traits: Option<Map>,
}

/// An `alias` message: `previousId` and `userId` are the same person.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Alias {
    /// The fields every message shares.
    #[serde(flatten)]
    pub common: Common,
    /// The identity being linked to `userId`. Required.
    #[serde(
        default,
        deserialize_with = "id_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub previous_id: Option<String>,
}

/// One Segment-spec message, tagged by its `type` field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Message {
    /// See [`Track`].
    Track(Track),
    /// See [`Identify`].
    Identify(Identify),
    /// See [`Page`].
    Page(Page),
    /// See [`Screen`].
    Screen(Screen),
    /// See [`Group`].
    Group(Group),
    /// See [`Alias`].
    Alias(Alias),
}

/// The request body of `POST /v1/batch`.
///
/// Generic over the event representation so that the collector can take each event as
/// raw JSON (`Batch<Box<RawValue>>`) and reject bad events one by one, while SDKs build
/// `Batch<Message>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Batch<E = Message> {
    /// The events.
    pub batch: Vec<E>,
    /// Context merged into every event (the event's own keys win).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<Map>,
    /// Integrations merged into every event (the event's own keys win).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub integrations: Option<Map>,
    /// When the batch was sent, for events that carry no `sentAt` of their own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_at: Option<Timestamp>,
    /// The source's write key, for clients that cannot set headers (`sendBeacon`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_key: Option<String>,
}

/// Why a message breaks the spec. `code` is stable and machine-readable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// A stable, machine-readable reason, such as `missing_event`.
    pub code: &'static str,
    /// A sentence for the developer.
    pub message: String,
}

impl Invalid {
    fn new(code: &'static str, message: impl Into<String>) -> Self {
        Invalid {
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for Invalid {}

impl Message {
    /// The message's type.
    pub fn kind(&self) -> MessageType {
        match self {
            Message::Track(_) => MessageType::Track,
            Message::Identify(_) => MessageType::Identify,
            Message::Page(_) => MessageType::Page,
            Message::Screen(_) => MessageType::Screen,
            Message::Group(_) => MessageType::Group,
            Message::Alias(_) => MessageType::Alias,
        }
    }

    /// The fields every message shares.
    pub fn common(&self) -> &Common {
        match self {
            Message::Track(m) => &m.common,
            Message::Identify(m) => &m.common,
            Message::Page(m) => &m.common,
            Message::Screen(m) => &m.common,
            Message::Group(m) => &m.common,
            Message::Alias(m) => &m.common,
        }
    }

    /// The fields every message shares, mutably.
    pub fn common_mut(&mut self) -> &mut Common {
        match self {
            Message::Track(m) => &mut m.common,
            Message::Identify(m) => &mut m.common,
            Message::Page(m) => &mut m.common,
            Message::Screen(m) => &mut m.common,
            Message::Group(m) => &mut m.common,
            Message::Alias(m) => &mut m.common,
        }
    }

    /// Checks the rules of the spec that serde's types cannot express.
    ///
    /// # Errors
    ///
    /// The first rule broken: `missing_identity` (neither `userId` nor `anonymousId`),
    /// `missing_event` (track), `missing_group_id` (group), `missing_previous_id` (alias)
    /// `message_id_too_long` or `too_deep` (objects and arrays nested more than
    /// [`MAX_EVENT_DEPTH`] levels).
    pub fn validate(&self) -> Result<(), Invalid> {
        let common = self.common();
        if self.nesting_exceeds(MAX_EVENT_DEPTH) {
            return Err(Invalid::new(
                "too_deep",
                format!(
                    "the event nests objects and arrays more than {MAX_EVENT_DEPTH} levels deep"
                ),
            ));
        }
        if blank(&common.user_id) && blank(&common.anonymous_id) {
            return Err(Invalid::new(
                "missing_identity",
                "every message needs a userId or an anonymousId",
            ));
        }
        if let Some(id) = &common.message_id
            && id.chars().count() > MAX_MESSAGE_ID_CHARS
        {
            return Err(Invalid::new(
                "message_id_too_long",
                format!("messageId is longer than {MAX_MESSAGE_ID_CHARS} characters"),
            ));
        }
        match self {
            Message::Track(t) if blank(&t.event) => Err(Invalid::new(
                "missing_event",
                "a track message needs an event name",
            )),
            Message::Group(g) if blank(&g.group_id) => Err(Invalid::new(
                "missing_group_id",
                "a group message needs a groupId",
            )),
            Message::Alias(a) if blank(&a.previous_id) => Err(Invalid::new(
                "missing_previous_id",
                "an alias message needs a previousId",
            )),
            _ => Ok(()),
        }
    }

    /// Whether the message, as JSON, nests objects and arrays more than `max` levels
    /// deep (the message object is level 1).
    fn nesting_exceeds(&self, max: usize) -> bool {
        let (common, own) = match self {
            Message::Track(m) => (&m.common, m.properties.as_ref()),
            Message::Identify(m) => (&m.common, m.traits.as_ref()),
            Message::Page(m) => (&m.common, m.properties.as_ref()),
            Message::Screen(m) => (&m.common, m.properties.as_ref()),
            Message::Group(m) => (&m.common, m.traits.as_ref()),
            Message::Alias(m) => (&m.common, None),
        };
        // The message is level 1: these maps are level 2, their values from level 3 on.
        let in_map = max.saturating_sub(2);
        [common.context.as_ref(), common.integrations.as_ref(), own]
            .into_iter()
            .flatten()
            .any(|map| map.values().any(|v| deeper_than(v, in_map)))
            || common
                .extra
                .values()
                .any(|v| deeper_than(v, max.saturating_sub(1)))
    }

    /// The message as JSON: what its `Serialize` gives, built by hand so that the
    /// engine serializes events without serde's serializers (in the browser the page's
    /// `JSON.stringify` writes the text; see [`crate::json`]).
    pub fn into_value(self) -> Value {
        let kind = self.kind();
        let text = |s: Option<String>| s.map(Value::String);
        let object = |m: Option<Map>| m.map(Value::Object);
        // Each type's own fields, two slots each (`None` is left out, as serde skips it).
        let (common, fields) = match self {
            Message::Track(m) => (
                m.common,
                [
                    ("event", text(m.event)),
                    ("properties", object(m.properties)),
                ],
            ),
            Message::Identify(m) => (m.common, [("traits", object(m.traits)), ("", None)]),
            Message::Page(m) => (
                m.common,
                [("name", text(m.name)), ("properties", object(m.properties))],
            ),
            Message::Screen(m) => (
                m.common,
                [("name", text(m.name)), ("properties", object(m.properties))],
            ),
            Message::Group(m) => (
                m.common,
                [("groupId", text(m.group_id)), ("traits", object(m.traits))],
            ),
            Message::Alias(m) => (m.common, [("previousId", text(m.previous_id)), ("", None)]),
        };
        let time = |t: Option<Timestamp>| t.map(|t| Value::String(t.to_string()));
        // Unknown keys first: a named field wins over an `extra` key of the same name.
        let mut map = common.extra;
        let named = [
            ("type", Some(Value::from(kind.as_str()))),
            ("messageId", text(common.message_id)),
            ("anonymousId", text(common.anonymous_id)),
            ("userId", text(common.user_id)),
            ("timestamp", time(common.timestamp)),
            ("originalTimestamp", time(common.original_timestamp)),
            ("sentAt", time(common.sent_at)),
            ("receivedAt", time(common.received_at)),
            ("context", object(common.context)),
            ("integrations", object(common.integrations)),
        ];
        for (key, value) in named.into_iter().chain(fields) {
            if let Some(value) = value {
                map.insert(key.to_owned(), value);
            }
        }
        Value::Object(map)
    }

    /// Fills in batch-level `context` and `integrations`: each top-level key the message
    /// does not set itself is taken from the batch.
    pub fn merge_batch_defaults(&mut self, context: Option<&Map>, integrations: Option<&Map>) {
        let common = self.common_mut();
        merge_missing(&mut common.context, context);
        merge_missing(&mut common.integrations, integrations);
    }
}

fn merge_missing(target: &mut Option<Map>, defaults: Option<&Map>) {
    let Some(defaults) = defaults.filter(|d| !d.is_empty()) else {
        return;
    };
    let target = target.get_or_insert_with(Map::new);
    for (key, value) in defaults {
        if !target.contains_key(key) {
            target.insert(key.clone(), value.clone());
        }
    }
}

/// Whether `value` nests objects and arrays more than `budget` levels deep (a scalar is
/// 0 levels deep, `[]` 1, `[[]]` 2). Stops as soon as the budget is spent.
fn deeper_than(value: &Value, budget: usize) -> bool {
    match value {
        Value::Array(items) => budget == 0 || items.iter().any(|v| deeper_than(v, budget - 1)),
        Value::Object(map) => budget == 0 || map.values().any(|v| deeper_than(v, budget - 1)),
        _ => false,
    }
}

fn blank(value: &Option<String>) -> bool {
    value.as_deref().is_none_or(|s| s.trim().is_empty())
}

/// Ids are strings on the wire, but some libraries send numbers: take both.
fn id_string<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Id {
        Text(String),
        Number(serde_json::Number),
    }
    Ok(match Option::<Id>::deserialize(deserializer)? {
        None => None,
        Some(Id::Text(s)) => Some(s),
        Some(Id::Number(n)) => Some(n.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(value: Value) -> Message {
        serde_json::from_value(value).expect("valid message")
    }

    #[test]
    fn parses_every_type_and_keeps_unknown_keys() {
        for kind in MessageType::ALL {
            let message = parse(json!({
                "type": kind.as_str(), "userId": "u1", "event": "E", "groupId": "g",
                "previousId": "p", "channel": "server", "_metadata": {"x": 1}
            }));
            assert_eq!(message.kind(), kind);
            assert_eq!(message.common().extra["channel"], json!("server"));
            let back = serde_json::to_value(&message).expect("serializes");
            assert_eq!(back["type"], json!(kind.as_str()));
            assert_eq!(back["_metadata"], json!({"x": 1}));
        }
    }

    #[test]
    fn into_value_is_what_serialize_gives() {
        let common = json!({"messageId": "m1", "anonymousId": "a1", "userId": "u1",
            "timestamp": "2026-11-29T12:00:00.123Z", "originalTimestamp": "2026-11-29T11:59:59Z",
            "sentAt": "2026-11-29T12:00:01Z", "receivedAt": "2026-11-29T12:00:02Z",
            "context": {"locale": "fr-FR", "n": 1.5}, "integrations": {"All": false},
            "custom": [1, "two", null]});
        let specific = [
            json!({"type": "track", "event": "Signed Up", "properties": {"plan": "pro"}}),
            json!({"type": "track"}),
            json!({"type": "identify", "traits": {"email": "a@b.c"}}),
            json!({"type": "page", "name": "Home", "properties": {"path": "/"}}),
            json!({"type": "screen", "name": "Home", "properties": {}}),
            json!({"type": "group", "groupId": "g1", "traits": {"plan": "team"}}),
            json!({"type": "alias", "previousId": "p1"}),
        ];
        for fields in specific {
            let mut value = common.clone();
            for (key, field) in fields.as_object().expect("object") {
                value[key] = field.clone();
            }
            let message = parse(value);
            let serialized = serde_json::to_value(&message).expect("serializes");
            assert_eq!(message.clone().into_value(), serialized);
            // Only what was set: a bare message has no empty keys.
            let bare = parse(json!({"type": message.kind().as_str(), "userId": "u"}));
            assert_eq!(
                bare.clone().into_value(),
                serde_json::to_value(&bare).expect("ok")
            );
        }
    }

    #[test]
    fn round_trips_fields_in_camel_case() {
        let input = json!({
            "type": "track", "event": "Order Completed", "messageId": "m1",
            "anonymousId": "a1", "timestamp": "2024-05-01T10:00:00.5Z",
            "sentAt": "2024-05-01T10:00:01Z", "properties": {"total": 9.5},
            "context": {"library": {"name": "x"}}, "integrations": {"All": true}
        });
        let message = parse(input.clone());
        assert_eq!(serde_json::to_value(&message).expect("serializes"), input);
    }

    #[test]
    fn numeric_ids_become_strings() {
        let message = parse(json!({"type": "alias", "userId": 42, "previousId": 7}));
        let Message::Alias(alias) = message else {
            panic!("not an alias")
        };
        assert_eq!(alias.common.user_id.as_deref(), Some("42"));
        assert_eq!(alias.previous_id.as_deref(), Some("7"));
    }

    #[test]
    fn rejects_bad_timestamps_and_types() {
        let bad = [
            json!({"type": "track", "event": "E", "userId": "u", "timestamp": "yesterday"}),
            json!({"type": "track", "event": "E", "userId": "u", "timestamp": 5}),
            json!({"type": "track", "event": ["E"], "userId": "u"}),
            json!({"type": "click", "userId": "u"}),
            json!({"userId": "u"}),
        ];
        for value in bad {
            assert!(
                serde_json::from_value::<Message>(value.clone()).is_err(),
                "{value} should not parse"
            );
        }
    }

    #[test]
    fn validation_rules_per_type() {
        let cases = [
            (
                json!({"type": "track", "event": "E"}),
                Some("missing_identity"),
            ),
            (
                json!({"type": "track", "event": "E", "userId": " "}),
                Some("missing_identity"),
            ),
            (
                json!({"type": "track", "userId": "u"}),
                Some("missing_event"),
            ),
            (
                json!({"type": "track", "event": "", "userId": "u"}),
                Some("missing_event"),
            ),
            (
                json!({"type": "group", "userId": "u"}),
                Some("missing_group_id"),
            ),
            (
                json!({"type": "alias", "userId": "u"}),
                Some("missing_previous_id"),
            ),
            (
                json!({"type": "identify", "userId": "u", "messageId": "m".repeat(101)}),
                Some("message_id_too_long"),
            ),
            (
                json!({"type": "identify", "anonymousId": "a", "messageId": "m".repeat(100)}),
                None,
            ),
            (json!({"type": "page", "anonymousId": "a"}), None),
            (json!({"type": "screen", "userId": "u"}), None),
        ];
        for (value, expected) in cases {
            let got = parse(value.clone()).validate().err().map(|e| e.code);
            assert_eq!(got, expected, "{value}");
        }
    }

    /// `levels` objects nested in each other: `{"a": {"a": ... 1}}`.
    fn nested(levels: usize) -> Value {
        (0..levels).fold(json!(1), |inner, _| json!({ "a": inner }))
    }

    #[test]
    fn nesting_is_limited_counting_the_event_itself() {
        // The event is level 1, so a field may hold `MAX_EVENT_DEPTH - 1` levels.
        let fits = MAX_EVENT_DEPTH - 1;
        for field in ["properties", "context", "custom"] {
            let at = |levels: usize| {
                let mut value = json!({"type": "track", "event": "E", "userId": "u"});
                value[field] = nested(levels);
                parse(value).validate().err().map(|e| e.code)
            };
            assert_eq!(at(fits), None, "{field} at the limit");
            assert_eq!(at(fits + 1), Some("too_deep"), "{field} over the limit");
        }
        let arrays = (0..MAX_EVENT_DEPTH - 2).fold(json!([]), |inner, _| json!([inner]));
        let deep = parse(json!({"type": "identify", "userId": "u", "traits": {"a": arrays}}));
        assert_eq!(deep.validate().err().map(|e| e.code), Some("too_deep"));
    }

    #[test]
    fn batch_defaults_fill_only_missing_keys() {
        let mut message = parse(json!({
            "type": "track", "event": "E", "userId": "u",
            "context": {"ip": "1.1.1.1"}
        }));
        let context = json!({"ip": "2.2.2.2", "library": {"name": "lib"}});
        let integrations = json!({"All": false});
        message.merge_batch_defaults(context.as_object(), integrations.as_object());
        let common = message.common();
        assert_eq!(
            Value::Object(common.context.clone().expect("context")),
            json!({"ip": "1.1.1.1", "library": {"name": "lib"}})
        );
        assert_eq!(
            Value::Object(common.integrations.clone().expect("integrations")),
            json!({"All": false})
        );
    }

    #[test]
    fn message_type_names() {
        for kind in MessageType::ALL {
            assert_eq!(kind.as_str().parse::<MessageType>(), Ok(kind));
        }
        assert!("click".parse::<MessageType>().is_err());
    }
}
