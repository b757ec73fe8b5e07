//! `nbit fit --strategy ddp --devices N`: start the N ranks through `mpirun`, as Lightning's
//! launcher starts its processes, and end as the job ends.

use std::process::{Command, ExitCode};

use nbit::Error;

use crate::plan::{LAUNCHED, Launch};

/// Runs this command again as `mpirun`'s ranks and waits for them; the job's exit code is ours.
pub(crate) fn launch(l: &Launch) -> Result<ExitCode, Error> {
    let ranks = l.per_node * l.nodes;
    let mut mpirun = Command::new("mpirun");
    mpirun.args(["-np", &ranks.to_string()]);
    match &l.hostfile {
        Some(h) => {
            mpirun.arg("--hostfile").arg(h);
            mpirun.args(["--npernode", &l.per_node.to_string()]);
        }
        // On one machine, as many ranks as asked even beyond its cores (as Lightning's
        // `devices=N` on CPU).
        None => {
            mpirun.arg("--oversubscribe");
        }
    }
    if running_as_root() {
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
    // Ctrl-C reaches mpirun, which passes it on to the ranks as SIGTERM: they stop after their
    // step, as on Ctrl-C in one process. This process waits for them and ends as an interrupted
    // run does (130), whatever mpirun's own exit code.
    let interrupted = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = interrupted.clone();
    let _ = ctrlc::set_handler(move || flag.store(true, std::sync::atomic::Ordering::SeqCst));
    let status = mpirun.status().map_err(|e| Error::Io {
        path: "mpirun".into(),
        action: "run",
        reason: format!(
            "{e}; --devices starts the processes through MPI's `mpirun` (apt-get install \
             openmpi-bin), or start them yourself: mpirun -np {ranks} nbit fit --strategy ddp ..."
        ),
    })?;
    if interrupted.load(std::sync::atomic::Ordering::SeqCst) {
        return Ok(ExitCode::from(130));
    }
    Ok(match status.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(c) => ExitCode::from(u8::try_from(c).unwrap_or(1)),
        None => ExitCode::from(1),
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
