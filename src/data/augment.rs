//! The recipe's augmentation, on one 28 x 28 image of [0, 1] values, in the recipe's order:
//! pad 4 + random crop, colour jitter (brightness and contrast in random order), rotation, cutout.
//! Normalization (step 5) is `super::normalize_into`. Plus the three optional batch-level
//! augmentations (swell, darken, squeeze), off by default.

use rand::RngExt;

use super::{IMAGE_PIXELS, IMAGE_SIDE};

const S: usize = IMAGE_SIDE;

/// The draws of one image's augmentation, so that each transform can be tested on its own.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Draw {
    /// Crop offsets into the 36 x 36 padded image, 0..=8 each.
    pub crop: (usize, usize),
    pub brightness: f32,
    pub contrast: f32,
    pub brightness_first: bool,
    /// Degrees, counter-clockwise, in [-15, 15].
    pub angle: f32,
    /// Centre (x, y) of the 8 x 8 cutout square, each in 4..=24, or none.
    pub cutout: Option<(usize, usize)>,
}

pub const PAD: usize = 4;
pub const JITTER: f32 = 0.4;
pub const MAX_ANGLE: f32 = 15.0;
pub const CUTOUT_P: f64 = 0.3;
pub const CUTOUT_SIDE: usize = 8;

/// How strong the per-image augmentation is; the default is the recipe's. Smaller networks learn
/// better from milder augmentation (a preset's recipe may say so).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Augment {
    /// The crop's largest shift from the centre, in pixels each way (0 to PAD).
    pub translate: usize,
    /// Brightness and contrast factors are drawn from [1 - jitter, 1 + jitter].
    pub jitter: f32,
    /// The largest rotation, in degrees either way.
    pub rotate: f32,
    /// The probability of a cutout square.
    pub cutout: f64,
}

impl Augment {
    /// No augmentation at all: every strength 0 (each image is then its own normalized pixels).
    pub const NONE: Augment = Augment { translate: 0, jitter: 0.0, rotate: 0.0, cutout: 0.0 };
}

impl Default for Augment {
    fn default() -> Augment {
        Augment { translate: PAD, jitter: JITTER, rotate: MAX_ANGLE, cutout: CUTOUT_P }
    }
}

impl Augment {
    /// What is wrong with these strengths, naming the setting, if anything.
    pub fn fault(&self) -> Option<String> {
        if self.translate > PAD {
            Some(format!("translate must be 0 to {PAD} pixels, not {}", self.translate))
        } else if !(0.0..1.0).contains(&self.jitter) {
            Some(format!("jitter must be at least 0 and below 1, not {}", self.jitter))
        } else if !(0.0..=180.0).contains(&self.rotate) {
            Some(format!("rotate must be 0 to 180 degrees, not {}", self.rotate))
        } else if !(0.0..=1.0).contains(&self.cutout) {
            Some(format!("cutout must be a probability, 0 to 1, not {}", self.cutout))
        } else {
            None
        }
    }
}

impl Draw {
    /// One image's draws at strength `a` (at the recipe's strength: the recipe's draws).
    pub fn random(rng: &mut impl RngExt, a: &Augment) -> Draw {
        let shift = PAD - a.translate..=PAD + a.translate;
        Draw {
            crop: (rng.random_range(shift.clone()), rng.random_range(shift)),
            brightness: rng.random_range(1.0 - a.jitter..=1.0 + a.jitter),
            contrast: rng.random_range(1.0 - a.jitter..=1.0 + a.jitter),
            brightness_first: rng.random_bool(0.5),
            angle: rng.random_range(-a.rotate..=a.rotate),
            cutout: rng.random_bool(a.cutout).then(|| (rng.random_range(4..=24), rng.random_range(4..=24))),
        }
    }

    /// Applies every transform in the recipe's order; `img` and `scratch` are 28 x 28.
    pub fn apply(&self, img: &mut [f32], scratch: &mut [f32]) {
        crop(img, self.crop, scratch);
        if self.brightness_first {
            brightness(scratch, self.brightness);
            contrast(scratch, self.contrast);
        } else {
            contrast(scratch, self.contrast);
            brightness(scratch, self.brightness);
        }
        rotate(scratch, self.angle, img);
        if let Some(centre) = self.cutout {
            cutout(img, centre);
        }
    }
}

