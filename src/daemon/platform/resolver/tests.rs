//! The resolver's tests: a sandbox [`Paths`] per test, a fake resolvectl that logs its
//! arguments, and someone else rewriting resolv.conf.

use super::doctor::{SHIM_LIMIT, query_shim, settings_checks};
use super::file::{nameservers, strip_ours};
use super::resolvectl::DETECT_LIMIT;
use super::*;
use crate::daemon::platform::proc::{is_mount_point, mount_root, unescape_mount};
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RData;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

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

#[tokio::test]
async fn resolv_conf_round_trip_is_byte_exact() {
    let lab = Lab::with_file(ORIGINAL);
    fs::set_permissions(&lab.paths.resolv_conf, fs::Permissions::from_mode(0o644)).unwrap();
    let mode = install(&lab.paths, Wanted::ResolvConf, "q2q0", NS).await.unwrap();
    assert_eq!(mode, Mode::ResolvConf);
    assert_eq!(lab.file(), ours(ORIGINAL));
    assert_eq!(installed(&lab.paths), Some((Mode::ResolvConf, "q2q0".into(), NS)));
    assert_eq!(mode_of(&lab.paths.state_file()), 0o600);
    assert_eq!(mode_of(&lab.paths.backup_file()), 0o600);
    assert_eq!(mode_of(&lab.paths.resolv_conf), 0o644, "the file keeps its mode");
    assert_eq!(fs::read(lab.paths.backup_file()).unwrap(), ORIGINAL);

    let what = restore(&lab.paths).await.unwrap().unwrap();
    assert!(what.contains("restored"), "{what}");
    assert_eq!(lab.file(), ORIGINAL);
    lab.nothing_left();
    assert_eq!(restore(&lab.paths).await.unwrap(), None, "idempotent");
    assert_eq!(lab.file(), ORIGINAL);
    // Only our files in the state directory, and no temporary files beside resolv.conf.
    assert_eq!(fs::read_dir(&lab.paths.state_dir).unwrap().count(), 0);
    assert_eq!(fs::read_dir(lab.dir.path()).unwrap().count(), 2);
}

#[tokio::test]
async fn a_crashed_install_is_repaired_by_the_next() {
    let lab = Lab::with_file(ORIGINAL);
    install(&lab.paths, Wanted::ResolvConf, "q2q0", NS).await.unwrap();
    // Killed: nothing restored; the next `up` installs again over the leftovers.
    install(&lab.paths, Wanted::ResolvConf, "q2q0", NS).await.unwrap();
    assert_eq!(lab.file(), ours(ORIGINAL), "our lines appear once");
    assert!(restore(&lab.paths).await.unwrap().is_some());
    assert_eq!(lab.file(), ORIGINAL);
    lab.nothing_left();
}

#[tokio::test]
async fn lines_without_state_are_never_stacked() {
    // The state directory was lost while our lines stayed in the file.
    let lab = Lab::with_file(&ours(ORIGINAL));
    install(&lab.paths, Wanted::ResolvConf, "q2q0", NS).await.unwrap();
    assert_eq!(lab.file(), ours(ORIGINAL));
    restore(&lab.paths).await.unwrap();
    assert_eq!(lab.file(), ORIGINAL);
}

#[tokio::test]
async fn a_file_rewritten_by_someone_else_is_left_alone() {
    let lab = Lab::with_file(ORIGINAL);
    install(&lab.paths, Wanted::ResolvConf, "q2q0", NS).await.unwrap();
    fs::write(&lab.paths.resolv_conf, b"nameserver 127.0.9.9\n").unwrap();
    let what = restore(&lab.paths).await.unwrap().unwrap();
    assert!(what.contains("someone else"), "{what}");
    assert_eq!(lab.file(), b"nameserver 127.0.9.9\n");
    lab.nothing_left();
}

#[tokio::test]
async fn a_crash_before_the_file_changed_leaves_it_alone() {
    let lab = Lab::with_file(ORIGINAL);
    install(&lab.paths, Wanted::ResolvConf, "q2q0", NS).await.unwrap();
    // As if the daemon died after writing its state, before writing resolv.conf.
    fs::write(&lab.paths.resolv_conf, ORIGINAL).unwrap();
    let what = restore(&lab.paths).await.unwrap().unwrap();
    assert!(what.contains("still the original"), "{what}");
    assert_eq!(lab.file(), ORIGINAL);
    lab.nothing_left();
    // Died after the backup, before the state: nothing changed, the stray backup goes.
    fs::write(lab.paths.backup_file(), ORIGINAL).unwrap();
    assert_eq!(restore(&lab.paths).await.unwrap(), None);
    lab.nothing_left();
}

