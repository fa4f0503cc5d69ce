//! Every shader parses and validates with naga (no GPU needed), with the prelude it is compiled with,
//! and every .wgsl file in shaders/ is one the host knows.

use mnist_wgpu::gpu::kernel::{validate, PRELUDES, SHADERS};

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
        if path.extension().is_some_and(|e| e == "wgsl") && !PRELUDES.contains(&stem.as_str()) {
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

/// The environment variable CI sets; there a missing spirv-val is an error, not a note.
fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// Validates SPIR-V words with spirv-val for Vulkan 1.0 (what wgpu asks for); None when spirv-val is
/// not installed.
fn spirv_val(words: &[u32], what: &str) -> Option<()> {
    let path = std::env::temp_dir().join(format!("mnist-wgpu-{}-{what}.spv", std::process::id()));
    std::fs::write(&path, bytemuck::cast_slice::<u32, u8>(words)).unwrap();
    let out = std::process::Command::new("spirv-val").arg("--target-env").arg("vulkan1.0").arg(&path).output();
    let _ = std::fs::remove_file(&path);
    let out = out.ok()?;
    assert!(
        out.status.success(),
        "spirv-val rejects the SPIR-V of {what}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some(())
}

/// Every entry point of every shader, validated with each backend's own capabilities, translates with
/// naga to SPIR-V (Vulkan), MSL (Metal), HLSL (DX12) and GLSL ES 3.1 (GL), as wgpu does when it builds
/// the pipeline; the SPIR-V is checked by spirv-val (spirv-tools) when it is installed, and always in CI.
#[test]
fn every_entry_point_translates_to_every_backend() {
    use naga::back::{glsl, hlsl, msl, spv};
    use naga::valid::{Capabilities, ValidationFlags, Validator};
    let have_spirv_val = std::process::Command::new("spirv-val").arg("--version").output().is_ok();
    if !have_spirv_val {
        assert!(!in_ci(), "spirv-val not found: CI must validate the SPIR-V (apt-get install spirv-tools)");
        eprintln!("NOTE: spirv-val not found (apt-get install spirv-tools): SPIR-V translated but not validated");
    }
    let validate_for = |module: &naga::Module, caps: Capabilities, lang: &str, name: &str| {
        Validator::new(ValidationFlags::all(), caps)
            .validate(module)
            .unwrap_or_else(|e| panic!("shaders/{name}.wgsl is not valid for {lang}: {e:?}"))
    };
    let mut translated = 0;
    for (name, body) in SHADERS {
        let source = mnist_wgpu::gpu::kernel::full_source(name, body);
        let module = naga::front::wgsl::parse_str(&source).unwrap_or_else(|e| panic!("{name}: {e}"));
        let spv_info = validate_for(&module, spv::supported_capabilities(), "SPIR-V", name);
        let msl_info = validate_for(&module, msl::supported_capabilities(), "MSL", name);
        let hlsl_info = validate_for(&module, hlsl::supported_capabilities(), "HLSL", name);
        let glsl_info = validate_for(&module, glsl::supported_capabilities(), "GLSL", name);
        for ep in &module.entry_points {
            let what = format!("{name}.{}", ep.name);
            let stage = ep.stage;

            let words = spv::write_vec(
                &module,
                &spv_info,
                &spv::Options::default(),
                Some(&spv::PipelineOptions { shader_stage: stage, entry_point: ep.name.clone() }),
            )
            .unwrap_or_else(|e| panic!("{what} to SPIR-V: {e}"));
            if have_spirv_val {
                spirv_val(&words, &what).expect("spirv-val ran a moment ago");
            }

            let msl_options = msl::Options { lang_version: (2, 0), ..Default::default() };
            let msl_pipeline =
                msl::PipelineOptions { entry_point: Some((stage, ep.name.clone())), ..Default::default() };
            let (metal, _) = msl::write_string(&module, &msl_info, &msl_options, &msl_pipeline)
                .unwrap_or_else(|e| panic!("{what} to MSL: {e}"));
            assert!(metal.contains("kernel void"), "{what}: no MSL kernel function");

            let mut hlsl_text = String::new();
            let hlsl_options = hlsl::Options::default();
            let hlsl_pipeline = hlsl::PipelineOptions { entry_point: Some((stage, ep.name.clone())) };
            hlsl::Writer::new(&mut hlsl_text, &hlsl_options, &hlsl_pipeline)
                .write(&module, &hlsl_info, None)
                .unwrap_or_else(|e| panic!("{what} to HLSL: {e}"));
            assert!(hlsl_text.contains("[numthreads("), "{what}: no HLSL compute entry point");

            let mut glsl_text = String::new();
            let glsl_options = glsl::Options::default();
            let glsl_pipeline =
                glsl::PipelineOptions { shader_stage: stage, entry_point: ep.name.clone(), multiview: None };
            glsl::Writer::new(&mut glsl_text, &module, &glsl_info, &glsl_options, &glsl_pipeline, Default::default())
                .and_then(|mut w| w.write())
                .unwrap_or_else(|e| panic!("{what} to GLSL: {e}"));
            assert!(glsl_text.starts_with("#version 310 es"), "{what}: not GLSL ES 3.1");
            translated += 1;
        }
    }
    eprintln!(
        "{translated} entry points translated to SPIR-V{}, MSL, HLSL and GLSL",
        if have_spirv_val { " (spirv-val: valid)" } else { "" }
    );
    assert!(translated >= 15, "only {translated} entry points");
}
