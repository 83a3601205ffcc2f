//! PTCP throughput benchmark, one run, under a minute: sealed PTCP (every datagram under the
//! session's keys, as peer sessions run), PTCP + TLS 1.3 on the stream, plain PTCP and kernel
//! TCP over loopback moving the same bytes, their ratio, and PTCP goodput in the
//! virtual-time simulator at 1 Gbit/s, 20 ms RTT with 1 % and 5 % random loss.
//!
//! `cargo run --release --example bench-ptcp [loopback MiB, default 1024] [simulated MiB, default 64]`
//! (`VERBOSE=1` prints the sender's session and endpoint counters.)
use std::net::SocketAddr;
use std::time::Instant;

use anyhow::Result;
use q2q::address::{Domain, Q2qAddress};
use q2q::identity::{DomainCa, generate_key, signing_request};
use q2q::ptcp::tls::{self, Identity, Trust, TrustMap};
use q2q::ptcp::{Config, Endpoint, EndpointConfig, SessionId};
use q2q_netstack::sim::{Link, LinkConfig, Pair, Transfer};
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const CHUNK: usize = 64 << 10;

async fn pump<W: AsyncWrite + Unpin>(mut w: W, bytes: u64) -> Result<()> {
    let buf = vec![0x5au8; CHUNK];
    let mut left = bytes;
    while left > 0 {
        let n = (left as usize).min(CHUNK);
        w.write_all(&buf[..n]).await?;
        left -= n as u64;
    }
    w.shutdown().await?;
    Ok(())
}

async fn drain<R: AsyncRead + Unpin>(mut r: R) -> Result<u64> {
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
    }
}

/// alice (accepting) and bob (dialing) at example.com.
#[derive(Clone)]
struct Ids {
    ca: CertificateDer<'static>,
    alice: Identity,
    bob: Identity,
    trust: Arc<dyn Trust>,
}

impl Ids {
    fn new() -> Result<Ids> {
        let domain = Domain::parse("example.com")?;
        let ca = DomainCa::generate(&domain)?;
        let user = |who: &str| -> Result<Identity> {
            let key = generate_key()?;
            let issued = ca.issue_user(
                &Q2qAddress::parse(who)?,
                &signing_request(&key)?,
                std::time::Duration::from_secs(3600),
            )?;
            Ok(Identity::new(
                vec![issued.der],
                PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
            )?)
        };
        Ok(Ids {
            alice: user("alice@example.com")?,
            bob: user("bob@example.com")?,
            trust: Arc::new(TrustMap::new().with_ca(domain, ca.cert_der().clone())),
            ca: ca.cert_der().clone(),
        })
    }
}

/// Each side of a run is its own thread with its own single-threaded tokio runtime, like two
/// peers in two processes: a side's driver and its application task share a thread and wake
/// each other without crossing cores; the sides meet only through the kernel's loopback.
fn side<T: Send + 'static>(
    f: impl FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<T>>>> + Send + 'static,
) -> std::thread::JoinHandle<Result<T>> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(f())
    })
}

/// How the bytes are protected.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Protect {
    /// Nothing: the raw transport.
    Plain,
    /// Every datagram sealed with session keys (what a peer session does).
    Sealed,
    /// TLS 1.3 on the stream, datagrams plain.
    Tls,
}

