//! The CLI's global allocator: the system allocator, plus a small cache of freed blocks of at
//! least [`HUGE_BLOCK`] bytes that hands a block back to the next request of exactly its size.
//!
//! Why: [`crate::keep_freed_memory`] lets glibc give every thread its own arena, so that two
//! groups of a training step running side by side do not wait on one arena's lock
//! (nanogpt-cpu's grouped step lost 3–5 % to one shared arena). A per-thread arena grows in heaps of
//! at most 64 MiB, so glibc serves anything larger (GPT-2's `[4, 256, 50257]` logits are
//! 206 MB) with a fresh `mmap` and unmaps it on free: every step would page-fault and have the
//! kernel zero those blocks again. Training allocates the same few huge sizes every step, so a
//! cache keyed by exact size and alignment gets them back without touching the kernel.
//!
//! The cache holds at most [`CACHED_BLOCKS`] blocks and [`CACHED_BYTES`] bytes; freeing one
//! more releases the oldest (a block larger than that on its own is not kept).
//!
//! Every block of [`HUGE_PAGE`] bytes or more is also marked for transparent huge pages
//! (`madvise(MADV_HUGEPAGE)` on its 2 MiB-aligned interior, before it is first touched): a
//! model's weights are such blocks, and a decoding step streams all of them once, a TLB miss
//! every 4 KiB with small pages. On a Zen 3 EPYC whose kernel gives huge pages only where asked
//! (`madvise` mode), GPT-2's 48 body GEMVs read 4–7 % quicker from huge pages (alternated
//! passes over the same shapes in one process).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;

/// Blocks from this size on go through the cache: half of glibc's 64 MiB per-thread heap,
/// so every block a per-thread arena cannot hold is cached, and nothing it serves well is.
pub const HUGE_BLOCK: usize = 32 << 20;

/// Most blocks kept at once (a GPT-2 step allocates one or two blocks this large: its logits,
/// and in full fine-tuning the tied embedding's gradient).
pub const CACHED_BLOCKS: usize = 8;

/// Most bytes kept at once: a process whose huge blocks change size (prompts of many
/// lengths) holds at most this much it does not use.
pub const CACHED_BYTES: usize = 1 << 30;

/// Blocks from this size on are advised to use transparent huge pages (one x86-64 huge page).
pub const HUGE_PAGE: usize = 2 << 20;

