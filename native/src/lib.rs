//! The line passes of validate-and-shard and of the join, compiled.
//!
//! Each reads a block of JSONL lines with serde (each shape is one `Visitor`; serde_json
//! does the JSON) and answers what the Python code in `prefect_kluster.tasks._lines`
//! answers for that block, or `None` for a block it does not take; the Python code, the
//! reference, then does the block and names any problem. So these may be stricter than the
//! reference (a duplicated key, a number or a nesting depth serde_json refuses, bytes that
//! are not UTF-8 anywhere in a line), never more lenient, and where they take a block they
//! give the same bytes: tests/test_native.py holds them to that. They hold no Python object
//! while they read, so the GIL is released for the block.
//!
//! - `requests`: the request check (`check_block`);
//! - `results`: the join's first pass (`join_block`).

use std::borrow::Cow;
use std::collections::hash_map::DefaultHasher;
use std::fmt;
use std::hash::Hasher;

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

mod requests;
mod results;

/// A JSON string, borrowed from the line unless it had escapes.
struct Str<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Str<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Str<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Str<'de>, E> {
                Ok(Str(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Str<'de>, E> {
                Ok(Str(Cow::Owned(v.to_owned())))
            }
        }
        deserializer.deserialize_str(V)
    }
}

/// Any JSON value, read in full and dropped: an unknown field. Strings are decoded (not
/// skipped), so an escape msgspec refuses (a lone surrogate) is refused here too.
struct Skip;

impl<'de> Deserialize<'de> for Skip {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Skip;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Skip, E> {
                Ok(Skip)
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Skip, E> {
                Ok(Skip)
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Skip, E> {
                Ok(Skip)
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Skip, E> {
                Ok(Skip)
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Skip, E> {
                Ok(Skip)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Skip, E> {
                Ok(Skip)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Skip, A::Error> {
                while seq.next_element::<Skip>()?.is_some() {}
                Ok(Skip)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Skip, A::Error> {
                while map.next_entry::<Skip, Skip>()?.is_some() {}
                Ok(Skip)
            }
        }
        deserializer.deserialize_any(V)
    }
}

fn fail<E: de::Error>(what: &str) -> E {
    E::custom(what)
}

/// Sets `slot` once; a key seen twice is refused (msgspec keeps the last: the reference
/// decides such a line).
fn once<T, E: de::Error>(slot: &mut Option<T>, value: T) -> Result<(), E> {
    if slot.is_some() {
        return Err(fail("duplicate key"));
    }
    *slot = Some(value);
    Ok(())
}

fn non_empty<'a, E: de::Error>(value: Option<Str<'a>>, what: &str) -> Result<Cow<'a, str>, E> {
    match value {
        Some(Str(text)) if !text.is_empty() => Ok(text),
        _ => Err(fail(what)),
    }
}

/// A string or null (`str | None`); anything else is refused.
struct OptStr<'a>(Option<Cow<'a, str>>);

impl<'de> Deserialize<'de> for OptStr<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Option::<Str<'de>>::deserialize(deserializer).map(|v| OptStr(v.map(|s| s.0)))
    }
}

/// A custom_id's 64-bit hash, of its JSON form (the standard library's SipHash, fixed keys:
/// the same within a process, which is as long as these live): the duplicate check sorts
/// them and reads again the lines of any two that are equal, so a collision costs a second
/// read, never a wrong answer.
fn id_hash(json_id: &[u8]) -> i64 {
    let mut hasher = DefaultHasher::new();
    hasher.write(json_id);
    hasher.finish() as i64
}

/// `hash_ids(ids: list[bytes]) -> bytes`: `id_hash` of each JSON custom_id, as native-endian
/// 64-bit integers (an `array("q")`'s bytes).
#[pyfunction]
fn hash_ids(py: Python<'_>, ids: &PyList) -> PyResult<PyObject> {
    let mut out = Vec::with_capacity(ids.len() * 8);
    for item in ids.iter() {
        out.extend_from_slice(&id_hash(item.downcast::<PyBytes>()?.as_bytes()).to_ne_bytes());
    }
    Ok(PyBytes::new(py, &out).into())
}

/// `work` on the lines of a block read as `head` and `tail` (`read_block_parts`: what
/// `readline` added to finish `head`'s last line, or nothing), with the GIL released; `None`
/// if the block does not end with a newline or `work` declines it. What both compiled passes
/// take a block through.
fn on_block_lines<T: Send>(
    py: Python<'_>,
    head: &PyAny,
    tail: Option<&PyAny>,
    work: impl FnOnce(&[&[u8]]) -> Option<T> + Send,
) -> PyResult<Option<T>> {
    let head = Borrowed::new(head)?;
    let tail = tail.map(Borrowed::new).transpose()?;
    let (head, tail) = (
        head.bytes(),
        tail.as_ref().map_or(&b""[..], Borrowed::bytes),
    );
    let last = if tail.is_empty() {
        head.last()
    } else {
        tail.last()
    };
    if last != Some(&b'\n') {
        return Ok(None);
    }
    Ok(py.allow_threads(|| {
        let mut shared = Vec::new();
        work(&split_parts(head, tail, &mut shared))
    }))
}

