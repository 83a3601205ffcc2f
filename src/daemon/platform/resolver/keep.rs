//! Keeping our line first in resolv.conf while the daemon is up.

use super::file::{sha256, shim_nameserver, strip_ours, write_in_place};
use super::install::backup_if_intact;
use super::state::{read_state, remove_if_there, write_state};
use super::{MARKER, Mode, Paths, ResolverError};
use crate::fsutil;
use std::fs;
use std::io;
use std::time::{Duration, Instant};

/// Put our lines back first in resolv.conf if someone else rewrote it (NetworkManager,
/// dhclient, an admin; in place or by renaming a new file over it) or removed it. What they
/// wrote becomes the original that `restore` puts back, byte for byte. `Ok(None)` when the
/// file is as we left it, or we are not in resolv-conf mode; else what was done, in words.
pub fn repair(paths: &Paths) -> Result<Option<String>, ResolverError> {
    let Some(Ok(mut state)) = read_state(paths)? else { return Ok(None) };
    if state.mode != Mode::ResolvConf {
        return Ok(None);
    }
    let file = state.written_file(paths);
    let current = match fs::read(&file) {
        Ok(b) => Some(b),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(ResolverError::file("read", &file, e)),
    };
    let ours_first =
        current.as_deref().is_some_and(|c| shim_nameserver(c) == Some(state.nameserver));
    // What the other party wrote (our two lines taken out), None for no file at all.
    let theirs = current.as_deref().map(|c| strip_ours(c).to_vec());
    let recorded = if state.created { None } else { backup_if_intact(paths, &state) };
    let same = match (&theirs, &recorded) {
        (Some(t), Some(r)) => t == r,
        (None, None) => state.created,
        // We created the file and lines were added after ours: theirs now.
        (Some(t), None) => state.created && t.is_empty(),
        (None, Some(_)) => false,
    };
    if ours_first && same {
        return Ok(None);
    }
    // The new original first, then the file: a crash in between leaves a record that
    // `restore` understands (a digest that does not match makes it strip our lines instead).
    let backup = paths.backup_file();
    match &theirs {
        Some(bytes) => fsutil::write_atomic(&backup, bytes, 0o600)
            .map_err(|e| ResolverError::file("write", &backup, e))?,
        None => remove_if_there(&backup)?,
    }
    state.created = theirs.is_none();
    state.backup_sha256 = theirs.as_deref().map(sha256);
    state.file = Some(file.clone());
    write_state(paths, &state)?;
    if ours_first {
        return Ok(Some(format!(
            "{} was changed after our lines: the change is kept for `q2q-tun down`",
            file.display()
        )));
    }
    let mut text = format!("{MARKER}\nnameserver {}\n", state.nameserver).into_bytes();
    text.extend_from_slice(theirs.as_deref().unwrap_or_default());
    write_in_place(&file, &text)?;
    Ok(Some(match theirs {
        Some(_) => format!(
            "{} was rewritten by someone else: nameserver {} is first again (what they wrote \
             is what `q2q-tun down` puts back)",
            file.display(),
            state.nameserver
        ),
        None => format!(
            "{} was removed by someone else: written again with nameserver {}",
            file.display(),
            state.nameserver
        ),
    }))
}

/// Keeps our line in resolv.conf while the daemon is up: watches the file's directory
/// (in-place writes and renames over it alike) and [`repair`]s after each change, once the
/// writer has been quiet for [`QUIET`]; also every [`RECHECK`], in case a change went
/// unseen. Dropping it (or [`Keeper::stop`]) ends the watch before `restore` runs.
pub struct Keeper {
    watcher: Option<notify::RecommendedWatcher>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// How long the file must be left alone before it is checked (a writer's truncate and write
/// are two events).
pub const QUIET: Duration = Duration::from_millis(100);
/// Longest wait for a writer to go quiet.
const QUIET_AT_MOST: Duration = Duration::from_secs(1);
/// A check even without events.
const RECHECK: Duration = Duration::from_secs(10);

/// Start keeping our line in the file `install` wrote (resolv-conf mode; `None` otherwise).
pub fn keep(paths: &Paths) -> Result<Option<Keeper>, ResolverError> {
    use notify::Watcher;
    let Some(Ok(state)) = read_state(paths)? else { return Ok(None) };
    if state.mode != Mode::ResolvConf {
        return Ok(None);
    }
    let file = state.written_file(paths);
    let (Some(dir), Some(name)) = (file.parent(), file.file_name()) else { return Ok(None) };
    let name = name.to_os_string();
    // Any number of events is one reason to look: a full channel loses nothing.
    let (events, woken) = std::sync::mpsc::sync_channel::<()>(1);
    let mut watcher =
        notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            use notify::event::{AccessKind, AccessMode, EventKind};
            let ours = match &event {
                // Reading the file (ours too) is no change.
                Ok(e) if matches!(e.kind, EventKind::Access(k) if k != AccessKind::Close(AccessMode::Write)) => {
                    false
                }
                Ok(e) => e.need_rescan() || e.paths.iter().any(|p| p.file_name() == Some(&name)),
                Err(_) => true,
            };
            if ours {
                let _ = events.try_send(());
            }
        })
        .map_err(|e| ResolverError::file("watch", dir, io::Error::other(e)))?;
    watcher
        .watch(dir, notify::RecursiveMode::NonRecursive)
        .map_err(|e| ResolverError::file("watch", dir, io::Error::other(e)))?;
    let paths = paths.clone();
    let thread = std::thread::Builder::new()
        .name("resolv.conf".into())
        .spawn(move || keep_loop(&paths, &woken))
        .map_err(|e| ResolverError::file("watch", &file, e))?;
    tracing::debug!(file = %file.display(), "watching resolv.conf");
    Ok(Some(Keeper { watcher: Some(watcher), thread: Some(thread) }))
}

fn keep_loop(paths: &Paths, woken: &std::sync::mpsc::Receiver<()>) {
    use std::sync::mpsc::RecvTimeoutError::{Disconnected, Timeout};
    loop {
        match woken.recv_timeout(RECHECK) {
            Ok(()) => {
                // Wait for the writer to finish: quiet for QUIET, at most QUIET_AT_MOST.
                let deadline = Instant::now() + QUIET_AT_MOST;
                loop {
                    match woken.recv_timeout(QUIET) {
                        Ok(()) if Instant::now() < deadline => {}
                        Ok(()) | Err(Timeout) => break,
                        Err(Disconnected) => return,
                    }
                }
            }
            Err(Timeout) => {}
            Err(Disconnected) => return,
        }
        match repair(paths) {
            // Someone else's change to the system resolver: worth a line at the default level.
            Ok(Some(what)) => tracing::warn!(%what, "resolv.conf changed by someone else"),
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "resolver: could not put our nameserver back"),
        }
    }
}

impl Keeper {
    /// End the watch; when this returns, nothing writes resolv.conf any more.
    pub fn stop(mut self) {
        self.end();
    }

    fn end(&mut self) {
        // The watcher's callback holds the only sender: the thread ends when it goes.
        drop(self.watcher.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        self.end();
    }
}
