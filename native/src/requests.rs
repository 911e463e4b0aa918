//! The request check of validate-and-shard: `check_block` answers what
//! `prefect_kluster.tasks._lines.check_requests` answers for a block whose every line is a
//! valid request (msgspec's `RequestLine`): the lines' custom_ids as JSON, one a line, and
//! per model the cost estimate's counts.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

use crate::{fail, id_hash, non_empty, on_block_lines, once, Skip, Str};

/// Sizes of one message content, counted as the Python tally (`BlockCost.add`) counts them.
#[derive(Default, Clone, Copy)]
struct Counts {
    ascii_chars: u64,
    other_chars: u64,
    other_bytes: u64,
    images: u64,
}

impl Counts {
    /// A text: pure ASCII counts its characters; other text its characters (code points)
    /// and its UTF-8 bytes.
    fn text(text: &str) -> Counts {
        let bytes = text.as_bytes();
        if bytes.is_ascii() {
            return Counts {
                ascii_chars: bytes.len() as u64,
                ..Counts::default()
            };
        }
        Counts {
            other_chars: code_points(bytes),
            other_bytes: bytes.len() as u64,
            ..Counts::default()
        }
    }

    fn add(&mut self, other: Counts) {
        self.ascii_chars += other.ascii_chars;
        self.other_chars += other.other_chars;
        self.other_bytes += other.other_bytes;
        self.images += other.images;
    }
}

/// The code points of UTF-8 text: its bytes that do not continue a character (as `i8`,
/// continuation bytes 0x80..=0xBF are -128..=-65). Counted in runs of at most 255 bytes
/// into a `u8`, which the compiler turns into 16 bytes a step; a `u64` count of
/// `filter(..).count()` widened every byte to 64 bits and took 2 bytes a step, about 7% of the
/// whole validate-and-shard pass's CPU on multilingual text.
fn code_points(bytes: &[u8]) -> u64 {
    bytes
        .chunks(255)
        .map(|run| {
            run.iter()
                .map(|&b| ((b as i8) >= -0x40) as u8)
                .fold(0u8, u8::wrapping_add) as u64
        })
        .sum()
}

/// A JSON string's counts, read without keeping it (an escaped one is decoded into
/// serde_json's scratch buffer, not a new `String`).
struct Text(Counts);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Text;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text, E> {
                Ok(Text(Counts::text(v)))
            }
        }
        deserializer.deserialize_str(V)
    }
}

/// `ImageURL`: an object with a non-empty `url`.
struct ImageUrl;

impl<'de> Deserialize<'de> for ImageUrl {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ImageUrl;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an image_url object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ImageUrl, A::Error> {
                let mut url: Option<Str<'de>> = None;
                while let Some(key) = map.next_key::<Str<'de>>()? {
                    if key.0 == "url" {
                        once(&mut url, map.next_value::<Str<'de>>()?)?;
                    } else {
                        map.next_value::<Skip>()?;
                    }
                }
                non_empty(url, "url")?;
                Ok(ImageUrl)
            }
        }
        deserializer.deserialize_map(V)
    }
}

/// One content part, tagged by `type`: `text` (a string) or `image_url` (an `ImageURL`).
/// The other part's field, present on a part, must be of its own shape too (stricter).
struct Part(Counts);

impl<'de> Deserialize<'de> for Part {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Part;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a content part object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Part, A::Error> {
                let mut kind: Option<Str<'de>> = None;
                let mut text: Option<Counts> = None;
                let mut image: Option<ImageUrl> = None;
                while let Some(key) = map.next_key::<Str<'de>>()? {
                    match key.0.as_ref() {
                        "type" => once(&mut kind, map.next_value::<Str<'de>>()?)?,
                        "text" => once(&mut text, map.next_value::<Text>()?.0)?,
                        "image_url" => once(&mut image, map.next_value::<ImageUrl>()?)?,
                        _ => {
                            map.next_value::<Skip>()?;
                        }
                    }
                }
                match (kind.as_ref().map(|k| k.0.as_ref()), text, image) {
                    (Some("text"), Some(counts), _) => Ok(Part(counts)),
                    (Some("image_url"), _, Some(_)) => Ok(Part(Counts {
                        images: 1,
                        ..Counts::default()
                    })),
                    _ => Err(fail("content part")),
                }
            }
        }
        deserializer.deserialize_map(V)
    }
}

