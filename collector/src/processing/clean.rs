//! Cleaning, built in and on by default: strings trimmed, emails lower-cased and
//! validated, phone numbers normalised to E.164, timestamps in traits and properties
//! normalised to UTC, junk values ("", "null", "undefined", "N/A") removed from traits.
//!
//! Every change is recorded as a [`Change`] (field and rule), which the processing stage
//! writes to the stored event's `context.kith.cleaned`. A value that stays invalid after
//! cleaning (an email without a domain, a number that is no phone number) fails the
//! event, or is removed, by [`Cleaning::on_invalid`].

use jiff::Timestamp;
use phonenumber::country;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::path::FieldPath;

/// What to do with a value that is invalid after cleaning.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnInvalid {
    /// The event goes to the failed-events store with the reason.
    #[default]
    Fail,
    /// The field is removed and the event goes on.
    Remove,
}

/// A source's cleaning settings. Every rule is on by default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Cleaning {
    /// Trim whitespace from ids, names, and strings in traits and properties.
    pub trim: bool,
    /// Lower-case and validate the email fields.
    pub emails: bool,
    /// Normalise the phone fields to E.164.
    pub phones: bool,
    /// Region for phone numbers written without a country code (ISO 3166 code, such as
    /// "US" or "GB"); without it such numbers are invalid.
    pub default_region: Option<String>,
    /// Rewrite timestamps with an offset in traits and properties to UTC.
    pub timestamps: bool,
    /// Trait values removed as junk (compared case-insensitively, after trimming).
    pub junk_values: Vec<String>,
    /// The fields holding emails.
    pub email_fields: Vec<FieldPath>,
    /// The fields holding phone numbers.
    pub phone_fields: Vec<FieldPath>,
    /// What happens to an invalid email or phone number.
    pub on_invalid: OnInvalid,
}

impl Default for Cleaning {
    fn default() -> Self {
        let fields = |name: &str| {
            ["traits", "context.traits", "properties"]
                .iter()
                .map(|parent| FieldPath::of(&format!("{parent}.{name}")))
                .collect()
        };
        Cleaning {
            trim: true,
            emails: true,
            phones: true,
            default_region: None,
            timestamps: true,
            junk_values: ["", "null", "undefined", "N/A"].map(str::to_owned).to_vec(),
            email_fields: fields("email"),
            phone_fields: fields("phone"),
            on_invalid: OnInvalid::Fail,
        }
    }
}

/// One change cleaning made, as recorded on the event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// The field, as a dot path.
    pub field: String,
    /// The rule: `trim`, `email`, `phone`, `timestamp`, `junk` or `invalid_removed`.
    pub rule: &'static str,
}

/// Top-level string fields that are trimmed.
const TRIMMED_FIELDS: [&str; 6] = [
    "userId",
    "anonymousId",
    "event",
    "name",
    "groupId",
    "previousId",
];
/// Objects whose strings are trimmed and timestamps normalised.
const FREE_FORM: [&str; 3] = ["traits", "context.traits", "properties"];
/// Objects whose junk values are removed.
const TRAIT_OBJECTS: [&str; 2] = ["traits", "context.traits"];

impl Cleaning {
    /// Checks settings that serde cannot: the default region is a known one.
    pub fn validate(&self) -> Result<(), String> {
        self.region().map(drop)
    }

    fn region(&self) -> Result<Option<country::Id>, String> {
        self.default_region
            .as_deref()
            .map(|code| {
                code.parse::<country::Id>()
                    .map_err(|_| format!("default_region {code:?} is not an ISO 3166 region code"))
            })
            .transpose()
    }

