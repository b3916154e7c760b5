//! Turns any `Serialize` value (the input document) straight into a regorus value, without the
//! JSON text or `serde_json::Value` tree in between: the per-call handoff to the policy engine.
//! It yields the same value regorus would parse from the value's JSON (tested), so a policy sees
//! exactly the document that `docs/policy-input.md` describes and the decision log records.

use regorus::Value;
use serde::ser::{self, Serialize};
use std::collections::BTreeMap;

/// Why a value has no regorus form (only shapes the input document never has).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ToRegoError(String);

impl ser::Error for ToRegoError {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        ToRegoError(msg.to_string())
    }
}

/// The regorus value of `v`: what `regorus::Value::from_json_str` makes of `v`'s JSON text, for
/// every value whose maps have string keys (others are refused).
pub fn to_rego<T: Serialize + ?Sized>(v: &T) -> Result<Value, ToRegoError> {
    v.serialize(ToRego)
}

/// The serializer: each serde data-model item becomes the regorus value of its JSON form.
struct ToRego;

/// An array under construction.
struct Seq(Vec<Value>);

/// An object under construction: its entries and the key awaiting its value.
struct Map {
    entries: BTreeMap<Value, Value>,
    key: Option<Value>,
}

/// A `{variant: value}` object under construction (externally tagged enum variants).
struct Variant<T> {
    name: &'static str,
    inner: T,
}

fn tagged(name: &'static str, value: Value) -> Value {
    Value::from(BTreeMap::from([(Value::from(name), value)]))
}

/// An integer serializer: the value widened to the 64-bit type regorus takes.
macro_rules! widen {
    ($name:ident, $t:ty, $wide:ty) => {
        fn $name(self, v: $t) -> Result<Value, ToRegoError> {
            Ok(Value::from(<$wide>::from(v)))
        }
    };
}

impl ser::Serializer for ToRego {
    type Ok = Value;
    type Error = ToRegoError;
    type SerializeSeq = Seq;
    type SerializeTuple = Seq;
    type SerializeTupleStruct = Seq;
    type SerializeTupleVariant = Variant<Seq>;
    type SerializeMap = Map;
    type SerializeStruct = Map;
    type SerializeStructVariant = Variant<Map>;

    fn serialize_bool(self, v: bool) -> Result<Value, ToRegoError> {
        Ok(Value::from(v))
    }
    widen!(serialize_i8, i8, i64);
    widen!(serialize_i16, i16, i64);
    widen!(serialize_i32, i32, i64);
    widen!(serialize_i64, i64, i64);
    widen!(serialize_u8, u8, u64);
    widen!(serialize_u16, u16, u64);
    widen!(serialize_u32, u32, u64);
    widen!(serialize_u64, u64, u64);
    fn serialize_f32(self, v: f32) -> Result<Value, ToRegoError> {
        self.serialize_f64(f64::from(v))
    }
    fn serialize_f64(self, v: f64) -> Result<Value, ToRegoError> {
        // JSON has no NaN or infinity; serde_json writes them as null.
        Ok(if v.is_finite() {
            Value::from(v)
        } else {
            Value::Null
        })
    }
    fn serialize_char(self, v: char) -> Result<Value, ToRegoError> {
        Ok(Value::from(v.to_string()))
    }
    fn serialize_str(self, v: &str) -> Result<Value, ToRegoError> {
        Ok(Value::from(v))
    }
    fn serialize_bytes(self, v: &[u8]) -> Result<Value, ToRegoError> {
        Ok(Value::from(
            v.iter()
                .map(|b| Value::from(u64::from(*b)))
                .collect::<Vec<_>>(),
        ))
    }
    fn serialize_none(self) -> Result<Value, ToRegoError> {
        Ok(Value::Null)
    }
    fn serialize_some<T: Serialize + ?Sized>(self, v: &T) -> Result<Value, ToRegoError> {
        v.serialize(self)
    }
    fn serialize_unit(self) -> Result<Value, ToRegoError> {
        Ok(Value::Null)
    }
    fn serialize_unit_struct(self, _: &'static str) -> Result<Value, ToRegoError> {
        Ok(Value::Null)
    }
    fn serialize_unit_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
    ) -> Result<Value, ToRegoError> {
        Ok(Value::from(variant))
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        v: &T,
    ) -> Result<Value, ToRegoError> {
        v.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        v: &T,
    ) -> Result<Value, ToRegoError> {
        Ok(tagged(variant, v.serialize(self)?))
    }
    fn serialize_seq(self, len: Option<usize>) -> Result<Seq, ToRegoError> {
        Ok(Seq(Vec::with_capacity(len.unwrap_or(0))))
    }
    fn serialize_tuple(self, len: usize) -> Result<Seq, ToRegoError> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_struct(self, _: &'static str, len: usize) -> Result<Seq, ToRegoError> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Variant<Seq>, ToRegoError> {
        Ok(Variant {
            name: variant,
            inner: self.serialize_seq(Some(len))?,
        })
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Map, ToRegoError> {
        Ok(Map {
            entries: BTreeMap::new(),
            key: None,
        })
    }
    fn serialize_struct(self, _: &'static str, len: usize) -> Result<Map, ToRegoError> {
        self.serialize_map(Some(len))
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Variant<Map>, ToRegoError> {
        Ok(Variant {
            name: variant,
            inner: self.serialize_map(Some(len))?,
        })
    }
}

impl ser::SerializeSeq for Seq {
    type Ok = Value;
    type Error = ToRegoError;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), ToRegoError> {
        self.0.push(v.serialize(ToRego)?);
        Ok(())
    }
    fn end(self) -> Result<Value, ToRegoError> {
        Ok(Value::from(self.0))
    }
}

