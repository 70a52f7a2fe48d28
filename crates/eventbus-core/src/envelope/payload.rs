//! An envelope's `payload`, kept as the JSON text it came in.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;

/// The `payload` of an [`Envelope`](crate::Envelope): one JSON value, kept as
/// the text it came in and decoded only when the handler asks, straight into
/// the handler's own type.
///
/// Decoding an envelope checks that the payload is well-formed JSON and copies
/// its text; it builds no [`serde_json::Value`]. A handler that wants a typed
/// event decodes once, from the text, with [`Payload::decode`]; one that wants
/// the generic tree asks for `decode::<serde_json::Value>()`.
///
/// ```
/// use eventbus_core::{Envelope, Payload};
/// use serde::Deserialize;
///
/// #[derive(Deserialize)]
/// struct OrderPlaced<'a> {
///     sku: &'a str,
///     quantity: u32,
/// }
///
/// let body = br#"{"aggregate_id":"order-1","event_type":"order.placed",
///                 "payload":{"sku":"A-7","quantity":2}}"#;
/// let envelope = Envelope::decode(body)?;
/// let order: OrderPlaced<'_> = envelope.payload.decode()?;
/// assert_eq!((order.sku, order.quantity), ("A-7", 2));
///
/// // Building one: from a `serde_json::Value`, or from any `Serialize` type.
/// let a = Envelope::new("order-1", "order.placed", serde_json::json!({"sku": "A-7"}));
/// let b = Payload::new(&std::collections::BTreeMap::from([("sku", "A-7")]))?;
/// assert_eq!(a.payload, b);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// Equality is the equality of the JSON values (`{"a":1,"b":2}` equals
/// `{"b":2,"a":1}`); text that reads the same compares without parsing.
///
/// A payload nests arrays and objects at most [`MAX_PAYLOAD_DEPTH`] deep, no
/// deeper than serde_json decodes. Its numbers are checked for form only: a
/// number beyond `f64`'s range (`1e400`) is well-formed JSON and is accepted,
/// and decoding it into a float, or into a `Value`, is the handler's error.
#[derive(Clone)]
pub struct Payload(Box<RawValue>);

/// Deepest nesting of arrays and objects in a payload: serde_json's own
/// recursion limit, so no accepted payload is too deep to decode.
pub const MAX_PAYLOAD_DEPTH: usize = 127;

/// Whether the well-formed JSON `json` nests arrays and objects at most
/// [`MAX_PAYLOAD_DEPTH`] deep. Text with no more opening brackets than that,
/// inside strings or not, is not scanned further.
pub(crate) fn within_depth(json: &str) -> bool {
    let bytes = json.as_bytes();
    if bytes.iter().filter(|&&b| b == b'[' || b == b'{').count() <= MAX_PAYLOAD_DEPTH {
        return true;
    }
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in bytes {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_PAYLOAD_DEPTH {
                    return false;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    true
}

fn too_deep() -> String {
    format!("payload nests arrays and objects deeper than {MAX_PAYLOAD_DEPTH} levels")
}

/// `raw` as a payload, when it is not nested too deep.
fn checked(raw: Box<RawValue>) -> Result<Payload, String> {
    if within_depth(raw.get()) {
        Ok(Payload(raw))
    } else {
        Err(too_deep())
    }
}

impl Payload {
    /// Encode `value` as a payload.
    ///
    /// # Errors
    /// When `value` cannot be written as JSON (a map with non-string keys, say),
    /// or nests deeper than [`MAX_PAYLOAD_DEPTH`].
    pub fn new<T: Serialize + ?Sized>(value: &T) -> Result<Self, serde_json::Error> {
        checked(serde_json::value::to_raw_value(value)?).map_err(serde::ser::Error::custom)
    }

    /// A payload of the JSON text `json`, checked to be one well-formed value.
    ///
    /// # Errors
    /// When `json` is not one JSON value, or nests deeper than [`MAX_PAYLOAD_DEPTH`].
    pub fn from_json(json: impl Into<String>) -> Result<Self, serde_json::Error> {
        checked(RawValue::from_string(json.into())?).map_err(serde::de::Error::custom)
    }

    /// Decode the payload into `T`, borrowing from its text where `T` does.
    ///
    /// # Errors
    /// When the payload does not have the shape of `T`; a handler usually
    /// returns that as a permanent error.
    pub fn decode<'a, T: Deserialize<'a>>(&'a self) -> Result<T, serde_json::Error> {
        serde_json::from_str(self.0.get())
    }

    /// The payload's JSON text, as it came.
    pub fn as_str(&self) -> &str {
        self.0.get()
    }

    /// The payload as serde_json's raw value.
    pub fn as_raw(&self) -> &RawValue {
        &self.0
    }
}

impl Default for Payload {
    /// `null`, the payload of an envelope that has none.
    fn default() -> Self {
        Self::from(serde_json::Value::Null)
    }
}

/// A `Value` nested deeper than [`MAX_PAYLOAD_DEPTH`] converts, and is refused
/// where the envelope is checked ([`Envelope::validate`](crate::Envelope::validate),
/// before any publish).
impl From<serde_json::Value> for Payload {
    fn from(value: serde_json::Value) -> Self {
        // Writing a `Value` cannot fail: its map keys are strings and its
        // numbers finite. Its depth is left to `Envelope::validate`.
        serde_json::value::to_raw_value(&value)
            .map(Self)
            .unwrap_or_else(|_| unreachable!("a serde_json::Value always encodes"))
    }
}

impl PartialEq for Payload {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
            || matches!(
                (
                    self.decode::<serde_json::Value>(),
                    other.decode::<serde_json::Value>(),
                ),
                (Ok(a), Ok(b)) if a == b
            )
    }
}

impl PartialEq<serde_json::Value> for Payload {
    fn eq(&self, other: &serde_json::Value) -> bool {
        self.decode::<serde_json::Value>()
            .is_ok_and(|value| &value == other)
    }
}

impl std::fmt::Debug for Payload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Payload").field(&self.as_str()).finish()
    }
}

