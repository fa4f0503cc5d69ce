// Convolution k x k, stride 1, zero padding d.pad, with or without bias; NCHW activations, weights at
// state[d.w_off..] as cout x cin x k x k (their gradient at the same offset of grads). Every pass is a
// tiled implicit matrix product: the image patches are never written out; a workgroup stages KT-deep
// slabs of patch values and weights in workgroup memory and each of its TW invocations keeps a 4 x 4
// register block of results (4 positions or weight columns x 4 channels, vec4 reads of the slabs).
// Partial tiles (channels, positions, depth) are padded with zeros and their results not written.
// With d.bias == 1 the layer has a bias per output channel (state[d.bias_off..]): it is one more
// column of the product, whose patch value is 1, so forward adds it and the weight gradient's
// tiles compute its gradient (the sum of dy) with the weights'. Its slices go as the weights' do,
// slice 0 at d.bias_off of grads, slice s > 0 at d.bias_extra + (s - 1) * cout.
// With d.pool == 1 the input is the 2x2 max pooling (stride 2, the first maximum on ties, as
// pool.wgsl) of x, which holds planes of 2h x 2w: the pooling runs inside the patch reads.
//
// Entry points and dispatch shapes (workgroups of TW invocations, a flat grid; see flat_group). Each
// fused variant is an entry point of its own, so each binds only what it uses:
//   forward           y[co, p] = sum over r = (ci, ky, kx) of w[co, r] * x-patch[r, p],
//                     p = (image, oy, ox): one workgroup per tile of TC output channels x TP positions
//                     and per split of the sum (ceil(cout / TC) * ceil(n * ho * wo / TP) * d.splits):
//                     with d.splits > 1, for layers of few tiles, split s sums its share of r (whole
//                     slabs, or for a sum shallower than d.splits slabs a share of the depth each) and
//                     writes y's part s, at s * len(y); the batchnorm's statistics kernel adds the
//                     parts in order.
//   forward_bn_stats  forward (one split), and the training batchnorm after this layer's forward
//                     partials (below).
//   forward_bn_eval   forward (one split) through the evaluation-mode batchnorm that follows (running
//                     statistics at d.*_off), and its ReLU when d.bn_relu == 1: that launch is skipped.
//   forward_relu      forward (one split) through the ReLU that follows (one no batchnorm absorbs):
//                     that launch is skipped.
//   forward_relu_dropout  forward_relu, then the dropout right after that ReLU: element i of y kept
//                     when dropout_hash(seed, step, d.drop_layer, i) >= d.drop_threshold, and scaled
//                     by d.drop_scale (the identity when s.dropout_on == 0), as dropout.wgsl; y is the
//                     dropout's output, and both launches after this one are skipped.
//   backward          both gradients in one launch, as they depend on dy alone:
//                     first d.weight_groups workgroups: dw[co, r] = sum over positions p of
//                     dy[co, p] * x-patch[r, p], one per tile of TC output channels x TP of the
//                     cin * k * k columns and per slice of the positions
//                     (ceil(cout / TC) * ceil(cin k k / TP) * d.slices); slice s sums its contiguous
//                     share of the positions in order and writes its partial sums to slice s's place
//                     (slice 0 at the weights' own offset of grads, slice s > 0 at
//                     d.extra_off + (s - 1) * weights); sgd.wgsl adds the slices in order;
//                     then dx[ci, q] = sum over r = (co, ky, kx) of w[co, ci, ky, kx] * dy-patch[r, q],
//                     tiles over input channels and input positions as forward's
//                     (ceil(cin / TC) * ceil(n * h * w / TP)).
//   backward_weights  the weight gradient alone (the first layer: its input needs no gradient).
//   backward_bn_sums  backward, and the backward partials of the batchnorm this layer reads (below).
// The batchnorm partials (batchnorm.wgsl reads them; they save it a launch) are one per tile of
// positions and channel, part = the tile's position index, written into that batchnorm's `saved`
// from d.part_off:
//   forward_bn_stats: (count, mean, M2) of the tile's outputs;
//   backward_bn_sums: for the batchnorm whose output (after its ReLU and dropout; with d.pool its 2x2
//             max pooling) this layer reads, (sum g, sum g * xhat) of the dx tile, g = dx routed to
//             the window's maximum, masked by that ReLU (d.bn_relu) and scaled by the dropout
//             (d.bn_dropout, d.bn_scale), xhat from the batchnorm's input bn_x and its saved mean and
//             1/std (saved[c], saved[cin + c]): what batchnorm.wgsl's backward_reduce computes.
// d.bn_relu and d.bn_dropout describe that batchnorm's own fused layers (as batchnorm.wgsl's d.relu
// and d.dropout do), not which epilogue runs.
// Every result is one invocation's sum in a fixed order, so the same inputs give the same bits.
// Bindings: 0 dims (uniform), 1 x (input activation), 2 state (weights; batchnorm parameters),
//           3 dy (output gradient), 4 out (forward: y; backward: dx; not in backward_weights),
//           5 grads (backward entries), 6 saved (the next or previous batchnorm's; _bn_ entries),
//           7 bn_x (that batchnorm's input) and 8 step (uniform; backward_bn_sums,
//           forward_relu_dropout). Forward binds x
//           as dy too: the patch reader serves both directions.

