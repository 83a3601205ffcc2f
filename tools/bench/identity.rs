//! Identity-server throughput on loopback: full registrations (TLS connect, hello,
//! identify, register, key generation, sign, verify, store) and signings of existing
//! accounts, each at a few concurrency levels. Run with `tools/bench/run identity`.

use q2q::address::Q2qAddress;
use q2q::client::{self, ConnectOptions, Home};
use q2q::server::{self, DataDir, Registration, ServerConfig};
use std::time::Instant;

const PW: &str = "benchmark password";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(200);
    let dir = tempfile::tempdir()?;
    // Every client comes from 127.0.0.1: lift the per-address limits.
    let config = ServerConfig {
        listen: "127.0.0.1:0".parse()?,
        registration: Registration::Open,
        // Loopback, like every server of the bench (a real server refuses it for federation).
        federation_allow: vec![server::config::Network::parse("127.0.0.0/8")?],
        max_connections_per_address: 4096,
        registration_limit: server::config::RegistrationLimit {
            per_address_burst: 1_000_000,
            per_address_every_secs: 1,
            overall_burst: 1_000_000,
            overall_every_secs: 1,
        },
        ..Default::default()
    };
    let d = DataDir::init(&dir.path().join("srv"), &"bench.example".parse()?, &config)?;
    let running = server::start(d, config).await?;
    let opts = ConnectOptions { server: Some(running.tcp_addr.to_string()), ..Default::default() };
    println!(
        "identity server on {} ({} cores), {n} operations per row",
        running.tcp_addr,
        num_cpus()
    );
    println!("{:<44} {:>12} {:>12}", "operation", "concurrency", "per second");
    for (round, concurrency) in [1usize, 8, 32].into_iter().enumerate() {
        let rate = run(n, concurrency, &opts, dir.path(), round, false).await?;
        println!(
            "{:<44} {:>12} {:>12.1}",
            "register (new account + certificate)", concurrency, rate
        );
        let rate = run(n, concurrency, &opts, dir.path(), round, true).await?;
        println!(
            "{:<44} {:>12} {:>12.1}",
            "sign (existing account, new certificate)", concurrency, rate
        );
    }
    running.shutdown().await;
    Ok(())
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// `n` operations, `concurrency` at a time; operations per second.
async fn run(
    n: usize,
    concurrency: usize,
    opts: &ConnectOptions,
    root: &std::path::Path,
    round: usize,
    existing: bool,
) -> anyhow::Result<f64> {
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(concurrency));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let permit = sem.clone().acquire_owned().await?;
        let opts = opts.clone();
        let home = Home::new(root.join(format!("home-{round}-{i}")));
        let address = Q2qAddress::parse(&format!("u{round}x{i}@bench.example"))?;
        tasks.spawn(async move {
            let r = client::register(&home, &address, PW, None, existing, &opts).await;
            drop(permit);
            r.map(drop)
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}
