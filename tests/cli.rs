//! The `nbit` binary end to end: every bad input gives one line and exit code 2; short fits in
//! every CPU precision; weights round-trip through --save and --init; the loss log is exact.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("nbit-cli-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
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