#[tokio::test]
async fn a_missing_file_is_created_and_removed() {
    let lab = Lab::new();
    install(&lab.paths, Wanted::ResolvConf, "q2q0", NS).await.unwrap();
    assert_eq!(lab.file(), ours(b""));
    assert_eq!(mode_of(&lab.paths.resolv_conf), 0o644);
    let what = restore(&lab.paths).await.unwrap().unwrap();
    assert!(what.contains("created"), "{what}");
    assert!(!lab.paths.resolv_conf.exists());
    lab.nothing_left();
}

#[tokio::test]
async fn a_damaged_or_missing_backup_is_not_written_back() {
    for damage in [true, false] {
        let lab = Lab::with_file(ORIGINAL);
        install(&lab.paths, Wanted::ResolvConf, "q2q0", NS).await.unwrap();
        if damage {
            fs::write(lab.paths.backup_file(), b"nameserver 127.0.6.6\n").unwrap();
        } else {
            fs::remove_file(lab.paths.backup_file()).unwrap();
        }
        let what = restore(&lab.paths).await.unwrap().unwrap();
        assert!(what.contains("missing or damaged"), "{what}");
        assert_eq!(lab.file(), ORIGINAL, "our two lines removed, the rest untouched");
        lab.nothing_left();
    }
}

#[tokio::test]
async fn an_unreadable_state_file_still_gets_our_lines_out() {
    let lab = Lab::with_file(&ours(ORIGINAL));
    fs::create_dir_all(&lab.paths.state_dir).unwrap();
    fs::write(lab.paths.state_file(), b"mode = [[[").unwrap();
    assert_eq!(installed(&lab.paths), None);
    let what = restore(&lab.paths).await.unwrap().unwrap();
    assert!(what.contains("unreadable"), "{what}");
    assert_eq!(lab.file(), ORIGINAL);
    assert!(lab.paths.state_dir.join("resolver.toml.unreadable").exists());
    lab.nothing_left();
}

#[tokio::test]
async fn symbolic_links_are_written_through() {
    let lab = Lab::new();
    let target = lab.dir.path().join("real-resolv.conf");
    fs::write(&target, ORIGINAL).unwrap();
    std::os::unix::fs::symlink("real-resolv.conf", &lab.paths.resolv_conf).unwrap();
    install(&lab.paths, Wanted::ResolvConf, "q2q0", NS).await.unwrap();
    assert!(fs::symlink_metadata(&lab.paths.resolv_conf).unwrap().file_type().is_symlink());
    assert_eq!(fs::read(&target).unwrap(), ours(ORIGINAL));
    restore(&lab.paths).await.unwrap();
    assert!(fs::symlink_metadata(&lab.paths.resolv_conf).unwrap().file_type().is_symlink());
    assert_eq!(fs::read(&target).unwrap(), ORIGINAL);

    // A dangling link: its target is created, then removed; the link stays.
    fs::remove_file(&target).unwrap();
    install(&lab.paths, Wanted::ResolvConf, "q2q0", NS).await.unwrap();
    assert_eq!(fs::read(&target).unwrap(), ours(b""));
    restore(&lab.paths).await.unwrap();
    assert!(!target.exists());
    assert!(fs::symlink_metadata(&lab.paths.resolv_conf).is_ok());
}

#[tokio::test]
async fn off_touches_nothing() {
    let lab = Lab::with_file(ORIGINAL);
    assert_eq!(install(&lab.paths, Wanted::Off, "q2q0", NS).await.unwrap(), Mode::Off);
    assert_eq!(lab.file(), ORIGINAL);
    assert_eq!(installed(&lab.paths), Some((Mode::Off, "q2q0".into(), NS)));
    assert_eq!(restore(&lab.paths).await.unwrap(), None);
    lab.nothing_left();
}

