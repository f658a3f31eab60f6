//! Dropping from root to the sandbox's uid/gid for good.

use crate::error::{JailerError, Result};
use crate::sys;

/// Clears supplementary groups, sets every gid then every uid (gid first: changing it needs the
/// privilege the uid change gives up), and checks that root cannot be regained. Changing away
/// from uid 0 also empties the capability sets.
pub fn drop_to(uid: u32, gid: u32) -> Result<()> {
    sys::clear_supplementary_groups()?;
    sys::setresgid(gid)?;
    sys::setresuid(uid)?;
    let uids = sys::getresuid();
    let gids = sys::getresgid();
    if uids != (uid, uid, uid) || gids != (gid, gid, gid) {
        return Err(JailerError::ChildSetup(format!(
            "ids after dropping privileges are uid {uids:?} gid {gids:?}, not {uid}/{gid}"
        )));
    }
    if uid != 0 && sys::setresuid(0).is_ok() {
        return Err(JailerError::ChildSetup(
            "root could be regained after dropping privileges".into(),
        ));
    }
    Ok(())
}
