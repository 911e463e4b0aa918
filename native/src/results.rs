//! The join's first pass: `join_block` answers what `prefect_kluster.tasks._lines.JoinedBlock`
//! makes of a block of result lines (every line joined, none unreadable): the joined lines,
//! as msgspec encodes `JoinedLine`, and per line its custom_id, kind, token counts, length
//! and model. A block with any line it does not read exactly as `RawResultLine` reads it (a
//! malformed line, a big integer, a duplicated key, an error field of an odd type...) is
//! answered `None`, and the Python class does it.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};
use pyo3::AsPyPointer;
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use crate::{fail, id_hash, on_block_lines, once, OptStr, Skip, Str};

/// `ResultError` / the dict form of a body's `error`: the string fields read from it.
#[derive(Default)]
struct ErrorFields<'a> {
    message: Option<Cow<'a, str>>,
    code: Option<Cow<'a, str>>,
    kind: Option<Cow<'a, str>>,
}

impl<'de> Deserialize<'de> for ErrorFields<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ErrorFields<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an error object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut message: Option<OptStr<'de>> = None;
                let mut code: Option<OptStr<'de>> = None;
                let mut kind: Option<OptStr<'de>> = None;
                while let Some(key) = map.next_key::<Str<'de>>()? {
                    match key.0.as_ref() {
                        "message" => once(&mut message, map.next_value::<OptStr<'de>>()?)?,
                        "code" => once(&mut code, map.next_value::<OptStr<'de>>()?)?,
                        "type" => once(&mut kind, map.next_value::<OptStr<'de>>()?)?,
                        _ => {
                            map.next_value::<Skip>()?;
                        }
                    }
                }
                Ok(ErrorFields {
                    message: message.and_then(|v| v.0),
                    code: code.and_then(|v| v.0),
                    kind: kind.and_then(|v| v.0),
                })
            }
        }
        deserializer.deserialize_map(V)
    }
}

/// A body's `error`: `dict | str | None` (null is the `Option` around it).
enum BodyError<'a> {
    Dict(ErrorFields<'a>),
    Text(Cow<'a, str>),
}

impl<'de> Deserialize<'de> for BodyError<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = BodyError<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an error object or string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(BodyError::Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(BodyError::Text(Cow::Owned(v.to_owned())))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                let fields = ErrorFields::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(BodyError::Dict(fields))
            }
        }
        deserializer.deserialize_any(V)
    }
}

/// `Usage`: three integers, 0 when absent.
#[derive(Default, Clone, Copy)]
struct Usage {
    prompt_tokens: i64,
    completion_tokens: i64,
    total_tokens: i64,
}

impl<'de> Deserialize<'de> for Usage {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Usage;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a usage object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Usage, A::Error> {
                let mut counts: [Option<i64>; 3] = [None; 3];
                while let Some(key) = map.next_key::<Str<'de>>()? {
                    let at = match key.0.as_ref() {
                        "prompt_tokens" => 0,
                        "completion_tokens" => 1,
                        "total_tokens" => 2,
                        _ => {
                            map.next_value::<Skip>()?;
                            continue;
                        }
                    };
                    once(&mut counts[at], map.next_value::<i64>()?)?;
                }
                Ok(Usage {
                    prompt_tokens: counts[0].unwrap_or(0),
                    completion_tokens: counts[1].unwrap_or(0),
                    total_tokens: counts[2].unwrap_or(0),
                })
            }
        }
        deserializer.deserialize_map(V)
    }
}

/// A choice: its message's content as raw JSON (a string or null; `null` when absent) and
/// its finish reason.
struct Choice<'a> {
    content: Option<&'a str>,
    finish_reason: Option<Cow<'a, str>>,
}

/// A message's content, raw: a JSON string or null, copied as it is. A string with a \u
/// escape is decoded once too, so that one msgspec refuses (a lone surrogate) is refused.
struct RawContent<'a>(&'a str);

