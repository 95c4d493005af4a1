//! Identifiers: `(type, value)` pairs such as `email:ann@example.com`, and how they are
//! read from a Segment message.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The identifier types Kith knows; custom ones come from config.
pub mod kind {
    /// Segment's `userId`.
    pub const USER_ID: &str = "user_id";
    /// Segment's `anonymousId`.
    pub const ANONYMOUS_ID: &str = "anonymous_id";
    /// `traits.email`.
    pub const EMAIL: &str = "email";
    /// `traits.phone`.
    pub const PHONE: &str = "phone";
    /// `context.device.id`.
    pub const DEVICE_ID: &str = "device_id";
}

/// One identifier: its type and its value.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Identifier {
    /// The type (`user_id`, `email`...).
    pub kind: String,
    /// The value.
    pub value: String,
}

impl Identifier {
    /// An identifier of `kind` with `value`.
    pub fn new(kind: impl Into<String>, value: impl Into<String>) -> Self {
        Identifier {
            kind: kind.into(),
            value: value.into(),
        }
    }
}

impl fmt::Display for Identifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

/// Why text is not an identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an identifier: write TYPE:VALUE, such as email:ann@example.com")]
pub struct NotAnIdentifier(pub String);

impl FromStr for Identifier {
    type Err = NotAnIdentifier;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once(':') {
            Some((kind, value)) if !kind.is_empty() && !value.is_empty() => {
                Ok(Identifier::new(kind, value))
            }
            _ => Err(NotAnIdentifier(s.to_owned())),
        }
    }
}

impl TryFrom<String> for Identifier {
    type Error = NotAnIdentifier;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Identifier> for String {
    fn from(id: Identifier) -> String {
        id.to_string()
    }
}

/// A value as identifier text: strings as they are, numbers in decimal; others none.
fn text(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The identifiers a Segment message carries, in this order: `userId`, `anonymousId`,
/// an alias's `previousId` (as an `anonymous_id`: the id a user had before logging in),
/// `context.device.id`, then `email`, `phone` and each trait configured as an identifier
/// (`trait_identifiers`: trait name → type) from `traits` and `context.traits`.
/// Repeats are listed once.
pub fn identifiers_of(message: &Value, trait_identifiers: &[(String, String)]) -> Vec<Identifier> {
    let mut found = Vec::new();
    let mut add = |kind: &str, value: Option<String>| {
        if let Some(value) = value {
            let id = Identifier::new(kind, value);
            if !found.contains(&id) {
                found.push(id);
            }
        }
    };
    add(kind::USER_ID, text(message.get("userId")));
    add(kind::ANONYMOUS_ID, text(message.get("anonymousId")));
    if message.get("type").and_then(Value::as_str) == Some("alias") {
        add(kind::ANONYMOUS_ID, text(message.get("previousId")));
    }
    add(kind::DEVICE_ID, text(message.pointer("/context/device/id")));
    let traits = [message.get("traits"), message.pointer("/context/traits")];
    for traits in traits.into_iter().flatten() {
        add(kind::EMAIL, text(traits.get("email")));
        add(kind::PHONE, text(traits.get("phone")));
        for (name, kind) in trait_identifiers {
            add(kind, text(traits.get(name)));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn identifiers_parse_and_print() {
        let id: Identifier = "email:ann@example.com".parse().expect("parses");
        assert_eq!(id, Identifier::new("email", "ann@example.com"));
        assert_eq!(id.to_string(), "email:ann@example.com");
        let with_colon: Identifier = "user_id:a:b".parse().expect("parses");
        assert_eq!(with_colon.value, "a:b");
        for bad in ["email", ":x", "email:", ""] {
            assert!(bad.parse::<Identifier>().is_err(), "{bad}");
        }
    }

    #[test]
    fn messages_carry_their_identifiers() {
        let identify = json!({"type": "identify", "userId": 42, "anonymousId": "a1",
            "traits": {"email": "ann@example.com", "phone": "+14155552671", "loyalty": "L-9"},
            "context": {"device": {"id": "d1"}}});
        let custom = [("loyalty".to_owned(), "loyalty_id".to_owned())];
        let ids: Vec<String> = identifiers_of(&identify, &custom)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            ids,
            [
                "user_id:42",
                "anonymous_id:a1",
                "device_id:d1",
                "email:ann@example.com",
                "phone:+14155552671",
                "loyalty_id:L-9"
            ]
        );
        let alias = json!({"type": "alias", "userId": "u1", "previousId": "a0"});
        let ids: Vec<String> = identifiers_of(&alias, &[])
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(ids, ["user_id:u1", "anonymous_id:a0"]);
        let track = json!({"type": "track", "anonymousId": "a1", "context": {"traits": {"email": "x@y.z"}},
                           "properties": {"email": "not@an.identifier"}});
        let ids: Vec<String> = identifiers_of(&track, &[])
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(ids, ["anonymous_id:a1", "email:x@y.z"]);
    }
}
