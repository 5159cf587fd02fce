//! A `vdevd` server in a process of its own, observed from outside: its
//! open descriptors, CPU time and log.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::client::Client;
use crate::{Error, sys};

/// How long a server may take to start or stop before the test fails.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A directory removed (with its contents) when dropped.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// A new empty directory under the system's temporary directory, its
    /// name starting with `tag`.
    pub fn new(tag: &str) -> Result<TempDir, Error> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path =
            std::env::temp_dir().join(format!("vdevd-{tag}-{}-{n}-{nanos:x}", std::process::id()));
        std::fs::create_dir(&path)
            .map_err(|e| Error::io(format!("mkdir {}", path.display()), e))?;
        Ok(TempDir { path })
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// The `vdevd` binary: `$VDEVD_BIN`, or `vdevd` next to the running
/// executable or in its parent directory (where cargo puts binaries
/// relative to test and example executables).
pub fn find_vdevd() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("VDEVD_BIN") {
        return Some(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    [dir.join("vdevd"), dir.parent()?.join("vdevd")]
        .into_iter()
        .find(|p| p.is_file())
}

/// A running `vdevd` process serving one device on a socket in its own
/// temporary directory. Dropping it kills the process.
#[derive(Debug)]
pub struct ServerProcess {
    child: Child,
    /// Kept open: the server's stdout (the banner was read from it).
    _stdout: ChildStdout,
    socket: PathBuf,
    log_path: PathBuf,
    log_seen: usize,
    dir: TempDir,
}

impl ServerProcess {
    /// Run `bin DEVICE --socket DIR/DEVICE.sock ARGS...` with `RUST_LOG`
    /// set to `log_filter`, its log (stderr) going to a file, and wait
    /// until it listens and has settled (see [`ServerProcess::spawn`]).
    pub fn start(
        bin: &Path,
        device: &str,
        args: &[&str],
        log_filter: &str,
    ) -> Result<ServerProcess, Error> {
        let mut s = ServerProcess::spawn(bin, device, args, log_filter)?;
        s.wait_settled()?;
        Ok(s)
    }

    /// Like [`ServerProcess::start`], but return as soon as the banner
    /// (printed once the sockets listen) has been read, without waiting
    /// for the main thread to settle in its signal loop.
    pub fn spawn(
        bin: &Path,
        device: &str,
        args: &[&str],
        log_filter: &str,
    ) -> Result<ServerProcess, Error> {
        let dir = TempDir::new("server")?;
        let socket = dir.path().join(format!("{device}.sock"));
        let log_path = dir.path().join("vdevd.log");
        let log = File::create(&log_path).map_err(|e| Error::io("create the log", e))?;
        let mut child = Command::new(bin)
            .arg(device)
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .env("RUST_LOG", log_filter)
            .env_remove("XDG_RUNTIME_DIR")
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .map_err(|e| Error::io(format!("spawn {}", bin.display()), e))?;
        let Some(mut stdout) = child.stdout.take() else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::Unexpected("no stdout pipe".into()));
        };
        let banner = read_banner(&mut stdout);
        let mut s = ServerProcess {
            child,
            _stdout: stdout,
            socket,
            log_path,
            log_seen: 0,
            dir,
        };
        match banner {
            Ok(text) if text.contains("serving") => Ok(s),
            Ok(text) => Err(Error::Unexpected(format!(
                "vdevd did not start: stdout {text:?}, log:\n{}",
                s.log()
            ))),
            Err(e) => {
                s.kill();
                Err(Error::Unexpected(format!(
                    "vdevd did not start: {e}; log:\n{}",
                    s.log()
                )))
            }
        }
    }

    /// Wait until every thread of the process sleeps in the kernel, seen
    /// twice in a row. vdevd prints its banner once its sockets listen; its
    /// signal loop and the devices' worker threads set up their own
    /// descriptors around then. Once all its threads wait (in `epoll_wait`,
    /// when idle), that is done and descriptor counts are comparable.
    fn wait_settled(&mut self) -> Result<(), Error> {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut calm = 0;
        while calm < 2 {
            calm = if self.all_threads_asleep()? {
                calm + 1
            } else {
                0
            };
            if !self.is_running() {
                return Err(Error::Unexpected(format!(
                    "vdevd exited while starting; log:\n{}",
                    self.log()
                )));
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    timeout: START_TIMEOUT,
                    what: "vdevd's threads to settle".into(),
                });
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    }

    /// Whether every thread is in interruptible sleep (state S).
    fn all_threads_asleep(&self) -> Result<bool, Error> {
        let dir = format!("/proc/{}/task", self.pid());
        let mut any = false;
        for entry in std::fs::read_dir(&dir).map_err(|e| Error::io(dir.clone(), e))? {
            let entry = entry.map_err(|e| Error::io(dir.clone(), e))?;
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next());
            if state != Some("S") {
                return Ok(false);
            }
            any = true;
        }
        Ok(any)
    }

    /// The socket it serves on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Its temporary directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Connect a new client.
    pub fn connect(&self) -> Result<Client, Error> {
        Client::connect(&self.socket)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The descriptors it has open: (number, what it links to), sorted.
    pub fn fds(&self) -> Result<Vec<(u32, String)>, Error> {
        let dir = format!("/proc/{}/fd", self.pid());
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(|e| Error::io(dir.clone(), e))? {
            let entry = entry.map_err(|e| Error::io(dir.clone(), e))?;
            let Some(n) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            // A descriptor closed between readdir and readlink is gone.
            if let Ok(link) = std::fs::read_link(entry.path()) {
                out.push((n, link.to_string_lossy().into_owned()));
            }
        }
        out.sort();
        Ok(out)
    }

    /// How many descriptors it has open.
    pub fn fd_count(&self) -> Result<usize, Error> {
        Ok(self.fds()?.len())
    }

    /// User plus system CPU time of the whole process (all threads, live
    /// and exited), at clock-tick resolution.
    pub fn cpu_time(&self) -> Result<Duration, Error> {
        let path = format!("/proc/{}/stat", self.pid());
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(path.clone(), e))?;
        let after = text
            .rsplit_once(')')
            .map(|(_, rest)| rest)
            .ok_or_else(|| Error::Unexpected(format!("{path}: {text}")))?;
        let fields: Vec<&str> = after.split_whitespace().collect();
        // Fields 14 and 15 of the file; `after` starts at field 3.
        let ticks = |i: usize| -> Result<u64, Error> {
            fields
                .get(i)
                .and_then(|f| f.parse().ok())
                .ok_or_else(|| Error::Unexpected(format!("{path}: field {}", i + 3)))
        };
        let total = ticks(11)?.saturating_add(ticks(12)?);
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        let hz = u64::try_from(hz).ok().filter(|h| *h > 0).unwrap_or(100);
        Ok(Duration::from_nanos(
            total.saturating_mul(1_000_000_000) / hz,
        ))
    }

    /// CPU time of its live threads in nanoseconds, from the scheduler's
    /// accounting (`/proc/PID/task/*/schedstat`): precise, but threads that
    /// have exited are not counted.
    pub fn cpu_time_precise(&self) -> Result<Duration, Error> {
        let dir = format!("/proc/{}/task", self.pid());
        let mut total = 0u64;
        for entry in std::fs::read_dir(&dir).map_err(|e| Error::io(dir.clone(), e))? {
            let entry = entry.map_err(|e| Error::io(dir.clone(), e))?;
            let Ok(text) = std::fs::read_to_string(entry.path().join("schedstat")) else {
                continue;
            };
            let ns: u64 = text
                .split_whitespace()
                .next()
                .and_then(|f| f.parse().ok())
                .ok_or_else(|| Error::Unexpected(format!("schedstat: {text}")))?;
            total = total.saturating_add(ns);
        }
        Ok(Duration::from_nanos(total))
    }

    /// The whole log so far.
    pub fn log(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The log written since the previous call.
    pub fn new_log(&mut self) -> String {
        let all = std::fs::read(&self.log_path).unwrap_or_default();
        let new = all.get(self.log_seen..).unwrap_or_default();
        self.log_seen = all.len();
        String::from_utf8_lossy(new).into_owned()
    }

    /// Stop it with SIGTERM and wait for it to exit. Its directory stays
    /// until the value is dropped.
    pub fn stop(&mut self) -> Result<ExitStatus, Error> {
        self.signal(libc::SIGTERM)?;
        self.wait(START_TIMEOUT)
    }

    /// Kill it (SIGKILL) and reap it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn signal(&self, sig: i32) -> Result<(), Error> {
        let pid = libc::pid_t::try_from(self.pid())
            .map_err(|_| Error::Unexpected("pid out of range".into()))?;
        // SAFETY: kill takes no pointers; the pid is our own child, not yet
        // reaped (we hold its Child), so it cannot have been reused.
        if unsafe { libc::kill(pid, sig) } != 0 {
            return Err(Error::io("kill", io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Wait for the process to exit by itself.
    pub fn wait(&mut self, timeout: Duration) -> Result<ExitStatus, Error> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Ok(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Ok(None) => {
                    self.kill();
                    return Err(Error::Timeout {
                        timeout,
                        what: "vdevd to exit".into(),
                    });
                }
                Err(e) => return Err(Error::io("wait", e)),
            }
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if self.is_running() {
            self.kill();
        }
    }
}

/// Read the server's stdout until its banner line is complete (or EOF).
fn read_banner(stdout: &mut ChildStdout) -> Result<String, Error> {
    let deadline = Instant::now() + START_TIMEOUT;
    let mut text = Vec::new();
    loop {
        let s = String::from_utf8_lossy(&text);
        if s.contains("serving") && s.ends_with('\n') {
            return Ok(s.into_owned());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let ready =
            sys::poll_readable(&[stdout.as_fd()], left).map_err(|e| Error::io("poll", e))?;
        if !ready.first().copied().unwrap_or(false) {
            return Err(Error::Timeout {
                timeout: START_TIMEOUT,
                what: "the vdevd banner".into(),
            });
        }
        let mut buf = [0u8; 1024];
        let n = stdout
            .read(&mut buf)
            .map_err(|e| Error::io("read stdout", e))?;
        if n == 0 {
            return Ok(String::from_utf8_lossy(&text).into_owned());
        }
        text.extend_from_slice(&buf[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_dirs_are_distinct_and_removed() {
        let a = TempDir::new("t").unwrap();
        let b = TempDir::new("t").unwrap();
        assert_ne!(a.path(), b.path());
        std::fs::write(a.path().join("f"), b"x").unwrap();
        let p = a.path().to_path_buf();
        drop(a);
        assert!(!p.exists());
        assert!(b.path().is_dir());
    }

    /// The process helpers on a process that is not vdevd: `sh` printing
    /// a banner-like line, then waiting.
    #[test]
    fn observes_a_process() {
        let sh = Path::new("/bin/sh");
        if !sh.is_file() {
            return;
        }
        let dir = TempDir::new("fake-server").unwrap();
        let script = dir.path().join("fake");
        std::fs::write(
            &script,
            "#!/bin/sh\necho \"vdevd: serving $1 on $3\"; echo log line >&2; exec sleep 60\n",
        )
        .unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let mut s = ServerProcess::spawn(&script, "sample", &[], "info").unwrap();
        assert!(s.socket().ends_with("sample.sock"));
        assert!(s.is_running());
        // stdin, stdout and stderr at least
        assert!(s.fd_count().unwrap() >= 3);
        assert!(s.cpu_time().is_ok());
        assert!(s.cpu_time_precise().is_ok());
        let t0 = Instant::now();
        while !s.log().contains("log line") {
            assert!(t0.elapsed() < START_TIMEOUT);
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(s.new_log().contains("log line"));
        assert_eq!(s.new_log(), "");
        let status = s.stop().unwrap();
        assert_eq!(status.code(), None, "ended by SIGTERM");
        assert!(!s.is_running());
    }
}
