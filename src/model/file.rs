//! Model files: a network as a small TOML file, one `[[layer]]` table per layer in order (see
//! `models/net3.toml`). The input shape and the class count come from the data. Errors name the file,
//! the line and what is wrong. A model also writes itself back as such a file (`to_toml`), which is
//! what checkpoints store. An optional `[train]` table holds the training settings the network is
//! meant for (epochs, batch size, max lr, augmentation strengths, batch augmentations); `train` uses
//! them where no flag says otherwise.

use anyhow::{anyhow, bail, Result};
use serde::Deserialize;

use super::layer::{Layer, LayerSpec, Names};
use super::shape::Shape;
use super::{Model, TrainDefaults};

/// The presets, by name: every model file of `models/`, built into the program.
pub const PRESETS: &[(&str, &str)] = &[
    ("net3", include_str!("../../models/net3.toml")),
    ("small8k", include_str!("../../models/small8k.toml")),
    ("small5k", include_str!("../../models/small5k.toml")),
    ("best20k", include_str!("../../models/best20k.toml")),
    ("net3-avgpool2", include_str!("../../models/net3-avgpool2.toml")),
    ("mlp3", include_str!("../../models/mlp3.toml")),
    ("fast-recipe", include_str!("../../models/fast-recipe.toml")),
    ("speed99", include_str!("../../models/speed99.toml")),
    ("speed994", include_str!("../../models/speed994.toml")),
];

/// The network `--model` names (a model file or a preset; Net3 when None), for MNIST's images and
/// classes.
pub fn for_mnist(arg: Option<&str>) -> Result<Model> {
    resolve(arg.unwrap_or("net3"), super::MNIST_INPUT, super::MNIST_CLASSES)
}