struct Dims {
    n: u32, cin: u32, h: u32, w: u32,
    cout: u32, ho: u32, wo: u32, pad: u32,
    k: u32, w_off: u32, slices: u32, extra_off: u32,
    gamma_off: u32, beta_off: u32, mean_off: u32, var_off: u32,
    eps: f32, pool: u32, weight_groups: u32, splits: u32,
    bias: u32, bias_off: u32, bias_extra: u32, part_off: u32,
    bn_relu: u32, bn_dropout: u32, bn_scale: f32, drop_layer: u32,
    drop_threshold: u32, drop_scale: f32, _p0: u32, _p1: u32,
}

@group(0) @binding(0) var<uniform> d: Dims;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> state: array<f32>;
@group(0) @binding(3) var<storage, read> dy: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
@group(0) @binding(5) var<storage, read_write> grads: array<f32>;
@group(0) @binding(6) var<storage, read_write> saved: array<f32>;
@group(0) @binding(7) var<storage, read> bn_x: array<f32>;
@group(0) @binding(8) var<uniform> s: Step;

// Invocations per workgroup, tile positions (or weight columns), tile channels, and the depth of the
// sum staged at a time. TW = (TP / 4) * (TC / 4): one 4 x 4 register block per invocation.
const TW: u32 = 64u;
const TP: u32 = 64u;
const TC: u32 = 16u;
const KT: u32 = 16u;

// KT rows of TP patch values (4 per vec4), and KT rows of TC channel values (4 per vec4): 5 KiB.
var<workgroup> slab_p: array<vec4<f32>, 256>; // KT * TP / 4
var<workgroup> slab_c: array<vec4<f32>, 64>; // KT * TC / 4

// One 4 x 4 register block: for each of 4 positions (or columns), 4 channels.
struct Block {
    r0: vec4<f32>, r1: vec4<f32>, r2: vec4<f32>, r3: vec4<f32>,
}

// Adds the staged slabs' product into the block of invocation `lid`: positions 4 (lid % 16) .. +3,
// channels 4 (lid / 16) .. +3, over the KT staged rows in order.
fn multiply_slabs(lid: u32, acc: ptr<function, Block>) {
    let tp = lid % (TP / 4u);
    let tc = lid / (TP / 4u);
    for (var kk = 0u; kk < KT; kk++) {
        let a = slab_p[kk * (TP / 4u) + tp];
        let b = slab_c[kk * (TC / 4u) + tc];
        (*acc).r0 += a.x * b;
        (*acc).r1 += a.y * b;
        (*acc).r2 += a.z * b;
        (*acc).r3 += a.w * b;
    }
}

// Where invocation `lid`'s block lies in the tile: its j-th position (or column) and t-th channel.
fn block_col(lid: u32, j: u32) -> u32 {
    return 4u * (lid % (TP / 4u)) + j;
}

fn block_channel(lid: u32, t: u32) -> u32 {
    return 4u * (lid / (TP / 4u)) + t;
}

