//! What the CPU says about itself (`CPUID`), for the layouts the kernel reports from it.

/// The size and offset of XSAVE state component `feature` in the standard (non-compacted)
/// format, as `CPUID.(EAX=0DH, ECX=feature)` gives them in EAX and EBX: what the kernel keeps
/// in `xstate_sizes`/`xstate_offsets` for user components. (0, 0) for a component this CPU
/// does not have. Meaningful on CPUs with XSAVE (which have leaf 0xD).
#[cfg(target_arch = "x86_64")]
pub fn xsave_component(feature: u32) -> (u32, u32) {
    // SAFETY: CPUID exists on every x86_64 CPU, reads nothing from memory and changes no
    // state; every sub-leaf of leaf 0xD is defined (zeros for components the CPU lacks).
    // (`__cpuid_count` is a safe function on newer compilers, hence the allow.)
    #[allow(unused_unsafe)]
    let r = unsafe { core::arch::x86_64::__cpuid_count(0xd, feature) };
    (r.eax, r.ebx)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first two extended components sit where every x86_64 CPU with them puts them: AVX's
    /// upper halves (256 bytes) right after the 512-byte legacy area and the XSAVE header.
    #[test]
    fn avx_state_follows_the_xsave_header() {
        let (size, offset) = xsave_component(2);
        if size == 0 {
            eprintln!("SKIPPED: this CPU has no AVX state");
            return;
        }
        assert_eq!((size, offset), (256, 576));
        assert_eq!(xsave_component(63), (0, 0), "no component 63");
    }
}
