//! Large, zero-initialised, fixed-size arrays backed by transparent huge pages.
//!
//! The conntrack index and flow slab of a worker span hundreds of megabytes that the packet path
//! reads at random. On 4 KiB pages nearly every such access also misses the TLB, and the page
//! walk (two-dimensional under a hypervisor) costs as much again as the cache miss itself. With
//! 2 MiB pages the whole table fits the second-level TLB.
//!
//! [`HugeArray`] maps anonymous memory aligned to 2 MiB, asks for huge pages with
//! `madvise(MADV_HUGEPAGE)` (enough when `/sys/kernel/mm/transparent_hugepage/enabled` is
//! `madvise` or `always`) and touches every page once, so the page faults (and the kernel's
//! zeroing) happen when the worker starts, not under traffic. When huge pages cannot be had the
//! memory is still correct, only slower; arrays smaller than one huge page come from the ordinary
//! allocator.
//!
//! Elements are never constructed: the memory is all zero bytes, which [`Zeroable`] types
//! promise is a valid value.
//!
//! [`prefetch`] is here too: the other half of living with tables larger than the caches.
//!
//! The rest of what the packet path reads at random is made of many small allocations: the
//! service ports, their candidate lists and scheduler tables, the frontend probe tables, the
//! per-backend counters. At 10,000 services they span tens of megabytes, and a new flow reaches
//! several of them through pointers. The system allocator (glibc's) puts them on 4 KiB pages
//! (with transparent huge pages in `madvise` mode, the common default, it never asks for huge
//! ones), so each such read may also miss the TLB. The binaries that run the pipeline (the
//! dataplane, its benchmarks) therefore use [`Allocator`], mimalloc, as their global
//! allocator: it takes memory from the kernel in 2 MiB-aligned arenas, advised
//! `MADV_HUGEPAGE`, so those allocations sit on huge pages too. (Measured in
//! `benches/README.md`, section "Issue 2, sixth session".)

use std::alloc::Layout;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// The global allocator of the binaries that run the pipeline (see the module docs):
/// `#[global_allocator] static ALLOC: dataplane::mem::Allocator = dataplane::mem::Allocator;`.
pub use mimalloc::MiMalloc as Allocator;

/// Size of a transparent huge page on x86-64 and arm64 (4 KiB granule).
pub const HUGE_PAGE: usize = 2 << 20;
const PAGE: usize = 4096;

/// Types for which all-zero bytes are a valid value and that need no drop.
///
/// # Safety
/// An implementor guarantees that a value whose bytes are all zero is valid.
pub unsafe trait Zeroable: Copy {}

// SAFETY: zero is a valid value of every integer type.
unsafe impl Zeroable for u8 {}
// SAFETY: as above.
unsafe impl Zeroable for u16 {}
// SAFETY: as above.
unsafe impl Zeroable for u32 {}
// SAFETY: as above.
unsafe impl Zeroable for u64 {}

enum Backing {
    /// `mmap`ed region: base and length of the whole mapping.
    #[cfg(target_os = "linux")]
    Mmap(usize),
    /// From the global allocator with this layout (empty arrays use no memory).
    Heap(Layout),
}

/// A fixed-size array of `T`, zero-initialised, on huge pages when it is large enough.
pub struct HugeArray<T: Zeroable> {
    ptr: NonNull<T>,
    len: usize,
    backing: Backing,
}

// SAFETY: the array owns its elements exclusively, like a `Box<[T]>`.
unsafe impl<T: Zeroable + Send> Send for HugeArray<T> {}
// SAFETY: shared access only hands out `&T`, like a `Box<[T]>`.
unsafe impl<T: Zeroable + Sync> Sync for HugeArray<T> {}

impl<T: Zeroable> HugeArray<T> {
    /// `len` zeroed elements. Panics if the size overflows or memory cannot be had.
    pub fn zeroed(len: usize) -> Self {
        let layout = Layout::array::<T>(len).expect("array size overflows");
        #[cfg(target_os = "linux")]
        if layout.size() >= HUGE_PAGE && layout.align() <= HUGE_PAGE {
            if let Some(a) = Self::mmap(len, layout.size()) {
                return a;
            }
        }
        Self::heap(len, layout)
    }

    /// Whether the array lives in a huge-page-advised mapping (rather than on the heap).
    pub fn is_mapped(&self) -> bool {
        !matches!(self.backing, Backing::Heap(_))
    }

    fn heap(len: usize, layout: Layout) -> Self {
        if layout.size() == 0 {
            return Self { ptr: NonNull::dangling(), len, backing: Backing::Heap(layout) };
        }
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(p.cast::<T>()) else { std::alloc::handle_alloc_error(layout) };
        Self { ptr, len, backing: Backing::Heap(layout) }
    }

