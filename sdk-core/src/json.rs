//! JSON text for the engine, written without serde's serializers.
//!
//! The engine works on `serde_json::Value`s and writes their text with [`to_text`], a
//! small writer that gives exactly what `serde_json::to_string` gives (tested against it
//! below). In the browser, serde_json's serializer and reader would be more than a
//! quarter of the download: there numbers with a fraction are formatted by the page's
//! `JSON.stringify`, and JSON is read by its `JSON.parse` (`parse`, `from_js`). Code that
//! may run in the browser builds values with [`object`] rather than `json!` (whose
//! expressions go through serde's serializer).

use std::fmt::Write as _;

use serde_json::{Map, Number, Value};

/// An object of these keys and values, in one call (no serde serializer involved).
pub fn object<const N: usize>(pairs: [(&str, Value); N]) -> Value {
    let mut map = Map::new();
    for (key, value) in pairs {
        map.insert(key.to_owned(), value);
    }
    Value::Object(map)
}

/// The JSON text of `value`: what `serde_json::to_string` writes (numbers aside, in the
/// browser, where the page formats them).
pub fn to_text(value: &Value) -> String {
    let mut out = String::new();
    write_value(value, &mut out);
    out
}

fn write_value(value: &Value, out: &mut String) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => write_number(n, out),
        Value::String(s) => write_string(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_value(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (key, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(key, out);
                out.push(':');
                write_value(item, out);
            }
            out.push('}');
        }
    }
}

fn write_string(s: &str, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push('"');
    // Runs without escapes are copied whole. Every escaped byte is ASCII, so the runs
    // split at char boundaries (`get` rather than indexing: no panic code in the
    // download for a case that cannot happen).
    let mut run = 0;
    for (i, byte) in s.bytes().enumerate() {
        let escape = match byte {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0..0x20 => "",
            _ => continue,
        };
        out.push_str(s.get(run..i).unwrap_or_default());
        run = i + 1;
        if escape.is_empty() {
            out.push_str("\\u00");
            out.push(char::from(HEX[usize::from(byte >> 4)]));
            out.push(char::from(HEX[usize::from(byte & 0xf)]));
        } else {
            out.push_str(escape);
        }
    }
    out.push_str(s.get(run..).unwrap_or_default());
    out.push('"');
}

fn write_number(n: &Number, out: &mut String) {
    if let Some(i) = n.as_i64() {
        let _ = write!(out, "{i}"); // writing to a String cannot fail
    } else if let Some(u) = n.as_u64() {
        let _ = write!(out, "{u}");
    } else {
        write_float(n, out);
    }
}

#[cfg(not(target_arch = "wasm32"))]
fn write_float(n: &Number, out: &mut String) {
    out.push_str(&n.to_string());
}

/// Through the page's `JSON.stringify`: float formatting is kilobytes of tables in Rust.
#[cfg(target_arch = "wasm32")]
fn write_float(n: &Number, out: &mut String) {
    let text = js_sys::JSON::stringify(&n.as_f64().unwrap_or_default().into())
        .ok()
        .and_then(|text| text.as_string());
    out.push_str(text.as_deref().unwrap_or("null"));
}

#[cfg(target_arch = "wasm32")]
pub use browser::{from_js, message, parse};

/// Values to and from JS.
#[cfg(target_arch = "wasm32")]
mod browser {
    use js_sys::{Array, JSON, Object, Reflect};
    use serde_json::{Map, Number, Value};
    use wasm_bindgen::{JsCast, JsValue};

    /// Integers JS numbers hold exactly; within them a whole number stays an integer
    /// (`1`, not `1.0`), as serde_json's own parser would give it.
    const MAX_SAFE_INTEGER: f64 = 9_007_199_254_740_991.0;

    /// `value` as JSON: through `JSON.stringify` (which applies `toJSON`, drops
    /// functions and `undefined`, and refuses cycles and BigInt) and back, so only plain
    /// data is read.
    ///
    /// # Errors
    ///
    /// What `JSON.stringify` threw, or that it gave nothing (for a function).
    pub fn from_js(value: &JsValue) -> Result<Value, String> {
        let text = JSON::stringify(value).map_err(|e| message(&e))?;
        let text = text
            .as_string()
            .ok_or_else(|| "it is not a JSON value".to_owned())?;
        parse(&text).ok_or_else(|| "it is not a JSON value".to_owned())
    }

    /// `text` parsed by the page's `JSON.parse`, or `None` when it is not JSON.
    pub fn parse(text: &str) -> Option<Value> {
        JSON::parse(text).ok().map(|v| plain(&v))
    }

    /// A value as `JSON.parse` makes them: strings, numbers, booleans, null, arrays
    /// and plain objects.
    fn plain(value: &JsValue) -> Value {
        if let Some(s) = value.as_string() {
            Value::String(s)
        } else if let Some(b) = value.as_bool() {
            Value::Bool(b)
        } else if let Some(n) = value.as_f64() {
            number(n)
        } else if Array::is_array(value) {
            Value::Array(
                value
                    .unchecked_ref::<Array>()
                    .iter()
                    .map(|v| plain(&v))
                    .collect(),
            )
        } else if value.is_object() {
            let mut map = Map::new();
            for key in Object::keys(value.unchecked_ref::<Object>()).iter() {
                if let (Some(name), Ok(v)) = (key.as_string(), Reflect::get(value, &key)) {
                    map.insert(name, plain(&v));
                }
            }
            Value::Object(map)
        } else {
            Value::Null
        }
    }

    fn number(n: f64) -> Value {
        if n.fract() == 0.0 && n.abs() <= MAX_SAFE_INTEGER {
            // Exact: a whole number within ±2^53 fits an i64.
            Value::from(n as i64)
        } else {
            Number::from_f64(n).map_or(Value::Null, Value::Number)
        }
    }

    /// The message of a thrown JS value.
    pub fn message(error: &JsValue) -> String {
        error
            .as_string()
            .or_else(|| Reflect::get(error, &"message".into()).ok()?.as_string())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn writes_what_serde_json_writes() {
        let values = [
            json!(null),
            json!({"a": [1, -2, 3.5, 1e300, -0.0, u64::MAX, i64::MIN], "b": {"c": true, "d": false}}),
            json!(
                "quote \" backslash \\ slash / newline \n tab \t cr \r bell \u{7} \u{8}\u{c}\u{1f}"
            ),
            json!({"é": "日本語 🎉", "": [], "x": {}}),
            json!(0.1),
            json!(18.99),
        ];
        for value in values {
            assert_eq!(
                to_text(&value),
                serde_json::to_string(&value).expect("text")
            );
        }
    }

    fn any_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            any::<String>().prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
                prop::collection::btree_map(any::<String>(), inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn any_value_writes_as_serde_json_does(value in any_value()) {
            prop_assert_eq!(to_text(&value), serde_json::to_string(&value).expect("text"));
        }
    }
}