fn block_row(acc: Block, j: u32) -> vec4<f32> {
    switch j {
        case 0u: { return acc.r0; }
        case 1u: { return acc.r1; }
        case 2u: { return acc.r2; }
        default: { return acc.r3; }
    }
}

// The weight w[co, ci, tap], or 0 past the tensor's channels (the padding of a partial tile).
fn weight(co: u32, ci: u32, tap: u32) -> f32 {
    if (co >= d.cout || ci >= d.cin) {
        return 0.0;
    }
    return state[d.w_off + (co * d.cin + ci) * d.k * d.k + tap];
}

// Column r of forward's weight row for output channel co: the weights, then the bias.
fn forward_weight(co: u32, r: u32) -> f32 {
    let kk = d.k * d.k;
    if (r == d.cin * kk) {
        return select(0.0, state[d.bias_off + min(co, d.cout - 1u)], d.bias == 1u && co < d.cout);
    }
    return weight(co, r / kk, r % kk);
}

// A position of an NCHW plane of `hw_h` x `hw_w` pixels: image, row, column.
fn position(p: u32, hw_h: u32, hw_w: u32) -> vec3<u32> {
    let plane = hw_h * hw_w;
    return vec3<u32>(p / plane, (p % plane) / hw_w, p % hw_w);
}

// The next position after `at` in a plane of hw_h x hw_w pixels (row by row, image by image).
fn next_position(at: vec3<u32>, hw_h: u32, hw_w: u32) -> vec3<u32> {
    var p = at;
    p.z += 1u;
    if (p.z == hw_w) {
        p.z = 0u;
        p.y += 1u;
        if (p.y == hw_h) {
            p.y = 0u;
            p.x += 1u;
        }
    }
    return p;
}

// A tap (channel, ky, kx) of a patch, and the next one in the weights' (channel, ky, kx) order.
fn tap_of(r: u32) -> vec3<u32> {
    let kk = d.k * d.k;
    return vec3<u32>(r / kk, (r % kk) / d.k, r % d.k);
}

fn next_tap(t: vec3<u32>) -> vec3<u32> {
    var n = t;
    n.z += 1u;
    if (n.z == d.k) {
        n.z = 0u;
        n.y += 1u;
        if (n.y == d.k) {
            n.y = 0u;
            n.x += 1u;
        }
    }
    return n;
}

// Input value (image b, channel c, row iy, column ix): x's, or the maximum of its 2x2 window of x.
fn input_value(b: u32, c: u32, iy: u32, ix: u32) -> f32 {
    if (d.pool == 0u) {
        return x[((b * d.cin + c) * d.h + iy) * d.w + ix];
    }
    let w2 = 2u * d.w;
    let base = ((b * d.cin + c) * 2u * d.h + 2u * iy) * w2 + 2u * ix;
    let v = vec4<f32>(x[base], x[base + 1u], x[base + w2], x[base + w2 + 1u]);
    return v[window_max_place(v)];
}

// Tap `t` of x's patch at output position `at` (forward and the weight gradient), or of dy's patch at
// input position `at` (backward); 0 outside the image and past the channels.
fn patch_value(backward: bool, t: vec3<u32>, at: vec3<u32>) -> f32 {
    if (backward) {
        let oy = i32(at.y + d.pad) - i32(t.y);
        let ox = i32(at.z + d.pad) - i32(t.z);
        if (t.x >= d.cout || oy < 0 || oy >= i32(d.ho) || ox < 0 || ox >= i32(d.wo)) {
            return 0.0;
        }
        return dy[((at.x * d.cout + t.x) * d.ho + u32(oy)) * d.wo + u32(ox)];
    }
    if (t.x == d.cin) {
        // The bias column.
        return select(0.0, 1.0, d.bias == 1u);
    }
    let iy = i32(at.y + t.y) - i32(d.pad);
    let ix = i32(at.z + t.z) - i32(d.pad);
    if (t.x >= d.cin || iy < 0 || iy >= i32(d.h) || ix < 0 || ix >= i32(d.w)) {
        return 0.0;
    }
    return input_value(at.x, t.x, u32(iy), u32(ix));
}

