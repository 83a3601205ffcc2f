//! Prometheus metrics of a running server, served over HTTP at `/metrics` on the address
//! `metrics` names in config.toml (off by default) by `metrics-exporter-prometheus`.
//!
//! Each server has its own recorder (no process-wide global), so several servers in one
//! process (tests) count apart. The names:
//!
//! | metric | type | what |
//! |---|---|---|
//! | `q2q_logins_total` | counter | certificate log-ins accepted |
//! | `q2q_live_sessions` | gauge | control connections logged in now |
//! | `q2q_open_connections` | gauge | control connections open now (logged in or not) |
//! | `q2q_inbound_requests_total` | counter | `inbound` requests (a caller asking for a callee) |
//! | `q2q_relay_legs_total` | counter | relay legs set up (two per relayed session) |
//! | `q2q_relayed_bytes_total` | counter | bytes forwarded by the relay (UDP and over TCP) |
//! | `q2q_registrations_total` | counter | accounts registered |
//! | `q2q_refusals_total{reason}` | counter | requests answered with an error, by its code (`RATE_LIMITED`, `BAD_CERTIFICATE`, …), and connections refused at admission (`CONNECTION_LIMIT`) |
//! | `q2q_revoked_logins_dropped_total` | counter | live log-ins closed because their certificate was revoked |

use metrics::{Counter, Gauge, Key, Label, Level, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusRecorder};
use std::net::SocketAddr;

/// The reasons counted by name; any other code counts as `OTHER` (a callee's node may
/// answer codes of its choosing, and labels must stay few).
const REASONS: &[&str] = &[
    crate::proto::code::UNHANDLED,
    crate::proto::code::UNSUPPORTED_VERSION,
    crate::proto::code::HELLO_FIRST,
    crate::proto::code::BAD_REQUEST,
    crate::proto::code::WRONG_DOMAIN,
    crate::proto::code::ADDRESS_TAKEN,
    crate::proto::code::REGISTRATION_CLOSED,
    crate::proto::code::BAD_INVITE,
    crate::proto::code::UNKNOWN_USER,
    crate::proto::code::WRONG_PASSWORD,
    crate::proto::code::RATE_LIMITED,
    crate::proto::code::INTERNAL,
    crate::proto::code::NOT_LOGGED_IN,
    crate::proto::code::BAD_CERTIFICATE,
    crate::proto::code::OFFLINE,
    crate::proto::code::NO_SUCH_SERVICE,
    crate::proto::code::NOT_AUTHORIZED,
    crate::proto::code::RELAY_LIMIT,
    CONNECTION_LIMIT,
];

/// The reason counted for a connection refused at admission.
pub const CONNECTION_LIMIT: &str = "CONNECTION_LIMIT";

/// Why the metrics endpoint could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot serve metrics on {addr}: {reason}")]
pub struct MetricsError {
    pub addr: SocketAddr,
    pub reason: String,
}

/// The server's counters (no-ops when metrics are off).
pub struct Metrics {
    recorder: Option<PrometheusRecorder>,
    pub logins: Counter,
    pub live_sessions: Gauge,
    pub open_connections: Gauge,
    pub inbound_requests: Counter,
    pub relay_legs: Counter,
    pub relayed_bytes: Counter,
    pub registrations: Counter,
    pub revoked_dropped: Counter,
}

static META: Metadata<'static> = Metadata::new(module_path!(), Level::INFO, None);

impl Metrics {
    /// Metrics off: every count is a no-op.
    pub fn off() -> Metrics {
        Metrics {
            recorder: None,
            logins: Counter::noop(),
            live_sessions: Gauge::noop(),
            open_connections: Gauge::noop(),
            inbound_requests: Counter::noop(),
            relay_legs: Counter::noop(),
            relayed_bytes: Counter::noop(),
            registrations: Counter::noop(),
            revoked_dropped: Counter::noop(),
        }
    }

    /// Metrics on, served at `http://addr/metrics` (bound now) by the returned future,
    /// which the caller runs (it serves until dropped).
    pub fn serve(
        addr: SocketAddr,
    ) -> Result<(Metrics, metrics_exporter_prometheus::ExporterFuture), MetricsError> {
        let (recorder, exporter) = PrometheusBuilder::new()
            .with_http_listener(addr)
            .build()
            .map_err(|e| MetricsError { addr, reason: e.to_string() })?;
        let counter = |name: &'static str, unit: Unit, help: &'static str| {
            recorder.describe_counter(name.into(), Some(unit), help.into());
            recorder.register_counter(&Key::from_static_name(name), &META)
        };
        let gauge = |name: &'static str, help: &'static str| {
            recorder.describe_gauge(name.into(), Some(Unit::Count), help.into());
            recorder.register_gauge(&Key::from_static_name(name), &META)
        };
        recorder.describe_counter(
            "q2q_refusals_total".into(),
            Some(Unit::Count),
            "requests answered with an error and connections refused, by reason".into(),
        );
        let metrics = Metrics {
            logins: counter("q2q_logins_total", Unit::Count, "certificate log-ins accepted"),
            live_sessions: gauge("q2q_live_sessions", "control connections logged in now"),
            open_connections: gauge("q2q_open_connections", "control connections open now"),
            inbound_requests: counter(
                "q2q_inbound_requests_total",
                Unit::Count,
                "inbound requests (a caller asking for a callee)",
            ),
            relay_legs: counter(
                "q2q_relay_legs_total",
                Unit::Count,
                "relay legs set up (two per relayed session)",
            ),
            relayed_bytes: counter(
                "q2q_relayed_bytes_total",
                Unit::Bytes,
                "bytes forwarded by the relay",
            ),
            registrations: counter("q2q_registrations_total", Unit::Count, "accounts registered"),
            revoked_dropped: counter(
                "q2q_revoked_logins_dropped_total",
                Unit::Count,
                "live log-ins closed because their certificate was revoked",
            ),
            recorder: Some(recorder),
        };
        // Every known reason shows from the start, at zero.
        for reason in REASONS {
            metrics.refusal_counter(reason).increment(0);
        }
        Ok((metrics, exporter))
    }

    fn refusal_counter(&self, reason: &str) -> Counter {
        let Some(r) = &self.recorder else { return Counter::noop() };
        let reason = REASONS.iter().find(|k| **k == reason).copied().unwrap_or("OTHER");
        let key = Key::from_parts("q2q_refusals_total", vec![Label::new("reason", reason)]);
        r.register_counter(&key, &META)
    }

    /// Count a refusal with error code `reason`.
    pub fn refusal(&self, reason: &str) {
        self.refusal_counter(reason).increment(1);
    }
}