impl<'de> Deserialize<'de> for RawContent<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = <&'de RawValue>::deserialize(deserializer)?.get();
        let first = raw.as_bytes().first().copied();
        if first == Some(b'"') {
            if memchr::memmem::find(raw.as_bytes(), b"\\u").is_some()
                && serde_json::from_str::<Skip>(raw).is_err()
            {
                return Err(fail("content"));
            }
        } else if raw != "null" {
            return Err(fail("content"));
        }
        Ok(RawContent(raw))
    }
}

struct ResultMessage<'a>(Option<&'a str>);

impl<'de> Deserialize<'de> for ResultMessage<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ResultMessage<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a message object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut content: Option<RawContent<'de>> = None;
                while let Some(key) = map.next_key::<Str<'de>>()? {
                    if key.0 == "content" {
                        once(&mut content, map.next_value::<RawContent<'de>>()?)?;
                    } else {
                        map.next_value::<Skip>()?;
                    }
                }
                Ok(ResultMessage(content.map(|c| c.0)))
            }
        }
        deserializer.deserialize_map(V)
    }
}

impl<'de> Deserialize<'de> for Choice<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Choice<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a choice object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut message: Option<Option<ResultMessage<'de>>> = None;
                let mut finish_reason: Option<OptStr<'de>> = None;
                while let Some(key) = map.next_key::<Str<'de>>()? {
                    match key.0.as_ref() {
                        "message" => once(
                            &mut message,
                            map.next_value::<Option<ResultMessage<'de>>>()?,
                        )?,
                        "finish_reason" => {
                            once(&mut finish_reason, map.next_value::<OptStr<'de>>()?)?
                        }
                        _ => {
                            map.next_value::<Skip>()?;
                        }
                    }
                }
                // No message: no content (null); a message without content: null too.
                let content = match message.flatten() {
                    Some(ResultMessage(raw)) => Some(raw.unwrap_or("null")),
                    None => None,
                };
                Ok(Choice {
                    content,
                    finish_reason: finish_reason.and_then(|v| v.0),
                })
            }
        }
        deserializer.deserialize_map(V)
    }
}

/// `ResultBody`.
#[derive(Default)]
struct ResultBody<'a> {
    model: Option<Cow<'a, str>>,
    first_choice: Option<Choice<'a>>,
    usage: Option<Usage>,
    error: Option<BodyError<'a>>,
    message: Option<Cow<'a, str>>,
}

/// The choices: every one read (and checked), the first kept.
struct Choices<'a>(Option<Choice<'a>>);

impl<'de> Deserialize<'de> for Choices<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Choices<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of choices")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let first = seq.next_element::<Choice<'de>>()?;
                while seq.next_element::<Choice<'de>>()?.is_some() {}
                Ok(Choices(first))
            }
        }
        deserializer.deserialize_seq(V)
    }
}

impl<'de> Deserialize<'de> for ResultBody<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ResultBody<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a response body object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut model: Option<OptStr<'de>> = None;
                let mut choices: Option<Choices<'de>> = None;
                let mut usage: Option<Option<Usage>> = None;
                let mut error: Option<Option<BodyError<'de>>> = None;
                let mut message: Option<OptStr<'de>> = None;
                while let Some(key) = map.next_key::<Str<'de>>()? {
                    match key.0.as_ref() {
                        "model" => once(&mut model, map.next_value::<OptStr<'de>>()?)?,
                        "choices" => once(&mut choices, map.next_value::<Choices<'de>>()?)?,
                        "usage" => once(&mut usage, map.next_value::<Option<Usage>>()?)?,
                        "error" => once(&mut error, map.next_value::<Option<BodyError<'de>>>()?)?,
                        "message" => once(&mut message, map.next_value::<OptStr<'de>>()?)?,
                        _ => {
                            map.next_value::<Skip>()?;
                        }
                    }
                }
                Ok(ResultBody {
                    model: model.and_then(|v| v.0),
                    first_choice: choices.and_then(|c| c.0),
                    usage: usage.flatten(),
                    error: error.flatten(),
                    message: message.and_then(|v| v.0),
                })
            }
        }
        deserializer.deserialize_map(V)
    }
}

