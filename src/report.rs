//! What a training run learned, as pictures and one page, written into its folder: `curves.png` (loss,
//! accuracy and learning rate per epoch), `confusion.png` (the test set's confusion matrix),
//! `misclassified.png` (every misclassified test image, with its true and predicted class and the
//! probability given to the prediction) and `report.html` (the command, backend, per-epoch table, best
//! and final accuracy and the pictures, embedded: one self-contained file). Drawn with plotters.

use std::path::{Path, PathBuf};
use std::sync::Once;

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use plotters::prelude::*;

use crate::cpu::reference::loss::{argmax, softmax};
use crate::data::{Split, IMAGE_SIDE};

/// Registered once for every picture: plotters draws text with it (the font ships in `assets/`).
static FONT: Once = Once::new();
const FONT_NAME: &str = "sans-serif";

fn register_font() {
    FONT.call_once(|| {
        let bytes: &'static [u8] = include_bytes!("../assets/DejaVuSans.ttf");
        if plotters::style::register_font(FONT_NAME, FontStyle::Normal, bytes).is_err() {
            panic!("the bundled font assets/DejaVuSans.ttf does not parse");
        }
    });
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq)]
pub struct Epoch {
    pub epoch: usize,
    pub train_loss: f64,
    pub train_accuracy: f64,
    pub test_loss: f64,
    pub test_accuracy: f64,
    pub lr: f64,
    pub seconds: f64,
}

/// The epochs a run folder's `metrics.jsonl` holds (a resumed run's repeated epochs: the last one).
pub fn read_metrics(dir: &Path) -> Result<Vec<Epoch>> {
    let path = dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut epochs: Vec<Epoch> = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{}, line {}: not JSON", path.display(), i + 1))?;
        let num = |key: &str| {
            v[key].as_f64().with_context(|| format!("{}, line {}: no number `{key}`", path.display(), i + 1))
        };
        let e = Epoch {
            epoch: num("epoch")? as usize,
            train_loss: num("train_loss")?,
            train_accuracy: num("train_accuracy")?,
            test_loss: num("test_loss")?,
            test_accuracy: num("test_accuracy")?,
            lr: num("lr")?,
            seconds: num("seconds")?,
        };
        epochs.retain(|old| old.epoch != e.epoch);
        epochs.push(e);
    }
    if epochs.is_empty() {
        bail!("{}: no finished epoch", path.display());
    }
    Ok(epochs)
}

/// How the run was made, for the page (from `run.json`, which `train` writes).
#[derive(Debug, Clone, Default)]
pub struct RunInfo {
    pub command: String,
    pub backend: String,
    pub network: String,
    pub recipe: String,
    /// The checkpoint whose predictions the pictures show (not stored in run.json).
    pub weights: String,
}

impl RunInfo {
    pub fn read(dir: &Path) -> RunInfo {
        let text = std::fs::read_to_string(dir.join("run.json")).unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        let get = |k: &str| v[k].as_str().unwrap_or("(not recorded)").to_string();
        let (command, backend, network, recipe) = (get("command"), get("backend"), get("network"), get("recipe"));
        RunInfo { command, backend, network, recipe, weights: String::new() }
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        let json = serde_json::json!({
            "command": self.command, "backend": self.backend, "network": self.network, "recipe": self.recipe,
        });
        let path = dir.join("run.json");
        std::fs::write(&path, serde_json::to_string_pretty(&json)? + "\n")
            .with_context(|| format!("writing {}", path.display()))
    }
}

/// The test set's predictions: per image the class scores (logits), `classes` per image.
pub struct Predictions<'a> {
    pub split: &'a Split,
    pub logits: &'a [f32],
    pub classes: usize,
}

impl Predictions<'_> {
    /// Per image: (predicted class, its softmax probability); the first maximum on ties.
    fn predicted(&self) -> Vec<(usize, f64)> {
        self.logits
            .chunks_exact(self.classes)
            .map(|row| {
                let best = argmax(row);
                (best, softmax(row)[best])
            })
            .collect()
    }
}

