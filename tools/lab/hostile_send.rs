//! A hostile sender, for the lab's end-to-end test: logs in as a real identity, connects to
//! a receiver's `file` service, and offers names that try to escape the target directory
//! (`..`, absolute, through a link planted in it). Prints the receiver's answer to each
//! offer; exits 0 if every one was refused (`refuse` for that file, or `stop`).
//!
//! Usage: hostile-send RECEIVER NAME... (with Q2Q_HOME set to the sender's state).

use q2q::amp::{AmpBox, AmpReader, write_box};
use q2q::client::Home;
use q2q::presence::node::{Node, NodeConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let to: q2q::address::Q2qAddress = args
        .next()
        .ok_or_else(|| anyhow::anyhow!("usage: hostile-send RECEIVER NAME..."))?
        .parse()?;
    let names: Vec<String> = args.collect();
    let home = Home::locate();
    let me = q2q::daemon::choose_identity(&home, None)?;
    let node = Node::start(home, me, NodeConfig::default()).await?;
    let mut all_refused = true;
    for name in names {
        let conn = node.connect(&to, &"file".parse()?).await?;
        let mut r = AmpReader::new(conn.stream);
        let hello = AmpBox::command("hello")
            .with("version", q2q::transfer::VERSION)
            .with("files", "1")
            .with("bytes", "5");
        write_box(r.get_mut(), &hello).await?;
        r.read_box().await?;
        let offer = AmpBox::command("offer").with("name", &name).with("size", "5");
        write_box(r.get_mut(), &offer).await?;
        let reply = r.read_box().await?.unwrap_or_default();
        let verdict = reply.get_str("_command").unwrap_or("(closed)");
        println!("{name}: {verdict} {}", reply.get_str("reason").unwrap_or(""));
        if verdict != "refuse" && verdict != "stop" {
            all_refused = false;
            // Try to write anyway, to see whether anything lands.
            let _ = write_box(r.get_mut(), &AmpBox::command("start").with("offset", "0")).await;
            let chunk = AmpBox::command("chunk")
                .with("len", "5")
                .with("hash", blake3::hash(b"evil\n").as_bytes().as_slice());
            let mut raw = chunk.encode()?;
            raw.extend_from_slice(b"evil\n");
            let _ = tokio::io::AsyncWriteExt::write_all(r.get_mut(), &raw).await;
            let _ = write_box(r.get_mut(), &AmpBox::command("end")).await;
        }
    }
    if !all_refused {
        anyhow::bail!("an escaping name was not refused");
    }
    Ok(())
}
