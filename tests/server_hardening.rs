//! The identity server under attack, on loopback: a stranger who tries to make it connect
//! somewhere, one address holding connections open, a registration flood, user
//! enumeration through `sign` and `exists`, and an argument too long to echo.

mod common;

use common::{PW, TestServer, addr, loopback_config};
use q2q::address::Q2qAddress;
use q2q::amp::AmpBox;
use q2q::client::{self, ConnectOptions, Home, ServerConn};
use q2q::identity::{DomainCa, generate_key, signing_request};
use q2q::proto::code;
use q2q::server::config::RegistrationLimit;
use q2q::server::{Registration, ServerConfig};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Write `servers` (domain, `host:port`) into `srv`'s federation config: where it looks
/// for other domains' servers, as DNS SRV records would say.
fn federation_servers(srv: &TestServer, servers: &[(&str, SocketAddr)]) {
    let fed = srv.data_dir().join("federation");
    std::fs::create_dir_all(&fed).unwrap();
    let lines: String = servers.iter().map(|(d, a)| format!("\"{d}\" = \"{a}\"\n")).collect();
    std::fs::write(fed.join("config.toml"), format!("[servers]\n{lines}")).unwrap();
}

/// A well-formed certificate for `who`, from a CA of the stranger's own, stored in `home`.
fn stranger_identity(home: &Home, who: &Q2qAddress, server: &str) -> ConnectOptions {
    let ca = DomainCa::generate(&who.domain).unwrap();
    let key = generate_key().unwrap();
    let csr = signing_request(&key).unwrap();
    let issued = ca.issue_user(who, &csr, Duration::from_secs(3600)).unwrap();
    home.save_identity(who, &key.serialize_pem(), &issued.pem, server).unwrap();
    let id = Arc::new(home.identity(who).unwrap());
    ConnectOptions { server: Some(server.to_string()), login: Some(id), ..Default::default() }
}

/// Ask `srv` whether bob exists, as `who`: the server must verify `who`'s domain first.
async fn exists_as(srv: &TestServer, home: &Home, who: &str) -> client::ClientError {
    let opts = stranger_identity(home, &addr(who), &srv.addr());
    let conn = ServerConn::connect(home, &addr("bob@example.com").domain, &opts).await.unwrap();
    conn.call_box(AmpBox::command("exists").with("address", "bob@example.com")).await.unwrap_err()
}

/// A loopback listener that counts the connections it gets (and closes them after a
/// line of nonsense).
async fn counting_listener() -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            let _ = s.write_all(b"SSH-2.0-OpenSSH_9.6\r\n").await;
        }
    });
    (addr, count)
}

