//! The identity server at scale, on loopback: N logged-in clients (default 10,000), each
//! with its own certificate, one TLS control connection listening for a service, and UDP
//! keepalives (a who-am-i every 25 s from its own UDP socket, like a node). Prints the
//! server's RSS before and after, logins per second, and the server's CPU at rest while
//! the clients keep alive. The server runs in a child process (this program, re-run with
//! `--serve DIR`), so its RSS and CPU are its own. Run with `tools/bench/run scale`.
//!
//! Certificates are issued straight from the domain CA (the registration path, with its
//! argon2 password hash per account, is measured by `bench-identity`). Each client needs two
//! file descriptors here and the server one: as root the open-file limit is raised to fit;
//! otherwise N is cut to what the hard limit allows, and the table says so.

use anyhow::{Context, bail};
use q2q::address::Q2qAddress;
use q2q::client::{self, ConnectOptions, Home, ServerConn, StoredIdentity};
use q2q::proto::commands::{Listen, Ping};
use q2q::server::{self, DataDir, Registration, ServerConfig};
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const DOMAIN: &str = "scale.example";
/// How often each client keeps alive (the node's interval).
const KEEPALIVE: Duration = Duration::from_secs(25);
/// Log-ins in flight at once.
const CONCURRENCY: usize = 64;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("--serve") => return serve(Path::new(args.get(2).context("--serve DIR")?)).await,
        Some("--clients") => return clients(&args[2..]).await,
        _ => {}
    }
    let n: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(10_000);
    let rest = Duration::from_secs(
        std::env::var("BENCH_REST_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(60),
    );
    raise_fd_limit(n as u64 + 1024)?;

    let tmp = tempfile::tempdir()?;
    let srv_dir = tmp.path().join("srv");
    let config = ServerConfig {
        listen: "127.0.0.1:0".parse()?,
        second_udp_port: None,
        registration: Registration::Closed,
        // Every client comes from 127.0.0.1.
        max_connections: n + 1024,
        max_connections_per_address: n + 1024,
        federation_allow: vec![server::config::Network::parse("127.0.0.0/8")?],
        ..Default::default()
    };
    drop(DataDir::init(&srv_dir, &DOMAIN.parse()?, &config)?);

    let mut server = Child::start(&["--serve".into(), srv_dir.display().to_string()])?;
    let tcp = server.expect("tcp")?;
    let udp = server.expect("udp")?;
    let pid = server.pid();
    let rss_empty = rss(pid)?;

    // The clients, in processes of at most PER_PROCESS each (two descriptors a client).
    let mut workers = Vec::new();
    let (mut from, mut issue_secs) = (0usize, 0f64);
    while from < n {
        let count = PER_PROCESS.min(n - from);
        let home = tmp.path().join(format!("home-{from}"));
        let args = [&srv_dir.display().to_string(), &home.display().to_string(), &tcp, &udp]
            .map(|s| s.to_string());
        let mut w = Child::start(
            &[&["--clients".to_string()][..], &args, &[from.to_string(), count.to_string()]]
                .concat(),
        )?;
        issue_secs += w.expect("issued")?.parse::<f64>()?;
        workers.push(w);
        from += count;
    }
    let start = Instant::now();
    for w in &mut workers {
        w.say("go")?;
    }
    let (mut logged_in, mut failed) = (0usize, 0usize);
    for w in &mut workers {
        let line = w.expect("logged-in")?;
        let mut it = line.split_whitespace().map(str::parse::<usize>);
        logged_in += it.next().context("ok count")??;
        failed += it.next().context("failed count")??;
    }
    let login_secs = start.elapsed().as_secs_f64();
    let rss_full = rss(pid)?;

    // At rest: nothing but the keepalives.
    let (cpu0, t0) = (cpu_ticks(pid)?, Instant::now());
    tokio::time::sleep(rest).await;
    let cpu = (cpu_ticks(pid)? - cpu0) as f64 / ticks_per_sec() / t0.elapsed().as_secs_f64();
    let rss_rest = rss(pid)?;
    let hwm = status_kib(pid, "VmHWM:")?;
    let mut keepalive_failures = 0u64;
    for w in &mut workers {
        w.say("stop")?;
        keepalive_failures += w.expect("failures")?.parse::<u64>()?;
    }

    let mib = |kib: u64| kib as f64 / 1024.0;
    let row = |what: &str, value: String| println!("{what:<52} {value:>14}");
    println!("identity server on {tcp}, {logged_in} of {n} clients logged in");
    row("measure", "value".into());
    row("certificates issued per second (CA, one core)", format!("{:.0}", n as f64 / issue_secs));
    row("log-ins per second (TLS + hello + listen + UDP)", format!("{:.0}", n as f64 / login_secs));
    row("failed log-ins", failed.to_string());
    row("server RSS with no clients (MiB)", format!("{:.1}", mib(rss_empty)));
    row("server RSS, all logged in (MiB)", format!("{:.1}", mib(rss_full)));
    row(
        &format!("server RSS after {} s at rest (MiB)", rest.as_secs()),
        format!("{:.1}", mib(rss_rest)),
    );
    row("server peak RSS, VmHWM (MiB)", format!("{:.1}", mib(hwm)));
    if logged_in > 0 {
        let per = rss_rest.saturating_sub(rss_empty) as f64 / logged_in as f64;
        row("server RSS per logged-in client (KiB)", format!("{per:.1}"));
    }
    row("server CPU at rest (% of one core)", format!("{:.2}", cpu * 100.0));
    row("keepalives that failed at rest", keepalive_failures.to_string());
    println!("goal: RSS under 500 MiB with 10,000 clients");
    for w in workers {
        w.finish();
    }
    server.finish();
    Ok(())
}