/// Pads with 4 zero pixels on every side and takes the 28 x 28 window at `(ox, oy)` of the padded image.
pub fn crop(src: &[f32], (ox, oy): (usize, usize), dst: &mut [f32]) {
    // The window's columns that fall inside the image, and where they come from.
    let (x0, x1) = (PAD.saturating_sub(ox), (S + PAD - ox).min(S));
    let sx0 = (x0 + ox) - PAD;
    for y in 0..S {
        let row = &mut dst[y * S..(y + 1) * S];
        let sy = y + oy;
        if !(PAD..S + PAD).contains(&sy) {
            row.fill(0.0);
            continue;
        }
        let from = &src[(sy - PAD) * S..(sy - PAD + 1) * S];
        row[..x0].fill(0.0);
        row[x0..x1].copy_from_slice(&from[sx0..sx0 + (x1 - x0)]);
        row[x1..].fill(0.0);
    }
}

/// Multiplies by `factor`, clamped to [0, 1] (torchvision's adjust_brightness).
pub fn brightness(img: &mut [f32], factor: f32) {
    img.iter_mut().for_each(|v| *v = (*v * factor).clamp(0.0, 1.0));
}

/// Blends with the image's mean grey level, clamped to [0, 1] (torchvision's adjust_contrast).
pub fn contrast(img: &mut [f32], factor: f32) {
    let mean = img.iter().sum::<f32>() / img.len() as f32;
    img.iter_mut().for_each(|v| *v = (factor * *v + (1.0 - factor) * mean).clamp(0.0, 1.0));
}

/// Rotates by `degrees` counter-clockwise about the image centre, nearest neighbour, fill 0.
pub fn rotate(src: &[f32], degrees: f32, dst: &mut [f32]) {
    // A finite angle keeps every source coordinate within the image's size of it (round_half_away).
    assert!(degrees.is_finite(), "rotation by {degrees} degrees");
    let (sin, cos) = degrees.to_radians().sin_cos();
    let c = (S as f32 - 1.0) / 2.0;
    // Inverse map: the source pixel that lands on (x, y) is (cos dx - sin dy + c, sin dx + cos dy + c)
    // rounded, with (dx, dy) = (x - c, y - c). Image y grows downwards, so a counter-clockwise turn on
    // screen is clockwise in these coordinates. The products are taken once per row and column: the
    // same operations in the same order as per pixel, so the same bits, several times faster.
    let d: [f32; S] = std::array::from_fn(|i| i as f32 - c);
    let (cos_d, sin_d) = (d.map(|v| cos * v), d.map(|v| sin * v));
    let (mut sx, mut sy) = ([0i32; S], [0i32; S]);
    for y in 0..S {
        // The source coordinates of a whole row first (this loop vectorizes), then the gather.
        for x in 0..S {
            sx[x] = round_half_away(cos_d[x] - sin_d[y] + c);
            sy[x] = round_half_away(sin_d[x] + cos_d[y] + c);
        }
        for (x, out) in dst[y * S..(y + 1) * S].iter_mut().enumerate() {
            // Negative coordinates wrap to large unsigned ones: one comparison per axis.
            let (u, v) = (sx[x] as u32 as usize, sy[x] as u32 as usize);
            *out = if u < S && v < S { src[v * S + u] } else { 0.0 };
        }
    }
}

/// `v.round() as i32` (half away from zero) for finite |v| < 2^23, without the library call: `v - trunc(v)`
/// is exact there.
fn round_half_away(v: f32) -> i32 {
    debug_assert!(v.is_finite() && v.abs() < 8_388_608.0);
    // SAFETY: v is finite and far inside i32's range (rotate's coordinates are within 28 * 2 of the
    // image); the unchecked conversion lets the row's loop use packed truncation.
    let t = unsafe { v.to_int_unchecked::<i32>() };
    let frac = v - t as f32;
    t + (frac >= 0.5) as i32 - (frac <= -0.5) as i32
}

/// Zeroes the 8 x 8 square centred at `(cx, cy)`: columns cx-4..cx+4, rows cy-4..cy+4.
pub fn cutout(img: &mut [f32], (cx, cy): (usize, usize)) {
    let half = CUTOUT_SIDE / 2;
    for y in cy.saturating_sub(half)..(cy + half).min(S) {
        for x in cx.saturating_sub(half)..(cx + half).min(S) {
            img[y * S + x] = 0.0;
        }
    }
}

/// Which optional batch-level augmentations run (all off in the recipe).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchAugment {
    pub swell: bool,
    pub darken: bool,
    pub squeeze: bool,
}

/// A batch-level transform of one image, given a way to draw integers in 0..n.
type Transform = fn(&mut [f32], &mut dyn FnMut(usize) -> usize);

/// How many images of each class in a batch a batch-level augmentation touches.
pub const PER_CLASS: usize = 10;

