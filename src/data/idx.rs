//! IDX files (the MNIST container format), gzip-compressed or raw.
//!
//! Layout: two zero bytes, an element-type byte (0x08 = unsigned byte, the only one MNIST uses),
//! the number of dimensions, one big-endian u32 per dimension, then the elements in row-major order.

use std::borrow::Cow;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

/// A data file that could not be used, with the file named and what was wrong with it.
#[derive(Debug)]
pub struct DataError {
    pub path: PathBuf,
    pub problem: String,
}

impl fmt::Display for DataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.problem)
    }
}

impl std::error::Error for DataError {}

impl DataError {
    pub fn new(path: &Path, problem: impl Into<String>) -> Self {
        DataError { path: path.to_path_buf(), problem: problem.into() }
    }
}

/// An IDX array of unsigned bytes.
#[derive(Debug, Clone)]
pub struct IdxArray {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
const TYPE_U8: u8 = 0x08;

/// Reads the whole file, gunzipping it when it starts with the gzip magic (whatever its name).
fn read_bytes(path: &Path) -> Result<Vec<u8>, DataError> {
    std::fs::read(path).map_err(|e| {
        let problem = if e.kind() == std::io::ErrorKind::NotFound {
            "file not found".to_string()
        } else {
            format!("cannot read file: {e}")
        };
        DataError::new(path, problem)
    })
}

/// The IDX bytes of a file's contents: gunzipped when they start with the gzip magic. A gzip stream is
/// read no further than its header declares (plus one byte, to see trailing data), so a small file
/// that inflates without end cannot exhaust the memory.
fn inflate<'a>(path: &Path, raw: &'a [u8]) -> Result<Cow<'a, [u8]>, DataError> {
    if !raw.starts_with(&GZIP_MAGIC) {
        return Ok(Cow::Borrowed(raw));
    }
    let corrupt = |e: std::io::Error| DataError::new(path, format!("truncated or corrupt gzip stream ({e})"));
    let mut stream = flate2::read::GzDecoder::new(raw);
    let mut out = Vec::new();
    (&mut stream).take(4).read_to_end(&mut out).map_err(corrupt)?;
    if out.len() < 4 || out[..2] != [0, 0] {
        // Not an IDX header: parse_idx says what is wrong.
        return Ok(Cow::Owned(out));
    }
    let ndim = out[3] as u64;
    (&mut stream).take(4 * ndim).read_to_end(&mut out).map_err(corrupt)?;
    let declared = out[4..]
        .chunks_exact(4)
        .try_fold(1u64, |acc, c| acc.checked_mul(u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as u64));
    // An overflowing product is refused by parse_idx; one more byte than declared shows trailing data.
    let limit = declared.map_or(0, |n| n.saturating_add(1));
    let header = out.len();
    stream.take(limit).read_to_end(&mut out).map_err(corrupt)?;
    if let Some(n) = declared.filter(|&n| (out.len() - header) as u64 > n) {
        return Err(DataError::new(
            path,
            format!("unexpected trailing data after the {n} data bytes its header declares"),
        ));
    }
    Ok(Cow::Owned(out))
}

/// Checks the contents of an IDX file, gzipped or raw. `path` only names the file in errors.
pub fn decode_idx(path: &Path, raw: &[u8]) -> Result<IdxArray, DataError> {
    parse_idx(path, &inflate(path, raw)?)
}

/// Parses IDX bytes. `path` only names the file in errors.
pub fn parse_idx(path: &Path, bytes: &[u8]) -> Result<IdxArray, DataError> {
    if bytes.len() < 4 {
        return Err(DataError::new(
            path,
            format!("truncated: {} bytes, shorter than the 4-byte IDX header", bytes.len()),
        ));
    }
    if bytes[0] != 0 || bytes[1] != 0 {
        return Err(DataError::new(
            path,
            format!(
                "wrong magic number {:02x} {:02x} {:02x} {:02x}: not an IDX file (expected 00 00 08 NN)",
                bytes[0], bytes[1], bytes[2], bytes[3]
            ),
        ));
    }
    if bytes[2] != TYPE_U8 {
        return Err(DataError::new(
            path,
            format!("element type 0x{:02x} is not supported (expected 0x08, unsigned byte)", bytes[2]),
        ));
    }
    let ndim = bytes[3] as usize;
    if ndim == 0 {
        return Err(DataError::new(path, "IDX header declares 0 dimensions"));
    }
    let header_len = 4 + 4 * ndim;
    if bytes.len() < header_len {
        return Err(DataError::new(
            path,
            format!("truncated: header declares {ndim} dimensions but the file has {} bytes", bytes.len()),
        ));
    }
    let dims: Vec<usize> =
        bytes[4..header_len].chunks_exact(4).map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize).collect();
    let expected = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| DataError::new(path, format!("dimensions {dims:?} overflow")))?;
    let actual = bytes.len() - header_len;
    if actual < expected {
        return Err(DataError::new(
            path,
            format!("truncated: dimensions {dims:?} need {expected} data bytes but the file has {actual}"),
        ));
    }
    if actual > expected {
        return Err(DataError::new(
            path,
            format!(
                "{} unexpected trailing bytes after the {expected} data bytes of dimensions {dims:?}",
                actual - expected
            ),
        ));
    }
    Ok(IdxArray { dims, data: bytes[header_len..].to_vec() })
}

/// Reads and checks one IDX file.
pub fn read_idx(path: &Path) -> Result<IdxArray, DataError> {
    decode_idx(path, &read_bytes(path)?)
}