impl std::fmt::Display for Payload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Payload {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Payload {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        checked(Box::<RawValue>::deserialize(deserializer)?).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn decodes_into_the_handlers_type_and_into_a_value() {
        #[derive(Deserialize, PartialEq, Debug)]
        struct Line<'a> {
            sku: &'a str,
            qty: u32,
        }
        let p = Payload::from_json(r#"{"sku":"A-7","qty":2,"extra":[1,{"x":null}]}"#).unwrap();
        assert_eq!(p.decode::<Line<'_>>().unwrap(), Line { sku: "A-7", qty: 2 });
        assert_eq!(
            p.decode::<serde_json::Value>().unwrap()["extra"][1],
            json!({"x": null})
        );
        let e = p.decode::<Vec<u32>>().expect_err("an object is not a list");
        assert!(e.to_string().contains("expected a sequence"), "{e}");
    }

    #[test]
    fn compares_as_json_values() {
        let a = Payload::from_json(r#"{"a":1,"b":[true,null]}"#).unwrap();
        let b = Payload::from_json(r#"{ "b" : [true, null], "a" : 1 }"#).unwrap();
        assert_eq!(a, b);
        assert_eq!(a, json!({"b": [true, null], "a": 1}));
        assert_ne!(a, Payload::from_json(r#"{"a":2,"b":[true,null]}"#).unwrap());
        assert_ne!(a, json!({"a": 1}));
        assert_eq!(Payload::default(), json!(null));
        assert_eq!(Payload::from(json!([1, "x"])).as_str(), r#"[1,"x"]"#);
    }

    #[test]
    fn refuses_text_that_is_not_one_json_value() {
        for bad in [
            "",
            "{",
            r#"{"a":1"#,
            "[1,]",
            "1 2",
            "nul",
            "{\"a\":\"\u{1}\"}",
        ] {
            assert!(Payload::from_json(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn nests_no_deeper_than_serde_json_decodes() {
        let nested = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        let deepest = Payload::from_json(nested(MAX_PAYLOAD_DEPTH)).unwrap();
        assert!(deepest.decode::<serde_json::Value>().is_ok());
        assert!(serde_json::from_str::<serde_json::Value>(&nested(MAX_PAYLOAD_DEPTH + 1)).is_err());
        let e = Payload::from_json(nested(MAX_PAYLOAD_DEPTH + 1)).unwrap_err();
        assert!(e.to_string().contains("deeper than 127"), "{e}");
        let e = serde_json::from_str::<Payload>(&nested(10_000)).unwrap_err();
        assert!(e.to_string().contains("deeper than 127"), "{e}");
        // Brackets inside strings, escaped quotes included, are not nesting.
        let text = format!(
            r#"["{}\"{}", {{"a":[1]}}]"#,
            "[".repeat(300),
            "{".repeat(300)
        );
        assert!(Payload::from_json(text).is_ok());
        let mut deep = json!(1);
        for _ in 0..=MAX_PAYLOAD_DEPTH {
            deep = json!([deep]);
        }
        assert!(Payload::new(&deep).is_err());
    }

    #[test]
    fn numbers_are_checked_for_form_not_range() {
        let p = Payload::from_json(r#"{"big":1e400,"n":1}"#).unwrap();
        assert!(
            p.decode::<serde_json::Value>().is_err(),
            "out of f64's range"
        );
        #[derive(Deserialize)]
        struct JustN {
            n: u8,
        }
        assert_eq!(
            p.decode::<JustN>().unwrap().n,
            1,
            "a field not read is not decoded"
        );
        assert!(Payload::from_json("[01]").is_err());
        assert!(Payload::from_json("[1.]").is_err());
    }

    #[test]
    fn serializes_as_the_json_it_holds() {
        let p = Payload::from_json(r#"{"z":1,"a":[2.50,"é"]}"#).unwrap();
        let text = serde_json::to_string(&json!({ "payload": p })).unwrap();
        // Through a `Value` the text is normalised; through the payload itself
        // it is kept byte for byte.
        assert_eq!(text, r#"{"payload":{"a":[2.5,"é"],"z":1}}"#);
        let kept = serde_json::to_string(&p).unwrap();
        assert_eq!(kept, r#"{"z":1,"a":[2.50,"é"]}"#);
        let back: Payload = serde_json::from_str(&kept).unwrap();
        assert_eq!(back.as_str(), p.as_str());
        assert_eq!(format!("{p}"), p.as_str());
    }
}