/// Writes the pictures and the page into `dir`; returns their paths.
pub fn write(dir: &Path, epochs: &[Epoch], test: &Predictions, info: &RunInfo) -> Result<Vec<PathBuf>> {
    register_font();
    let predicted = test.predicted();
    let mut confusion = vec![vec![0u32; test.classes]; test.classes];
    for (&label, &(p, _)) in test.split.labels.iter().zip(&predicted) {
        confusion[label as usize][p] += 1;
    }
    let wrong: Vec<(usize, usize, f64)> = (0..test.split.len())
        .filter(|&i| predicted[i].0 != test.split.labels[i] as usize)
        .map(|i| (i, predicted[i].0, predicted[i].1))
        .collect();
    let pictures = [
        ("curves.png", curves(epochs)?),
        ("confusion.png", confusion_picture(&confusion)?),
        ("misclassified.png", misclassified(test.split, &wrong)?),
    ];
    let mut written = Vec::new();
    for (name, png) in &pictures {
        let path = dir.join(name);
        std::fs::write(&path, png).with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
    }
    let correct = test.split.len() - wrong.len();
    let page = html(epochs, info, &pictures, correct, test.split.len());
    let path = dir.join("report.html");
    std::fs::write(&path, page).with_context(|| format!("writing {}", path.display()))?;
    written.push(path);
    Ok(written)
}

/// Draws `draw` on a white w x h canvas and encodes it as PNG.
fn png(
    w: u32,
    h: u32,
    draw: impl FnOnce(&DrawingArea<BitMapBackend, plotters::coord::Shift>) -> Result<()>,
) -> Result<Vec<u8>> {
    let mut pixels = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (w, h)).into_drawing_area();
        draw(&root)?;
        root.present().map_err(|e| anyhow::anyhow!("drawing: {e}"))?;
    }
    let img = image::RgbImage::from_raw(w, h, pixels).expect("w x h RGB pixels");
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)?;
    Ok(out.into_inner())
}

fn plot_err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing: {e}")
}

/// Loss, accuracy and learning rate per epoch, side by side.
fn curves(epochs: &[Epoch]) -> Result<Vec<u8>> {
    png(1500, 450, |root| {
        let panels = root.split_evenly((1, 3));
        let last = epochs.last().map_or(1, |e| e.epoch) as f64;
        let x = 0.5..last + 0.5;
        type Series = Vec<(&'static str, RGBColor, Vec<(f64, f64)>)>;
        let points = |f: fn(&Epoch) -> f64| epochs.iter().map(|e| (e.epoch as f64, f(e))).collect::<Vec<_>>();
        let panel_data: [(&str, &str, Series); 3] = [
            (
                "Loss (cross-entropy)",
                "loss",
                vec![("train", BLUE, points(|e| e.train_loss)), ("test", RED, points(|e| e.test_loss))],
            ),
            (
                "Accuracy",
                "%",
                vec![("train", BLUE, points(|e| e.train_accuracy)), ("test", RED, points(|e| e.test_accuracy))],
            ),
            ("Learning rate (at the epoch's end)", "lr", vec![("lr", BLACK, points(|e| e.lr))]),
        ];
        for (area, (title, unit, series)) in panels.iter().zip(panel_data) {
            let values = series.iter().flat_map(|s| s.2.iter().map(|p| p.1));
            let (lo, hi) = values.fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(v), b.max(v)));
            let pad = ((hi - lo) * 0.08).max(1e-6);
            let mut chart = ChartBuilder::on(area)
                .caption(title, (FONT_NAME, 22))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(70)
                .build_cartesian_2d(x.clone(), (lo - pad)..(hi + pad))
                .map_err(plot_err)?;
            chart
                .configure_mesh()
                .x_desc("epoch")
                .x_label_formatter(&|v| format!("{v:.0}"))
                .y_desc(unit)
                .label_style((FONT_NAME, 15))
                .draw()
                .map_err(plot_err)?;
            for (name, colour, data) in series {
                chart
                    .draw_series(LineSeries::new(data.clone(), colour.stroke_width(2)))
                    .map_err(plot_err)?
                    .label(name)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2)));
                chart.draw_series(data.iter().map(|&p| Circle::new(p, 3, colour.filled()))).map_err(plot_err)?;
            }
            // Losses fall and accuracies rise: the legend goes where the curves are not.
            let corner = if unit == "%" { SeriesLabelPosition::LowerRight } else { SeriesLabelPosition::UpperRight };
            chart
                .configure_series_labels()
                .position(corner)
                .label_font((FONT_NAME, 15))
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(plot_err)?;
        }
        Ok(())
    })
}