/// A message's content: a string, or a non-empty list of parts.
struct Content(Counts);

impl<'de> Deserialize<'de> for Content {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Content;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or a list of content parts")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Content, E> {
                Ok(Content(Counts::text(v)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Content, A::Error> {
                let mut counts = Counts::default();
                let mut parts = 0usize;
                while let Some(Part(part)) = seq.next_element::<Part>()? {
                    counts.add(part);
                    parts += 1;
                }
                if parts == 0 {
                    return Err(fail("empty content list"));
                }
                Ok(Content(counts))
            }
        }
        deserializer.deserialize_any(V)
    }
}

const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

/// A message: a known role and a content.
struct Message(Counts);

impl<'de> Deserialize<'de> for Message {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Message;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a message object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Message, A::Error> {
                let mut role: Option<Str<'de>> = None;
                let mut content: Option<Counts> = None;
                while let Some(key) = map.next_key::<Str<'de>>()? {
                    match key.0.as_ref() {
                        "role" => once(&mut role, map.next_value::<Str<'de>>()?)?,
                        "content" => once(&mut content, map.next_value::<Content>()?.0)?,
                        _ => {
                            map.next_value::<Skip>()?;
                        }
                    }
                }
                match (role, content) {
                    (Some(role), Some(content)) if ROLES.contains(&role.0.as_ref()) => {
                        Ok(Message(content))
                    }
                    _ => Err(fail("message")),
                }
            }
        }
        deserializer.deserialize_map(V)
    }
}

/// A non-empty list of messages: their number and summed counts.
struct Messages(u64, Counts);

impl<'de> Deserialize<'de> for Messages {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Messages;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of messages")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Messages, A::Error> {
                let mut counts = Counts::default();
                let mut messages = 0u64;
                while let Some(Message(message)) = seq.next_element::<Message>()? {
                    counts.add(message);
                    messages += 1;
                }
                if messages == 0 {
                    return Err(fail("empty messages"));
                }
                Ok(Messages(messages, counts))
            }
        }
        deserializer.deserialize_seq(V)
    }
}

/// The request body: a model, its messages and the answer limit a line sets, if any.
struct Body<'a> {
    model: Cow<'a, str>,
    messages: u64,
    counts: Counts,
    cap: Option<u64>,
}

impl<'de> Deserialize<'de> for Body<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Body<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a request body object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Body<'de>, A::Error> {
                let mut model: Option<Str<'de>> = None;
                let mut messages: Option<Messages> = None;
                let mut max_completion_tokens: Option<Option<u64>> = None;
                let mut max_tokens: Option<Option<u64>> = None;
                while let Some(key) = map.next_key::<Str<'de>>()? {
                    match key.0.as_ref() {
                        "model" => once(&mut model, map.next_value::<Str<'de>>()?)?,
                        "messages" => once(&mut messages, map.next_value::<Messages>()?)?,
                        "max_completion_tokens" => {
                            once(&mut max_completion_tokens, map.next_value::<Option<u64>>()?)?
                        }
                        "max_tokens" => once(&mut max_tokens, map.next_value::<Option<u64>>()?)?,
                        _ => {
                            map.next_value::<Skip>()?;
                        }
                    }
                }
                let model = non_empty(model, "model")?;
                let Messages(messages, counts) = messages.ok_or_else(|| fail("messages"))?;
                let cap = max_completion_tokens.flatten().or(max_tokens.flatten());
                Ok(Body {
                    model,
                    messages,
                    counts,
                    cap,
                })
            }
        }
        deserializer.deserialize_map(V)
    }
}

/// One request line.
struct Request<'a> {
    custom_id: Cow<'a, str>,
    body: Body<'a>,
}