#[tokio::test]
async fn resolved_mode_runs_exactly_these_commands() {
    let lab = Lab::with_file(ORIGINAL);
    // Older systemd lacks default-route: its failure is not fatal.
    let log = lab.fake_resolvectl("[ \"$1\" = default-route ] && exit 1\nexit 0");
    let mode = install(&lab.paths, Wanted::Resolved, "q2qtest0", NS).await.unwrap();
    assert_eq!(mode, Mode::Resolved);
    assert_eq!(
        fs::read_to_string(&log).unwrap(),
        "dns q2qtest0 100.64.0.1\ndomain q2qtest0 ~q2q\ndefault-route q2qtest0 false\n"
    );
    assert_eq!(lab.file(), ORIGINAL, "resolv.conf untouched");
    assert_eq!(installed(&lab.paths), Some((Mode::Resolved, "q2qtest0".into(), NS)));
    assert_eq!(mode_of(&lab.paths.state_file()), 0o600);
    fs::remove_file(&log).unwrap();
    let what = restore(&lab.paths).await.unwrap().unwrap();
    assert!(what.contains("reverted"), "{what}");
    assert_eq!(fs::read_to_string(&log).unwrap(), "revert q2qtest0\n");
    lab.nothing_left();
}

#[tokio::test]
async fn resolved_failures_carry_stderr_and_leave_nothing() {
    let lab = Lab::new();
    let log = lab.fake_resolvectl(
        "[ \"$1\" = domain ] && { echo 'Failed to set domain: Access denied' >&2; exit 1; }\nexit 0",
    );
    let err = install(&lab.paths, Wanted::Resolved, "q2qtest0", NS).await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("domain q2qtest0 ~q2q") && text.contains("Access denied"), "{text}");
    assert_eq!(
        fs::read_to_string(&log).unwrap(),
        "dns q2qtest0 100.64.0.1\ndomain q2qtest0 ~q2q\nrevert q2qtest0\n",
        "the half-done change is reverted"
    );
    lab.nothing_left();
}

#[tokio::test]
async fn revert_of_a_vanished_link_is_fine() {
    let lab = Lab::new();
    lab.fake_resolvectl(
        "[ \"$1\" = revert ] && { echo 'Failed to resolve interface \"q2qtest0\": No such device' >&2; exit 1; }\nexit 0",
    );
    install(&lab.paths, Wanted::Resolved, "q2qtest0", NS).await.unwrap();
    let what = restore(&lab.paths).await.unwrap().unwrap();
    assert!(what.contains("gone"), "{what}");
    lab.nothing_left();
}

#[tokio::test]
async fn detect_needs_the_stub_and_a_working_resolvectl() {
    let stub = b"nameserver 127.0.0.53\noptions edns0 trust-ad\nsearch .\n";
    let lab = Lab::with_file(stub);
    lab.fake_resolvectl("exit 0");
    assert_eq!(detect(&lab.paths).await, Mode::Resolved);
    lab.fake_resolvectl("exit 1");
    assert_eq!(detect(&lab.paths).await, Mode::ResolvConf);

    let lab = Lab::with_file(ORIGINAL);
    let log = lab.fake_resolvectl("exit 0");
    assert_eq!(detect(&lab.paths).await, Mode::ResolvConf);
    assert!(!log.exists(), "resolvectl is not even asked");

    // A link into resolved's run directory counts, whatever the file says.
    let lab = Lab::new();
    let run = lab.dir.path().join("run/systemd/resolve");
    fs::create_dir_all(&run).unwrap();
    fs::write(run.join("stub-resolv.conf"), ORIGINAL).unwrap();
    std::os::unix::fs::symlink(run.join("stub-resolv.conf"), &lab.paths.resolv_conf).unwrap();
    lab.fake_resolvectl("exit 0");
    assert_eq!(detect(&lab.paths).await, Mode::Resolved);
    assert_eq!(install(&lab.paths, Wanted::Auto, "q2qtest0", NS).await.unwrap(), Mode::Resolved);
    restore(&lab.paths).await.unwrap();

    // No resolvectl at all.
    let lab = Lab::with_file(stub);
    assert_eq!(detect(&lab.paths).await, Mode::ResolvConf);
    assert_eq!(install(&lab.paths, Wanted::Auto, "q2q0", NS).await.unwrap(), Mode::ResolvConf);
    restore(&lab.paths).await.unwrap();
    assert_eq!(lab.file(), stub);
}

