//! Two instances of one domain on one PostgreSQL database (issue 11): an account
//! registered at one logs in at the other; alice logged in at instance 1 reaches bob logged
//! in at instance 2 and back, relayed (the legs at the callee's instance), with streams,
//! pings and file transfers as `q2q-tun ping` and `send` make them; instance 1 stops
//! and alice's node logs in at instance 2, where bob reaches it again. A certificate revoked
//! through one instance's data directory drops its live log-in at the other.
//!
//! Needs a PostgreSQL server: `tools/lab-postgres` starts a throwaway one and runs these
//! with `Q2Q_TEST_POSTGRES` set to a libpq key=value connection string (each test makes
//! its own database in it), and `Q2Q_TEST_POSTGRES_CA` to the PEM file of the CA that
//! signed the server's TLS certificate. Ignored by a plain `cargo test`.

mod common;

use common::{
    PW, addr, eventually, home, loopback_config, metric, scrape_metrics, serial, serve_echo,
};
use q2q::address::{Domain, ServiceName};
use q2q::client::ConnectOptions;
use q2q::presence::node::{Node, NodeConfig, PathKind};
use q2q::server::{self, DataDir, Registration, ServerConfig, datadir};
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A new empty database on the test server: its connection string.
async fn database() -> String {
    let base = std::env::var("Q2Q_TEST_POSTGRES").expect(
        "Q2Q_TEST_POSTGRES is not set: run these through tools/lab-postgres, which starts \
         a throwaway PostgreSQL",
    );
    let (client, conn) = tokio_postgres::connect(&base, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let name = format!("q2q_{}", hex::encode(rand::random::<[u8; 6]>()));
    client.batch_execute(&format!("CREATE DATABASE {name}")).await.unwrap();
    format!("{base} dbname={name}")
}

fn config(database: &str) -> ServerConfig {
    ServerConfig { database: Some(database.to_string()), ..loopback_config(Registration::Open) }
}

/// A second instance's data directory: a copy of the first's CA files and config.
fn copy_instance(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in [datadir::CA_CERT_FILE, datadir::CA_KEY_FILE, datadir::CONFIG_FILE] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
}

/// Two instances' data directories for example.com on database `db`, in `tmp`: the first
/// made by `init` (also returned, its path), the second a copy of its CA files and config.
async fn two_data_dirs(db: &str, tmp: &Path) -> (DataDir, DataDir, std::path::PathBuf) {
    let (dir1, dir2) = (tmp.join("one"), tmp.join("two"));
    let domain = Domain::parse("example.com").unwrap();
    let d1 = DataDir::init_at(&dir1, &domain, &config(db)).await.unwrap();
    copy_instance(&dir1, &dir2);
    let d2 = DataDir::open_at(&dir2, None).await.unwrap();
    (d1, d2, dir1)
}

/// `from` sends a 3 MB file to `to` over the `file` service, as `q2q-tun send` does, and it
/// arrives whole.
async fn send_file(from: &Node, to: &Node, scratch: &Path) {
    use q2q::presence::node::Policy;
    use q2q::transfer;
    let service = q2q::daemon::send::file_service();
    let (src, inbox) = (
        scratch.join(format!("from-{}", from.address())),
        scratch.join(format!("to-{}", to.address())),
    );
    std::fs::create_dir_all(&src).unwrap();
    let data: Vec<u8> = (0..3_000_017u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(src.join("f.bin"), &data).unwrap();
    let mut accepted =
        to.listen(&service, "receive", Policy::allow([from.address().clone()])).await.unwrap();
    let opts = transfer::ReceiveOptions { dir: inbox.clone(), overwrite: false };
    let receiver = tokio::spawn(async move {
        let a = accepted.recv().await.unwrap();
        transfer::receive(a.stream, &opts, &mut transfer::Quiet).await
    });
    let conn = from.connect(to.address(), &service).await.unwrap();
    let files = transfer::collect(&[src.join("f.bin")]).unwrap();
    transfer::send(conn.stream, &files, &mut transfer::Quiet).await.unwrap();
    receiver.await.unwrap().unwrap();
    assert_eq!(std::fs::read(inbox.join("f.bin")).unwrap(), data);
    to.unlisten(&service).await.unwrap();
}

/// `from` opens a stream to `to`'s echo and moves `len` bytes through it, checked.
async fn echo(from: &Node, to: &str, len: usize) -> Result<(), String> {
    let echo = ServiceName::parse("echo").unwrap();
    let conn = from.connect(&addr(to), &echo).await.map_err(|e| e.to_string())?;
    assert_eq!(conn.peer, addr(to));
    let (mut r, mut w) = tokio::io::split(conn.stream);
    let data: Vec<u8> = (0..len).map(|i| (i * 13 % 251) as u8).collect();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::with_capacity(len);
    tokio::time::timeout(Duration::from_secs(60), r.read_to_end(&mut back))
        .await
        .map_err(|_| "echo timed out".to_string())?
        .map_err(|e| e.to_string())?;
    writer.await.unwrap();
    if back != data {
        return Err("echoed data differs".into());
    }
    Ok(())
}

#[tokio::test]
#[ignore = "needs PostgreSQL: tools/lab-postgres runs it"]
async fn two_instances_one_database() {
    if std::env::var_os("RUST_LOG").is_some() {
        q2q::cli::init_logging("info");
    }
    let db = database().await;
    let tmp = tempfile::tempdir().unwrap();
    let (dir1, dir2) = (tmp.path().join("one"), tmp.path().join("two"));
    let domain = Domain::parse("example.com").unwrap();
    let d1 = DataDir::init_at(&dir1, &domain, &config(&db)).await.unwrap();
    // A second `init` on the same database is refused: it would make a second CA.
    let again = DataDir::init_at(&tmp.path().join("three"), &domain, &config(&db)).await;
    assert!(again.is_err(), "a second CA on one database");
    copy_instance(&dir1, &dir2);
    let d2 = DataDir::open_at(&dir2, None).await.unwrap();
    assert_eq!(d2.ca.fingerprint(), d1.ca.fingerprint());
    let one = server::start(d1, config(&db)).await.unwrap();
    let two = server::start(d2, config(&db)).await.unwrap();
    let (p1, p2) = (one.tcp_addr.to_string(), two.tcp_addr.to_string());

    // Registered at one instance, logged in at the other.
    let (_h, home) = home();
    let at = |s: &str| ConnectOptions { server: Some(s.to_string()), ..Default::default() };
    q2q::client::register(&home, &addr("alice@example.com"), PW, None, false, &at(&p2))
        .await
        .unwrap();
    for who in ["bob@example.com", "carol@example.com", "dave@example.com"] {
        q2q::client::register(&home, &addr(who), PW, None, false, &at(&p1)).await.unwrap();
    }
    // Alice knows both instances (instance 1 first); bob only instance 2. Relayed only,
    // so the relay across instances is what carries the streams.
    // The admin verbs of either instance see every account, wherever it registered.
    assert_listed(&dir2, &["alice", "bob", "dave"]);
    let (alice, bob) = alice_and_bob(&home, &p1, &p2).await;
    let carol =
        Node::start(home.clone(), addr("carol@example.com"), relayed(p2.clone())).await.unwrap();
    serve_echo(&alice, &["bob@example.com", "carol@example.com", "dave@example.com"]).await;
    serve_echo(&bob, &["alice@example.com"]).await;
    serve_echo(&carol, &[]).await;
    assert_eq!(one.stats().online, 1, "alice at instance 1");
    assert_eq!(two.stats().online, 2, "bob and carol at instance 2");

    // Alice (instance 1) to bob (instance 2): both legs at instance 2.
    echo(&alice, "bob@example.com", 256 << 10).await.unwrap();
    assert!(two.stats().relayed_bytes >= 512 << 10, "{:?}", two.stats());
    assert_eq!(one.stats().relayed_bytes, 0, "{:?}", one.stats());
    // A stream the other way in the same session (opened by bob).
    echo(&bob, "alice@example.com", 256 << 10).await.unwrap();
    assert_eq!(one.stats().relayed_bytes, 0, "{:?}", one.stats());
    // What `q2q-tun ping` and `q2q-tun send` do, both ways across the instances.
    alice.serve_ping().await.unwrap();
    bob.serve_ping().await.unwrap();
    let ms = Duration::from_millis(20);
    assert_eq!(alice.ping(&addr("bob@example.com"), 3, ms).await.unwrap().rtts.len(), 3);
    assert_eq!(bob.ping(&addr("alice@example.com"), 3, ms).await.unwrap().rtts.len(), 3);
    send_file(&alice, &bob, tmp.path()).await;
    send_file(&bob, &alice, tmp.path()).await;
    // Carol (instance 2) to alice (instance 1): a new session, its legs at instance 1.
    echo(&carol, "alice@example.com", 256 << 10).await.unwrap();
    assert!(one.stats().relayed_bytes >= 512 << 10, "{:?}", one.stats());
    for node in [&alice, &bob, &carol] {
        assert!(
            node.status().iter().all(|s| matches!(s.path, PathKind::UdpRelay(_))),
            "{:?}",
            node.status()
        );
    }

    // Instance 1 goes: alice logs in at instance 2 and is reachable again, by a peer that
    // has no session with her yet (dave, logged in after), which instance 2 must set up.
    one.shutdown().await;
    let dave =
        Node::start(home.clone(), addr("dave@example.com"), relayed(p2.clone())).await.unwrap();
    let mut reached = Err(String::new());
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        // Online: listening for a service (dave does not, yet).
        if two.stats().online < 3 {
            continue;
        }
        reached = echo(&dave, "alice@example.com", 64 << 10).await;
        if reached.is_ok() {
            break;
        }
    }
    reached.expect("dave reaches alice after instance 1 stopped");
    assert_eq!(two.stats().online, 3, "alice, bob and carol at instance 2 now");
    // And alice, now at instance 2, reaches a peer she had no session with.
    serve_echo(&dave, &["alice@example.com"]).await;
    echo(&alice, "dave@example.com", 64 << 10).await.unwrap();
    two.shutdown().await;
}

/// The SQLite default and PostgreSQL hold the same state the same way (the store API).
/// Registration limits are the domain's, not each instance's: two registrations at one
/// instance spend the source address's budget at the other too. A source refused by the
/// overall budget leaves no row behind.
#[tokio::test]
#[ignore = "needs PostgreSQL: tools/lab-postgres runs it"]
async fn registration_limits_hold_across_instances() {
    let db = database().await;
    let tmp = tempfile::tempdir().unwrap();
    let (dir1, dir2) = (tmp.path().join("one"), tmp.path().join("two"));
    let domain = Domain::parse("example.com").unwrap();
    let limited = ServerConfig {
        registration_limit: server::config::RegistrationLimit {
            per_address_burst: 2,
            per_address_every_secs: 3600,
            overall_burst: 100,
            overall_every_secs: 1,
        },
        ..config(&db)
    };
    let d1 = DataDir::init_at(&dir1, &domain, &limited).await.unwrap();
    copy_instance(&dir1, &dir2);
    let d2 = DataDir::open_at(&dir2, None).await.unwrap();
    let pg = d1.store.postgres().unwrap().clone();
    let one = server::start(d1, limited.clone()).await.unwrap();
    let two = server::start(d2, limited).await.unwrap();
    let (_h, home) = home();
    let at = |s: &str| ConnectOptions { server: Some(s.to_string()), ..Default::default() };
    let (p1, p2) = (one.tcp_addr.to_string(), two.tcp_addr.to_string());
    for who in ["u1@example.com", "u2@example.com"] {
        q2q::client::register(&home, &addr(who), PW, None, false, &at(&p1)).await.unwrap();
    }
    let e = q2q::client::register(&home, &addr("u3@example.com"), PW, None, false, &at(&p2))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(q2q::proto::code::RATE_LIMITED), "{e}");

    // The store's buckets: the overall one first; once it is empty, a new source is
    // refused without a row of its own.
    let now = 1_000_000_000_000;
    let b = |k: &str, burst: f64| (k.to_string(), burst, 1.0 / 3600.0);
    let first = pg.take_tokens(&[b("t:all", 1.0), b("t:a", 5.0)], now).await.unwrap();
    assert!(first.is_zero());
    let second = pg.take_tokens(&[b("t:all", 1.0), b("t:b", 5.0)], now + 1000).await.unwrap();
    assert!(second > Duration::from_secs(3000), "{second:?}");
    let (client, conn) = tokio_postgres::connect(&db, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let rows = client.query("SELECT key FROM rate_limits WHERE key LIKE 't:%'", &[]).await.unwrap();
    let keys: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert!(!keys.contains(&"t:b".to_string()), "{keys:?}");
    one.shutdown().await;
    two.shutdown().await;
}

/// `database_ca` makes every database connection TLS, verified: the server itself reports
/// the connection encrypted; without it the connection is plain; a CA that did not sign the
/// server's certificate is refused.
#[tokio::test]
#[ignore = "needs PostgreSQL: tools/lab-postgres runs it"]
async fn tls_to_the_database_is_verified_against_database_ca() {
    let ca = std::env::var("Q2Q_TEST_POSTGRES_CA")
        .expect("Q2Q_TEST_POSTGRES_CA is not set: run these through tools/lab-postgres");
    let tmp = tempfile::tempdir().unwrap();
    let domain = Domain::parse("example.com").unwrap();

    let tls = ServerConfig { database_ca: Some(ca.into()), ..config(&database().await) };
    let d = DataDir::init_at(&tmp.path().join("tls"), &domain, &tls).await.unwrap();
    assert!(d.store.postgres().unwrap().connection_is_tls().await.unwrap());
    // Opened again from its config.toml, which keeps database_ca.
    drop(d);
    let d = DataDir::open_at(&tmp.path().join("tls"), None).await.unwrap();
    assert!(d.store.postgres().unwrap().connection_is_tls().await.unwrap());

    let plain = config(&database().await);
    let d = DataDir::init_at(&tmp.path().join("plain"), &domain, &plain).await.unwrap();
    assert!(!d.store.postgres().unwrap().connection_is_tls().await.unwrap());

    let stranger = tmp.path().join("other-ca.pem");
    let other = q2q::identity::DomainCa::generate(&Domain::parse("other.test").unwrap()).unwrap();
    std::fs::write(&stranger, other.cert_pem()).unwrap();
    let wrong = ServerConfig { database_ca: Some(stranger), ..config(&database().await) };
    let e = DataDir::init_at(&tmp.path().join("wrong"), &domain, &wrong).await.err().unwrap();
    assert!(e.to_string().contains("certificate"), "{e}");
}

#[tokio::test]
#[ignore = "needs PostgreSQL: tools/lab-postgres runs it"]
async fn store_operations_on_postgres() {
    use q2q::server::db::{CertRecord, DbError};
    let db = database().await;
    let tmp = tempfile::tempdir().unwrap();
    let domain = Domain::parse("example.com").unwrap();
    let d = DataDir::init_at(&tmp.path().join("srv"), &domain, &config(&db)).await.unwrap();
    let s = &d.store;
    assert!(s.postgres().is_some());
    s.add_user("alice", "h1", None).await.unwrap();
    assert!(matches!(s.add_user("alice", "h2", None).await, Err(DbError::UserExists)));
    assert_eq!(s.password_hash("alice").await.unwrap().as_deref(), Some("h1"));
    s.create_invite("abc").await.unwrap();
    assert!(matches!(s.add_user("bob", "h", Some("nope")).await, Err(DbError::BadInvite)));
    s.add_user("bob", "h", Some("abc")).await.unwrap();
    assert!(matches!(s.add_user("carol", "h", Some("abc")).await, Err(DbError::BadInvite)));
    assert_eq!(s.password_hash("carol").await.unwrap(), None);
    assert_eq!(s.invites().await.unwrap(), vec![("abc".into(), Some("bob".into()))]);
    let rec = CertRecord {
        serial: "01".into(),
        identity: "alice@example.com".into(),
        not_before: 1,
        not_after: 2,
        revoked: false,
    };
    s.record_certificate(&rec).await.unwrap();
    assert_eq!(s.certificate("01").await.unwrap(), Some(rec.clone()));
    let renewed = CertRecord { serial: "02".into(), ..rec.clone() };
    assert!(s.record_renewal_limited(&renewed, "01", 0, 1).await.unwrap());
    let third = CertRecord { serial: "03".into(), ..rec.clone() };
    assert!(!s.record_renewal_limited(&third, "02", 0, 1).await.unwrap(), "over the limit");
    assert_eq!(s.certificate("03").await.unwrap(), None);
    assert_eq!(s.list_users("example.com").await.unwrap()[0].certificates, 2);
    assert_eq!(s.certificates(Some("alice@example.com")).await.unwrap().len(), 2);
    s.remove_user("alice", "alice@example.com").await.unwrap();
    assert!(s.is_revoked("01").await.unwrap() && s.is_revoked("02").await.unwrap());
    assert_eq!(s.user_count().await.unwrap(), 1);
    assert!(matches!(s.revoke("99").await, Err(DbError::NoSuchCertificate)));
    // Presence across instances: found at live instances other than the asker's.
    let pg = s.postgres().unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    let (now, later) = (now.as_secs() as i64, now.as_secs() as i64 + 60);
    pg.heartbeat("aa", None, 1, 120).await.unwrap();
    pg.heartbeat("bb", Some("127.0.0.1"), 2, 120).await.unwrap();
    // Alive: holding its lock on its notification connection.
    let (tx, _notes) = tokio::sync::mpsc::channel(8);
    let aa = server::postgres::listen(pg.target(), "aa", tx.clone()).await.unwrap();
    let bb = server::postgres::listen(pg.target(), "bb", tx).await.unwrap();
    pg.presence_listen("alice@example.com", "echo", "aa", 1).await.unwrap();
    pg.presence_listen("bob@example.com", "echo", "bb", 2).await.unwrap();
    let at = |i: &str, has| Some((server::postgres::Remote { instance: i.into() }, has));
    let find = |a: &'static str, s: Option<&'static str>, me: &'static str, since| async move {
        pg.presence_find(a, s, me, since).await.unwrap()
    };
    assert_eq!(find("alice@example.com", Some("echo"), "bb", now).await, at("aa", true));
    assert_eq!(find("alice@example.com", Some("ssh"), "bb", now).await, at("aa", false));
    assert_eq!(find("alice@example.com", None, "bb", now).await, at("aa", true));
    assert_eq!(find("alice@example.com", Some("echo"), "aa", now).await, None, "not the asker");
    assert_eq!(find("alice@example.com", Some("echo"), "bb", later).await, None, "silent");
    // The newest listen wins, wherever it is.
    pg.presence_listen("alice@example.com", "echo", "bb", 5).await.unwrap();
    assert_eq!(find("alice@example.com", Some("echo"), "cc", now).await, at("bb", true));
    pg.presence_drop("aa", 1, None).await.unwrap();
    assert_eq!(find("alice@example.com", Some("echo"), "cc", now).await, at("bb", true));
    // Published again after an outage: replaces the instance's rows, keeps newer ones.
    let again = [("carol@example.com".to_string(), "echo".to_string(), 3)];
    pg.presence_listen("dave@example.com", "echo", "aa", 4).await.unwrap();
    pg.presence_replace("aa", &again).await.unwrap();
    assert_eq!(find("dave@example.com", None, "cc", now).await, None);
    assert_eq!(find("carol@example.com", None, "cc", now).await, at("aa", true));
    pg.presence_drop("aa", 3, Some(("carol@example.com", "echo"))).await.unwrap();
    assert_eq!(find("carol@example.com", None, "cc", now).await, None);
    // An instance whose connection is gone is not asked, heartbeat or not.
    drop(bb);
    let mut gone = false;
    for _ in 0..50 {
        if find("alice@example.com", None, "cc", now).await.is_none() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "a closed instance is still asked");
    pg.instance_gone("bb").await.unwrap();
    drop(aa);

    // A data directory whose CA is not the database's is refused.
    let other = tempfile::tempdir().unwrap();
    let o = DataDir::init(&other.path().join("x"), &domain, &Default::default()).unwrap();
    let dir = tmp.path().join("srv");
    std::fs::write(dir.join(datadir::CA_KEY_FILE), o.ca.key_pem()).unwrap();
    std::fs::write(dir.join(datadir::CA_CERT_FILE), o.ca.cert_pem()).unwrap();
    let err = DataDir::open_at(&dir, None).await.err().unwrap();
    assert!(matches!(err, server::DataDirError::CaMismatch { .. }), "{err}");
}

