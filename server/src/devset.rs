//! Device sets: the devices of one reset domain, opened and closed under
//! one lock.
//!
//! Linux VFIO groups the devices that a reset touches together (functions
//! of one slot, devices behind one bridge) into a device set with a single
//! lock: a device is opened by its first user and closed by its last, and
//! both run under the set lock, so that a hot reset of the set never races
//! with one of its devices being opened or closed. vdevd keeps the same
//! rule for every device it serves, emulated or passed through:
//!
//! * A device joins the set named in its configuration (`device_set`), or
//!   the reset domain its model reports ([`vdevd_devices::Device::reset_domain`],
//!   e.g. the bus behind a bridge for a passthrough device), or a set of its
//!   own.
//! * [`DeviceSets::join`] finds or creates a set atomically: two devices
//!   joining the same name at once get the same set.
//! * [`Users`] counts a device's users (its client session, external
//!   references): the first [`Users::get`] opens the device and the last
//!   [`Users::put`] closes it, both under the set lock, and both are
//!   logged and counted. A failed open leaves the device closed with no
//!   user; the model unwinds its own steps (see the passthrough backend).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use crate::error::Error;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Every device set of the process, by name.
#[derive(Debug, Default)]
pub struct DeviceSets {
    sets: Mutex<HashMap<String, Weak<DeviceSet>>>,
}

impl DeviceSets {
    /// No set yet.
    pub fn new() -> DeviceSets {
        DeviceSets::default()
    }

    /// The set `name`, created if no device holds it. Atomic: concurrent
    /// callers with one name get one set.
    pub fn join(&self, name: &str) -> Arc<DeviceSet> {
        let mut sets = lock(&self.sets);
        if let Some(s) = sets.get(name).and_then(Weak::upgrade) {
            return s;
        }
        sets.retain(|_, w| w.strong_count() > 0);
        let s = Arc::new(DeviceSet {
            name: name.to_string(),
            state: Mutex::new(SetCounts::default()),
        });
        sets.insert(name.to_string(), Arc::downgrade(&s));
        s
    }

    /// Sets alive now.
    pub fn len(&self) -> usize {
        lock(&self.sets)
            .values()
            .filter(|w| w.strong_count() > 0)
            .count()
    }

    /// Whether no set is alive.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a set has done.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SetCounts {
    /// Device opens (first users) so far.
    pub opens: u64,
    /// Device closes (last users gone) so far.
    pub closes: u64,
    /// Devices of the set open now.
    pub open_now: usize,
}

/// One device set. Its lock is held while one of its devices is opened,
/// closed or reset.
#[derive(Debug)]
pub struct DeviceSet {
    name: String,
    state: Mutex<SetCounts>,
}

impl DeviceSet {
    /// The set's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Counts of the whole set.
    pub fn counts(&self) -> SetCounts {
        *lock(&self.state)
    }

    /// Run `f` under the set lock (a reset of a set member, for example).
    pub fn locked<R>(&self, f: impl FnOnce() -> R) -> R {
        let _g = lock(&self.state);
        f()
    }
}

/// The users of one device, a member of a [`DeviceSet`]. Owned by the
/// thread that owns the device.
#[derive(Debug)]
pub struct Users {
    set: Arc<DeviceSet>,
    device: String,
    users: usize,
    opens: u64,
    closes: u64,
}

impl Users {
    /// A device called `device` (for logs), member of `set`, with no user.
    pub fn new(set: Arc<DeviceSet>, device: &str) -> Users {
        Users {
            set,
            device: device.to_string(),
            users: 0,
            opens: 0,
            closes: 0,
        }
    }

    /// The set.
    pub fn set(&self) -> &Arc<DeviceSet> {
        &self.set
    }

    /// Users now.
    pub fn count(&self) -> usize {
        self.users
    }

    /// Whether the device is open (it has a user).
    pub fn is_open(&self) -> bool {
        self.users > 0
    }

