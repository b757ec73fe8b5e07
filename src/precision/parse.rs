//! Lightning's precision strings, parsed as Lightning parses them.

use super::PrecisionKind;
use crate::Error;

/// A precision as a user may give it: a string (`"bf16-mixed"`, legacy `"16"`) or an integer
/// (legacy `16`, `32`, `64`). Lightning turns integers into strings first; so does nbit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrecisionInput<'a> {
    /// A string value.
    Str(&'a str),
    /// An integer value.
    Int(i64),
}

impl<'a> From<&'a str> for PrecisionInput<'a> {
    fn from(s: &'a str) -> Self {
        PrecisionInput::Str(s)
    }
}

impl<'a> From<&'a String> for PrecisionInput<'a> {
    fn from(s: &'a String) -> Self {
        PrecisionInput::Str(s)
    }
}

macro_rules! int_inputs {
    ($($t:ty),*) => {$(
        impl From<$t> for PrecisionInput<'_> {
            fn from(v: $t) -> Self {
                PrecisionInput::Int(v as i64)
            }
        }
    )*};
}
int_inputs!(i8, i16, i32, i64, u8, u16, u32);

/// A parsed precision and, for a legacy spelling Lightning discourages, the notice to show.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    /// The precision selected.
    pub kind: PrecisionKind,
    /// Set for `16`/`"16"` and `"bf16"`, which Lightning accepts with a warning.
    pub notice: Option<String>,
}

/// Legacy spellings: (input, canonical, discouraged). Lightning's alias table.
const LEGACY: [(&str, PrecisionKind, bool); 4] = [
    ("16", PrecisionKind::Mixed16, true),
    ("bf16", PrecisionKind::MixedBf16, true),
    ("32", PrecisionKind::True32, false),
    ("64", PrecisionKind::True64, false),
];

/// Parses every precision value Lightning's `Trainer(precision=...)` accepts.
///
/// ```
/// use nbit::{parse_precision, PrecisionKind};
///
/// assert_eq!(parse_precision("bf16-mixed")?.kind, PrecisionKind::MixedBf16);
/// assert_eq!(parse_precision(64)?.kind, PrecisionKind::True64); // legacy, silent
/// let legacy = parse_precision("16")?;                           // legacy, discouraged
/// assert_eq!(legacy.kind, PrecisionKind::Mixed16);
/// assert!(legacy.notice.unwrap().contains("16-mixed"));
/// let err = parse_precision("8-true").unwrap_err().to_string();
/// assert!(err.contains("'8-true'") && err.contains("bf16-mixed"));
/// # Ok::<(), nbit::Error>(())
/// ```
pub fn parse_precision<'a>(value: impl Into<PrecisionInput<'a>>) -> Result<Parsed, Error> {
    let owned;
    let text: &str = match value.into() {
        PrecisionInput::Str(s) => s,
        PrecisionInput::Int(i) => {
            owned = i.to_string();
            &owned
        }
    };
    if let Some(kind) = PrecisionKind::ALL.into_iter().find(|k| k.name() == text) {
        return Ok(Parsed { kind, notice: None });
    }
    if let Some(&(_, kind, discouraged)) = LEGACY.iter().find(|(alias, ..)| *alias == text) {
        let notice = discouraged.then(|| {
            format!(
                "precision '{text}' is accepted for historical reasons but discouraged; \
                 write '{}' (`{}`) instead",
                kind.name(),
                kind.type_name()
            )
        });
        return Ok(Parsed { kind, notice });
    }
    Err(Error::UnknownPrecision {
        value: text.to_owned(),
        suggestion: suggest(text),
    })
}

/// The valid value a near miss most likely meant: the same but for case, separators (`bf16mixed`,
/// `BF16_MIXED`) or the type name (`Mixed<BF16>`), else the closest value within two typos
/// (`bf16-mxed`) with the same digits.
fn suggest(text: &str) -> Option<&'static str> {
    let norm = |s: &str| {
        s.to_ascii_lowercase()
            .chars()
            .filter(|c| !matches!(c, '-' | '_' | ' '))
            .collect::<String>()
    };
    let wanted = norm(text);
    // The bits are the meaning: `8-true` is not a typo of `16-true`.
    let digits = |s: &str| s.chars().filter(char::is_ascii_digit).collect::<String>();
    let candidates = PrecisionKind::ALL
        .into_iter()
        .flat_map(|k| [(k.name(), k.name()), (k.type_name(), k.name())])
        .chain(LEGACY.iter().map(|(a, k, _)| (*a, k.name())));
    let (distance, best) = candidates
        .map(|(spelling, canonical)| (norm(spelling), canonical))
        .filter(|(spelling, _)| digits(spelling) == digits(&wanted))
        .map(|(spelling, canonical)| (edit_distance(&spelling, &wanted), canonical))
        .min_by_key(|&(d, _)| d)?;
    (distance <= 2).then_some(best)
}

