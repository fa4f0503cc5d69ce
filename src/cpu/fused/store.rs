//! What the fused executor keeps of the whole batch between its passes (`Store`), and each group of
//! images' share of it (`View`), which one thread works on during a pass.

use super::products::{partial_len, Products};
use crate::model::plan::Plan;
use crate::model::{Layer, Model};

/// The batch is cut into at most this many groups of consecutive images (a split that depends on the
/// batch size only): the unit of parallel work, and of the weight gradients' partial sums.
const GROUPS: usize = 32;

/// What holds the whole batch between passes.
#[derive(Debug, Default)]
pub(super) struct Store {
    pub input: Vec<f32>,
    /// The plan's training buffers (ReLUs, and dropouts inside a batchnorm's op, in place).
    pub buffers: Vec<Vec<f32>>,
    /// Per layer: a max pooling's winners.
    pub winners: Vec<Vec<u8>>,
    /// Per layer, per image: a batchnorm's two sums per channel (forward: of x and x^2; backward: of
    /// dy and dy * xhat), a convolution's bias gradient per channel.
    pub image_sums: Vec<Vec<f64>>,
    /// Per convolution layer, per group: the group's weight gradient (`products::partial_len`).
    pub partials: Vec<Vec<f32>>,
}

/// Per-image (or, for `partials`, per-group) lengths of the store's parts.
#[derive(Debug, Clone)]
pub(super) struct Lens {
    pub buffers: Vec<usize>,
    pub winners: Vec<usize>,
    pub image_sums: Vec<usize>,
    pub partials: Vec<usize>,
    /// The largest image any layer reads or writes: the per-thread scratch's length.
    pub largest: usize,
}

/// One group's share of the store: its images' slices of each part.
pub(super) struct View<'a> {
    pub first: usize,
    pub images: usize,
    pub input: &'a [f32],
    pub buffers: Vec<&'a mut [f32]>,
    pub winners: Vec<&'a mut [u8]>,
    pub image_sums: Vec<&'a mut [f64]>,
    pub partials: Vec<&'a mut [f32]>,
    pub grad_in: &'a [f32],
    pub grad_out: &'a mut [f32],
}

/// Per-image lengths of the store's parts for `model` as `plan` buffers it.
pub(super) fn lens(model: &Model, plan: &Plan) -> Lens {
    let count = model.layers.len();
    let mut buffers = vec![0; plan.buffers];
    for i in 0..count {
        buffers[plan.buffer[i]] = model.shapes[i].len();
    }
    let by_layer = |f: &dyn Fn(usize) -> usize| (0..count).map(f).collect::<Vec<_>>();
    Lens {
        buffers,
        winners: by_layer(&|i| if matches!(model.layers[i], Layer::MaxPool2) { model.shapes[i].len() } else { 0 }),
        image_sums: by_layer(&|i| match &model.layers[i] {
            Layer::BatchNorm { c, .. } => 2 * c,
            _ => model.conv_bias(i).map_or(0, |_| model.conv(i, 1).expect("a convolution").0.cout),
        }),
        partials: by_layer(&|i| model.conv(i, 1).map_or(0, |(d, _)| partial_len(&d, Products::fastest()))),
        largest: model.shapes.iter().map(|s| s.len()).chain([model.input.len()]).max().unwrap_or(0),
    }
}

/// Images per group for a batch of `n`.
pub(super) fn group_size(n: usize) -> usize {
    n.div_ceil(GROUPS).max(1)
}

/// `v` cut into `groups` consecutive pieces of `per_group` (the last ones shorter or empty).
fn split<T>(v: &mut [T], per_group: usize, groups: usize) -> impl Iterator<Item = &mut [T]> {
    let mut chunks = (per_group > 0).then(|| v.chunks_mut(per_group));
    (0..groups).map(move |_| chunks.as_mut().and_then(|c| c.next()).unwrap_or_default())
}

