//! Dot paths into a message, such as `properties.price` or `context.traits.email`: how
//! cleaning rules, transformations and conditions name the field they act on.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Top-level fields the pipeline relies on, which no transformation may write.
const PROTECTED: [&str; 3] = ["type", "messageId", "receivedAt"];

/// The most keys a path has: well within the nesting an event may have.
pub const MAX_PATH_KEYS: usize = 16;

/// A path of object keys into a message. Keys cannot contain dots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct FieldPath(Vec<String>);

impl TryFrom<String> for FieldPath {
    type Error = String;

    fn try_from(path: String) -> Result<Self, String> {
        let keys: Vec<String> = path.split('.').map(str::to_owned).collect();
        if keys.iter().any(String::is_empty) {
            return Err(format!(
                "{path:?} is not a field path (keys separated by dots, such as \"properties.price\")"
            ));
        }
        if keys.len() > MAX_PATH_KEYS {
            return Err(format!(
                "a field path has at most {MAX_PATH_KEYS} keys; this one has {}",
                keys.len()
            ));
        }
        Ok(FieldPath(keys))
    }
}

impl From<FieldPath> for String {
    fn from(path: FieldPath) -> String {
        path.to_string()
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join("."))
    }
}

impl FieldPath {
    /// Parses a path written in code.
    ///
    /// # Panics
    ///
    /// When `path` is not a path; only for literals.
    pub fn of(path: &str) -> Self {
        #[allow(clippy::expect_used)]
        FieldPath::try_from(path.to_owned()).expect("a literal field path")
    }

    /// An error when a transformation may not write to this path.
    pub fn check_writable(&self) -> Result<(), String> {
        if self.0.len() == 1 && PROTECTED.contains(&self.0[0].as_str()) {
            return Err(format!(
                "{self} is set by the collector and cannot be changed by a transformation"
            ));
        }
        Ok(())
    }

    /// The value at this path.
    pub fn get<'a>(&self, message: &'a Value) -> Option<&'a Value> {
        self.0.iter().try_fold(message, |value, key| value.get(key))
    }

    fn parent_mut<'a>(&self, message: &'a mut Value) -> Option<&'a mut Map<String, Value>> {
        let (_, parents) = self.0.split_last()?;
        parents
            .iter()
            .try_fold(message, |value, key| value.get_mut(key))?
            .as_object_mut()
    }

    /// The value at this path, to change in place.
    pub fn get_mut<'a>(&self, message: &'a mut Value) -> Option<&'a mut Value> {
        self.0
            .iter()
            .try_fold(message, |value, key| value.get_mut(key))
    }

    /// Removes and answers the value at this path.
    pub fn take(&self, message: &mut Value) -> Option<Value> {
        let last = self.0.last()?;
        self.parent_mut(message)?.remove(last)
    }

    /// Sets the value at this path, creating the objects on the way. Answers an error
    /// when a value on the way is not an object.
    pub fn set(&self, message: &mut Value, new: Value) -> Result<(), String> {
        let Some((last, parents)) = self.0.split_last() else {
            return Ok(());
        };
        let mut current = message;
        for key in parents {
            let object = current
                .as_object_mut()
                .ok_or_else(|| format!("cannot set {self}: {key:?} is inside a non-object"))?;
            current = object
                .entry(key.clone())
                .or_insert_with(|| Value::Object(Map::new()));
        }
        current
            .as_object_mut()
            .ok_or_else(|| format!("cannot set {self}: its parent is not an object"))?
            .insert(last.clone(), new);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn paths_read_write_and_remove() {
        let mut message = json!({"properties": {"price": 3, "tags": ["a"]}, "event": "E"});
        let price = FieldPath::of("properties.price");
        assert_eq!(price.get(&message), Some(&json!(3)));
        assert_eq!(FieldPath::of("properties.nope.deeper").get(&message), None);
        FieldPath::of("context.page.url")
            .set(&mut message, json!("u"))
            .expect("set creates parents");
        assert_eq!(message["context"]["page"]["url"], "u");
        assert_eq!(price.take(&mut message), Some(json!(3)));
        assert_eq!(price.get(&message), None);
        let error = FieldPath::of("event.x")
            .set(&mut message, json!(1))
            .expect_err("event is a string");
        assert!(error.contains("event.x"), "{error}");
    }

    #[test]
    fn bad_and_protected_paths_are_refused() {
        assert!(FieldPath::try_from("a..b".to_owned()).is_err());
        assert!(FieldPath::try_from(String::new()).is_err());
        assert!(FieldPath::of("messageId").check_writable().is_err());
        assert!(FieldPath::of("type").check_writable().is_err());
        assert!(FieldPath::of("properties.type").check_writable().is_ok());
        let parsed: FieldPath = serde_json::from_value(json!("traits.email")).expect("parses");
        assert_eq!(
            serde_json::to_value(&parsed).expect("json"),
            json!("traits.email")
        );
    }
}