const SERVER: &str = env!("CARGO_BIN_EXE_q2q-server");

/// A `q2q-server run` child on `dir`, killed (SIGKILL) when dropped; its TCP address.
struct Instance(std::process::Child, String);

impl Instance {
    fn run(dir: &Path) -> Instance {
        use std::io::BufRead;
        let mut child = std::process::Command::new(SERVER)
            .arg("--data-dir")
            .arg(dir)
            .args(["run", "--listen", "127.0.0.1:0"])
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        let out = child.stdout.take().unwrap();
        std::io::BufReader::new(out).read_line(&mut line).unwrap();
        // "q2q-server for example.com listening on 127.0.0.1:PORT (tcp) and …"
        let addr = line.split_whitespace().nth(5).unwrap_or_else(|| panic!("{line:?}"));
        Instance(child, addr.to_string())
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The same through the command line, with the instance killed (no clean-up of its own):
/// `init --database`, a copied data directory, two `run`s; alice, logged in at the
/// instance killed, moves to the other and is reached there by a new peer.
#[tokio::test]
#[ignore = "needs PostgreSQL: tools/lab-postgres runs it"]
async fn command_line_instances_and_a_killed_one() {
    let db = database().await;
    let tmp = tempfile::tempdir().unwrap();
    let (dir1, dir2) = (tmp.path().join("one"), tmp.path().join("two"));
    let init = std::process::Command::new(SERVER)
        .arg("--data-dir")
        .arg(&dir1)
        .args(["init", "--domain", "example.com", "--database", &db])
        .output()
        .unwrap();
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir1.join(datadir::CONFIG_FILE)).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "config.toml names the database");
    assert!(!dir1.join(datadir::DB_FILE).exists(), "no SQLite file");
    copy_instance(&dir1, &dir2);
    let mut one = Some(Instance::run(&dir1));
    let two = Instance::run(&dir2);
    let p1 = one.as_ref().unwrap().1.clone();
    let p2 = two.1.clone();

