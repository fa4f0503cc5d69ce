//! Every shader parses and validates with naga (no GPU needed), with the prelude it is compiled with,
//! and every .wgsl file in shaders/ is one the host knows.

use mnist_wgpu::gpu::kernel::{validate, SHADERS};

#[test]
fn every_shader_validates() {
    for (name, body) in SHADERS {
        let (module, _) = validate(name, body).unwrap_or_else(|e| panic!("{e}"));
        assert!(!module.entry_points.is_empty(), "{name} has no entry point");
    }
}

#[test]
fn every_shader_file_is_loaded() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let stem = path.file_stem().unwrap().to_string_lossy().to_string();
        if path.extension().is_some_and(|e| e == "wgsl") && stem != "common" {
            let (_, body) = SHADERS
                .iter()
                .find(|(n, _)| *n == stem)
                .unwrap_or_else(|| panic!("{} is not in SHADERS", path.display()));
            assert_eq!(*body, std::fs::read_to_string(&path).unwrap());
        }
    }
}

#[test]
fn a_broken_shader_is_reported_with_its_name() {
    let err = validate("broken", "fn f( {").unwrap_err().to_string();
    assert!(err.contains("shaders/broken.wgsl"), "{err}");
}
