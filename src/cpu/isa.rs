//! The vector instructions the CPU kernels run with. A plain build targets the baseline x86-64 (SSE2),
//! which has no 32-bit vector multiply (the dropout hash) and four lanes at most; so the element-wise
//! kernels are compiled also for AVX2 and AVX-512 (`vectorized!`), and each call runs the widest form
//! this CPU has. `MNIST_WGPU_CPU_ISA=avx2` (or `baseline`) forces a narrower one, to measure it on a
//! wider CPU. The forms give the same bits: Rust never fuses a multiply and an add on its own, and
//! every sum has its order written out (lanes, then in order).

use std::sync::OnceLock;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2,
    Baseline,
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "AVX-512",
            Isa::Avx2 => "AVX2+FMA",
            Isa::Baseline => "baseline",
        }
    }
}

/// The environment variable that caps the instruction set (`avx512`, `avx2`, `baseline`).
pub const ISA_VAR: &str = "MNIST_WGPU_CPU_ISA";

/// The widest instruction set this CPU has, capped by `MNIST_WGPU_CPU_ISA`; picked once.
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let cap = match std::env::var(ISA_VAR).ok().as_deref() {
            Some("baseline") => Isa::Baseline,
            Some("avx2") => Isa::Avx2,
            _ => Isa::Avx512,
        };
        let best = detected();
        // The narrower of the two (the enum runs from widest to narrowest).
        if (cap as u8) > (best as u8) {
            cap
        } else {
            best
        }
    })
}

#[cfg(target_arch = "x86_64")]
fn detected() -> Isa {
    if is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512dq")
        && is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
    {
        Isa::Avx512
    } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        Isa::Avx2
    } else {
        Isa::Baseline
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detected() -> Isa {
    Isa::Baseline
}

/// Defines a function whose body is compiled three times on x86-64 (AVX-512, AVX2, baseline) and runs
/// in the form `isa()` picks; elsewhere, once.
macro_rules! vectorized {
    ($(#[$meta:meta])* $vis:vis fn $name:ident$(<$($gen:tt),*>)?($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name$(<$($gen),*>)?($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body$(<$($gen),*>)?($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
                unsafe fn avx512$(<$($gen),*>)?($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2$(<$($gen),*>)?($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                match $crate::cpu::isa::isa() {
                    // SAFETY: isa() picks a form only when the CPU reports its features.
                    $crate::cpu::isa::Isa::Avx512 => return unsafe { avx512($($arg),*) },
                    $crate::cpu::isa::Isa::Avx2 => return unsafe { avx2($($arg),*) },
                    $crate::cpu::isa::Isa::Baseline => {}
                }
            }
            body($($arg),*)
        }
    };
}
pub(crate) use vectorized;
