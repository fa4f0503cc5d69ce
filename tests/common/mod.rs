//! Helpers shared by the integration tests: the PyTorch fixture and error measures.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use mnist_wgpu::data::{TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS};
use safetensors::{Dtype, SafeTensors};

/// A tensor of the fixture, converted to f64 whatever its stored type.
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

impl Tensor {
    pub fn f32s(&self) -> Vec<f32> {
        self.data.iter().map(|&v| v as f32).collect()
    }
}

pub struct Fixture(pub HashMap<String, Tensor>);

impl Fixture {
    /// Net3's fixture (scripts/torch_reference.py).
    pub fn load() -> Fixture {
        Fixture::load_named("torch_reference")
    }

    /// tests/fixtures/NAME.safetensors.
    pub fn load_named(name: &str) -> Fixture {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/{name}.safetensors"));
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let st = SafeTensors::deserialize(&bytes).expect("fixture is valid safetensors");
        let mut map = HashMap::new();
        for (name, view) in st.tensors() {
            let raw = view.data();
            let data: Vec<f64> = match view.dtype() {
                Dtype::F32 => raw.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
                Dtype::F64 => raw.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect(),
                Dtype::I64 => raw.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
                other => panic!("fixture tensor {name} has unexpected dtype {other:?}"),
            };
            map.insert(name.to_string(), Tensor { shape: view.shape().to_vec(), data });
        }
        Fixture(map)
    }

    pub fn get(&self, name: &str) -> &Tensor {
        self.0.get(name).unwrap_or_else(|| panic!("fixture has no tensor {name}"))
    }
}

/// max |got - want| / max(max |want|, floor): the error relative to the tensor's largest value.
/// The same measure `verify` uses (infinite for non-finite values or a length mismatch).
pub fn rel_err(got: &[f32], want: &[f32], floor: f32) -> f32 {
    mnist_wgpu::verify::rel_err(got, want, floor) as f32
}

/// Asserts `rel_err <= tol`, naming the tensor; returns the error for reporting.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) -> f32 {
    assert!(got.iter().all(|v| v.is_finite()), "{what}: non-finite value");
    let err = rel_err(got, want, 1e-6);
    assert!(err <= tol, "{what}: error {err:e} relative to its largest value exceeds {tol:e}");
    eprintln!("{what:<32} rel err {err:.2e} (tol {tol:.0e})");
    err
}

use std::sync::OnceLock;

use mnist_wgpu::gpu::{GpuContext, Kernels};

/// The environment variable that skips GPU tests, for machines that cannot have Vulkan; CI never sets it.
pub const SKIP_GPU: &str = "MNIST_WGPU_SKIP_GPU_TESTS";

/// The adapter the GPU tests use: `MNIST_WGPU_ADAPTER` (as `--adapter` takes it), else the best one.
pub fn adapter_choice() -> Option<String> {
    std::env::var("MNIST_WGPU_ADAPTER").ok()
}

/// The device and compiled kernels, shared by the tests of one binary (compiling the shaders costs
/// seconds on lavapipe). `None` only when GPU tests are explicitly skipped; without an adapter the
/// test fails with the install hint.
pub fn gpu() -> Option<&'static (GpuContext, Kernels)> {
    if std::env::var_os(SKIP_GPU).is_some_and(|v| v == "1") {
        eprintln!("GPU test skipped: {SKIP_GPU}=1");
        return None;
    }
    static GPU: OnceLock<(GpuContext, Kernels)> = OnceLock::new();
    Some(GPU.get_or_init(|| {
        let ctx = GpuContext::new(adapter_choice().as_deref()).unwrap_or_else(|e| {
            panic!("{e:#}\n(to skip GPU tests on a machine that cannot have Vulkan, set {SKIP_GPU}=1)")
        });
        eprintln!("GPU tests on {} ({:?})", ctx.info.name, ctx.info.backend);
        let kernels = Kernels::new(&ctx).unwrap_or_else(|e| panic!("compiling the shaders: {e:#}"));
        (ctx, kernels)
    }))
}

/// For the gradient of parameter `name` (e.g. `conv1.bias`) in fixture `fx`: when it is a bias whose
/// layer feeds a batchnorm through per-channel shifts (pooling, a linear map), its gradient is zero in
/// exact arithmetic (the batchnorm subtracts the bias again), the float64 truth is rounding noise and a
/// relative error means nothing. Then returns the scale such a gradient is held to instead: its layer's
/// weight gradient's largest magnitude.
pub fn zero_bias_gradient_scale(fx: &Fixture, name: &str) -> Option<f64> {
    let largest = |t: &Tensor| t.data.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let truth = largest(fx.get(&format!("f64.step0.grad.{name}")));
    (name.ends_with(".bias") && truth < 1e-12)
        .then(|| largest(fx.get(&format!("f64.step0.grad.{}", name.replace(".bias", ".weight")))))
}

/// Asserts a gradient that is zero in exact arithmetic is within `tol` of `scale`; returns its size.
pub fn assert_zero_gradient(what: &str, got: &[f32], scale: f64, tol: f64) -> f64 {
    let ours = got.iter().fold(0.0f32, |m, v| m.max(v.abs())) as f64 / scale;
    eprintln!("{what:<34} zero in exact arithmetic: {ours:.2e} of its weight gradient's scale (tol {tol:.0e})");
    assert!(ours <= tol, "{what}: {ours:e} of its weight gradient's scale, where the truth is 0");
    ours
}

/// An IDX file of unsigned bytes: the dimensions, then the data.
pub fn idx_bytes(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut b = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        b.extend_from_slice(&d.to_be_bytes());
    }
    b.extend_from_slice(data);
    b
}

pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// A small valid data set in `dir`: `n_train` and `n_test` images of 28 x 28 with labels.
pub fn write_set(dir: &Path, n_train: u32, n_test: u32, gz: bool) {
    let write = |stem: &str, bytes: Vec<u8>| {
        if gz {
            std::fs::write(dir.join(format!("{stem}.gz")), gzip(&bytes)).unwrap();
        } else {
            std::fs::write(dir.join(stem), bytes).unwrap();
        }
    };
    let images = |n: u32| idx_bytes(&[n, 28, 28], &vec![7u8; n as usize * 784]);
    let labels = |n: u32| idx_bytes(&[n], &(0..n).map(|i| (i % 10) as u8).collect::<Vec<_>>());
    write(TRAIN_IMAGES, images(n_train));
    write(TRAIN_LABELS, labels(n_train));
    write(TEST_IMAGES, images(n_test));
    write(TEST_LABELS, labels(n_test));
}
