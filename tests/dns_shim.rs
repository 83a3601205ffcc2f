//! The resolver shim over real UDP and TCP on loopback, and `dig` when it is installed.

use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, PTR};
use hickory_proto::rr::{Name, RData, RecordType};
use proptest::prelude::*;
use q2q::address::{Domain, Q2qAddress};
use q2q::dns::server::{self, Lookup, NoLookup, Server, ServerConfig, SharedShim};
use q2q::dns::shim::reverse_name;
use q2q::dns::{Existence, Names, Pool, PoolConfig, Shim, ShimConfig, framing};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

type Oracle = fn(&Q2qAddress) -> Existence;

/// alice and bob exist anywhere; whether users named slow-… exist must be looked up;
/// everyone else does not exist.
fn oracle(a: &Q2qAddress) -> Existence {
    match a.user.as_str() {
        "alice" | "bob" => Existence::Known,
        u if u.starts_with("slow") => Existence::Ask,
        _ => Existence::Unknown,
    }
}

fn new_shim(pool: PoolConfig) -> Shim<Oracle> {
    let names = Names::new(Domain::parse("example.com").unwrap());
    Shim::new(names, Pool::new(pool).unwrap(), oracle as Oracle, ShimConfig::default())
}

async fn start(pool: PoolConfig) -> (SocketAddr, SharedShim<Oracle>) {
    start_with(pool, NoLookup, ServerConfig::default()).await
}

async fn start_with(
    pool: PoolConfig,
    lookup: impl Lookup,
    config: ServerConfig,
) -> (SocketAddr, SharedShim<Oracle>) {
    let shim = Arc::new(Mutex::new(new_shim(pool)));
    let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let srv = Server::bind(addr, shim.clone(), lookup, config).await.unwrap();
    let addr = srv.local_addr().unwrap();
    tokio::spawn(srv.run());
    (addr, shim)
}

fn query(name: &str, ty: RecordType) -> Message {
    let mut m = Message::query();
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), ty));
    m
}

async fn udp(server: SocketAddr, q: &Message) -> Message {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(&q.to_vec().unwrap(), server).await.unwrap();
    let mut buf = [0u8; 1500];
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), sock.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let r = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(r.metadata.id, q.metadata.id);
    assert_eq!(r.queries, q.queries);
    r
}

async fn tcp(stream: &mut TcpStream, q: &Message) -> Message {
    stream.write_all(&framing::encode(&q.to_vec().unwrap()).unwrap()).await.unwrap();
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await.unwrap();
    let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut body).await.unwrap();
    let r = Message::from_vec(&body).unwrap();
    assert_eq!(r.metadata.id, q.metadata.id);
    r
}

fn only_a(r: &Message) -> Ipv4Addr {
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert_eq!(r.answers.len(), 1, "{r:?}");
    assert!(r.answers[0].ttl <= 10);
    match &r.answers[0].data {
        RData::A(A(ip)) => *ip,
        other => panic!("not an A record: {other:?}"),
    }
}

fn only_aaaa(r: &Message) -> Ipv6Addr {
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert_eq!(r.answers.len(), 1, "{r:?}");
    match &r.answers[0].data {
        RData::AAAA(AAAA(ip)) => *ip,
        other => panic!("not an AAAA record: {other:?}"),
    }
}