/// The confusion matrix as a grid: rows the true class, columns the predicted one; the shade grows with
/// the count (on a log scale, so that single mistakes show), the count written in each cell.
fn confusion_picture(counts: &[Vec<u32>]) -> Result<Vec<u8>> {
    let classes = counts.len();
    let (cell, left, top) = (56u32, 90u32, 80u32);
    let side = left + cell * classes as u32 + 20;
    png(side, top + cell * classes as u32 + 20, |root| {
        let text = |size| TextStyle::from((FONT_NAME, size).into_font()).color(&BLACK);
        root.draw_text("Confusion matrix (test set)", &text(22), (left as i32, 10)).map_err(plot_err)?;
        root.draw_text("predicted", &text(16), ((left + cell * classes as u32 / 2 - 35) as i32, 36))
            .map_err(plot_err)?;
        root.draw_text("true", &text(16), (8, (top + cell * classes as u32 / 2) as i32)).map_err(plot_err)?;
        let max = counts.iter().flatten().copied().max().unwrap_or(1).max(1) as f64;
        for (t, row) in counts.iter().enumerate() {
            let y = (top + cell * t as u32) as i32;
            root.draw_text(&t.to_string(), &text(16), (left as i32 - 22, y + cell as i32 / 2 - 8)).map_err(plot_err)?;
            for (p, &count) in row.iter().enumerate() {
                let x = (left + cell * p as u32) as i32;
                if t == 0 {
                    root.draw_text(&p.to_string(), &text(16), (x + cell as i32 / 2 - 5, top as i32 - 22))
                        .map_err(plot_err)?;
                }
                let shade = if count == 0 { 0.0 } else { (1.0 + count as f64).ln() / (1.0 + max).ln() };
                let fill = if t == p { RGBColor(40, 110, 200) } else { RGBColor(210, 50, 40) };
                let colour = fill.mix(0.08 + 0.92 * shade);
                root.draw(&Rectangle::new([(x, y), (x + cell as i32, y + cell as i32)], colour.filled()))
                    .map_err(plot_err)?;
                root.draw(&Rectangle::new([(x, y), (x + cell as i32, y + cell as i32)], RGBColor(200, 200, 200)))
                    .map_err(plot_err)?;
                if count > 0 {
                    let label = count.to_string();
                    let colour = if shade > 0.6 { WHITE } else { BLACK };
                    let style = TextStyle::from((FONT_NAME, 14).into_font()).color(&colour);
                    let dx = 4 * label.len() as i32;
                    root.draw_text(&label, &style, (x + cell as i32 / 2 - dx, y + cell as i32 / 2 - 7))
                        .map_err(plot_err)?;
                }
            }
        }
        Ok(())
    })
}