// Where tile `group` of forward (backward == false) or of dx lies: its first output channel and
// position, its index among the tiles of positions, and its split of the sum. Depends on the group
// alone, so it is uniform across the workgroup and the barriers after a test of `live` stay uniform.
struct TileAt {
    c0: u32, p0: u32, index: u32, split: u32, live: bool,
}

fn tile_at(group: u32, backward: bool) -> TileAt {
    let out_c = select(d.cout, d.cin, backward);
    let positions = d.n * select(d.ho * d.wo, d.h * d.w, backward);
    let c_tiles = (out_c + TC - 1u) / TC;
    let tiles = c_tiles * ((positions + TP - 1u) / TP);
    // Forward may split the sum's depth (whole slabs each, where there are enough) over d.splits
    // groups of tiles; split s writes its part at s * (the output's length), and the batchnorm
    // statistics add the parts. The grid may round the workgroup count up: those tiles are not live.
    let splits = select(d.splits, 1u, backward);
    let index = (group % tiles) / c_tiles;
    return TileAt(((group % tiles) % c_tiles) * TC, index * TP, index, group / tiles, group / tiles < splits);
}

// The product of one output tile of forward (backward == false) or of dx: TC channels and TP
// (image, row, column) positions of the output, as invocation `lid`'s register block.
fn tile_product(lid: u32, at: TileAt, backward: bool) -> Block {
    // Output plane and the sum's depth, for the direction.
    let out_h = select(d.ho, d.h, backward);
    let out_w = select(d.wo, d.w, backward);
    let depth = select(d.cin * d.k * d.k + d.bias, d.cout * d.k * d.k, backward);
    let positions = d.n * out_h * out_w;
    let splits = select(d.splits, 1u, backward);
    let slabs = (depth + KT - 1u) / KT;
    var per_split = (slabs + splits - 1u) / splits * KT;
    if (splits > slabs) {
        // A shallow sum (Net3's 1x1 layer: 32 deep) in more parts than slabs: partly filled slabs.
        per_split = (depth + splits - 1u) / splits;
    }
    let r_start = at.split * per_split;
    let r_end = min(depth, r_start + per_split);
    // Each invocation stages the patch of one position, the same for every slab.
    let mine = at.p0 + lid;
    let pos = position(min(mine, positions - 1u), out_h, out_w);
    var acc: Block;
    for (var r0 = r_start; r0 < r_end; r0 += KT) {
        // Taps advance by counting, not dividing: index arithmetic would outweigh the multiply-adds.
        var t = tap_of(r0);
        for (var row = 0u; row < KT; row++) {
            var v = 0.0;
            if (mine < positions && r0 + row < r_end) {
                v = patch_value(backward, t, pos);
            }
            slab_p[row * (TP / 4u) + lid / 4u][lid % 4u] = v;
            t = next_tap(t);
        }
        for (var e = lid; e < KT * TC; e += TW) {
            let r = r0 + e / TC;
            let c = at.c0 + e % TC;
            var v = 0.0;
            if (r < r_end) {
                if (backward) {
                    let kk = d.k * d.k;
                    v = weight(r / kk, c, r % kk);
                } else {
                    v = forward_weight(c, r);
                }
            }
            slab_c[(e / TC) * (TC / 4u) + (e % TC) / 4u][e % 4u] = v;
        }
        workgroupBarrier();
        multiply_slabs(lid, &acc);
        workgroupBarrier();
    }
    return acc;
}

// What write_tile applies to each value before it stores it.
const EPILOGUE_NONE: u32 = 0u;
const EPILOGUE_BN_EVAL: u32 = 1u;
const EPILOGUE_RELU: u32 = 2u;

// Where output (position p, channel c) of a tile goes in `out` (forward's y part, or dx).
fn out_index(at: TileAt, p: u32, c: u32, backward: bool) -> u32 {
    let out_c = select(d.cout, d.cin, backward);
    let plane = select(d.ho * d.wo, d.h * d.w, backward);
    let part = at.split * d.n * plane * out_c;
    return part + ((p / plane) * out_c + c) * plane + p % plane;
}

