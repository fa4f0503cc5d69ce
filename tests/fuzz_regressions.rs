//! Inputs the fuzz targets of `fuzz/` crashed on, kept so that they stay handled.

use std::path::Path;

use mnist_wgpu::data::preprocess::{decode, preprocess};

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fuzz").join(name)).unwrap()
}

/// Found by the `image` target: a malformed JPEG on which zune-jpeg 0.5.15 multiplies past i32's range
/// (bitstream.rs:400). With overflow checks (the fuzz build, `cargo test` without --release) that
/// panicked; `decode` now fails the file instead. Without them it wraps and decodes to something.
#[test]
fn a_jpeg_that_overflows_the_decoder_is_an_error_or_a_picture_not_a_panic() {
    let bytes = fixture("image-zune-jpeg-overflow.jpg");
    match decode(&bytes) {
        Ok(img) => {
            let _ = preprocess(&img);
        }
        Err(why) => assert!(why.contains("cannot read it as an image"), "{why}"),
    }
}
