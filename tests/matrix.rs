//! The support matrix seen three ways must agree: the trait impls (what compiles), the run-time
//! table (what `dispatch` accepts), and the tables in the docs and README.

use std::any::type_name;
use std::marker::PhantomData;

use nbit::prelude::*;
use nbit::{DeviceKind, PrecisionKind, Selection};

// Autoref specialisation: `Allowed` applies only where `D: Supports<P>` holds, otherwise method
// lookup falls through to `Refused`. For concrete types this reads the trait impls at run time.
struct Probe<P, D>(PhantomData<(P, D)>);
trait Allowed {
    fn compiles(&self) -> bool {
        true
    }
}
impl<P: Precision, D: Supports<P>> Allowed for Probe<P, D> {}
trait Refused {
    fn compiles(&self) -> bool {
        false
    }
}
impl<P, D> Refused for &Probe<P, D> {}

macro_rules! static_cells {
    ($($kind:ident = $p:ty),*) => {
        vec![$(
            (PrecisionKind::$kind, DeviceKind::Cpu, (&Probe::<$p, Cpu>(PhantomData)).compiles()),
            (PrecisionKind::$kind, DeviceKind::Gpu, (&Probe::<$p, Gpu>(PhantomData)).compiles()),
            (PrecisionKind::$kind, DeviceKind::Tpu, (&Probe::<$p, Tpu>(PhantomData)).compiles()),
        )*]
    };
}

fn static_matrix() -> Vec<(PrecisionKind, DeviceKind, bool)> {
    static_cells!(
        Mixed16 = Mixed<F16>,
        MixedBf16 = Mixed<BF16>,
        True16 = True<F16>,
        TrueBf16 = True<BF16>,
        True32 = True<F32>,
        True64 = True<F64>
    )
}

#[test]
fn trait_impls_and_runtime_table_agree_on_all_18_cells() {
    let cells = static_matrix();
    assert_eq!(cells.len(), 18);
    for (p, d, compiles) in cells {
        assert_eq!(p.supported_on(d), compiles, "{p} on {d}");
    }
    // And both are the seed documentation's table: 15 allowed, these 3 refused.
    let refused: Vec<_> = static_matrix()
        .into_iter()
        .filter(|c| !c.2)
        .map(|(p, d, _)| (p, d))
        .collect();
    assert_eq!(
        refused,
        [
            (PrecisionKind::Mixed16, DeviceKind::Cpu),
            (PrecisionKind::Mixed16, DeviceKind::Tpu),
            (PrecisionKind::True64, DeviceKind::Tpu)
        ]
    );
}

/// Parses `| `Type` ... | yes | no | ... |` rows of a markdown support table.
fn doc_table(text: &str) -> Vec<(String, [bool; 3])> {
    text.lines()
        .map(|l| l.trim_start_matches("//!").trim())
        .filter(|l| l.starts_with("| `Mixed<") || l.starts_with("| `True<"))
        .filter_map(|l| {
            let cols: Vec<&str> = l.trim_matches('|').split('|').map(str::trim).collect();
            let yes = |s: &str| match s.trim_matches('*') {
                "yes" => Some(true),
                "no" => Some(false),
                _ => None,
            };
            let flags = [yes(cols.get(1)?)?, yes(cols.get(2)?)?, yes(cols.get(3)?)?];
            let ty = cols[0].split('`').nth(1)?.to_owned();
            Some((ty, flags))
        })
        .collect()
}

fn check_doc_table(what: &str, text: &str) {
    let rows = doc_table(text);
    assert_eq!(rows.len(), 6, "{what}: expected 6 matrix rows, found {rows:?}");
    for (ty, flags) in rows {
        let kind = PrecisionKind::ALL
            .into_iter()
            .find(|k| k.type_name() == ty)
            .unwrap();
        for (d, flag) in DeviceKind::ALL.into_iter().zip(flags) {
            assert_eq!(kind.supported_on(d), flag, "{what}: {ty} on {d}");
        }
    }
}

#[test]
fn documented_tables_match_the_impls() {
    check_doc_table("crate docs", include_str!("../src/lib.rs"));
    check_doc_table("matrix module docs", include_str!("../src/matrix.rs"));
    check_doc_table("README", include_str!("../README.md"));
}