fn ptcp(bytes: u64, protect: Protect) -> Result<f64> {
    let tls = protect == Protect::Tls;
    let keys =
        q2q_netstack::seal::SessionKeys { initiator: rand::random(), responder: rand::random() };
    let (akeys, bkeys) = (keys.clone(), keys);
    let ids = Ids::new()?;
    let (ida, idb) = (ids.clone(), ids);
    let id = SessionId(rand::random());
    let (atx, arx) = std::sync::mpsc::channel::<SocketAddr>();
    let (btx, brx) = std::sync::mpsc::channel::<SocketAddr>();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let receiver = side(move || {
        Box::pin(async move {
            let b = Endpoint::bind("127.0.0.1:0".parse()?, EndpointConfig::default()).await?;
            btx.send(b.local_addr())?;
            let a_addr = arx.recv()?;
            let sb = b.accept(id, a_addr, Config::default()).await?;
            if protect == Protect::Sealed {
                sb.install_keys(bkeys, false).await;
            }
            let s = sb.accept().await?;
            let n = if tls {
                let (t, _) = tls::accept(s, &idb.alice, idb.trust.clone()).await?;
                drain(t).await?
            } else {
                drain(s).await?
            };
            let end = Instant::now();
            let _ = done_tx.send(());
            anyhow::Ok((n, end))
        })
    });
    let sender = side(move || {
        Box::pin(async move {
            let a = Endpoint::bind("127.0.0.1:0".parse()?, EndpointConfig::default()).await?;
            atx.send(a.local_addr())?;
            let b_addr = brx.recv()?;
            let sa = a.connect(id, b_addr, Config::default()).await?;
            if protect == Protect::Sealed {
                sa.install_keys(akeys, true).await;
            }
            let s = sa.open_stream().await?;
            let start = Instant::now();
            if tls {
                let alice = Q2qAddress::parse("alice@example.com")?;
                let t =
                    tls::connect(s, &ida.bob, &alice, ida.ca.clone(), tls::no_revocation()).await?;
                pump(t, bytes).await?;
            } else {
                pump(s, bytes).await?;
            }
            if std::env::var("VERBOSE").is_ok() {
                eprintln!("{:?}\n{:?}", sa.stats().await?, a.stats());
            }
            // Keep the session up until the receiver has everything.
            let _ = done_rx.await;
            anyhow::Ok(start)
        })
    });
    let (n, end) = receiver.join().map_err(|_| anyhow::anyhow!("receiver panicked"))??;
    let start = sender.join().map_err(|_| anyhow::anyhow!("sender panicked"))??;
    anyhow::ensure!(n == bytes, "received {n} of {bytes}");
    Ok(bytes as f64 * 8.0 / (end - start).as_secs_f64() / 1e9)
}

fn kernel_tcp(bytes: u64) -> Result<f64> {
    let (tx, rx) = std::sync::mpsc::channel::<SocketAddr>();
    let receiver = side(move || {
        Box::pin(async move {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            tx.send(l.local_addr()?)?;
            let (s, _) = l.accept().await?;
            let n = drain(s).await?;
            anyhow::Ok((n, Instant::now()))
        })
    });
    let sender = side(move || {
        Box::pin(async move {
            let s = tokio::net::TcpStream::connect(rx.recv()?).await?;
            let start = Instant::now();
            pump(s, bytes).await?;
            anyhow::Ok(start)
        })
    });
    let (n, end) = receiver.join().map_err(|_| anyhow::anyhow!("receiver panicked"))??;
    let start = sender.join().map_err(|_| anyhow::anyhow!("sender panicked"))??;
    anyhow::ensure!(n == bytes, "received {n} of {bytes}");
    Ok(bytes as f64 * 8.0 / (end - start).as_secs_f64() / 1e9)
}

/// PTCP + TLS with both endpoints and both application tasks on one shared 2-worker tokio
/// runtime (how a single process such as the daemon runs it): tasks hop between threads.
fn ptcp_tls_shared_runtime(bytes: u64) -> Result<f64> {
    let ids = Ids::new()?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let lo: SocketAddr = "127.0.0.1:0".parse()?;
        let a = Endpoint::bind(lo, EndpointConfig::default()).await?;
        let b = Endpoint::bind(lo, EndpointConfig::default()).await?;
        let id = SessionId(rand::random());
        let sb = b.accept(id, a.local_addr(), Config::default()).await?;
        let sa = a.connect(id, b.local_addr(), Config::default()).await?;
        let idb = ids.clone();
        let receiver = tokio::spawn(async move {
            let s = sb.accept().await?;
            let (t, _) = tls::accept(s, &idb.alice, idb.trust.clone()).await?;
            let n = drain(t).await?;
            anyhow::Ok((n, Instant::now()))
        });
        let s = sa.open_stream().await?;
        let start = Instant::now();
        let alice = Q2qAddress::parse("alice@example.com")?;
        let t = tls::connect(s, &ids.bob, &alice, ids.ca.clone(), tls::no_revocation()).await?;
        pump(t, bytes).await?;
        let (n, end) = receiver.await??;
        anyhow::ensure!(n == bytes, "received {n} of {bytes}");
        Ok(bytes as f64 * 8.0 / (end - start).as_secs_f64() / 1e9)
    })
}

