//! A user's own digit image made to look like an MNIST one, as MNIST's were made: to grey, light ink on
//! a dark background (a dark-on-light image is inverted), cropped to the ink, scaled to fit 20 x 20
//! keeping the aspect ratio, and placed in 28 x 28 with its centre of mass at the centre.

use image::imageops::FilterType;
use image::{DynamicImage, GrayImage, Luma};

use super::{IMAGE_PIXELS, IMAGE_SIDE};

/// The side of the box the digit is scaled to fit, as in MNIST.
const DIGIT_BOX: u32 = 20;
/// Ink is what stands this far (of 255) above the background; less everywhere is a blank image.
const MIN_INK: f32 = 40.0;

/// The largest picture `predict` reads, per side: a phone photo fits; a file claiming more is refused
/// before its pixels are decoded (the decoder's own allocation limit stays on as well).
pub const MAX_SIDE: u32 = 8192;

/// The largest picture file `predict` reads: far above any PNG or JPEG of `MAX_SIDE` pixels a side.
const MAX_FILE_BYTES: u64 = 256 << 20;

/// The bytes of a picture file, refusing one too large to be a picture `predict` can use before
/// reading it.
pub fn read_file(path: &std::path::Path) -> Result<Vec<u8>, String> {
    let size = std::fs::metadata(path).map_err(|e| format!("cannot read the file ({e})"))?.len();
    if size > MAX_FILE_BYTES {
        return Err(format!("the file has {} MiB; pictures over {} MiB are refused", size >> 20, MAX_FILE_BYTES >> 20));
    }
    std::fs::read(path).map_err(|e| format!("cannot read the file ({e})"))
}

/// Decodes a PNG or JPEG file's bytes, refusing pictures wider or taller than `MAX_SIDE`.
pub fn decode(bytes: &[u8]) -> Result<DynamicImage, String> {
    decode_within(bytes, MAX_SIDE)
}

/// `decode` with another largest side (the fuzz target's is smaller, so that each input runs fast).
/// A decoder that panics on a malformed file (zune-jpeg 0.5.15 overflows an i32 on one, which panics
/// in builds with overflow checks: `tests/fuzz_regressions.rs`) fails that file, not the program.
pub fn decode_within(bytes: &[u8], max_side: u32) -> Result<DynamicImage, String> {
    std::panic::catch_unwind(|| decode_unguarded(bytes, max_side))
        .unwrap_or_else(|_| Err("cannot read it as an image (its decoder failed on it)".into()))
}

fn decode_unguarded(bytes: &[u8], max_side: u32) -> Result<DynamicImage, String> {
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| format!("cannot read it as an image ({e})"))?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(max_side);
    limits.max_image_height = Some(max_side);
    reader.limits(limits);
    reader.decode().map_err(|e| match e {
        image::ImageError::Limits(_) => {
            format!("the picture is over {max_side} pixels wide or high (or too large to decode)")
        }
        e => format!("cannot read it as an image ({e})"),
    })
}