/// `ResultResponse`.
struct ResultResponse<'a> {
    status_code: i64,
    body: Option<ResultBody<'a>>,
}

impl<'de> Deserialize<'de> for ResultResponse<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ResultResponse<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a response object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut status_code: Option<i64> = None;
                let mut request_id: Option<OptStr<'de>> = None;
                let mut body: Option<Option<ResultBody<'de>>> = None;
                while let Some(key) = map.next_key::<Str<'de>>()? {
                    match key.0.as_ref() {
                        "status_code" => once(&mut status_code, map.next_value::<i64>()?)?,
                        "request_id" => once(&mut request_id, map.next_value::<OptStr<'de>>()?)?,
                        "body" => once(&mut body, map.next_value::<Option<ResultBody<'de>>>()?)?,
                        _ => {
                            map.next_value::<Skip>()?;
                        }
                    }
                }
                Ok(ResultResponse {
                    status_code: status_code.unwrap_or(0),
                    body: body.flatten(),
                })
            }
        }
        deserializer.deserialize_map(V)
    }
}

/// `ResultLine`.
struct ResultLine<'a> {
    custom_id: Cow<'a, str>,
    response: Option<ResultResponse<'a>>,
    error: Option<ErrorFields<'a>>,
}

impl<'de> Deserialize<'de> for ResultLine<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ResultLine<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a result object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut custom_id: Option<Str<'de>> = None;
                let mut response: Option<Option<ResultResponse<'de>>> = None;
                let mut error: Option<Option<ErrorFields<'de>>> = None;
                while let Some(key) = map.next_key::<Str<'de>>()? {
                    match key.0.as_ref() {
                        "custom_id" => once(&mut custom_id, map.next_value::<Str<'de>>()?)?,
                        "response" => once(
                            &mut response,
                            map.next_value::<Option<ResultResponse<'de>>>()?,
                        )?,
                        "error" => once(&mut error, map.next_value::<Option<ErrorFields<'de>>>()?)?,
                        _ => {
                            map.next_value::<Skip>()?;
                        }
                    }
                }
                let custom_id = custom_id.ok_or_else(|| fail("custom_id"))?.0;
                Ok(ResultLine {
                    custom_id,
                    response: response.flatten(),
                    error: error.flatten(),
                })
            }
        }
        deserializer.deserialize_map(V)
    }
}

// What the join's first pass records of each line (`_lines.OK`, `FAILED`, `TRANSIENT`).
const OK: u8 = 0;
const FAILED: u8 = 1;
const TRANSIENT: u8 = 2;
const TRANSIENT_CODES: [&str; 6] = [
    "batch_expired",
    "batch_cancelled",
    "not_processed",
    "rate_limit_exceeded",
    "server_error",
    "timeout",
];

/// Python's `a or b` on optional strings: `a` if it is a non-empty string, else `b`.
fn or<'a>(a: Option<Cow<'a, str>>, b: Option<Cow<'a, str>>) -> Option<Cow<'a, str>> {
    match a {
        Some(text) if !text.is_empty() => Some(text),
        _ => b,
    }
}

fn json_str(out: &mut Vec<u8>, value: &str) {
    serde_json::to_writer(&mut *out, value).expect("writing to a Vec");
}

fn json_opt(out: &mut Vec<u8>, value: Option<&str>) {
    match value {
        Some(text) => json_str(out, text),
        None => out.extend_from_slice(b"null"),
    }
}

fn json_int(out: &mut Vec<u8>, value: i64) {
    out.extend_from_slice(value.to_string().as_bytes());
}

