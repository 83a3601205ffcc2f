//! System resolver integration for the `*.q2q` shim: the system's lookups of `*.q2q` names
//! reach the shim, and nothing else about name resolution changes.
//!
//! | mode          | what `install` changes                                                   |
//! |---------------|--------------------------------------------------------------------------|
//! | `resolved`    | the link's DNS server and the routing-only domain `~q2q` (resolvectl)    |
//! | `resolv-conf` | one `nameserver` line first in resolv.conf (in a lab host, its own file) |
//! | `off`         | nothing                                                                  |
//!
//! Crash safety: [`install`] first undoes what an earlier run left ([`restore`]), then writes
//! `$Q2Q_HOME/resolver.toml` (and the original resolv.conf as `resolv.conf.q2q-backup`)
//! before it touches the system, so whatever a killed daemon changed, the next `up` or
//! `down` knows and undoes. Settings of systemd-resolved are per link and vanish with the
//! device anyway; a resolv.conf line would outlive the daemon, hence the backup.

use crate::fsutil;
use hickory_proto::op::{Message, MessageType, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// First line of a resolv.conf that carries our nameserver: how `restore` knows the file is
/// still as we left it, and how a reader of the file learns who added the line.
const MARKER: &str = "# q2q-tun: nameserver for *.q2q added; `q2q-tun down` restores the original";
/// The routing-only domain: resolved sends `*.q2q` to the link's server and nothing else.
const ROUTING_DOMAIN: &str = "~q2q";
/// `resolvectl status` must answer quickly for resolved to count as running.
const DETECT_LIMIT: Duration = Duration::from_secs(2);
/// Each resolvectl command that changes or reads settings.
const COMMAND_LIMIT: Duration = Duration::from_secs(5);
/// How long a freshly created link may take to become known to resolved.
const LINK_KNOWN_WITHIN: Duration = Duration::from_secs(2);
const LOOKUP_LIMIT: Duration = Duration::from_secs(3);
const SHIM_LIMIT: Duration = Duration::from_secs(2);

/// How the user wants the shim hooked into the system resolver (`--dns`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Wanted {
    /// systemd-resolved where it runs, resolv.conf otherwise.
    #[default]
    Auto,
    /// systemd-resolved, per link: a routing-only `~q2q` domain.
    Resolved,
    /// A nameserver line first in /etc/resolv.conf that `down` removes.
    ResolvConf,
    /// Leave the system resolver alone.
    Off,
}

/// How the shim is hooked into the system resolver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// systemd-resolved routes `~q2q` to the shim on the device's link.
    Resolved,
    /// The shim is the first nameserver in resolv.conf.
    ResolvConf,
    /// Not hooked in: only direct queries reach the shim.
    Off,
}

impl Mode {
    /// The name `--dns` takes for this mode.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Resolved => "resolved",
            Mode::ResolvConf => "resolv-conf",
            Mode::Off => "off",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Resolved => {
                "resolved: systemd-resolved sends *.q2q (routing domain ~q2q) to the shim"
            }
            Mode::ResolvConf => "resolv-conf: the shim is the first nameserver in resolv.conf",
            Mode::Off => "off: the system resolver does not know *.q2q",
        })
    }
}

/// Where the resolver settings and our state live; tests point them at temporary files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    /// The resolver file (inside `ip netns exec`, the namespace's own bind-mounted file).
    pub resolv_conf: PathBuf,
    /// Where the state file and the backup live (`$Q2Q_HOME`).
    pub state_dir: PathBuf,
    /// The resolvectl program.
    pub resolvectl: PathBuf,
    /// Check the network namespace: in one of its own, resolved cannot serve the link, and a
    /// resolv.conf that is not the namespace's own is the whole machine's (off in tests).
    pub netns_guard: bool,
}

impl Paths {
    /// The real system's resolver, with state in `state_dir`.
    pub fn system(state_dir: &Path) -> Paths {
        Paths {
            resolv_conf: PathBuf::from("/etc/resolv.conf"),
            state_dir: state_dir.to_path_buf(),
            resolvectl: PathBuf::from("resolvectl"),
            netns_guard: true,
        }
    }

    /// Everything under `dir` (a sandbox for tests): `dir/resolv.conf`, state in
    /// `dir/home`, a `dir/resolvectl` program, no namespace check.
    pub fn sandbox(dir: &Path) -> Paths {
        Paths {
            resolv_conf: dir.join("resolv.conf"),
            state_dir: dir.join("home"),
            resolvectl: dir.join("resolvectl"),
            netns_guard: false,
        }
    }

    fn state_file(&self) -> PathBuf {
        self.state_dir.join("resolver.toml")
    }

    fn backup_file(&self) -> PathBuf {
        self.state_dir.join("resolv.conf.q2q-backup")
    }
}

/// Why the system resolver could not be changed or restored.
#[derive(Debug, thiserror::Error)]
pub enum ResolverError {
    /// A resolver or state file could not be read, written or removed.
    #[error("cannot {action} {}: {error}{hint}", path.display())]
    File { action: &'static str, path: PathBuf, error: io::Error, hint: &'static str },
    /// resolvectl could not be started.
    #[error(
        "cannot run `{command}`: {error} (is systemd-resolved installed? `--dns resolv-conf` \
         or `--dns off` do without it)"
    )]
    Spawn { command: String, error: io::Error },
    /// resolvectl ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command { command: String, status: String, stderr: String },
    /// resolvectl did not finish in time (and was killed).
    #[error(
        "`{command}` did not finish within {secs} s and was killed: is systemd-resolved stuck? \
         (`--dns resolv-conf` does without it)"
    )]
    Timeout { command: String, secs: u64 },
    /// In a network namespace of its own, the machine's resolv.conf must not change.
    #[error(
        "this process runs in a network namespace of its own, but {} is the machine's: \
         pointing it at {nameserver} would stall every lookup outside this namespace. Give \
         the namespace its own file (/etc/netns/<name>/resolv.conf, which `ip netns exec` \
         mounts over it), or pass --dns off",
        path.display()
    )]
    SharedResolvConf { path: PathBuf, nameserver: IpAddr },
}

impl ResolverError {
    fn file(action: &'static str, path: &Path, error: io::Error) -> Self {
        let hint = if error.kind() == io::ErrorKind::PermissionDenied {
            " (changing the system resolver needs root: `sudo q2q-tun up`, or --dns off)"
        } else {
            ""
        };
        ResolverError::File { action, path: path.to_path_buf(), error, hint }
    }
}

/// What `install` did, in `$Q2Q_HOME/resolver.toml`: enough for `restore` to undo it in
/// another process, after a crash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct State {
    mode: Mode,
    link: String,
    nameserver: IpAddr,
    /// The resolver file actually written (symbolic links followed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    file: Option<PathBuf>,
    /// The file did not exist: `restore` removes it.
    #[serde(default)]
    created: bool,
    /// SHA-256 of the backup, so a damaged backup is never written back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    backup_sha256: Option<String>,
}

