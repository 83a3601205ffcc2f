//! systemd-resolved's `resolvectl`, each call bounded in time.

use super::{Paths, ResolverError};
use crate::daemon::platform::command::{self, Ran, RunError};
use std::time::Duration;

/// `resolvectl status` must answer quickly for resolved to count as running.
pub(super) const DETECT_LIMIT: Duration = Duration::from_secs(2);
/// Each resolvectl command that changes or reads settings.
const COMMAND_LIMIT: Duration = Duration::from_secs(5);

/// Run `resolvectl args` within `limit`; its output whatever its exit status.
pub(super) async fn run(
    paths: &Paths,
    args: &[&str],
    limit: Duration,
) -> Result<Ran, ResolverError> {
    command::run_bounded(&paths.resolvectl, args, limit).await.map_err(|e| {
        let command = command::command_line(&paths.resolvectl, args);
        match e {
            RunError::Spawn(error) => ResolverError::Spawn { command, error },
            RunError::Timeout(limit) => ResolverError::Timeout { command, secs: limit.as_secs() },
        }
    })
}

/// Run `resolvectl args` (5 s at most); a failure carries what it said.
pub(super) async fn resolvectl(paths: &Paths, args: &[&str]) -> Result<Ran, ResolverError> {
    let ran = run(paths, args, COMMAND_LIMIT).await?;
    if ran.status.success() {
        return Ok(ran);
    }
    let said = match ran.stderr.trim() {
        "" => ran.stdout.trim(),
        s => s,
    };
    Err(ResolverError::Command {
        command: command::command_line(&paths.resolvectl, args),
        status: ran.status.to_string(),
        stderr: said.to_string(),
    })
}
