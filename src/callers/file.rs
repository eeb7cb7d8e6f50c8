//! The callers file (`--callers-file`): TOML `[[caller]]` tables, checked
//! whole and turned into a [`Directory`] that finds a caller by the SHA-256
//! of its `x-api-key` or by its mTLS subject with one map lookup, however
//! many callers there are. Errors name the line and the reason, never a
//! value that could be a secret.

use std::{collections::HashMap, fmt, path::Path, sync::Arc};

use serde::Deserialize;

use super::{Caller, limits::Limits};
use crate::job::Token;

/// Longest caller name (it goes into Redis keys and metric labels).
const MAX_NAME: usize = 64;

/// Why a callers file was refused: the line (when known) and the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileError {
    /// The file cannot be read.
    #[error("cannot read {path}: {reason}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        reason: String,
    },
    /// The file does not parse, or a caller is not valid.
    #[error("line {line}: {reason}")]
    Invalid {
        /// 1-based line.
        line: usize,
        /// What is wrong.
        reason: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileModel {
    #[serde(default)]
    caller: Vec<toml::Spanned<Entry>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: String,
    #[serde(default)]
    key_sha256: Option<OneOrMany>,
    #[serde(default)]
    tls_subject: Option<String>,
    #[serde(default)]
    images_per_day: Option<u64>,
    #[serde(default)]
    creates_per_minute: Option<u64>,
    #[serde(default)]
    max_watches: Option<u64>,
    #[serde(default)]
    token: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// The callers of one version of the file, indexed.
#[derive(Default)]
pub struct Directory {
    by_key: HashMap<[u8; 32], Arc<Caller>>,
    by_subject: HashMap<String, Arc<Caller>>,
    callers: Vec<Arc<Caller>>,
    /// SHA-256 of the text this version was read from, so the reloader
    /// knows which content is in force.
    source: [u8; 32],
}

impl fmt::Debug for Directory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Directory({} callers)", self.callers.len())
    }
}

impl Directory {
    /// Reads and checks the file at `path`.
    pub fn load(path: &Path) -> Result<Self, FileError> {
        let text = std::fs::read_to_string(path).map_err(|e| FileError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::parse(&text)
    }

    /// Checks the file's text.
    pub fn parse(text: &str) -> Result<Self, FileError> {
        let model: FileModel = toml::from_str(text).map_err(|e| FileError::Invalid {
            line: e.span().map_or(1, |s| line_of(text, s.start)),
            // The message only: the error's display quotes the line, which
            // may hold a token.
            reason: e.message().trim().to_owned(),
        })?;
        let mut directory = Self {
            source: super::key_hash(text.as_bytes()),
            ..Self::default()
        };
        for spanned in model.caller {
            let line = line_of(text, spanned.span().start);
            let invalid = |reason: String| FileError::Invalid { line, reason };
            directory.add(spanned.into_inner()).map_err(invalid)?;
        }
        Ok(directory)
    }

    fn add(&mut self, entry: Entry) -> Result<(), String> {
        let name = entry.name.trim();
        check_name(name)?;
        if self.callers.iter().any(|c| &*c.name == name) {
            return Err(format!("a second caller named {name:?}"));
        }
        let keys = match entry.key_sha256 {
            None => Vec::new(),
            Some(OneOrMany::One(key)) => vec![key],
            Some(OneOrMany::Many(keys)) => keys,
        };
        let keys = keys
            .iter()
            .map(|k| parse_sha256(k))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|reason| format!("caller {name:?}: key_sha256 {reason}"))?;
        let subject = entry.tls_subject.as_deref().map(normalize_subject);
        if keys.is_empty() && subject.is_none() {
            return Err(format!(
                "caller {name:?} has neither key_sha256 nor tls_subject, so no call can be it"
            ));
        }
        let token = entry
            .token
            .as_deref()
            .map(Token::parse)
            .transpose()
            .map_err(|e| format!("caller {name:?}: token {e}"))?;
        let caller = Arc::new(Caller::new(
            name.into(),
            Limits {
                images_per_day: entry.images_per_day,
                creates_per_minute: entry.creates_per_minute,
                max_watches: entry.max_watches,
            },
            token,
        ));
        for key in keys {
            if let Some(other) = self.by_key.insert(key, Arc::clone(&caller)) {
                return Err(format!(
                    "caller {name:?}: a key_sha256 already belongs to {:?}",
                    other.name
                ));
            }
        }
        if let Some(subject) = subject
            && let Some(other) = self.by_subject.insert(subject, Arc::clone(&caller))
        {
            return Err(format!(
                "caller {name:?}: its tls_subject already belongs to {:?}",
                other.name
            ));
        }
        self.callers.push(caller);
        Ok(())
    }

    /// SHA-256 of the text this version was read from.
    pub fn source(&self) -> [u8; 32] {
        self.source
    }

    /// The caller whose key hashes to `key_hash`.
    pub fn by_key(&self, key_hash: &[u8; 32]) -> Option<&Arc<Caller>> {
        self.by_key.get(key_hash)
    }

    /// The caller with this certificate subject (normalized).
    pub fn by_subject(&self, subject: &str) -> Option<&Arc<Caller>> {
        self.by_subject.get(subject)
    }

