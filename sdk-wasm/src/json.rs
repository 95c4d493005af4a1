//! JSON in the browser build: the page's own `JSON.stringify` and `JSON.parse` do the
//! text, and this module only turns the plain values `JSON.parse` gives into
//! `serde_json::Value`s. The download carries no JSON parser of its own (serde_json's,
//! with the float formatting its errors bring, was a fifth of the module).

use js_sys::{Array, JSON, Object, Reflect};
use serde_json::{Map, Number, Value};
use wasm_bindgen::{JsCast, JsValue};

/// Integers JS numbers hold exactly; within them a whole number stays an integer (`1`,
/// not `1.0`), as serde_json's own parser would give it.
const MAX_SAFE_INTEGER: f64 = 9_007_199_254_740_991.0;

/// `value` as JSON: through `JSON.stringify` (which applies `toJSON`, drops functions
/// and `undefined`, and refuses cycles and BigInt) and back, so only plain data is read.
///
/// # Errors
///
/// What `JSON.stringify` threw, or `undefined` when it gives nothing (a function).
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

/// A value as `JSON.parse` makes them: strings, numbers, booleans, null, arrays and
/// plain objects.
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