    let (_h, home) = home();
    for (who, at) in [("alice", &p2), ("bob", &p1), ("dave", &p1)] {
        let opts = ConnectOptions { server: Some(at.clone()), ..Default::default() };
        q2q::client::register(&home, &addr(&format!("{who}@example.com")), PW, None, false, &opts)
            .await
            .unwrap();
    }
    // The admin verbs of either instance see every account, wherever it registered.
    assert_listed(&dir2, &["alice", "bob", "dave"]);
    let (alice, bob) = alice_and_bob(&home, &p1, &p2).await;
    serve_echo(&alice, &["bob@example.com", "dave@example.com"]).await;
    echo(&bob, "alice@example.com", 64 << 10).await.unwrap();

    drop(one.take()); // SIGKILL
    let dave =
        Node::start(home.clone(), addr("dave@example.com"), relayed(p2.clone())).await.unwrap();
    let mut reached = Err(String::new());
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        reached = echo(&dave, "alice@example.com", 64 << 10).await;
        if reached.is_ok() {
            break;
        }
    }
    reached.expect("dave reaches alice after her instance was killed");
    drop(two);
}

/// Revoked with `q2q-server cert revoke` through instance 1's data directory (the database
/// they share), alice's live log-in at instance 2 is dropped, and she cannot log in again.
#[tokio::test]
#[ignore = "needs PostgreSQL: tools/lab-postgres runs it"]
async fn a_revocation_at_one_instance_drops_the_log_in_at_another() {
    let db = database().await;
    let tmp = tempfile::tempdir().unwrap();
    let (d1, d2, dir1) = two_data_dirs(&db, tmp.path()).await;
    let _one = server::start(d1, config(&db)).await.unwrap();
    let two = server::start(d2, config(&db)).await.unwrap();
    let p2 = two.tcp_addr.to_string();
    let (_h, home) = home();
    let opts = ConnectOptions { server: Some(p2.clone()), ..Default::default() };
    for who in ["alice@example.com", "bob@example.com"] {
        q2q::client::register(&home, &addr(who), PW, None, false, &opts).await.unwrap();
    }
    let alice =
        Node::start(home.clone(), addr("alice@example.com"), relayed(p2.clone())).await.unwrap();
    let bob =
        Node::start(home.clone(), addr("bob@example.com"), relayed(p2.clone())).await.unwrap();
    serve_echo(&alice, &["bob@example.com"]).await;
    serve_echo(&bob, &["alice@example.com"]).await;
    echo(&bob, "alice@example.com", 1000).await.expect("bob reaches alice before");
    let online_before = two.stats().online;
    assert_eq!(online_before, 2, "both online at instance 2");

    let out = std::process::Command::new(SERVER)
        .arg("--data-dir")
        .arg(&dir1)
        .args(["cert", "revoke", &serial(&home, "alice@example.com")])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Sooner than the watchers' 30 s safety-net poll: the revocation's NOTIFY woke them.
    let dropped =
        eventually(Duration::from_secs(10), || async { two.stats().online < online_before }).await;
    assert!(dropped, "alice's log-in at instance 2 is dropped");
    // Her node tries to log in again and is refused; bob stays logged in and cannot reach her.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(two.stats().online, online_before - 1, "bob stays, alice stays out");
    let reach = echo(&bob, "alice@example.com", 1000).await;
    assert!(reach.is_err(), "a revoked alice is unreachable: {reach:?}");
    alice.leave().await;
    bob.leave().await;
}

