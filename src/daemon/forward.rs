//! What the daemon does with services.toml: listen for each exposed service with its allow
//! list, and hand each accepted stream to its local target (a TCP address, UDP datagrams,
//! or the inbox).

use super::{DaemonError, datagram, services::Services};
use crate::client::Home;
use crate::presence::node::{Node, Policy};
use std::time::Duration;
use tracing::{info, warn};

/// Listen for every exposed service with its allow list, forwarding accepted streams to
/// the local target; stop listening for services no longer exposed. Called at start and on
/// each `reload`.
///
/// # Errors
/// services.toml unreadable ([`DaemonError::Home`]), or the server refused a listen
/// ([`DaemonError::Node`]).
pub async fn apply_services(node: &Node, home: &Home) -> Result<(), DaemonError> {
    let services = Services::load(home)?.parsed();
    for old in node.listening() {
        if old != crate::presence::node::ping_service()
            && !services.iter().any(|(s, _, _)| *s == old)
        {
            node.unlisten(&old).await?;
        }
    }
    for (service, to, allow) in services {
        let Some(to) = to else {
            let inbox = home.root().join("inbox");
            let mut accepted = node.listen(&service, "inbox", Policy::allow(allow)).await?;
            tokio::spawn(async move {
                while let Some(a) = accepted.recv().await {
                    // One folder per sender: nobody's files land among another's.
                    let dir = inbox.join(a.peer.to_string());
                    let opts = crate::transfer::ReceiveOptions { dir, overwrite: false };
                    tokio::spawn(async move {
                        match crate::transfer::receive(a.stream, &opts, &mut crate::transfer::Quiet)
                            .await
                        {
                            Ok(s) => {
                                info!(from = %a.peer, files = s.files, bytes = s.transferred, "received into the inbox")
                            }
                            Err(e) => warn!(from = %a.peer, error = %e, "transfer failed"),
                        }
                    });
                }
            });
            continue;
        };
        let mut accepted =
            node.listen(&service, &format!("forwarded to {to}"), Policy::allow(allow)).await?;
        let udp = service.as_str().starts_with("udp/");
        tokio::spawn(async move {
            while let Some(a) = accepted.recv().await {
                let service = service.clone();
                if udp {
                    tokio::spawn(async move {
                        info!(peer = %a.peer, %service, %to, "forwarding datagrams");
                        if let Err(e) = datagram::serve(a.stream, to).await {
                            warn!(peer = %a.peer, %service, %to, error = %e, "UDP flow ended");
                        }
                    });
                    continue;
                }
                tokio::spawn(async move {
                    let mut peer = a.stream;
                    // As on the TUN side: a program's replies (an sshd's echo) must not wait
                    // for Nagle behind a segment of up to 64 KiB (segmentation offload);
                    // the bridge writes bulk data in big pieces anyway.
                    peer.set_nodelay(true);
                    match tokio::time::timeout(
                        Duration::from_secs(5),
                        tokio::net::TcpStream::connect(to),
                    )
                    .await
                    {
                        Ok(Ok(mut local)) => {
                            info!(peer = %a.peer, %service, %to, "forwarding");
                            let _ = crate::pipe::bridge(&mut peer, &mut local).await;
                        }
                        _ => warn!(peer = %a.peer, %service, %to, "local target unreachable"),
                    }
                });
            }
        });
    }
    Ok(())
}
