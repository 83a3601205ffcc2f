//! `q2q-tun receive`: wait for files and accept them, from anyone or from named people.

use super::{DaemonError, choose_identity, send::file_service};
use crate::address::Q2qAddress;
use crate::cli::Bar;
use crate::client::Home;
use crate::presence::node::{Node, NodeConfig, Policy};
use crate::transfer;
use std::path::PathBuf;

/// What to accept and where it goes.
#[derive(Debug, Clone)]
pub struct ReceiveOptions {
    /// Accept only from these (empty: from anyone who sends).
    pub from: Vec<Q2qAddress>,
    /// Where files go (created if missing).
    pub dir: PathBuf,
    /// Replace existing files with other content (else `name (1).ext`).
    pub overwrite: bool,
    /// Keep receiving after the first transfer that ends well.
    pub keep: bool,
}

/// Listen for `file` streams as `me` (or the only identity stored) and receive each into
/// `opts.dir`, transfers side by side, until the first one ends well (or, with
/// `opts.keep`, until the node stops listening). Says on stderr that it waits, whom it
/// refused and which transfers failed; prints each received transfer on stdout.
///
/// # Errors
/// No identity, or the node could not start or listen.
pub async fn receive(
    home: &Home,
    me: Option<&Q2qAddress>,
    opts: ReceiveOptions,
) -> Result<(), DaemonError> {
    let ReceiveOptions { from, dir, overwrite, keep } = opts;
    let policy = if from.is_empty() { Policy::anyone() } else { Policy::allow(from.clone()) };
    let me = choose_identity(home, me)?;
    let node = Node::start(home.clone(), me.clone(), NodeConfig::default()).await?;
    let mut refused = node.refusals();
    let mut accepted = node.listen(&file_service(), "q2q-tun receive", policy).await?;
    let who = if from.is_empty() {
        "anyone".to_string()
    } else {
        from.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
    };
    eprintln!("{me} is waiting for files from {who} into {} (Ctrl-C to stop)", dir.display());
    // Transfers run side by side: one whose sender vanished (and which only times out after
    // the session does) never holds up the next, e.g. its resumption.
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel(16);
    loop {
        tokio::select! {
            Ok((peer, service)) = refused.recv() => eprintln!("refused {peer}: not authorized for {service}"),
            a = accepted.recv() => {
                let Some(a) = a else { break };
                let opts = transfer::ReceiveOptions { dir: dir.clone(), overwrite };
                let done_tx = done_tx.clone();
                tokio::spawn(async move {
                    let started = std::time::Instant::now();
                    let result = transfer::receive(a.stream, &opts, &mut Bar::new("receiving")).await;
                    let _ = done_tx.send((a.peer, result, started.elapsed())).await;
                });
            }
            Some((peer, result, took)) = done_rx.recv() => match result {
                Ok(s) => {
                    crate::outln!(
                        "received {} from {peer} in {:.1} s into {}",
                        s.line("transferred"), took.as_secs_f64(), dir.display()
                    );
                    for (offered, saved) in &s.renamed {
                        crate::outln!("{offered} saved as {saved} (the name was taken by other content)");
                    }
                    for r in &s.refused {
                        eprintln!("refused: {}", r.reason);
                    }
                    if !keep {
                        break;
                    }
                }
                Err(e) => eprintln!("error: transfer from {peer} failed: {e}"),
            },
        }
    }
    Ok(())
}
