//! Shader sources, their validation with naga, compute pipelines, and one recorded kernel launch.

use std::collections::BTreeMap;

use anyhow::{anyhow, Result};

use super::context::GpuContext;
use super::limits::WG;

/// Prepended to every shader: the grid index helpers and the fixed-order workgroup reduction.
pub const COMMON: &str = include_str!("../../shaders/common.wgsl");

/// Prepended (after `COMMON`) to the parameter updates: their shared bindings and the gradients'
/// slices.
pub const UPDATE_COMMON: &str = include_str!("../../shaders/update_common.wgsl");

/// Every shader file of `shaders/` except the preludes, by name.
pub const SHADERS: &[(&str, &str)] = &[
    ("conv", include_str!("../../shaders/conv.wgsl")),
    ("batchnorm", include_str!("../../shaders/batchnorm.wgsl")),
    ("pool", include_str!("../../shaders/pool.wgsl")),
    ("dropout", include_str!("../../shaders/dropout.wgsl")),
    ("relu", include_str!("../../shaders/relu.wgsl")),
    ("loss", include_str!("../../shaders/loss.wgsl")),
    ("sgd", include_str!("../../shaders/sgd.wgsl")),
    ("adam", include_str!("../../shaders/adam.wgsl")),
];

/// The preludes' files, which `full_source` puts before the shaders that need them.
pub const PRELUDES: &[&str] = &["common", "update_common"];

/// The most workgroups one dispatch dimension takes.
const MAX_GROUPS: u32 = 65_535;

/// The full source of shader `name`: the preludes it needs, then the file.
pub fn full_source(name: &str, body: &str) -> String {
    match name {
        "sgd" | "adam" => format!("{COMMON}\n{UPDATE_COMMON}\n{body}"),
        _ => format!("{COMMON}\n{body}"),
    }
}

/// Parses and validates a shader with naga; the error names the file and the place.
pub fn validate(name: &str, body: &str) -> Result<(naga::Module, naga::valid::ModuleInfo)> {
    let source = full_source(name, body);
    let path = format!("shaders/{name}.wgsl (after its preludes)");
    let module =
        naga::front::wgsl::parse_str(&source).map_err(|e| anyhow!("{}", e.emit_to_string_with_path(&source, &path)))?;
    let info = naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::all())
        .validate(&module)
        .map_err(|e| anyhow!("{path}: {}", e.emit_to_string(&source)))?;
    Ok((module, info))
}

/// A compiled entry point and the bindings it uses (its automatic bind group layout has exactly those).
#[derive(Clone)]
pub struct Kernel {
    pub name: String,
    pipeline: wgpu::ComputePipeline,
    bindings: Vec<u32>,
}

/// All entry points of one shader file, by entry point name.
pub fn compile(ctx: &GpuContext, name: &str) -> Result<BTreeMap<String, Kernel>> {
    let body = SHADERS.iter().find(|(n, _)| *n == name).ok_or_else(|| anyhow!("no shader {name}"))?.1;
    let (module, info) = validate(name, body)?;
    let shader = ctx.device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some(name),
        source: wgpu::ShaderSource::Wgsl(full_source(name, body).into()),
    });
    let mut kernels = BTreeMap::new();
    for (index, entry) in module.entry_points.iter().enumerate() {
        let uses = info.get_entry_point(index);
        let bindings = module
            .global_variables
            .iter()
            .filter(|(handle, _)| !uses[*handle].is_empty())
            .filter_map(|(_, var)| var.binding.as_ref().map(|b| b.binding))
            .collect();
        let pipeline = ctx.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(&format!("{name}.{}", entry.name)),
            layout: None,
            module: &shader,
            entry_point: Some(&entry.name),
            compilation_options: Default::default(),
            cache: None,
        });
        let kernel = Kernel { name: format!("{name}.{}", entry.name), pipeline, bindings };
        kernels.insert(entry.name.clone(), kernel);
    }
    Ok(kernels)
}

/// Takes one entry point out of a compiled shader file.
pub fn take(kernels: &mut BTreeMap<String, Kernel>, entry: &str) -> Kernel {
    kernels.remove(entry).unwrap_or_else(|| panic!("shader has no entry point {entry}"))
}

/// What a launch must do at the least, from its shapes: floating-point operations, and bytes moved if
/// every input were read once and every output written once (the roofline's two axes).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Cost {
    pub flops: f64,
    pub bytes: f64,
}

impl Cost {
    /// `flops` operations over `floats_moved` 4-byte values.
    pub fn new(flops: usize, floats_moved: usize) -> Cost {
        Cost { flops: flops as f64, bytes: 4.0 * floats_moved as f64 }
    }
}

/// One recorded kernel launch: a pipeline, its bind group and the workgroup grid.
pub struct Dispatch {
    pub label: String,
    pipeline: wgpu::ComputePipeline,
    bind_group: wgpu::BindGroup,
    groups: (u32, u32),
    pub cost: Cost,
}