/// The bytes of an object with the buffer protocol (`bytes`, or a `memoryview` of a file's
/// read-only `mmap`: the join reads result files so, with no copy), held while read.
struct Borrowed(PyBuffer<u8>);

impl Borrowed {
    fn new(object: &PyAny) -> PyResult<Self> {
        let buffer = PyBuffer::<u8>::get(object)?;
        // read-only: nothing can change it while the GIL is released
        if !buffer.is_c_contiguous() || !buffer.readonly() {
            return Err(PyValueError::new_err(
                "a block must be one read-only contiguous buffer",
            ));
        }
        Ok(Self(buffer))
    }

    fn bytes(&self) -> &[u8] {
        let len = self.0.len_bytes();
        if len == 0 {
            return &[];
        }
        // SAFETY: a contiguous read-only buffer of `len` bytes, kept alive (its exporter
        // unable to resize or free it) while `self` holds the view.
        unsafe { std::slice::from_raw_parts(self.0.buf_ptr() as *const u8, len) }
    }
}

/// The lines of `head` followed by `tail` (ending with a newline), without their newlines,
/// with no copy of `head`: the line the two share is put together in `shared`.
fn split_parts<'a>(head: &'a [u8], tail: &'a [u8], shared: &'a mut Vec<u8>) -> Vec<&'a [u8]> {
    if tail.is_empty() {
        return split_block(head);
    }
    let cut = memchr::memrchr(b'\n', head).map_or(0, |at| at + 1);
    let mut lines = split_block(&head[..cut]);
    shared.extend_from_slice(&head[cut..]);
    shared.extend_from_slice(tail);
    let shared: &'a Vec<u8> = shared;
    lines.extend(split_block(shared));
    lines
}

/// A block's lines (it ends with a newline), without their newlines.
fn split_block(block: &[u8]) -> Vec<&[u8]> {
    let mut lines = Vec::with_capacity(block.len() / 256);
    let mut start = 0;
    for end in memchr::memchr_iter(b'\n', block) {
        lines.push(&block[start..end]);
        start = end + 1;
    }
    lines
}

/// `crlf_to_lf(block: bytes, tail: bytes | None = None) -> bytes`: `block` followed by `tail`
/// with each CRLF line end made LF (a lone CR, JSON whitespace, is kept), as
/// `_lines.crlf_to_lf` makes it, in one copy (`block` itself when there is nothing to do).
/// Called from the thread that reads, so the new 2 MB object comes from that thread's heap
/// (made in the checking threads, their heaps grew and shrank by it: 150k page faults more a
/// million lines).
#[pyfunction]
#[pyo3(text_signature = "(block, tail=None)")]
fn crlf_to_lf(py: Python<'_>, block: &PyBytes, tail: Option<&PyBytes>) -> PyResult<PyObject> {
    let head = block.as_bytes();
    let tail = tail.map_or(&b""[..], |tail| tail.as_bytes());
    // a CRLF split between the two parts is one too
    let across = head.last() == Some(&b'\r') && tail.first() == Some(&b'\n');
    let ends = |part: &'_ [u8]| memchr::memmem::find_iter(part, b"\r\n").count();
    let count = ends(head) + ends(tail) + across as usize;
    if count == 0 && tail.is_empty() {
        return Ok(block.into_py(py));
    }
    let size = head.len() + tail.len() - count;
    // An uninitialized bytes object of the final size, filled before anyone sees it (the
    // safe PyBytes::new_with would first zero it).
    unsafe {
        let object = pyo3::ffi::PyBytes_FromStringAndSize(std::ptr::null(), size as isize);
        let joined: PyObject = PyObject::from_owned_ptr_or_err(py, object)?;
        let out =
            std::slice::from_raw_parts_mut(pyo3::ffi::PyBytes_AsString(object) as *mut u8, size);
        let mut at = 0;
        let head_kept = if across {
            &head[..head.len() - 1]
        } else {
            head
        };
        for part in [head_kept, tail] {
            let mut start = 0;
            for end in memchr::memmem::find_iter(part, b"\r\n") {
                out[at..at + end - start].copy_from_slice(&part[start..end]);
                at += end - start;
                start = end + 1;
            }
            out[at..at + part.len() - start].copy_from_slice(&part[start..]);
            at += part.len() - start;
        }
        debug_assert_eq!(at, size);
        Ok(joined)
    }
}

#[pymodule]
fn _native(_py: Python<'_>, module: &PyModule) -> PyResult<()> {
    module.add_function(wrap_pyfunction!(requests::check_block, module)?)?;
    module.add_function(wrap_pyfunction!(crlf_to_lf, module)?)?;
    module.add_function(wrap_pyfunction!(hash_ids, module)?)?;
    module.add_function(wrap_pyfunction!(results::join_block, module)?)?;
    module.add_function(wrap_pyfunction!(results::gather_lines, module)?)?;
    module.add_function(wrap_pyfunction!(results::lines_start_with, module)?)?;
    module.add_class::<results::LatestEntries>()?;
    Ok(())
}
