//! `nbit fit --strategy ddp --devices N`: start the N ranks through `mpirun`, as Lightning's
//! launcher starts its processes, and end as the job ends.

use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use nbit::Error;

use crate::plan::{LAUNCHED, Launch};

/// Runs this command again as `mpirun`'s ranks and waits for them; the job's exit code is ours.
pub(crate) fn launch(l: &Launch) -> Result<ExitCode, Error> {
    let ranks = l.per_node * l.nodes;
    let open_mpi = is_open_mpi();
    let mut mpirun = Command::new("mpirun");
    mpirun.args(["-np", &ranks.to_string()]);
    match (&l.hostfile, open_mpi) {
        (Some(h), true) => {
            mpirun
                .arg("--hostfile")
                .arg(h)
                .args(["--npernode", &l.per_node.to_string()]);
        }
        // MPICH's (Hydra's) spelling.
        (Some(h), false) => {
            mpirun.arg("-f").arg(h).args(["-ppn", &l.per_node.to_string()]);
        }
        // On one machine, as many ranks as asked even beyond its cores (as Lightning's
        // `devices=N` on CPU); MPICH allows that without being told.
        (None, true) => {
            mpirun.arg("--oversubscribe");
        }
        (None, false) => {}
    }
    if open_mpi && running_as_root() {
        // OpenMPI refuses root unless told; a container's root is the common case.
        mpirun.arg("--allow-run-as-root");
    }
    let me = std::env::current_exe().map_err(|e| Error::Io {
        path: "this program".into(),
        action: "find",
        reason: e.to_string(),
    })?;
    mpirun
        .arg(me)
        .args(std::env::args_os().skip(1))
        .env(LAUNCHED, "1");
    // Its own process group: Ctrl-C in the terminal reaches this process alone, which asks the
    // ranks to stop (below) rather than letting mpirun terminate them.
    #[cfg(unix)]
    std::os::unix::process::CommandExt::process_group(&mut mpirun, 0);
    let mut child = mpirun.spawn().map_err(|e| Error::Io {
        path: "mpirun".into(),
        action: "run",
        reason: format!(
            "{e}; --devices starts the processes through MPI's `mpirun` (apt-get install \
             openmpi-bin), or start them yourself: mpirun -np {ranks} nbit fit --strategy ddp ..."
        ),
    })?;
    // Ctrl-C (or SIGTERM) here becomes SIGUSR1 to mpirun, which passes it on to every rank
    // (OpenMPI does; SIGINT and SIGTERM it would turn into terminating the ranks): each stops
    // after the same step, writes what it writes on Ctrl-C and exits 130. A second Ctrl-C
    // terminates the job. This process waits for it and ends as an interrupted run does (130).
    let interrupted = Arc::new(AtomicBool::new(false));
    let pid = child.id();
    let flag = interrupted.clone();
    let _ = ctrlc::set_handler(move || {
        let again = flag.swap(true, Ordering::SeqCst);
        signal(
            pid,
            if again {
                Signal::Terminate
            } else {
                Signal::StopAfterStep
            },
        );
    });
    let status = child.wait().map_err(|e| Error::Io {
        path: "mpirun".into(),
        action: "wait for",
        reason: e.to_string(),
    })?;
    if interrupted.load(Ordering::SeqCst) {
        return Ok(ExitCode::from(130));
    }
    Ok(match status.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(c) => ExitCode::from(u8::try_from(c).unwrap_or(1)),
        None => ExitCode::from(1),
    })
}

enum Signal {
    /// SIGUSR1: the ranks stop after their step ([`stop_on_request`]).
    StopAfterStep,
    /// SIGTERM: mpirun terminates the ranks.
    Terminate,
}

fn signal(pid: u32, which: Signal) {
    #[cfg(unix)]
    {
        let sig = match which {
            Signal::StopAfterStep => libc::SIGUSR1,
            Signal::Terminate => libc::SIGTERM,
        };
        // SAFETY: sends a signal to the child this process started.
        unsafe { libc::kill(pid as libc::pid_t, sig) };
    }
    #[cfg(not(unix))]
    let _ = (pid, which);
}

/// In a rank: SIGUSR1 (what the launcher sends mpirun, which passes it on) sets `stop`, so the
/// rank stops after the step in progress, with the others.
pub(crate) fn stop_on_request(stop: Arc<AtomicBool>) {
    #[cfg(unix)]
    {
        static STOP: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();
        extern "C" fn on_usr1(_: libc::c_int) {
            // An atomic load and store: safe in a signal handler.
            if let Some(s) = STOP.get() {
                s.store(true, Ordering::SeqCst);
            }
        }
        if STOP.set(stop).is_ok() {
            // SAFETY: installs a handler that only touches an atomic.
            unsafe { libc::signal(libc::SIGUSR1, on_usr1 as *const () as libc::sighandler_t) };
        }
    }
    #[cfg(not(unix))]
    let _ = stop;
}

/// Whether `mpirun` is OpenMPI's (whose options differ from MPICH's).
fn is_open_mpi() -> bool {
    Command::new("mpirun").arg("--version").output().is_ok_and(|o| {
        let text = [o.stdout, o.stderr].concat();
        String::from_utf8_lossy(&text).contains("Open MPI")
    })
}

/// Whether this process runs as root (user id 0), read from `/proc` (Linux).
fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().next().map(|id| id == "0"))
            .unwrap_or(false)
    })
}