impl BatchAugment {
    pub fn any(&self) -> bool {
        self.swell || self.darken || self.squeeze
    }

    /// Applies each enabled augmentation to up to 10 random images of each class of the batch
    /// (`images`: [0, 1] values, 28 x 28 each).
    pub fn apply(&self, images: &mut [f32], labels: &[u8], rng: &mut impl RngExt) {
        let passes: [(bool, Transform); 3] = [(self.swell, swell), (self.darken, darken), (self.squeeze, squeeze)];
        for (on, transform) in passes {
            if !on {
                continue;
            }
            for class in 0..10u8 {
                let mut members: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] == class).collect();
                // A partial Fisher-Yates shuffle picks the images.
                let take = members.len().min(PER_CLASS);
                for i in 0..take {
                    let j = rng.random_range(i..members.len());
                    members.swap(i, j);
                }
                for &i in &members[..take] {
                    transform(&mut images[i * IMAGE_PIXELS..(i + 1) * IMAGE_PIXELS], &mut |n| rng.random_range(0..n));
                }
            }
        }
    }
}

/// "Swell": grey-level dilation (3 x 3 max) inside a random 7 x 7 patch.
pub fn swell(img: &mut [f32], pick: &mut dyn FnMut(usize) -> usize) {
    let (px, py) = (pick(S - 6), pick(S - 6));
    let src = img.to_vec();
    for y in py..py + 7 {
        for x in px..px + 7 {
            let mut m = 0.0f32;
            for sy in y.saturating_sub(1)..(y + 2).min(S) {
                for sx in x.saturating_sub(1)..(x + 2).min(S) {
                    m = m.max(src[sy * S + sx]);
                }
            }
            img[y * S + x] = m;
        }
    }
}

/// "Darken": multiplies 15% of the bright pixels (> 0.5), chosen at random, by 0.2.
pub fn darken(img: &mut [f32], pick: &mut dyn FnMut(usize) -> usize) {
    for v in img.iter_mut() {
        if *v > 0.5 && pick(100) < 15 {
            *v *= 0.2;
        }
    }
}

