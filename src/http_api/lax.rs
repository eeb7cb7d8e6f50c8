//! The first version's lenient body decoding, as FastAPI with pydantic's lax
//! mode did it: numbers may be numeric strings, integers whole floats,
//! booleans `0`/`1` or `"true"`/`"false"`; every problem is reported with
//! its location, in FastAPI's 422 `detail` shape.

use serde::Serialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;

/// A field's place in the body: `["body", "resolution", "width"]`.
pub(super) type Loc = Vec<LocItem>;

/// The fields of one JSON object being decoded, and where to report
/// problems.
pub(super) struct Fields<'v, 'e> {
    object: &'v Map<String, Value>,
    loc: Loc,
    errors: &'e mut Vec<ValidationDetail>,
}

impl<'v, 'e> Fields<'v, 'e> {
    /// `None` (and an error) when `value` is not an object.
    pub(super) fn new(
        value: &'v Value,
        loc: Loc,
        errors: &'e mut Vec<ValidationDetail>,
    ) -> Option<Self> {
        match value {
            Value::Object(object) => Some(Self {
                object,
                loc,
                errors,
            }),
            other => {
                errors.push(ValidationDetail {
                    kind: "model_attributes_type",
                    loc,
                    msg: "Input should be a valid dictionary or object to extract fields from"
                        .into(),
                    input: other.clone(),
                    ctx: None,
                });
                None
            }
        }
    }

    fn at(&self, name: &str) -> Loc {
        let mut loc = self.loc.clone();
        loc.push(name.to_owned().into());
        loc
    }

    /// A field decoded by `decode`; absent and `null` are `None`.
    pub(super) fn get<T>(
        &mut self,
        name: &str,
        decode: impl Fn(&Value) -> Result<T, Mismatch>,
    ) -> Option<T> {
        let value = self.object.get(name).filter(|v| !v.is_null())?;
        match decode(value) {
            Ok(v) => Some(v),
            Err(mismatch) => {
                let loc = self.at(name);
                self.errors.push(mismatch.at(loc, value));
                None
            }
        }
    }

    /// A nested object decoded field by field.
    pub(super) fn nested<T>(
        &mut self,
        name: &str,
        decode: impl FnOnce(Fields<'_, '_>) -> T,
    ) -> Option<T> {
        let value = self.object.get(name).filter(|v| !v.is_null())?;
        let loc = self.at(name);
        Fields::new(value, loc, self.errors).map(decode)
    }

    /// A list whose items are decoded by `decode`, each refused item
    /// reported at its position.
    pub(super) fn list<T>(
        &mut self,
        name: &str,
        decode: impl Fn(&Value) -> Result<T, Mismatch>,
    ) -> Option<Vec<T>> {
        let value = self.object.get(name).filter(|v| !v.is_null())?;
        let Value::Array(items) = value else {
            let loc = self.at(name);
            let mismatch = Mismatch::new("list_type", "Input should be a valid list");
            self.errors.push(mismatch.at(loc, value));
            return None;
        };
        let before = self.errors.len();
        let mut decoded = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            match decode(item) {
                Ok(v) => decoded.push(v),
                Err(mismatch) => {
                    let mut loc = self.at(name);
                    loc.push(i.into());
                    self.errors.push(mismatch.at(loc, item));
                }
            }
        }
        (self.errors.len() == before).then_some(decoded)
    }
}

/// Pydantic's error type and message for a value of the wrong type.
#[derive(Debug)]
pub(super) struct Mismatch {
    kind: &'static str,
    msg: &'static str,
}

impl Mismatch {
    fn new(kind: &'static str, msg: &'static str) -> Self {
        Self { kind, msg }
    }

    fn at(self, loc: Loc, input: &Value) -> ValidationDetail {
        ValidationDetail {
            kind: self.kind,
            loc,
            msg: self.msg.into(),
            input: input.clone(),
            ctx: None,
        }
    }
}

pub(super) fn string(v: &Value) -> Result<String, Mismatch> {
    v.as_str()
        .map(str::to_owned)
        .ok_or_else(|| Mismatch::new("string_type", "Input should be a valid string"))
}

pub(super) fn boolean(v: &Value) -> Result<bool, Mismatch> {
    let parsing = || {
        Mismatch::new(
            "bool_parsing",
            "Input should be a valid boolean, unable to interpret input",
        )
    };
    match v {
        Value::Bool(b) => Ok(*b),
        Value::Number(n) => match n.as_f64() {
            Some(0.0) => Ok(false),
            Some(1.0) => Ok(true),
            _ => Err(parsing()),
        },
        Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
            "0" | "off" | "f" | "false" | "n" | "no" => Ok(false),
            "1" | "on" | "t" | "true" | "y" | "yes" => Ok(true),
            _ => Err(parsing()),
        },
        _ => Err(Mismatch::new(
            "bool_type",
            "Input should be a valid boolean",
        )),
    }
}