/// The network `--model` names: a model file, else a preset.
pub fn resolve(arg: &str, input: Shape, classes: usize) -> Result<Model> {
    let path = std::path::Path::new(arg);
    if path.is_file() {
        let text = std::fs::read_to_string(path).map_err(|e| anyhow!("--model {arg}: {e}"))?;
        return parse(&text, arg, input, classes);
    }
    match PRESETS.iter().find(|(name, _)| *name == arg) {
        Some((name, text)) => parse(text, &format!("preset {name}"), input, classes),
        None => {
            let names: Vec<&str> = PRESETS.iter().map(|p| p.0).collect();
            bail!("--model {arg}: no such file, and no preset of that name (presets: {})", names.join(", "))
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSpec {
    #[serde(default)]
    layer: Vec<toml::Spanned<LayerSpec>>,
    train: Option<toml::Spanned<TrainDefaults>>,
}

/// Builds the network a model file describes for `input` images and `classes` classes; `origin`
/// (its path, or the preset's name) starts every error.
pub fn parse(text: &str, origin: &str, input: Shape, classes: usize) -> Result<Model> {
    let file: FileSpec = toml::from_str(text).map_err(|e| anyhow!("{origin}: {e}"))?;
    let line_of = |offset: usize| 1 + text[..offset.min(text.len())].matches('\n').count();
    if file.layer.is_empty() {
        bail!("{origin}: no [[layer]] tables: a model file lists its layers in order, as models/net3.toml does");
    }
    let mut names = Names::default();
    let mut layers = Vec::new();
    let mut lines = Vec::new();
    for spanned in &file.layer {
        let line = line_of(spanned.span().start);
        let layer =
            Layer::from_spec(spanned.get_ref(), &mut names).map_err(|e| anyhow!("{origin}, line {line}: {e}"))?;
        layers.push(layer);
        lines.push(line);
    }
    // Input sizes follow from the shapes, layer by layer; where a layer does not fit, `build` below
    // says so, naming its line.
    let mut shape = input;
    for layer in layers.iter_mut() {
        layer.take_input(shape);
        match layer.output_shape(shape) {
            Ok(next) => shape = next,
            Err(_) => break,
        }
    }
    let mut model =
        Model::build(input, layers).map_err(|e| anyhow!("{origin}, line {}: {}", lines[e.index], e.message))?;
    if let Some(train) = &file.train {
        if let Some(fault) = train.get_ref().fault() {
            bail!("{origin}, line {}: [train]: {fault}", line_of(train.span().start));
        }
        model.train = *train.get_ref();
    }
    let end = *model.shapes.last().expect("at least one layer");
    if end != (Shape { c: classes, h: 1, w: 1 }) {
        bail!(
            "{origin}, line {}: the network must end in {classes} class scores, but its last layer gives {}x{}x{}; \
             end it with {classes} channels and a global average pooling (type = \"gap\")",
            lines[lines.len() - 1],
            end.c,
            end.h,
            end.w
        );
    }
    Ok(model)
}

impl TrainDefaults {
    /// The table's keys that are set, one per line, in a fixed order.
    fn toml(&self) -> String {
        let t = self;
        let optimizer = t.optimizer.map(|o| format!("{:?}", o.name()));
        let betas = t.betas.map(|[b1, b2]| format!("[{b1:?}, {b2:?}]"));
        let keys = [
            ("epochs", t.epochs.map(|v| v.to_string())),
            ("batch_size", t.batch_size.map(|v| v.to_string())),
            ("max_lr", t.max_lr.map(|v| format!("{v:?}"))),
            ("translate", t.translate.map(|v| v.to_string())),
            ("jitter", t.jitter.map(|v| format!("{v:?}"))),
            ("rotate", t.rotate.map(|v| format!("{v:?}"))),
            ("cutout", t.cutout.map(|v| format!("{v:?}"))),
            ("swell", t.swell.then(|| "true".into())),
            ("darken", t.darken.then(|| "true".into())),
            ("squeeze", t.squeeze.then(|| "true".into())),
            ("pct_start", t.pct_start.map(|v| format!("{v:?}"))),
            ("div_factor", t.div_factor.map(|v| format!("{v:?}"))),
            ("final_div_factor", t.final_div_factor.map(|v| format!("{v:?}"))),
            ("optimizer", optimizer),
            ("betas", betas),
            ("eps", t.eps.map(|v| format!("{v:?}"))),
            ("weight_decay", t.weight_decay.map(|v| format!("{v:?}"))),
        ];
        keys.into_iter().filter_map(|(key, value)| Some(format!("{key} = {}\n", value?))).collect()
    }
}

impl Model {
    /// The model file of this network (what `parse` reads back into the same layers).
    pub fn to_toml(&self) -> String {
        let mut out = String::from("# Written by mnist-wgpu: the network of this checkpoint.\n");
        for layer in &self.layers {
            out += "\n[[layer]]\n";
            out += &layer.toml();
        }
        if self.train != TrainDefaults::default() {
            out += "\n[train]\n";
            out += &self.train.toml();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::OptimizerKind;

    const MNIST: Shape = Shape { c: 1, h: 28, w: 28 };

    fn err(text: &str) -> String {
        parse(text, "m.toml", MNIST, 10).unwrap_err().to_string()
    }

    #[test]
    fn the_net3_preset_is_net3_and_writes_itself_back() {
        let m = resolve("net3", MNIST, 10).unwrap();
        let net3 = Model::net3();
        assert_eq!(m.layers, net3.layers);
        assert_eq!(m.params, net3.params);
        assert_eq!(m.init_state(3), net3.init_state(3));
        let again = parse(&m.to_toml(), "written", MNIST, 10).unwrap();
        assert_eq!(again.layers, m.layers);
    }

    #[test]
    fn presets_keep_their_budgets_and_write_themselves_back() {
        // (preset, parameter budget, epochs): each preset stays within its budget (docs/results/presets/).
        for (name, budget, epochs) in [
            ("net3", 17_900, None),
            ("small8k", 8_000, Some(15)),
            ("small5k", 5_000, Some(20)),
            ("best20k", 20_000, Some(15)),
        ] {
            let m = resolve(name, MNIST, 10).unwrap();
            assert!(m.num_trainable <= budget, "{name}: {} parameters", m.num_trainable);
            assert_eq!(m.train.epochs, epochs, "{name}");
            let again = parse(&m.to_toml(), "written", MNIST, 10).unwrap();
            assert_eq!((again.layers, again.train), (m.layers, m.train), "{name}");
        }
    }

    #[test]
    fn every_shipped_model_file_is_a_preset() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
        let mut shipped: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
            .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
            .collect();
        shipped.sort();
        let mut presets: Vec<String> = PRESETS.iter().map(|(name, _)| name.to_string()).collect();
        presets.sort();
        assert_eq!(shipped, presets);
        for (name, text) in PRESETS {
            let file = std::fs::read_to_string(dir.join(format!("{name}.toml"))).unwrap();
            assert_eq!(&file, text, "{name}");
            parse(text, name, MNIST, 10).unwrap();
        }
    }

    #[test]
    fn a_train_table_reads_writes_back_and_names_its_faults() {
        let net = "[[layer]]\ntype = \"conv\"\nout = 10\nkernel = 28\n\n[[layer]]\ntype = \"avgpool\"\n";
        let train = "epochs = 3\nmax_lr = 0.05\nrotate = 7.5\ncutout = 0.0\nswell = true\n";
        let m = parse(&format!("{net}\n[train]\n{train}"), "m.toml", MNIST, 10).unwrap();
        let (rotate, cutout) = (Some(7.5), Some(0.0));
        let want =
            TrainDefaults { epochs: Some(3), max_lr: Some(0.05), rotate, cutout, swell: true, ..Default::default() };
        assert_eq!(m.train, want);
        assert_eq!(parse(&m.to_toml(), "written", MNIST, 10).unwrap().train, want);
        assert_eq!(parse(net, "m.toml", MNIST, 10).unwrap().train, TrainDefaults::default());
        assert!(!parse(net, "m.toml", MNIST, 10).unwrap().to_toml().contains("[train]"));
        let e = err(&format!("{net}\n[train]\nepochs = 0\n"));
        assert!(e.contains("m.toml, line 9") && e.contains("`epochs` must be at least 1"), "{e}");
        let e = err(&format!("{net}\n[train]\nmax_lr = -1.0\n"));
        assert!(e.contains("line 9") && e.contains("`max_lr` must be a positive number"), "{e}");
        let e = err(&format!("{net}\n[train]\nlr = 0.1\n"));
        assert!(e.contains("m.toml") && e.contains("line 10") && e.contains("lr"), "{e}");
        // The schedule's and the optimizer's keys: bad values named, good ones written back.
        for (bad, want) in [
            ("pct_start = 1.0", "`pct_start` must be between 0 and 1"),
            ("div_factor = 0.5", "`div_factor` and `final_div_factor` must be numbers of at least 1"),
            ("optimizer = \"adam\"\nbetas = [0.9, 1.0]", "betas must each be at least 0 and below 1"),
            ("eps = -1.0", "eps must be a number of at least 0"),
            ("weight_decay = -0.1", "weight decay must be a number of at least 0"),
            ("optimizer = \"lion\"", "unknown variant `lion`"),
        ] {
            let e = err(&format!("{net}\n[train]\n{bad}\n"));
            assert!(e.contains("m.toml") && e.contains(want), "{bad}: {e}");
        }
        let adam = "optimizer = \"adamw\"\nbetas = [0.7, 0.9]\neps = 1e-6\nweight_decay = 0.05\ndiv_factor = 25.0\n";
        let m = parse(&format!("{net}\n[train]\n{adam}"), "m.toml", MNIST, 10).unwrap();
        assert_eq!(
            (m.train.optimizer, m.train.betas, m.train.eps),
            (Some(OptimizerKind::AdamW), Some([0.7, 0.9]), Some(1e-6))
        );
        assert_eq!(parse(&m.to_toml(), "written", MNIST, 10).unwrap().train, m.train);
    }

    #[test]
    fn avgpool_the_old_name_of_gap_still_reads() {
        // Model files and checkpoints written before the 2x2 average pooling name the global one so.
        let old = PRESETS[0].1.replace("type = \"gap\"", "type = \"avgpool\"");
        assert!(old.contains("type = \"avgpool\""));
        let m = parse(&old, "old.toml", MNIST, 10).unwrap();
        assert_eq!(m.layers, Model::net3().layers);
        assert!(m.to_toml().contains("type = \"gap\"") && !m.to_toml().contains("avgpool"));
    }

    #[test]
    fn bias_and_linear_layers_read_and_write_back() {
        let text = "[[layer]]\ntype = \"conv\"\nout = 4\nkernel = 5\nbias = true\n\n[[layer]]\ntype = \"maxpool\"\n\n\
                    [[layer]]\ntype = \"linear\"\nout = 32\n\n[[layer]]\ntype = \"relu\"\n\n\
                    [[layer]]\ntype = \"linear\"\nout = 10\nbias = false\n";
        let m = parse(text, "m.toml", MNIST, 10).unwrap();
        // 28 -> 24 -> 12: fc1 reads 4 x 12 x 12 values.
        let shapes: Vec<(&str, Vec<usize>)> = m.params.iter().map(|p| (p.name.as_str(), p.shape.clone())).collect();
        assert_eq!(
            shapes,
            vec![
                ("conv1.weight", vec![4, 1, 5, 5]),
                ("conv1.bias", vec![4]),
                ("fc1.weight", vec![32, 576]),
                ("fc1.bias", vec![32]),
                ("fc2.weight", vec![10, 32]),
            ]
        );
        assert!(m.summary().contains("fc2 (Linear)") && m.summary().contains("conv1 (Conv2d 5x5, pad 0, bias)"));
        assert_eq!(parse(&m.to_toml(), "written", MNIST, 10).unwrap().layers, m.layers);
    }

    #[test]
    fn errors_name_the_line_and_the_fault() {
        let conv = "[[layer]]\ntype = \"conv\"\nout = 10\nkernel = 3\npadding = 1\n";
        let tail = "\n[[layer]]\ntype = \"gap\"\n";
        let e = err(&format!("{conv}\n[[layer]]\ntype = \"dense\"\n{tail}"));
        assert!(e.contains("m.toml, line 7") && e.contains("unknown layer type \"dense\""), "{e}");
        let e = err(&format!("{conv}\n[[layer]]\ntype = \"dropout\"\n{tail}"));
        assert!(e.contains("line 7") && e.contains("needs `p`"), "{e}");
        let e = err(&format!("{conv}\n[[layer]]\ntype = \"relu\"\np = 0.5\n{tail}"));
        assert!(e.contains("line 7") && e.contains("takes no `p`"), "{e}");
        let e = err(&format!("{conv}\n[[layer]]\ntype = \"dropout\"\np = 1.5\n{tail}"));
        assert!(e.contains("line 7") && e.contains("not in [0, 1)"), "{e}");
        // 28 -> 26 (pad 0), then 13, then a pooling of 13 x 13.
        let odd = "[[layer]]\ntype = \"conv\"\nout = 10\nkernel = 3\n\n[[layer]]\ntype = \"maxpool\"\n\n\
                   [[layer]]\ntype = \"maxpool\"\n";
        let e = err(&format!("{odd}{tail}"));
        assert!(e.contains("line 9") && e.contains("even height and width, its input is 13x13"), "{e}");
        let e = err(&format!("{}{tail}", odd.replace("maxpool", "avgpool2")));
        assert!(e.contains("line 9") && e.contains("a 2x2 average pooling needs an even height"), "{e}");
        let e = err(&format!("{conv}{tail}").replace("out = 10", "out = 7"));
        assert!(e.contains("line 7") && e.contains("must end in 10 class scores") && e.contains("7x1x1"), "{e}");
        let e = err(&conv.replace("kernel = 3", "kernel = 31"));
        assert!(e.contains("line 1") && e.contains("does not fit its 28x28 input"), "{e}");
        let e = err(&format!("{conv}\n[[layer]]\ntype = \"linear\"\nkernel = 3\n"));
        assert!(e.contains("line 7") && e.contains("a linear layer takes no `kernel`"), "{e}");
        let e = err("[[layer]]\ntype = \"relu\"\nsize = 3\n");
        assert!(e.contains("m.toml") && e.contains("line 3") && e.contains("size"), "{e}");
        let e = err("[[layer]\n");
        assert!(e.contains("m.toml") && e.contains("line 1"), "{e}");
        assert!(err("").contains("no [[layer]] tables"));
        // Sizes whose arithmetic would overflow or whose parameters could not be allocated.
        let e = err(&conv.replace("padding = 1", "padding = 18446744073709551615"));
        assert!(e.contains("line 1") && e.contains("at most 64"), "{e}");
        let e = err(&conv.replace("out = 10", "out = 1000000000000"));
        assert!(e.contains("line 1") && e.contains("at most 65536"), "{e}");
        let wide = "[[layer]]\ntype = \"conv\"\nout = 65536\nkernel = 3\npadding = 1\n\n[[layer]]\ntype = \"linear\"\nout = 65536\n";
        let e = err(wide);
        assert!(e.contains("line 7") && e.contains("more than 268,435,456 parameters"), "{e}");
        let e = resolve("no-such-model", MNIST, 10).unwrap_err().to_string();
        assert!(e.contains("no-such-model") && e.contains("presets: net3"), "{e}");
    }
}