/// One joined line as `to_joined` makes it and msgspec encodes it (followed by a newline),
/// its kind, usage and model (for an ok line that reports usage).
fn join_line<'a>(
    result: ResultLine<'a>,
    out: &mut Vec<u8>,
) -> (u8, Option<Usage>, Option<Cow<'a, str>>) {
    let ResultLine {
        custom_id,
        response,
        error,
    } = result;
    let (status_code, body) = match response {
        Some(response) => (Some(response.status_code), response.body),
        None => (None, None),
    };
    out.extend_from_slice(b"{\"custom_id\":");
    json_str(out, &custom_id);
    let ok = error.is_none()
        && matches!(&body, Some(body) if body.error.is_none())
        && matches!(status_code, Some(code) if (200..300).contains(&code));
    if ok {
        let body = body.expect("checked above");
        let (content, finish_reason) = match body.first_choice {
            Some(choice) => (choice.content, choice.finish_reason),
            None => (None, None),
        };
        out.extend_from_slice(b",\"status\":\"ok\",\"content\":");
        out.extend_from_slice(content.unwrap_or("null").as_bytes());
        out.extend_from_slice(b",\"finish_reason\":");
        json_opt(out, finish_reason.as_deref());
        out.extend_from_slice(b",\"usage\":");
        match body.usage {
            Some(usage) => {
                out.extend_from_slice(b"{\"prompt_tokens\":");
                json_int(out, usage.prompt_tokens);
                out.extend_from_slice(b",\"completion_tokens\":");
                json_int(out, usage.completion_tokens);
                out.extend_from_slice(b",\"total_tokens\":");
                json_int(out, usage.total_tokens);
                out.push(b'}');
            }
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"model\":");
        json_opt(out, body.model.as_deref());
        out.extend_from_slice(b",\"error\":null}\n");
        let model = if body.usage.is_some() {
            body.model
        } else {
            None
        };
        return (OK, body.usage, model);
    }
    let (mut message, mut code) = match error {
        Some(fields) => (fields.message, fields.code),
        None => (None, None),
    };
    let mut model = None;
    if let Some(body) = body {
        match body.error {
            Some(BodyError::Dict(fields)) => {
                message = or(message, fields.message);
                code = or(or(code, fields.code), fields.kind);
            }
            Some(BodyError::Text(text)) => message = or(message, Some(text)),
            None => {}
        }
        message = or(message, body.message);
        model = body.model;
    }
    let message = match or(message, None) {
        Some(text) => text,
        None => Cow::Owned(match status_code {
            Some(status) => format!("request failed with HTTP {status}"),
            None => "request failed with HTTP None".to_owned(),
        }),
    };
    out.extend_from_slice(b",\"status\":\"error\",\"content\":null,\"finish_reason\":null,");
    out.extend_from_slice(b"\"usage\":null,\"model\":");
    json_opt(out, model.as_deref());
    out.extend_from_slice(b",\"error\":{\"message\":");
    json_str(out, &message);
    if let Some(code) = &code {
        out.extend_from_slice(b",\"code\":");
        json_str(out, code);
    }
    if let Some(status) = status_code {
        out.extend_from_slice(b",\"status_code\":");
        json_int(out, status);
    }
    out.extend_from_slice(b"}}\n");
    let transient = match status_code {
        Some(status) if status == 429 || status >= 500 => true,
        _ => TRANSIENT_CODES.contains(&code.as_deref().unwrap_or("")),
    };
    (if transient { TRANSIENT } else { FAILED }, None, None)
}

/// Python's `bytes.strip()` whitespace.
fn is_blank(line: &[u8]) -> bool {
    line.iter()
        .all(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c))
}

struct JoinedLines {
    data: Vec<u8>,
    ids: Vec<u8>,
    hashes: Vec<u8>,
    kinds: Vec<u8>,
    tokens: Vec<u8>,
    lengths: Vec<u8>,
    models: Vec<String>,
    codes: Vec<u8>,
}