/// The store cut into each group's views, with the gradient read and written by a backward pass
/// (`grads`: per image as long as they are for the pass, or empty).
pub(super) fn views<'a>(
    store: &'a mut Store,
    lens: &Lens,
    n: usize,
    grads: (&'a [f32], &'a mut [f32]),
) -> Vec<View<'a>> {
    let group = group_size(n);
    let groups = n.div_ceil(group);
    let (grad_in, grad_out) = grads;
    let mut views: Vec<View<'a>> = (0..groups)
        .map(|g| View {
            first: g * group,
            images: group.min(n - g * group),
            input: &[],
            buffers: Vec::new(),
            winners: Vec::new(),
            image_sums: Vec::new(),
            partials: Vec::new(),
            grad_in: &[],
            grad_out: &mut [],
        })
        .collect();
    let image = store.input.len() / n.max(1);
    for (v, x) in views.iter_mut().zip(store.input.chunks((group * image).max(1))) {
        v.input = x;
    }
    let (gin, gout) = (grad_in.len() / n.max(1), grad_out.len() / n.max(1));
    for (v, g) in views.iter_mut().zip(grad_in.chunks((group * gin).max(1))) {
        v.grad_in = g;
    }
    for (v, g) in views.iter_mut().zip(split(grad_out, group * gout, groups)) {
        v.grad_out = g;
    }
    for (b, buf) in store.buffers.iter_mut().enumerate() {
        views.iter_mut().zip(split(buf, group * lens.buffers[b], groups)).for_each(|(v, s)| v.buffers.push(s));
    }
    for (i, w) in store.winners.iter_mut().enumerate() {
        views.iter_mut().zip(split(w, group * lens.winners[i], groups)).for_each(|(v, s)| v.winners.push(s));
    }
    for (i, s) in store.image_sums.iter_mut().enumerate() {
        views.iter_mut().zip(split(s, group * lens.image_sums[i], groups)).for_each(|(v, s)| v.image_sums.push(s));
    }
    for (i, p) in store.partials.iter_mut().enumerate() {
        views.iter_mut().zip(split(p, lens.partials[i], groups)).for_each(|(v, s)| v.partials.push(s));
    }
    views
}

/// Per-image rows of `width` sums, added in image order.
pub(super) fn image_order_sums(rows: &[f64], width: usize) -> Vec<f64> {
    let mut total = vec![0.0f64; width];
    for row in rows.chunks_exact(width) {
        total.iter_mut().zip(row).for_each(|(t, v)| *t += v);
    }
    total
}

/// x (read) and y (written), two different buffers of a view.
pub(super) fn read_write<'b>(buffers: &'b mut [&mut [f32]], x: usize, y: usize) -> (&'b [f32], &'b mut [f32]) {
    assert_ne!(x, y);
    if x < y {
        let (lo, hi) = buffers.split_at_mut(y);
        (&*lo[x], &mut *hi[0])
    } else {
        let (lo, hi) = buffers.split_at_mut(x);
        (&*hi[0], &mut *lo[y])
    }
}

/// Layer `b`'s input image `j` of a view: the batch's input, or the buffer of the layer before.
pub(super) fn input_image<'v>(
    plan: &Plan,
    model: &Model,
    input: &'v [f32],
    buffers: &'v [&mut [f32]],
    j: usize,
    b: usize,
) -> &'v [f32] {
    let len = model.input_of(b).len();
    match b {
        0 => &input[j * len..][..len],
        _ => &buffers[plan.buffer[b - 1]][j * len..][..len],
    }
}

impl Store {
    /// Sizes the store for a batch of `n` (allocating only when the batch grows).
    pub(super) fn size_for(&mut self, n: usize, model: &Model, lens: &Lens) {
        let groups = n.div_ceil(group_size(n));
        self.input.resize(n * model.input.len(), 0.0);
        let fit = |parts: &mut Vec<Vec<f32>>, lens: &[usize], times: usize| {
            parts.resize(lens.len(), Vec::new());
            parts.iter_mut().zip(lens).for_each(|(p, &len)| p.resize(times * len, 0.0));
        };
        fit(&mut self.buffers, &lens.buffers, n);
        fit(&mut self.partials, &lens.partials, groups);
        self.winners.resize(lens.winners.len(), Vec::new());
        self.winners.iter_mut().zip(&lens.winners).for_each(|(w, &len)| w.resize(n * len, 0));
        self.image_sums.resize(lens.image_sums.len(), Vec::new());
        self.image_sums.iter_mut().zip(&lens.image_sums).for_each(|(s, &len)| s.resize(n * len, 0.0));
    }
}