/// Clients one process holds (two file descriptors each: well inside a 20,000 limit).
const PER_PROCESS: usize = 4000;

/// A child process of this program, spoken to by lines on stdin and stdout.
struct Child {
    process: std::process::Child,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl Child {
    fn start(args: &[String]) -> anyhow::Result<Child> {
        let mut process = std::process::Command::new(std::env::current_exe()?)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let lines = BufReader::new(process.stdout.take().context("child stdout")?).lines();
        Ok(Child { process, lines })
    }

    fn pid(&self) -> u32 {
        self.process.id()
    }

    /// The rest of the next line, which must start with `what`.
    fn expect(&mut self, what: &str) -> anyhow::Result<String> {
        let line = self.lines.next().context("a child process ended")??;
        line.strip_prefix(what)
            .map(|r| r.trim().to_string())
            .with_context(|| format!("expected `{what} …` from a child process, got {line:?}"))
    }

    fn say(&mut self, line: &str) -> anyhow::Result<()> {
        let stdin = self.process.stdin.as_mut().context("child stdin")?;
        writeln!(stdin, "{line}")?;
        Ok(stdin.flush()?)
    }

    /// Close its stdin (it stops) and wait for it.
    fn finish(mut self) {
        drop(self.process.stdin.take());
        let _ = self.process.wait();
    }
}

/// A client process: `--clients SRV_DIR HOME TCP UDP FROM COUNT`. Issues its identities
/// (`issued SECS`), logs them all in on `go` (`logged-in OK FAILED`), keeps them alive
/// until `stop` (`failures N`).
async fn clients(args: &[String]) -> anyhow::Result<()> {
    let [srv_dir, home, tcp, udp, from, count] = args else {
        bail!("--clients SRV_DIR HOME TCP UDP FROM COUNT");
    };
    let (udp, from, count): (SocketAddr, usize, usize) =
        (udp.parse()?, from.parse()?, count.parse()?);
    raise_fd_limit(2 * count as u64 + 256)?;
    let ca = DataDir::open(Path::new(srv_dir))?.ca;
    let start = Instant::now();
    let identities = issue(&ca, from, count)?;
    let mut out = std::io::stdout();
    writeln!(out, "issued {}", start.elapsed().as_secs_f64())?;
    let mut commands =
        tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(tokio::io::stdin()));
    if commands.next_line().await?.as_deref() != Some("go") {
        return Ok(());
    }

