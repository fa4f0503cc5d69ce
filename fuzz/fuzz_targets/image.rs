//! `predict`'s reading of a picture: decoding any file contents as PNG or JPEG, then the MNIST-style
//! preprocessing of whatever decodes. Pictures up to 1024 pixels a side (the program's limit is 8192),
//! so that an input declaring a huge picture costs milliseconds, not a second.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mnist_wgpu::data::preprocess::{decode_within, preprocess};

/// zune-jpeg 0.5.15 (the JPEG decoder of image 0.25, the newest there is) overflows an i32 on a
/// malformed file (`tests/fuzz_regressions.rs`): with the fuzz build's overflow checks that panics, and
/// `decode_within` turns the panic into the file's error. libFuzzer's panic hook would abort on it
/// first, so panics inside zune-jpeg are let through to that catch; any other panic still aborts.
fn tolerate_jpeg_decoder_overflows() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let strict = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !info.location().is_some_and(|at| at.file().contains("/zune-jpeg-")) {
                strict(info);
            }
        }));
    });
}

fuzz_target!(|bytes: &[u8]| {
    tolerate_jpeg_decoder_overflows();
    if let Ok(img) = decode_within(bytes, 1024) {
        if let Ok(pixels) = preprocess(&img) {
            assert_eq!(pixels.len(), 28 * 28);
        }
    }
});
