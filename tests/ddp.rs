//! Data-parallel training (`Ddp<Mpi>`): the ranks run as separate processes under OpenMPI's
//! `mpirun`, the way users start them, and the tests compare what they wrote. With the `mpi`
//! feature these need `mpirun` on the PATH (`.ci/run` installs OpenMPI); without it, the tests
//! here check that asking for data parallel is an error that names the feature.

#[cfg(feature = "mpi")]
use std::path::PathBuf;
use std::process::{Command, Output};

#[cfg(not(feature = "mpi"))]
use nbit::prelude::*;

const DIGITS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/data/digits.csv");

fn nbit() -> Command {
    Command::new(env!("CARGO_BIN_EXE_nbit"))
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn ddp_settings_are_checked_before_anything_runs() {
    let fit = |args: &[&str]| {
        let o = nbit()
            .args(["fit", "--data", DIGITS, "--epochs", "1"])
            .args(args)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        stderr(&o)
    };
    let msg = fit(&["--strategy", "fsdp"]);
    assert!(msg.contains("'fsdp'") && msg.contains("'ddp'"), "{msg}");
    let msg = fit(&["--devices", "2"]);
    assert!(
        msg.contains("--devices") && msg.contains("--strategy ddp"),
        "{msg}"
    );
    let msg = fit(&["--strategy", "ddp", "--ddp-comm-hook", "int8"]);
    assert!(msg.contains("'int8'") && msg.contains("bf16_compress"), "{msg}");
    if cfg!(feature = "mpi") {
        let msg = fit(&["--strategy", "ddp", "--devices", "2", "--num-nodes", "2"]);
        assert!(msg.contains("--hostfile"), "{msg}");
    }
}

#[cfg(not(feature = "mpi"))]
#[test]
fn without_the_mpi_feature_data_parallel_is_an_error_naming_it() {
    let msg = Trainer::<True<F32>, Cpu, Ddp<Mpi>>::new()
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("`mpi` feature") && msg.contains("libopenmpi-dev"),
        "{msg}"
    );
    let o = nbit()
        .args(["fit", "--data", DIGITS, "--strategy", "ddp"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let msg = stderr(&o);
    assert_eq!(msg.lines().count(), 1, "{msg}");
    assert!(msg.contains("`mpi` feature"), "{msg}");
}

/// `mpirun -np n`, allowed to run as root (CI's containers are).
#[cfg(feature = "mpi")]
fn mpirun(n: usize) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["-np", &n.to_string(), "--oversubscribe"])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    c
}

/// Runs a command to success, or fails the test with its output.
#[cfg(feature = "mpi")]
fn ok(c: &mut Command) -> Output {
    let o = c
        .output()
        .unwrap_or_else(|e| panic!("{c:?}: {e} (the mpi tests need OpenMPI's mpirun)"));
    assert!(o.status.success(), "{c:?}: {}\n{}", o.status, stderr(&o));
    o
}

/// The `ddp` example (built by `cargo test --features mpi`), beside this test binary.
#[cfg(feature = "mpi")]
fn example() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|d| d.parent()).unwrap();
    let path = dir.join("examples").join("ddp");
    assert!(
        path.exists(),
        "{} is missing: `cargo test --features mpi` builds it, or `cargo build --features mpi --example ddp`",
        path.display()
    );
    path
}