const STATE_HEADER: &str = "# Written by `q2q-tun up`: what it changed in the system resolver, so that \
`q2q-tun down` (or the next `up`)\n# undoes it, also after a crash. Do not edit.\n";

fn read_state(paths: &Paths) -> Result<Option<Result<State, String>>, ResolverError> {
    let path = paths.state_file();
    match fs::read_to_string(&path) {
        Ok(text) => Ok(Some(toml::from_str(&text).map_err(|e| e.message().to_string()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ResolverError::file("read", &path, e)),
    }
}

fn write_state(paths: &Paths, state: &State) -> Result<(), ResolverError> {
    let path = paths.state_file();
    let body = toml::to_string(state).map_err(|e| {
        ResolverError::file("write", &path, io::Error::new(io::ErrorKind::InvalidData, e))
    })?;
    fsutil::create_private_dir(&paths.state_dir)
        .map_err(|e| ResolverError::file("create", &paths.state_dir, e))?;
    fsutil::write_atomic(&path, format!("{STATE_HEADER}{body}").as_bytes(), 0o600)
        .map_err(|e| ResolverError::file("write", &path, e))
}

fn remove_if_there(path: &Path) -> Result<(), ResolverError> {
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

/// The mode `auto` picks: resolved when resolv.conf leads to its stub and resolvectl answers
/// within 2 s (a stub file left by a stopped resolved does not count), else resolv.conf.
pub fn detect(paths: &Paths) -> Mode {
    if paths.netns_guard && in_own_netns() {
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
    match run_bounded(&paths.resolvectl, &["status"], DETECT_LIMIT) {
        Ok(ran) if ran.status.success() => Mode::Resolved,
        _ => Mode::ResolvConf,
    }
}

/// The `nameserver` addresses of a resolv.conf text, in order.
fn nameservers(text: &str) -> impl Iterator<Item = &str> {
    text.lines().filter_map(|l| {
        let mut words = l.split_whitespace();
        (words.next() == Some("nameserver")).then(|| words.next()).flatten()
    })
}

/// Point the system resolver at the shim on `nameserver` for `*.q2q`, after undoing what an
/// earlier run left. The state is on disk before anything changes, and a failure undoes what
/// was done, so no outcome leaves the system changed without a record.
pub fn install(
    paths: &Paths,
    wanted: Wanted,
    link: &str,
    nameserver: IpAddr,
) -> Result<Mode, ResolverError> {
    if let Some(what) = restore(paths)? {
        tracing::info!(restored = %what, "repaired the resolver settings of a previous run");
    }
    let mode = match wanted {
        Wanted::Auto => detect(paths),
        Wanted::Resolved => Mode::Resolved,
        Wanted::ResolvConf => Mode::ResolvConf,
        Wanted::Off => Mode::Off,
    };
    let result = match mode {
        Mode::Off => write_state(paths, &state(Mode::Off, link, nameserver)),
        Mode::Resolved => install_resolved(paths, link, nameserver),
        Mode::ResolvConf => install_resolv_conf(paths, link, nameserver),
    };
    if let Err(e) = result {
        if let Err(undo) = restore(paths) {
            tracing::warn!(error = %undo, "could not undo a half-done resolver change");
        }
        return Err(e);
    }
    tracing::info!(mode = mode.as_str(), link, %nameserver, "system resolver points *.q2q at the shim");
    Ok(mode)
}

fn state(mode: Mode, link: &str, nameserver: IpAddr) -> State {
    State {
        mode,
        link: link.to_string(),
        nameserver,
        file: None,
        created: false,
        backup_sha256: None,
    }
}

fn install_resolved(paths: &Paths, link: &str, nameserver: IpAddr) -> Result<(), ResolverError> {
    write_state(paths, &state(Mode::Resolved, link, nameserver))?;
    let ns = nameserver.to_string();
    // A device created a moment ago may not be known to resolved yet ("Link 7 not known").
    let deadline = Instant::now() + LINK_KNOWN_WITHIN;
    loop {
        match resolvectl(paths, &["dns", link, &ns]) {
            Err(ResolverError::Command { ref stderr, .. })
                if stderr.contains("not known") && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            other => break other.map(drop)?,
        }
    }
    resolvectl(paths, &["domain", link, ROUTING_DOMAIN])?;
    // Never the default route for other names; versions before systemd 240 lack the verb,
    // and a link with only a routing domain is not used for other names there anyway.
    if let Err(e) = resolvectl(paths, &["default-route", link, "false"]) {
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
    let mounted = || is_mount_point(&fs::canonicalize(&file).unwrap_or_else(|_| file.clone()));
    if paths.netns_guard && in_own_netns() && !mounted() {
        return Err(ResolverError::SharedResolvConf {
            path: paths.resolv_conf.clone(),
            nameserver,
        });
    }
    // The file someone rewriting it writes (the namespace's own file, in a lab host): the
    // one to watch and to write, whatever is mounted over /etc/resolv.conf in this process.
    let file = mount_source(&file).unwrap_or(file);
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
            ..state(Mode::ResolvConf, link, nameserver)
        },
    )?;
    let mut text = format!("{MARKER}\nnameserver {nameserver}\n").into_bytes();
    text.extend_from_slice(original.as_deref().unwrap_or_default());
    write_in_place(&file, &text)
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes))
}

/// `content` without our marker line and the nameserver line after it (unchanged when it
/// does not start with the marker).
fn strip_ours(content: &[u8]) -> &[u8] {
    let Some(rest) = content.strip_prefix(format!("{MARKER}\n").as_bytes()) else {
        return content;
    };
    if rest.starts_with(b"nameserver ") {
        match rest.iter().position(|&b| b == b'\n') {
            Some(end) => &rest[end + 1..],
            None => &[],
        }
    } else {
        rest
    }
}

/// The shim's address in a resolv.conf that carries our lines (the nameserver right after
/// our marker): what this machine's own look-ups of other names must not ask.
pub fn shim_nameserver(content: &[u8]) -> Option<IpAddr> {
    let rest = content.strip_prefix(format!("{MARKER}\n").as_bytes())?;
    let line = rest.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    line.strip_prefix("nameserver ")?.trim().parse().ok()
}

fn has_marker(content: &[u8]) -> bool {
    content.starts_with(format!("{MARKER}\n").as_bytes())
}

/// Overwrite `path` in place (truncate, write, fsync), never by rename: inside
/// `ip netns exec`, /etc/resolv.conf is a bind mount, and renaming over a mount point fails
/// with EBUSY. A reader may see the file short for an instant; resolvers reread it later.
fn write_in_place(path: &Path, bytes: &[u8]) -> Result<(), ResolverError> {
    let result = (|| {
        let mut f =
            OpenOptions::new().write(true).create(true).truncate(true).mode(0o644).open(path)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    result.map_err(|e| ResolverError::file("write", path, e))
}

/// `path` with symbolic links followed, also to a target that does not exist (yet), so a
/// file we create is the one the link names and the one `restore` removes.
fn follow_links(path: &Path) -> PathBuf {
    let mut p = path.to_path_buf();
    for _ in 0..16 {
        match fs::read_link(&p) {
            Ok(target) => {
                p = match p.parent() {
                    Some(dir) if target.is_relative() => dir.join(target),
                    _ => target,
                }
            }
            Err(_) => break,
        }
    }
    p
}

/// Whether this process runs in another network namespace than PID 1 (readable as root;
/// when it cannot be told, no).
fn in_own_netns() -> bool {
    match (fs::read_link("/proc/self/ns/net"), fs::read_link("/proc/1/ns/net")) {
        (Ok(mine), Ok(init)) => mine != init,
        _ => false,
    }
}

/// Whether something is mounted on `path` (as `ip netns exec` mounts the namespace's own
/// resolv.conf).
fn is_mount_point(path: &Path) -> bool {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else { return false };
    let wanted = path.to_string_lossy();
    info.lines().filter_map(|l| l.split(' ').nth(4)).any(|m| unescape_mount(m) == wanted)
}

/// The file mounted over `path` when it is a bind mount of a file this process can see
/// (`ip netns exec` mounts /etc/netns/<ns>/resolv.conf over /etc/resolv.conf), checked to be
/// the same file. Someone rewriting the namespace's resolver writes that file, maybe by
/// renaming a new one over it, which this process's mount would never show.
fn mount_source(path: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let path = fs::canonicalize(path).ok()?;
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let root = mount_root(&info, &path.to_string_lossy())?;
    let (a, b) = (fs::metadata(&root).ok()?, fs::metadata(&path).ok()?);
    (root != path && a.dev() == b.dev() && a.ino() == b.ino()).then_some(root)
}

/// The root (within its filesystem) of the topmost mount at `mount_point`, from a
/// /proc/self/mountinfo text; for a bind-mounted file, the file's own path.
fn mount_root(mountinfo: &str, mount_point: &str) -> Option<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|l| {
            let mut fields = l.split(' ');
            let root = fields.nth(3)?;
            let point = fields.next()?;
            (unescape_mount(point) == mount_point).then(|| PathBuf::from(unescape_mount(root)))
        })
        .next_back()
        .filter(|root| root != Path::new("/"))
}

/// The resolv.conf in force for this process's look-ups: links followed, and the file
/// mounted over it (see [`mount_source`]).
pub fn live_file(paths: &Paths) -> PathBuf {
    let file = follow_links(&paths.resolv_conf);
    mount_source(&file).unwrap_or(file)
}

/// mountinfo writes space, tab, newline and backslash as octal escapes (`\040`).
fn unescape_mount(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest.get(i + 1..i + 4).and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(c) => {
                out.push(char::from(c));
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Undo whatever an `install` left (also one of a killed daemon). Idempotent: `Ok(None)`
/// when nothing was installed, else what was restored, in words.
pub fn restore(paths: &Paths) -> Result<Option<String>, ResolverError> {
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
        Mode::Resolved => Some(revert_link(paths, &state.link)?),
        Mode::ResolvConf => Some(restore_file(paths, &state)?),
    };
    // The state goes last: until then, a crash leaves a record that repeats the work.
    remove_if_there(&paths.backup_file())?;
    remove_if_there(&paths.state_file())?;
    Ok(what)
}

fn revert_link(paths: &Paths, link: &str) -> Result<String, ResolverError> {
    match resolvectl(paths, &["revert", link]) {
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
    let file = state.file.clone().unwrap_or_else(|| follow_links(&paths.resolv_conf));
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
fn backup_if_intact(paths: &Paths, state: &State) -> Option<Vec<u8>> {
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

/// Put our lines back first in resolv.conf if someone else rewrote it (NetworkManager,
/// dhclient, an admin; in place or by renaming a new file over it) or removed it. What they
/// wrote becomes the original that `restore` puts back, byte for byte. `Ok(None)` when the
/// file is as we left it, or we are not in resolv-conf mode; else what was done, in words.
pub fn repair(paths: &Paths) -> Result<Option<String>, ResolverError> {
    let Some(Ok(mut state)) = read_state(paths)? else { return Ok(None) };
    if state.mode != Mode::ResolvConf {
        return Ok(None);
    }
    let file = state.file.clone().unwrap_or_else(|| follow_links(&paths.resolv_conf));
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
    let file = state.file.clone().unwrap_or_else(|| follow_links(&paths.resolv_conf));
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

/// How a bounded command ended.
struct Ran {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

fn resolvectl(paths: &Paths, args: &[&str]) -> Result<Ran, ResolverError> {
    let ran = run_bounded(&paths.resolvectl, args, COMMAND_LIMIT)?;
    if ran.status.success() {
        return Ok(ran);
    }
    let said = match ran.stderr.trim() {
        "" => ran.stdout.trim(),
        s => s,
    };
    Err(ResolverError::Command {
        command: command_line(&paths.resolvectl, args),
        status: ran.status.to_string(),
        stderr: said.to_string(),
    })
}

fn command_line(program: &Path, args: &[&str]) -> String {
    let mut s = program.display().to_string();
    for a in args {
        s.push(' ');
        s.push_str(a);
    }
    s
}

/// Run `program args` with stdin closed, killing its whole process group after `limit`
/// (resolvectl waits on D-Bus, which may hang).
fn run_bounded(program: &Path, args: &[&str], limit: Duration) -> Result<Ran, ResolverError> {
    let command = command_line(program, args);
    let mut tries = 0;
    let mut child = loop {
        let spawned = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn();
        match spawned {
            Ok(c) => break c,
            // Another thread's fork may briefly hold a just-written program open (ETXTBSY).
            Err(e) if e.kind() == io::ErrorKind::ExecutableFileBusy && tries < 20 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(25));
            }
            Err(error) => return Err(ResolverError::Spawn { command, error }),
        }
    };
    let stdout = child.stdout.take().map(read_in_background);
    let stderr = child.stderr.take().map(read_in_background);
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() >= deadline => break None,
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(error) => {
                kill_group(&mut child);
                return Err(ResolverError::Spawn { command, error });
            }
        }
    };
    let Some(status) = status else {
        kill_group(&mut child);
        return Err(ResolverError::Timeout { command, secs: limit.as_secs() });
    };
    // A grandchild could hold the pipes open: wait a little, never forever.
    let collect = |rx: Option<std::sync::mpsc::Receiver<Vec<u8>>>| {
        rx.and_then(|rx| rx.recv_timeout(Duration::from_millis(500)).ok())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    };
    let stdout = collect(stdout);
    let stderr = collect(stderr);
    Ok(Ran { status, stdout, stderr })
}

fn read_in_background<R: Read + Send + 'static>(pipe: R) -> std::sync::mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.take(1 << 20).read_to_end(&mut buf);
        let _ = tx.send(buf);
    });
    rx
}