fn join_lines(lines: &[&[u8]]) -> Option<JoinedLines> {
    let mut data = Vec::with_capacity(lines.iter().map(|l| l.len() + 64).sum());
    let mut ids = Vec::with_capacity(lines.len() * 16);
    let mut hashes = Vec::with_capacity(lines.len() * 8);
    let mut kinds = Vec::with_capacity(lines.len());
    let mut counts: Vec<i64> = Vec::with_capacity(lines.len() * 3);
    let mut lengths = Vec::with_capacity(lines.len() * 8);
    let mut models: Vec<String> = Vec::new();
    let mut model_codes: HashMap<String, i32> = HashMap::new();
    let mut codes = Vec::with_capacity(lines.len() * 4);
    for line in lines {
        if is_blank(line) {
            continue;
        }
        let text = simdutf8::basic::from_utf8(line).ok()?;
        let result: ResultLine = serde_json::from_str(text).ok()?;
        let start = ids.len();
        json_str(&mut ids, &result.custom_id);
        hashes.extend_from_slice(&id_hash(&ids[start..]).to_ne_bytes());
        ids.push(b'\n');
        let before = data.len();
        let (kind, usage, model) = join_line(result, &mut data);
        kinds.push(kind);
        lengths.extend_from_slice(&((data.len() - before) as i64).to_ne_bytes());
        let usage = usage.unwrap_or_default();
        counts.extend_from_slice(&[
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.total_tokens,
        ]);
        let code = match model {
            Some(name) => match model_codes.get(name.as_ref()) {
                Some(&code) => code,
                None => {
                    let code = models.len() as i32;
                    model_codes.insert(name.to_string(), code);
                    models.push(name.into_owned());
                    code
                }
            },
            None => -1,
        };
        codes.extend_from_slice(&code.to_ne_bytes());
    }
    // 32 bits a count; if one does not fit, every count of the block is clamped to
    // 0..=2**31-1 (as `JoinedBlock` does on its OverflowError).
    let fits = counts.iter().all(|&n| i32::try_from(n).is_ok());
    let mut tokens = Vec::with_capacity(counts.len() * 4);
    for n in counts {
        let n = if fits {
            n as i32
        } else {
            n.clamp(0, i32::MAX as i64) as i32
        };
        tokens.extend_from_slice(&n.to_ne_bytes());
    }
    Some(JoinedLines {
        data,
        ids,
        hashes,
        kinds,
        tokens,
        lengths,
        models,
        codes,
    })
}

/// `join_block(block: bytes, tail: bytes | None = None) -> tuple[Lines, bytes, bytes, bytes,
/// bytes, bytes, list[str], bytes] | None`: the first pass of the join over a block of result
/// lines (`block` followed by `tail`) that ends with a newline, with the GIL released: the
/// joined lines (`Lines`, a buffer); the JSON custom_ids, each followed by a newline, and
/// their `hash_ids`; per line the kind (a byte), three token counts (`array("i")` bytes), the
/// joined line's length (`array("q")`) and a model code (`array("i")`, an index into the list
/// of model names, -1 for none). `None` if any line is not read exactly as the Python pass
/// reads it.
#[pyfunction]
#[pyo3(text_signature = "(block, tail=None)")]
pub(crate) fn join_block(
    py: Python<'_>,
    block: &PyAny,
    tail: Option<&PyAny>,
) -> PyResult<Option<PyObject>> {
    let joined = match on_block_lines(py, block, tail, join_lines)? {
        Some(joined) => joined,
        None => return Ok(None),
    };
    let answer = (
        Py::new(py, Lines { data: joined.data })?,
        PyBytes::new(py, &joined.ids),
        PyBytes::new(py, &joined.hashes),
        PyBytes::new(py, &joined.kinds),
        PyBytes::new(py, &joined.tokens),
        PyBytes::new(py, &joined.lengths),
        joined.models,
        PyBytes::new(py, &joined.codes),
    );
    Ok(Some(answer.into_py(py)))
}