/// The 28 x 28 grey image (0 = background, 255 = ink) the network sees for `img`, or why there is
/// none (a blank image).
pub fn preprocess(img: &DynamicImage) -> Result<Vec<u8>, String> {
    let (w, h) = (img.width(), img.height());
    if w == 0 || h == 0 {
        return Err("the image has no pixels".into());
    }
    // Grey, with transparent pixels over white (a drawing on a transparent canvas is dark on light).
    let grey: Vec<f32> = img
        .to_rgba8()
        .pixels()
        .map(|p| {
            let [r, g, b, a] = p.0.map(|v| v as f32);
            let luma = 0.299 * r + 0.587 * g + 0.114 * b;
            (luma * a + 255.0 * (255.0 - a)) / 255.0
        })
        .collect();
    // The background is the border's median; a light one means dark ink, which is inverted.
    let background = border_median(&grey, w as usize, h as usize);
    let mut ink = grey;
    let light = background > 127.5;
    for v in ink.iter_mut() {
        *v = if light { background - *v } else { *v - background }.max(0.0);
    }
    let strongest = ink.iter().cloned().fold(0.0, f32::max);
    if strongest < MIN_INK {
        return Err("no digit found: the image is blank (no pixel stands out from its background)".into());
    }
    // Crop to the pixels with at least a quarter of the strongest ink, and stretch the ink to 0..=255.
    let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
    for (i, &v) in ink.iter().enumerate() {
        if v >= strongest / 4.0 {
            let (x, y) = (i % w as usize, i / w as usize);
            (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
        }
    }
    let (cw, ch) = ((x1 - x0 + 1) as u32, (y1 - y0 + 1) as u32);
    let crop = GrayImage::from_fn(cw, ch, |x, y| {
        let v = ink[(y0 + y as usize) * w as usize + x0 + x as usize];
        Luma([(v / strongest * 255.0).round() as u8])
    });
    // Fit 20 x 20, keeping the aspect ratio (the longer side becomes 20).
    let scale = DIGIT_BOX as f32 / cw.max(ch) as f32;
    let (sw, sh) = (((cw as f32 * scale).round() as u32).max(1), ((ch as f32 * scale).round() as u32).max(1));
    let digit = image::imageops::resize(&crop, sw, sh, FilterType::Triangle);
    // Place it so that its centre of mass lands on the centre of the 28 x 28 image, inside it.
    let (mut mass, mut mx, mut my) = (0.0f64, 0.0f64, 0.0f64);
    for (x, y, p) in digit.enumerate_pixels() {
        let v = p.0[0] as f64;
        (mass, mx, my) = (mass + v, mx + v * x as f64, my + v * y as f64);
    }
    let side = IMAGE_SIDE as i64;
    let centre = (side as f64 - 1.0) / 2.0;
    let place = |com: f64, len: u32| ((centre - com).round() as i64).clamp(0, side - len as i64);
    let (ox, oy) = if mass > 0.0 { (place(mx / mass, sw), place(my / mass, sh)) } else { (4, 4) };
    let mut out = vec![0u8; IMAGE_PIXELS];
    for (x, y, p) in digit.enumerate_pixels() {
        out[(oy as usize + y as usize) * IMAGE_SIDE + ox as usize + x as usize] = p.0[0];
    }
    Ok(out)
}

/// The median of the outermost rows and columns.
fn border_median(grey: &[f32], w: usize, h: usize) -> f32 {
    let mut border: Vec<f32> = (0..w).flat_map(|x| [grey[x], grey[(h - 1) * w + x]]).collect();
    border.extend((0..h).flat_map(|y| [grey[y * w], grey[y * w + w - 1]]));
    border.sort_by(f32::total_cmp);
    border[border.len() / 2]
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{Rgb, RgbImage};

    /// A large dark-on-light colour picture of a vertical bar, off centre.
    fn bar_picture() -> DynamicImage {
        DynamicImage::ImageRgb8(RgbImage::from_fn(300, 200, |x, y| {
            if (40..60).contains(&x) && (30..170).contains(&y) {
                Rgb([20, 30, 120])
            } else {
                Rgb([250, 245, 230])
            }
        }))
    }

    #[test]
    fn a_dark_on_light_picture_becomes_a_centred_light_on_dark_digit() {
        let out = preprocess(&bar_picture()).unwrap();
        let at = |x: usize, y: usize| out[y * IMAGE_SIDE + x];
        // The bar (140 tall, 20 wide) fits 20 tall, about 3 wide, centred: rows 4..24, around column 14.
        assert!(at(14, 14) > 200 && at(13, 14) > 0, "centre {} {}", at(13, 14), at(14, 14));
        assert_eq!((at(14, 2), at(14, 25), at(3, 14), at(24, 14)), (0, 0, 0, 0), "background stays 0");
        let rows: Vec<usize> = (0..IMAGE_SIDE).filter(|&y| (0..IMAGE_SIDE).any(|x| at(x, y) > 0)).collect();
        assert_eq!((rows[0], *rows.last().unwrap()), (4, 23), "20 rows of ink, centred");
        let total: u64 = out.iter().map(|&v| v as u64).sum();
        let com_x = out.iter().enumerate().map(|(i, &v)| (i % IMAGE_SIDE) as u64 * v as u64).sum::<u64>() as f64;
        assert!((com_x / total as f64 - 13.5).abs() <= 0.5, "centre of mass at x = {}", com_x / total as f64);
    }

    #[test]
    fn light_on_dark_stays_and_a_blank_image_is_refused() {
        let inverted = {
            let mut img = bar_picture().to_rgb8();
            img.pixels_mut().for_each(|p| p.0 = p.0.map(|v| 255 - v));
            DynamicImage::ImageRgb8(img)
        };
        assert_eq!(preprocess(&inverted).unwrap(), preprocess(&bar_picture()).unwrap());
        let blank = DynamicImage::ImageRgb8(RgbImage::from_pixel(64, 64, Rgb([240, 240, 240])));
        assert!(preprocess(&blank).unwrap_err().contains("blank"));
        let faint = DynamicImage::ImageRgb8(RgbImage::from_fn(64, 64, |x, _| Rgb([240 - (x % 2) as u8 * 10; 3])));
        assert!(preprocess(&faint).unwrap_err().contains("blank"));
    }
}
