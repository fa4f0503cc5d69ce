//! Uniform structs shared by Rust and WGSL. `uniform!` defines the `#[repr(C)]` struct and the table of
//! its members (name, type, byte offset); a test reads every WGSL uniform struct with naga and compares
//! it with the Rust struct it mirrors, member by member, so that a field added on one side only fails
//! by name instead of shifting every value after it.

/// One member of a uniform struct: its name, its WGSL scalar type and its byte offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member {
    pub name: &'static str,
    pub ty: &'static str,
    pub offset: usize,
}

/// A Rust struct that mirrors a WGSL uniform struct.
pub trait Uniform: bytemuck::Pod {
    const MEMBERS: &'static [Member];
}

/// The WGSL name of a Rust scalar.
pub trait Scalar {
    const WGSL: &'static str;
}

impl Scalar for u32 {
    const WGSL: &'static str = "u32";
}

impl Scalar for f32 {
    const WGSL: &'static str = "f32";
}

/// Defines a `#[repr(C)]` struct of scalars (Clone, Copy, Pod, Zeroable) and its [`Uniform`] table.
macro_rules! uniform {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident {
            $($(#[$field_meta:meta])* $field_vis:vis $field:ident: $ty:ty),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[repr(C)]
        #[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
        $vis struct $name {
            $($(#[$field_meta])* $field_vis $field: $ty),*
        }

        impl $crate::gpu::uniform::Uniform for $name {
            const MEMBERS: &'static [$crate::gpu::uniform::Member] = &[$($crate::gpu::uniform::Member {
                name: stringify!($field),
                ty: <$ty as $crate::gpu::uniform::Scalar>::WGSL,
                offset: std::mem::offset_of!($name, $field),
            }),*];
        }
    };
}
pub(crate) use uniform;

/// Compares the WGSL struct `wgsl` of shader `shader` (after common.wgsl) with the Rust struct
/// `rust`, whose members and size are given: names, order, types, offsets and size must agree. The
/// error names both structs and the first member that differs.
pub fn compare(shader: &str, wgsl: &str, rust: &str, members: &[Member], size: usize) -> Result<(), String> {
    let body =
        super::kernel::SHADERS.iter().find(|(n, _)| *n == shader).map_or(super::kernel::COMMON, |(_, body)| body);
    let (module, _) = super::kernel::validate(shader, body).map_err(|e| e.to_string())?;
    let place = format!("shaders/{shader}.wgsl's struct {wgsl}");
    let (wgsl_members, span) = module
        .types
        .iter()
        .find_map(|(_, t)| match (&t.name, &t.inner) {
            (Some(n), naga::TypeInner::Struct { members, span }) if n == wgsl => Some((members.clone(), *span)),
            _ => None,
        })
        .ok_or_else(|| format!("{place} does not exist (mirrored by {rust})"))?;
    let scalar = |m: &naga::StructMember| match module.types[m.ty].inner {
        naga::TypeInner::Scalar(naga::Scalar { kind: naga::ScalarKind::Uint, width: 4 }) => "u32",
        naga::TypeInner::Scalar(naga::Scalar { kind: naga::ScalarKind::Float, width: 4 }) => "f32",
        _ => "a type that is not a 4-byte scalar",
    };
    for i in 0..wgsl_members.len().max(members.len()) {
        let theirs = wgsl_members.get(i).map(|m| {
            let name = m.name.clone().unwrap_or_default();
            format!("`{name}` ({} at byte {})", scalar(m), m.offset)
        });
        let ours = members.get(i).map(|m| format!("`{}` ({} at byte {})", m.name, m.ty, m.offset));
        if theirs != ours {
            let none = || "nothing".to_string();
            return Err(format!(
                "member {}: {place} has {}, {rust} has {}",
                i + 1,
                theirs.unwrap_or_else(none),
                ours.unwrap_or_else(none)
            ));
        }
    }
    if span as usize != size {
        return Err(format!("{place} is {span} bytes, {rust} is {size}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check<T: Uniform>(shader: &str, wgsl: &str, rust: &str) -> Result<(), String> {
        compare(shader, wgsl, rust, T::MEMBERS, std::mem::size_of::<T>())
    }

    #[test]
    fn every_wgsl_uniform_struct_matches_the_rust_struct_it_mirrors() {
        let results = [
            check::<crate::gpu::conv::Dims>("conv", "Dims", "gpu::conv::Dims"),
            check::<crate::gpu::batchnorm::Dims>("batchnorm", "Dims", "gpu::batchnorm::Dims"),
            check::<crate::gpu::pool::Dims>("pool", "Dims", "gpu::pool::Dims"),
            check::<crate::gpu::dropout::Dims>("dropout", "Dims", "gpu::dropout::Dims"),
            check::<crate::gpu::loss::Dims>("loss", "Dims", "gpu::loss::Dims"),
            check::<crate::gpu::update::Dims>("sgd", "Dims", "gpu::update::Dims"),
            check::<crate::gpu::update::Dims>("adam", "Dims", "gpu::update::Dims"),
            // common.wgsl's, in every shader that binds it.
            check::<crate::gpu::StepUniform>("sgd", "Step", "gpu::StepUniform"),
        ];
        let errors: Vec<String> = results.into_iter().filter_map(Result::err).collect();
        assert!(errors.is_empty(), "{}", errors.join("\n"));
    }

    #[test]
    fn a_mismatch_names_both_structs_and_the_member() {
        uniform! {
            struct Swapped {
                h: u32,
                planes: u32,
                w: u32,
                _p0: u32,
            }
        }
        let e = check::<Swapped>("pool", "Dims", "Swapped").unwrap_err();
        assert!(e.contains("member 1: shaders/pool.wgsl's struct Dims has `planes` (u32 at byte 0)"), "{e}");
        assert!(e.contains("Swapped has `h` (u32 at byte 0)"), "{e}");
        uniform! {
            struct Short {
                planes: u32,
                h: u32,
                w: u32,
            }
        }
        let e = check::<Short>("pool", "Dims", "Short").unwrap_err();
        assert!(e.contains("member 4") && e.contains("Short has nothing"), "{e}");
        let e = check::<Short>("pool", "Nope", "Short").unwrap_err();
        assert!(e.contains("struct Nope does not exist"), "{e}");
    }
}