    let home = Home::new(home);
    home.pin_ca(ca.domain(), ca.cert_der())?;
    let stop = tokio::sync::watch::channel(false);
    let failures = Arc::new(AtomicU64::new(0));
    let sem = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    let mut logins = tokio::task::JoinSet::new();
    for id in identities {
        let permit = sem.clone().acquire_owned().await?;
        let (home, mut stop, failures) = (home.clone(), stop.1.clone(), failures.clone());
        let opts = ConnectOptions {
            server: Some(tcp.clone()),
            login: Some(Arc::new(id)),
            ..Default::default()
        };
        logins.spawn(async move {
            let client = log_in(&home, &opts, udp).await;
            drop(permit);
            let (conn, socket) = client?;
            // Keep alive until told to stop; from a random phase, like nodes started
            // at different times.
            let phase = KEEPALIVE.mul_f64(rand::random::<f64>());
            tokio::spawn(async move {
                let mut next = tokio::time::Instant::now() + phase;
                loop {
                    tokio::select! {
                        _ = stop.changed() => return,
                        _ = tokio::time::sleep_until(next) => {}
                    }
                    next += KEEPALIVE;
                    let ping = conn.call(&Ping {}).await;
                    let udp_ok = client::udp_who_am_i(&socket, udp).await;
                    if ping.is_err() || udp_ok.is_err() {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
            anyhow::Ok(())
        });
    }
    let (mut ok, mut failed) = (0usize, 0usize);
    while let Some(r) = logins.join_next().await {
        match r? {
            Ok(()) => ok += 1,
            Err(e) => {
                if failed == 0 {
                    eprintln!("first failed log-in: {e:#}");
                }
                failed += 1;
            }
        }
    }
    writeln!(out, "logged-in {ok} {failed}")?;
    let _ = commands.next_line().await;
    let _ = stop.0.send(true);
    writeln!(out, "failures {}", failures.load(Ordering::Relaxed))?;
    Ok(())
}

/// The child: serve the data directory until stdin closes.
async fn serve(dir: &Path) -> anyhow::Result<()> {
    let data = DataDir::open(dir)?;
    let config = ServerConfig::load(&data.config_path())?;
    let running = server::start(data, config).await?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "tcp {}", running.tcp_addr)?;
    writeln!(out, "udp {}", running.udp_addr)?;
    out.flush()?;
    drop(out);
    tokio::task::spawn_blocking(|| {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
    })
    .await?;
    running.shutdown().await;
    Ok(())
}

/// Log one client in: TLS with its certificate, hello, listen, and a UDP who-am-i.
async fn log_in(
    home: &Home,
    opts: &ConnectOptions,
    udp: SocketAddr,
) -> anyhow::Result<(ServerConn, tokio::net::UdpSocket)> {
    let domain = DOMAIN.parse()?;
    let conn = ServerConn::connect(home, &domain, opts).await?;
    conn.call(&Listen { service: "scale".parse()?, description: None }).await?;
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    client::udp_who_am_i(&socket, udp).await?;
    Ok((conn, socket))
}

/// Identities `c{from}@…` to `c{from + count - 1}@…`, each a fresh key signed by `ca`.
fn issue(
    ca: &q2q::identity::DomainCa,
    from: usize,
    count: usize,
) -> anyhow::Result<Vec<StoredIdentity>> {
    (from..from + count)
        .map(|i| {
            let address = Q2qAddress::parse(&format!("c{i}@{DOMAIN}"))?;
            let key = q2q::identity::generate_key()?;
            let csr = q2q::identity::signing_request(&key)?;
            let cert = ca.issue_user(&address, &csr, Duration::from_secs(86_400))?;
            Ok(StoredIdentity {
                address,
                cert_pem: cert.pem,
                key_pem: key.serialize_pem(),
                server: None,
                info: cert.info,
            })
        })
        .collect()
}

/// Raise the soft open-file limit to `need` (or the hard limit, if lower).
fn raise_fd_limit(need: u64) -> anyhow::Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < need {
        setrlimit(Resource::RLIMIT_NOFILE, need.min(hard), hard)?;
    }
    if need > hard {
        bail!("{need} open files needed, the hard limit is {hard}: ask for fewer clients");
    }
    Ok(())
}

/// A `/proc/PID/status` field, in KiB.
fn status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

fn rss(pid: u32) -> anyhow::Result<u64> {
    status_kib(pid, "VmRSS:")
}

/// User plus system CPU time of `pid`, in clock ticks (`/proc/PID/stat` fields 14, 15).
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name is in parentheses and may hold spaces: count after the last ')'.
    let after = stat.rsplit_once(')').map(|(_, r)| r).context("malformed stat")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |i: usize| -> anyhow::Result<u64> {
        // Field 3 (state) is fields[0] here.
        Ok(fields.get(i - 3).context("short stat")?.parse()?)
    };
    Ok(field(14)? + field(15)?)
}

fn ticks_per_sec() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100) as f64
}
