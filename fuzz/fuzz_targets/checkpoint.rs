//! The checkpoint loader on any file contents: the model file a checkpoint holds (parsed as `eval` and
//! `--resume` parse it), then its weights and its momenta, as a state_dict and as an optimizer file,
//! for the model it names or for Net3.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use mnist_wgpu::checkpoint::{optim_in, stored_model_in, weights_in};
use mnist_wgpu::model::{file, Model, Shape};

fuzz_target!(|bytes: &[u8]| {
    let path = Path::new("fuzz.safetensors");
    let input = Shape { c: 1, h: 28, w: 28 };
    let model = match stored_model_in(path, bytes) {
        Ok(Some(text)) => match file::parse(&text, "fuzz.safetensors", input, 10) {
            Ok(model) => model,
            Err(_) => return,
        },
        Ok(None) => Model::net3(),
        Err(_) => return,
    };
    if let Ok(ck) = weights_in(path, bytes, &model) {
        assert_eq!(ck.state.len(), model.num_state);
        assert!(ck.state.iter().all(|v| v.is_finite()));
    }
    if let Ok((optim, _)) = optim_in(path, bytes, &model) {
        assert_eq!(optim.moments.len(), 2 * model.num_trainable);
    }
});