    /// Whether any caller is found by its certificate.
    pub fn has_subjects(&self) -> bool {
        !self.by_subject.is_empty()
    }

    /// Every caller, in file order.
    pub fn callers(&self) -> &[Arc<Caller>] {
        &self.callers
    }
}

/// 1-based line of byte `offset`.
fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset)
        .map_or(1, |t| t.matches('\n').count() + 1)
}

/// `[A-Za-z0-9._-]`, 1 to 64 characters: safe in keys and labels.
fn check_name(name: &str) -> Result<(), String> {
    let accepted = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if name.is_empty() || name.len() > MAX_NAME || !name.chars().all(accepted) {
        return Err(format!(
            "caller name {name:?}: expected 1 to {MAX_NAME} characters of A-Z, a-z, 0-9, `.`, `_` and `-`"
        ));
    }
    Ok(())
}

/// 64 lowercase hex digits. The text is not quoted back: a key pasted here
/// by mistake must not reach the log.
fn parse_sha256(text: &str) -> Result<[u8; 32], String> {
    let text = text.trim();
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let bytes = text.as_bytes();
    let mut out = [0u8; 32];
    if bytes.len() != 64 {
        return Err(format!(
            "must be 64 lowercase hex digits (a SHA-256; `piclumen-grpc hash-key` prints it), got {} characters",
            bytes.len()
        ));
    }
    for (i, pair) in bytes.chunks(2).enumerate() {
        match (digit(pair[0]), digit(pair[1])) {
            (Some(hi), Some(lo)) => out[i] = hi << 4 | lo,
            _ => {
                return Err(
                    "must be 64 lowercase hex digits (a SHA-256; `piclumen-grpc hash-key` prints it)"
                        .into(),
                );
            }
        }
    }
    Ok(out)
}

/// A certificate subject compared without the spaces around `=` and `,`
/// and whatever the order of its parts (tools print them in either order):
/// `O = Example, CN = batch` and `CN=batch,O=Example` are the same.
pub fn normalize_subject(subject: &str) -> String {
    let mut parts: Vec<String> = subject
        .split(',')
        .map(|rdn| {
            let (k, v) = rdn.split_once('=').unwrap_or((rdn, ""));
            format!("{}={}", k.trim().to_ascii_uppercase(), v.trim())
        })
        .collect();
    parts.sort_unstable();
    parts.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_A: &str = "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae";
    const KEY_B: &str = "fcde2b2edba56bf408601fb721fe9b5c338d10ee429ea04fae5511b68fbf8fb9";

    #[test]
    fn a_file_of_callers_parses() {
        let text = format!(
            "[[caller]]\nname = \"batch\"\nkey_sha256 = \"{KEY_A}\"\nimages_per_day = 10\n\n\
             [[caller]]\nname = \"web\"\nkey_sha256 = [\"{KEY_B}\"]\ntls_subject = \"CN = web, O = Ex\"\n\
             token = \"team-token\"\ncreates_per_minute = 5\nmax_watches = 2\n"
        );
        let dir = Directory::parse(&text).expect("parses");
        assert_eq!(dir.callers().len(), 2);
        let key = parse_sha256(KEY_A).expect("hex");
        let batch = dir.by_key(&key).expect("batch");
        assert_eq!(&*batch.name, "batch");
        assert_eq!(batch.limits.images_per_day, Some(10));
        let web = dir.by_subject("CN=web,O=Ex").expect("web");
        assert_eq!(web.limits.max_watches, Some(2));
        assert!(web.token.is_some());
        assert!(!format!("{dir:?}").contains("team-token"));
    }

    #[test]
    fn errors_name_the_line_and_never_the_secret() {
        let cases = [
            (
                "[[caller]]\nname = \"a\"\nkey_sha256 = \"my-raw-key\"\n",
                1,
                "64 lowercase hex",
            ),
            ("[[caller]]\nname = \"a\"\n", 1, "neither key_sha256"),
            (
                &format!(
                    "[[caller]]\nname = \"a\"\nkey_sha256 = \"{KEY_A}\"\n[[caller]]\nname = \"a\"\nkey_sha256 = \"{KEY_B}\"\n"
                ),
                4,
                "second caller",
            ),
            ("[[caller]]\nname = \"a\"\ntoken = \"secret-tok\n", 3, ""),
            (
                "[[caller]]\nname = \"a\"\nimages_per_dya = 3\n",
                3,
                "unknown field",
            ),
            ("[[caller]]\nname = \"a b\"\n", 1, "caller name"),
        ];
        for (text, line, reason) in cases {
            match Directory::parse(text) {
                Err(FileError::Invalid {
                    line: got,
                    reason: why,
                }) => {
                    assert_eq!(got, line, "{text}: {why}");
                    assert!(why.contains(reason), "{why}");
                    assert!(
                        !why.contains("my-raw-key") && !why.contains("secret-tok"),
                        "{why}"
                    );
                }
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    #[test]
    fn subjects_compare_without_spaces() {
        assert_eq!(normalize_subject("cn = a, O= B c "), "CN=a,O=B c");
        assert_eq!(normalize_subject("O=B c,CN=a"), "CN=a,O=B c");
    }
}
