//! Running a system program (resolvectl) with a time limit: tokio's process and timer, and
//! the whole process group killed when the limit passes.

use std::io;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

/// How a bounded command ended.
#[derive(Debug)]
pub struct Ran {
    /// Its exit status.
    pub status: ExitStatus,
    /// What it wrote on stdout (lossy UTF-8, at most what it wrote before it ended).
    pub stdout: String,
    /// What it wrote on stderr (lossy UTF-8).
    pub stderr: String,
}

/// Why a bounded command did not run to its end.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The program could not be started or waited for.
    #[error("{0}")]
    Spawn(io::Error),
    /// It did not finish within the limit, and it and its process group were killed.
    #[error("did not finish within {} s", .0.as_secs())]
    Timeout(Duration),
}

/// `program args` as a person would type it, for messages.
pub fn command_line(program: &Path, args: &[&str]) -> String {
    let mut s = program.display().to_string();
    for a in args {
        s.push(' ');
        s.push_str(a);
    }
    s
}

/// Run `program args` with stdin closed; after `limit`, kill its whole process group (it
/// runs in one of its own: resolvectl waits on D-Bus, which may hang, and a script may have
/// children holding its pipes open).
pub async fn run_bounded(program: &Path, args: &[&str], limit: Duration) -> Result<Ran, RunError> {
    let mut tries = 0;
    let child = loop {
        let spawned = tokio::process::Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true)
            .spawn();
        match spawned {
            Ok(c) => break c,
            // Another thread's fork may briefly hold a just-written program open (ETXTBSY).
            Err(e) if e.kind() == io::ErrorKind::ExecutableFileBusy && tries < 20 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            Err(e) => return Err(RunError::Spawn(e)),
        }
    };
    let group = child.id().and_then(|id| i32::try_from(id).ok());
    match tokio::time::timeout(limit, child.wait_with_output()).await {
        Ok(Ok(out)) => Ok(Ran {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }),
        Ok(Err(e)) => Err(RunError::Spawn(e)),
        Err(_) => {
            // The child itself went with the dropped future (kill_on_drop); the rest of
            // its group goes here.
            if let Some(pid) = group {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            Err(RunError::Timeout(limit))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[tokio::test]
    async fn output_and_status_come_back() {
        let ran = run_bounded(
            Path::new("sh"),
            &["-c", "echo out; echo err >&2; exit 3"],
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!(ran.status.code(), Some(3));
        assert_eq!((ran.stdout.as_str(), ran.stderr.as_str()), ("out\n", "err\n"));
    }

    #[tokio::test]
    async fn a_hung_group_is_killed_at_the_limit() {
        let t = Instant::now();
        // The shell's child keeps the pipes open: killing the shell alone would not do.
        let e = run_bounded(Path::new("sh"), &["-c", "sleep 30; true"], Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(matches!(e, RunError::Timeout(_)), "{e:?}");
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        let e = run_bounded(Path::new("/nonexistent/program"), &[], Duration::from_secs(1)).await;
        assert!(matches!(e, Err(RunError::Spawn(_))), "{e:?}");
    }
}
