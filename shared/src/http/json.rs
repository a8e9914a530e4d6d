//! JSON request bodies with the field a problem is about named in the answer.
//!
//! The body is read as JSON first (a syntax error is about `body`), then the request type is
//! deserialized from that value through [`ValueDeserializer`], whose error type keeps what serde
//! reports structurally: a missing field's name, an unknown field's name. Together with the path
//! [`serde_path_to_error`] tracks, every problem names its field without reading it back out of
//! a message.

use std::fmt;

use serde::de::value::{MapAccessDeserializer, MapDeserializer, SeqDeserializer};
use serde::de::{self, DeserializeOwned, IntoDeserializer, Visitor};
use serde_json::Value;

use super::ApiError;

/// Parses a JSON body; a problem is a 400 naming the field (`body` when it is not JSON).
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid("body", format!("not valid JSON: {e}")))?;
    serde_path_to_error::deserialize(ValueDeserializer(value)).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let field = match (&inner, path.as_str()) {
            (FieldError::Missing(name), "." | "") => (*name).to_owned(),
            (FieldError::Unknown(name, _), "." | "") => name.clone(),
            (_, "." | "") => "body".to_owned(),
            // A missing or unknown field inside an element names the element, as serde does.
            (_, path) => path.to_owned(),
        };
        ApiError::invalid(field, inner)
    })
}

/// Like [`parse`], but an empty body means `{}`.
pub fn parse_or_default<T: DeserializeOwned + Default>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        Ok(T::default())
    } else {
        parse(body)
    }
}

/// A deserialization error that remembers which field a missing or unknown field error is
/// about. Messages are serde's own.
#[derive(Debug)]
enum FieldError {
    Missing(&'static str),
    Unknown(String, String),
    Other(String),
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FieldError::Missing(name) => write!(f, "missing field `{name}`"),
            FieldError::Unknown(_, message) | FieldError::Other(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for FieldError {}

impl de::Error for FieldError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        FieldError::Other(msg.to_string())
    }

    fn missing_field(field: &'static str) -> Self {
        FieldError::Missing(field)
    }

    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        // serde's wording ("unknown field `x`, expected one of ..."), from its plain error type.
        let message = <de::value::Error as de::Error>::unknown_field(field, expected).to_string();
        FieldError::Unknown(field.to_owned(), message)
    }
}

/// A [`Value`] as a deserializer with [`FieldError`] errors.
struct ValueDeserializer(Value);

impl<'de> IntoDeserializer<'de, FieldError> for ValueDeserializer {
    type Deserializer = Self;

    fn into_deserializer(self) -> Self {
        self
    }
}

impl<'de> de::Deserializer<'de> for ValueDeserializer {
    type Error = FieldError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, FieldError> {
        match self.0 {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(b),
            Value::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
                (Some(u), _, _) => visitor.visit_u64(u),
                (_, Some(i), _) => visitor.visit_i64(i),
                (_, _, Some(f)) => visitor.visit_f64(f),
                _ => Err(de::Error::custom("a number out of range")),
            },
            Value::String(s) => visitor.visit_string(s),
            Value::Array(items) => {
                let mut seq = SeqDeserializer::new(items.into_iter().map(ValueDeserializer));
                let v = visitor.visit_seq(&mut seq)?;
                seq.end()?;
                Ok(v)
            }
            Value::Object(map) => {
                let mut map =
                    MapDeserializer::new(map.into_iter().map(|(k, v)| (k, ValueDeserializer(v))));
                let v = visitor.visit_map(&mut map)?;
                map.end()?;
                Ok(v)
            }
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, FieldError> {
        match self.0 {
            Value::Null => visitor.visit_none(),
            other => visitor.visit_some(ValueDeserializer(other)),
        }
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, FieldError> {
        match self.0 {
            Value::String(s) => visitor.visit_enum(s.into_deserializer()),
            Value::Object(map) => visitor.visit_enum(MapAccessDeserializer::new(
                MapDeserializer::new(map.into_iter().map(|(k, v)| (k, ValueDeserializer(v)))),
            )),
            other => ValueDeserializer(other).deserialize_any(visitor),
        }
    }

    /// A struct is read from a JSON object only (serde would also take an array of its fields
    /// in order, which no schema in `openapi.yaml` allows).
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, FieldError> {
        match self.0 {
            Value::Object(_) => self.deserialize_any(visitor),
            _ => Err(de::Error::custom("must be a JSON object")),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, FieldError> {
        visitor.visit_newtype_struct(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        unit unit_struct seq tuple tuple_struct map identifier ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::release::{CutRequest, ProjectSpec, RollbackRequest};

    fn field<T: DeserializeOwned + fmt::Debug>(body: &str) -> String {
        match parse::<T>(body.as_bytes()) {
            Err(ApiError::Invalid { field, .. }) => field.unwrap_or_default(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn json_errors_name_the_field() {
        assert_eq!(field::<CutRequest>(r#"{"branch":"main"}"#), "commit");
        assert_eq!(
            field::<CutRequest>(r#"{"commit":1,"branch":"main"}"#),
            "commit"
        );
        assert_eq!(
            field::<CutRequest>(r#"{"commit":"a","branch":"main","colour":1}"#),
            "colour"
        );
        assert_eq!(
            field::<CutRequest>(r#"{"commit":"a","branch":"main","bump":"huge"}"#),
            "bump"
        );
        assert_eq!(field::<CutRequest>(r#"{"commit":"a","#), "body");
        assert_eq!(
            field::<CutRequest>(r#"{"commit":"a","branch":"m"} x"#),
            "body"
        );
        assert_eq!(
            field::<ProjectSpec>(r#"{"environments":[{"name":"a","requires":1}]}"#),
            "environments[0].requires"
        );
        assert!(parse_or_default::<RollbackRequest>(b"  ").is_ok());
        assert_eq!(field::<RollbackRequest>("[true]"), "body");
        assert_eq!(
            field::<ProjectSpec>(r#"{"build_pipeline":["acme","web"]}"#),
            "build_pipeline"
        );
        assert!(parse::<CutRequest>(br#"{"commit":"a","branch":"m","bump":"minor"}"#).is_ok());
    }

    #[test]
    fn messages_are_serdes() {
        let message = |body: &str| match parse::<CutRequest>(body.as_bytes()) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{body}"),
        };
        assert_eq!(
            message(r#"{"branch":"main"}"#),
            "commit: missing field `commit`"
        );
        assert!(
            message(r#"{"commit":"a","branch":"m","x":1}"#)
                .starts_with("x: unknown field `x`, expected one of `commit`"),
        );
    }
}