    #[cfg(target_os = "linux")]
    fn mmap(len: usize, size: usize) -> Option<Self> {
        let size = size.checked_next_multiple_of(HUGE_PAGE)?;
        // One huge page more than needed, so that a 2 MiB-aligned start can be cut out.
        let span = size.checked_add(HUGE_PAGE)?;
        // SAFETY: an anonymous private mapping at an address of the kernel's choosing touches
        // no existing memory.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                span,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return None;
        }
        let raw = raw as usize;
        let start = raw.next_multiple_of(HUGE_PAGE);
        let (head, tail) = (start - raw, raw + span - (start + size));
        // SAFETY: both ranges lie inside the mapping just made and outside the part kept; mmap
        // returns page-aligned addresses and every length here is a multiple of the page size.
        unsafe {
            if head > 0 {
                libc::munmap(raw as *mut libc::c_void, head);
            }
            if tail > 0 {
                libc::munmap((start + size) as *mut libc::c_void, tail);
            }
        }
        // SAFETY: the range is the mapping kept above. The advice is only a hint: if the kernel
        // refuses it the memory stays valid on small pages.
        unsafe {
            libc::madvise(start as *mut libc::c_void, size, libc::MADV_HUGEPAGE);
        }
        // Fault every page in now (the kernel zeroes it), so that no packet pays for it. One
        // write per small page also covers the case where huge pages were refused.
        let base = start as *mut u8;
        for off in (0..size).step_by(PAGE) {
            // SAFETY: `off < size`, inside the writable mapping; the mapping is fresh, so no
            // reference to it exists yet.
            unsafe { base.add(off).write_volatile(0) };
        }
        Some(Self { ptr: NonNull::new(base.cast::<T>())?, len, backing: Backing::Mmap(size) })
    }
}

impl<T: Zeroable> Deref for HugeArray<T> {
    type Target = [T];
    #[inline(always)]
    fn deref(&self) -> &[T] {
        // SAFETY: `ptr` points to `len` initialised (all-zero or since written) elements that
        // this array owns, properly aligned (mmap regions are 2 MiB-aligned, heap ones come from
        // `T`'s array layout).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Zeroable> DerefMut for HugeArray<T> {
    #[inline(always)]
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`; `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Zeroable> Drop for HugeArray<T> {
    fn drop(&mut self) {
        match self.backing {
            #[cfg(target_os = "linux")]
            Backing::Mmap(size) => {
                // SAFETY: unmaps exactly the region mapped in `mmap`; no reference to it can
                // outlive `self`. `T: Copy`, so there is nothing to drop first.
                unsafe {
                    libc::munmap(self.ptr.as_ptr().cast::<libc::c_void>(), size);
                }
            }
            Backing::Heap(layout) => {
                if layout.size() > 0 {
                    // SAFETY: allocated in `heap` with this very layout.
                    unsafe { std::alloc::dealloc(self.ptr.as_ptr().cast::<u8>(), layout) };
                }
            }
        }
    }
}

/// A hint that the cache line holding `p` will be read soon (`prefetcht0`; nothing on other
/// architectures). Never faults, whatever the address.
#[inline(always)]
pub fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint with no architectural effect; it does not fault, whatever
    // the address.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// [`prefetch`] for every line of the `len` bytes from `p`, at most 1 KiB.
#[inline(always)]
pub fn prefetch_bytes<T>(p: *const T, len: usize) {
    let p = p.cast::<u8>();
    for off in (0..len.min(1024)).step_by(64) {
        prefetch(p.wrapping_add(off));
    }
    if len > 0 {
        // The last line, when `p` is not line-aligned.
        prefetch(p.wrapping_add(len.min(1024) - 1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_arrays_come_zeroed_from_the_heap() {
        let mut a = HugeArray::<u64>::zeroed(1000);
        assert!(!a.is_mapped());
        assert!(a.iter().all(|&x| x == 0));
        a[999] = 7;
        assert_eq!(a[999], 7);
        assert_eq!(HugeArray::<u32>::zeroed(0).len(), 0);
    }

    #[test]
    fn large_arrays_are_mapped_aligned_and_zeroed() {
        let n = (3 * HUGE_PAGE) / 8 + 5;
        let mut a = HugeArray::<u64>::zeroed(n);
        assert_eq!(a.len(), n);
        #[cfg(target_os = "linux")]
        {
            assert!(a.is_mapped());
            assert_eq!(a.as_ptr() as usize % HUGE_PAGE, 0);
        }
        assert!(a.iter().all(|&x| x == 0));
        a[n - 1] = 1;
        a[0] = 2;
        assert_eq!((a[0], a[n - 1]), (2, 1));
    }
}
