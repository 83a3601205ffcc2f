//! `q2q-tun send`: files and directories to a person, from a node of its own.

use super::{DaemonError, choose_identity};
use crate::address::{Q2qAddress, ServiceName};
use crate::cli::Bar;
use crate::client::Home;
use crate::presence::node::{Node, NodeConfig};
use crate::transfer::{self, TransferError};
use std::path::PathBuf;

/// Why `send` failed.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No identity, or the node could not start or reach the person.
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    /// A local file could not be read, or the transfer broke.
    #[error(transparent)]
    Transfer(#[from] TransferError),
    /// The receiver refused some files (each was printed with its reason).
    #[error("{refused} of {offered} refused by the receiver")]
    Refused {
        /// How many were refused.
        refused: usize,
        /// How many files and directories were offered.
        offered: usize,
    },
}

impl From<crate::presence::node::NodeError> for SendError {
    fn from(e: crate::presence::node::NodeError) -> Self {
        SendError::Daemon(e.into())
    }
}

/// Send `files` (directories whole) to `to` as `me` (or the only identity stored) over a
/// `file` stream, with a progress bar on a terminal. Prints the summary on stdout (`sent …
/// to … in … s over PATH`, then each renamed file) and each refused file on stderr.
///
/// # Errors
/// See [`SendError`]; a transfer with refused files is an error after it ends.
pub async fn send(
    home: &Home,
    to: &Q2qAddress,
    files: &[PathBuf],
    me: Option<&Q2qAddress>,
) -> Result<(), SendError> {
    let files = transfer::collect(files)?;
    let me = choose_identity(home, me)?;
    let node = Node::start(home.clone(), me, NodeConfig::default()).await?;
    let conn = node.connect(to, &file_service()).await?;
    let started = std::time::Instant::now();
    let summary = transfer::send(conn.stream, &files, &mut Bar::new("sending")).await?;
    let path = node.status().last().map(|p| p.path.to_string()).unwrap_or_default();
    node.leave().await;
    crate::outln!(
        "sent {} to {to} in {:.1} s over {path}",
        summary.line("sent"),
        started.elapsed().as_secs_f64()
    );
    for (offered, saved) in &summary.renamed {
        crate::outln!("{offered} arrived as {saved} (the name was taken by other content)");
    }
    for r in &summary.refused {
        eprintln!("not sent: {}", r.reason);
    }
    if !summary.refused.is_empty() {
        return Err(SendError::Refused {
            refused: summary.refused.len(),
            offered: summary.files + summary.dirs,
        });
    }
    Ok(())
}

/// The service files travel on.
pub fn file_service() -> ServiceName {
    ServiceName::parse("file").expect("`file` is a valid service name")
}