/// The scan from the issue: a stranger's domain whose server "is" on the server's own
/// loopback. A server with the default config refuses to connect there, and says only
/// that it cannot verify the domain.
#[tokio::test]
async fn a_default_server_does_not_connect_to_loopback_for_a_stranger() {
    let config = ServerConfig { federation_allow: vec![], ..loopback_config(Registration::Open) };
    let srv = TestServer::start("example.com", config).await;
    let (trap, connections) = counting_listener().await;
    federation_servers(&srv, &[("p17000.scan.test", trap)]);
    let (_d, home) = common::home();
    for _ in 0..2 {
        let err = exists_as(&srv, &home, "x@p17000.scan.test").await;
        assert_eq!(err.code(), Some(code::BAD_CERTIFICATE), "{err}");
        assert_eq!(err.to_string(), "cannot verify domain p17000.scan.test");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(connections.load(Ordering::SeqCst), 0, "the server connected to loopback");
    assert!(
        !srv.data_dir().join("federation/known_cas/p17000.scan.test.pem").exists(),
        "nothing pinned"
    );
}

/// Where loopback is allowed (as in the lab), an open port that is no q2q server and a
/// closed port give the client the same sentence; a failed domain is not tried again at
/// once.
#[tokio::test]
async fn whatever_fails_the_stranger_hears_one_sentence() {
    let srv = TestServer::start("example.com", loopback_config(Registration::Open)).await;
    let (open, connections) = counting_listener().await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    federation_servers(&srv, &[("open.scan.test", open), ("closed.scan.test", closed)]);
    let (_d, home) = common::home();
    for domain in ["open.scan.test", "closed.scan.test"] {
        let err = exists_as(&srv, &home, &format!("x@{domain}")).await;
        assert_eq!(err.code(), Some(code::BAD_CERTIFICATE), "{err}");
        assert_eq!(err.to_string(), format!("cannot verify domain {domain}"));
    }
    assert_eq!(connections.load(Ordering::SeqCst), 1, "the open port was tried once");
    // Again at once: remembered as failed, not tried.
    let err = exists_as(&srv, &home, "y@open.scan.test").await;
    assert_eq!(err.to_string(), "cannot verify domain open.scan.test");
    assert_eq!(connections.load(Ordering::SeqCst), 1, "a failed domain is not tried again");
}

/// Whether the other end closes `s` within `wait`.
async fn closed_within(s: &mut TcpStream, wait: Duration) -> bool {
    let mut buf = [0u8; 64];
    loop {
        match tokio::time::timeout(wait, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

/// 127.0.0.2 opens many idle connections: beyond the per-address cap they are closed at
/// once, the rest when their handshake times out; meanwhile a client from 127.0.0.1
/// registers and logs in. A TLS connection that never logs in is closed after the login
/// timeout; a logged-in one stays.
#[tokio::test]
async fn one_address_cannot_hold_the_server_and_strangers_do_not_stay() {
    let config = ServerConfig {
        max_connections_per_address: 3,
        handshake_timeout_secs: 3,
        login_timeout_secs: 3,
        ..loopback_config(Registration::Open)
    };
    let srv = TestServer::start("example.com", config).await;
    let server: SocketAddr = srv.addr().parse().unwrap();
    let mut held = Vec::new();
    for _ in 0..8 {
        let s = TcpSocket::new_v4().unwrap();
        s.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        held.push(s.connect(server).await.unwrap());
    }
    for s in &mut held[3..] {
        assert!(closed_within(s, Duration::from_secs(1)).await, "beyond the cap: closed at once");
    }
    for s in &mut held[..3] {
        assert!(!closed_within(s, Duration::from_millis(100)).await, "within the cap: kept");
    }

    // Another address is served meanwhile.
    let (_d, home) = common::home();
    let alice = common::login(&srv, &home, "alice@example.com").await;
    alice.call_box(AmpBox::command("ping")).await.unwrap();

    // A connection that says hello but never logs in.
    let (_d2, home2) = common::home();
    let stranger =
        ServerConn::connect(&home2, &addr("alice@example.com").domain, &srv.opts()).await.unwrap();
    stranger.call_box(AmpBox::command("ping")).await.unwrap();

    for s in &mut held[..3] {
        assert!(closed_within(s, Duration::from_secs(4)).await, "no handshake: closed");
    }
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert!(stranger.call_box(AmpBox::command("ping")).await.is_err(), "never logged in: closed");
    alice.call_box(AmpBox::command("ping")).await.unwrap();
}

#[tokio::test]
async fn a_registration_flood_is_answered_rate_limited() {
    let limit = |per_address_burst, overall_burst| ServerConfig {
        registration_limit: RegistrationLimit {
            per_address_burst,
            per_address_every_secs: 600,
            overall_burst,
            overall_every_secs: 600,
        },
        ..loopback_config(Registration::Open)
    };
    for (config, allowed) in [(limit(3, 100), 3), (limit(100, 2), 2)] {
        let srv = TestServer::start("example.com", config).await;
        let (_d, home) = common::home();
        for i in 0..allowed {
            let who = addr(&format!("u{i}@example.com"));
            client::register(&home, &who, PW, None, false, &srv.opts()).await.unwrap();
        }
        let err = client::register(&home, &addr("flood@example.com"), PW, None, false, &srv.opts())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(code::RATE_LIMITED), "{err}");
        assert!(err.to_string().contains("too many registrations on example.com"), "{err}");
    }
}

/// `sign` for an unknown user and with a wrong password: the same code, the same sentence
/// (but for the address), about the same time.
#[tokio::test]
async fn sign_does_not_tell_who_has_an_account() {
    let mut config = loopback_config(Registration::Open);
    config.rate_limit.free_failures = 1000;
    let srv = TestServer::start("example.com", config).await;
    let (_d, home) = common::home();
    let alice = addr("alice@example.com");
    client::register(&home, &alice, PW, None, false, &srv.opts()).await.unwrap();
    let nobody = addr("nobody@example.com");
    let conn = ServerConn::connect(&home, &alice.domain, &srv.opts()).await.unwrap();
    let csr = signing_request(&generate_key().unwrap()).unwrap();
    let (mut wrong, mut unknown) = (Duration::MAX, Duration::MAX);
    let mut answers = Vec::new();
    for _ in 0..3 {
        for (who, time) in [(&alice, &mut wrong), (&nobody, &mut unknown)] {
            let t0 = Instant::now();
            let err = conn.sign(who, "not the password", &csr).await.unwrap_err();
            *time = (*time).min(t0.elapsed());
            answers.push((
                err.code().map(str::to_string),
                err.to_string().replace(&who.to_string(), "WHO"),
            ));
        }
    }
    assert!(answers.windows(2).all(|w| w[0] == w[1]), "{answers:?}");
    assert_eq!(answers[0].0.as_deref(), Some(code::WRONG_PASSWORD));
    // Without the dummy hash an unknown user is answered about a hundred times faster.
    assert!(unknown * 3 > wrong, "unknown user {unknown:?}, wrong password {wrong:?}");
}

/// A control connection to `srv` from the loopback address `from`, logged in as `id`.
async fn connect_from(
    from: &str,
    srv: &TestServer,
    id: Arc<q2q::client::home::StoredIdentity>,
) -> q2q::amp::PeerHandle {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let tcp = s.connect(srv.addr().parse().unwrap()).await.unwrap();
    let domain = id.address.domain.clone();
    let verifier = Arc::new(q2q::tls::CaPinVerifier::new(domain.clone(), None));
    let cert = q2q::identity::cert_from_pem(&id.cert_pem).unwrap();
    let key = q2q::identity::key_from_pem(&id.key_pem).unwrap();
    let config = q2q::tls::client_config(verifier, Some((vec![cert], key))).unwrap();
    let name = rustls::pki_types::ServerName::try_from(domain.to_string()).unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.unwrap();
    let (peer, _incoming) = q2q::amp::peer::spawn(tls);
    peer.call(AmpBox::command("hello").with("version", q2q::proto::VERSION)).await.unwrap();
    peer
}

#[tokio::test]
async fn exists_is_limited_per_caller() {
    let srv = TestServer::start("example.com", loopback_config(Registration::Open)).await;
    let (_d, home) = common::home();
    let alice = common::login(&srv, &home, "alice@example.com").await;
    let exists = || AmpBox::command("exists").with("address", "bob@example.com");
    for _ in 0..q2q::server::EXISTS_BURST {
        alice.call_box(exists()).await.unwrap();
    }
    let err = alice.call_box(exists()).await.unwrap_err();
    assert_eq!(err.code(), Some(code::RATE_LIMITED), "{err}");
    // Another caller from another address is not slowed by alice; from hers, it is (a
    // stranger's domain has callers at will).
    let bob = common::login(&srv, &home, "bob@example.com").await;
    assert_eq!(bob.call_box(exists()).await.unwrap_err().code(), Some(code::RATE_LIMITED));
    let bob_id = Arc::new(home.identity(&addr("bob@example.com")).unwrap());
    let bob = connect_from("127.0.0.3", &srv, bob_id).await;
    assert_eq!(bob.call(exists()).await.unwrap().get_str("exists"), Some("true"));
}

/// A 64 KiB argument echoed in an error: the answer is cut short, not dropped, and the
/// connection carries on.
#[tokio::test]
async fn a_long_argument_gets_a_short_error() {
    let srv = TestServer::start("example.com", loopback_config(Registration::Open)).await;
    let (_d, home) = common::home();
    let conn =
        ServerConn::connect(&home, &addr("a@example.com").domain, &srv.opts()).await.unwrap();
    let long = "x".repeat(65_000);
    let err = conn.call_box(AmpBox::command(&long)).await.unwrap_err();
    assert_eq!(err.code(), Some(code::UNHANDLED), "{err}");
    assert!(err.to_string().len() <= 1024, "{}", err.to_string().len());
    let err =
        conn.call_box(AmpBox::command("hello").with("version", long.as_str())).await.unwrap_err();
    assert_eq!(err.code(), Some(code::UNSUPPORTED_VERSION), "{err}");
    let err =
        conn.call_box(AmpBox::command("exists").with("address", long.as_str())).await.unwrap_err();
    assert!(err.to_string().len() <= 1024);
    conn.call_box(AmpBox::command("ping")).await.unwrap();
}

/// A child process, killed on drop.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The scan through DNS, as in the issue: `SRV _q2q._tcp.p17000.scan.test → localhost`.
/// `q2q-server` with the config `init` writes (asking a DNS server on loopback) looks the
/// record up, and connects nowhere.
#[tokio::test]
async fn a_default_server_does_not_follow_srv_to_loopback() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    const SERVER: &str = env!("CARGO_BIN_EXE_q2q-server");
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("srv");
    let data = data.to_str().unwrap();
    let init = Command::new(SERVER)
        .args(["--data-dir", data, "init", "--domain", "example.com"])
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    assert!(init.status.success());
    let (trap, connections) = counting_listener().await;
    let (dns, asked) = common::srv_dns("_q2q._tcp.p17000.scan.test.", trap.port());
    let start = || {
        let mut child = Child(
            Command::new(SERVER)
                .args(["--data-dir", data, "run", "--listen", "127.0.0.1:0"])
                .env("RUST_LOG", "off")
                .env("Q2Q_DNS_SERVER", dns.to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let mut line = String::new();
        std::io::BufReader::new(child.0.stdout.take().unwrap()).read_line(&mut line).unwrap();
        // "q2q-server for example.com listening on 127.0.0.1:PORT (tcp) and ..."
        let server = line.split_whitespace().nth(5).unwrap_or_else(|| panic!("{line}"));
        (server.to_string(), child)
    };
    let (_d, home) = common::home();
    let stranger = addr("x@p17000.scan.test");
    let ask = |server: String| {
        let home = home.clone();
        let stranger = stranger.clone();
        async move {
            let opts = stranger_identity(&home, &stranger, &server);
            let conn =
                ServerConn::connect(&home, &addr("bob@example.com").domain, &opts).await.unwrap();
            conn.call_box(AmpBox::command("exists").with("address", "bob@example.com"))
                .await
                .unwrap_err()
        }
    };

    let (server, child) = start();
    let err = ask(server).await;
    assert_eq!(err.code(), Some(code::BAD_CERTIFICATE), "{err}");
    assert_eq!(err.to_string(), "cannot verify domain p17000.scan.test");
    assert!(asked.load(Ordering::SeqCst) >= 1, "the server looked the SRV record up");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(connections.load(Ordering::SeqCst), 0, "the server connected to loopback");
    drop(child);

    // The control: where the operator allows loopback, the same record is followed (to a
    // port that is no q2q server), and the answer is the same.
    let config = std::path::Path::new(data).join("config.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let allowed = text.replace("federation_allow = []", "federation_allow = [\"127.0.0.0/8\"]");
    assert_ne!(text, allowed);
    std::fs::write(&config, allowed).unwrap();
    let (server, _child) = start();
    let err = ask(server).await;
    assert_eq!(err.to_string(), "cannot verify domain p17000.scan.test");
    assert_eq!(connections.load(Ordering::SeqCst), 1, "allowed: the server connected");
}