#[tokio::test]
async fn udp_and_tcp_answers_are_stable_and_reverse() {
    let (addr, shim) = start(PoolConfig::default()).await;
    let short = only_a(&udp(addr, &query("alice.q2q.", RecordType::A)).await);
    let long = only_a(&udp(addr, &query("ALICE.Example.Com.q2q.", RecordType::A)).await);
    assert_eq!(short, long, "alice.q2q is alice at our own domain");
    assert!(PoolConfig::default().ipv4.contains(short));
    assert_ne!(short, server::lock(&shim).pool().node_ipv4());
    let bob = only_a(&udp(addr, &query("bob.b.example.q2q.", RecordType::A)).await);
    assert_ne!(bob, short);
    let v6 = only_aaaa(&udp(addr, &query("alice.q2q.", RecordType::AAAA)).await);
    assert!(PoolConfig::default().ipv6.contains(v6));

    // Over TCP, several queries on one connection: the same answers.
    let mut s = TcpStream::connect(addr).await.unwrap();
    for _ in 0..3 {
        assert_eq!(
            only_a(&tcp(&mut s, &query("alice.example.com.q2q.", RecordType::A)).await),
            short
        );
        assert_eq!(only_aaaa(&tcp(&mut s, &query("alice.q2q.", RecordType::AAAA)).await), v6);
    }

    // PTR maps both families back to the canonical name.
    let want = RData::PTR(PTR(Name::from_ascii("alice.example.com.q2q.").unwrap()));
    for ip in [IpAddr::V4(short), IpAddr::V6(v6)] {
        let r = udp(addr, &query(&reverse_name(ip).to_ascii(), RecordType::PTR)).await;
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert_eq!(r.answers[0].data, want);
        let r = tcp(&mut s, &query(&reverse_name(ip).to_ascii(), RecordType::PTR)).await;
        assert_eq!(r.answers[0].data, want);
    }
    // whois, as the daemon would ask it.
    let who = server::lock(&shim).pool().whois(IpAddr::V4(bob)).cloned();
    assert_eq!(who, Some(Q2qAddress::parse("bob@b.example").unwrap()));

    // Survives a restart through the saved state.
    let saved = server::lock(&shim).pool().to_toml();
    let restored = Pool::from_toml(PoolConfig::default(), &saved).unwrap();
    assert_eq!(restored.get(&Q2qAddress::parse("alice@example.com").unwrap()).unwrap().ipv4, short);
}

#[tokio::test]
async fn unknown_malformed_and_foreign_names() {
    let (addr, _shim) = start(PoolConfig::default()).await;
    let r = udp(addr, &query("carol.q2q.", RecordType::A)).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
    assert!(r.answers.is_empty());
    assert_eq!(r.authorities[0].record_type(), RecordType::SOA, "negative answers are cacheable");
    let r = udp(addr, &query("_ssh._tcp.alice.q2q.", RecordType::SRV)).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);

    for foreign in [
        "example.com.",
        "alice.example.com.",
        "q2q.example.com.",
        concat!("1.1", ".1.1.in-addr.arpa."),
    ] {
        let r = udp(addr, &query(foreign, RecordType::A)).await;
        assert_eq!(r.metadata.response_code, ResponseCode::Refused, "{foreign}");
        assert!(r.answers.is_empty() && !r.metadata.authoritative, "{foreign}");
    }
    // An unmapped pool address.
    let r = udp(addr, &query(concat!("77.0", ".64.100.in-addr.arpa."), RecordType::PTR)).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
}

#[tokio::test]
async fn configured_pool_is_used() {
    let c = PoolConfig {
        ipv4: "100.100.0.0/16".parse().unwrap(),
        ipv6: "fd00:abcd::/64".parse().unwrap(),
        ..PoolConfig::default()
    };
    let (addr, _shim) = start(c).await;
    let ip = only_a(&udp(addr, &query("alice.q2q.", RecordType::A)).await);
    assert_eq!(ip, Ipv4Addr::new(100, 100, 0, 2));
    let ip6 = only_aaaa(&udp(addr, &query("alice.q2q.", RecordType::AAAA)).await);
    assert_eq!(ip6, "fd00:abcd::2".parse::<Ipv6Addr>().unwrap());
}

#[tokio::test]
async fn garbage_does_not_crash_it() {
    let (addr, _shim) = start(PoolConfig::default()).await;
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for junk in [
        &b""[..],
        b"\x00",
        &[0xff; 12],
        &[0x12, 0x34, 0x01, 0x00, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 9],
        &[0; 5000],
    ] {
        sock.send_to(junk, addr).await.unwrap();
    }
    // Garbage over TCP: a zero-length frame, a short frame then hang-up, an oversized length.
    for junk in [&b"\x00\x00"[..], b"\x00\x10abc", b"\xff\xff"] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(junk).await.unwrap();
        drop(s);
    }
    // Still answering.
    only_a(&udp(addr, &query("alice.q2q.", RecordType::A)).await);
    let mut s = TcpStream::connect(addr).await.unwrap();
    only_a(&tcp(&mut s, &query("alice.q2q.", RecordType::A)).await);
}