struct Reached;
impl Job for Reached {
    type Output = (&'static str, DeviceKind, String);
    fn run<P: Precision, D: Supports<P>>(self) -> Self::Output {
        let ty = type_name::<P>()
            .replace("nbit::precision::", "")
            .replace("nbit::dtype::", "");
        (P::NAME, D::KIND, ty)
    }
}

#[test]
fn dispatch_reaches_the_right_types_for_every_allowed_pair() {
    let mut allowed = 0;
    for p in PrecisionKind::ALL {
        for d in DeviceKind::ALL {
            let got = nbit::dispatch(p.name(), d.name(), Reached);
            if p.supported_on(d) {
                allowed += 1;
                let (name, device, ty) = got.unwrap();
                assert_eq!((name, device, ty.as_str()), (p.name(), d, p.type_name()));
            } else {
                match got.unwrap_err() {
                    Error::Unsupported {
                        precision, device, ..
                    } => assert_eq!((precision, device), (p, d)),
                    other => panic!("{p} on {d}: {other}"),
                }
            }
        }
    }
    assert_eq!(allowed, 15);
}

#[test]
fn refused_pairs_carry_the_compile_errors_advice() {
    let cases = [
        (
            "16-mixed",
            "cpu",
            "`Mixed<BF16>` (precision \"bf16-mixed\") on `Cpu`",
        ),
        ("16", "tpu", "`Mixed<BF16>` (precision \"bf16-mixed\") on `Tpu`"),
        ("64-true", "tpu", "`True<F32>` (precision \"32-true\") on `Tpu`"),
        ("64", "tpu", "`True<F32>` (precision \"32-true\") on `Tpu`"),
    ];
    for (p, d, advice) in cases {
        let msg = nbit::dispatch(p, d, Reached).unwrap_err().to_string();
        assert!(msg.contains(advice), "{msg}");
        // The same sentence is the compile error's note, in ui-tests/matrix/fail/*.stderr.
        let stderr = match (p, d) {
            ("16-mixed" | "16", "cpu") => {
                include_str!("../ui-tests/matrix/fail/mixed_f16_is_refused_on_cpu.stderr")
            }
            ("16-mixed" | "16", _) => {
                include_str!("../ui-tests/matrix/fail/mixed_f16_is_refused_on_tpu.stderr")
            }
            _ => include_str!("../ui-tests/matrix/fail/true_f64_is_refused_on_tpu.stderr"),
        };
        let compile_note = advice
            .replace("`Cpu`", "`nbit::Cpu`")
            .replace("`Tpu`", "`nbit::Tpu`");
        assert!(
            stderr.contains(&compile_note),
            "compile error lacks: {compile_note}"
        );
    }
}

#[test]
fn integers_and_legacy_strings_dispatch() {
    assert_eq!(nbit::dispatch(32, "cpu", Reached).unwrap().0, "32-true");
    assert_eq!(nbit::dispatch(16, "gpu", Reached).unwrap().0, "16-mixed");
    assert_eq!(nbit::dispatch("bf16", "cuda", Reached).unwrap().0, "bf16-mixed");
    let sel = Selection::parse("bf16", "tpu").unwrap();
    assert_eq!(sel.precision(), PrecisionKind::MixedBf16);
    assert!(sel.notice().unwrap().contains("'bf16-mixed'"));
    assert!(Selection::parse("64", "cpu").unwrap().notice().is_none());
}

#[test]
fn bad_strings_are_errors_never_panics() {
    for (p, d) in [
        ("", "cpu"),
        ("8-true", "cpu"),
        ("transformer-engine", "gpu"),
        ("32-true", "mps"),
        ("16-mixed", ""),
    ] {
        assert!(nbit::dispatch(p, d, Reached).is_err(), "{p:?} {d:?}");
    }
    // Every short string over a small alphabet: the parser answers, it never panics.
    let alphabet = ["", "1", "6", "3", "2", "4", "b", "f", "-", "m", "t", "x", "é"];
    for a in alphabet {
        for b in alphabet {
            for c in alphabet {
                let s = format!("{a}{b}{c}");
                let _ = nbit::dispatch(s.as_str(), s.as_str(), Reached);
                let _ = nbit::parse_precision(s.as_str());
            }
        }
    }
}

#[test]
fn auto_resolves_to_a_usable_device() {
    let d = nbit::parse_accelerator("auto").unwrap();
    match d {
        DeviceKind::Cpu => assert!(Gpu::probe().is_err()),
        DeviceKind::Gpu => assert!(Gpu::probe().is_ok()),
        DeviceKind::Tpu => panic!("auto never picks a TPU"),
    }
}

#[test]
fn trainers_on_absent_hardware_are_errors() {
    assert!(Trainer::<True<F32>, Cpu>::new().is_ok());
    // A device without a backend in this build is a compile error as a type (ui-tests) and the
    // probe's error when chosen at run time.
    struct Build;
    impl RunJob for Build {
        type Output = ();
        fn run<P: Precision, D: Runs<P>>(self) -> Result<(), nbit::Error> {
            Trainer::<P, D>::new().map(drop)
        }
    }
    let msg = nbit::launch("bf16-mixed", "tpu", Build).unwrap_err().to_string();
    assert!(msg.contains("'tpu'") && msg.contains("no TPU runtime"), "{msg}");
    if Gpu::probe().is_err() {
        let msg = nbit::launch("16-mixed", "gpu", Build).unwrap_err().to_string();
        assert!(msg.contains("'gpu'") && msg.contains("'cpu'"), "{msg}");
        #[cfg(feature = "cuda")]
        {
            let msg = Trainer::<Mixed<F16>, Gpu>::new().unwrap_err().to_string();
            assert!(msg.contains("'gpu'") && msg.contains("'cpu'"), "{msg}");
        }
    }
}

#[test]
fn the_launch_macro_reaches_every_cell_this_build_runs_and_refuses_the_rest_as_launch_does() {
    let data = [1.0_f64, 2.0]; // borrowed by the body below, as a closure would
    for p in PrecisionKind::ALL {
        for d in DeviceKind::ALL {
            let got = nbit::launch!(p.name(), d.name(), |P, D| Ok((P::NAME, D::KIND, data.len())));
            struct Same;
            impl RunJob for Same {
                type Output = (&'static str, DeviceKind, usize);
                fn run<P: Precision, D: Runs<P>>(self) -> Result<Self::Output, nbit::Error> {
                    Ok((P::NAME, D::KIND, 2))
                }
            }
            let want = nbit::launch(p.name(), d.name(), Same);
            match (&got, &want) {
                (Ok(g), Ok(w)) => assert_eq!(g, w),
                (Err(g), Err(w)) => assert_eq!(g.to_string(), w.to_string()),
                _ => panic!("{p} on {d}: launch! gave {got:?}, launch gave {want:?}"),
            }
            // Every CPU cell the matrix allows runs in every build.
            if d == DeviceKind::Cpu {
                assert_eq!(got.is_ok(), p.supported_on(d), "{p} on {d}: {got:?}");
            }
        }
    }
    // The body may move what it captures: one arm runs, so one move happens.
    let owned = String::from("moved");
    let n = nbit::launch!("32-true", "cpu", |P, D| {
        let taken: String = owned; // a move, which a closure called once may make
        Ok(taken.len() + P::MODEL_BITS as usize)
    })
    .unwrap();
    assert_eq!(n, 5 + 32);
}

/// The child half of the test below: launches with a legacy spelling and exits.
#[test]
fn legacy_spelling_child() {
    if std::env::var_os("NBIT_TEST_LEGACY_CHILD").is_none() {
        return;
    }
    let name = nbit::launch!("bf16", "cpu", |P, D| Ok(P::NAME)).unwrap();
    assert_eq!(name, "bf16-mixed");
    struct Name;
    impl RunJob for Name {
        type Output = &'static str;
        fn run<P: Precision, D: Runs<P>>(self) -> Result<&'static str, nbit::Error> {
            Ok(P::NAME)
        }
    }
    assert_eq!(nbit::launch("bf16", "cpu", Name).unwrap(), "bf16-mixed");
}

#[test]
fn launch_prints_lightnings_notice_for_a_legacy_spelling_as_the_command_line_does() {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "matrix::legacy_spelling_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("NBIT_TEST_LEGACY_CHILD", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let notes: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("note: precision"))
        .collect();
    assert_eq!(notes.len(), 2, "{stderr}");
    assert!(
        notes[0].contains("'bf16'") && notes[0].contains("'bf16-mixed'"),
        "{}",
        notes[0]
    );
    assert_eq!(notes[0], notes[1]);
}
