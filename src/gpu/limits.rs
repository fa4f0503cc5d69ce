//! What the kernels of `shaders/` ask of a GPU: their workgroup size, and the adapter limits they
//! need (an adapter below one is refused when the context opens, naming it).

use anyhow::{bail, Result};

/// Invocations per workgroup of every kernel (WG in common.wgsl).
pub const WG: u32 = 256;

/// What the kernels of `shaders/` need of an adapter (WebGPU's defaults cover it): storage buffers
/// per kernel (7 at most, conv and batchnorm), invocations per workgroup, and workgroup memory (conv's
/// slabs and the reduction arrays, 7 KiB).
const NEEDED_LIMITS: [(&str, u32); 4] = [
    ("storage buffers per shader stage", 7),
    ("invocations per workgroup", WG),
    ("workgroup size in x", WG),
    ("bytes of workgroup memory", 8 << 10),
];

/// Refuses, naming the limit, an adapter that cannot run the kernels.
pub fn check_limits(info: &wgpu::AdapterInfo, limits: &wgpu::Limits) -> Result<()> {
    let has = [
        limits.max_storage_buffers_per_shader_stage,
        limits.max_compute_invocations_per_workgroup,
        limits.max_compute_workgroup_size_x,
        limits.max_compute_workgroup_storage_size,
    ];
    for ((what, needed), has) in NEEDED_LIMITS.iter().zip(has) {
        if has < *needed {
            let name = if info.name.is_empty() { "this GPU adapter" } else { info.name.as_str() };
            bail!("{name} allows {has} {what}, and the kernels need {needed}: it cannot run them");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_adapter_below_a_needed_limit_is_refused_naming_the_limit() {
        let info = wgpu::AdapterInfo {
            name: "Tiny GPU".into(),
            ..wgpu::AdapterInfo::new(wgpu::DeviceType::Cpu, wgpu::Backend::Gl)
        };
        assert!(check_limits(&info, &wgpu::Limits::default()).is_ok());
        let few = wgpu::Limits { max_storage_buffers_per_shader_stage: 4, ..wgpu::Limits::default() };
        let err = check_limits(&info, &few).unwrap_err().to_string();
        assert_eq!(
            err,
            "Tiny GPU allows 4 storage buffers per shader stage, and the kernels need 7: it cannot run them"
        );
    }
}