#[tokio::test]
async fn dig_resolves_alice() {
    let has_dig = std::process::Command::new("dig").arg("-v").output().is_ok();
    if !has_dig {
        println!("skipping: dig is not installed (apt-get install dnsutils)");
        return;
    }
    let (addr, _shim) = start(PoolConfig::default()).await;
    let port = addr.port().to_string();
    let dig = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            std::process::Command::new("dig").args(args).output().unwrap()
        })
    };
    let base = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["@127.0.0.1", "-p", port.as_str(), "+time=3", "+tries=1"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let out = dig(base(&["alice.q2q", "A", "+short"])).await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let ip: Ipv4Addr = text.parse().unwrap_or_else(|_| panic!("dig said {text:?}"));
    assert_eq!(ip, Ipv4Addr::new(100, 64, 0, 2));
    let out = dig(base(&["alice.q2q", "A", "+short", "+tcp"])).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), text);
    let out = dig(base(&["-x", &text, "+short"])).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "alice.example.com.q2q.");
    let out = dig(base(&["carol.q2q", "A"])).await.unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("status: NXDOMAIN"));
}

/// A look-up that takes `delay` and then says the person exists; counts calls and how many
/// ran at once.
#[derive(Clone, Default)]
struct SlowLookup {
    delay: Duration,
    calls: Arc<AtomicUsize>,
    running: Arc<AtomicUsize>,
    most_at_once: Arc<AtomicUsize>,
}

impl Lookup for SlowLookup {
    async fn lookup(&self, _: &Q2qAddress) -> Existence {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_at_once.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        self.running.fetch_sub(1, Ordering::SeqCst);
        Existence::Known
    }
}

/// Send `q` over UDP now; the answer arrives in the returned task.
fn udp_in_background(
    server: SocketAddr,
    q: Message,
) -> tokio::task::JoinHandle<(Message, Duration)> {
    tokio::spawn(async move {
        let t = Instant::now();
        let r = udp(server, &q).await;
        (r, t.elapsed())
    })
}

