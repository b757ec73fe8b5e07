//! Text to token ids: a character vocabulary built from a text, saved beside the model.

use std::path::Path;

use crate::error::Error;

/// The first line of a saved vocabulary.
const HEADER: &str = "nbit-vocabulary-1 characters";

/// A character-level vocabulary: every distinct character of a text, in code-point order, id `i`
/// for the `i`-th. Save it with the model ([`Vocabulary::save`]) so ids mean the same characters
/// when the model is loaded again.
///
/// ```
/// use nbit::data::Vocabulary;
/// let v = Vocabulary::from_text("hello");
/// assert_eq!(v.len(), 4);                        // e h l o
/// assert_eq!(v.encode("hole")?, vec![1, 3, 2, 0]);
/// assert_eq!(v.decode(&[1, 0, 2, 2, 3])?, "hello");
/// assert!(v.encode("help").unwrap_err().to_string().contains("'p'"));
/// # Ok::<(), nbit::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vocabulary {
    chars: Vec<char>,
}

impl Vocabulary {
    /// The distinct characters of `text`.
    pub fn from_text(text: &str) -> Self {
        let mut chars: Vec<char> = text.chars().collect();
        chars.sort_unstable();
        chars.dedup();
        Vocabulary { chars }
    }

    /// The number of ids (the embedding's and the output layer's size).
    pub fn len(&self) -> usize {
        self.chars.len()
    }

    /// Whether the vocabulary has no characters.
    pub fn is_empty(&self) -> bool {
        self.chars.is_empty()
    }

    /// The ids of `text`'s characters; a character outside the vocabulary is an error naming it.
    pub fn encode(&self, text: &str) -> Result<Vec<i64>, Error> {
        text.chars()
            .enumerate()
            .map(|(at, c)| match self.chars.binary_search(&c) {
                Ok(i) => Ok(i as i64),
                Err(_) => Err(Error::InvalidData(format!(
                    "character {c:?} (U+{:04X}) at position {at} is not in the vocabulary of {} \
                     characters: build the vocabulary from a text that contains it",
                    c as u32,
                    self.len()
                ))),
            })
            .collect()
    }

    /// The text of `ids`; an id outside the vocabulary is an error naming it.
    pub fn decode(&self, ids: &[i64]) -> Result<String, Error> {
        ids.iter()
            .map(|&i| {
                usize::try_from(i)
                    .ok()
                    .and_then(|u| self.chars.get(u).copied())
                    .ok_or_else(|| Error::InvalidArgument {
                        name: "token id",
                        value: i.to_string(),
                        expected: "an id below the vocabulary's size",
                    })
            })
            .collect()
    }

    /// Writes the vocabulary to `path` (a header line, then one code point per line), atomically:
    /// a temporary file renamed over the target, so an existing file is replaced whole or not at
    /// all.
    pub fn save(&self, path: &Path) -> Result<(), Error> {
        let mut text = format!("{HEADER}\n");
        for c in &self.chars {
            text.push_str(&format!("{}\n", *c as u32));
        }
        crate::trainer::write_atomic(path, text.as_bytes())
    }

    /// Reads a vocabulary written by [`Vocabulary::save`]; a file that is not one is an error
    /// naming the file and the line.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
            path: name.clone(),
            action: "read",
            reason: e.to_string(),
        })?;
        let bad = |line: usize, why: String| Error::InvalidData(format!("'{name}', line {line}: {why}"));
        let mut lines = text.lines();
        if lines.next() != Some(HEADER) {
            return Err(bad(1, format!("expected '{HEADER}': not an nbit vocabulary")));
        }
        let mut chars = Vec::new();
        for (i, line) in lines.enumerate() {
            let c = line
                .trim()
                .parse::<u32>()
                .ok()
                .and_then(char::from_u32)
                .ok_or_else(|| bad(i + 2, format!("'{line}' is not a character's code point")))?;
            if chars.last().is_some_and(|&last| last >= c) {
                return Err(bad(
                    i + 2,
                    "code points must be distinct and in increasing order".into(),
                ));
            }
            chars.push(c);
        }
        Ok(Vocabulary { chars })
    }
}