// Writes invocation `lid`'s block of a tile into `out` (forward's y part, or dx); with
// EPILOGUE_BN_EVAL, through the evaluation-mode batchnorm (and ReLU) that follows; with EPILOGUE_RELU,
// through the ReLU that follows.
fn write_tile(lid: u32, at: TileAt, acc: Block, backward: bool, epilogue: u32) {
    let out_c = select(d.cout, d.cin, backward);
    let positions = d.n * select(d.ho * d.wo, d.h * d.w, backward);
    for (var j = 0u; j < 4u; j++) {
        let p = at.p0 + block_col(lid, j);
        if (p >= positions) {
            break;
        }
        let row = block_row(acc, j);
        for (var t = 0u; t < 4u; t++) {
            let c = at.c0 + block_channel(lid, t);
            if (c < out_c) {
                var v = row[t];
                if (epilogue == EPILOGUE_BN_EVAL) {
                    v = batchnorm_eval(c, v);
                } else if (epilogue == EPILOGUE_RELU) {
                    v = relu(v);
                }
                out[out_index(at, p, c, backward)] = v;
            }
        }
    }
}

// The value at (channel t, position j) of the tile, in the scratch that reuses slab_p (TC * TP
// values, channel-major); the main loop's last barrier has passed, so the slabs are free.
fn scratch_set(at: u32, v: f32) {
    slab_p[at / 4u][at % 4u] = v;
}

fn scratch(at: u32) -> f32 {
    return slab_p[at / 4u][at % 4u];
}

// The batchnorm's forward partials of a forward tile: per channel, (count, mean, M2) of its outputs,
// two passes over the staged values; each of a channel's 4 invocations (TW = 4 TC) takes a quarter of
// the positions in order, and the quarters are added in order.
fn forward_partials(lid: u32, acc: Block, tile: u32, p0: u32, c0: u32) {
    for (var j = 0u; j < 4u; j++) {
        let row = block_row(acc, j);
        for (var t = 0u; t < 4u; t++) {
            scratch_set(block_channel(lid, t) * TP + block_col(lid, j), row[t]);
        }
    }
    workgroupBarrier();
    let count = min(TP, d.n * d.ho * d.wo - p0);
    let channel = lid / 4u;
    let first = (lid % 4u) * (TP / 4u);
    let last = min(first + TP / 4u, count);
    var sum = 0.0;
    for (var j = first; j < last; j++) {
        sum += scratch(channel * TP + j);
    }
    // slab_c is free too: channel t's four quarters are its vec4 t.
    slab_c[channel][lid % 4u] = sum;
    workgroupBarrier();
    let sums = slab_c[channel];
    let mean = (((sums.x + sums.y) + sums.z) + sums.w) / f32(count);
    var m2 = 0.0;
    for (var j = first; j < last; j++) {
        let v = scratch(channel * TP + j) - mean;
        m2 += v * v;
    }
    workgroupBarrier();
    slab_c[channel][lid % 4u] = m2;
    workgroupBarrier();
    let c = c0 + channel;
    if (lid % 4u == 0u && c < d.cout) {
        let m2s = slab_c[channel];
        let at = d.part_off + 3u * (tile * d.cout + c);
        saved[at] = f32(count);
        saved[at + 1u] = mean;
        saved[at + 2u] = ((m2s.x + m2s.y) + m2s.z) + m2s.w;
    }
}

// The gradient g reaching the batchnorm's normalization at input channel c and (pooled) input
// position q of this layer, from the dx value there, and g * xhat: batchnorm.wgsl's masked_dy.
fn bn_gradient(q: vec3<u32>, c: u32, dx: f32) -> vec2<f32> {
    var i: u32;
    if (d.pool == 1u) {
        // Only the window's maximum (the first on ties) gets the gradient.
        let w2 = 2u * d.w;
        let base = ((q.x * d.cin + c) * 2u * d.h + 2u * q.y) * w2 + 2u * q.z;
        let v = vec4<f32>(x[base], x[base + 1u], x[base + w2], x[base + w2 + 1u]);
        let place = window_max_place(v);
        i = base + (place / 2u) * w2 + place % 2u;
    } else {
        i = ((q.x * d.cin + c) * d.h + q.y) * d.w + q.z;
    }
    var g = dx;
    if (d.bn_relu == 1u && x[i] <= 0.0) {
        g = 0.0;
    }
    if (d.bn_dropout == 1u && s.dropout_on == 1u) {
        g *= d.bn_scale;
    }
    return vec2<f32>(g, g * ((bn_x[i] - saved[c]) * saved[d.cin + c]));
}