#[tokio::test]
async fn a_slow_lookup_holds_up_nobody_else() {
    let slow = SlowLookup { delay: Duration::from_millis(1500), ..SlowLookup::default() };
    let (addr, _shim) =
        start_with(PoolConfig::default(), slow.clone(), ServerConfig::default()).await;
    // Two queries about the slow person, over UDP and TCP: one look-up between them.
    let waiting = udp_in_background(addr, query("slow-dave.far.example.q2q.", RecordType::A));
    let waiting_tcp = tokio::spawn(async move {
        let mut s = TcpStream::connect(addr).await.unwrap();
        tcp(&mut s, &query("slow-dave.far.example.q2q.", RecordType::AAAA)).await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(slow.running.load(Ordering::SeqCst), 1, "the look-up is under way");

    // Meanwhile a known name, a foreign name and a PTR are answered at once, UDP and TCP.
    let mut s = TcpStream::connect(addr).await.unwrap();
    for _ in 0..3 {
        let t = Instant::now();
        let ip = only_a(&udp(addr, &query("alice.q2q.", RecordType::A)).await);
        let fast = t.elapsed();
        assert!(fast < Duration::from_millis(50), "alice.q2q took {fast:?} while a look-up waited");
        println!("alice.q2q answered in {fast:?} while a look-up waited");
        let t = Instant::now();
        let r = udp(addr, &query("example.com.", RecordType::A)).await;
        assert_eq!(r.metadata.response_code, ResponseCode::Refused);
        let r = udp(addr, &query(&reverse_name(IpAddr::V4(ip)).to_ascii(), RecordType::PTR)).await;
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert_eq!(only_a(&tcp(&mut s, &query("bob.q2q.", RecordType::A)).await).octets()[0], 100);
        let took = t.elapsed();
        assert!(took < Duration::from_millis(50), "REFUSED, PTR and TCP took {took:?}");
    }
    assert_eq!(slow.running.load(Ordering::SeqCst), 1, "still waiting");

    let (r, took) = waiting.await.unwrap();
    only_a(&r);
    assert!(took >= Duration::from_millis(1400), "{took:?}");
    only_aaaa(&waiting_tcp.await.unwrap());
    assert_eq!(slow.calls.load(Ordering::SeqCst), 1, "one look-up for both queries");
}

#[tokio::test]
async fn lookups_in_flight_are_capped_and_time_out() {
    let slow = SlowLookup { delay: Duration::from_secs(30), ..SlowLookup::default() };
    let config = ServerConfig {
        max_lookups: 4,
        lookup_timeout: Duration::from_millis(800),
        ..ServerConfig::default()
    };
    let (addr, _shim) = start_with(PoolConfig::default(), slow.clone(), config).await;
    let t = Instant::now();
    let waiting: Vec<_> = (0..4)
        .map(|i| udp_in_background(addr, query(&format!("slow-{i}.q2q."), RecordType::A)))
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(slow.running.load(Ordering::SeqCst), 4);
    // Beyond the cap: SERVFAIL at once (a resolver retries), no look-up started.
    for i in 4..20 {
        let t = Instant::now();
        let r = udp(addr, &query(&format!("slow-{i}.q2q."), RecordType::A)).await;
        assert_eq!(r.metadata.response_code, ResponseCode::ServFail);
        assert!(t.elapsed() < Duration::from_millis(50), "{:?}", t.elapsed());
    }
    only_a(&udp(addr, &query("alice.q2q.", RecordType::A)).await);
    assert_eq!(slow.most_at_once.load(Ordering::SeqCst), 4);
    assert_eq!(slow.calls.load(Ordering::SeqCst), 4);
    // The look-ups that never answer: SERVFAIL after the timeout, and their places free up.
    for w in waiting {
        let (r, took) = w.await.unwrap();
        assert_eq!(r.metadata.response_code, ResponseCode::ServFail);
        assert!(took >= Duration::from_millis(700) && took < Duration::from_secs(3), "{took:?}");
    }
    println!("4 look-ups timed out after {:?}", t.elapsed());
    let again = udp_in_background(addr, query("slow-again.q2q.", RecordType::A));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(slow.calls.load(Ordering::SeqCst), 5, "a place is free again");
    let (r, _) = again.await.unwrap();
    assert_eq!(r.metadata.response_code, ResponseCode::ServFail);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let mut s = new_shim(PoolConfig::default());
        let _ = s.answer(&bytes, SystemTime::now());
        let _ = s.answer_tcp(&bytes, SystemTime::now());
    }

    #[test]
    fn mutated_queries_never_panic(
        name in "[a-zA-Z0-9._-]{1,40}\\.q2q\\.",
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6),
        cut in any::<usize>(),
    ) {
        let mut s = new_shim(PoolConfig::default());
        let Ok(n) = Name::from_ascii(&name) else { return Ok(()) };
        let mut m = Message::query();
        m.add_query(Query::query(n, RecordType::A));
        let mut bytes = m.to_vec().unwrap();
        for (i, b) in flips {
            let len = bytes.len();
            bytes[i % len] ^= b;
        }
        bytes.truncate(cut % (bytes.len() + 1));
        if let Some(r) = s.answer(&bytes, SystemTime::now()) {
            prop_assert!(r.len() <= 512);
            prop_assert!(r.len() >= 12);
        }
    }
}

