//! Helpers for loopback integration tests: a server in a temporary data directory, bound
//! to 127.0.0.1 on a free port.
#![allow(dead_code)]

use q2q::address::{Domain, Q2qAddress};
use q2q::client::{ConnectOptions, Home};
use q2q::server::{self, DataDir, Registration, ServerConfig};
use std::path::PathBuf;
use std::time::Duration;

pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub running: Option<server::Running>,
    pub config: ServerConfig,
}

/// A server on 127.0.0.1 that may fetch other domains' CAs from loopback servers (a real
/// server refuses loopback by default: `federation_allow`).
pub fn loopback_config(registration: Registration) -> ServerConfig {
    ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        registration,
        federation_allow: vec![server::config::Network::parse("127.0.0.0/8").unwrap()],
        ..Default::default()
    }
}

impl TestServer {
    pub async fn start(domain: &str, config: ServerConfig) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let d = DataDir::init(&dir.path().join("srv"), &Domain::parse(domain).unwrap(), &config)
            .unwrap();
        let running = server::start(d, config.clone()).await.unwrap();
        TestServer { dir, running: Some(running), config }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("srv")
    }

    pub fn addr(&self) -> String {
        self.running.as_ref().unwrap().tcp_addr.to_string()
    }

    pub fn opts(&self) -> ConnectOptions {
        ConnectOptions { server: Some(self.addr()), ..Default::default() }
    }

    /// Stop and start again from the same data directory, on the same port.
    pub async fn restart(&mut self) {
        let old = self.running.take().unwrap();
        let port = old.tcp_addr.port();
        old.shutdown().await;
        let mut config = self.config.clone();
        config.listen.set_port(port);
        let d = DataDir::open(&self.data_dir()).unwrap();
        self.running = Some(server::start(d, config).await.unwrap());
    }
}

pub fn home() -> (tempfile::TempDir, Home) {
    let d = tempfile::tempdir().unwrap();
    let h = Home::new(d.path().join("q2q"));
    (d, h)
}

pub fn addr(s: &str) -> Q2qAddress {
    Q2qAddress::parse(s).unwrap()
}

/// The password of every test identity.
pub const PW: &str = "correct horse battery";

/// Register `who` with `srv` and bring a node online for it (loopback candidates on, so two
/// nodes on this machine can go direct).
pub async fn node(
    srv: &TestServer,
    home: &Home,
    who: &str,
    config: q2q::presence::node::NodeConfig,
) -> q2q::presence::node::Node {
    let a = addr(who);
    q2q::client::register(home, &a, PW, None, false, &srv.opts()).await.unwrap();
    let config = q2q::presence::node::NodeConfig {
        include_loopback: true,
        server: ConnectOptions { server: Some(srv.addr()), ..Default::default() },
        ..config
    };
    q2q::presence::node::Node::start(home.clone(), a, config).await.unwrap()
}

/// `node` offers service `echo` to `allowed` only, echoing every stream (then FIN).
pub async fn serve_echo(
    node: &q2q::presence::node::Node,
    allowed: &[&str],
) -> q2q::address::ServiceName {
    use q2q::presence::node::Policy;
    let echo = q2q::address::ServiceName::parse("echo").unwrap();
    let mut accepted =
        node.listen(&echo, "echo", Policy::allow(allowed.iter().map(|a| addr(a)))).await.unwrap();
    tokio::spawn(async move {
        while let Some(a) = accepted.recv().await {
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                let (mut r, mut w) = tokio::io::split(a.stream);
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    echo
}

/// Register `who` and return a logged-in control connection to its server.
pub async fn login(srv: &TestServer, home: &Home, who: &str) -> q2q::client::ServerConn {
    let a = addr(who);
    q2q::client::register(home, &a, PW, None, false, &srv.opts()).await.unwrap();
    let id = std::sync::Arc::new(home.identity(&a).unwrap());
    let opts = ConnectOptions { login: Some(id), ..srv.opts() };
    q2q::client::ServerConn::connect(home, &a.domain, &opts).await.unwrap()
}

/// A DNS server on loopback answering `name SRV 0 0 port localhost.` (NXDOMAIN for
/// anything else) and counting the questions.
pub fn srv_dns(
    name: &'static str,
    port: u16,
) -> (std::net::SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use hickory_proto::op::{Message, ResponseCode};
    use hickory_proto::rr::rdata::SRV;
    use hickory_proto::rr::{Name, RData, Record, RecordType};
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_secs(20))).unwrap();
    let addr = sock.local_addr().unwrap();
    let asked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = asked.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            let Ok(q) = Message::from_vec(&buf[..n]) else { continue };
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut r = Message::response(q.metadata.id, q.metadata.op_code);
            r.metadata.authoritative = true;
            r.metadata.recursion_desired = q.metadata.recursion_desired;
            if let Some(query) = q.queries.first() {
                r.add_query(query.clone());
                let wanted = query.name.to_ascii().eq_ignore_ascii_case(name);
                if wanted && query.query_type == RecordType::SRV {
                    let srv = SRV::new(0, 0, port, Name::from_ascii("localhost.").unwrap());
                    r.add_answer(Record::from_rdata(query.name.clone(), 60, RData::SRV(srv)));
                } else if !wanted {
                    r.metadata.response_code = ResponseCode::NXDomain;
                }
            }
            let _ = sock.send_to(&r.to_vec().unwrap(), from);
        }
    });
    (addr, asked)
}

/// Wait until `cond` holds, polling every 50 ms; false after `limit`.
pub async fn eventually<F: std::future::Future<Output = bool>>(
    limit: Duration,
    mut cond: impl FnMut() -> F,
) -> bool {
    let start = tokio::time::Instant::now();
    while start.elapsed() < limit {
        if cond().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cond().await
}

/// The serial of `who`'s stored certificate.
pub fn serial(home: &Home, who: &str) -> String {
    let id = home.identity(&addr(who)).unwrap();
    let der = q2q::identity::cert_from_pem(&id.cert_pem).unwrap();
    q2q::identity::CertInfo::parse(&der).unwrap().serial
}

/// Servers `a` (of domain `a_domain`) and `b` find each other from their federation
/// config (`[servers]`), and so each other's CA, on loopback.
pub fn federate_servers(a: &TestServer, a_domain: &str, b: &TestServer, b_domain: &str) {
    for (s, other, at) in [(a, b_domain, b), (b, a_domain, a)] {
        let fed = s.data_dir().join("federation");
        std::fs::create_dir_all(&fed).unwrap();
        std::fs::write(
            fed.join("config.toml"),
            format!("[servers]\n\"{other}\" = \"{}\"\n", at.addr()),
        )
        .unwrap();
    }
}

/// GET /metrics from `at`: each sample line as (name with labels, value).
pub async fn scrape_metrics(at: std::net::SocketAddr) -> std::collections::HashMap<String, f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(at).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut body))
        .await
        .unwrap()
        .unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    body.lines()
        .filter(|l| l.starts_with("q2q_"))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

pub fn metric(m: &std::collections::HashMap<String, f64>, k: &str) -> f64 {
    *m.get(k).unwrap_or_else(|| panic!("no {k} in {m:?}"))
}