impl ser::SerializeTuple for Seq {
    type Ok = Value;
    type Error = ToRegoError;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), ToRegoError> {
        ser::SerializeSeq::serialize_element(self, v)
    }
    fn end(self) -> Result<Value, ToRegoError> {
        ser::SerializeSeq::end(self)
    }
}

impl ser::SerializeTupleStruct for Seq {
    type Ok = Value;
    type Error = ToRegoError;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), ToRegoError> {
        ser::SerializeSeq::serialize_element(self, v)
    }
    fn end(self) -> Result<Value, ToRegoError> {
        ser::SerializeSeq::end(self)
    }
}

impl ser::SerializeTupleVariant for Variant<Seq> {
    type Ok = Value;
    type Error = ToRegoError;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), ToRegoError> {
        ser::SerializeSeq::serialize_element(&mut self.inner, v)
    }
    fn end(self) -> Result<Value, ToRegoError> {
        Ok(tagged(self.name, ser::SerializeSeq::end(self.inner)?))
    }
}

impl ser::SerializeMap for Map {
    type Ok = Value;
    type Error = ToRegoError;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, k: &T) -> Result<(), ToRegoError> {
        let key = k.serialize(ToRego)?;
        if !matches!(key, Value::String(_)) {
            return Err(ToRegoError("an object key that is not a string".into()));
        }
        self.key = Some(key);
        Ok(())
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), ToRegoError> {
        let key = self
            .key
            .take()
            .ok_or_else(|| ToRegoError("a map value without its key".into()))?;
        self.entries.insert(key, v.serialize(ToRego)?);
        Ok(())
    }
    fn end(self) -> Result<Value, ToRegoError> {
        Ok(Value::from(self.entries))
    }
}

impl ser::SerializeStruct for Map {
    type Ok = Value;
    type Error = ToRegoError;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        name: &'static str,
        v: &T,
    ) -> Result<(), ToRegoError> {
        self.entries.insert(Value::from(name), v.serialize(ToRego)?);
        Ok(())
    }
    fn end(self) -> Result<Value, ToRegoError> {
        ser::SerializeMap::end(self)
    }
}

impl ser::SerializeStructVariant for Variant<Map> {
    type Ok = Value;
    type Error = ToRegoError;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        name: &'static str,
        v: &T,
    ) -> Result<(), ToRegoError> {
        ser::SerializeStruct::serialize_field(&mut self.inner, name, v)
    }
    fn end(self) -> Result<Value, ToRegoError> {
        Ok(tagged(self.name, ser::SerializeMap::end(self.inner)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// What regorus parses from the JSON text of `v`: the reference the direct path must match.
    fn via_json<T: Serialize>(v: &T) -> Value {
        Value::from_json_str(&serde_json::to_string(v).unwrap()).unwrap()
    }

    #[test]
    fn json_values_of_every_shape_match_regorus_parsing_their_text() {
        let doc = json!({
            "s": "text é \u{1F600}", "t": true, "f": false, "n": null,
            "u": 18446744073709551615u64, "i": -42, "x": 1.25, "tiny": 0.000001, "big": 1e300,
            "arr": [1, "two", [3], {"four": 4}], "empty": {}, "none": [],
            "nested": {"b": {"c": {"d": [null, 0.5]}}}
        });
        assert_eq!(to_rego(&doc).unwrap(), via_json(&doc));
    }

    #[test]
    fn input_documents_match_regorus_parsing_their_text() {
        for text in crate::input::documented_examples() {
            let input: crate::Input = serde_json::from_str(text).unwrap();
            assert_eq!(to_rego(&input).unwrap(), via_json(&input), "{text}");
        }
    }

    #[test]
    fn enums_and_options_take_their_json_forms() {
        #[derive(serde::Serialize)]
        enum E {
            Unit,
            New(u8),
            Tuple(u8, String),
            Struct { a: Option<u8>, b: Option<u8> },
        }
        let v = (
            E::Unit,
            E::New(1),
            E::Tuple(2, "x".into()),
            E::Struct {
                a: Some(3),
                b: None,
            },
        );
        assert_eq!(to_rego(&v).unwrap(), via_json(&v));
    }

    #[test]
    fn a_map_with_non_string_keys_is_refused() {
        let m: BTreeMap<u8, u8> = [(1, 2)].into();
        assert!(to_rego(&m).is_err());
    }
}