/// Every misclassified test image, three times enlarged, with "true -> predicted (probability)".
fn misclassified(split: &Split, wrong: &[(usize, usize, f64)]) -> Result<Vec<u8>> {
    let (scale, columns) = (3u32, 12usize);
    let (cell_w, cell_h) = (IMAGE_SIDE as u32 * scale + 24, IMAGE_SIDE as u32 * scale + 30);
    let rows = wrong.len().div_ceil(columns).max(1) as u32;
    let width = cell_w * columns as u32 + 20;
    png(width, 50 + rows * cell_h, |root| {
        let title = format!("Misclassified test images: {} (true -> predicted, its probability)", wrong.len());
        root.draw_text(&title, &TextStyle::from((FONT_NAME, 20).into_font()).color(&BLACK), (10, 12))
            .map_err(plot_err)?;
        for (k, &(i, predicted, probability)) in wrong.iter().enumerate() {
            let (x0, y0) = ((10 + cell_w * (k % columns) as u32) as i32, (50 + cell_h * (k / columns) as u32) as i32);
            for (p, &v) in split.image(i).iter().enumerate() {
                let (px, py) = ((p % IMAGE_SIDE) as i32 * scale as i32, (p / IMAGE_SIDE) as i32 * scale as i32);
                // Ink dark on white, as a digit is drawn.
                let grey = 255 - v;
                let corner = (x0 + px, y0 + py);
                let far = (corner.0 + scale as i32, corner.1 + scale as i32);
                root.draw(&Rectangle::new([corner, far], RGBColor(grey, grey, grey).filled())).map_err(plot_err)?;
            }
            let label = format!("{} -> {} ({:.0}%)", split.labels[i], predicted, 100.0 * probability);
            let style = TextStyle::from((FONT_NAME, 14).into_font()).color(&RGBColor(160, 20, 20));
            root.draw_text(&label, &style, (x0, y0 + (IMAGE_SIDE as u32 * scale) as i32 + 4)).map_err(plot_err)?;
        }
        Ok(())
    })
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// The page: one self-contained HTML file with the pictures embedded.
fn html(epochs: &[Epoch], info: &RunInfo, pictures: &[(&str, Vec<u8>)], correct: usize, total: usize) -> String {
    let best = epochs.iter().max_by(|a, b| a.test_accuracy.total_cmp(&b.test_accuracy)).expect("an epoch");
    let last = epochs.last().expect("an epoch");
    let mut rows = String::new();
    for e in epochs {
        rows += &format!(
            "<tr><td>{}</td><td>{:.4}</td><td>{:.2}%</td><td>{:.4}</td><td>{:.2}%</td><td>{:.2e}</td>\
             <td>{:.1}</td></tr>\n",
            e.epoch, e.train_loss, e.train_accuracy, e.test_loss, e.test_accuracy, e.lr, e.seconds
        );
    }
    let images: String = pictures
        .iter()
        .map(|(name, png)| {
            let data = base64::engine::general_purpose::STANDARD.encode(png);
            format!("<h2>{name}</h2>\n<img alt=\"{name}\" src=\"data:image/png;base64,{data}\">\n")
        })
        .collect();
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>mnist-wgpu run</title>\n\
         <style>body{{font-family:sans-serif;max-width:1540px;margin:2em auto;padding:0 1em}}\
         table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 10px;text-align:right}}\
         code{{background:#f3f3f3;padding:2px 4px}}img{{max-width:100%;border:1px solid #ddd}}</style></head><body>\n\
         <h1>mnist-wgpu training run</h1>\n\
         <p>Command: <code>{}</code><br>Backend: {}<br>Network: {}<br>Recipe: <code>{}</code></p>\n\
         <p><b>Final test accuracy {:.2}%</b> (epoch {}); best {:.2}% (epoch {}). The confusion matrix and the \
         misclassified images are those of {}: {correct}/{total} test images right.</p>\n\
         <table><tr><th>epoch</th><th>train loss</th><th>train accuracy</th><th>test loss</th><th>test accuracy</th>\
         <th>lr</th><th>seconds</th></tr>\n{rows}</table>\n{images}</body></html>\n",
        escape(&info.command),
        escape(&info.backend),
        escape(&info.network),
        escape(&info.recipe),
        last.test_accuracy,
        last.epoch,
        best.test_accuracy,
        best.epoch,
        escape(&info.weights),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_gets_its_pictures_and_a_self_contained_page() {
        let dir = std::env::temp_dir().join(format!("mnist-wgpu-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let lines: Vec<String> = (1..=3)
            .map(|e| {
                format!(
                    "{{\"epoch\":{e},\"train_loss\":{},\"train_accuracy\":{},\"test_loss\":0.1,\
                     \"test_accuracy\":{},\"lr\":0.05,\"seconds\":2.0,\"test_correct\":1,\"test_total\":3}}",
                    1.0 / e as f64,
                    80.0 + e as f64,
                    90.0 + e as f64
                )
            })
            .collect();
        // A resumed run repeats an epoch: the later line counts.
        std::fs::write(
            dir.join("metrics.jsonl"),
            lines.join("\n") + "\n" + &lines[2].replace("\"test_accuracy\":93,", "\"test_accuracy\":93.5,"),
        )
        .unwrap();
        let epochs = read_metrics(&dir).unwrap();
        assert_eq!(epochs.iter().map(|e| e.epoch).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(epochs[2].test_accuracy, 93.5);
        // Three test images: a 0 seen as 0, a 1 seen as 2, a 2 seen as 2.
        let split = Split { images: (0..3 * 784).map(|i| (i % 256) as u8).collect(), labels: vec![0, 1, 2] };
        let logits = [5.0, 0.0, 0.0, 0.0, 1.0, 3.0, 0.0, 0.0, 4.0];
        let test = Predictions { split: &split, logits: &logits, classes: 3 };
        let info = RunInfo { command: "train <x>".into(), weights: "last.safetensors".into(), ..Default::default() };
        let written = write(&dir, &epochs, &test, &info).unwrap();
        assert_eq!(written.len(), 4);
        for (name, size) in
            [("curves.png", (1500, 450)), ("confusion.png", (278, 268)), ("misclassified.png", (1316, 164))]
        {
            let img = image::open(dir.join(name)).unwrap();
            assert_eq!((img.width(), img.height()), size, "{name}");
            // Something was drawn: not all white.
            assert!(img.to_rgb8().pixels().any(|p| p.0 != [255, 255, 255]), "{name} is blank");
        }
        let page = std::fs::read_to_string(dir.join("report.html")).unwrap();
        assert_eq!(page.matches("src=\"data:image/png;base64,").count(), 3, "the pictures are embedded");
        assert!(page.contains("train &lt;x&gt;") && page.contains("2/3 test images right"), "{page}");
        assert_eq!(page.matches("<tr><td>").count(), 3);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