/// Asks the kernel to back the whole huge pages inside `size` bytes at `ptr` with huge pages.
/// Advice only: where the kernel has no transparent huge pages, or gives them never, nothing
/// changes (the error is ignored on purpose).
fn advise_huge_pages(ptr: *mut u8, size: usize) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if size >= HUGE_PAGE && !ptr.is_null() {
        let start = (ptr as usize).next_multiple_of(HUGE_PAGE);
        let end = (ptr as usize + size) / HUGE_PAGE * HUGE_PAGE;
        if end > start {
            // SAFETY: the range lies inside a block this process just allocated; the advice
            // changes how its pages are backed, never their contents.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = (ptr, size);
}

/// A freed block: its address, size and alignment.
#[derive(Clone, Copy)]
struct Block {
    addr: usize,
    size: usize,
    align: usize,
}

/// [`System`] with the huge-block cache (see the module doc).
pub struct HugeBlockCache {
    free: Mutex<Cached>,
}

/// The cached blocks, oldest first: `blocks[..len]`, `bytes` in all.
struct Cached {
    blocks: [Block; CACHED_BLOCKS],
    len: usize,
    bytes: usize,
}

impl HugeBlockCache {
    pub const fn new() -> Self {
        const NONE: Block = Block {
            addr: 0,
            size: 0,
            align: 1,
        };
        HugeBlockCache {
            free: Mutex::new(Cached {
                blocks: [NONE; CACHED_BLOCKS],
                len: 0,
                bytes: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cached> {
        // A panic cannot leave `Cached` half-updated (no call inside the lock panics).
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A cached block of exactly this layout, removed from the cache.
    fn take(&self, layout: Layout) -> Option<*mut u8> {
        let mut free = self.lock();
        let len = free.len;
        let i = free.blocks[..len]
            .iter()
            .position(|b| b.size == layout.size() && b.align == layout.align())?;
        let block = free.blocks[i];
        free.blocks.copy_within(i + 1..len, i);
        free.len -= 1;
        free.bytes -= block.size;
        Some(block.addr as *mut u8)
    }

    /// Keeps a freed block, releasing the oldest ones it displaces to `release` (outside the
    /// lock); a block over [`CACHED_BYTES`] on its own goes straight there.
    fn keep(&self, block: Block, release: impl Fn(Block)) {
        if block.size > CACHED_BYTES {
            return release(block);
        }
        let mut displaced = [block; CACHED_BLOCKS];
        let mut n = 0;
        {
            let mut free = self.lock();
            while free.len == CACHED_BLOCKS || free.bytes + block.size > CACHED_BYTES {
                let oldest = free.blocks[0];
                let len = free.len;
                free.blocks.copy_within(1..len, 0);
                free.len -= 1;
                free.bytes -= oldest.size;
                displaced[n] = oldest;
                n += 1;
            }
            let len = free.len;
            free.blocks[len] = block;
            free.len += 1;
            free.bytes += block.size;
        }
        displaced[..n].iter().for_each(|&b| release(b));
    }

    /// Blocks and bytes the cache holds now.
    pub fn cached(&self) -> (usize, usize) {
        let free = self.lock();
        (free.len, free.bytes)
    }
}

impl Drop for HugeBlockCache {
    fn drop(&mut self) {
        let free = self.lock();
        for b in &free.blocks[..free.len] {
            // SAFETY: a cached block came from `System` with exactly this size and alignment.
            unsafe {
                System.dealloc(
                    b.addr as *mut u8,
                    Layout::from_size_align_unchecked(b.size, b.align),
                )
            };
        }
    }
}

impl Default for HugeBlockCache {
    fn default() -> Self {
        Self::new()
    }
}

// SAFETY: every block handed out is either fresh from `System` for this layout or a block
// `System` gave for exactly this size and alignment, freed by its owner and held by no one
// else; blocks are returned to `System` with the layout they were allocated with.
unsafe impl GlobalAlloc for HugeBlockCache {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() >= HUGE_BLOCK {
            if let Some(ptr) = self.take(layout) {
                return ptr;
            }
        }
        let ptr = System.alloc(layout);
        advise_huge_pages(ptr, layout.size());
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() >= HUGE_BLOCK {
            if let Some(ptr) = self.take(layout) {
                std::ptr::write_bytes(ptr, 0, layout.size());
                return ptr;
            }
        }
        if layout.size() < HUGE_PAGE {
            return System.alloc_zeroed(layout);
        }
        // Zeroed here rather than by `calloc`, whose clearing would touch the pages (as small
        // pages) before the advice.
        let ptr = System.alloc(layout);
        advise_huge_pages(ptr, layout.size());
        if !ptr.is_null() {
            std::ptr::write_bytes(ptr, 0, layout.size());
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if layout.size() < HUGE_BLOCK {
            return System.dealloc(ptr, layout);
        }
        let block = Block {
            addr: ptr as usize,
            size: layout.size(),
            align: layout.align(),
        };
        self.keep(block, |b| {
            System.dealloc(
                b.addr as *mut u8,
                Layout::from_size_align_unchecked(b.size, b.align),
            )
        });
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.size() < HUGE_BLOCK && new_size < HUGE_BLOCK {
            let new = System.realloc(ptr, layout, new_size);
            advise_huge_pages(new, new_size);
            return new;
        }
        // Into or out of the cache's sizes: a new block, the contents copied, the old freed.
        let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
        let new = self.alloc(new_layout);
        if !new.is_null() {
            std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
            self.dealloc(ptr, layout);
        }
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_freed_huge_block_serves_the_next_request_of_its_size_only() {
        let cache = HugeBlockCache::new();
        let huge = Layout::from_size_align(HUGE_BLOCK + 4096, 16).unwrap();
        let other = Layout::from_size_align(HUGE_BLOCK + 8192, 16).unwrap();
        unsafe {
            let a = cache.alloc(huge);
            assert!(!a.is_null());
            a.write(7);
            cache.dealloc(a, huge);
            assert_eq!(cache.cached(), (1, huge.size()));
            // Another size, or the same size with another alignment, is not served from it.
            let b = cache.alloc(other);
            assert_ne!(b, a);
            let aligned = Layout::from_size_align(huge.size(), 4096).unwrap();
            let c = cache.alloc(aligned);
            assert_ne!(c, a);
            assert_eq!(c as usize % 4096, 0);
            assert_eq!(cache.cached(), (1, huge.size()));
            // The same layout gets the cached block back, and zeroed when asked to be.
            let d = cache.alloc_zeroed(huge);
            assert_eq!(d, a);
            assert_eq!(cache.cached(), (0, 0));
            let bytes = std::slice::from_raw_parts(d, huge.size());
            assert!(bytes.iter().all(|&v| v == 0));
            for (ptr, layout) in [(b, other), (c, aligned), (d, huge)] {
                cache.dealloc(ptr, layout);
            }
            assert_eq!(cache.cached().0, 3);
        }
    }

    #[test]
    fn small_blocks_bypass_the_cache_and_a_full_cache_releases_its_oldest() {
        let cache = HugeBlockCache::new();
        unsafe {
            let small = Layout::from_size_align(1 << 20, 8).unwrap();
            let s = cache.alloc(small);
            cache.dealloc(s, small);
            assert_eq!(cache.cached(), (0, 0));
            let layouts: Vec<Layout> = (0..CACHED_BLOCKS + 2)
                .map(|i| Layout::from_size_align(HUGE_BLOCK + i * 64, 8).unwrap())
                .collect();
            let blocks: Vec<*mut u8> = layouts.iter().map(|&l| cache.alloc(l)).collect();
            for (&ptr, &layout) in blocks.iter().zip(&layouts) {
                cache.dealloc(ptr, layout);
            }
            let (n, bytes) = cache.cached();
            assert_eq!(n, CACHED_BLOCKS);
            // The two oldest (smallest) were released; the newest are kept.
            let kept: usize = layouts[2..].iter().map(|l| l.size()).sum();
            assert_eq!(bytes, kept);
            let again = cache.alloc(layouts[CACHED_BLOCKS + 1]);
            assert_eq!(again, blocks[CACHED_BLOCKS + 1]);
            cache.dealloc(again, layouts[CACHED_BLOCKS + 1]);
        }
    }

    #[test]
    fn the_cache_keeps_at_most_its_bytes_and_no_block_larger_than_them() {
        let cache = HugeBlockCache::new();
        unsafe {
            // Three blocks of 40 % of the cap: the third displaces the first.
            let layout =
                |i: usize| Layout::from_size_align(CACHED_BYTES / 5 * 2 + i * 4096, 64).unwrap();
            let blocks: Vec<*mut u8> = (0..3).map(|i| cache.alloc(layout(i))).collect();
            for (i, &ptr) in blocks.iter().enumerate() {
                cache.dealloc(ptr, layout(i));
            }
            assert_eq!(cache.cached(), (2, layout(1).size() + layout(2).size()));
            // The first one went back to the system: asking for its size again misses.
            let again = cache.alloc(layout(0));
            assert_eq!(cache.cached().0, 2);
            cache.dealloc(again, layout(0));
            assert_eq!(cache.cached(), (2, layout(2).size() + layout(0).size()));
            // A block over the cap is released, not kept.
            let over = Layout::from_size_align(CACHED_BYTES + 4096, 64).unwrap();
            let big = cache.alloc(over);
            cache.dealloc(big, over);
            assert_eq!(cache.cached().0, 2);
        }
    }

    /// The `VmFlags` of the mapping holding `addr`, from `/proc/self/smaps`.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn mapping_flags(addr: usize) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            let range = line.split_whitespace().next().and_then(|r| {
                let (a, b) = r.split_once('-')?;
                Some((
                    usize::from_str_radix(a, 16).ok()?,
                    usize::from_str_radix(b, 16).ok()?,
                ))
            });
            if let Some((start, end)) = range {
                inside = (start..end).contains(&addr);
            } else if inside && line.starts_with("VmFlags:") {
                return line.to_string();
            }
        }
        panic!("no mapping holds {addr:#x}")
    }

    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn blocks_of_a_huge_page_or_more_are_advised_to_use_huge_pages() {
        if !std::path::Path::new("/sys/kernel/mm/transparent_hugepage/enabled").exists() {
            return; // a kernel without transparent huge pages takes no advice
        }
        let cache = HugeBlockCache::new();
        let layout = Layout::from_size_align(3 * HUGE_PAGE + 100, 64).unwrap();
        for zeroed in [false, true] {
            unsafe {
                let p = if zeroed {
                    cache.alloc_zeroed(layout)
                } else {
                    cache.alloc(layout)
                };
                assert!(!p.is_null());
                let bytes = std::slice::from_raw_parts_mut(p, layout.size());
                if zeroed {
                    assert!(bytes.iter().all(|&b| b == 0), "alloc_zeroed zeroes");
                }
                bytes.fill(1);
                // Every whole huge page inside the block carries the advice (`hg`).
                let first = (p as usize).next_multiple_of(HUGE_PAGE);
                for page in (first..p as usize + layout.size() - HUGE_PAGE).step_by(HUGE_PAGE) {
                    let flags = mapping_flags(page);
                    assert!(flags.split_whitespace().any(|f| f == "hg"), "{flags}");
                }
                cache.dealloc(p, layout);
            }
        }
    }

    #[test]
    fn realloc_keeps_the_contents_across_the_threshold() {
        let cache = HugeBlockCache::new();
        unsafe {
            let small = Layout::from_size_align(4096, 8).unwrap();
            let p = cache.alloc(small);
            for i in 0..4096 {
                p.add(i).write(i as u8);
            }
            let grown = cache.realloc(p, small, HUGE_BLOCK);
            let huge = Layout::from_size_align(HUGE_BLOCK, 8).unwrap();
            assert!((0..4096).all(|i| grown.add(i).read() == i as u8));
            let shrunk = cache.realloc(grown, huge, 1024);
            assert!((0..1024).all(|i| shrunk.add(i).read() == i as u8));
            // The huge block went to the cache when it was shrunk away from.
            assert_eq!(cache.cached(), (1, HUGE_BLOCK));
            cache.dealloc(shrunk, Layout::from_size_align(1024, 8).unwrap());
        }
    }
}
