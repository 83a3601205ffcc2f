//! `$Q2Q_HOME/resolver.toml`: what `install` changed, so that `restore` can undo it in
//! another process, after a crash.

use super::file::follow_links;
use super::{Mode, Paths, ResolverError};
use crate::fsutil;
use serde::{Deserialize, Serialize};
use std::fs;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// What `install` did, in `$Q2Q_HOME/resolver.toml`: enough for `restore` to undo it in
/// another process, after a crash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct State {
    /// How the shim was hooked in.
    pub mode: Mode,
    /// The device the settings are for.
    pub link: String,
    /// The shim's address, as the system resolver asks it.
    pub nameserver: IpAddr,
    /// The resolver file actually written (symbolic links followed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    /// The file did not exist: `restore` removes it.
    #[serde(default)]
    pub created: bool,
    /// SHA-256 of the backup, so a damaged backup is never written back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_sha256: Option<String>,
}

const STATE_HEADER: &str = "# Written by `q2q-tun up`: what it changed in the system resolver, so that \
`q2q-tun down` (or the next `up`)\n# undoes it, also after a crash. Do not edit.\n";

impl State {
    /// A record of `mode` for `link` and `nameserver`, before any file is written.
    pub fn new(mode: Mode, link: &str, nameserver: IpAddr) -> State {
        State {
            mode,
            link: link.to_string(),
            nameserver,
            file: None,
            created: false,
            backup_sha256: None,
        }
    }

    /// The resolver file that was written: the one recorded, else where the path leads.
    pub fn written_file(&self, paths: &Paths) -> PathBuf {
        self.file.clone().unwrap_or_else(|| follow_links(&paths.resolv_conf))
    }
}

pub(super) fn read_state(paths: &Paths) -> Result<Option<Result<State, String>>, ResolverError> {
    let path = paths.state_file();
    match fs::read_to_string(&path) {
        Ok(text) => Ok(Some(toml::from_str(&text).map_err(|e| e.message().to_string()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ResolverError::file("read", &path, e)),
    }
}

pub(super) fn write_state(paths: &Paths, state: &State) -> Result<(), ResolverError> {
    let path = paths.state_file();
    let body = toml::to_string(state).map_err(|e| {
        ResolverError::file("write", &path, io::Error::new(io::ErrorKind::InvalidData, e))
    })?;
    fsutil::create_private_dir(&paths.state_dir)
        .map_err(|e| ResolverError::file("create", &paths.state_dir, e))?;
    fsutil::write_atomic(&path, format!("{STATE_HEADER}{body}").as_bytes(), 0o600)
        .map_err(|e| ResolverError::file("write", &path, e))
}

pub(super) fn remove_if_there(path: &Path) -> Result<(), ResolverError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ResolverError::file("remove", path, e)),
    }
}

/// What an earlier `install` left, from the state file (None when nothing is installed or
/// the state file is unreadable).
pub fn installed(paths: &Paths) -> Option<(Mode, String, IpAddr)> {
    match read_state(paths) {
        Ok(Some(Ok(s))) => Some((s.mode, s.link, s.nameserver)),
        _ => None,
    }
}
