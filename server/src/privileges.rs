//! Dropping root: after vdevd has opened what it needs (its sockets, block
//! files, VFIO devices), `--user NAME` switches the whole process to that
//! user and its primary group, with no supplementary groups, for good.

use std::ffi::CString;

use crate::error::Error;

/// Who to become.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
}

/// Look `user` up: a name from the password database, or a numeric uid
/// (its group is the passwd entry's if there is one, else the same number).
pub fn lookup(user: &str) -> Result<Credentials, Error> {
    let bad = |why: String| Error::Config(format!("--user {user}: {why}"));
    let mut pwd: libc::passwd = unsafe_zeroed_passwd();
    let mut buf = vec![0 as libc::c_char; 16 << 10];
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    let numeric = user.parse::<u32>().ok();
    let r = match numeric {
        Some(uid) => {
            // SAFETY: every pointer is valid for the call; buf's length is
            // passed; the result points into pwd or is null.
            unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut found) }
        }
        None => {
            let name = CString::new(user).map_err(|_| bad("contains a NUL byte".into()))?;
            // SAFETY: as above, with a NUL-terminated name.
            unsafe {
                libc::getpwnam_r(
                    name.as_ptr(),
                    &mut pwd,
                    buf.as_mut_ptr(),
                    buf.len(),
                    &mut found,
                )
            }
        }
    };
    if r != 0 {
        return Err(bad(format!(
            "user lookup failed: {}",
            std::io::Error::from_raw_os_error(r)
        )));
    }
    match (found.is_null(), numeric) {
        (false, _) => Ok(Credentials {
            uid: pwd.pw_uid,
            gid: pwd.pw_gid,
        }),
        (true, Some(uid)) => Ok(Credentials { uid, gid: uid }),
        (true, None) => Err(bad("no such user".into())),
    }
}

fn unsafe_zeroed_passwd() -> libc::passwd {
    // SAFETY: passwd is plain data (integers and pointers); all-zero is a
    // valid value that getpw*_r overwrites.
    unsafe { std::mem::zeroed() }
}

/// Become `c` for good: no supplementary groups, then the group, then the
/// user (glibc applies each to every thread). Fails if any step fails or
/// if root could be regained afterwards.
pub fn drop_to(c: &Credentials) -> Result<(), Error> {
    let step = |what: &str, r: libc::c_int| {
        if r != 0 {
            Err(Error::io(
                format!("drop privileges: {what}"),
                std::io::Error::last_os_error(),
            ))
        } else {
            Ok(())
        }
    };
    // SAFETY: an empty list; the pointer is not read.
    step("setgroups", unsafe { libc::setgroups(0, std::ptr::null()) })?;
    // SAFETY: setgid takes no pointers.
    step("setgid", unsafe { libc::setgid(c.gid) })?;
    // SAFETY: setuid takes no pointers.
    step("setuid", unsafe { libc::setuid(c.uid) })?;
    if c.uid != 0 {
        // SAFETY: setuid takes no pointers; it must fail now.
        if unsafe { libc::setuid(0) } == 0 {
            return Err(Error::Config(
                "drop privileges: root could be regained".into(),
            ));
        }
    }
    log::info!("running as uid {} gid {}", c.uid, c.gid);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_are_looked_up_by_name_and_number() {
        assert_eq!(lookup("root").unwrap(), Credentials { uid: 0, gid: 0 });
        assert_eq!(lookup("0").unwrap(), Credentials { uid: 0, gid: 0 });
        // A uid without a passwd entry keeps its number as the group.
        assert_eq!(
            lookup("3999999").unwrap(),
            Credentials {
                uid: 3999999,
                gid: 3999999
            }
        );
        let e = lookup("no-such-user-here").unwrap_err().to_string();
        assert!(e.contains("no such user"), "{e}");
    }
}
