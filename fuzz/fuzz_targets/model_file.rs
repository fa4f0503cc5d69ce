//! The model-file parser on any text (what `--model FILE` reads), and, for a file it accepts, the
//! execution plan and the model file written back, which must parse to the same network.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mnist_wgpu::model::{file, Shape};

fuzz_target!(|bytes: &[u8]| {
    let Ok(text) = std::str::from_utf8(bytes) else { return };
    let input = Shape { c: 1, h: 28, w: 28 };
    if let Ok(model) = file::parse(text, "fuzz.toml", input, 10) {
        let again = file::parse(&model.to_toml(), "written back", input, 10).expect("a model's own file parses");
        assert_eq!(again.params.len(), model.params.len());
        assert_eq!(again.num_state, model.num_state);
        let _ = model.summary();
    }
});