/// Levenshtein distance (insertions, deletions and substitutions of one character).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let next = (diagonal + usize::from(ca != cb))
                .min(row[j] + 1)
                .min(row[j + 1] + 1);
            diagonal = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

impl core::str::FromStr for PrecisionKind {
    type Err = Error;
    /// Parses like [`parse_precision`], dropping any legacy-spelling notice.
    fn from_str(s: &str) -> Result<Self, Error> {
        parse_precision(s).map(|p| p.kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_near_miss_is_told_the_value_it_resembles() {
        let meant = |typo: &str| match parse_precision(typo) {
            Err(Error::UnknownPrecision { suggestion, .. }) => suggestion,
            other => panic!("{typo}: {other:?}"),
        };
        assert_eq!(meant("bf16mixed"), Some("bf16-mixed"));
        assert_eq!(meant("BF16_MIXED"), Some("bf16-mixed"));
        assert_eq!(meant("16mixed"), Some("16-mixed"));
        assert_eq!(meant("bf16-mxed"), Some("bf16-mixed"));
        assert_eq!(meant("32-ture"), Some("32-true"));
        assert_eq!(meant("Mixed<BF16>"), Some("bf16-mixed"));
        assert_eq!(meant("8-true"), None);
        assert_eq!(meant("int8"), None);
        assert_eq!(meant("8"), None);
        let msg = parse_precision("bf16mixed").unwrap_err().to_string();
        assert!(msg.contains("did you mean 'bf16-mixed'?"), "{msg}");
    }

    #[test]
    fn canonical_strings_round_trip() {
        for kind in PrecisionKind::ALL {
            assert_eq!(
                parse_precision(kind.name()).unwrap(),
                Parsed { kind, notice: None }
            );
        }
    }

    #[test]
    fn legacy_values_map_as_lightning_maps_them() {
        let cases: [(PrecisionInput, PrecisionKind, bool); 8] = [
            (16.into(), PrecisionKind::Mixed16, true),
            ("16".into(), PrecisionKind::Mixed16, true),
            ("bf16".into(), PrecisionKind::MixedBf16, true),
            (32.into(), PrecisionKind::True32, false),
            ("32".into(), PrecisionKind::True32, false),
            (64u8.into(), PrecisionKind::True64, false),
            ("64".into(), PrecisionKind::True64, false),
            (64i64.into(), PrecisionKind::True64, false),
        ];
        for (input, kind, noisy) in cases {
            let p = parse_precision(input).unwrap();
            assert_eq!(p.kind, kind, "{input:?}");
            assert_eq!(p.notice.is_some(), noisy, "{input:?}");
        }
    }

    #[test]
    fn bad_values_list_the_valid_ones() {
        for bad in [
            "",
            "8-true",
            "transformer-engine",
            "16-Mixed",
            "fp16",
            "bf16-true ",
        ] {
            let msg = parse_precision(bad).unwrap_err().to_string();
            assert!(msg.contains(&format!("'{bad}'")), "{msg}");
            for kind in PrecisionKind::ALL {
                assert!(msg.contains(kind.name()), "{msg} lacks {kind}");
            }
        }
        for bad in [8, 0, -16, 128] {
            assert!(parse_precision(bad).is_err());
        }
    }

    #[test]
    fn near_misses_get_a_suggestion() {
        let msg = parse_precision("BF16_Mixed").unwrap_err().to_string();
        assert!(msg.contains("did you mean 'bf16-mixed'"), "{msg}");
        let msg = parse_precision("True<F64>").unwrap_err().to_string();
        assert!(msg.contains("did you mean '64-true'"), "{msg}");
        let msg = parse_precision("8-true").unwrap_err().to_string();
        assert!(!msg.contains("did you mean"), "{msg}");
    }
}