/// Goodput of one stream (a to b) in the virtual-time simulator: 1 Gbit/s, 20 ms RTT,
/// `loss` random loss each way. Returns (Mbit/s, retransmitted / lost).
fn simulated(loss: f64, bytes: u64) -> Result<(f64, f64)> {
    use q2q_netstack::{Duration, Instant as SimInstant, Session, Side};
    let link = |seed| {
        let mut c = LinkConfig::new(Duration::from_millis(10), seed);
        c.loss = loss;
        c.bandwidth_bps = Some(1_000_000_000);
        c.queue_bytes = 2_500_000;
        Link::new(c)
    };
    let now = SimInstant::from_millis(0);
    let id = q2q_netstack::wire::SessionId(42);
    let a = Session::new(id, Side::Initiator, Config::default(), now);
    let b = Session::new(id, Side::Responder, Config::default(), now);
    let mut pair = Pair::new(a, b, link(1), link(2), now);
    let mut t = Transfer::start_one_way(&mut pair, 1, bytes)
        .map_err(|e| anyhow::anyhow!("open stream: {e}"))?;
    let start = pair.now;
    t.run(&mut pair, SimInstant::from_secs(600), |_, _, _| {})
        .map_err(|e| anyhow::anyhow!("simulated transfer: {e:?}"))?;
    let secs = (pair.now - start).total_micros() as f64 / 1e6;
    let lost = pair.ab.stats.lost();
    let retx = pair.a.stats().sender.retransmits;
    Ok((bytes as f64 * 8.0 / secs / 1e6, if lost > 0 { retx as f64 / lost as f64 } else { 0.0 }))
}

fn main() -> Result<()> {
    let mib: u64 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(1024);
    let sim_mib: u64 = std::env::args().nth(2).and_then(|a| a.parse().ok()).unwrap_or(64);
    let bytes = mib << 20;
    println!("{mib} MiB, one stream, each side a thread with its own tokio runtime");
    let sealed = ptcp(bytes, Protect::Sealed)?;
    println!("PTCP sealed (AES-256-GCM), MTU 1400:      {sealed:6.2} Gbit/s");
    let with_tls = ptcp(bytes, Protect::Tls)?;
    println!("PTCP + TLS 1.3, loopback UDP, MTU 1400:  {with_tls:6.2} Gbit/s");
    let shared = ptcp_tls_shared_runtime(bytes)?;
    println!("PTCP + TLS, one shared 2-worker runtime: {shared:6.2} Gbit/s");
    let plain = ptcp(bytes, Protect::Plain)?;
    println!("PTCP (no TLS), loopback UDP, MTU 1400:   {plain:6.2} Gbit/s");
    let tcp = kernel_tcp(bytes)?;
    println!("kernel TCP, loopback:                    {tcp:6.2} Gbit/s");
    println!("ratio PTCP sealed / kernel TCP:          {:6.2}", sealed / tcp);
    println!("ratio PTCP+TLS / kernel TCP:             {:6.2}", with_tls / tcp);
    println!("ratio PTCP / kernel TCP:                 {:6.2}", plain / tcp);
    for loss in [0.01, 0.05] {
        let wall = Instant::now();
        let (mbps, retx) = simulated(loss, sim_mib << 20)?;
        println!(
            "simulated 1 Gbit/s, 20 ms RTT, {:.0}% loss, {sim_mib} MiB: {mbps:6.1} Mbit/s goodput, retransmitted/lost {retx:.2} ({:.1} s wall)",
            loss * 100.0,
            wall.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