#[tokio::test]
async fn a_hung_resolvectl_is_killed() {
    let lab = Lab::with_file(b"nameserver 127.0.0.53\n");
    lab.fake_resolvectl("sleep 30");
    let t = Instant::now();
    assert_eq!(detect(&lab.paths).await, Mode::ResolvConf);
    let took = t.elapsed();
    assert!(took >= DETECT_LIMIT && took < DETECT_LIMIT + Duration::from_secs(2), "{took:?}");
}

#[tokio::test]
async fn settings_checks_say_the_mode_and_whether_the_line_is_there() {
    let lab = Lab::with_file(ORIGINAL);
    let shim = SocketAddr::new(NS, 53);
    let checks = settings_checks(&lab.paths, "q2q0", shim).await;
    assert!(!checks[0].ok && checks[0].what.contains("not up"), "{checks:?}");

    install(&lab.paths, Wanted::ResolvConf, "q2q0", NS).await.unwrap();
    let checks = settings_checks(&lab.paths, "q2q0", shim).await;
    assert!(checks.iter().all(|c| c.ok), "{checks:?}");
    assert!(checks[0].what.contains("resolv-conf"), "{checks:?}");

    fs::write(&lab.paths.resolv_conf, ORIGINAL).unwrap();
    let checks = settings_checks(&lab.paths, "q2q0", shim).await;
    assert!(!checks[1].ok && checks[1].what.contains("no longer"), "{checks:?}");
    restore(&lab.paths).await.unwrap();
}

#[tokio::test]
async fn settings_checks_ask_resolvectl_in_resolved_mode() {
    let lab = Lab::new();
    lab.fake_resolvectl(
        "case \"$1 $#\" in\n 'dns 2') echo 'Link 9 (q2qtest0): 100.64.0.1';;\n 'domain 2') echo 'Link 9 (q2qtest0): ~q2q';;\nesac\nexit 0",
    );
    install(&lab.paths, Wanted::Resolved, "q2qtest0", NS).await.unwrap();
    let checks = settings_checks(&lab.paths, "q2qtest0", SocketAddr::new(NS, 53)).await;
    assert!(checks.iter().all(|c| c.ok), "{checks:?}");
    assert!(checks[0].what.contains("resolved"), "{checks:?}");
    let elsewhere = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(100, 64, 0, 9)), 53);
    let checks = settings_checks(&lab.paths, "q2qtest0", elsewhere).await;
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

#[tokio::test]
async fn a_rewritten_file_gets_our_line_back_and_down_restores_theirs() {
    for rewrite in [write_in_place_as_someone_else, rename_over_as_someone_else] {
        let lab = Lab::with_file(ORIGINAL);
        install(&lab.paths, Wanted::ResolvConf, "q2q0", NS).await.unwrap();
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
        let what = restore(&lab.paths).await.unwrap().unwrap();
        assert!(what.contains("restored"), "{what}");
        assert_eq!(lab.file(), THEIRS, "what they wrote last, byte for byte");
        lab.nothing_left();
    }
}

#[tokio::test]
async fn lines_added_after_ours_are_kept_and_a_removed_file_comes_back() {
    let lab = Lab::with_file(ORIGINAL);
    install(&lab.paths, Wanted::ResolvConf, "q2q0", NS).await.unwrap();
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
    restore(&lab.paths).await.unwrap();
    assert!(!lab.paths.resolv_conf.exists());
    lab.nothing_left();
    // A file we created that someone then writes: theirs stays at `down`.
    install(&lab.paths, Wanted::ResolvConf, "q2q0", NS).await.unwrap();
    rename_over_as_someone_else(&lab.paths.resolv_conf, THEIRS);
    repair(&lab.paths).unwrap().unwrap();
    restore(&lab.paths).await.unwrap();
    assert_eq!(lab.file(), THEIRS);
    lab.nothing_left();
    // Other modes: nothing to keep.
    install(&lab.paths, Wanted::Off, "q2q0", NS).await.unwrap();
    assert_eq!(repair(&lab.paths).unwrap(), None);
    assert!(keep(&lab.paths).unwrap().is_none());
    restore(&lab.paths).await.unwrap();
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

#[tokio::test]
async fn the_keeper_puts_our_line_back_within_a_second() {
    let lab = Lab::with_file(ORIGINAL);
    install(&lab.paths, Wanted::ResolvConf, "q2q0", NS).await.unwrap();
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
    let what = restore(&lab.paths).await.unwrap().unwrap();
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
