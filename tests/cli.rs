//! The binaries as a person uses them: exit codes, one-line errors, DNS SRV discovery, and a
//! server that refuses to start without its CA.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

const SERVER: &str = env!("CARGO_BIN_EXE_q2q-server");
const TUN: &str = env!("CARGO_BIN_EXE_q2q-tun");

/// A `q2q-server run` child on a free loopback port, killed on drop.
struct ServerProcess {
    child: Child,
    addr: String,
}

impl ServerProcess {
    fn start(data_dir: &Path) -> ServerProcess {
        let mut child = Command::new(SERVER)
            .args(["--data-dir", data_dir.to_str().unwrap(), "run", "--listen", "127.0.0.1:0"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        // "q2q-server for example.com listening on 127.0.0.1:PORT (tcp) and ..."
        let addr = line
            .split_whitespace()
            .nth(5)
            .unwrap_or_else(|| panic!("unexpected: {line}"))
            .to_string();
        ServerProcess { child, addr }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(cmd: &str, args: &[&str], home: &Path, envs: &[(&str, &str)]) -> Output {
    let mut c = Command::new(cmd);
    c.args(args)
        .env("Q2Q_HOME", home)
        .env("RUST_LOG", "off")
        .env_remove("Q2Q_PASSWORD")
        .stdin(Stdio::null());
    for (k, v) in envs {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Exactly one line on stderr, starting with `error: `, and a failing exit status.
fn one_line_error(o: &Output) -> String {
    assert!(!o.status.success(), "expected failure, got success: {}", stdout(o));
    let e = stderr(o);
    assert_eq!(e.lines().count(), 1, "one line expected: {e}");
    assert!(e.starts_with("error: "), "{e}");
    e
}

fn init(dir: &Path, domain: &str) -> Output {
    run(SERVER, &["--data-dir", dir.to_str().unwrap(), "init", "--domain", domain], dir, &[])
}

#[test]
fn register_errors_are_one_clear_line() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("srv");
    let home = t.path().join("home");
    assert!(init(&data, "example.com").status.success());
    let srv = ServerProcess::start(&data);
    let pw = [("Q2Q_PASSWORD", "a good password")];
    let reg = |a: &str, extra: &[&str], env: &[(&str, &str)]| {
        let mut args = vec!["register", a, "--server", &srv.addr];
        args.extend_from_slice(extra);
        run(TUN, &args, &home, env)
    };

    let ok = reg("alice@example.com", &[], &pw);
    assert!(ok.status.success(), "{}", stderr(&ok));
    assert!(stdout(&ok).contains("registered alice@example.com"));

    let e = one_line_error(&reg("alice@example.com", &[], &pw));
    assert!(e.contains("alice@example.com is taken"), "{e}");
    let e = one_line_error(&reg(
        "alice@example.com",
        &["--existing"],
        &[("Q2Q_PASSWORD", "not the password")],
    ));
    assert!(e.contains("alice@example.com: no such user or wrong password"), "{e}");
    // An unknown user gets the same answer: `sign` does not tell who has an account.
    let e = one_line_error(&reg("nobody@example.com", &["--existing"], &pw));
    assert!(e.contains("nobody@example.com: no such user or wrong password"), "{e}");
    let e = one_line_error(&reg("alice", &[], &pw));
    assert!(e.contains("not a q2q address"), "{e}");
    let e = one_line_error(&reg("alice@example.com", &[], &[]));
    assert!(e.contains("--password-file"), "{e}");
    let e = one_line_error(&run(
        TUN,
        &["register", "alice@example.com", "--server", "127.0.0.1:1"],
        &home,
        &pw,
    ));
    assert!(e.contains("example.com's server is unreachable (tried 127.0.0.1:1"), "{e}");

    // A server claiming example.com with another CA: stopped, with what changed and how to accept.
    let data2 = t.path().join("srv2");
    assert!(init(&data2, "example.com").status.success());
    let srv2 = ServerProcess::start(&data2);
    let e =
        one_line_error(&run(TUN, &["identify", "example.com", "--server", &srv2.addr], &home, &[]));
    assert!(
        e.contains("the CA of example.com has changed") && e.contains("--ca-fingerprint"),
        "{e}"
    );

    let who = run(TUN, &["whoami"], &home, &[]);
    assert!(stdout(&who).contains("alice@example.com"), "{}", stdout(&who));
    assert!(stdout(&who).contains("valid until"));
}

#[test]
fn server_refuses_to_start_without_its_ca() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("srv");
    assert!(init(&data, "example.com").status.success());
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(data.join("ca.key")).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let again = init(&data, "example.com");
    assert!(one_line_error(&again).contains("refusing to overwrite"));

    let add = run(
        SERVER,
        &["--data-dir", data.to_str().unwrap(), "user", "add", "alice"],
        t.path(),
        &[("Q2Q_PASSWORD", "a good password")],
    );
    assert!(add.status.success(), "{}", stderr(&add));
    std::fs::rename(data.join("ca.key"), t.path().join("ca.key.bak")).unwrap();
    let out = run(
        SERVER,
        &["--data-dir", data.to_str().unwrap(), "run", "--listen", "127.0.0.1:0"],
        t.path(),
        &[],
    );
    let e = one_line_error(&out);
    assert!(e.contains("ca.key") && e.contains("refusing to start"), "{e}");
    // Nothing was regenerated.
    assert!(!data.join("ca.key").exists());
}

#[test]
fn admin_verbs() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("srv");
    let d = data.to_str().unwrap();
    assert!(init(&data, "example.com").status.success());
    let pw = [("Q2Q_PASSWORD", "a good password")];
    assert!(
        run(SERVER, &["--data-dir", d, "user", "add", "alice"], t.path(), &pw).status.success()
    );
    assert!(
        one_line_error(&run(SERVER, &["--data-dir", d, "user", "add", "alice"], t.path(), &pw))
            .contains("exists")
    );
    assert!(
        run(SERVER, &["--data-dir", d, "user", "passwd", "alice"], t.path(), &pw).status.success()
    );
    let list = stdout(&run(SERVER, &["--data-dir", d, "user", "list"], t.path(), &[]));
    assert!(
        list.contains("1 users on example.com") && list.contains("alice@example.com"),
        "{list}"
    );
    let code = stdout(&run(SERVER, &["--data-dir", d, "invite", "create"], t.path(), &[]));
    assert_eq!(code.trim().len(), 32);
    assert!(
        run(SERVER, &["--data-dir", d, "user", "remove", "alice"], t.path(), &[]).status.success()
    );
    assert!(
        one_line_error(&run(SERVER, &["--data-dir", d, "user", "remove", "alice"], t.path(), &[]))
            .contains("not registered")
    );
    let info = stdout(&run(SERVER, &["--data-dir", d, "info"], t.path(), &[]));
    assert!(info.contains("CA fingerprint: sha256:"), "{info}");
}

#[test]
fn help_teaches() {
    for (bin, words) in [
        (TUN, &["register", "whoami", "identify"][..]),
        (SERVER, &["init", "run", "user", "invite"][..]),
    ] {
        let out = Command::new(bin).arg("--help").output().unwrap();
        let text = stdout(&out);
        for w in words {
            assert!(text.contains(w), "{bin} --help lacks {w}: {text}");
        }
    }
}

#[test]
fn server_found_through_dns_srv() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("srv");
    assert!(init(&data, "example.com").status.success());
    let srv = ServerProcess::start(&data);
    let port: u16 = srv.addr.rsplit(':').next().unwrap().parse().unwrap();
    let (dns, _asked) = common::srv_dns("_q2q._tcp.example.com.", port);
    let out = run(
        TUN,
        &["register", "alice@example.com"],
        &t.path().join("home"),
        &[("Q2Q_PASSWORD", "a good password"), ("Q2Q_DNS_SERVER", &dns.to_string())],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains(&format!("with localhost:{port}")), "{}", stdout(&out));
}

/// Without CAP_NET_ADMIN, `up` says what is missing and how to run it, before anything else
/// (no login, no identity needed). As root the capabilities are dropped with setpriv; a
/// root run without setpriv says it skipped.
#[test]
fn up_without_cap_net_admin_says_what_is_missing() {
    let home = tempfile::tempdir().unwrap();
    let is_root = nix::unistd::geteuid().is_root();
    let setpriv = std::path::Path::new("/usr/bin/setpriv");
    if is_root && !setpriv.exists() {
        eprintln!("SKIPPED: running as root and /usr/bin/setpriv (util-linux) is missing");
        return;
    }
    let mut c = if is_root {
        let mut c = Command::new(setpriv);
        c.args(["--inh-caps=-all", "--bounding-set=-all", "--", TUN]);
        c
    } else {
        Command::new(TUN)
    };
    let out = c
        .args(["up", "--foreground", "--server", "127.0.0.1:1"])
        .env("Q2Q_HOME", home.path())
        .env("RUST_LOG", "off")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(err.contains("CAP_NET_ADMIN") && err.contains("sudo q2q-tun up"), "{err}");
    assert!(err.contains("--no-tun"), "{err}");
}
