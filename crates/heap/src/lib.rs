//! Gives the C allocator's free memory back to the system, and reads the process's resident
//! size.
//!
//! libtorch allocates every tensor through `malloc`. glibc keeps what is freed in the arena of
//! the thread that allocated it and returns memory to the system only from the top of a heap,
//! so after a burst of work (a training step's activations, a decode batch's caches) a server
//! stays resident at its high-water mark: on the CPU, the default model's server idled at ~2 GB
//! after load against ~1.3 GB of live memory. [`release_free_memory`] asks glibc to give every
//! arena's free pages back (`malloc_trim(0)`, which `madvise`s them away); live allocations are
//! untouched.

/// Asks the C allocator to return the free pages of every arena to the system. Returns whether
/// it gave anything back.
///
/// It locks each arena in turn, so call it when the process is idle: pages it returns are
/// faulted in again (zeroed) by the next allocation that needs them. Off glibc (musl, macOS)
/// it does nothing and returns false.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn release_free_memory() -> bool {
    // SAFETY: malloc_trim takes no pointers and has no precondition; glibc serialises it with
    // every other allocator call by each arena's own lock.
    unsafe { libc::malloc_trim(0) == 1 }
}

/// Asks the C allocator to return the free pages of every arena to the system. Returns whether
/// it gave anything back. Off glibc (musl, macOS) it does nothing and returns false.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn release_free_memory() -> bool {
    false
}

/// This process's resident set size in bytes (`VmRSS`; None where `/proc` has no such field).
pub fn resident_bytes() -> Option<u64> {
    status_bytes("VmRSS:")
}

/// The largest resident set size this process has had, in bytes (`VmHWM`; None where `/proc`
/// has no such field).
pub fn peak_resident_bytes() -> Option<u64> {
    status_bytes("VmHWM:")
}

/// A `kB` field of `/proc/self/status`, in bytes.
fn status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// Blocks of 64 KiB (under glibc's initial 128 KiB mmap threshold, so carved from a heap),
    /// 256 MiB of them, every page written. Every 16th stays live, so no heap can shrink from
    /// its top: freeing the rest leaves their pages resident until they are released.
    #[test]
    fn freed_memory_between_live_blocks_is_given_back() {
        let mut blocks: Vec<Vec<u8>> = (0..4096).map(|i| vec![i as u8 | 1; 64 << 10]).collect();
        let full = resident_bytes().unwrap();
        let kept: Vec<Vec<u8>> = blocks
            .drain(..)
            .enumerate()
            .filter_map(|(i, b)| (i % 16 == 0).then_some(b))
            .collect();
        let freed = resident_bytes().unwrap();
        assert!(
            freed + 64 * MIB > full,
            "glibc returned the freed blocks by itself ({} -> {} MiB): the test needs another layout",
            full / MIB,
            freed / MIB
        );
        assert!(release_free_memory());
        let released = resident_bytes().unwrap();
        assert!(
            released + 192 * MIB < freed,
            "resident {} MiB after freeing 240 MiB, {} MiB after releasing",
            freed / MIB,
            released / MIB
        );
        assert!(kept
            .iter()
            .enumerate()
            .all(|(i, b)| b[0] == (i * 16) as u8 | 1));
    }
}
