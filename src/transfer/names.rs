//! Names of transferred files: relative paths of plain components, checked before any
//! file system call, so a hostile sender cannot write outside the target directory.

use std::path::{Component, Path, PathBuf};

/// Why a name is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("refused file name `{0}`: absolute paths are not allowed")]
    Absolute(String),
    #[error("refused file name `{0}`: `..` would escape the target directory")]
    Escapes(String),
    #[error("refused file name `{0}`: empty, too long, or with forbidden characters")]
    Invalid(String),
}

/// Longest name accepted, in bytes.
pub const MAX_NAME: usize = 4096;

/// A checked relative name: `a/b/c.txt`, components without `/`, `\\`, NUL, `.` or `..`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SafeName(String);

impl SafeName {
    pub fn parse(name: &str) -> Result<SafeName, NameError> {
        if name.starts_with('/') {
            return Err(NameError::Absolute(name.into()));
        }
        if name.is_empty() || name.len() > MAX_NAME || name.contains(['\0', '\\']) {
            return Err(NameError::Invalid(name.into()));
        }
        for part in name.split('/') {
            match part {
                ".." => return Err(NameError::Escapes(name.into())),
                "" | "." => return Err(NameError::Invalid(name.into())),
                p if p.len() > 255 || p.chars().any(char::is_control) => {
                    return Err(NameError::Invalid(name.into()));
                }
                _ => {}
            }
        }
        Ok(SafeName(name.to_string()))
    }

    /// The name for `path` relative to `base` (only normal components).
    pub fn from_relative(path: &Path) -> Result<SafeName, NameError> {
        let mut parts = Vec::new();
        for c in path.components() {
            match c {
                Component::Normal(p) => parts.push(
                    p.to_str().ok_or_else(|| NameError::Invalid(path.display().to_string()))?,
                ),
                _ => return Err(NameError::Invalid(path.display().to_string())),
            }
        }
        SafeName::parse(&parts.join("/"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The path under `dir`.
    pub fn under(&self, dir: &Path) -> PathBuf {
        let mut p = dir.to_path_buf();
        for part in self.0.split('/') {
            p.push(part);
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_names_refused() {
        for bad in [
            "../../etc/passwd",
            "/etc/passwd",
            "a/../../b",
            "",
            "a//b",
            "./a",
            "a/./b",
            "a\\..\\b",
            "a\0b",
            "..",
        ] {
            assert!(SafeName::parse(bad).is_err(), "{bad:?} should be refused");
        }
        assert!(matches!(SafeName::parse("../../etc/passwd"), Err(NameError::Escapes(_))));
        assert!(matches!(SafeName::parse("/etc/passwd"), Err(NameError::Absolute(_))));
        let ok = SafeName::parse("dir/sub/file.txt").unwrap();
        assert_eq!(ok.under(Path::new("/in")), PathBuf::from("/in/dir/sub/file.txt"));
        assert!(SafeName::parse("..hidden/x..y").is_ok());
    }
}