// The batchnorm's backward partials of a dx tile: per channel, (sum g, sum g * xhat), each
// invocation's 4 positions in order, then the TP / 4 invocations of a channel in order.
fn dx_partials(lid: u32, acc: Block, tile: u32, p0: u32, c0: u32) {
    let positions = d.n * d.h * d.w;
    var sg = vec4<f32>(0.0);
    var sgx = vec4<f32>(0.0);
    for (var j = 0u; j < 4u; j++) {
        let p = p0 + block_col(lid, j);
        if (p >= positions) {
            break;
        }
        let q = position(p, d.h, d.w);
        let row = block_row(acc, j);
        for (var t = 0u; t < 4u; t++) {
            let c = c0 + block_channel(lid, t);
            if (c < d.cin) {
                let gg = bn_gradient(q, c, row[t]);
                sg[t] += gg.x;
                sgx[t] += gg.y;
            }
        }
    }
    let lanes = TP / 4u;
    for (var t = 0u; t < 4u; t++) {
        let at = block_channel(lid, t) * lanes + lid % lanes;
        scratch_set(at, sg[t]);
        scratch_set(TC * lanes + at, sgx[t]);
    }
    workgroupBarrier();
    let c = c0 + lid;
    if (lid < TC && c < d.cin) {
        var a = 0.0;
        var b = 0.0;
        for (var k = 0u; k < lanes; k++) {
            a += scratch(lid * lanes + k);
            b += scratch(TC * lanes + lid * lanes + k);
        }
        let at = d.part_off + 2u * (tile * d.cin + c);
        saved[at] = a;
        saved[at + 1u] = b;
    }
}

// The evaluation-mode batchnorm (and ReLU) of the next layer at channel c, computed as batchnorm.wgsl's
// apply_eval computes it.
fn batchnorm_eval(c: u32, v: f32) -> f32 {
    let invstd = 1.0 / sqrt(state[d.var_off + c] + d.eps);
    var y = (v - state[d.mean_off + c]) * invstd * state[d.gamma_off + c] + state[d.beta_off + c];
    if (d.bn_relu == 1u) {
        y = relu(y);
    }
    return y;
}

// Tile `group` of forward (backward == false) or of dx, written through `epilogue` (write_tile's).
fn plain_tile(lid: u32, group: u32, backward: bool, epilogue: u32) {
    let at = tile_at(group, backward);
    if (!at.live) {
        return;
    }
    write_tile(lid, at, tile_product(lid, at, backward), backward, epilogue);
}

@compute @workgroup_size(TW)
fn forward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    plain_tile(lid, flat_group(wid, nwg), false, EPILOGUE_NONE);
}

@compute @workgroup_size(TW)
fn forward_bn_stats(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let at = tile_at(flat_group(wid, nwg), false);
    if (!at.live) {
        return;
    }
    let acc = tile_product(lid, at, false);
    write_tile(lid, at, acc, false, EPILOGUE_NONE);
    forward_partials(lid, acc, at.index, at.p0, at.c0);
}

@compute @workgroup_size(TW)
fn forward_bn_eval(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    plain_tile(lid, flat_group(wid, nwg), false, EPILOGUE_BN_EVAL);
}

@compute @workgroup_size(TW)
fn forward_relu(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    plain_tile(lid, flat_group(wid, nwg), false, EPILOGUE_RELU);
}

// The dropout after the ReLU, on the values invocation `lid` has just written of a forward tile (the
// same invocation reads back its own writes): apart from write_tile, so that only this entry point
// binds the step uniform.
fn dropout_tile(lid: u32, at: TileAt) {
    if (s.dropout_on == 0u) {
        return;
    }
    let positions = d.n * d.ho * d.wo;
    for (var j = 0u; j < 4u; j++) {
        let p = at.p0 + block_col(lid, j);
        for (var t = 0u; t < 4u; t++) {
            let c = at.c0 + block_channel(lid, t);
            if (p < positions && c < d.cout) {
                let i = out_index(at, p, c, false);
                let keep = dropout_hash(s.dropout_seed, s.dropout_step, d.drop_layer, i) >= d.drop_threshold;
                out[i] = select(0.0, out[i] * d.drop_scale, keep);
            }
        }
    }
}

