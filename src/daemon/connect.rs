//! `q2q-tun connect`: a person's service joined to stdin and stdout (ssh's ProxyCommand).

use super::{DaemonError, choose_identity};
use crate::address::{Q2qAddress, ServiceName};
use crate::client::Home;
use crate::presence::node::{Node, NodeConfig};

/// Connect as `me` (or the only identity stored) to `service` of `to` from a node of its
/// own, then copy stdin to the stream (half-closing it when stdin ends) and the stream to
/// stdout until the peer ends it; then leave, so the peer ends the session at once.
///
/// # Errors
/// No identity, or the node could not start or reach the service.
pub async fn connect(
    home: &Home,
    to: &Q2qAddress,
    service: &ServiceName,
    me: Option<&Q2qAddress>,
) -> Result<(), DaemonError> {
    let me = choose_identity(home, me)?;
    let node = Node::start(home.clone(), me, NodeConfig::default()).await?;
    let conn = node.connect(to, service).await?;
    let (mut r, mut w) = tokio::io::split(conn.stream);
    // stdin to the peer; when stdin ends, half-close and keep reading.
    let up = tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let _ = tokio::io::copy(&mut stdin, &mut w).await;
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut w).await;
    });
    let mut stdout = tokio::io::stdout();
    let _ = tokio::io::copy(&mut r, &mut stdout).await;
    let _ = tokio::io::AsyncWriteExt::flush(&mut stdout).await;
    up.abort();
    // The peer ends the session now rather than watching it go silent.
    node.leave().await;
    Ok(())
}