/// "Squeeze": inside a random 6 x 6 patch, each pixel takes the max of itself and its neighbour along
/// one random axis (a 2-wide max pool with stride 1), thickening strokes along that axis.
pub fn squeeze(img: &mut [f32], pick: &mut dyn FnMut(usize) -> usize) {
    let (px, py) = (pick(S - 5), pick(S - 5));
    let horizontal = pick(2) == 0;
    let src = img.to_vec();
    for y in py..py + 6 {
        for x in px..px + 6 {
            let (nx, ny) = if horizontal { ((x + 1).min(S - 1), y) } else { (x, (y + 1).min(S - 1)) };
            img[y * S + x] = src[y * S + x].max(src[ny * S + nx]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::Xoshiro256PlusPlus;
    use rand::SeedableRng;

    fn test_image() -> Vec<f32> {
        (0..IMAGE_PIXELS).map(|i| ((i * 37) % 101) as f32 / 100.0).collect()
    }

    /// The per-pixel formulas `crop` and `rotate` had before they were made faster: the fast ones must
    /// give the same bits, so that a seed keeps producing the same batches.
    fn crop_per_pixel(src: &[f32], (ox, oy): (usize, usize), dst: &mut [f32]) {
        for y in 0..S {
            for x in 0..S {
                let (sx, sy) = (x as isize + ox as isize - PAD as isize, y as isize + oy as isize - PAD as isize);
                let inside = (0..S as isize).contains(&sx) && (0..S as isize).contains(&sy);
                dst[y * S + x] = if inside { src[sy as usize * S + sx as usize] } else { 0.0 };
            }
        }
    }

    fn rotate_per_pixel(src: &[f32], degrees: f32, dst: &mut [f32]) {
        let (sin, cos) = degrees.to_radians().sin_cos();
        let c = (S as f32 - 1.0) / 2.0;
        for y in 0..S {
            for x in 0..S {
                let (dx, dy) = (x as f32 - c, y as f32 - c);
                let sx = (cos * dx - sin * dy + c).round();
                let sy = (sin * dx + cos * dy + c).round();
                dst[y * S + x] = if sx >= 0.0 && sy >= 0.0 && sx < S as f32 && sy < S as f32 {
                    src[sy as usize * S + sx as usize]
                } else {
                    0.0
                };
            }
        }
    }

    #[test]
    fn fast_crop_and_rotate_equal_the_per_pixel_formulas() {
        let src = test_image();
        let (mut fast, mut slow) = (vec![0.0; IMAGE_PIXELS], vec![0.0; IMAGE_PIXELS]);
        for ox in 0..=2 * PAD {
            for oy in 0..=2 * PAD {
                crop(&src, (ox, oy), &mut fast);
                crop_per_pixel(&src, (ox, oy), &mut slow);
                assert_eq!(fast, slow, "crop at ({ox}, {oy})");
            }
        }
        // Every angle the recipe draws is in [-15, 15]; step through it finely, plus wider turns.
        for i in -20_000..=20_000 {
            let angle = i as f32 * 0.00075 + if i % 7 == 0 { 90.0 } else { 0.0 };
            rotate(&src, angle, &mut fast);
            rotate_per_pixel(&src, angle, &mut slow);
            assert!(fast == slow, "rotation by {angle} degrees");
        }
    }

    #[test]
    fn rounding_helper_is_round_half_away_from_zero() {
        for v in [0.5f32, -0.5, 1.5, -1.5, 2.5, 0.49999997, -0.49999997, 13.5, 27.499998, -0.0, 0.0, 26.5] {
            assert_eq!(round_half_away(v), v.round() as i32, "{v}");
        }
        for i in -40_000..40_000 {
            let v = i as f32 / 1000.0;
            assert_eq!(round_half_away(v), v.round() as i32, "{v}");
        }
    }

    #[test]
    fn crop_moves_pixels_by_its_offset() {
        let src = test_image();
        let mut dst = vec![0.0; IMAGE_PIXELS];
        crop(&src, (4, 4), &mut dst);
        assert_eq!(dst, src, "the centred crop is the identity");
        crop(&src, (6, 1), &mut dst);
        // Offset (6, 1) reads src at (x + 2, y - 3).
        for y in 0..S {
            for x in 0..S {
                let (sx, sy) = (x as isize + 2, y as isize - 3);
                let want = if sx < S as isize && sy >= 0 { src[sy as usize * S + sx as usize] } else { 0.0 };
                assert_eq!(dst[y * S + x], want, "({x}, {y})");
            }
        }
    }

    #[test]
    fn rotation_by_zero_is_the_identity_and_by_90_a_quarter_turn() {
        let src = test_image();
        let mut dst = vec![0.0; IMAGE_PIXELS];
        rotate(&src, 0.0, &mut dst);
        assert_eq!(dst, src);
        rotate(&src, 90.0, &mut dst);
        // Counter-clockwise on screen: the top-right corner moves to the top-left.
        assert_eq!(dst[0], src[S - 1]);
        assert_eq!(dst[(S - 1) * S], src[0]);
        // Four quarter turns come back.
        let mut a = src.clone();
        let mut b = vec![0.0; IMAGE_PIXELS];
        for _ in 0..4 {
            rotate(&a, 90.0, &mut b);
            std::mem::swap(&mut a, &mut b);
        }
        assert_eq!(a, src);
    }

    #[test]
    fn rotation_fills_with_zero() {
        let src = vec![1.0; IMAGE_PIXELS];
        let mut dst = vec![0.0; IMAGE_PIXELS];
        rotate(&src, 15.0, &mut dst);
        assert_eq!(dst[0], 0.0, "a corner comes from outside the image");
        assert_eq!(dst[14 * S + 14], 1.0);
    }

    #[test]
    fn cutout_zeroes_exactly_its_square() {
        let src = vec![1.0; IMAGE_PIXELS];
        for centre in [(4, 4), (24, 24), (10, 17)] {
            let mut img = src.clone();
            cutout(&mut img, centre);
            let zeros = img.iter().filter(|&&v| v == 0.0).count();
            assert_eq!(zeros, 64, "{centre:?}");
            for y in 0..S {
                for x in 0..S {
                    let inside = (centre.0 - 4..centre.0 + 4).contains(&x) && (centre.1 - 4..centre.1 + 4).contains(&y);
                    assert_eq!(img[y * S + x] == 0.0, inside, "({x}, {y}) for {centre:?}");
                }
            }
        }
    }

    #[test]
    fn jitter_stays_in_unit_range_and_does_what_it_says() {
        let mut img = test_image();
        brightness(&mut img, 1.4);
        assert!(img.iter().all(|&v| (0.0..=1.0).contains(&v)));
        assert_eq!(img.iter().cloned().fold(0.0, f32::max), 1.0, "bright pixels clamp at 1");
        let mut img = test_image();
        brightness(&mut img, 0.5);
        assert_eq!(img[1], test_image()[1] * 0.5);
        let mut img = test_image();
        let mean = img.iter().sum::<f32>() / img.len() as f32;
        contrast(&mut img, 0.0);
        assert!(img.iter().all(|&v| (v - mean).abs() < 1e-6), "contrast 0 gives the mean grey");
        let mut img = test_image();
        contrast(&mut img, 1.4);
        assert!(img.iter().all(|&v| (0.0..=1.0).contains(&v)));
    }

    #[test]
    fn draws_stay_in_the_recipe_ranges() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(1);
        let mut cutouts = 0;
        for _ in 0..10_000 {
            let d = Draw::random(&mut rng, &Augment::default());
            assert!(d.crop.0 <= 8 && d.crop.1 <= 8);
            assert!((0.6..=1.4).contains(&d.brightness) && (0.6..=1.4).contains(&d.contrast));
            assert!((-15.0..=15.0).contains(&d.angle));
            if let Some((x, y)) = d.cutout {
                assert!((4..=24).contains(&x) && (4..=24).contains(&y));
                cutouts += 1;
            }
        }
        // p = 0.3 over 10,000 draws: standard deviation ~46.
        assert!((2_770..=3_230).contains(&cutouts), "{cutouts} cutouts");
    }

    #[test]
    fn milder_strengths_narrow_the_draws_and_wrong_ones_are_named() {
        let mild = Augment { translate: 1, jitter: 0.1, rotate: 5.0, cutout: 0.0 };
        assert_eq!(mild.fault(), None);
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(2);
        let mut seen = (usize::MAX, 0);
        for _ in 0..2_000 {
            let d = Draw::random(&mut rng, &mild);
            seen = (seen.0.min(d.crop.0), seen.1.max(d.crop.0));
            assert!((3..=5).contains(&d.crop.1) && (0.9..=1.1).contains(&d.contrast), "{d:?}");
            assert!((-5.0..=5.0).contains(&d.angle) && d.cutout.is_none(), "{d:?}");
        }
        assert_eq!(seen, (3, 5), "shifts of one pixel either way, all of them drawn");
        let none = Augment { translate: 0, jitter: 0.0, rotate: 0.0, cutout: 0.0 };
        let d = Draw::random(&mut rng, &none);
        assert_eq!((d.crop, d.brightness, d.contrast, d.angle, d.cutout), ((4, 4), 1.0, 1.0, 0.0, None));
        let fault = |a: Augment| a.fault().unwrap_or_default();
        assert!(fault(Augment { translate: 5, ..mild }).contains("translate must be 0 to 4"));
        assert!(fault(Augment { jitter: 1.0, ..mild }).contains("jitter"));
        assert!(fault(Augment { rotate: f32::NAN, ..mild }).contains("rotate"));
        assert!(fault(Augment { cutout: -0.1, ..mild }).contains("cutout"));
    }

    #[test]
    fn batch_augmentations_touch_at_most_ten_images_per_class() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(2);
        let labels: Vec<u8> = (0..100).map(|i| (i % 5) as u8).collect(); // 20 images of classes 0..4
        let mut images: Vec<f32> = (0..100).flat_map(|_| test_image()).collect();
        let before = images.clone();
        BatchAugment { swell: false, darken: true, squeeze: false }.apply(&mut images, &labels, &mut rng);
        let changed: Vec<usize> = (0..100)
            .filter(|&i| images[i * IMAGE_PIXELS..][..IMAGE_PIXELS] != before[i * IMAGE_PIXELS..][..IMAGE_PIXELS])
            .collect();
        assert!(changed.len() <= 50 && changed.len() >= 40, "{} images changed", changed.len());
        assert!(images.iter().zip(&before).all(|(a, b)| a == b || (*b > 0.5 && (a - b * 0.2).abs() < 1e-6)));
        let mut img = vec![0.0; IMAGE_PIXELS];
        img[14 * S + 14] = 1.0;
        swell(&mut img, &mut |_| 10);
        assert_eq!(img.iter().filter(|&&v| v == 1.0).count(), 9, "a dot swells into a 3 x 3 square");
        // Squeeze along x (the pick of 0 chooses the horizontal axis and the patch at (0, 0)): a dot
        // inside the patch spreads to its left neighbour only.
        let mut img = vec![0.0; IMAGE_PIXELS];
        img[2 * S + 3] = 1.0;
        squeeze(&mut img, &mut |_| 0);
        let lit: Vec<usize> = (0..IMAGE_PIXELS).filter(|&i| img[i] == 1.0).collect();
        assert_eq!(lit, vec![2 * S + 2, 2 * S + 3]);
    }
}