impl Kernel {
    /// A launch of this kernel over `groups` workgroups, binding the buffers it uses among `buffers`
    /// (binding number, buffer); a file's kernels can so all be given the file's whole binding list.
    pub fn launch(&self, ctx: &GpuContext, groups: u32, buffers: &[(u32, &wgpu::Buffer)]) -> Dispatch {
        let entries: Vec<wgpu::BindGroupEntry> = self
            .bindings
            .iter()
            .map(|&b| {
                let buffer = buffers
                    .iter()
                    .find(|(n, _)| *n == b)
                    .unwrap_or_else(|| panic!("{}: no buffer given for binding {b}", self.name))
                    .1;
                wgpu::BindGroupEntry { binding: b, resource: buffer.as_entire_binding() }
            })
            .collect();
        let bind_group = ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(&self.name),
            layout: &self.pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        Dispatch {
            label: self.name.clone(),
            pipeline: self.pipeline.clone(),
            bind_group,
            groups: grid(groups),
            cost: Cost::default(),
        }
    }
}

/// Workgroups for one invocation per element of `len` elements.
pub fn groups_for(len: usize) -> u32 {
    (len as u32).div_ceil(WG)
}

/// Spreads `groups` workgroups over (x, y) so that neither exceeds the per-dimension limit; the
/// shaders' flat_index / flat_group undo it, and skip the few extra groups it may add.
fn grid(groups: u32) -> (u32, u32) {
    if groups <= MAX_GROUPS {
        (groups.max(1), 1)
    } else {
        let y = groups.div_ceil(MAX_GROUPS);
        (groups.div_ceil(y), y)
    }
}

impl Dispatch {
    /// The launch, with what it must do at the least.
    pub fn with_cost(mut self, cost: Cost) -> Dispatch {
        self.cost = cost;
        self
    }

    /// Workgroups launched (the grid's x times y; the few spare ones `grid` may add included).
    pub fn workgroups(&self) -> u32 {
        self.groups.0 * self.groups.1
    }

    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.record_grid(pass, self.groups);
    }

    /// Records the launch over a grid of `(x, y)` workgroups; (0, 0) is everything the host does for
    /// it and no GPU work (the host-only benchmark).
    fn record_grid(&self, pass: &mut wgpu::ComputePass<'_>, (x, y): (u32, u32)) {
        pass.set_pipeline(&self.pipeline);
        pass.set_bind_group(0, &self.bind_group, &[]);
        pass.dispatch_workgroups(x, y, 1);
    }
}

/// Records `dispatches` in order into one compute pass of `encoder`; `empty` makes every launch one of
/// zero workgroups.
pub fn record_pass<'a>(
    encoder: &mut wgpu::CommandEncoder,
    dispatches: impl IntoIterator<Item = &'a Dispatch>,
    empty: bool,
) {
    let mut pass = encoder.begin_compute_pass(&Default::default());
    for d in dispatches {
        d.record_grid(&mut pass, if empty { (0, 0) } else { d.groups });
    }
}

/// Records `dispatches` in order into one compute pass of one encoder and submits it.
pub fn run(ctx: &GpuContext, dispatches: &[&Dispatch]) {
    let mut encoder = ctx.device.create_command_encoder(&Default::default());
    record_pass(&mut encoder, dispatches.iter().copied(), false);
    ctx.queue.submit([encoder.finish()]);
}

/// Runs `dispatches` in order with GPU timestamps and returns (start, end) in nanoseconds from the
/// first timestamp: with `each`, every launch in its own compute pass with timestamps at its start and
/// end (one pair per launch); otherwise all of them in one pass, timed as a whole (one pair). Needs
/// the TIMESTAMP_QUERY feature.
pub async fn run_timed(ctx: &GpuContext, dispatches: &[&Dispatch], each: bool) -> Result<Vec<(f64, f64)>> {
    if !ctx.timestamps {
        anyhow::bail!("adapter {} has no timestamp queries: per-kernel times are not available", ctx.info.name);
    }
    let passes: Vec<&[&Dispatch]> =
        if each { dispatches.iter().map(std::slice::from_ref).collect() } else { vec![dispatches] };
    let count = 2 * passes.len() as u32;
    let queries = ctx.device.create_query_set(&wgpu::QuerySetDescriptor {
        label: Some("kernel timestamps"),
        ty: wgpu::QueryType::Timestamp,
        count,
    });
    let resolved = ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("resolved timestamps"),
        size: count as u64 * 8,
        usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    });
    let mut encoder = ctx.device.create_command_encoder(&Default::default());
    for (i, launches) in passes.iter().enumerate() {
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: launches.first().map(|d| d.label.as_str()),
            timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                query_set: &queries,
                beginning_of_pass_write_index: Some(2 * i as u32),
                end_of_pass_write_index: Some(2 * i as u32 + 1),
            }),
        });
        for d in launches.iter() {
            d.record(&mut pass);
        }
    }
    encoder.resolve_query_set(&queries, 0..count, &resolved, 0);
    ctx.queue.submit([encoder.finish()]);
    let ticks: Vec<u64> = ctx.read(&resolved, count as usize).await?;
    let period = ctx.queue.get_timestamp_period() as f64;
    let origin = ticks.first().copied().unwrap_or(0);
    let ns = |t: u64| t.saturating_sub(origin) as f64 * period;
    Ok(ticks.chunks_exact(2).map(|t| (ns(t[0]), ns(t[1].max(t[0])))).collect())
}