/// A caller whose UDP is blocked, logged in at instance 1, reaches callees logged in at
/// instance 2, where both relay legs are: it relays over TCP through a control connection
/// of its own to instance 2. To a callee relaying over UDP (bob) and to one whose UDP is
/// blocked too (carol), streams both ways, and nothing relayed by instance 1. Sessions
/// opened at once share one connection to the instance.
#[tokio::test]
#[ignore = "needs PostgreSQL: tools/lab-postgres runs it"]
async fn a_caller_without_udp_relays_over_tcp_at_the_callees_instance() {
    let db = database().await;
    let tmp = tempfile::tempdir().unwrap();
    let (d1, d2, _) = two_data_dirs(&db, tmp.path()).await;
    let one = server::start(d1, config(&db)).await.unwrap();
    let metrics = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let two = server::start(d2, ServerConfig { metrics: Some(metrics), ..config(&db) }).await;
    let two = two.unwrap();
    let (p1, p2) = (one.tcp_addr.to_string(), two.tcp_addr.to_string());
    let (_h, home) = home();
    let opts = ConnectOptions { server: Some(p1.clone()), ..Default::default() };
    for who in ["alice@example.com", "bob@example.com", "carol@example.com"] {
        q2q::client::register(&home, &addr(who), PW, None, false, &opts).await.unwrap();
    }
    let no_udp = |server: &str| NodeConfig { tcp_relay_only: true, ..relayed(server.to_string()) };
    let alice = Node::start(home.clone(), addr("alice@example.com"), no_udp(&p1)).await.unwrap();
    let bob =
        Node::start(home.clone(), addr("bob@example.com"), relayed(p2.clone())).await.unwrap();
    let carol = Node::start(home.clone(), addr("carol@example.com"), no_udp(&p2)).await.unwrap();
    serve_echo(&alice, &["bob@example.com", "carol@example.com"]).await;
    serve_echo(&bob, &["alice@example.com"]).await;
    serve_echo(&carol, &["alice@example.com"]).await;
    assert_eq!((one.stats().online, two.stats().online), (1, 2));
    let logged_in = || async { metric(&scrape_metrics(metrics).await, "q2q_live_sessions") };
    assert_eq!(logged_in().await, 2.0, "bob and carol at instance 2");

    let (to_bob, to_carol) = tokio::join!(
        echo(&alice, "bob@example.com", 256 << 10),
        echo(&alice, "carol@example.com", 256 << 10)
    );
    to_bob.unwrap();
    to_carol.unwrap();
    echo(&bob, "alice@example.com", 256 << 10).await.unwrap();
    echo(&carol, "alice@example.com", 256 << 10).await.unwrap();
    assert_eq!(logged_in().await, 3.0, "one connection of alice's for both sessions");
    assert!(two.stats().relayed_bytes >= 4 * (512 << 10), "{:?}", two.stats());
    assert_eq!(one.stats().relayed_bytes, 0, "{:?}", one.stats());
    let path =
        |n: &Node, to: &str| n.status().into_iter().find(|s| s.peer == addr(to)).map(|s| s.path);
    assert_eq!(path(&alice, "bob@example.com"), Some(PathKind::TcpRelay));
    assert_eq!(path(&alice, "carol@example.com"), Some(PathKind::TcpRelay));
    assert!(matches!(path(&bob, "alice@example.com"), Some(PathKind::UdpRelay(_))));
    assert_eq!(path(&carol, "alice@example.com"), Some(PathKind::TcpRelay));
    for n in [alice, bob, carol] {
        n.leave().await;
    }
}