impl<'de> Deserialize<'de> for Request<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Request<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a request object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Request<'de>, A::Error> {
                let mut custom_id: Option<Str<'de>> = None;
                let mut method: Option<Str<'de>> = None;
                let mut url: Option<Str<'de>> = None;
                let mut body: Option<Body<'de>> = None;
                while let Some(key) = map.next_key::<Str<'de>>()? {
                    match key.0.as_ref() {
                        "custom_id" => once(&mut custom_id, map.next_value::<Str<'de>>()?)?,
                        "method" => once(&mut method, map.next_value::<Str<'de>>()?)?,
                        "url" => once(&mut url, map.next_value::<Str<'de>>()?)?,
                        "body" => once(&mut body, map.next_value::<Body<'de>>()?)?,
                        _ => {
                            map.next_value::<Skip>()?;
                        }
                    }
                }
                let custom_id = non_empty(custom_id, "custom_id")?;
                if method.map(|m| m.0) != Some(Cow::Borrowed("POST")) {
                    return Err(fail("method"));
                }
                if url.map(|u| u.0) != Some(Cow::Borrowed("/v1/chat/completions")) {
                    return Err(fail("url"));
                }
                let body = body.ok_or_else(|| fail("body"))?;
                Ok(Request { custom_id, body })
            }
        }
        deserializer.deserialize_map(V)
    }
}

/// Per model, in order of first appearance: lines, messages, image parts, ASCII
/// characters, other characters, their UTF-8 bytes, the sum of the answer limits set and
/// the lines that set none (`prefect_kluster.tasks._lines.LINES` ... `UNLIMITED`).
#[derive(Default)]
struct Tally {
    index: HashMap<String, usize>,
    models: Vec<(String, [u64; 8])>,
}

impl Tally {
    /// Adds one request; `None` if a sum would overflow 64 bits (the reference then counts).
    fn add(&mut self, body: &Body) -> Option<()> {
        let at = match self.index.get(body.model.as_ref()) {
            Some(&at) => at,
            None => {
                self.models.push((body.model.to_string(), [0; 8]));
                self.index
                    .insert(body.model.to_string(), self.models.len() - 1);
                self.models.len() - 1
            }
        };
        let counts = &mut self.models[at].1;
        let c = body.counts;
        let (limit, unlimited) = match body.cap {
            Some(cap) => (cap, 0),
            None => (0, 1),
        };
        for (slot, value) in counts.iter_mut().zip([
            1,
            body.messages,
            c.images,
            c.ascii_chars,
            c.other_chars,
            c.other_bytes,
            limit,
            unlimited,
        ]) {
            *slot = slot.checked_add(value)?;
        }
        Some(())
    }
}

/// The whole block's answer, or `None` at its first line that is not accepted.
fn check_block_lines(lines: &[&[u8]]) -> Option<(Vec<u8>, Vec<u8>, Tally)> {
    let mut ids = Vec::with_capacity(lines.len() * 16);
    let mut hashes = Vec::with_capacity(lines.len() * 8);
    let mut tally = Tally::default();
    for line in lines {
        let text = simdutf8::basic::from_utf8(line).ok()?;
        let request: Request = serde_json::from_str(text).ok()?;
        let start = ids.len();
        serde_json::to_writer(&mut ids, request.custom_id.as_ref()).ok()?;
        hashes.extend_from_slice(&id_hash(&ids[start..]).to_ne_bytes());
        ids.push(b'\n');
        tally.add(&request.body)?;
    }
    Some((ids, hashes, tally))
}

/// `check_block(block: bytes, tail: bytes | None = None) -> tuple[bytes, dict[str, list[int]],
/// int, bytes] | None`: the request check of a whole block of lines (`block` followed by
/// `tail`) that ends with a newline (CRLF line ends allowed: CR is JSON whitespace), read
/// with the GIL released: the JSON custom_ids (each followed by a newline), the per-model
/// counts, the number of lines and the ids' hashes (`hash_ids`), or `None` if a line is not
/// accepted.
#[pyfunction]
#[pyo3(text_signature = "(block, tail=None)")]
pub(crate) fn check_block(
    py: Python<'_>,
    block: &PyAny,
    tail: Option<&PyAny>,
) -> PyResult<Option<PyObject>> {
    let answer = on_block_lines(py, block, tail, |lines| {
        check_block_lines(lines).map(|(ids, hashes, tally)| (ids, hashes, tally, lines.len()))
    })?;
    let (ids, hashes, tally, count) = match answer {
        Some(answer) => answer,
        None => return Ok(None),
    };
    let answer = (
        PyBytes::new(py, &ids),
        tally_dict(py, tally)?,
        count,
        PyBytes::new(py, &hashes),
    );
    Ok(Some(answer.into_py(py)))
}

fn tally_dict(py: Python<'_>, tally: Tally) -> PyResult<PyObject> {
    let models = PyDict::new(py);
    for (model, counts) in tally.models {
        models.set_item(model, PyList::new(py, counts))?;
    }
    Ok(models.into())
}