    /// Cleans `message` in place and answers what changed, or why it is invalid.
    pub fn apply(&self, message: &mut Value) -> Result<Vec<Change>, String> {
        let mut changes = Vec::new();
        if self.trim {
            for field in TRIMMED_FIELDS {
                if let Some(value) = message.get_mut(field) {
                    each_string(value, field, &trim, &mut changes);
                }
            }
        }
        for object in FREE_FORM {
            let path = FieldPath::of(object);
            let Some(value) = path.get_mut(message) else {
                continue;
            };
            if self.trim {
                each_string(value, object, &trim, &mut changes);
            }
            if self.timestamps {
                each_string(value, object, &to_utc, &mut changes);
            }
            if TRAIT_OBJECTS.contains(&object)
                && let Some(traits) = value.as_object_mut()
            {
                self.remove_junk(traits, object, &mut changes);
            }
        }
        if self.emails {
            for field in &self.email_fields {
                self.normalise(message, field, "email", normalise_email, &mut changes)?;
            }
        }
        if self.phones {
            let region = self.region()?;
            for field in &self.phone_fields {
                self.normalise(
                    message,
                    field,
                    "phone",
                    |value| normalise_phone(value, region),
                    &mut changes,
                )?;
            }
        }
        Ok(changes)
    }

    fn remove_junk(
        &self,
        traits: &mut Map<String, Value>,
        object: &str,
        changes: &mut Vec<Change>,
    ) {
        traits.retain(|key, value| {
            let junk = value.as_str().is_some_and(|s| {
                self.junk_values
                    .iter()
                    .any(|junk| junk.eq_ignore_ascii_case(s.trim()))
            });
            if junk {
                changes.push(Change {
                    field: format!("{object}.{key}"),
                    rule: "junk",
                });
            }
            !junk
        });
    }

    fn normalise(
        &self,
        message: &mut Value,
        field: &FieldPath,
        rule: &'static str,
        normalise: impl Fn(&Value) -> Result<String, String>,
        changes: &mut Vec<Change>,
    ) -> Result<(), String> {
        let Some(value) = field.get_mut(message) else {
            return Ok(());
        };
        match normalise(value) {
            Ok(clean) => {
                if value.as_str() != Some(clean.as_str()) {
                    *value = Value::String(clean);
                    changes.push(Change {
                        field: field.to_string(),
                        rule,
                    });
                }
                Ok(())
            }
            Err(why) => match self.on_invalid {
                OnInvalid::Fail => Err(format!("{field}: {why}")),
                OnInvalid::Remove => {
                    field.take(message);
                    changes.push(Change {
                        field: field.to_string(),
                        rule: "invalid_removed",
                    });
                    Ok(())
                }
            },
        }
    }
}

/// Calls `rule` on every string in `value` (objects and arrays walked, `path` extended
/// by key or index); `rule` answers its name when it changed the string.
fn each_string(
    value: &mut Value,
    path: &str,
    rule: &impl Fn(&mut String) -> Option<&'static str>,
    changes: &mut Vec<Change>,
) {
    match value {
        Value::String(s) => {
            if let Some(rule) = rule(s) {
                changes.push(Change {
                    field: path.to_owned(),
                    rule,
                });
            }
        }
        Value::Object(object) => {
            for (key, value) in object {
                each_string(value, &format!("{path}.{key}"), rule, changes);
            }
        }
        Value::Array(items) => {
            for (i, value) in items.iter_mut().enumerate() {
                each_string(value, &format!("{path}.{i}"), rule, changes);
            }
        }
        _ => {}
    }
}

fn trim(s: &mut String) -> Option<&'static str> {
    let trimmed = s.trim();
    if trimmed.len() == s.len() {
        return None;
    }
    *s = trimmed.to_owned();
    Some("trim")
}

/// Rewrites an RFC 3339 timestamp with a non-UTC offset to UTC.
fn to_utc(s: &mut String) -> Option<&'static str> {
    let looks_like_a_timestamp = s.len() >= 20 && s.as_bytes()[4] == b'-';
    if !looks_like_a_timestamp || s.ends_with(['Z', 'z']) {
        return None;
    }
    let timestamp = s.parse::<Timestamp>().ok()?;
    *s = timestamp.to_string();
    Some("timestamp")
}

