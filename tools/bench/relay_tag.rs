//! The cost of the relay's per-datagram tag, in ns per datagram of `SIZE` inner bytes (1400
//! by default: a full PTCP datagram): the relay framing as the library does it
//! (`relay::seal` as the server seals for an end, `relay::Leg::open_in_place` as an end checks
//! one, with its replay window), and beside it the bare primitives with ring on this CPU:
//! the former tag (HMAC-SHA256 over direction, token, counter and the inner datagram),
//! AES-256-GMAC (AES-256-GCM with no plaintext, header and inner datagram as associated
//! data), ChaCha20-Poly1305 used the same way, and AES-256-GCM with the inner datagram as
//! plaintext (what `relay::seal` does), and a copy of the datagram for scale. One thread,
//! figures only (no pass or fail).
//!
//! `cargo run --release --example bench-relay-tag [SIZE] [datagrams, default 1000000]`
use q2q::relay::{self, Direction, Key, Leg};
use ring::{aead, hmac};
use std::hint::black_box;
use std::time::Instant;

fn per_datagram(n: u64, mut f: impl FnMut(u64)) -> f64 {
    // A warm-up, then the timed run.
    for i in 0..n / 10 {
        f(i);
    }
    let t = Instant::now();
    for i in 0..n {
        f(i);
    }
    t.elapsed().as_nanos() as f64 / n as f64
}

fn main() {
    let mut args = std::env::args().skip(1);
    let size: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(1400);
    let n: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(1_000_000);
    let raw = [7u8; relay::KEY_LEN];
    let token = [9u8; relay::TOKEN_LEN];
    let inner = vec![0x5au8; size];

    let row = |what: &str, ns: f64| {
        let gbit = size as f64 * 8.0 / ns;
        println!("{what:<44} {ns:8.1} ns  {gbit:7.2} Gbit/s of inner bytes");
    };
    println!("relay tag, {size}-byte inner datagrams, {n} each, one thread");

    let key = hmac::Key::new(hmac::HMAC_SHA256, &raw);
    row(
        "HMAC-SHA256 (the former tag), ring",
        per_datagram(n, |i| {
            let mut ctx = hmac::Context::with_key(&key);
            ctx.update(&[Direction::ToClient as u8]);
            ctx.update(&token);
            ctx.update(&i.to_be_bytes());
            ctx.update(&inner);
            black_box(ctx.sign());
        }),
    );

    let aead_key =
        |alg| aead::LessSafeKey::new(aead::UnboundKey::new(alg, &raw).expect("a 32-byte key"));
    // One AEAD seal per datagram, nonce 0 ‖ counter: `aad` as associated data, `body`
    // (maybe empty) encrypted in place; only the tag is kept.
    let tag_of = |key: &aead::LessSafeKey, i: u64, aad: &[u8], body: &mut [u8]| {
        let mut nonce = [0u8; aead::NONCE_LEN];
        nonce[4..].copy_from_slice(&i.to_be_bytes());
        let nonce = aead::Nonce::assume_unique_for_key(nonce);
        let tag = key.seal_in_place_separate_tag(nonce, aead::Aad::from(aad), body);
        let _ = black_box(tag.expect("seals a datagram"));
    };
    let (gcm, poly) = (aead_key(&aead::AES_256_GCM), aead_key(&aead::CHACHA20_POLY1305));
    let aad = vec![0u8; relay::OVERHEAD - relay::TAG_LEN + size];
    let head = &aad[..relay::OVERHEAD - relay::TAG_LEN];
    let mut body = inner.clone();
    row("AES-256-GMAC, ring (contiguous AAD)", per_datagram(n, |i| tag_of(&gcm, i, &aad, &mut [])));
    row(
        "ChaCha20-Poly1305 MAC, ring (contiguous AAD)",
        per_datagram(n, |i| tag_of(&poly, i, &aad, &mut [])),
    );
    row(
        "AES-256-GCM, ring (inner encrypted, head AAD)",
        per_datagram(n, |i| tag_of(&gcm, i, head, &mut body)),
    );
    let mut copy = Vec::with_capacity(aad.len());
    row(
        "a copy of the datagram (for scale)",
        per_datagram(n, |_| {
            copy.clear();
            copy.extend_from_slice(black_box(&aad));
            black_box(&copy);
        }),
    );

    let key = Key::from_bytes(&raw);
    let mut out = Vec::with_capacity(relay::OVERHEAD + size);
    row(
        "relay::seal (the server to an end)",
        per_datagram(n, |i| {
            out.clear();
            relay::seal(&mut out, &key, Direction::ToClient, &token, i + 1, &inner);
            black_box(&out);
        }),
    );

    // Datagrams sealed ahead (not timed), then each checked once by an end.
    let batch = 4096u64;
    let sealed: Vec<Vec<u8>> = (1..=batch)
        .map(|c| {
            let mut d = Vec::new();
            relay::seal(&mut d, &key, Direction::ToClient, &token, c, &inner);
            d
        })
        .collect();
    let mut leg = Leg::new(token, key.clone());
    let mut ok = 0u64;
    let mut buf = Vec::with_capacity(size + relay::OVERHEAD);
    let open = per_datagram(n, |i| {
        let c = i % batch;
        if c == 0 {
            leg = Leg::new(token, key.clone());
        }
        // Opened in place, so each round opens a fresh copy (as a receive buffer holds it).
        buf.clear();
        buf.extend_from_slice(&sealed[c as usize]);
        ok += u64::from(leg.open_in_place(&mut buf).is_ok());
    });
    row("relay::Leg::open_in_place (an end checks one, after a copy)", open);
    assert!(ok > 0, "no datagram opened");
}
