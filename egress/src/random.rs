//! Seeds from the kernel's random pool, for values a guest should not predict (DNS query ids,
//! TCP initial sequence numbers). Taken on the thread that spawns the egress thread.

use std::io;

/// Eight random bytes.
pub fn seed() -> io::Result<u64> {
    let mut seed = [0u8; 8];
    // SAFETY: getrandom writes at most `seed.len()` bytes into the buffer we own.
    let filled = unsafe { libc::getrandom(seed.as_mut_ptr().cast(), seed.len(), 0) };
    if filled != seed.len() as isize {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::from_ne_bytes(seed))
}
