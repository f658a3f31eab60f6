//! Closing every fd the VMM would otherwise inherit from whoever started the jailer.

use std::os::fd::{AsRawFd, BorrowedFd};

use crate::error::Result;
use crate::sys;

/// Closes every fd above stderr except `keep` (the close-on-exec pipe that reports a failed
/// exec to the parent). close_range(2) needs Linux 5.9; the hosts and the nested test host's
/// 6.1 kernel have it.
pub fn close_inherited(keep: BorrowedFd<'_>) -> Result<()> {
    match u32::try_from(keep.as_raw_fd()) {
        Ok(keep) if keep >= 3 => {
            if keep > 3 {
                sys::close_range(3, keep - 1)?;
            }
            sys::close_range(keep + 1, u32::MAX)
        }
        _ => sys::close_range(3, u32::MAX),
    }
}
