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
/// Longest component accepted on the wire, in bytes. Each receiver checks the limit of its
/// own file system (255 bytes on ext4 and tmpfs; a sender's file system may take more, e.g.
/// 255 UTF-16 units on APFS) and refuses only that file.
pub const MAX_COMPONENT: usize = 1024;

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
                p if p.len() > MAX_COMPONENT || p.chars().any(char::is_control) => {
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

    /// Its components, outermost first.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
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

/// The `n`th name to try when `base` is taken, as Taildrop does: `same.txt`,
/// `same (1).txt`, `same (2).txt`…; `.bashrc (1)`; the stem is shortened (on a character
/// boundary) so that the result stays within `max` bytes.
pub fn numbered(base: &str, n: usize, max: usize) -> String {
    if n == 0 {
        return base.to_string();
    }
    let (stem, ext) = match base.rfind('.') {
        Some(i) if i > 0 => base.split_at(i),
        _ => (base, ""),
    };
    let tag = format!(" ({n})");
    let mut keep = max.saturating_sub(tag.len() + ext.len()).min(stem.len());
    while !stem.is_char_boundary(keep) {
        keep -= 1;
    }
    format!("{}{tag}{ext}", &stem[..keep])
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

    #[test]
    fn numbered_names_fit() {
        assert_eq!(numbered("same.txt", 0, 255), "same.txt");
        assert_eq!(numbered("same.txt", 1, 255), "same (1).txt");
        assert_eq!(numbered(".bashrc", 2, 255), ".bashrc (2)");
        assert_eq!(numbered("noext", 12, 255), "noext (12)");
        let long = format!("{}.txt", "é".repeat(125)); // 254 bytes
        let n = numbered(&long, 1, 255);
        assert!(n.len() <= 255 && n.ends_with(" (1).txt"), "{n}");
        let wide = "中".repeat(100); // 300 bytes: a component the wire takes, ext4 does not
        assert!(SafeName::parse(&wide).is_ok());
        assert!(SafeName::parse(&"x".repeat(MAX_COMPONENT + 1)).is_err());
    }
}