#[cfg(feature = "mpi")]
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("nbit-ddp-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[cfg(feature = "mpi")]
fn read(path: PathBuf) -> String {
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The example's `check` mode for `ranks` ranks (each writes `rank<r>.txt`), and the same
/// training in one process accumulating `ranks` batches per step (`reference/rank0.txt`).
#[cfg(feature = "mpi")]
fn check(precision: &str, ranks: usize) -> (Vec<String>, String) {
    let dir = scratch(&format!("{precision}-{ranks}"));
    let reference = dir.join("reference");
    std::fs::create_dir_all(&reference).unwrap();
    ok(mpirun(ranks).arg(example()).arg("check").arg(&dir).arg(precision));
    ok(Command::new(example())
        .arg("check")
        .arg(&reference)
        .arg(precision)
        .arg(ranks.to_string()));
    let files = (0..ranks)
        .map(|r| read(dir.join(format!("rank{r}.txt"))))
        .collect();
    let one = read(reference.join("rank0.txt"));
    let _ = std::fs::remove_dir_all(&dir);
    (files, one)
}

#[cfg(feature = "mpi")]
#[test]
fn two_ranks_take_the_steps_of_one_process_accumulating_two_batches_bit_for_bit() {
    // The files hold, per step, the loss and a digest of every parameter and gradient value
    // before the update, then the validation metrics and every final parameter value.
    for precision in ["32-true", "bf16-mixed", "bf16-true", "64-true"] {
        let (ranks, one) = check(precision, 2);
        assert_eq!(ranks[0], ranks[1], "{precision}: the ranks differ");
        assert_eq!(
            ranks[0], one,
            "{precision}: 2 ranks differ from 1 process accumulating 2"
        );
        // 2 epochs of 48 batches, 2 per step.
        assert_eq!(
            one.lines().filter(|l| l.starts_with("step ")).count(),
            48,
            "{precision}"
        );
    }
}

#[cfg(feature = "mpi")]
#[test]
fn four_ranks_hold_identical_weights_after_every_step() {
    let (ranks, one) = check("32-true", 4);
    for (r, text) in ranks.iter().enumerate().skip(1) {
        assert_eq!(*text, ranks[0], "rank {r} differs from rank 0");
    }
    // Against one process accumulating 4: the first step's loss is the same (same weights, same
    // batches); the sums' order differs (MPI adds pairs of ranks), so the weights drift by
    // rounding only.
    let field = |text: &str, key: &str| -> Vec<f64> {
        let line = text.lines().find(|l| l.starts_with(key)).unwrap();
        line.split_whitespace()
            .skip(1)
            .filter_map(|v| v.parse().ok())
            .collect()
    };
    assert_eq!(
        ranks[0].lines().next().unwrap().split(" digest").next(),
        one.lines().next().unwrap().split(" digest").next()
    );
    let (a, b) = (field(&ranks[0], "params"), field(&one, "params"));
    assert_eq!(a.len(), 64 * 32 + 32 + 32 * 10 + 10);
    let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
    assert!(
        worst > 0.0 && worst < 1e-4,
        "largest parameter difference {worst:e}"
    );
    let (va, vb) = (field(&ranks[0], "val_loss")[0], field(&one, "val_loss")[0]);
    assert!((va - vb).abs() < 1e-5 * vb, "val loss {va} against {vb}");
}

#[cfg(feature = "mpi")]
#[test]
fn a_rank_that_fails_ends_the_whole_job_with_its_message() {
    let start = std::time::Instant::now();
    let o = mpirun(2).arg(example()).arg("fail").output().unwrap();
    let secs = start.elapsed().as_secs_f64();
    let msg = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{msg}");
    assert!(
        msg.contains("error: rank 1 of 2: rank 1 cannot read its batch"),
        "{msg}"
    );
    // The other rank was waiting for rank 1's gradients: it must not hang.
    assert!(secs < 30.0, "the job took {secs:.1} s to end");
}

#[cfg(feature = "mpi")]
#[test]
fn a_rank_that_dies_ends_the_whole_job() {
    let start = std::time::Instant::now();
    let o = mpirun(2).arg(example()).arg("die").output().unwrap();
    let secs = start.elapsed().as_secs_f64();
    let msg = stderr(&o);
    assert!(!o.status.success(), "{msg}");
    assert!(msg.contains("rank 1 dies"), "{msg}");
    assert!(secs < 30.0, "the job took {secs:.1} s to end");
}

#[cfg(feature = "mpi")]
#[test]
fn a_checkpoint_resumes_on_another_number_of_ranks() {
    let dir = scratch("reshape");
    let ckpt = dir.join("one.ckpt").display().to_string();
    // One process accumulating 2 stops mid-epoch (20 of 48 batches), 2 ranks finish: the
    // weights of 2 ranks all along.
    ok(nbit().args(fit_args(
        &dir,
        "part.safetensors",
        &[
            "--accumulate-grad-batches",
            "2",
            "--max-steps",
            "10",
            "--checkpoint",
            &ckpt,
        ],
    )));
    let resumed = ok(mpirun(2).arg(env!("CARGO_BIN_EXE_nbit")).args(fit_args(
        &dir,
        "resumed.safetensors",
        &["--strategy", "ddp", "--resume", &ckpt],
    )));
    assert_eq!(json(&resumed)["global_step"].as_u64(), Some(48));
    ok(mpirun(2).arg(env!("CARGO_BIN_EXE_nbit")).args(fit_args(
        &dir,
        "whole.safetensors",
        &["--strategy", "ddp"],
    )));
    let bytes = |f: &str| std::fs::read(dir.join(f)).unwrap();
    assert_eq!(bytes("resumed.safetensors"), bytes("whole.safetensors"));
    // 21 batches per rank cannot continue on 4 ranks (42 of the epoch's batches done).
    let ddp_ckpt = dir.join("ddp.ckpt").display().to_string();
    ok(mpirun(2).arg(env!("CARGO_BIN_EXE_nbit")).args(fit_args(
        &dir,
        "x.safetensors",
        &[
            "--strategy",
            "ddp",
            "--max-steps",
            "21",
            "--checkpoint",
            &ddp_ckpt,
        ],
    )));
    let o = mpirun(4)
        .arg(env!("CARGO_BIN_EXE_nbit"))
        .args(fit_args(
            &dir,
            "y.safetensors",
            &["--strategy", "ddp", "--resume", &ddp_ckpt],
        ))
        .output()
        .unwrap();
    let msg = stderr(&o);
    assert!(!o.status.success());
    assert!(
        msg.contains("21 batches per rank on 2 ranks") && msg.contains("resume it on 2 ranks"),
        "{msg}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[cfg(feature = "mpi")]
#[test]
fn drop_last_with_fewer_batches_than_ranks_is_an_error_not_an_endless_fit() {
    let o = mpirun(2)
        .arg(env!("CARGO_BIN_EXE_nbit"))
        .args([
            "fit",
            "--data",
            DIGITS,
            "--strategy",
            "ddp",
            "--ddp-drop-last",
            "--batch-size",
            "2000",
            "--max-steps",
            "5",
        ])
        .output()
        .unwrap();
    let msg = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{msg}");
    assert!(
        msg.contains("ddp_drop_last") && msg.contains("1 batches per epoch on 2 ranks"),
        "{msg}"
    );
}

#[cfg(feature = "mpi")]
#[test]
fn the_bf16_compression_hook_sums_bf16_values() {
    // Under 32-true the gradients the optimizer sees are f32: summed in f32, almost none is a
    // bf16 value; through the hook, every one is (a sum of bf16 values rounded to bf16).
    for (hook, expected) in [("none", "grads_bf16 false"), ("bf16_compress", "grads_bf16 true")] {
        let dir = scratch(&format!("hook-{hook}"));
        ok(mpirun(2)
            .arg(example())
            .arg("check")
            .arg(&dir)
            .args(["32-true", "1", hook]));
        let text = read(dir.join("rank0.txt"));
        assert!(text.lines().any(|l| l == expected), "{hook}: {text}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// `nbit fit` on the digits with a validation split, as JSON, with extra arguments.
#[cfg(feature = "mpi")]
fn fit_args(dir: &std::path::Path, save: &str, extra: &[&str]) -> Vec<String> {
    let precision = if extra.contains(&"--precision") {
        ""
    } else {
        "--precision=bf16-mixed"
    };
    let epochs = if extra.contains(&"--epochs") {
        ""
    } else {
        "--epochs=2"
    };
    let mut a: Vec<String> = [
        "fit",
        "--data",
        DIGITS,
        "--batch-size",
        "30",
        epochs,
        "--hidden",
        "32",
        "--val-split",
        "0.2",
        "--json",
        "--no-progress",
        precision,
        "--save",
    ]
    .iter()
    .filter(|s| !s.is_empty())
    .map(|s| s.to_string())
    .collect();
    a.push(dir.join(save).display().to_string());
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

#[cfg(feature = "mpi")]
fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&o.stdout)))
}

#[cfg(feature = "mpi")]
#[test]
fn the_command_line_trains_on_two_ranks_and_launches_them_itself() {
    let dir = scratch("cli");
    let ddp = ok(mpirun(2).arg(env!("CARGO_BIN_EXE_nbit")).args(fit_args(
        &dir,
        "ddp.safetensors",
        &["--strategy", "ddp"],
    )));
    let one = ok(nbit().args(fit_args(
        &dir,
        "one.safetensors",
        &["--accumulate-grad-batches", "2"],
    )));
    let launched = ok(nbit().args(fit_args(
        &dir,
        "launched.safetensors",
        &["--strategy", "ddp", "--devices", "2"],
    )));
    let (ddp, one, launched) = (json(&ddp), json(&one), json(&launched));
    // Rank 0 alone prints the report.
    assert_eq!(
        (ddp["strategy"].as_str(), ddp["world_size"].as_u64()),
        (Some("ddp"), Some(2))
    );
    assert_eq!(
        (one["strategy"].as_str(), one["world_size"].as_u64()),
        (Some("single_device"), Some(1))
    );
    for key in ["final_loss", "val_loss", "val_accuracy", "global_step"] {
        assert_eq!(ddp[key], one[key], "{key}");
        assert_eq!(launched[key], one[key], "{key}");
    }
    let bytes = |f: &str| std::fs::read(dir.join(f)).unwrap();
    assert_eq!(bytes("ddp.safetensors"), bytes("one.safetensors"));
    assert_eq!(bytes("launched.safetensors"), bytes("one.safetensors"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[cfg(feature = "mpi")]
#[test]
fn a_data_parallel_run_resumes_from_its_checkpoint_exactly() {
    let dir = scratch("resume");
    let ckpt = dir.join("run.ckpt").display().to_string();
    let ddp = |save: &str, extra: &[&str]| {
        let mut args = fit_args(&dir, save, &["--strategy", "ddp"]);
        args.extend(extra.iter().map(|s| s.to_string()));
        ok(mpirun(2).arg(env!("CARGO_BIN_EXE_nbit")).args(args))
    };
    ddp("whole.safetensors", &[]);
    // Stop after 30 of the 48 steps (mid-epoch), then resume to the end.
    ddp("part.safetensors", &["--max-steps", "30", "--checkpoint", &ckpt]);
    let resumed = json(&ddp("resumed.safetensors", &["--resume", &ckpt]));
    assert_eq!(resumed["global_step"].as_u64(), Some(48));
    let bytes = |f: &str| std::fs::read(dir.join(f)).unwrap();
    assert_eq!(bytes("resumed.safetensors"), bytes("whole.safetensors"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[cfg(feature = "mpi")]
#[test]
fn the_bf16_compression_hook_sends_bf16_and_still_trains() {
    let dir = scratch("hook");
    let plain = json(&ok(mpirun(2).arg(env!("CARGO_BIN_EXE_nbit")).args(fit_args(
        &dir,
        "plain.safetensors",
        &["--strategy", "ddp", "--precision", "32-true"],
    ))));
    let hooked = json(&ok(mpirun(2).arg(env!("CARGO_BIN_EXE_nbit")).args(fit_args(
        &dir,
        "hooked.safetensors",
        &[
            "--strategy",
            "ddp",
            "--precision",
            "32-true",
            "--ddp-comm-hook",
            "bf16_compress",
        ],
    ))));
    let (p, h) = (
        plain["val_loss"].as_f64().unwrap(),
        hooked["val_loss"].as_f64().unwrap(),
    );
    // Rounded gradients: other weights, the same quality.
    assert_ne!(
        std::fs::read(dir.join("plain.safetensors")).unwrap(),
        std::fs::read(dir.join("hooked.safetensors")).unwrap()
    );
    assert!((p - h).abs() < 0.02 * p, "val loss {h} with the hook against {p}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[cfg(all(unix, feature = "mpi"))]
#[test]
fn ctrl_c_stops_every_rank_after_the_same_step_keeps_the_log_and_exits_130() {
    use std::os::unix::process::CommandExt;
    let dir = scratch("ctrl-c");
    let log = dir.join("loss.csv");
    let ckpt = dir.join("run.ckpt");
    let (log_arg, ckpt_arg) = (log.display().to_string(), ckpt.display().to_string());
    let run = ["--strategy", "ddp", "--devices", "2", "--epochs", "100000"];
    let args = fit_args(
        &dir,
        "never.safetensors",
        &[&run[..], &["--log-csv", &log_arg, "--checkpoint", &ckpt_arg]].concat(),
    );
    // In its own process group, as a terminal's foreground job is, so that Ctrl-C reaches the
    // launcher and mpirun alike (mpirun passes it on to the ranks as SIGTERM).
    let child = nbit()
        .args(args)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .process_group(0)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = child;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::fs::read_to_string(&log).map_or(0, |t| t.lines().count()) < 10 {
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "the job ended before Ctrl-C ({status}): {}",
                stderr(&child.wait_with_output().unwrap())
            );
        }
        assert!(std::time::Instant::now() < deadline, "no log rows within 60 s");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let group = format!("-{}", child.id());
    assert!(
        Command::new("kill")
            .args(["-INT", "--", &group])
            .status()
            .unwrap()
            .success()
    );
    // Ranks that stopped at different steps would wait for each other: fail, not hang.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
            panic!("the job did not end within 60 s of Ctrl-C");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(130), "{err}");
    let steps: usize = err
        .split("after step ")
        .nth(1)
        .and_then(|t| t.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("stderr: {err}\nstdout: {}", String::from_utf8_lossy(&out.stdout)));
    let text = read(log);
    assert_eq!(text.lines().count(), steps + 1, "every step logged, header first");
    assert!(
        !dir.join("never.safetensors").exists(),
        "--save is not written for an interrupted run"
    );
    // The checkpoint is at the step the ranks stopped after, and resumes.
    let resumed = ok(mpirun(2).arg(env!("CARGO_BIN_EXE_nbit")).args(fit_args(
        &dir,
        "resumed.safetensors",
        &[
            "--strategy",
            "ddp",
            "--epochs",
            "100000",
            "--resume",
            &ckpt_arg,
            "--max-steps",
            &(steps + 2).to_string(),
        ],
    )));
    assert_eq!(json(&resumed)["global_step"].as_u64(), Some(steps as u64 + 2));
    let _ = std::fs::remove_dir_all(&dir);
}
