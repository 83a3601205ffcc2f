//! Hooking the shim into the system resolver, and undoing it.

use super::file::{
    follow_links, has_marker, live_file, nameservers, sha256, strip_ours, write_in_place,
};
use super::resolvectl::{self, DETECT_LIMIT, resolvectl};
use super::state::{State, read_state, remove_if_there, write_state};
use super::{MARKER, Mode, Paths, ROUTING_DOMAIN, ResolverError, Wanted};
use crate::daemon::platform::proc;
use crate::fsutil;
use std::fs;
use std::io;
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

/// How long a freshly created link may take to become known to resolved.
const LINK_KNOWN_WITHIN: Duration = Duration::from_secs(2);

/// The mode `auto` picks: resolved when resolv.conf leads to its stub and resolvectl answers
/// within 2 s (a stub file left by a stopped resolved does not count), else resolv.conf.
pub async fn detect(paths: &Paths) -> Mode {
    if paths.netns_guard && proc::in_own_netns() {
        // resolved serves the machine's namespace: it could never reach a shim in this one.
        return Mode::ResolvConf;
    }
    let points_at_resolved = fs::read_link(&paths.resolv_conf)
        .map(|t| t.to_string_lossy().contains("run/systemd/resolve/"))
        .unwrap_or(false);
    let names_stub = fs::read_to_string(&paths.resolv_conf)
        .map(|text| nameservers(&text).any(|ns| ns == "127.0.0.53"))
        .unwrap_or(false);
    if !(points_at_resolved || names_stub) {
        return Mode::ResolvConf;
    }
    match resolvectl::run(paths, &["status"], DETECT_LIMIT).await {
        Ok(ran) if ran.status.success() => Mode::Resolved,
        _ => Mode::ResolvConf,
    }
}

/// Point the system resolver at the shim on `nameserver` for `*.q2q`, after undoing what an
/// earlier run left. The state is on disk before anything changes, and a failure undoes what
/// was done, so no outcome leaves the system changed without a record.
pub async fn install(
    paths: &Paths,
    wanted: Wanted,
    link: &str,
    nameserver: IpAddr,
) -> Result<Mode, ResolverError> {
    if let Some(what) = restore(paths).await? {
        tracing::info!(restored = %what, "repaired the resolver settings of a previous run");
    }
    let mode = match wanted {
        Wanted::Auto => detect(paths).await,
        Wanted::Resolved => Mode::Resolved,
        Wanted::ResolvConf => Mode::ResolvConf,
        Wanted::Off => Mode::Off,
    };
    let result = match mode {
        Mode::Off => write_state(paths, &State::new(Mode::Off, link, nameserver)),
        Mode::Resolved => install_resolved(paths, link, nameserver).await,
        Mode::ResolvConf => install_resolv_conf(paths, link, nameserver),
    };
    if let Err(e) = result {
        if let Err(undo) = restore(paths).await {
            tracing::warn!(error = %undo, "could not undo a half-done resolver change");
        }
        return Err(e);
    }
    tracing::info!(mode = mode.as_str(), link, %nameserver, "system resolver points *.q2q at the shim");
    Ok(mode)
}

async fn install_resolved(
    paths: &Paths,
    link: &str,
    nameserver: IpAddr,
) -> Result<(), ResolverError> {
    write_state(paths, &State::new(Mode::Resolved, link, nameserver))?;
    let ns = nameserver.to_string();
    // A device created a moment ago may not be known to resolved yet ("Link 7 not known").
    let deadline = Instant::now() + LINK_KNOWN_WITHIN;
    loop {
        match resolvectl(paths, &["dns", link, &ns]).await {
            Err(ResolverError::Command { ref stderr, .. })
                if stderr.contains("not known") && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => break other.map(drop)?,
        }
    }
    resolvectl(paths, &["domain", link, ROUTING_DOMAIN]).await?;
    // Never the default route for other names; versions before systemd 240 lack the verb,
    // and a link with only a routing domain is not used for other names there anyway.
    if let Err(e) = resolvectl(paths, &["default-route", link, "false"]).await {
        tracing::debug!(error = %e, "resolvectl default-route not applied");
    }
    Ok(())
}