/// Kill the child and everything it started (its own process group), then reap it.
fn kill_group(child: &mut std::process::Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// One line of `q2q-tun doctor dns`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// Whether this part works.
    pub ok: bool,
    /// What was checked and found, for a person.
    pub what: String,
}

impl Check {
    fn ok(what: String) -> Check {
        Check { ok: true, what }
    }
    fn bad(what: String) -> Check {
        Check { ok: false, what }
    }
}

/// Which mode is in use and whether its settings are still in place; a lookup of
/// `probe_name` through the system resolver; and the same question asked of the shim
/// directly, which tells a broken hook from a broken shim.
pub async fn doctor(paths: &Paths, link: &str, probe_name: &str, shim: SocketAddr) -> Vec<Check> {
    let (p, l) = (paths.clone(), link.to_string());
    let mut checks = match tokio::task::spawn_blocking(move || settings_checks(&p, &l, shim)).await
    {
        Ok(c) => c,
        Err(e) => vec![Check::bad(format!("checking the resolver settings failed: {e}"))],
    };
    checks.push(system_lookup(probe_name).await);
    checks.push(query_shim(shim, probe_name).await);
    checks
}

/// The mode in use, and whether the system still has our settings.
fn settings_checks(paths: &Paths, link: &str, shim: SocketAddr) -> Vec<Check> {
    let state = match read_state(paths) {
        Ok(Some(Ok(s))) => s,
        Ok(Some(Err(why))) => {
            return vec![Check::bad(format!(
                "{} is unreadable ({why}): `q2q-tun down` repairs what it can",
                paths.state_file().display()
            ))];
        }
        Ok(None) => {
            return vec![Check::bad(format!(
                "no resolver settings installed (no {}): the daemon is not up in TUN mode; \
                 here it would use {}",
                paths.state_file().display(),
                detect(paths)
            ))];
        }
        Err(e) => return vec![Check::bad(e.to_string())],
    };
    let mut checks = vec![Check::ok(format!(
        "resolver mode {} (link {}, nameserver {})",
        state.mode, state.link, state.nameserver
    ))];
    if state.link != link {
        checks.push(Check::bad(format!(
            "the settings are for link {} but the daemon's device is {link}",
            state.link
        )));
    }
    if state.mode != Mode::Off && state.nameserver != shim.ip() {
        checks.push(Check::bad(format!(
            "the system resolver asks {} but the shim answers on {shim}",
            state.nameserver
        )));
    }
    match state.mode {
        Mode::Off => {}
        Mode::ResolvConf => {
            let file = state.file.clone().unwrap_or_else(|| follow_links(&paths.resolv_conf));
            let first = fs::read_to_string(&file)
                .ok()
                .and_then(|t| nameservers(&t).next().map(str::to_string));
            let ns = state.nameserver.to_string();
            checks.push(if first.as_deref() == Some(ns.as_str()) {
                Check::ok(format!("{}: nameserver {ns} comes first", file.display()))
            } else {
                Check::bad(format!(
                    "{} no longer names {ns} first (rewritten by DHCP or NetworkManager?): \
                     `q2q-tun down`, then `up` again",
                    file.display()
                ))
            });
        }
        Mode::Resolved => {
            let ns = state.nameserver.to_string();
            let dns = resolvectl(paths, &["dns", &state.link]).map(|r| r.stdout);
            let domain = resolvectl(paths, &["domain", &state.link]).map(|r| r.stdout);
            checks.push(match (dns, domain) {
                (Ok(d), Ok(m)) if d.contains(&ns) && m.contains(ROUTING_DOMAIN) => Check::ok(
                    format!("resolvectl: {} has DNS server {ns} and domain {ROUTING_DOMAIN}", state.link),
                ),
                (Ok(d), Ok(m)) => Check::bad(format!(
                    "resolvectl: {} should have DNS server {ns} and domain {ROUTING_DOMAIN}, has `{}` and `{}`",
                    state.link,
                    d.trim(),
                    m.trim()
                )),
                (Err(e), _) | (_, Err(e)) => Check::bad(e.to_string()),
            });
        }
    }
    checks
}