/// Alice's node, which knows both instances (`p1` first), and bob's, which knows only `p2`;
/// both relayed only.
async fn alice_and_bob(home: &q2q::client::Home, p1: &str, p2: &str) -> (Node, Node) {
    let alice = Node::start(home.clone(), addr("alice@example.com"), relayed(format!("{p1},{p2}")))
        .await
        .unwrap();
    let bob =
        Node::start(home.clone(), addr("bob@example.com"), relayed(p2.to_string())).await.unwrap();
    (alice, bob)
}

/// `q2q-server user list` of the instance in `dir` names every one of `who`.
fn assert_listed(dir: &std::path::Path, who: &[&str]) {
    let list = std::process::Command::new(SERVER)
        .arg("--data-dir")
        .arg(dir)
        .args(["user", "list"])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&list.stdout);
    assert!(list.status.success(), "{}", String::from_utf8_lossy(&list.stderr));
    for w in who {
        assert!(listed.contains(w), "{w} not in {listed}");
    }
}

/// A node that knows the servers `servers` (comma-separated) and takes relayed paths only,
/// so that the relay across instances is what carries its streams.
fn relayed(servers: String) -> NodeConfig {
    NodeConfig {
        include_loopback: true,
        direct: false,
        server: ConnectOptions { server: Some(servers), ..Default::default() },
        ..Default::default()
    }
}
