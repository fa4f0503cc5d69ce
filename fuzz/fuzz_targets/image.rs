//! `predict`'s reading of a picture: decoding any file contents as PNG or JPEG, then the MNIST-style
//! preprocessing of whatever decodes. Pictures up to 1024 pixels a side (the program's limit is 8192),
//! so that an input declaring a huge picture costs milliseconds, not a second.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mnist_wgpu::data::preprocess::{decode_within, preprocess};

fuzz_target!(|bytes: &[u8]| {
    if let Ok(img) = decode_within(bytes, 1024) {
        if let Ok(pixels) = preprocess(&img) {
            assert_eq!(pixels.len(), 28 * 28);
        }
    }
});
