//! TLS 1.3 with q2q identities over real PTCP streams on 127.0.0.1: the positive case and
//! each way an identity can be wrong, with the reason named.

#[path = "ptcp_common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use q2q::address::{Domain, Q2qAddress};
use q2q::identity::{DomainCa, IdentityError, generate_key, signing_request};
use q2q::ptcp::tls::{self, Identity, TlsError, Trust, TrustMap};
use q2q::ptcp::{Config, PtcpSession};
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn addr(s: &str) -> Q2qAddress {
    Q2qAddress::parse(s).unwrap()
}

fn domain(s: &str) -> Domain {
    Domain::parse(s).unwrap()
}

fn user(ca: &DomainCa, who: &str) -> (Identity, String) {
    let key = generate_key().unwrap();
    let csr = signing_request(&key).unwrap();
    let issued = ca.issue_user(&addr(who), &csr, Duration::from_secs(3600)).unwrap();
    let id = Identity::new(vec![issued.der], PrivatePkcs8KeyDer::from(key.serialize_der()).into())
        .unwrap();
    (id, issued.info.serial)
}

/// A certificate for `who` signed by `ca` that expired yesterday, made with rcgen directly.
fn expired(ca: &DomainCa, who: &str) -> Identity {
    let issuer = rcgen::Issuer::from_ca_cert_pem(
        ca.cert_pem(),
        rcgen::KeyPair::from_pem(ca.key_pem()).unwrap(),
    )
    .unwrap();
    let key = generate_key().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(rcgen::DnType::CommonName, who);
    p.subject_alt_names = vec![rcgen::SanType::URI(addr(who).uri().try_into().unwrap())];
    p.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
    ];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::days(2);
    p.not_after = now - time::Duration::days(1);
    let cert = p.signed_by(&key, &issuer).unwrap();
    Identity::new(vec![cert.der().clone()], PrivatePkcs8KeyDer::from(key.serialize_der()).into())
        .unwrap()
}

struct World {
    ca: DomainCa,
    other_ca: DomainCa,
    alice: Identity,
    alice_serial: String,
    bob: Identity,
    bob_serial: String,
    a: PtcpSession,
    b: PtcpSession,
    _endpoints: (q2q::ptcp::Endpoint, q2q::ptcp::Endpoint),
}

async fn world() -> World {
    let ca = DomainCa::generate(&domain("example.com")).unwrap();
    let other_ca = DomainCa::generate(&domain("example.com")).unwrap();
    let (alice, alice_serial) = user(&ca, "alice@example.com");
    let (bob, bob_serial) = user(&ca, "bob@example.com");
    let (ea, a, eb, b) = pair(Config::default()).await;
    World { ca, other_ca, alice, alice_serial, bob, bob_serial, a, b, _endpoints: (ea, eb) }
}

/// Bob (session `b`) dials `expect` with `expect_ca`; `alice_id` answers on session `a`
/// trusting `trust`. Returns both outcomes.
async fn attempt(
    w: &World,
    alice_id: &Identity,
    bob_id: &Identity,
    expect: &str,
    expect_ca: CertificateDer<'static>,
    trust: Arc<dyn Trust>,
) -> (Result<Q2qAddress, TlsError>, Result<(), TlsError>) {
    let dial = async {
        let s = w.b.open_stream().await.unwrap();
        let mut t = tls::connect(s, bob_id, &addr(expect), expect_ca, tls::no_revocation()).await?;
        t.write_all(b"hi alice").await.map_err(TlsError::Io)?;
        t.shutdown().await.map_err(TlsError::Io)?;
        let mut got = Vec::new();
        t.read_to_end(&mut got).await.map_err(TlsError::Io)?;
        assert_eq!(got, b"hi bob");
        Ok(())
    };
    let answer = async {
        let s = w.a.accept().await.unwrap();
        let (mut t, caller) = tls::accept(s, alice_id, trust).await?;
        let mut got = Vec::new();
        t.read_to_end(&mut got).await.map_err(TlsError::Io)?;
        assert_eq!(got, b"hi alice");
        t.write_all(b"hi bob").await.map_err(TlsError::Io)?;
        t.shutdown().await.map_err(TlsError::Io)?;
        Ok(caller)
    };
    let (d, a) =
        tokio::time::timeout(Duration::from_secs(30), async { tokio::join!(dial, answer) })
            .await
            .unwrap();
    (a, d)
}