/// Look `name` up as any program would (getaddrinfo).
async fn system_lookup(name: &str) -> Check {
    match tokio::time::timeout(LOOKUP_LIMIT, tokio::net::lookup_host((name, 0u16))).await {
        Ok(Ok(addrs)) => {
            let mut ips: Vec<IpAddr> = addrs.map(|a| a.ip()).collect();
            ips.dedup();
            if ips.is_empty() {
                Check::bad(format!("the system resolver finds no address for {name}"))
            } else {
                Check::ok(format!("the system resolver finds {name}: {}", join(&ips)))
            }
        }
        Ok(Err(e)) => Check::bad(format!("the system resolver cannot find {name}: {e}")),
        Err(_) => Check::bad(format!(
            "the system resolver did not answer for {name} within {} s",
            LOOKUP_LIMIT.as_secs()
        )),
    }
}

/// Ask the shim for `name`'s A record over UDP, bypassing the system resolver.
async fn query_shim(shim: SocketAddr, name: &str) -> Check {
    match tokio::time::timeout(SHIM_LIMIT, ask_shim(shim, name)).await {
        Ok(Ok(resp)) => {
            let code = resp.metadata.response_code;
            let ips: Vec<IpAddr> = resp
                .answers
                .iter()
                .filter_map(|r| match r.data {
                    RData::A(a) => Some(IpAddr::V4(a.0)),
                    _ => None,
                })
                .collect();
            match (code, ips.is_empty()) {
                (ResponseCode::NoError, false) => {
                    Check::ok(format!("the shim on {shim} answers {name}: {}", join(&ips)))
                }
                (ResponseCode::NoError, true) => {
                    Check::bad(format!("the shim on {shim} has no address for {name} (NOERROR)"))
                }
                (ResponseCode::NXDomain, _) => {
                    Check::bad(format!("the shim on {shim} says {name} does not exist (NXDOMAIN)"))
                }
                (ResponseCode::Refused, _) => Check::bad(format!(
                    "the shim on {shim} refuses {name} (REFUSED): only names ending in .q2q are its"
                )),
                (other, _) => Check::bad(format!(
                    "the shim on {shim} answers {name} with {} ({other})",
                    rcode_name(other)
                )),
            }
        }
        Ok(Err(e)) => Check::bad(format!("asking the shim on {shim} for {name}: {e}")),
        Err(_) => Check::bad(format!(
            "the shim on {shim} did not answer a query for {name} within {} s",
            SHIM_LIMIT.as_secs()
        )),
    }
}

