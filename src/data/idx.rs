//! IDX files (the MNIST container format), gzip-compressed or raw.
//!
//! Layout: two zero bytes, an element-type byte (0x08 = unsigned byte, the only one MNIST uses),
//! the number of dimensions, one big-endian u32 per dimension, then the elements in row-major order.

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
    let raw = std::fs::read(path).map_err(|e| {
        let problem = if e.kind() == std::io::ErrorKind::NotFound {
            "file not found".to_string()
        } else {
            format!("cannot read file: {e}")
        };
        DataError::new(path, problem)
    })?;
    if !raw.starts_with(&GZIP_MAGIC) {
        return Ok(raw);
    }
    let mut out = Vec::with_capacity(raw.len() * 4);
    flate2::read::GzDecoder::new(&raw[..])
        .read_to_end(&mut out)
        .map_err(|e| DataError::new(path, format!("truncated or corrupt gzip stream ({e})")))?;
    Ok(out)
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
    parse_idx(path, &read_bytes(path)?)
}