/// Largest whole float taken as an integer: beyond 2^63 it no longer fits.
const I64_BOUND: f64 = 9_223_372_036_854_775_808.0;

pub(super) fn integer(v: &Value) -> Result<i64, Mismatch> {
    let too_big = || {
        Mismatch::new(
            "int_parsing_size",
            "Unable to parse input string as an integer, exceeded maximum size",
        )
    };
    match v {
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                return Ok(i);
            }
            if n.is_u64() {
                return Err(too_big());
            }
            let f = n.as_f64().unwrap_or(f64::NAN);
            if f.fract() != 0.0 || !f.is_finite() {
                Err(Mismatch::new(
                    "int_from_float",
                    "Input should be a valid integer, got a number with a fractional part",
                ))
            } else if f.abs() >= I64_BOUND {
                Err(too_big())
            } else {
                Ok(f as i64)
            }
        }
        Value::String(s) => s.trim().parse().map_err(|_| {
            Mismatch::new(
                "int_parsing",
                "Input should be a valid integer, unable to parse string as an integer",
            )
        }),
        _ => Err(Mismatch::new("int_type", "Input should be a valid integer")),
    }
}

pub(super) fn number(v: &Value) -> Result<f64, Mismatch> {
    match v {
        Value::Number(n) => n
            .as_f64()
            .ok_or_else(|| Mismatch::new("float_type", "Input should be a valid number")),
        Value::String(s) => s.trim().parse().map_err(|_| {
            Mismatch::new(
                "float_parsing",
                "Input should be a valid number, unable to parse string as a number",
            )
        }),
        _ => Err(Mismatch::new(
            "float_type",
            "Input should be a valid number",
        )),
    }
}

pub(super) fn object(v: &Value) -> Result<Map<String, Value>, Mismatch> {
    v.as_object()
        .cloned()
        .ok_or_else(|| Mismatch::new("dict_type", "Input should be a valid dictionary"))
}

/// The byte offset of a JSON syntax error, as FastAPI reports it in `loc`.
pub(super) fn json_error_offset(bytes: &[u8], error: &serde_json::Error) -> usize {
    // Python reports a body cut short at its end; serde at its last byte.
    if error.is_eof() {
        return bytes.len();
    }
    let line_start = match error.line() {
        0 | 1 => 0,
        line => bytes
            .iter()
            .enumerate()
            .filter(|(_, b)| **b == b'\n')
            .nth(line - 2)
            .map_or(bytes.len(), |(i, _)| i + 1),
    };
    (line_start + error.column().saturating_sub(1)).min(bytes.len())
}

/// `422`: FastAPI's validation error list.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(example = json!({"detail": [{"type": "missing", "loc": ["query", "authorization_token"], "msg": "Field required", "input": null}]}))]
pub struct ValidationError {
    /// One entry per problem.
    pub detail: Vec<ValidationDetail>,
}

/// One problem of a request, as pydantic describes it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ValidationDetail {
    /// Pydantic's error type: `missing`, `json_invalid`, `int_parsing`, ...
    #[serde(rename = "type")]
    #[schema(value_type = String)]
    pub kind: &'static str,
    /// Where: `["query", "<name>"]`, `["body"]`, `["body", <byte offset>]`
    /// or `["body", "<field>", ...]`.
    pub loc: Vec<LocItem>,
    /// What is wrong.
    pub msg: String,
    /// The value refused (`null` when missing).
    #[schema(value_type = Object)]
    pub input: Value,
    /// More about the error, e.g. the JSON parser's message.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub ctx: Option<Value>,
}

impl ValidationDetail {
    pub(super) fn missing(loc: Loc) -> Self {
        Self {
            kind: "missing",
            loc,
            msg: "Field required".into(),
            input: Value::Null,
            ctx: None,
        }
    }
}

/// One step of a location: a name or a position.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
#[serde(untagged)]
pub enum LocItem {
    /// A parameter or field name.
    Name(String),
    /// A byte offset in the body.
    Index(usize),
}

impl From<&str> for LocItem {
    fn from(name: &str) -> Self {
        Self::Name(name.to_owned())
    }
}

impl From<String> for LocItem {
    fn from(name: String) -> Self {
        Self::Name(name)
    }
}

impl From<usize> for LocItem {
    fn from(index: usize) -> Self {
        Self::Index(index)
    }
}
