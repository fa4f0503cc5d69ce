//! `predict`'s reading of a picture: decoding any file contents as PNG or JPEG, then the MNIST-style
//! preprocessing of whatever decodes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mnist_wgpu::data::preprocess::{decode, preprocess};

fuzz_target!(|bytes: &[u8]| {
    if let Ok(img) = decode(bytes) {
        if let Ok(pixels) = preprocess(&img) {
            assert_eq!(pixels.len(), 28 * 28);
        }
    }
});