@compute @workgroup_size(TW)
fn forward_relu_dropout(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let at = tile_at(flat_group(wid, nwg), false);
    if (!at.live) {
        return;
    }
    write_tile(lid, at, tile_product(lid, at, false), false, EPILOGUE_RELU);
    dropout_tile(lid, at);
}

// group is uniform across the workgroup, so every branch below keeps its barriers uniform.
@compute @workgroup_size(TW)
fn backward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let group = flat_group(wid, nwg);
    if (group < d.weight_groups) {
        weight_tile(lid, group);
    } else {
        plain_tile(lid, group - d.weight_groups, true, EPILOGUE_NONE);
    }
}

@compute @workgroup_size(TW)
fn backward_weights(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    weight_tile(lid, flat_group(wid, nwg));
}

@compute @workgroup_size(TW)
fn backward_bn_sums(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let group = flat_group(wid, nwg);
    if (group < d.weight_groups) {
        weight_tile(lid, group);
        return;
    }
    let at = tile_at(group - d.weight_groups, true);
    if (!at.live) {
        return;
    }
    let acc = tile_product(lid, at, true);
    write_tile(lid, at, acc, true, EPILOGUE_NONE);
    dx_partials(lid, acc, at.index, at.p0, at.c0);
}

// One tile of one slice of the weight gradient, tile `group`.
fn weight_tile(lid: u32, group: u32) {
    let kk = d.k * d.k;
    let weights = d.cin * kk;
    let columns = weights + d.bias;
    let c_tiles = (d.cout + TC - 1u) / TC;
    let col_tiles = (columns + TP - 1u) / TP;
    let c0 = (group % c_tiles) * TC;
    let col0 = ((group / c_tiles) % col_tiles) * TP;
    let slice = group / (c_tiles * col_tiles);
    if (slice >= d.slices) {
        return;
    }
    let plane = d.ho * d.wo;
    let positions = d.n * plane;
    let share = (positions + d.slices - 1u) / d.slices;
    let start = min(positions, slice * share);
    let end = min(positions, start + share);
    // Each invocation stages one column r = (ci, ky, kx) of the patches, the same for every slab.
    let mine = col0 + lid;
    let t = tap_of(mine);
    var acc: Block;
    for (var q0 = start; q0 < end; q0 += KT) {
        var at = position(q0, d.ho, d.wo);
        for (var row = 0u; row < KT; row++) {
            var v = 0.0;
            if (mine < columns && q0 + row < end) {
                v = patch_value(false, t, at);
            }
            slab_p[row * (TP / 4u) + lid / 4u][lid % 4u] = v;
            at = next_position(at, d.ho, d.wo);
        }
        for (var e = lid; e < KT * TC; e += TW) {
            let q = q0 + e / TC;
            let c = c0 + e % TC;
            var v = 0.0;
            if (q < end && c < d.cout) {
                v = dy[((q / plane) * d.cout + c) * plane + q % plane];
            }
            slab_c[(e / TC) * (TC / 4u) + (e % TC) / 4u][e % 4u] = v;
        }
        workgroupBarrier();
        multiply_slabs(lid, &acc);
        workgroupBarrier();
    }
    let base = select(d.extra_off + (slice - 1u) * d.cout * weights, d.w_off, slice == 0u);
    let bias_base = select(d.bias_extra + (slice - 1u) * d.cout, d.bias_off, slice == 0u);
    for (var j = 0u; j < 4u; j++) {
        let r = col0 + block_col(lid, j);
        if (r >= columns) {
            break;
        }
        let row = block_row(acc, j);
        for (var t = 0u; t < 4u; t++) {
            let c = c0 + block_channel(lid, t);
            if (c < d.cout) {
                if (r < weights) {
                    grads[base + c * weights + r] = row[t];
                } else {
                    grads[bias_base + c] = row[t];
                }
            }
        }
    }
}
