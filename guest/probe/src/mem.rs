//! The C memory functions the compiler emits calls to (`no_std` on a
//! hosted target links no libc). CPL3 only runs them, at native speed, so
//! plain `rep movsb`/`rep stosb` (fast on current CPUs) is enough.
//!
//! They are written with inline assembly so the compiler cannot turn their
//! bodies back into calls to themselves.

use core::arch::asm;

/// # Safety
/// C `memcpy` contract: `dst` and `src` valid for `n` bytes, no overlap.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller upholds the memcpy contract; DF is clear (ABI).
    unsafe {
        asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _,
             options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// C `memmove` contract: `dst` and `src` valid for `n` bytes (may overlap).
#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize).wrapping_sub(src as usize) >= n {
        // dst is below src or the ranges do not overlap: copy forwards.
        // SAFETY: the caller upholds the memmove contract; a forward copy
        // is correct for this overlap direction.
        unsafe { memcpy(dst, src, n) }
    } else {
        // dst overlaps the tail of src: copy backwards with DF set.
        // SAFETY: the caller upholds the memmove contract; rdi/rsi point at
        // the last bytes, DF is restored before returning.
        unsafe {
            asm!("std", "rep movsb", "cld",
                 inout("rcx") n => _, inout("rdi") dst.add(n - 1) => _,
                 inout("rsi") src.add(n - 1) => _, options(nostack));
        }
        dst
    }
}

/// # Safety
/// C `memset` contract: `dst` valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller upholds the memset contract; DF is clear (ABI).
    unsafe {
        asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _, in("al") c as u8,
             options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// C `memcmp` contract: `a` and `b` valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: i < n, within both ranges per the caller's contract.
        let (x, y) = unsafe { (a.add(i).read(), b.add(i).read()) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

/// # Safety
/// As for [`memcmp`].
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract.
    unsafe { memcmp(a, b, n) }
}
