//! The data set: IDX files in, checked image and label arrays out. Knows nothing of models or wgpu.

pub mod augment;
pub mod idx;
pub mod loader;
pub mod preprocess;

use std::path::{Path, PathBuf};

pub use idx::{read_idx, DataError, IdxArray};

pub const IMAGE_SIDE: usize = 28;
pub const IMAGE_PIXELS: usize = IMAGE_SIDE * IMAGE_SIDE;
pub const NUM_CLASSES: usize = 10;

/// MNIST's mean and standard deviation of [0, 1] pixels (recipe step 5).
pub const MEAN: f32 = 0.1307;
pub const STD: f32 = 0.3081;

/// The folder of MNIST that ships with the project.
pub fn default_dir() -> PathBuf {
    // A bundle (scripts/gpu-bundle.sh) carries the data beside the executable: dist/data/mnist.
    let beside_exe = std::env::current_exe().ok().and_then(|exe| exe.parent().map(|d| d.join("data").join("mnist")));
    match beside_exe {
        Some(dir) if dir.is_dir() => dir,
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("data").join("mnist"),
    }
}

/// Images (u8, row-major, `IMAGE_PIXELS` each) with their labels.
#[derive(Debug, Clone)]
pub struct Split {
    pub images: Vec<u8>,
    pub labels: Vec<u8>,
}

impl Split {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn image(&self, i: usize) -> &[u8] {
        &self.images[i * IMAGE_PIXELS..(i + 1) * IMAGE_PIXELS]
    }

    /// The first `n` images and labels (all of them when there are fewer).
    pub fn first(&self, n: usize) -> Split {
        let n = n.min(self.len());
        Split { images: self.images[..n * IMAGE_PIXELS].to_vec(), labels: self.labels[..n].to_vec() }
    }

    /// The images after the first `from` (none when there are fewer).
    pub fn skip(&self, from: usize) -> Split {
        let from = from.min(self.len());
        Split { images: self.images[from * IMAGE_PIXELS..].to_vec(), labels: self.labels[from..].to_vec() }
    }
}

#[derive(Debug, Clone)]
pub struct Mnist {
    pub train: Split,
    pub test: Split,
}

/// The standard file names, without the optional `.gz`.
pub const TRAIN_IMAGES: &str = "train-images-idx3-ubyte";
pub const TRAIN_LABELS: &str = "train-labels-idx1-ubyte";
pub const TEST_IMAGES: &str = "t10k-images-idx3-ubyte";
pub const TEST_LABELS: &str = "t10k-labels-idx1-ubyte";

/// Loads the four standard IDX files from `dir` (each may be gzipped, as `NAME.gz`, or raw, as `NAME`).
/// Works for any MNIST-format set: Fashion-MNIST, KMNIST, ...
pub fn load_dir(dir: &Path) -> Result<Mnist, DataError> {
    if !dir.is_dir() {
        return Err(DataError::new(dir, "data folder not found (it should hold the four MNIST IDX files)"));
    }
    Ok(Mnist {
        train: load_split(&find(dir, TRAIN_IMAGES)?, &find(dir, TRAIN_LABELS)?)?,
        test: load_split(&find(dir, TEST_IMAGES)?, &find(dir, TEST_LABELS)?)?,
    })
}

fn find(dir: &Path, stem: &str) -> Result<PathBuf, DataError> {
    let gz = dir.join(format!("{stem}.gz"));
    let raw = dir.join(stem);
    if gz.is_file() {
        Ok(gz)
    } else if raw.is_file() {
        Ok(raw)
    } else {
        Err(DataError::new(&gz, format!("file not found (nor {})", raw.display())))
    }
}

/// Loads one images file and its labels file and checks that they agree.
pub fn load_split(images_path: &Path, labels_path: &Path) -> Result<Split, DataError> {
    split_of(images_path, read_idx(images_path)?, labels_path, read_idx(labels_path)?)
}

/// One images file and its labels file from their bytes (each gzipped or raw), checked as
/// `load_split` checks them; the paths only name the files in errors.
pub fn split_from_bytes(
    images_path: &Path,
    images: &[u8],
    labels_path: &Path,
    labels: &[u8],
) -> Result<Split, DataError> {
    split_of(images_path, idx::decode_idx(images_path, images)?, labels_path, idx::decode_idx(labels_path, labels)?)
}

fn split_of(images_path: &Path, images: IdxArray, labels_path: &Path, labels: IdxArray) -> Result<Split, DataError> {
    if images.dims.len() != 3 || images.dims[1] != IMAGE_SIDE || images.dims[2] != IMAGE_SIDE {
        return Err(DataError::new(
            images_path,
            format!("expected images of shape N x {IMAGE_SIDE} x {IMAGE_SIDE}, found dimensions {:?}", images.dims),
        ));
    }
    if labels.dims.len() != 1 {
        return Err(DataError::new(
            labels_path,
            format!("expected a 1-dimensional labels file, found dimensions {:?}", labels.dims),
        ));
    }
    if images.dims[0] != labels.dims[0] {
        return Err(DataError::new(
            labels_path,
            format!(
                "count mismatch: {} labels but {} has {} images",
                labels.dims[0],
                images_path.display(),
                images.dims[0]
            ),
        ));
    }
    if let Some((i, &l)) = labels.data.iter().enumerate().find(|(_, &l)| l as usize >= NUM_CLASSES) {
        return Err(DataError::new(labels_path, format!("label {l} at index {i} is not a digit 0..=9")));
    }
    Ok(Split { images: images.data, labels: labels.data })
}

/// Recipe step 5 for one image: bytes to [0, 1], then (x - MEAN) / STD.
pub fn normalize_into(pixels: &[u8], out: &mut [f32]) {
    for (o, &p) in out.iter_mut().zip(pixels) {
        *o = (p as f32 / 255.0 - MEAN) / STD;
    }
}
