//! The `nbit` binary end to end: every bad input gives one line and exit code 2; short fits in
//! every CPU precision; weights round-trip through --save and --init; the loss log is exact.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn dir() -> PathBuf {
    crate::common::scratch("cli")
}

fn write(name: &str, text: &str) -> PathBuf {
    let p = dir().join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// 60 rows, 3 features, 3 classes.
fn good_csv() -> PathBuf {
    let mut s = String::from("a,b,c,label\n");
    for i in 0..60 {
        let y = i % 3;
        s.push_str(&format!(
            "{},{},{},{y}\n",
            y as f64 + 0.1 * (i % 7) as f64,
            (i % 5) as f64 * 0.2,
            1.0 - y as f64
        ));
    }
    // A file per call: tests run in parallel and must not see each other's half-written files.
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    write(
        &format!(
            "good-{}.csv",
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ),
        &s,
    )
}

fn nbit(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nbit"))
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Runs `nbit fit` with `extra` on `data`, expects exit 2 and one stderr line containing `want`.
fn fails(data: &Path, extra: &[&str], want: &[&str]) {
    let mut args = vec!["fit", "--data", p(data), "--epochs", "1", "--no-progress"];
    args.extend_from_slice(extra);
    if !extra.contains(&"--accelerator") {
        args.extend(["--accelerator", "cpu"]);
    }
    let out = nbit(&args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line, no backtrace: {err}");
    assert!(err.starts_with("error: "), "{err}");
    for w in want {
        assert!(err.contains(w), "{args:?}: expected '{w}' in: {err}");
    }
    assert!(!err.contains("panicked") && !err.contains("backtrace"), "{err}");
}

#[test]
fn bad_files_name_the_problem() {
    let missing = dir().join("missing.csv");
    fails(&missing, &[], &["cannot read", "missing.csv"]);
    fails(&write("empty.csv", ""), &[], &["is empty", "header"]);
    fails(&write("header.csv", "a,b,label\n"), &[], &["no data rows"]);
    fails(
        &write("fields.csv", "a,b,label\n1,2,0\n1,2\n"),
        &[],
        &["line 3 has 2 fields, but the header has 3"],
    );
    fails(
        &write("text.csv", "a,b,label\n1,2,0\n1,x,1\n"),
        &[],
        &["line 3, column 2 ('b'): 'x' is not a number"],
    );
    fails(
        &write("nan.csv", "a,b,label\n1,NaN,0\n"),
        &[],
        &["line 2, column 2 ('b')", "not finite"],
    );
    fails(&write("inf.csv", "a,b,label\n1,inf,0\n"), &[], &["not finite"]);
    fails(
        &write("neg.csv", "a,b,label\n1,2,-1\n"),
        &[],
        &["label '-1' is not a class index"],
    );
    fails(
        &write("frac.csv", "a,b,label\n1,2,1.5\n"),
        &[],
        &["label '1.5' is not a class index", "--task regression"],
    );
    fails(&write("nolabel.csv", "a,b\n1,2\n"), &[], &["no 'label' column"]);
}

/// `nbit fit` for one epoch on the CPU with the environment variable `var` set to `value`.
fn fit_with_env(data: &Path, var: &str, value: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nbit"))
        .args([
            "fit",
            "--data",
            p(data),
            "--epochs",
            "1",
            "--no-progress",
            "--accelerator",
            "cpu",
        ])
        .env(var, value)
        .output()
        .unwrap()
}

#[test]
fn a_bad_thread_count_in_the_environment_names_the_variable() {
    let data = good_csv();
    let fit_with = |threads: &str| fit_with_env(&data, "NBIT_NUM_THREADS", threads);
    let out = fit_with("lots");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("NBIT_NUM_THREADS = lots") && err.contains("at least 1"),
        "{err}"
    );
    // A valid count trains.
    let out = fit_with("3");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn bad_options_name_the_value_and_the_fix() {
    let data = good_csv();
    fails(
        &data,
        &["--precision", "8-true"],
        &[
            "'8-true'",
            "16-mixed, bf16-mixed, 16-true, bf16-true, 32-true, 64-true",
        ],
    );
    fails(
        &data,
        &["--precision", "transformer-engine"],
        &["'transformer-engine'"],
    );
    fails(
        &data,
        &["--accelerator", "mps"],
        &["'mps'", "cpu, gpu, cuda, tpu, auto"],
    );
    fails(
        &data,
        &["--precision", "16-mixed"],
        &["not supported on accelerator 'cpu'", "bf16-mixed"],
    );
    fails(
        &data,
        &["--precision", "64-true", "--accelerator", "tpu"],
        &["TPUs have no float64", "32-true"],
    );
    fails(
        &data,
        &["--accelerator", "gpu"],
        &["accelerator 'gpu' is not usable here"],
    );
    fails(&data, &["--accelerator", "tpu"], &["no TPU runtime"]);
    fails(&data, &["--batch-size", "0"], &["--batch-size = 0", "at least 1"]);
    fails(
        &data,
        &["--num-threads", "-3"],
        &["--num-threads = -3", "at least 1"],
    );
    fails(&data, &["--lr", "-0.1"], &["lr = -0.1"]);
    fails(&data, &["--hidden", "12,x"], &["--hidden", "'12,x'", "128,128"]);
    fails(&data, &["--hidden", "0"], &["--hidden"]);
    fails(&data, &["--optimizer", "lbfgs"], &["'lbfgs'", "'sgd' or 'adamw'"]);
    fails(&data, &["--task", "ranking"], &["'ranking'"]);
    fails(&data, &["--classes", "2"], &["--classes = 2"]);
    fails(&data, &["--val-split", "1.5"], &["--val-split", "1.5"]);
}

#[test]
fn bad_weight_files_name_the_tensor() {
    let data = good_csv();
    let not_st = write("weights.txt", "this is not safetensors");
    fails(&data, &["--init", p(&not_st)], &["not a valid safetensors"]);

    // Good weights for 3-16-3, then damaged copies.
    let good = dir().join("good.safetensors");
    let out = nbit(&[
        "fit",
        "--data",
        p(&data),
        "--epochs",
        "1",
        "--hidden",
        "16",
        "--save",
        p(&good),
        "--no-progress",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let bytes = std::fs::read(&good).unwrap();
    let cut = write("cut.safetensors", "");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    fails(&data, &["--init", p(&cut), "--hidden", "16"], &["truncated"]);
    fails(
        &data,
        &["--init", p(&good), "--hidden", "8"],
        &["'0.weight'", "[16, 3]", "[8, 3]"],
    );
    fails(&data, &["--init", p(&good), "--hidden", "16,16"], &["'2.weight'"]);
    fails(
        &data,
        &["--init", p(&dir().join("nope.safetensors"))],
        &["cannot read", "nope.safetensors"],
    );
}

#[test]
fn an_unwritable_save_path_fails_before_training_and_leaves_nothing() {
    let data = good_csv();
    let target = dir().join("no-such-folder").join("w.safetensors");
    fails(
        &data,
        &["--save", p(&target)],
        &["cannot write", "w.safetensors", "--save"],
    );
    assert!(!target.parent().unwrap().exists());
    let log = dir().join("missing-dir").join("log.csv");
    fails(&data, &["--log-csv", p(&log)], &["cannot write", "log.csv"]);
}

#[test]
fn short_fits_in_every_cpu_precision() {
    let data = good_csv();
    for precision in [
        "bf16-mixed",
        "16-true",
        "bf16-true",
        "32-true",
        "64-true",
        "bf16",
        "32",
        "64",
    ] {
        let out = nbit(&[
            "fit",
            "--data",
            p(&data),
            "--precision",
            precision,
            "--accelerator",
            "cpu",
            "--epochs",
            "3",
            "--batch-size",
            "8",
            "--val-split",
            "0.2",
            "--json",
        ]);
        assert!(
            out.status.success(),
            "{precision}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(j["final_loss"].as_f64().unwrap().is_finite(), "{precision}: {j}");
        assert_eq!(
            j["global_step"], 18,
            "{precision}: 48 rows / 8 = 6 steps x 3 epochs"
        );
        assert_eq!(j["accelerator"], "cpu");
        let bytes = j["parameter_bytes"].as_u64().unwrap();
        let params = 3 * 128 + 128 + 128 * 3 + 3;
        let width = match j["precision"].as_str().unwrap() {
            "16-true" | "bf16-true" => 2,
            "64-true" => 8,
            _ => 4,
        };
        assert_eq!(bytes, (params * width) as u64, "{precision}");
        if precision == "bf16" {
            assert!(String::from_utf8_lossy(&out.stderr).contains("note: precision 'bf16'"));
        }
    }
}

#[test]
fn weights_round_trip_through_save_init_validate_and_predict() {
    let data = good_csv();
    let w = dir().join("trained.safetensors");
    let out = nbit(&[
        "fit",
        "--data",
        p(&data),
        "--epochs",
        "30",
        "--batch-size",
        "10",
        "--lr",
        "0.01",
        "--save",
        p(&w),
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let val = nbit(&["validate", "--data", p(&data), "--init", p(&w), "--json"]);
    assert!(val.status.success(), "{}", String::from_utf8_lossy(&val.stderr));
    let j: serde_json::Value = serde_json::from_slice(&val.stdout).unwrap();
    assert!(j["val_accuracy"].as_f64().unwrap() > 0.9, "{j}");
    assert_eq!(
        j["layers"],
        serde_json::json!([3, 128, 3]),
        "architecture read from the weights"
    );
    let pred = nbit(&["predict", "--data", p(&data), "--init", p(&w)]);
    let text = String::from_utf8_lossy(&pred.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "prediction,output0,output1,output2");
    assert_eq!(lines.len(), 61);
    let correct = lines[1..]
        .iter()
        .enumerate()
        .filter(|(i, l)| l.starts_with(&format!("{},", i % 3)))
        .count();
    assert!(correct >= 54, "{correct}/60");
    // The same weights under 64-true (a cast, with a note).
    let v64 = nbit(&[
        "validate",
        "--data",
        p(&data),
        "--init",
        p(&w),
        "--precision",
        "64-true",
        "--json",
    ]);
    let j: serde_json::Value = serde_json::from_slice(&v64.stdout).unwrap();
    assert!(
        j["notes"][0]
            .as_str()
            .unwrap()
            .contains("cast from float32 to float64"),
        "{j}"
    );
}

#[test]
fn the_loss_log_is_exact_and_complete() {
    let data = good_csv();
    let log = dir().join("loss16.csv");
    let out = nbit(&[
        "fit",
        "--data",
        p(&data),
        "--precision",
        "16-true",
        "--epochs",
        "2",
        "--batch-size",
        "20",
        "--no-shuffle",
        "--log-csv",
        p(&log),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "step,epoch,loss,scale,skipped,lr");
    assert_eq!(lines.len(), 1 + 6, "3 batches x 2 epochs");
    for l in &lines[1..] {
        let loss: f64 = l.split(',').nth(2).unwrap().parse().unwrap();
        // A 16-true loss is an f16 value, written exactly.
        assert_eq!(half::f16::from_f64(loss).to_f64(), loss, "{l}");
    }
    assert!(lines[1].starts_with("1,0,"));
}

#[test]
fn config_files_set_options_and_the_command_line_wins() {
    let data = good_csv();
    let cfg = write(
        "run.toml",
        &format!(
            "data = \"{}\"\nepochs = 2\nbatch-size = 30\nprecision = \"bf16-mixed\"\nno-progress = true\n",
            p(&data)
        ),
    );
    let out = nbit(&["fit", "--config", p(&cfg), "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (j["precision"].as_str(), j["global_step"].as_u64()),
        (Some("bf16-mixed"), Some(4))
    );
    let out = nbit(&["fit", "--config", p(&cfg), "--precision", "64-true", "--json"]);
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["precision"], "64-true");
    let bad = write("bad.toml", "epochz = 3\n");
    let out = nbit(&["fit", "--config", p(&bad)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(err.contains("bad.toml") && err.contains("epochz"), "{err}");
}

#[test]
fn resume_continues_from_a_checkpoint() {
    let data = good_csv();
    let ckpt = dir().join("cli.ckpt.safetensors");
    let base = [
        "fit",
        "--data",
        p(&data),
        "--batch-size",
        "20",
        "--precision",
        "64-true",
        "--json",
    ];
    let full = nbit(&[&base[..], &["--epochs", "4"]].concat());
    let first = nbit(&[&base[..], &["--epochs", "2", "--checkpoint", p(&ckpt)]].concat());
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let resumed = nbit(&[&base[..], &["--epochs", "4", "--resume", p(&ckpt)]].concat());
    let (a, b): (serde_json::Value, serde_json::Value) = (
        serde_json::from_slice(&full.stdout).unwrap(),
        serde_json::from_slice(&resumed.stdout).unwrap(),
    );
    assert_eq!(a["final_loss"], b["final_loss"], "64-true resumes bit for bit");
    assert_eq!(b["global_step"], 12);
}

/// Runs `nbit` with `args` and returns (exit code, stdout, stderr).
fn run(args: &[&str]) -> (Option<i32>, String, String) {
    let out = nbit(args);
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code(), text(&out.stdout), text(&out.stderr))
}

#[test]
fn sizes_that_cannot_fit_are_refused_with_the_figure_not_an_abort() {
    let data = good_csv();
    fails(
        &data,
        &["--hidden", "100000,100000"],
        &[
            "3-100000-100000-3 under 32-true",
            "needs about",
            "available",
            "narrower layers",
        ],
    );
    fails(
        &data,
        &["--classes", "18446744073709551615"],
        &["needs more than 2^64 bytes"],
    );
    // The class count comes from the largest label.
    let big = write("biglabel.csv", "a,b,label\n1,2,0\n3,4,100000000\n");
    fails(&big, &[], &["2-128-100000001", "needs about"]);
}

#[test]
fn values_the_precision_cannot_hold_are_refused_before_training() {
    let huge = write("huge.csv", "a,b,label\n1,2,0\n3,1e39,1\n");
    fails(
        &huge,
        &[],
        &[
            "row 2, column 2 is 1e39",
            "float32",
            "3.4028234663852886e38",
            "normalise",
        ],
    );
    let f16 = write("f16.csv", "a,b,label\n1,2,0\n3,70000,1\n");
    fails(
        &f16,
        &["--precision", "16-true"],
        &["70000", "float16 (±65504)", "16-true", "wider precision"],
    );
    // 70000 is fine in bf16, whose range is f32's.
    let (code, _, err) = run(&[
        "fit",
        "--data",
        p(&f16),
        "--epochs",
        "1",
        "--precision",
        "bf16-true",
        "--no-progress",
    ]);
    assert_eq!(code, Some(0), "{err}");
}

#[test]
fn csv_and_option_edge_cases_are_clear_errors() {
    // A byte-order mark before 'label' (spreadsheets write one).
    let bom = write("bom.csv", "\u{feff}label,a,b\n0,1,2\n1,3,4\n");
    let (code, out, err) = run(&[
        "fit",
        "--data",
        p(&bom),
        "--epochs",
        "1",
        "--no-progress",
        "--json",
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("\"layers\": [\n    2,"), "{out}");
    fails(
        &write("dup.csv", "a,a,label\n1,2,0\n"),
        &[],
        &["column 'a' twice", "columns 1 and 2"],
    );
    fails(&good_csv(), &["--hidden", ""], &["--hidden = ''", "128,128"]);
    fails(
        &good_csv(),
        &["--val-split", "0.001"],
        &["holds out no row of the 60", "at least 0.008334"],
    );
    fails(
        &write("big20.csv", "a,label\n1,0\n2,1e20\n"),
        &[],
        &["label '1e20' is too large for a class index", "4294967295"],
    );
    let cfg = write("typed.toml", "epochs = 2\n\nbatch-size = \"ten\"\n");
    fails(
        &good_csv(),
        &["--config", p(&cfg)],
        &["line 3, key 'batch-size'", "invalid type"],
    );
}

#[test]
fn an_output_that_would_overwrite_an_input_or_another_output_is_refused() {
    let data = good_csv();
    let before = std::fs::read(&data).unwrap();
    let d = p(&data);
    let other = dir().join("out.safetensors");
    fails(&data, &["--save", d], &["--save and --data both name"]);
    fails(&data, &["--log-csv", d], &["--log-csv and --data both name"]);
    // The same file by another spelling.
    let dotted = format!(
        "{}/./{}",
        dir().display(),
        data.file_name().unwrap().to_str().unwrap()
    );
    fails(
        &data,
        &["--checkpoint", &dotted],
        &["--checkpoint and --data both name"],
    );
    fails(
        &data,
        &["--save", p(&other), "--log-csv", p(&other)],
        &["--save and --log-csv both name"],
    );
    assert_eq!(
        std::fs::read(&data).unwrap(),
        before,
        "the data file is untouched"
    );
    assert!(!other.exists());
    // Resuming from the checkpoint that the run keeps writing is allowed.
    let ck = dir().join("same.ckpt");
    let (code, _, err) = run(&[
        "fit",
        "--data",
        d,
        "--max-steps",
        "2",
        "--checkpoint",
        p(&ck),
        "--no-progress",
    ]);
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = run(&[
        "fit",
        "--data",
        d,
        "--max-steps",
        "4",
        "--checkpoint",
        p(&ck),
        "--resume",
        p(&ck),
        "--no-progress",
    ]);
    assert_eq!(code, Some(0), "{err}");
}

#[test]
fn init_with_other_layers_is_refused_or_read_from_the_file() {
    let data = good_csv();
    let three = dir().join("three-layers.safetensors");
    let (code, _, err) = run(&[
        "fit",
        "--data",
        p(&data),
        "--hidden",
        "8,6",
        "--epochs",
        "1",
        "--save",
        p(&three),
        "--no-progress",
    ]);
    assert_eq!(code, Some(0), "{err}");
    // A model of layers 0, 2 given a file of layers 0, 2, 4: strict, as PyTorch's load_state_dict.
    fails(
        &data,
        &["--hidden", "8", "--init", p(&three)],
        &["tensors the model does not have: 4.bias, 4.weight"],
    );
    // Without --hidden the architecture is the file's.
    let (code, out, err) = run(&[
        "fit",
        "--data",
        p(&data),
        "--init",
        p(&three),
        "--epochs",
        "1",
        "--json",
    ]);
    assert_eq!(code, Some(0), "{err}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["layers"], serde_json::json!([3, 8, 6, 3]));
}

#[test]
fn validate_scores_the_rows_fit_held_out() {
    let data = good_csv();
    let w = dir().join("split.safetensors");
    let args = [
        "--data",
        p(&data),
        "--val-split",
        "0.25",
        "--seed",
        "5",
        "--batch-size",
        "8",
        "--json",
    ];
    let (code, fit, err) = run(&[&["fit", "--epochs", "3", "--save", p(&w)], &args[..]].concat());
    assert_eq!(code, Some(0), "{err}");
    let (code, val, err) = run(&[&["validate", "--init", p(&w)], &args[..]].concat());
    assert_eq!(code, Some(0), "{err}");
    let fit: serde_json::Value = serde_json::from_str(&fit).unwrap();
    let val: serde_json::Value = serde_json::from_str(&val).unwrap();
    assert_eq!(fit["val_accuracy"], val["val_accuracy"], "{fit} {val}");
    assert_eq!(fit["val_loss"], val["val_loss"], "{fit} {val}");
    // Without a split, validate scores every row: another count, so (almost surely) other metrics.
    let (_, all, _) = run(&[
        "validate",
        "--init",
        p(&w),
        "--data",
        p(&data),
        "--batch-size",
        "8",
        "--json",
    ]);
    let all: serde_json::Value = serde_json::from_str(&all).unwrap();
    assert_ne!(all["val_loss"], val["val_loss"]);
}

#[test]
fn validate_and_predict_help_list_only_their_options() {
    // The options a help text lists (the first word of each option line).
    let options = |command: &str| -> Vec<String> {
        let (_, help, _) = run(&[command, "--help"]);
        help.lines()
            .filter_map(|l| l.trim_start().strip_prefix("--"))
            .map(|l| format!("--{}", l.split_whitespace().next().unwrap_or("")))
            .collect()
    };
    let (validate, predict, fit) = (options("validate"), options("predict"), options("fit"));
    let (validate, predict, fit) = (validate.join(" "), predict.join(" "), fit.join(" "));
    for training in [
        "--epochs",
        "--lr",
        "--optimizer",
        "--save",
        "--checkpoint",
        "--log-csv",
        "--hidden",
    ] {
        assert!(fit.contains(training), "fit lacks {training}");
        assert!(!validate.contains(training), "validate lists {training}");
        assert!(!predict.contains(training), "predict lists {training}");
    }
    for held_out in ["--val-data", "--val-split", "--seed"] {
        assert!(
            validate.contains(held_out) && !predict.contains(held_out),
            "{held_out}"
        );
    }
    for shared in [
        "--data",
        "--init",
        "--precision",
        "--accelerator",
        "--batch-size",
        "--config",
    ] {
        assert!(validate.contains(shared) && predict.contains(shared), "{shared}");
    }
    // And the options they do not take are refused, not ignored.
    let (code, _, err) = run(&["validate", "--data", "x.csv", "--epochs", "3"]);
    assert_eq!(code, Some(2), "{err}");
}

#[cfg(unix)]
#[test]
fn ctrl_c_stops_after_the_current_step_keeps_the_log_and_exits_130() {
    let data = good_csv();
    let log = dir().join("interrupted.csv");
    let save = dir().join("interrupted.safetensors");
    let child = Command::new(env!("CARGO_BIN_EXE_nbit"))
        .args([
            "fit",
            "--data",
            p(&data),
            "--epochs",
            "100000",
            "--log-csv",
            p(&log),
        ])
        .args(["--save", p(&save), "--no-progress"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the log has rows: the run is in its loop and streaming.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::fs::read_to_string(&log).map_or(0, |t| t.lines().count()) < 10 {
        assert!(std::time::Instant::now() < deadline, "no log rows within 60 s");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    let steps: usize = err
        .split("after step ")
        .nth(1)
        .and_then(|t| t.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{err}"));
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text.lines().count(), steps + 1, "every step logged, header first");
    assert!(text.lines().last().unwrap().starts_with(&format!("{steps},")));
    assert!(!save.exists(), "--save is not written for an interrupted run");
    // The report of the steps taken is still complete (3-128-3: 899 f32 parameters).
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("params         3596 bytes"), "{stdout}");
}

#[cfg(all(unix, not(feature = "cuda")))]
#[test]
fn auto_trains_on_the_cpu_where_a_cuda_driver_answers_but_nbit_was_built_without_cuda() {
    // A stand-in for the NVIDIA driver that reports one device, built with the C compiler that
    // links Rust programs here.
    let lib = dir().join("fake-driver");
    std::fs::create_dir_all(&lib).unwrap();
    let src = lib.join("fake.c");
    std::fs::write(
        &src,
        "int cuInit(unsigned int f) { (void)f; return 0; }\nint cuDeviceGetCount(int *n) { *n = 1; return 0; }\n",
    )
    .unwrap();
    let cc = Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(lib.join("libcuda.so.1"))
        .arg(&src)
        .status()
        .expect("a C compiler (cc), which linking Rust needs anyway");
    assert!(cc.success());
    let data = good_csv();
    let with_driver = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_nbit"))
            .args([
                "fit",
                "--data",
                p(&data),
                "--epochs",
                "1",
                "--no-progress",
                "--json",
            ])
            .args(extra)
            .env("LD_LIBRARY_PATH", &lib)
            .output()
            .unwrap();
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.code(), text(&out.stdout), text(&out.stderr))
    };
    let (code, out, err) = with_driver(&[]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("\"accelerator\": \"cpu\""), "{out}");
    let (code, _, err) = with_driver(&["--accelerator", "gpu"]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("built without its `cuda` feature (the driver reports 1 device)")
            && err.contains("--features cuda"),
        "{err}"
    );
}

#[test]
fn update_rounding_applies_to_16_bit_weights_and_is_refused_elsewhere() {
    let data = good_csv();
    fails(
        &data,
        &["--update-rounding", "compensated"],
        &["'compensated' with float32 parameters", "bf16-true and 16-true"],
    );
    fails(
        &data,
        &["--update-rounding", "stochastic", "--precision", "bf16-mixed"],
        &["'stochastic' with float32 parameters"],
    );
    fails(
        &data,
        &["--update-rounding", "kahan"],
        &["'kahan'", "'nearest', 'compensated' or 'stochastic'"],
    );
    for r in ["nearest", "compensated", "stochastic"] {
        let (code, out, err) = run(&[
            "fit",
            "--data",
            p(&data),
            "--epochs",
            "2",
            "--precision",
            "bf16-true",
            "--update-rounding",
            r,
            "--json",
        ]);
        assert_eq!(code, Some(0), "{r}: {err}");
        let j: serde_json::Value = serde_json::from_str(&out).unwrap();
        // 3-128-3: 899 parameters; AdamW's two bf16 moments, and a bf16 compensation buffer.
        let per = if r == "compensated" { 6 } else { 4 };
        assert_eq!(j["optimizer_state_bytes"], 899 * per, "{r}: {j}");
    }
}

#[test]
fn plot_draws_training_and_validation_loss() {
    let data = good_csv();
    let svg = dir().join("curves.svg");
    let out = nbit(&[
        "fit",
        "--data",
        p(&data),
        "--val-split",
        "0.25",
        "--epochs",
        "3",
        "--batch-size",
        "9",
        "--no-progress",
        "--accelerator",
        "cpu",
        "--plot",
        p(&svg),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(&svg).unwrap();
    // 45 training rows in batches of 9: 5 steps per epoch, 15 points (a band of every step's
    // lowest and highest value per pixel column, and the smoothed line); 3 validation points.
    let polylines: Vec<&str> = text.split("<polyline").skip(1).collect();
    assert_eq!(polylines.len(), 3, "{text}");
    let points = |s: &str| {
        s.split("points=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap()
            .split(' ')
            .count()
    };
    let counts = (points(polylines[0]), points(polylines[1]), points(polylines[2]));
    assert_eq!(counts, (30, 15, 3));
    assert!(text.contains("MLP 3-128-3 under 32-true") && text.contains("validation loss"));

    let bad = nbit(&[
        "fit",
        "--data",
        p(&data),
        "--epochs",
        "1",
        "--plot",
        "/no/such/dir/c.svg",
    ]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("given to --plot"));
    let same = nbit(&["fit", "--data", p(&data), "--epochs", "1", "--plot", p(&data)]);
    assert!(String::from_utf8_lossy(&same.stderr).contains("--plot and --data both name"));
}

/// With the `cuda` feature, `auto` and `gpu` train on the GPU backend when a device answers: here
/// the host emulation of its kernels (`NBIT_CUDA_EMULATOR`), which the binary loads as it would
/// the NVIDIA driver. Without a device, `gpu` is an error that names what is missing.
#[cfg(feature = "cuda")]
#[test]
fn cuda_auto_and_gpu_train_on_the_gpu_backend_when_one_answers() {
    let lib = nbit::backend::cuda::emulator::build(Path::new(env!("CARGO_TARGET_TMPDIR"))).unwrap();
    let data = good_csv();
    let fit = |extra: &[&str], emulate: bool| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_nbit"));
        c.args([
            "fit",
            "--data",
            p(&data),
            "--epochs",
            "1",
            "--no-progress",
            "--json",
        ])
        .args(extra)
        .env_remove("RUST_BACKTRACE")
        .env_remove(nbit::backend::cuda::EMULATOR_ENV);
        if emulate {
            c.env(nbit::backend::cuda::EMULATOR_ENV, &lib);
        }
        let out = c.output().unwrap();
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.code(), text(&out.stdout), text(&out.stderr))
    };
    for (precision, accelerator) in [("16-mixed", "auto"), ("bf16-mixed", "gpu"), ("32", "cuda")] {
        let (code, out, err) = fit(&["--precision", precision, "--accelerator", accelerator], true);
        assert_eq!(code, Some(0), "{precision} {accelerator}: {err}");
        assert!(out.contains("\"accelerator\": \"gpu\""), "{out}");
        assert!(
            out.contains("\"device\": \"the host emulation of nbit's CUDA kernels"),
            "{out}"
        );
    }
    // No device: `auto` is the CPU, `gpu` an error (exit 2) naming the missing driver or device.
    if <nbit::Gpu as nbit::Device>::probe().is_err() {
        let (code, out, err) = fit(&["--precision", "bf16-mixed"], false);
        assert_eq!(code, Some(0), "{err}");
        assert!(out.contains("\"accelerator\": \"cpu\""), "{out}");
        let (code, _, err) = fit(&["--precision", "16-mixed", "--accelerator", "gpu"], false);
        assert_eq!(code, Some(2), "{err}");
        assert!(
            err.contains("'gpu' is not usable here") && !err.contains("panicked"),
            "{err}"
        );
    }
}

/// What the kernel table picks for bf16 products on the CPU these tests run on, read from
/// `/proc/cpuinfo` (vendor, `cpu family`, flags) independently of nbit's CPUID reading.
fn expected_bf16_kernel() -> &'static str {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split(':').nth(1))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    let flags = field("flags");
    let has = |f: &str| flags.split(' ').any(|x| x == f);
    let amd_zen4_or_5 =
        field("vendor_id") == "AuthenticAMD" && matches!(field("cpu family").as_str(), "25" | "26");
    // Linux lists amx_tile only where it supports the tile state.
    if has("amx_bf16") && has("amx_tile") {
        "amx_bf16 32x32"
    } else if has("avx512_bf16") && has("avx512f") && amd_zen4_or_5 {
        "avx512_bf16 vdpbf16ps 12x32"
    } else if has("avx512f") {
        "avx512f 12x32"
    } else if has("avx2") && has("fma") {
        "avx2+fma 6x16"
    } else {
        "portable 4x16"
    }
}

#[test]
fn a_seeded_bf16_run_writes_the_same_bits_in_every_process_even_beside_a_busy_loop() {
    let data = "examples/data/digits.csv";
    let fit = |n: usize, kernel: Option<&str>| {
        let save = dir().join(format!("same-bits-{n}.safetensors"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_nbit"));
        cmd.args([
            "fit",
            "--data",
            data,
            "--precision",
            "bf16-mixed",
            "--accelerator",
            "cpu",
            "--hidden",
            "256,256",
            "--epochs",
            "2",
            "--batch-size",
            "256",
            "--seed",
            "7",
            "--save",
            p(&save),
            "--json",
        ]);
        match kernel {
            Some(k) => cmd.env("NBIT_GEMM_KERNEL", k),
            None => cmd.env_remove("NBIT_GEMM_KERNEL"),
        };
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (
            j["gemm_kernel"].as_str().unwrap().to_string(),
            std::fs::read(save).unwrap(),
        )
    };
    let (kernel, first) = fit(0, None);
    assert_eq!(kernel, expected_bf16_kernel(), "the table's choice for this CPU");
    // Three more processes, the last two while another thread spins on a core.
    let busy = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for n in 1..4 {
        let spinner = (n > 1).then(|| {
            busy.store(true, std::sync::atomic::Ordering::Relaxed);
            let busy = busy.clone();
            std::thread::spawn(move || {
                let mut x = 0u64;
                while busy.load(std::sync::atomic::Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
                }
            })
        });
        let (k, bytes) = fit(n, None);
        busy.store(false, std::sync::atomic::Ordering::Relaxed);
        if let Some(s) = spinner {
            s.join().unwrap();
        }
        assert_eq!(k, kernel);
        assert!(bytes == first, "process {n} wrote other weights than process 0");
    }
    // The override: NBIT_GEMM_KERNEL names the kernel, and the report says so.
    let (k, _) = fit(4, Some("portable 4x16"));
    assert_eq!(k, "portable 4x16");
}

#[test]
fn an_unknown_gemm_kernel_in_the_environment_names_the_variable_and_the_choices() {
    let out = fit_with_env(&good_csv(), "NBIT_GEMM_KERNEL", "fastest");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("NBIT_GEMM_KERNEL = fastest") && err.contains("'avx512f 12x32'"),
        "{err}"
    );
}

/// `nbit fit ... | head -1`: a reader that goes away ends the output quietly with exit 0, as other
/// command-line tools do (it was a panic, "failed printing to stdout: Broken pipe", exit 101).
#[test]
fn a_closed_pipe_on_stdout_ends_quietly() {
    let data = good_csv();
    let weights = dir().join(format!("pipe-{}.safetensors", std::process::id()));
    let w = p(&weights);
    for args in [
        vec![
            "fit",
            "--data",
            p(&data),
            "--epochs",
            "1",
            "--no-progress",
            "--save",
            w,
        ],
        vec![
            "fit",
            "--data",
            p(&data),
            "--epochs",
            "1",
            "--no-progress",
            "--json",
        ],
        vec!["predict", "--data", p(&data), "--init", w],
    ] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_nbit"))
            .args(&args)
            .env_remove("RUST_BACKTRACE")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take()); // the reader is gone before nbit writes a byte
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
        assert!(
            !err.contains("internal error") && !err.contains("Broken pipe"),
            "{args:?}: {err}"
        );
    }
}

/// `--label-column NAME` reads the labels from another column (`target` here), in fit, validate
/// and predict; without it, the missing `label` column's message names the option.
#[test]
fn the_label_column_can_be_named() {
    let csv = std::fs::read_to_string(good_csv())
        .unwrap()
        .replace("a,b,c,label", "target,a,b,c");
    // The label moved to the first column: rotate each row's last field to the front.
    let rows: Vec<String> = csv
        .lines()
        .enumerate()
        .map(|(i, l)| match i {
            0 => l.to_string(),
            _ => {
                let (rest, y) = l.rsplit_once(',').unwrap();
                format!("{y},{rest}")
            }
        })
        .collect();
    let data = write(
        &format!("target-{}.csv", std::process::id()),
        &(rows.join("\n") + "\n"),
    );
    let weights = dir().join(format!("target-{}.safetensors", std::process::id()));
    let (d, w) = (p(&data), p(&weights));
    let no_option = nbit(&["fit", "--data", d, "--epochs", "1", "--no-progress"]);
    let err = String::from_utf8_lossy(&no_option.stderr);
    assert_eq!(no_option.status.code(), Some(2));
    assert!(
        err.contains("no 'label' column") && err.contains("--label-column"),
        "{err}"
    );
    let fit = nbit(&[
        "fit",
        "--data",
        d,
        "--label-column",
        "target",
        "--epochs",
        "20",
        "--batch-size",
        "8",
        "--no-progress",
        "--json",
        "--save",
        w,
    ]);
    assert_eq!(
        fit.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&fit.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&fit.stdout).unwrap();
    assert_eq!(report["layers"][0], 3, "three features: a, b, c");
    let validate = nbit(&[
        "validate",
        "--data",
        d,
        "--label-column",
        "target",
        "--init",
        w,
        "--json",
    ]);
    let report: serde_json::Value = serde_json::from_slice(&validate.stdout).unwrap();
    assert!(report["val_accuracy"].as_f64().unwrap() > 0.5, "{report}");
    let predict = nbit(&["predict", "--data", d, "--label-column", "target", "--init", w]);
    let text = String::from_utf8_lossy(&predict.stdout);
    assert_eq!(text.lines().count(), 61, "a header and 60 rows: {text}");
}

/// Weights record the precision they were trained under, and `validate` (as `predict`) runs them
/// under it unless --precision says otherwise: the README's validate line, which gives no
/// precision, reproduces bf16-mixed fit's validation loss bit for bit (it scored under 32-true).
#[test]
fn validate_runs_weights_under_the_precision_they_were_saved_under() {
    let data = good_csv();
    let weights = dir().join(format!("saved-precision-{}.safetensors", std::process::id()));
    let (d, w) = (p(&data), p(&weights));
    let common = ["--data", d, "--val-split", "0.25", "--batch-size", "4", "--json"];
    let fit = nbit(
        &[
            &[
                "fit",
                "--precision",
                "bf16-mixed",
                "--epochs",
                "3",
                "--no-progress",
                "--save",
                w,
            ][..],
            &common,
        ]
        .concat(),
    );
    assert_eq!(
        fit.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&fit.stderr)
    );
    let fit: serde_json::Value = serde_json::from_slice(&fit.stdout).unwrap();
    let validate = nbit(&[&["validate", "--init", w][..], &common].concat());
    let err = String::from_utf8_lossy(&validate.stderr);
    assert!(
        err.contains("precision bf16-mixed from") && err.contains("--precision overrides"),
        "{err}"
    );
    let report: serde_json::Value = serde_json::from_slice(&validate.stdout).unwrap();
    assert_eq!(report["precision"], "bf16-mixed");
    assert_eq!(report["val_loss"], fit["val_loss"]);
    let forced = nbit(&[&["validate", "--init", w, "--precision", "64-true"][..], &common].concat());
    let report: serde_json::Value = serde_json::from_slice(&forced.stdout).unwrap();
    assert_eq!(report["precision"], "64-true");
    assert_ne!(report["val_loss"], fit["val_loss"]);
}

/// Where no GPU can run (always in a build without `cuda`), `--accelerator auto` with 16-mixed says
/// that auto chose the CPU and why, and `--accelerator gpu` leads with the missing feature, not
/// with the driver (installing a driver would not help a build without the feature).
#[cfg(not(feature = "cuda"))]
#[test]
fn auto_says_it_chose_the_cpu_and_gpu_names_the_missing_feature() {
    let data = good_csv();
    fails(
        &data,
        &["--accelerator", "auto", "--precision", "16-mixed"],
        &[
            "not supported on accelerator 'cpu' (which accelerator 'auto' chose: no usable GPU, as nbit was built without its `cuda` feature",
            "bf16-mixed",
        ],
    );
    fails(
        &data,
        &["--accelerator", "gpu"],
        &[
            "accelerator 'gpu' is not usable here: nbit was built without its `cuda` feature (rebuild with `--features cuda`)",
        ],
    );
}

/// A resume from a checkpoint already at --epochs (or --max-steps) trains nothing and says so, as
/// Lightning prints "`max_epochs=1` reached" (it exited 0 without a word).
#[test]
fn a_resume_with_nothing_left_to_train_says_so() {
    let data = good_csv();
    let ckpt = dir().join(format!("done-{}.safetensors", std::process::id()));
    let (d, c) = (p(&data), p(&ckpt));
    let first = nbit(&[
        "fit",
        "--data",
        d,
        "--epochs",
        "2",
        "--batch-size",
        "10",
        "--no-progress",
        "--checkpoint",
        c,
    ]);
    assert_eq!(
        first.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let again = nbit(&[
        "fit",
        "--data",
        d,
        "--epochs",
        "1",
        "--batch-size",
        "10",
        "--no-progress",
        "--resume",
        c,
    ]);
    let out = String::from_utf8_lossy(&again.stdout);
    assert_eq!(again.status.code(), Some(0));
    assert!(out.contains("steps          12 (0 skipped)"), "{out}");
    assert!(
        out.contains("the checkpoint has 2 epochs done and max_epochs is 1: nothing left to train (`max_epochs=1` reached)"),
        "{out}"
    );
    let steps = nbit(&[
        "fit",
        "--data",
        d,
        "--max-steps",
        "5",
        "--batch-size",
        "10",
        "--no-progress",
        "--resume",
        c,
    ]);
    let out = String::from_utf8_lossy(&steps.stdout);
    assert!(
        out.contains("the checkpoint is at step 12 and max_steps is 5"),
        "{out}"
    );
}

#[test]
fn a_resume_says_what_it_changes_and_refuses_another_optimizer() {
    let data = good_csv();
    let ckpt = dir().join("cli.changes.ckpt.safetensors");
    let base = ["fit", "--data", p(&data), "--precision", "32-true"];
    let first = nbit(
        &[
            &base[..],
            &["--epochs", "1", "--batch-size", "20", "--lr", "0.01"],
            &["--checkpoint", p(&ckpt)],
        ]
        .concat(),
    );
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );

    // The report's notes (stdout) say what the resume changes.
    let (code, out, err) = run(&[
        &base[..],
        &["--epochs", "2", "--batch-size", "10", "--lr", "0.001"],
        &["--resume", p(&ckpt)],
    ]
    .concat());
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("(lr 0.01 -> 0.001)"), "{out}");
    assert!(
        out.contains("used batch size 20; this run continues at batch size 10"),
        "{out}"
    );

    // Unchanged settings: no notes about them.
    let (code, out, err) = run(&[
        &base[..],
        &["--epochs", "2", "--batch-size", "20", "--lr", "0.01"],
        &["--resume", p(&ckpt)],
    ]
    .concat());
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("final loss"), "{out}");
    assert!(
        !out.contains("settings differ") && !out.contains("batch size"),
        "{out}"
    );

    // Another optimizer cannot take over the state: refused, naming the one to use.
    let (code, _, err) = run(&[
        &base[..],
        &["--epochs", "2", "--optimizer", "sgd"],
        &["--resume", p(&ckpt)],
    ]
    .concat());
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--optimizer adamw"), "{err}");
}

#[test]
fn a_resumed_runs_plot_holds_the_whole_history_on_a_log_axis() {
    let data = good_csv();
    let ckpt = dir().join("cli.plot.ckpt.safetensors");
    let plot = dir().join("cli.resumed.svg");
    let base = ["fit", "--data", p(&data), "--batch-size", "10"];
    let first = nbit(&[&base[..], &["--epochs", "2", "--checkpoint", p(&ckpt)]].concat());
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let (code, _, err) = run(&[
        &base[..],
        &["--epochs", "4", "--resume", p(&ckpt), "--plot", p(&plot)],
    ]
    .concat());
    assert_eq!(code, Some(0), "{err}");
    let svg = std::fs::read_to_string(&plot).unwrap();
    // Steps 1..=24: ticks 5, 10, 15, 20. The resumed steps alone (13..=24) would tick 14, 16, ...
    for tick in [">5<", ">10<", ">15<", ">20<"] {
        assert!(svg.contains(tick), "no x tick {tick}: {svg}");
    }
    assert!(svg.contains("loss (log scale)"), "{svg}");
    // Another scale is named, with the values that work.
    let (code, _, err) = run(&[&base[..], &["--plot", p(&plot), "--plot-scale", "ln"]].concat());
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--plot-scale = ln") && err.contains("log or linear"),
        "{err}"
    );
}