fn trust_example(ca: &DomainCa) -> Arc<dyn Trust> {
    Arc::new(TrustMap::new().with_ca(domain("example.com"), ca.cert_der().clone()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_identities_verified_and_caller_learnt() {
    let w = world().await;
    let (acc, dial) = attempt(
        &w,
        &w.alice,
        &w.bob,
        "alice@example.com",
        w.ca.cert_der().clone(),
        trust_example(&w.ca),
    )
    .await;
    dial.unwrap();
    assert_eq!(acc.unwrap(), addr("bob@example.com"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acceptor_from_another_ca_is_refused() {
    let w = world().await;
    let (impostor, _) = user(&w.other_ca, "alice@example.com");
    let (_, dial) = attempt(
        &w,
        &impostor,
        &w.bob,
        "alice@example.com",
        w.ca.cert_der().clone(),
        trust_example(&w.ca),
    )
    .await;
    let e = dial.unwrap_err();
    assert!(matches!(e, TlsError::Identity(IdentityError::OtherCa { .. })), "{e:?}");
    assert_eq!(e.to_string(), "the certificate is not signed by example.com's CA");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acceptor_with_another_name_is_refused() {
    let w = world().await;
    let (_, dial) = attempt(
        &w,
        &w.alice,
        &w.bob,
        "carol@example.com",
        w.ca.cert_der().clone(),
        trust_example(&w.ca),
    )
    .await;
    let e = dial.unwrap_err();
    assert_eq!(e.to_string(), "the certificate is for alice@example.com, not carol@example.com");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_certificates_are_refused_on_both_sides() {
    let w = world().await;
    let old_alice = expired(&w.ca, "alice@example.com");
    let (_, dial) = attempt(
        &w,
        &old_alice,
        &w.bob,
        "alice@example.com",
        w.ca.cert_der().clone(),
        trust_example(&w.ca),
    )
    .await;
    assert_eq!(dial.unwrap_err().to_string(), "the certificate of alice@example.com has expired");
    let old_bob = expired(&w.ca, "bob@example.com");
    let (acc, dial) = attempt(
        &w,
        &w.alice,
        &old_bob,
        "alice@example.com",
        w.ca.cert_der().clone(),
        trust_example(&w.ca),
    )
    .await;
    assert_eq!(acc.unwrap_err().to_string(), "the certificate of bob@example.com has expired");
    let e = dial.unwrap_err();
    assert!(matches!(e, TlsError::RejectedByPeer(ref a) if a.contains("Expired")), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_caller_is_refused_and_told() {
    let w = world().await;
    let trust: Arc<dyn Trust> = Arc::new(
        TrustMap::new()
            .with_ca(domain("example.com"), w.ca.cert_der().clone())
            .with_revoked(&w.bob_serial),
    );
    let (acc, dial) =
        attempt(&w, &w.alice, &w.bob, "alice@example.com", w.ca.cert_der().clone(), trust).await;
    let e = acc.unwrap_err();
    assert!(matches!(e, TlsError::Revoked { .. }), "{e:?}");
    assert!(e.to_string().starts_with("the certificate of bob@example.com (serial"), "{e}");
    let e = dial.unwrap_err();
    assert!(matches!(e, TlsError::RejectedByPeer(ref a) if a.contains("Revoked")), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_acceptor_is_refused_by_the_dialer() {
    let w = world().await;
    let s = w.b.open_stream().await.unwrap();
    let revoked_serial = w.alice_serial.clone();
    let check: tls::RevocationCheck = Arc::new(move |s| s == revoked_serial);
    let alice = addr("alice@example.com");
    let dial = tls::connect(s, &w.bob, &alice, w.ca.cert_der().clone(), check);
    let answer = async {
        let s = w.a.accept().await.unwrap();
        tls::accept(s, &w.alice, trust_example(&w.ca)).await
    };
    let (d, _a) = tokio::join!(dial, answer);
    let e = d.unwrap_err();
    assert!(matches!(e, TlsError::Revoked { .. }), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caller_from_an_untrusted_domain_is_refused() {
    let w = world().await;
    let other = DomainCa::generate(&domain("other.org")).unwrap();
    let (mallory, _) = user(&other, "mallory@other.org");
    let (acc, _) = attempt(
        &w,
        &w.alice,
        &mallory,
        "alice@example.com",
        w.ca.cert_der().clone(),
        trust_example(&w.ca),
    )
    .await;
    assert_eq!(acc.unwrap_err().to_string(), "no CA is trusted for other.org");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn works_over_kernel_tcp_too() {
    let ca = DomainCa::generate(&domain("example.com")).unwrap();
    let (alice, _) = user(&ca, "alice@example.com");
    let (bob, _) = user(&ca, "bob@example.com");
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = l.local_addr().unwrap();
    let trust = trust_example(&ca);
    let server = tokio::spawn(async move {
        let (s, _) = l.accept().await.unwrap();
        let (mut t, caller) = tls::accept(s, &alice, trust).await.unwrap();
        t.write_all(caller.to_string().as_bytes()).await.unwrap();
        t.shutdown().await.unwrap();
    });
    let s = tokio::net::TcpStream::connect(at).await.unwrap();
    let mut t = tls::connect(
        s,
        &bob,
        &addr("alice@example.com"),
        ca.cert_der().clone(),
        tls::no_revocation(),
    )
    .await
    .unwrap();
    let mut got = String::new();
    t.read_to_string(&mut got).await.unwrap();
    assert_eq!(got, "bob@example.com");
    server.await.unwrap();
}
