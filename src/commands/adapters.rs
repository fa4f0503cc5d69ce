//! `mnist-wgpu adapters`: every GPU adapter wgpu finds.

use anyhow::{bail, Result};

use mnist_wgpu::gpu::INSTALL_HINT;

pub fn run() -> Result<()> {
    let adapters = mnist_wgpu::gpu::list_adapters();
    if adapters.is_empty() {
        bail!(INSTALL_HINT);
    }
    println!("{:<6}{:<40}{:<9}{:<15}driver", "index", "name", "backend", "type");
    for a in adapters {
        println!("{:<6}{:<40}{:<9}{:<15}{}", a.index, a.name, a.backend, a.device_type, a.driver);
    }
    Ok(())
}
