//! The IDX reader on any file contents, gzipped or raw (what `--data DIR` reads).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use mnist_wgpu::data::idx::decode_idx;

fuzz_target!(|bytes: &[u8]| {
    if let Ok(array) = decode_idx(Path::new("fuzz.idx"), bytes) {
        // What the reader promises: the data is exactly as long as the dimensions say.
        assert_eq!(array.data.len(), array.dims.iter().product::<usize>());
    }
});