/// A block's joined lines, as a read-only buffer (what `bytes` offers a file's `write`, and
/// `len`): handed over without the copy a `bytes` would need (a quarter of the first pass's
/// memory traffic was that copy, made holding the GIL).
#[pyclass]
pub(crate) struct Lines {
    data: Vec<u8>,
}

#[pymethods]
impl Lines {
    fn __len__(&self) -> usize {
        self.data.len()
    }

    unsafe fn __getbuffer__(
        slf: PyRefMut<'_, Self>,
        view: *mut pyo3::ffi::Py_buffer,
        flags: std::os::raw::c_int,
    ) -> PyResult<()> {
        let (buf, len) = (
            slf.data.as_ptr() as *mut std::os::raw::c_void,
            slf.data.len(),
        );
        // fills `view` for a read-only buffer of bytes (refusing a writable one) and holds a
        // reference to this object until the view is released; the data never changes
        if pyo3::ffi::PyBuffer_FillInfo(view, slf.as_ptr(), buf, len as isize, 1, flags) != 0 {
            return Err(PyErr::fetch(slf.py()));
        }
        Ok(())
    }

    unsafe fn __releasebuffer__(&self, _view: *mut pyo3::ffi::Py_buffer) {}
}

/// A hasher for keys that are already 64-bit hashes (`hash_ids`): the key, mixed once.
#[derive(Default)]
struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0.rotate_left(8) ^ byte as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_i64(&mut self, key: i64) {
        self.0 = (key as u64 ^ (key as u64 >> 29)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// The join's lookup: each index key's latest entry (the last in file order; later files
/// take precedence), built once from the index's keys; what a stable sort and a binary
/// search of them answer, in one hash probe a key.
#[pyclass]
pub(crate) struct LatestEntries {
    latest: HashMap<i64, i64, std::hash::BuildHasherDefault<KeyHasher>>,
}

fn i64s(bytes: &[u8]) -> impl Iterator<Item = i64> + '_ {
    bytes
        .chunks_exact(8)
        .map(|b| i64::from_ne_bytes(b.try_into().expect("8 bytes")))
}

#[pymethods]
impl LatestEntries {
    /// `LatestEntries(keys: bytes)`: the keys of entries 0, 1, 2... as an `array("q")`'s bytes.
    #[new]
    fn new(py: Python<'_>, keys: &PyBytes) -> Self {
        let keys = keys.as_bytes();
        let latest = py.allow_threads(|| {
            let mut latest = HashMap::with_capacity_and_hasher(keys.len() / 8, Default::default());
            for (entry, key) in i64s(keys).enumerate() {
                latest.insert(key, entry as i64);
            }
            latest
        });
        LatestEntries { latest }
    }

    /// `find(keys: bytes) -> bytes`: each key's latest entry, -1 where it has none, as an
    /// `array("q")`'s bytes.
    fn find(&self, py: Python<'_>, keys: &PyBytes) -> PyObject {
        let keys = keys.as_bytes();
        let found = py.allow_threads(|| {
            let mut found = Vec::with_capacity(keys.len());
            for key in i64s(keys) {
                found
                    .extend_from_slice(&self.latest.get(&key).copied().unwrap_or(-1).to_ne_bytes());
            }
            found
        });
        PyBytes::new(py, &found).into()
    }
}

/// `gather_lines(buffer, at, sizes, ids) -> tuple[bytes, bytes]`: the join's second pass
/// over a window. The lines `buffer[at[i] : at[i] + sizes[i]]` (`at`, `sizes`: `array("q")`
/// bytes) one after another, and per line whether it is the joined line of the JSON
/// custom_id `ids[i]`: it starts with `{"custom_id":<the id>,` (a 64-bit hash of ids can
/// collide; the caller looks a line that is not again). The copying is done with the GIL
/// released.
#[pyfunction]
pub(crate) fn gather_lines(
    py: Python<'_>,
    buffer: &PyBytes,
    at: &PyBytes,
    sizes: &PyBytes,
    ids: &PyList,
) -> PyResult<PyObject> {
    let buffer = buffer.as_bytes();
    let spans: Vec<(usize, usize)> = i64s(at.as_bytes())
        .zip(i64s(sizes.as_bytes()))
        .map(|(start, size)| (start as usize, size as usize))
        .collect();
    let fits = |&(start, size): &(usize, usize)| {
        start
            .checked_add(size)
            .map_or(false, |end| end <= buffer.len())
    };
    if at.as_bytes().len() != sizes.as_bytes().len()
        || spans.len() != ids.len()
        || !spans.iter().all(fits)
    {
        return Err(PyValueError::new_err("the lines are not all in the buffer"));
    }
    let ids = byte_strings(ids)?;
    let total: usize = spans.iter().map(|&(_, size)| size).sum();
    let mut same = vec![0u8; spans.len()];
    let lines = PyBytes::new_with(py, total, |out| {
        py.allow_threads(|| {
            let mut to = 0;
            for ((&(start, size), id), same) in spans.iter().zip(&ids).zip(same.iter_mut()) {
                let line = &buffer[start..start + size];
                out[to..to + size].copy_from_slice(line);
                to += size;
                *same = is_line_of(line, id) as u8;
            }
        });
        Ok(())
    })?;
    Ok((lines, PyBytes::new(py, &same)).into_py(py))
}

/// `lines_start_with(buffer, at, ids) -> bytes`: per joined line (at offset `at[i]` of
/// `buffer`, an `array("q")`'s bytes), 1 if it is the line of the JSON custom_id `ids[i]`,
/// else 0. `buffer` is any C-contiguous buffer (a memory map of a scratch file: only the
/// lines' heads are read); an offset past its end is a line that is not there.
#[pyfunction]
pub(crate) fn lines_start_with(
    py: Python<'_>,
    buffer: &PyAny,
    at: &PyBytes,
    ids: &PyList,
) -> PyResult<PyObject> {
    let view = PyBuffer::<u8>::get(buffer)?;
    if !view.is_c_contiguous() {
        return Err(PyValueError::new_err("the buffer is not contiguous"));
    }
    // Safety: a C-contiguous buffer of `len_bytes` bytes, held (and not written by this
    // function) until `view` is dropped at the end of it.
    let buffer: &[u8] =
        unsafe { std::slice::from_raw_parts(view.buf_ptr() as *const u8, view.len_bytes()) };
    let starts: Vec<i64> = i64s(at.as_bytes()).collect();
    if at.as_bytes().len() % 8 != 0 || starts.len() != ids.len() {
        return Err(PyValueError::new_err("one offset a custom_id is needed"));
    }
    let ids = byte_strings(ids)?;
    let mut same = vec![0u8; starts.len()];
    py.allow_threads(|| {
        for ((&start, id), same) in starts.iter().zip(&ids).zip(same.iter_mut()) {
            let line = usize::try_from(start)
                .ok()
                .and_then(|start| buffer.get(start..))
                .unwrap_or(&[]);
            *same = is_line_of(line, id) as u8;
        }
    });
    drop(view);
    Ok(PyBytes::new(py, &same).into_py(py))
}

/// The items of a list of `bytes` (JSON custom_ids), borrowed.
fn byte_strings(ids: &PyList) -> PyResult<Vec<&[u8]>> {
    ids.iter()
        .map(|id| Ok(id.downcast::<PyBytes>()?.as_bytes()))
        .collect()
}

/// Whether a joined line (or what follows its start) is the one for the JSON custom_id `id`:
/// it starts with `{"custom_id":<id>,`.
fn is_line_of(line: &[u8], id: &[u8]) -> bool {
    let head = JOINED_HEAD.len();
    line.starts_with(JOINED_HEAD)
        && line[head..].starts_with(id)
        && line.get(head + id.len()) == Some(&b',')
}

/// How every joined line starts.
const JOINED_HEAD: &[u8] = b"{\"custom_id\":";