async fn ask_shim(shim: SocketAddr, name: &str) -> Result<Message, String> {
    let mut qname =
        Name::from_ascii(name).map_err(|e| format!("`{name}` is not a DNS name: {e}"))?;
    qname.set_fqdn(true);
    let mut query = Message::query();
    query.metadata.recursion_desired = true;
    query.add_query(Query::query(qname, RecordType::A));
    let bytes = query.to_vec().map_err(|e| e.to_string())?;
    let local: SocketAddr = match shim {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let io = |e: io::Error| match e.kind() {
        io::ErrorKind::ConnectionRefused => {
            "nothing listens there (connection refused)".to_string()
        }
        _ => e.to_string(),
    };
    let sock = tokio::net::UdpSocket::bind(local).await.map_err(io)?;
    sock.connect(shim).await.map_err(io)?;
    sock.send(&bytes).await.map_err(io)?;
    let mut buf = vec![0u8; 4096];
    loop {
        let n = sock.recv(&mut buf).await.map_err(io)?;
        // Anything that is not the answer to this query is ignored until the deadline.
        if let Ok(m) = Message::from_vec(&buf[..n])
            && m.metadata.id == query.metadata.id
            && m.metadata.message_type == MessageType::Response
        {
            return Ok(m);
        }
    }
}

fn rcode_name(code: ResponseCode) -> String {
    match code {
        ResponseCode::NoError => "NOERROR".into(),
        ResponseCode::FormErr => "FORMERR".into(),
        ResponseCode::ServFail => "SERVFAIL".into(),
        ResponseCode::NXDomain => "NXDOMAIN".into(),
        ResponseCode::NotImp => "NOTIMP".into(),
        ResponseCode::Refused => "REFUSED".into(),
        other => format!("rcode {}", u16::from(other)),
    }
}

fn join(ips: &[IpAddr]) -> String {
    ips.iter().map(IpAddr::to_string).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const NS: IpAddr = IpAddr::V4(Ipv4Addr::new(100, 64, 0, 1));
    const ORIGINAL: &[u8] = b"# from DHCP\nnameserver 192.168.1.1\nsearch lan\noptions edns0";

    struct Lab {
        dir: tempfile::TempDir,
        paths: Paths,
    }

    impl Lab {
        fn new() -> Lab {
            let dir = tempfile::tempdir().unwrap();
            let paths = Paths::sandbox(dir.path());
            Lab { dir, paths }
        }

        fn with_file(bytes: &[u8]) -> Lab {
            let lab = Lab::new();
            fs::write(&lab.paths.resolv_conf, bytes).unwrap();
            lab
        }

        /// A resolvectl that logs its arguments, one call a line, then runs `body`.
        fn fake_resolvectl(&self, body: &str) -> PathBuf {
            let log = self.dir.path().join("resolvectl.log");
            let script = format!("#!/bin/sh\necho \"$*\" >> '{}'\n{body}\n", log.display());
            fs::write(&self.paths.resolvectl, script).unwrap();
            fs::set_permissions(&self.paths.resolvectl, fs::Permissions::from_mode(0o755)).unwrap();
            log
        }

        fn file(&self) -> Vec<u8> {
            fs::read(&self.paths.resolv_conf).unwrap()
        }

        fn nothing_left(&self) {
            assert!(!self.paths.state_file().exists(), "state file left");
            assert!(!self.paths.backup_file().exists(), "backup left");
            assert_eq!(installed(&self.paths), None);
        }
    }

    fn mode_of(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    fn ours(original: &[u8]) -> Vec<u8> {
        let mut v = format!("{MARKER}\nnameserver {NS}\n").into_bytes();
        v.extend_from_slice(original);
        v
    }

    #[test]
    fn resolv_conf_round_trip_is_byte_exact() {
        let lab = Lab::with_file(ORIGINAL);
        fs::set_permissions(&lab.paths.resolv_conf, fs::Permissions::from_mode(0o644)).unwrap();
        let mode = install(&lab.paths, Wanted::ResolvConf, "q2q0", NS).unwrap();
        assert_eq!(mode, Mode::ResolvConf);
        assert_eq!(lab.file(), ours(ORIGINAL));
        assert_eq!(installed(&lab.paths), Some((Mode::ResolvConf, "q2q0".into(), NS)));
        assert_eq!(mode_of(&lab.paths.state_file()), 0o600);
        assert_eq!(mode_of(&lab.paths.backup_file()), 0o600);
        assert_eq!(mode_of(&lab.paths.resolv_conf), 0o644, "the file keeps its mode");
        assert_eq!(fs::read(lab.paths.backup_file()).unwrap(), ORIGINAL);

        let what = restore(&lab.paths).unwrap().unwrap();
        assert!(what.contains("restored"), "{what}");
        assert_eq!(lab.file(), ORIGINAL);
        lab.nothing_left();
        assert_eq!(restore(&lab.paths).unwrap(), None, "idempotent");
        assert_eq!(lab.file(), ORIGINAL);
        // Only our files in the state directory, and no temporary files beside resolv.conf.
        assert_eq!(fs::read_dir(&lab.paths.state_dir).unwrap().count(), 0);
        assert_eq!(fs::read_dir(lab.dir.path()).unwrap().count(), 2);
    }

    #[test]
    fn a_crashed_install_is_repaired_by_the_next() {
        let lab = Lab::with_file(ORIGINAL);
        install(&lab.paths, Wanted::ResolvConf, "q2q0", NS).unwrap();
        // Killed: nothing restored; the next `up` installs again over the leftovers.
        install(&lab.paths, Wanted::ResolvConf, "q2q0", NS).unwrap();
        assert_eq!(lab.file(), ours(ORIGINAL), "our lines appear once");
        assert!(restore(&lab.paths).unwrap().is_some());
        assert_eq!(lab.file(), ORIGINAL);
        lab.nothing_left();
    }

    #[test]
    fn lines_without_state_are_never_stacked() {
        // The state directory was lost while our lines stayed in the file.
        let lab = Lab::with_file(&ours(ORIGINAL));
        install(&lab.paths, Wanted::ResolvConf, "q2q0", NS).unwrap();
        assert_eq!(lab.file(), ours(ORIGINAL));
        restore(&lab.paths).unwrap();
        assert_eq!(lab.file(), ORIGINAL);
    }

    #[test]
    fn a_file_rewritten_by_someone_else_is_left_alone() {
        let lab = Lab::with_file(ORIGINAL);
        install(&lab.paths, Wanted::ResolvConf, "q2q0", NS).unwrap();
        fs::write(&lab.paths.resolv_conf, b"nameserver 127.0.9.9\n").unwrap();
        let what = restore(&lab.paths).unwrap().unwrap();
        assert!(what.contains("someone else"), "{what}");
        assert_eq!(lab.file(), b"nameserver 127.0.9.9\n");
        lab.nothing_left();
    }

    #[test]
    fn a_crash_before_the_file_changed_leaves_it_alone() {
        let lab = Lab::with_file(ORIGINAL);
        install(&lab.paths, Wanted::ResolvConf, "q2q0", NS).unwrap();
        // As if the daemon died after writing its state, before writing resolv.conf.
        fs::write(&lab.paths.resolv_conf, ORIGINAL).unwrap();
        let what = restore(&lab.paths).unwrap().unwrap();
        assert!(what.contains("still the original"), "{what}");
        assert_eq!(lab.file(), ORIGINAL);
        lab.nothing_left();
        // Died after the backup, before the state: nothing changed, the stray backup goes.
        fs::write(lab.paths.backup_file(), ORIGINAL).unwrap();
        assert_eq!(restore(&lab.paths).unwrap(), None);
        lab.nothing_left();
    }

    #[test]
    fn a_missing_file_is_created_and_removed() {
        let lab = Lab::new();
        install(&lab.paths, Wanted::ResolvConf, "q2q0", NS).unwrap();
        assert_eq!(lab.file(), ours(b""));
        assert_eq!(mode_of(&lab.paths.resolv_conf), 0o644);
        let what = restore(&lab.paths).unwrap().unwrap();
        assert!(what.contains("created"), "{what}");
        assert!(!lab.paths.resolv_conf.exists());
        lab.nothing_left();
    }

    #[test]
    fn a_damaged_or_missing_backup_is_not_written_back() {
        for damage in [true, false] {
            let lab = Lab::with_file(ORIGINAL);
            install(&lab.paths, Wanted::ResolvConf, "q2q0", NS).unwrap();
            if damage {
                fs::write(lab.paths.backup_file(), b"nameserver 127.0.6.6\n").unwrap();
            } else {
                fs::remove_file(lab.paths.backup_file()).unwrap();
            }
            let what = restore(&lab.paths).unwrap().unwrap();
            assert!(what.contains("missing or damaged"), "{what}");
            assert_eq!(lab.file(), ORIGINAL, "our two lines removed, the rest untouched");
            lab.nothing_left();
        }
    }

    #[test]
    fn an_unreadable_state_file_still_gets_our_lines_out() {
        let lab = Lab::with_file(&ours(ORIGINAL));
        fs::create_dir_all(&lab.paths.state_dir).unwrap();
        fs::write(lab.paths.state_file(), b"mode = [[[").unwrap();
        assert_eq!(installed(&lab.paths), None);
        let what = restore(&lab.paths).unwrap().unwrap();
        assert!(what.contains("unreadable"), "{what}");
        assert_eq!(lab.file(), ORIGINAL);
        assert!(lab.paths.state_dir.join("resolver.toml.unreadable").exists());
        lab.nothing_left();
    }

    #[test]
    fn symbolic_links_are_written_through() {
        let lab = Lab::new();
        let target = lab.dir.path().join("real-resolv.conf");
        fs::write(&target, ORIGINAL).unwrap();
        std::os::unix::fs::symlink("real-resolv.conf", &lab.paths.resolv_conf).unwrap();
        install(&lab.paths, Wanted::ResolvConf, "q2q0", NS).unwrap();
        assert!(fs::symlink_metadata(&lab.paths.resolv_conf).unwrap().file_type().is_symlink());
        assert_eq!(fs::read(&target).unwrap(), ours(ORIGINAL));
        restore(&lab.paths).unwrap();
        assert!(fs::symlink_metadata(&lab.paths.resolv_conf).unwrap().file_type().is_symlink());
        assert_eq!(fs::read(&target).unwrap(), ORIGINAL);

        // A dangling link: its target is created, then removed; the link stays.
        fs::remove_file(&target).unwrap();
        install(&lab.paths, Wanted::ResolvConf, "q2q0", NS).unwrap();
        assert_eq!(fs::read(&target).unwrap(), ours(b""));
        restore(&lab.paths).unwrap();
        assert!(!target.exists());
        assert!(fs::symlink_metadata(&lab.paths.resolv_conf).is_ok());
    }

    #[test]
    fn off_touches_nothing() {
        let lab = Lab::with_file(ORIGINAL);
        assert_eq!(install(&lab.paths, Wanted::Off, "q2q0", NS).unwrap(), Mode::Off);
        assert_eq!(lab.file(), ORIGINAL);
        assert_eq!(installed(&lab.paths), Some((Mode::Off, "q2q0".into(), NS)));
        assert_eq!(restore(&lab.paths).unwrap(), None);
        lab.nothing_left();
    }

    #[test]
    fn resolved_mode_runs_exactly_these_commands() {
        let lab = Lab::with_file(ORIGINAL);
        // Older systemd lacks default-route: its failure is not fatal.
        let log = lab.fake_resolvectl("[ \"$1\" = default-route ] && exit 1\nexit 0");
        let mode = install(&lab.paths, Wanted::Resolved, "q2qtest0", NS).unwrap();
        assert_eq!(mode, Mode::Resolved);
        assert_eq!(
            fs::read_to_string(&log).unwrap(),
            "dns q2qtest0 100.64.0.1\ndomain q2qtest0 ~q2q\ndefault-route q2qtest0 false\n"
        );
        assert_eq!(lab.file(), ORIGINAL, "resolv.conf untouched");
        assert_eq!(installed(&lab.paths), Some((Mode::Resolved, "q2qtest0".into(), NS)));
        assert_eq!(mode_of(&lab.paths.state_file()), 0o600);
        fs::remove_file(&log).unwrap();
        let what = restore(&lab.paths).unwrap().unwrap();
        assert!(what.contains("reverted"), "{what}");
        assert_eq!(fs::read_to_string(&log).unwrap(), "revert q2qtest0\n");
        lab.nothing_left();
    }

    #[test]
    fn resolved_failures_carry_stderr_and_leave_nothing() {
        let lab = Lab::new();
        let log = lab.fake_resolvectl(
            "[ \"$1\" = domain ] && { echo 'Failed to set domain: Access denied' >&2; exit 1; }\nexit 0",
        );
        let err = install(&lab.paths, Wanted::Resolved, "q2qtest0", NS).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("domain q2qtest0 ~q2q") && text.contains("Access denied"), "{text}");
        assert_eq!(
            fs::read_to_string(&log).unwrap(),
            "dns q2qtest0 100.64.0.1\ndomain q2qtest0 ~q2q\nrevert q2qtest0\n",
            "the half-done change is reverted"
        );
        lab.nothing_left();
    }

    #[test]
    fn revert_of_a_vanished_link_is_fine() {
        let lab = Lab::new();
        lab.fake_resolvectl(
            "[ \"$1\" = revert ] && { echo 'Failed to resolve interface \"q2qtest0\": No such device' >&2; exit 1; }\nexit 0",
        );
        install(&lab.paths, Wanted::Resolved, "q2qtest0", NS).unwrap();
        let what = restore(&lab.paths).unwrap().unwrap();
        assert!(what.contains("gone"), "{what}");
        lab.nothing_left();
    }

    #[test]
    fn detect_needs_the_stub_and_a_working_resolvectl() {
        let stub = b"nameserver 127.0.0.53\noptions edns0 trust-ad\nsearch .\n";
        let lab = Lab::with_file(stub);
        lab.fake_resolvectl("exit 0");
        assert_eq!(detect(&lab.paths), Mode::Resolved);
        lab.fake_resolvectl("exit 1");
        assert_eq!(detect(&lab.paths), Mode::ResolvConf);

        let lab = Lab::with_file(ORIGINAL);
        let log = lab.fake_resolvectl("exit 0");
        assert_eq!(detect(&lab.paths), Mode::ResolvConf);
        assert!(!log.exists(), "resolvectl is not even asked");

        // A link into resolved's run directory counts, whatever the file says.
        let lab = Lab::new();
        let run = lab.dir.path().join("run/systemd/resolve");
        fs::create_dir_all(&run).unwrap();
        fs::write(run.join("stub-resolv.conf"), ORIGINAL).unwrap();
        std::os::unix::fs::symlink(run.join("stub-resolv.conf"), &lab.paths.resolv_conf).unwrap();
        lab.fake_resolvectl("exit 0");
        assert_eq!(detect(&lab.paths), Mode::Resolved);
        assert_eq!(install(&lab.paths, Wanted::Auto, "q2qtest0", NS).unwrap(), Mode::Resolved);
        restore(&lab.paths).unwrap();

        // No resolvectl at all.
        let lab = Lab::with_file(stub);
        assert_eq!(detect(&lab.paths), Mode::ResolvConf);
        assert_eq!(install(&lab.paths, Wanted::Auto, "q2q0", NS).unwrap(), Mode::ResolvConf);
        restore(&lab.paths).unwrap();
        assert_eq!(lab.file(), stub);
    }

    #[test]
    fn a_hung_resolvectl_is_killed() {
        let lab = Lab::with_file(b"nameserver 127.0.0.53\n");
        lab.fake_resolvectl("sleep 30");
        let t = Instant::now();
        assert_eq!(detect(&lab.paths), Mode::ResolvConf);
        let took = t.elapsed();
        assert!(took >= DETECT_LIMIT && took < DETECT_LIMIT + Duration::from_secs(2), "{took:?}");
    }

    #[test]
    fn settings_checks_say_the_mode_and_whether_the_line_is_there() {
        let lab = Lab::with_file(ORIGINAL);
        let shim = SocketAddr::new(NS, 53);
        let checks = settings_checks(&lab.paths, "q2q0", shim);
        assert!(!checks[0].ok && checks[0].what.contains("not up"), "{checks:?}");

        install(&lab.paths, Wanted::ResolvConf, "q2q0", NS).unwrap();
        let checks = settings_checks(&lab.paths, "q2q0", shim);
        assert!(checks.iter().all(|c| c.ok), "{checks:?}");
        assert!(checks[0].what.contains("resolv-conf"), "{checks:?}");

        fs::write(&lab.paths.resolv_conf, ORIGINAL).unwrap();
        let checks = settings_checks(&lab.paths, "q2q0", shim);
        assert!(!checks[1].ok && checks[1].what.contains("no longer"), "{checks:?}");
        restore(&lab.paths).unwrap();
    }

    #[test]
    fn settings_checks_ask_resolvectl_in_resolved_mode() {
        let lab = Lab::new();
        lab.fake_resolvectl(
            "case \"$1 $#\" in\n 'dns 2') echo 'Link 9 (q2qtest0): 100.64.0.1';;\n 'domain 2') echo 'Link 9 (q2qtest0): ~q2q';;\nesac\nexit 0",
        );
        install(&lab.paths, Wanted::Resolved, "q2qtest0", NS).unwrap();
        let checks = settings_checks(&lab.paths, "q2qtest0", SocketAddr::new(NS, 53));
        assert!(checks.iter().all(|c| c.ok), "{checks:?}");
        assert!(checks[0].what.contains("resolved"), "{checks:?}");
        let elsewhere = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(100, 64, 0, 9)), 53);
        let checks = settings_checks(&lab.paths, "q2qtest0", elsewhere);
        assert!(checks.iter().any(|c| !c.ok && c.what.contains("shim answers")), "{checks:?}");
    }

    /// A shim stand-in on loopback: alice.q2q. has an address, other names do not exist.
    async fn tiny_shim() -> SocketAddr {
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = sock.recv_from(&mut buf).await {
                let q = Message::from_vec(&buf[..n]).unwrap();
                let mut r = Message::response(q.metadata.id, q.metadata.op_code);
                let name = q.queries[0].name().clone();
                r.add_query(q.queries[0].clone());
                if name.to_ascii() == "alice.q2q." {
                    r.add_answer(hickory_proto::rr::Record::from_rdata(
                        name,
                        5,
                        RData::A(hickory_proto::rr::rdata::A(Ipv4Addr::new(100, 64, 0, 2))),
                    ));
                } else {
                    r.metadata.response_code = ResponseCode::NXDomain;
                }
                // Noise first: a stray datagram must not be taken for the answer.
                sock.send_to(b"noise", from).await.unwrap();
                sock.send_to(&r.to_vec().unwrap(), from).await.unwrap();
            }
        });
        addr
    }

    #[tokio::test]
    async fn the_shim_is_asked_directly() {
        let shim = tiny_shim().await;
        let c = query_shim(shim, "alice.q2q").await;
        assert!(c.ok && c.what.contains("100.64.0.2"), "{c:?}");
        let c = query_shim(shim, "nobody.q2q").await;
        assert!(!c.ok && c.what.contains("NXDOMAIN"), "{c:?}");
        let c = query_shim(shim, "bad..name").await;
        assert!(!c.ok, "{c:?}");
    }

    #[tokio::test]
    async fn a_silent_shim_is_reported_in_bounded_time() {
        let silent = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let t = Instant::now();
        let c = query_shim(silent.local_addr().unwrap(), "alice.q2q").await;
        assert!(!c.ok && c.what.contains("did not answer"), "{c:?}");
        assert!(t.elapsed() < SHIM_LIMIT + Duration::from_secs(1), "{:?}", t.elapsed());
        drop(silent);
    }

    /// Someone else writes the file in place (as `cp` or `cat >` do).
    fn write_in_place_as_someone_else(p: &Path, bytes: &[u8]) {
        let mut f = OpenOptions::new().write(true).truncate(true).open(p).unwrap();
        f.write_all(bytes).unwrap();
    }

    /// Someone else renames a new file over it (as NetworkManager and dhclient do).
    fn rename_over_as_someone_else(p: &Path, bytes: &[u8]) {
        let tmp = p.with_extension("new");
        fs::write(&tmp, bytes).unwrap();
        fs::rename(&tmp, p).unwrap();
    }

    const THEIRS: &[u8] = b"# from NetworkManager\nnameserver 127.0.4.4\nsearch home\n";

    #[test]
    fn a_rewritten_file_gets_our_line_back_and_down_restores_theirs() {
        for rewrite in [write_in_place_as_someone_else, rename_over_as_someone_else] {
            let lab = Lab::with_file(ORIGINAL);
            install(&lab.paths, Wanted::ResolvConf, "q2q0", NS).unwrap();
            assert_eq!(repair(&lab.paths).unwrap(), None, "as we left it");
            rewrite(&lab.paths.resolv_conf, THEIRS);
            let what = repair(&lab.paths).unwrap().unwrap();
            assert!(what.contains("someone else"), "{what}");
            assert_eq!(lab.file(), ours(THEIRS));
            assert_eq!(repair(&lab.paths).unwrap(), None, "once");
            // Rewritten again, identically (dhclient on every lease renewal).
            rewrite(&lab.paths.resolv_conf, THEIRS);
            assert!(repair(&lab.paths).unwrap().is_some());
            assert_eq!(lab.file(), ours(THEIRS));
            let what = restore(&lab.paths).unwrap().unwrap();
            assert!(what.contains("restored"), "{what}");
            assert_eq!(lab.file(), THEIRS, "what they wrote last, byte for byte");
            lab.nothing_left();
        }
    }

    #[test]
    fn lines_added_after_ours_are_kept_and_a_removed_file_comes_back() {
        let lab = Lab::with_file(ORIGINAL);
        install(&lab.paths, Wanted::ResolvConf, "q2q0", NS).unwrap();
        // An edit that keeps our lines first: nothing to write, but `down` keeps the edit.
        let mut edited = ours(ORIGINAL);
        edited.extend_from_slice(b"\noptions rotate\n");
        fs::write(&lab.paths.resolv_conf, &edited).unwrap();
        let what = repair(&lab.paths).unwrap().unwrap();
        assert!(what.contains("kept"), "{what}");
        assert_eq!(lab.file(), edited);
        // Removed: written again; `down` then removes it, as nobody else has one.
        fs::remove_file(&lab.paths.resolv_conf).unwrap();
        assert!(repair(&lab.paths).unwrap().unwrap().contains("removed"));
        assert_eq!(lab.file(), ours(b""));
        restore(&lab.paths).unwrap();
        assert!(!lab.paths.resolv_conf.exists());
        lab.nothing_left();
        // A file we created that someone then writes: theirs stays at `down`.
        install(&lab.paths, Wanted::ResolvConf, "q2q0", NS).unwrap();
        rename_over_as_someone_else(&lab.paths.resolv_conf, THEIRS);
        repair(&lab.paths).unwrap().unwrap();
        restore(&lab.paths).unwrap();
        assert_eq!(lab.file(), THEIRS);
        lab.nothing_left();
        // Other modes: nothing to keep.
        install(&lab.paths, Wanted::Off, "q2q0", NS).unwrap();
        assert_eq!(repair(&lab.paths).unwrap(), None);
        assert!(keep(&lab.paths).unwrap().is_none());
        restore(&lab.paths).unwrap();
    }

    /// Polls (bounded) until the file starts with our lines.
    fn ours_again_within(p: &Path, limit: Duration) -> Option<Duration> {
        let t = Instant::now();
        while t.elapsed() < limit {
            if fs::read(p).ok().and_then(|b| shim_nameserver(&b)) == Some(NS) {
                return Some(t.elapsed());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    #[test]
    fn the_keeper_puts_our_line_back_within_a_second() {
        let lab = Lab::with_file(ORIGINAL);
        install(&lab.paths, Wanted::ResolvConf, "q2q0", NS).unwrap();
        let keeper = keep(&lab.paths).unwrap().expect("resolv-conf mode");
        for (how, rewrite) in [
            ("in place", write_in_place_as_someone_else as fn(&Path, &[u8])),
            ("renamed over", rename_over_as_someone_else),
        ] {
            rewrite(&lab.paths.resolv_conf, THEIRS);
            let took = ours_again_within(&lab.paths.resolv_conf, Duration::from_secs(2));
            let took = took.unwrap_or_else(|| panic!("{how}: our line is not back"));
            assert!(took < Duration::from_secs(1), "{how}: {took:?}");
            assert_eq!(lab.file(), ours(THEIRS), "{how}");
            println!("{how}: our line back after {took:?}");
        }
        keeper.stop();
        // Stopped: nothing writes the file any more, and `down` puts theirs back.
        rewrite_then_wait(&lab.paths.resolv_conf);
        assert_eq!(lab.file(), THEIRS);
        let what = restore(&lab.paths).unwrap().unwrap();
        assert!(what.contains("still the original"), "{what}");
        assert_eq!(lab.file(), THEIRS);
        lab.nothing_left();
    }

    fn rewrite_then_wait(p: &Path) {
        write_in_place_as_someone_else(p, THEIRS);
        std::thread::sleep(QUIET * 5);
    }

    #[test]
    fn the_file_under_a_bind_mount_is_found_in_mountinfo() {
        let info = "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n\
            420 22 8:1 /etc/netns/lt1-host-b/resolv.conf /etc/resolv.conf rw - ext4 /dev/sda1 rw\n\
            421 22 0:5 / /etc/hosts rw - tmpfs tmpfs rw\n\
            422 22 8:1 /etc/netns/my\\040ns/resolv.conf /etc/my\\040dir/resolv.conf rw - ext4 x rw\n";
        assert_eq!(
            mount_root(info, "/etc/resolv.conf"),
            Some(PathBuf::from("/etc/netns/lt1-host-b/resolv.conf"))
        );
        assert_eq!(mount_root(info, "/etc/hosts"), None, "a filesystem's own root");
        assert_eq!(mount_root(info, "/etc/passwd"), None);
        assert_eq!(
            mount_root(info, "/etc/my dir/resolv.conf"),
            Some(PathBuf::from("/etc/netns/my ns/resolv.conf"))
        );
        // A plain file is its own live file.
        let lab = Lab::with_file(ORIGINAL);
        assert_eq!(live_file(&lab.paths), lab.paths.resolv_conf);
    }

    #[test]
    fn helpers() {
        assert_eq!(shim_nameserver(&ours(ORIGINAL)), Some(NS));
        assert_eq!(shim_nameserver(ORIGINAL), None);
        assert_eq!(shim_nameserver(&ORIGINAL[ORIGINAL.len() - 10..]), None);
        assert_eq!(strip_ours(&ours(ORIGINAL)), ORIGINAL);
        assert_eq!(strip_ours(ORIGINAL), ORIGINAL);
        assert_eq!(strip_ours(&ours(b"")), b"");
        assert_eq!(unescape_mount("/etc/my\\040dir/resolv.conf"), "/etc/my dir/resolv.conf");
        assert_eq!(unescape_mount("/a\\b"), "/a\\b");
        assert!(is_mount_point(Path::new("/proc")));
        assert!(!is_mount_point(Path::new("/proc/self")));
        let t = "nameserver 127.0.1.1\n#nameserver 127.0.2.2\n  nameserver\t127.0.3.3 \nnameserver";
        assert_eq!(nameservers(t).collect::<Vec<_>>(), ["127.0.1.1", "127.0.3.3"]);
        assert_eq!(Mode::ResolvConf.as_str(), "resolv-conf");
        use clap::ValueEnum;
        assert_eq!(Wanted::from_str("resolv-conf", false), Ok(Wanted::ResolvConf));
    }
}