/// Put our two lines first. glibc asks at most the first three nameservers: an original with
/// three loses its third while we are up (not fixed: rare, and restored by `down`). The shim
/// answers REFUSED for names outside `q2q`, so the resolver moves on to the next server.
fn install_resolv_conf(paths: &Paths, link: &str, nameserver: IpAddr) -> Result<(), ResolverError> {
    let file = follow_links(&paths.resolv_conf);
    // `ip netns exec` mounts the namespace's own file where the path leads (through a link).
    let mounted =
        || proc::is_mount_point(&fs::canonicalize(&file).unwrap_or_else(|_| file.clone()));
    if paths.netns_guard && proc::in_own_netns() && !mounted() {
        return Err(ResolverError::SharedResolvConf {
            path: paths.resolv_conf.clone(),
            nameserver,
        });
    }
    // The file someone rewriting it writes (the namespace's own file, in a lab host): the
    // one to watch and to write, whatever is mounted over /etc/resolv.conf in this process.
    let file = live_file(paths);
    let original = match fs::read(&file) {
        // Our lines with no state to explain them (state directory lost): never stack them.
        Ok(bytes) => Some(strip_ours(&bytes).to_vec()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(ResolverError::file("read", &file, e)),
    };
    fsutil::create_private_dir(&paths.state_dir)
        .map_err(|e| ResolverError::file("create", &paths.state_dir, e))?;
    if let Some(bytes) = &original {
        let backup = paths.backup_file();
        fsutil::write_atomic(&backup, bytes, 0o600)
            .map_err(|e| ResolverError::file("write", &backup, e))?;
    }
    write_state(
        paths,
        &State {
            file: Some(file.clone()),
            created: original.is_none(),
            backup_sha256: original.as_deref().map(sha256),
            ..State::new(Mode::ResolvConf, link, nameserver)
        },
    )?;
    let mut text = format!("{MARKER}\nnameserver {nameserver}\n").into_bytes();
    text.extend_from_slice(original.as_deref().unwrap_or_default());
    write_in_place(&file, &text)
}

/// Undo whatever an `install` left (also one of a killed daemon). Idempotent: `Ok(None)`
/// when nothing was installed, else what was restored, in words.
pub async fn restore(paths: &Paths) -> Result<Option<String>, ResolverError> {
    let state = match read_state(paths)? {
        None => {
            // A crash between writing the backup and the state: the system was not touched.
            remove_if_there(&paths.backup_file())?;
            return Ok(None);
        }
        Some(Err(why)) => return restore_unreadable(paths, &why).map(Some),
        Some(Ok(s)) => s,
    };
    let what = match state.mode {
        Mode::Off => None,
        Mode::Resolved => Some(revert_link(paths, &state.link).await?),
        Mode::ResolvConf => Some(restore_file(paths, &state)?),
    };
    // The state goes last: until then, a crash leaves a record that repeats the work.
    remove_if_there(&paths.backup_file())?;
    remove_if_there(&paths.state_file())?;
    Ok(what)
}

async fn revert_link(paths: &Paths, link: &str) -> Result<String, ResolverError> {
    match resolvectl(paths, &["revert", link]).await {
        Ok(_) => Ok(format!("systemd-resolved settings of {link} reverted")),
        // The device goes with the daemon, and resolved forgets its settings with it.
        Err(e) if link_gone(link, &e) => {
            Ok(format!("{link} is gone, and systemd-resolved's settings for it with it"))
        }
        Err(e) => Err(e),
    }
}

fn link_gone(link: &str, e: &ResolverError) -> bool {
    let says_so = match e {
        ResolverError::Command { stderr, .. } => {
            stderr.contains("No such device") || stderr.contains("not found")
        }
        _ => false,
    };
    says_so || !Path::new("/sys/class/net").join(link).exists()
}

fn restore_file(paths: &Paths, state: &State) -> Result<String, ResolverError> {
    let file = state.written_file(paths);
    let shown = file.display();
    let current = match fs::read(&file) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Ok(format!("{shown} was removed by someone else; nothing to restore"));
        }
        Err(e) => return Err(ResolverError::file("read", &file, e)),
    };
    let backup = backup_if_intact(paths, state);
    if !has_marker(&current) {
        return Ok(if backup.as_deref() == Some(current.as_slice()) {
            format!("{shown} was still the original")
        } else {
            format!("{shown} was rewritten by someone else since q2q-tun changed it; left as it is")
        });
    }
    if state.created {
        let rest = strip_ours(&current);
        if rest.is_empty() {
            remove_if_there(&file)?;
            return Ok(format!("removed {shown}, which q2q-tun had created"));
        }
        write_in_place(&file, rest)?;
        return Ok(format!("removed q2q-tun's nameserver from {shown}"));
    }
    match backup {
        Some(original) => {
            write_in_place(&file, &original)?;
            Ok(format!("{shown} restored (nameserver {} removed)", state.nameserver))
        }
        None => {
            write_in_place(&file, strip_ours(&current))?;
            Ok(format!(
                "the backup {} was missing or damaged: removed q2q-tun's two lines from {shown}",
                paths.backup_file().display()
            ))
        }
    }
}

/// The saved original, if it is there and matches the digest in the state.
pub(super) fn backup_if_intact(paths: &Paths, state: &State) -> Option<Vec<u8>> {
    let bytes = fs::read(paths.backup_file()).ok()?;
    (state.backup_sha256.as_deref() == Some(sha256(&bytes).as_str())).then_some(bytes)
}

/// A state file that does not parse: take our lines out of resolv.conf if they are there
/// (resolved settings vanish with the device) and keep the file aside for a human.
fn restore_unreadable(paths: &Paths, why: &str) -> Result<String, ResolverError> {
    let state_file = paths.state_file();
    let aside = paths.state_dir.join("resolver.toml.unreadable");
    fs::rename(&state_file, &aside)
        .map_err(|e| ResolverError::file("move aside", &state_file, e))?;
    let file = follow_links(&paths.resolv_conf);
    let mut what =
        format!("{} was unreadable ({why}), kept as {}", state_file.display(), aside.display());
    if let Ok(current) = fs::read(&file)
        && has_marker(&current)
    {
        write_in_place(&file, strip_ours(&current))?;
        what.push_str(&format!("; removed q2q-tun's two lines from {}", file.display()));
    }
    remove_if_there(&paths.backup_file())?;
    Ok(what)
}
