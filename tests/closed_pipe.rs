//! Both binaries end quietly when their reader has gone (`q2q-server user list | head -1`):
//! no panic, no backtrace.

use std::process::{Command, Output, Stdio};

const SERVER: &str = env!("CARGO_BIN_EXE_q2q-server");
const TUN: &str = env!("CARGO_BIN_EXE_q2q-tun");

/// Run `cmd` with a stdout whose reading end is closed already: its first write fails
/// with EPIPE.
fn into_closed_pipe(cmd: &mut Command) -> Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    cmd.env("RUST_LOG", "off")
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

fn assert_quiet(o: &Output) {
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{:?}: {stderr}", o.status);
    assert!(stderr.is_empty(), "{stderr}");
}

#[test]
fn server_user_list_into_a_closed_pipe() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("srv");
    let dir = dir.to_str().unwrap();
    let init = Command::new(SERVER)
        .args(["--data-dir", dir, "init", "--domain", "example.com"])
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    assert!(init.status.success());
    assert_quiet(&into_closed_pipe(Command::new(SERVER).args(["--data-dir", dir, "user", "list"])));
    assert_quiet(&into_closed_pipe(Command::new(SERVER).args(["--data-dir", dir, "info"])));
}

#[test]
fn tun_output_into_a_closed_pipe() {
    let t = tempfile::tempdir().unwrap();
    let o = into_closed_pipe(Command::new(TUN).arg("whoami").env("Q2Q_HOME", t.path()));
    assert_quiet(&o);
    let o = into_closed_pipe(Command::new(TUN).arg("services").env("Q2Q_HOME", t.path()));
    assert_quiet(&o);
}