/// Lower-cases and checks an email address: one `@`, a local part, and a domain of
/// dot-separated labels of letters, digits and hyphens, with no spaces anywhere.
fn normalise_email(value: &Value) -> Result<String, String> {
    let Some(raw) = value.as_str() else {
        return Err(format!("{value} is not a string, so not an email address"));
    };
    let email = raw.trim().to_lowercase();
    let invalid = || Err(format!("{raw:?} is not a valid email address"));
    let Some((local, domain)) = email.split_once('@') else {
        return invalid();
    };
    let labels: Vec<&str> = domain.split('.').collect();
    let label_ok = |label: &&str| {
        !label.is_empty()
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label.chars().all(|c| c.is_alphanumeric() || c == '-')
    };
    if local.is_empty()
        || local.len() > 64
        || local
            .chars()
            .any(|c| c.is_whitespace() || c == '@' || c.is_control())
        || labels.len() < 2
        || !labels.iter().all(label_ok)
    {
        return invalid();
    }
    Ok(email)
}

/// Parses a phone number (with `region` for numbers without a country code) and
/// answers it in E.164 (`+14155550123`).
fn normalise_phone(value: &Value, region: Option<country::Id>) -> Result<String, String> {
    let raw = match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        other => return Err(format!("{other} is not a phone number")),
    };
    let number = phonenumber::parse(region, raw.trim())
        .map_err(|_| format!("{raw:?} is not a phone number"))?;
    if !phonenumber::is_valid(&number) {
        return Err(format!("{raw:?} is not a valid phone number"));
    }
    Ok(number.format().mode(phonenumber::Mode::E164).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn clean(cleaning: &Cleaning, mut message: Value) -> (Value, Vec<(String, &'static str)>) {
        let changes = cleaning.apply(&mut message).expect("valid");
        let changes = changes.into_iter().map(|c| (c.field, c.rule)).collect();
        (message, changes)
    }

    fn with_region(region: &str) -> Cleaning {
        Cleaning {
            default_region: Some(region.to_owned()),
            ..Cleaning::default()
        }
    }

    #[test]
    fn strings_are_trimmed_everywhere_they_are_free_text() {
        let (message, changes) = clean(
            &Cleaning::default(),
            json!({"type": "track", "event": " Signed Up ", "userId": "u1\n",
                   "properties": {"plan": " pro", "tags": [" a "], "n": 3, "ok": "x"},
                   "context": {"ip": " 1.2.3.4 "}}),
        );
        assert_eq!(message["event"], "Signed Up");
        assert_eq!(message["userId"], "u1");
        assert_eq!(
            message["properties"],
            json!({"plan": "pro", "tags": ["a"], "n": 3, "ok": "x"})
        );
        assert_eq!(
            message["context"]["ip"], " 1.2.3.4 ",
            "context outside traits is left alone"
        );
        assert_eq!(
            changes,
            [
                ("userId".to_owned(), "trim"),
                ("event".to_owned(), "trim"),
                ("properties.plan".to_owned(), "trim"),
                ("properties.tags.0".to_owned(), "trim"),
            ]
        );
    }

    #[test]
    fn emails_are_lower_cased_and_invalid_ones_fail_or_are_removed() {
        let (message, changes) = clean(
            &Cleaning::default(),
            json!({"traits": {"email": " Ann@Example.COM "}}),
        );
        assert_eq!(message["traits"]["email"], "ann@example.com");
        assert!(changes.contains(&("traits.email".to_owned(), "email")));

        for bad in [
            json!("ann"),
            json!("ann@"),
            json!("@example.com"),
            json!("ann@example"),
            json!("an n@example.com"),
            json!("ann@exa_mple.com"),
            json!("ann@@example.com"),
            json!("ann@-example.com"),
            json!(42),
            json!({"email": "x"}),
        ] {
            let mut message = json!({"traits": {"email": bad.clone()}});
            let error = Cleaning::default()
                .apply(&mut message)
                .expect_err(&format!("{bad} is not an email"));
            assert!(error.starts_with("traits.email: "), "{error}");

            let remove = Cleaning {
                on_invalid: OnInvalid::Remove,
                ..Cleaning::default()
            };
            let (message, changes) = clean(&remove, json!({"traits": {"email": bad, "a": 1}}));
            assert_eq!(message["traits"], json!({"a": 1}));
            assert_eq!(changes, [("traits.email".to_owned(), "invalid_removed")]);
        }
    }

    #[test]
    fn phone_numbers_become_e164_with_the_default_region() {
        let (message, changes) = clean(
            &with_region("US"),
            json!({"traits": {"phone": "(415) 555-2671"},
                   "properties": {"phone": "+44 20 7946 0958"},
                   "context": {"traits": {"phone": 4155552671_u64}}}),
        );
        assert_eq!(message["traits"]["phone"], "+14155552671");
        assert_eq!(message["properties"]["phone"], "+442079460958");
        assert_eq!(message["context"]["traits"]["phone"], "+14155552671");
        assert_eq!(changes.len(), 3);

        let (already, changes) = clean(
            &with_region("US"),
            json!({"traits": {"phone": "+14155552671"}}),
        );
        assert_eq!(already["traits"]["phone"], "+14155552671");
        assert!(changes.is_empty(), "an E.164 number is left as it is");

        // Without a default region, a national number cannot be placed.
        let mut national = json!({"traits": {"phone": "(415) 555-2671"}});
        assert!(Cleaning::default().apply(&mut national).is_err());
        for bad in [
            json!("12"),
            json!("not a phone"),
            json!("+1 000"),
            json!(true),
        ] {
            let mut message = json!({"traits": {"phone": bad}});
            let error = with_region("US")
                .apply(&mut message)
                .expect_err("invalid phone");
            assert!(error.starts_with("traits.phone: "), "{error}");
        }
        assert!(with_region("XX").validate().is_err());
        assert!(with_region("GB").validate().is_ok());
    }

    #[test]
    fn timestamps_with_offsets_become_utc() {
        let (message, changes) = clean(
            &Cleaning::default(),
            json!({"traits": {"createdAt": "2024-03-01T10:00:00+02:00",
                              "utc": "2024-03-01T08:00:00Z", "word": "2024-03-01 and more"},
                   "properties": {"at": ["2024-03-01T01:30:00-05:30"]}}),
        );
        assert_eq!(message["traits"]["createdAt"], "2024-03-01T08:00:00Z");
        assert_eq!(message["traits"]["utc"], "2024-03-01T08:00:00Z");
        assert_eq!(message["traits"]["word"], "2024-03-01 and more");
        assert_eq!(message["properties"]["at"][0], "2024-03-01T07:00:00Z");
        assert_eq!(
            changes,
            [
                ("traits.createdAt".to_owned(), "timestamp"),
                ("properties.at.0".to_owned(), "timestamp"),
            ]
        );
    }

    #[test]
    fn junk_trait_values_are_removed() {
        let (message, changes) = clean(
            &Cleaning::default(),
            json!({"traits": {"a": "", "b": "null", "c": "Undefined", "d": " n/a ", "e": "ok", "f": null, "g": 0},
                   "properties": {"a": ""}}),
        );
        assert_eq!(message["traits"], json!({"e": "ok", "f": null, "g": 0}));
        assert_eq!(
            message["properties"],
            json!({"a": ""}),
            "junk is removed from traits only"
        );
        assert_eq!(changes.iter().filter(|c| c.1 == "junk").count(), 4);
    }

    #[test]
    fn each_rule_can_be_turned_off() {
        let off = Cleaning {
            trim: false,
            emails: false,
            phones: false,
            timestamps: false,
            junk_values: Vec::new(),
            ..Cleaning::default()
        };
        let input = json!({"userId": " u ", "traits": {"email": "NOPE", "phone": "x", "a": "",
                                                        "t": "2024-03-01T10:00:00+02:00"}});
        let (message, changes) = clean(&off, input.clone());
        assert_eq!(message, input);
        assert!(changes.is_empty());
        let bad: Result<Cleaning, _> = serde_json::from_value(json!({"trim": true, "unknown": 1}));
        assert!(
            bad.expect_err("unknown key")
                .to_string()
                .contains("unknown")
        );
    }
}