    /// Opens and closes of this device so far.
    pub fn opens_closes(&self) -> (u64, u64) {
        (self.opens, self.closes)
    }

    /// Add a user (`who`, for logs). The first one runs `open` under the
    /// set lock; if it fails, no user is added and the error is returned.
    pub fn get(
        &mut self,
        who: &str,
        open: impl FnOnce() -> Result<(), Error>,
    ) -> Result<(), Error> {
        if self.users == 0 {
            let mut s = lock(&self.set.state);
            if let Err(e) = open() {
                log::warn!(
                    "device set {}: opening {} for {who} failed: {e}",
                    self.set.name,
                    self.device
                );
                return Err(e);
            }
            s.opens = s.opens.saturating_add(1);
            s.open_now = s.open_now.saturating_add(1);
            self.opens = self.opens.saturating_add(1);
            log::info!(
                "device set {}: opened {} (first user: {who}; {} of the set open)",
                self.set.name,
                self.device,
                s.open_now
            );
        }
        self.users = self.users.saturating_add(1);
        Ok(())
    }

    /// Drop a user (`who`). The last one runs `close` under the set lock.
    /// Without a user, nothing happens (and it is logged).
    pub fn put(&mut self, who: &str, close: impl FnOnce()) {
        match self.users {
            0 => log::error!(
                "device set {}: {who} releases {}, which has no user",
                self.set.name,
                self.device
            ),
            1 => {
                let mut s = lock(&self.set.state);
                close();
                self.users = 0;
                s.closes = s.closes.saturating_add(1);
                s.open_now = s.open_now.saturating_sub(1);
                self.closes = self.closes.saturating_add(1);
                log::info!(
                    "device set {}: closed {} (last user: {who}; {} of the set open)",
                    self.set.name,
                    self.device,
                    s.open_now
                );
            }
            _ => self.users -= 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    #[test]
    fn first_user_opens_last_closes() {
        let sets = DeviceSets::new();
        let mut u = Users::new(sets.join("s"), "d");
        let opened = AtomicU64::new(0);
        let closed = AtomicU64::new(0);
        let open = || {
            opened.fetch_add(1, Ordering::SeqCst);
            Ok(())
        };
        u.get("client", open).unwrap();
        u.get("ctl", || panic!("a second user does not open"))
            .unwrap();
        assert_eq!(u.count(), 2);
        u.put("client", || {
            panic!("a user that is not the last does not close")
        });
        assert!(u.is_open());
        u.put("ctl", || {
            closed.fetch_add(1, Ordering::SeqCst);
        });
        assert!(!u.is_open());
        assert_eq!(opened.load(Ordering::SeqCst), 1);
        assert_eq!(closed.load(Ordering::SeqCst), 1);
        assert_eq!(u.opens_closes(), (1, 1));
        // A put without a user changes nothing.
        u.put("stray", || panic!("no user, nothing to close"));
        assert_eq!(u.count(), 0);
        assert_eq!(
            u.set().counts(),
            SetCounts {
                opens: 1,
                closes: 1,
                open_now: 0
            }
        );
    }

    #[test]
    fn a_failed_open_adds_no_user() {
        let sets = DeviceSets::new();
        let mut u = Users::new(sets.join("s"), "d");
        let e = u
            .get("client", || Err(Error::InvalidState("broken".into())))
            .unwrap_err();
        assert!(e.to_string().contains("broken"));
        assert!(!u.is_open());
        assert_eq!(u.set().counts(), SetCounts::default());
        // The next user tries again.
        u.get("client", || Ok(())).unwrap();
        assert_eq!(u.set().counts().opens, 1);
    }

    #[test]
    fn sets_are_shared_by_name_and_freed_with_their_last_member() {
        let sets = DeviceSets::new();
        let a = sets.join("bus1");
        let b = sets.join("bus1");
        let c = sets.join("bus2");
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!(sets.len(), 2);
        drop((a, b));
        assert_eq!(sets.len(), 1);
        drop(c);
        assert!(sets.is_empty());
    }

    #[test]
    fn joining_concurrently_yields_one_set() {
        let sets = Arc::new(DeviceSets::new());
        let joined: Vec<Arc<DeviceSet>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|_| {
                    let sets = sets.clone();
                    s.spawn(move || sets.join("slot3"))
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(joined.iter().all(|s| Arc::ptr_eq(s, &joined[0])));
        assert_eq!(sets.len(), 1);
    }

    /// Many threads open and close the devices of one set. Each device has
    /// two users taking turns (a client and an external reference, as in
    /// the server, behind the device's owner lock). The set lock must keep
    /// every open and close of the set apart, and the counts must be exact.
    #[test]
    fn stress_open_close_counts_are_exact() {
        const DEVICES: usize = 4;
        const THREADS_PER_DEVICE: usize = 3;
        const ROUNDS: u64 = 300;
        let sets = DeviceSets::new();
        let set = sets.join("stress");
        let inside = Arc::new(AtomicBool::new(false));
        let overlaps = Arc::new(AtomicU64::new(0));
        let devices: Vec<Arc<Mutex<(Users, u64, u64)>>> = (0..DEVICES)
            .map(|i| {
                Arc::new(Mutex::new((
                    Users::new(sets.join("stress"), &format!("d{i}")),
                    0,
                    0,
                )))
            })
            .collect();
        let enter = |inside: &AtomicBool, overlaps: &AtomicU64| {
            if inside.swap(true, Ordering::SeqCst) {
                overlaps.fetch_add(1, Ordering::SeqCst);
            }
            std::thread::yield_now();
            inside.store(false, Ordering::SeqCst);
        };
        // Expected opens per device: the transitions 0 -> 1 the test sees.
        let expected: Vec<Arc<AtomicU64>> =
            (0..DEVICES).map(|_| Arc::new(AtomicU64::new(0))).collect();
        std::thread::scope(|s| {
            for (i, dev) in devices.iter().enumerate() {
                for t in 0..THREADS_PER_DEVICE {
                    let dev = dev.clone();
                    let inside = inside.clone();
                    let overlaps = overlaps.clone();
                    let expected = expected[i].clone();
                    s.spawn(move || {
                        let who = format!("user{t}");
                        for _ in 0..ROUNDS {
                            {
                                let mut g = lock(&dev);
                                let (users, opened, _) = &mut *g;
                                if users.count() == 0 {
                                    expected.fetch_add(1, Ordering::SeqCst);
                                }
                                let mut did_open = false;
                                users
                                    .get(&who, || {
                                        enter(&inside, &overlaps);
                                        did_open = true;
                                        Ok(())
                                    })
                                    .unwrap();
                                if did_open {
                                    *opened += 1;
                                }
                            }
                            std::thread::yield_now();
                            let mut g = lock(&dev);
                            let (users, _, closed) = &mut *g;
                            let mut did_close = false;
                            users.put(&who, || {
                                enter(&inside, &overlaps);
                                did_close = true;
                            });
                            if did_close {
                                *closed += 1;
                            }
                        }
                    });
                }
            }
        });
        assert_eq!(overlaps.load(Ordering::SeqCst), 0, "set lock not held");
        let mut total = 0;
        for (i, dev) in devices.iter().enumerate() {
            let g = lock(dev);
            let (users, opened, closed) = &*g;
            let want = expected[i].load(Ordering::SeqCst);
            assert!(want >= 1);
            assert_eq!(users.count(), 0);
            assert_eq!(*opened, want, "device {i} opens");
            assert_eq!(*closed, want, "device {i} closes");
            assert_eq!(users.opens_closes(), (want, want));
            total += want;
        }
        assert_eq!(
            set.counts(),
            SetCounts {
                opens: total,
                closes: total,
                open_now: 0
            }
        );
    }
}