/// A DNS server on `ip` (any port): `_q2q._tcp.far.example SRV 0 0 8788 srv.far.example.`,
/// NXDOMAIN for anything else; or, `silent`, never a word (a shim stuck on the very look-up
/// that waits). Counts the queries it gets.
async fn loopback_dns(ip: &str, silent: bool) -> (SocketAddr, Arc<AtomicUsize>) {
    use hickory_proto::rr::Record;
    use hickory_proto::rr::rdata::SRV;
    let sock = UdpSocket::bind((ip, 0)).await.unwrap();
    let addr = sock.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = sock.recv_from(&mut buf).await {
            seen.fetch_add(1, Ordering::SeqCst);
            let Ok(q) = Message::from_vec(&buf[..n]) else { continue };
            if silent {
                continue;
            }
            let mut r = Message::response(q.metadata.id, q.metadata.op_code);
            r.metadata.recursion_desired = q.metadata.recursion_desired;
            r.metadata.recursion_available = true;
            if let Some(query) = q.queries.first() {
                r.add_query(query.clone());
                let ours = query.name.to_ascii().eq_ignore_ascii_case("_q2q._tcp.far.example.");
                if ours && query.query_type == RecordType::SRV {
                    let srv = SRV::new(0, 0, 8788, Name::from_ascii("srv.far.example.").unwrap());
                    r.add_answer(Record::from_rdata(query.name.clone(), 60, RData::SRV(srv)));
                } else if !ours {
                    r.metadata.response_code = ResponseCode::NXDomain;
                }
            }
            let _ = sock.send_to(&r.to_vec().unwrap(), from).await;
        }
    });
    (addr, count)
}

/// The daemon's own look-ups of domain servers never ask the shim: resolv.conf as `up`
/// leaves it (our marker and the shim first), read back the way the daemon reads it.
#[tokio::test]
async fn the_daemons_own_lookups_skip_the_shim() {
    use q2q::client::discover;
    use q2q::daemon::resolver::{self, Paths, Wanted};
    let (shim, shim_asked) = loopback_dns("127.0.0.1", true).await;
    let (dns, dns_asked) = loopback_dns("127.0.0.2", false).await;
    let dir = tempfile::tempdir().unwrap();
    let paths = Paths::sandbox(dir.path());
    std::fs::write(&paths.resolv_conf, "nameserver 127.0.0.2\noptions timeout:2 attempts:1\n")
        .unwrap();
    resolver::install(&paths, Wanted::ResolvConf, "q2q0", shim.ip()).await.unwrap();
    let text = std::fs::read(&paths.resolv_conf).unwrap();
    assert!(text.starts_with(b"# q2q-tun"), "the shim is first");
    // resolv.conf has no ports: point each address at its loopback server's.
    let ports = |config: &mut hickory_resolver::config::ResolverConfig| {
        for ns in &mut config.name_servers {
            let port = if ns.ip == shim.ip() { shim.port() } else { dns.port() };
            ns.connections.iter_mut().for_each(|c| c.port = port);
        }
    };
    let far = Domain::parse("far.example").unwrap();

    let (mut config, opts) = discover::settings_without_shim(&text, &[]).unwrap();
    assert_eq!(config.name_servers().len(), 1);
    ports(&mut config);
    let ours = discover::build(config, opts).unwrap();
    let t = Instant::now();
    let found = discover::srv_with(&ours, &far).await.unwrap();
    let took = t.elapsed();
    assert_eq!(found[0].addr, "srv.far.example:8788");
    assert_eq!(shim_asked.load(Ordering::SeqCst), 0, "the shim was asked");
    assert!(took < Duration::from_millis(500), "{took:?}");
    println!("SRV through the daemon's resolver in {took:?}, the shim asked 0 times");
    // Cached: the same question and a negative one again cost nothing.
    let before = dns_asked.load(Ordering::SeqCst);
    discover::srv_with(&ours, &far).await.unwrap();
    let none = Domain::parse("none.example").unwrap();
    assert!(discover::srv_with(&ours, &none).await.is_err());
    let asked = dns_asked.load(Ordering::SeqCst);
    assert!(discover::srv_with(&ours, &none).await.is_err());
    assert_eq!(dns_asked.load(Ordering::SeqCst), asked, "the negative answer is cached");
    assert_eq!(asked, before + 1, "the positive answer is cached");

    // The same file read as-is (what the system resolver does) asks the shim.
    let (mut config, opts) = hickory_resolver::system_conf::parse_resolv_conf(&text).unwrap();
    ports(&mut config);
    let plain = discover::build(config, opts).unwrap();
    let _ = discover::srv_with(&plain, &far).await;
    assert!(shim_asked.load(Ordering::SeqCst) > 0, "unfiltered, the shim is asked");
    resolver::restore(&paths).await.unwrap();
}
