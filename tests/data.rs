//! The IDX reader and the data folder: the bundled MNIST loads, and every malformed input gives an error
//! that names the file and the problem. The broken files are made here, in a temporary folder.

mod common;

use std::path::{Path, PathBuf};

use common::{gzip, idx_bytes, write_set};
use mnist_wgpu::data::{self, load_dir, read_idx, TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS};

/// A fresh folder under the target directory, unique per test.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("data-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn error_of(dir: &Path) -> String {
    load_dir(dir).expect_err("loading should fail").to_string()
}

#[test]
fn bundled_mnist_loads_with_the_published_counts() {
    let m = load_dir(&data::default_dir()).expect("bundled MNIST loads");
    assert_eq!((m.train.len(), m.test.len()), (60_000, 10_000));
    let mut counts = [0usize; 10];
    m.test.labels.iter().for_each(|&l| counts[l as usize] += 1);
    // Per-class test counts from the data set's README.
    assert_eq!(counts, [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]);
    let mut counts = [0usize; 10];
    m.train.labels.iter().for_each(|&l| counts[l as usize] += 1);
    assert_eq!(counts, [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]);
    // The first training image is a 5, as everybody's first MNIST tutorial shows.
    assert_eq!(m.train.labels[0], 5);
}

#[test]
fn raw_and_gzip_folders_load_alike() {
    for gz in [false, true] {
        let dir = scratch(&format!("valid-{gz}"));
        write_set(&dir, 20, 10, gz);
        let m = load_dir(&dir).unwrap();
        assert_eq!((m.train.len(), m.test.len()), (20, 10));
        assert_eq!(m.train.image(3), &[7u8; 784][..]);
        assert_eq!(m.test.labels[9], 9);
    }
}

#[test]
fn missing_folder_and_missing_file() {
    let e = error_of(Path::new("/nonexistent/mnist"));
    assert!(e.contains("/nonexistent/mnist") && e.contains("not found"), "{e}");
    let dir = scratch("missing");
    write_set(&dir, 20, 10, true);
    std::fs::remove_file(dir.join(format!("{TEST_LABELS}.gz"))).unwrap();
    let e = error_of(&dir);
    assert!(e.contains(TEST_LABELS) && e.contains("not found"), "{e}");
}

#[test]
fn wrong_magic() {
    let dir = scratch("magic");
    write_set(&dir, 20, 10, false);
    let mut bytes = std::fs::read(dir.join(TRAIN_IMAGES)).unwrap();
    bytes[0] = 0x50; // e.g. a PNG or text file under the IDX name
    std::fs::write(dir.join(TRAIN_IMAGES), bytes).unwrap();
    let e = error_of(&dir);
    assert!(e.contains(TRAIN_IMAGES) && e.contains("wrong magic number"), "{e}");
}

#[test]
fn unsupported_element_type() {
    let dir = scratch("dtype");
    write_set(&dir, 20, 10, false);
    let mut bytes = std::fs::read(dir.join(TRAIN_LABELS)).unwrap();
    bytes[2] = 0x0d; // float
    std::fs::write(dir.join(TRAIN_LABELS), bytes).unwrap();
    let e = error_of(&dir);
    assert!(e.contains(TRAIN_LABELS) && e.contains("element type 0x0d"), "{e}");
}

#[test]
fn truncated_data_header_and_gzip() {
    let dir = scratch("truncated");
    write_set(&dir, 20, 10, false);
    let path = dir.join(TEST_IMAGES);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let e = error_of(&dir);
    assert!(e.contains(TEST_IMAGES) && e.contains("truncated") && e.contains("7740"), "{e}");
    std::fs::write(&path, &bytes[..10]).unwrap();
    let e = read_idx(&path).unwrap_err().to_string();
    assert!(e.contains("truncated") && e.contains("header"), "{e}");
    // A gzip file cut short.
    let gz = gzip(&bytes);
    std::fs::remove_file(&path).unwrap();
    let gz_path = dir.join(format!("{TEST_IMAGES}.gz"));
    std::fs::write(&gz_path, &gz[..gz.len() / 2]).unwrap();
    let e = error_of(&dir);
    assert!(e.contains(&format!("{TEST_IMAGES}.gz")) && e.contains("truncated or corrupt gzip"), "{e}");
}

#[test]
fn trailing_bytes() {
    let dir = scratch("trailing");
    write_set(&dir, 20, 10, false);
    let path = dir.join(TRAIN_LABELS);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.extend_from_slice(&[1, 2, 3]);
    std::fs::write(&path, bytes).unwrap();
    let e = error_of(&dir);
    assert!(e.contains(TRAIN_LABELS) && e.contains("3 unexpected trailing bytes"), "{e}");
}

/// A small gzip file that inflates far beyond what its header declares (here 1 label, then 64 MiB of
/// zeros) is read no further than the header's length plus one byte, and refused for its trailing data.
#[test]
fn a_gzip_stream_is_read_no_further_than_its_header_declares() {
    let dir = scratch("inflating");
    write_set(&dir, 20, 10, true);
    let mut bytes = idx_bytes(&[1], &[7]);
    bytes.resize(bytes.len() + (64 << 20), 0);
    let packed = gzip(&bytes);
    assert!(packed.len() < 1 << 20, "the file itself is small: {} bytes", packed.len());
    std::fs::write(dir.join(format!("{TRAIN_LABELS}.gz")), packed).unwrap();
    let e = error_of(&dir);
    assert!(e.contains(TRAIN_LABELS) && e.contains("unexpected trailing data after the 1 data bytes"), "{e}");
}

#[test]
fn count_mismatch() {
    let dir = scratch("count");
    write_set(&dir, 20, 10, false);
    std::fs::write(dir.join(TRAIN_LABELS), idx_bytes(&[19], &[1; 19])).unwrap();
    let e = error_of(&dir);
    assert!(
        e.contains(TRAIN_LABELS) && e.contains("count mismatch") && e.contains("19 labels") && e.contains("20 images"),
        "{e}"
    );
}

#[test]
fn label_out_of_range() {
    let dir = scratch("label");
    write_set(&dir, 20, 10, false);
    let mut labels = vec![1u8; 10];
    labels[4] = 10;
    std::fs::write(dir.join(TEST_LABELS), idx_bytes(&[10], &labels)).unwrap();
    let e = error_of(&dir);
    assert!(e.contains(TEST_LABELS) && e.contains("label 10 at index 4"), "{e}");
}

#[test]
fn wrong_image_size() {
    let dir = scratch("size");
    write_set(&dir, 20, 10, false);
    std::fs::write(dir.join(TEST_IMAGES), idx_bytes(&[10, 32, 32], &vec![0; 10 * 32 * 32])).unwrap();
    let e = error_of(&dir);
    assert!(e.contains(TEST_IMAGES) && e.contains("28 x 28") && e.contains("[10, 32, 32]"), "{e}");
}
