//! The identity server's state in PostgreSQL, shared by every instance of a domain
//! (`--database postgres://…`): the same tables as [`super::db`], plus the instances alive
//! and who is online at which instance ([`super::cluster`]).
//!
//! One connection for statements (reopened when it breaks); transactions hold it for their
//! duration. The schema is made at start under an advisory lock, so instances starting
//! together do not race.
//!
//! **TLS**: with `database_ca` (a PEM file of the CA that signed the PostgreSQL server's
//! certificate) every connection is TLS (`sslmode=require`, whatever the URL says) and the
//! server's certificate is verified against that CA and the URL's host name or address
//! (rustls, through tokio-postgres-rustls). Without it, connections are plain, as the URL
//! says nothing else we could check: then use a Unix socket or a trusted network (the
//! URL's `host=/run/postgresql` form, or loopback).

use super::db::{CertRecord, DbError, UserRecord, now};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Mutex;
use tokio_postgres::tls::TlsStream;
use tokio_postgres::{Client, Connection, NoTls, Socket};
use tracing::warn;

/// Schema version recorded in `meta` (`schema`), for migrations to come.
const SCHEMA_VERSION: &str = "1";

/// Key of the advisory lock held while the schema is made ("q2q" in ASCII).
const SCHEMA_LOCK: i64 = 0x0071_3271;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    created BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS certificates (
    serial TEXT PRIMARY KEY,
    identity TEXT NOT NULL,
    not_before BIGINT NOT NULL,
    not_after BIGINT NOT NULL,
    issued BIGINT NOT NULL,
    revoked BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE INDEX IF NOT EXISTS certificates_identity ON certificates(identity);
CREATE INDEX IF NOT EXISTS certificates_revoked ON certificates(serial) WHERE revoked;
CREATE TABLE IF NOT EXISTS renewals (
    serial TEXT PRIMARY KEY,
    previous TEXT NOT NULL,
    identity TEXT NOT NULL,
    at BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS renewals_identity ON renewals(identity, at);
CREATE TABLE IF NOT EXISTS invites (
    code TEXT PRIMARY KEY,
    created BIGINT NOT NULL,
    used_by TEXT
);
CREATE TABLE IF NOT EXISTS instances (
    id TEXT PRIMARY KEY,
    relay_host TEXT,
    relay_port INTEGER NOT NULL,
    last_seen BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS presence (
    address TEXT NOT NULL,
    service TEXT NOT NULL,
    instance TEXT NOT NULL,
    conn BIGINT NOT NULL,
    PRIMARY KEY (address, service)
);
CREATE INDEX IF NOT EXISTS presence_instance ON presence(instance, conn);
CREATE TABLE IF NOT EXISTS rate_limits (
    key TEXT PRIMARY KEY,
    tokens DOUBLE PRECISION NOT NULL,
    at_ms BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS rate_limits_at ON rate_limits(at_ms);
";

/// Where another instance's listener of an address is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remote {
    /// The instance's id (its notification channel is `q2q_<id>`).
    pub instance: String,
}

/// The open PostgreSQL store.
pub struct PgDb {
    target: Target,
    client: Mutex<Client>,
}

/// Where the database is and how connections to it are secured.
#[derive(Clone)]
pub struct Target {
    /// A libpq URL or key=value string; it may hold a password: never logged.
    url: String,
    /// TLS verified against the operator's CA, or None: plain.
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
}

impl Target {
    /// `url`, with TLS verified against the CA certificates in `ca_pem` (PEM) when given.
    ///
    /// # Errors
    /// [`DbError::Tls`] when `ca_pem` holds no usable CA certificate.
    pub fn new(url: &str, ca_pem: Option<&[u8]>) -> Result<Target, DbError> {
        let tls = match ca_pem {
            None => None,
            Some(pem) => {
                use rustls_pki_types::pem::PemObject;
                let mut roots = rustls::RootCertStore::empty();
                for cert in rustls_pki_types::CertificateDer::pem_slice_iter(pem) {
                    let cert = cert.map_err(|e| DbError::Tls(format!("database_ca: {e}")))?;
                    roots.add(cert).map_err(|e| DbError::Tls(format!("database_ca: {e}")))?;
                }
                if roots.is_empty() {
                    return Err(DbError::Tls("database_ca holds no certificate".into()));
                }
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                let config = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .map_err(|e| DbError::Tls(e.to_string()))?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                Some(tokio_postgres_rustls::MakeRustlsConnect::new(config))
            }
        };
        Ok(Target { url: url.to_string(), tls })
    }

    /// Whether connections are TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// A new connection, its messages (notifications) handed to `notes` if given, else
    /// dropped; driven on its own task until it breaks.
    async fn connect(
        &self,
        notes: Option<tokio::sync::mpsc::Sender<tokio_postgres::Notification>>,
    ) -> Result<Client, DbError> {
        let mut config: tokio_postgres::Config = self.url.parse()?;
        match &self.tls {
            None => {
                let (client, connection) = config.connect(NoTls).await?;
                tokio::spawn(drive(connection, notes));
                Ok(client)
            }
            Some(tls) => {
                config.ssl_mode(tokio_postgres::config::SslMode::Require);
                let (client, connection) = config.connect(tls.clone()).await?;
                tokio::spawn(drive(connection, notes));
                Ok(client)
            }
        }
    }
}

/// Drive `connection` until it ends, handing notifications to `notes` (if any).
async fn drive<T>(
    mut connection: Connection<Socket, T>,
    notes: Option<tokio::sync::mpsc::Sender<tokio_postgres::Notification>>,
) where
    T: AsyncRead + AsyncWrite + TlsStream + Unpin,
{
    use tokio_postgres::AsyncMessage;
    loop {
        match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            Some(Ok(AsyncMessage::Notification(n))) => {
                if let Some(tx) = &notes
                    && tx.send(n).await.is_err()
                {
                    return;
                }
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return warn!(error = %e, "database connection ended"),
            None => return,
        }
    }
}

/// The channel every instance listens on for revocations ([`notify_revoked`]).
pub const REVOCATIONS_CHANNEL: &str = "q2q_revocations";

/// Tell every instance, when `tx` commits, that the revocations changed: their watchers
/// publish the new list at once rather than at their next poll.
async fn notify_revoked(tx: &tokio_postgres::Transaction<'_>) -> Result<(), DbError> {
    tx.execute("SELECT pg_notify($1, '')", &[&REVOCATIONS_CHANNEL]).await?;
    Ok(())
}

/// The connection of instance `id` (16 hex digits) that receives its notifications
/// (`LISTEN q2q_<id>`, and [`REVOCATIONS_CHANNEL`]), handed to `tx` in order, and holds the advisory lock that says the
/// instance is alive: the lock goes with the connection, at once when the instance dies,
/// so no one asks a dead instance. Ends (dropping `tx`) when the connection breaks.
pub async fn listen(
    target: &Target,
    id: &str,
    tx: tokio::sync::mpsc::Sender<tokio_postgres::Notification>,
) -> Result<Client, DbError> {
    let client = target.connect(Some(tx)).await?;
    let key = u64::from_str_radix(id, 16).map_err(|_| DbError::Task(format!("bad id {id}")))?;
    // The channel name is q2q_ and hex digits (checked above), never a client's: safe to
    // splice.
    client.batch_execute(&format!("LISTEN q2q_{id}; LISTEN {REVOCATIONS_CHANNEL}")).await?;
    client.query_one("SELECT pg_advisory_lock($1)", &[&(key as i64)]).await?;
    Ok(client)
}

impl PgDb {
    /// Connect and make (or check) the schema. `url` is a libpq URL or key=value string;
    /// it may hold a password, so it is never logged.
    pub async fn open(target: Target) -> Result<PgDb, DbError> {
        let mut client = target.connect(None).await?;
        let tx = client.transaction().await?;
        // Not a notice per table that exists already.
        tx.batch_execute("SET LOCAL client_min_messages = warning").await?;
        tx.query_one("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK]).await?;
        tx.batch_execute(SCHEMA).await?;
        tx.execute(
            "INSERT INTO meta(key, value) VALUES ('schema', $1) ON CONFLICT (key) DO NOTHING",
            &[&SCHEMA_VERSION],
        )
        .await?;
        tx.commit().await?;
        Ok(PgDb { target, client: Mutex::new(client) })
    }

    /// Where it was opened (for the notification connection).
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Whether the statement connection is encrypted, as the server itself reports
    /// (`pg_stat_ssl`).
    pub async fn connection_is_tls(&self) -> Result<bool, DbError> {
        let c = self.client().await?;
        let row =
            c.query_opt("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[]).await?;
        Ok(row.map(|r| r.try_get(0)).transpose()?.unwrap_or(false))
    }

    /// The statement connection, reopened if it broke.
    async fn client(&self) -> Result<tokio::sync::MutexGuard<'_, Client>, DbError> {
        let mut c = self.client.lock().await;
        if c.is_closed() {
            *c = self.target.connect(None).await?;
        }
        Ok(c)
    }

    pub async fn meta(&self, key: &str) -> Result<Option<String>, DbError> {
        let c = self.client().await?;
        let row = c.query_opt("SELECT value FROM meta WHERE key = $1", &[&key]).await?;
        Ok(row.map(|r| r.try_get(0)).transpose()?)
    }

    pub async fn set_meta(&self, key: &str, value: &str) -> Result<(), DbError> {
        self.client()
            .await?
            .execute(
                "INSERT INTO meta(key, value) VALUES ($1, $2)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                &[&key, &value],
            )
            .await?;
        Ok(())
    }

    /// Set `key` to `value` unless it is set; the value it has afterwards.
    pub async fn meta_or_set(&self, key: &str, value: &str) -> Result<String, DbError> {
        let c = self.client().await?;
        c.execute(
            "INSERT INTO meta(key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
            &[&key, &value],
        )
        .await?;
        Ok(c.query_one("SELECT value FROM meta WHERE key = $1", &[&key]).await?.try_get(0)?)
    }

    pub async fn user_count(&self) -> Result<i64, DbError> {
        Ok(self.client().await?.query_one("SELECT count(*) FROM users", &[]).await?.try_get(0)?)
    }

    pub async fn add_user(
        &self,
        name: &str,
        hash: &str,
        invite: Option<&str>,
    ) -> Result<(), DbError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        if let Some(code) = invite {
            let n = tx
                .execute(
                    "UPDATE invites SET used_by = $1 WHERE code = $2 AND used_by IS NULL",
                    &[&name, &code],
                )
                .await?;
            if n != 1 {
                return Err(DbError::BadInvite);
            }
        }
        let n = tx
            .execute(
                "INSERT INTO users(name, password_hash, created) VALUES ($1, $2, $3)
                 ON CONFLICT (name) DO NOTHING",
                &[&name, &hash, &now()],
            )
            .await?;
        if n != 1 {
            return Err(DbError::UserExists);
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn password_hash(&self, name: &str) -> Result<Option<String>, DbError> {
        let c = self.client().await?;
        let row = c.query_opt("SELECT password_hash FROM users WHERE name = $1", &[&name]).await?;
        Ok(row.map(|r| r.try_get(0)).transpose()?)
    }

    pub async fn set_password_hash(&self, name: &str, hash: &str) -> Result<(), DbError> {
        let n = self
            .client()
            .await?
            .execute("UPDATE users SET password_hash = $2 WHERE name = $1", &[&name, &hash])
            .await?;
        if n == 1 { Ok(()) } else { Err(DbError::NoSuchUser) }
    }

    pub async fn remove_user(&self, name: &str, identity: &str) -> Result<(), DbError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        if tx.execute("DELETE FROM users WHERE name = $1", &[&name]).await? != 1 {
            return Err(DbError::NoSuchUser);
        }
        tx.execute("UPDATE certificates SET revoked = TRUE WHERE identity = $1", &[&identity])
            .await?;
        notify_revoked(&tx).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn list_users(&self, domain: &str) -> Result<Vec<UserRecord>, DbError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT u.name, u.created,
                    (SELECT count(*) FROM certificates c WHERE c.identity = u.name || '@' || $1)
                 FROM users u ORDER BY u.name",
                &[&domain],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| {
                Ok(UserRecord {
                    name: r.try_get(0)?,
                    created: r.try_get(1)?,
                    certificates: r.try_get(2)?,
                })
            })
            .collect::<Result<_, tokio_postgres::Error>>()?)
    }

    pub async fn record_certificate(&self, c: &CertRecord) -> Result<(), DbError> {
        self.client()
            .await?
            .execute(
                "INSERT INTO certificates(serial, identity, not_before, not_after, issued, revoked)
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[&c.serial, &c.identity, &c.not_before, &c.not_after, &now(), &c.revoked],
            )
            .await?;
        Ok(())
    }

    pub async fn certificates(&self, identity: Option<&str>) -> Result<Vec<CertRecord>, DbError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT serial, identity, not_before, not_after, revoked FROM certificates
                 WHERE $1::TEXT IS NULL OR identity = $1 ORDER BY issued, serial",
                &[&identity],
            )
            .await?;
        Ok(rows.iter().map(cert).collect::<Result<_, _>>()?)
    }

    pub async fn certificate(&self, serial: &str) -> Result<Option<CertRecord>, DbError> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT serial, identity, not_before, not_after, revoked FROM certificates
                 WHERE serial = $1",
                &[&serial],
            )
            .await?;
        Ok(row.as_ref().map(cert).transpose()?)
    }

    /// Record `c`, renewed from `previous`, unless `c.identity` renewed `max` times at or
    /// after `since` (Unix seconds): then false and nothing recorded. One transaction,
    /// serialised per identity by an advisory lock, so instances cannot both slip under.
    pub async fn record_renewal_limited(
        &self,
        c: &CertRecord,
        previous: &str,
        since: i64,
        max: i64,
    ) -> Result<bool, DbError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.query_one("SELECT pg_advisory_xact_lock(hashtext($1))", &[&c.identity]).await?;
        let n: i64 = tx
            .query_one(
                "SELECT count(*) FROM renewals WHERE identity = $1 AND at >= $2",
                &[&c.identity, &since],
            )
            .await?
            .try_get(0)?;
        if n >= max {
            return Ok(false);
        }
        tx.execute(
            "INSERT INTO certificates(serial, identity, not_before, not_after, issued, revoked)
             VALUES ($1, $2, $3, $4, $5, $6)",
            &[&c.serial, &c.identity, &c.not_before, &c.not_after, &now(), &c.revoked],
        )
        .await?;
        tx.execute(
            "INSERT INTO renewals(serial, previous, identity, at) VALUES ($1, $2, $3, $4)",
            &[&c.serial, &previous, &c.identity, &now()],
        )
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    pub async fn is_revoked(&self, serial: &str) -> Result<bool, DbError> {
        let c = self.client().await?;
        let row =
            c.query_opt("SELECT revoked FROM certificates WHERE serial = $1", &[&serial]).await?;
        Ok(row.map(|r| r.try_get(0)).transpose()?.unwrap_or(false))
    }

    /// A number that changes whenever a certificate is revoked: here the count of revoked
    /// certificates (revocations are never undone), read by the revocation watcher
    /// (through the partial index `certificates_revoked`: the revoked rows only).
    pub async fn revocation_generation(&self) -> Result<i64, DbError> {
        let c = self.client().await?;
        let row = c.query_one("SELECT count(*) FROM certificates WHERE revoked", &[]).await?;
        Ok(row.try_get(0)?)
    }

    /// The revoked certificates not expired at `now` (revoked at: their issue time, which
    /// this schema keeps).
    pub async fn revoked_unexpired(
        &self,
        now: i64,
    ) -> Result<Vec<crate::identity::revocation::Revoked>, DbError> {
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT serial, issued FROM certificates WHERE revoked AND not_after >= $1
                 ORDER BY serial",
                &[&now],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(crate::identity::revocation::Revoked {
                    serial: r.try_get(0)?,
                    at: r.try_get(1)?,
                })
            })
            .collect()
    }

    pub async fn revoke(&self, serial: &str) -> Result<(), DbError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        let n = tx
            .execute("UPDATE certificates SET revoked = TRUE WHERE serial = $1", &[&serial])
            .await?;
        if n != 1 {
            return Err(DbError::NoSuchCertificate);
        }
        notify_revoked(&tx).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Spend one token of every bucket in `buckets` (key, burst, tokens a second), for all
    /// instances of the domain at once, or none if any is empty: then how long until all
    /// have one. In order, and a bucket that is empty stops the rest being touched, so
    /// put the overall bucket first and a refused stranger adds no row. Rows untouched
    /// for a day (full again for any sane limit) are removed as we go.
    pub async fn take_tokens(
        &self,
        buckets: &[(String, f64, f64)],
        now_ms: i64,
    ) -> Result<Duration, DbError> {
        use super::ratelimit::{refill, wait_for_token};
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        tx.execute("DELETE FROM rate_limits WHERE at_ms < $1", &[&(now_ms - 86_400_000)]).await?;
        let mut tokens = Vec::with_capacity(buckets.len());
        for (key, burst, per_sec) in buckets {
            tx.execute(
                "INSERT INTO rate_limits(key, tokens, at_ms) VALUES ($1, $2, $3)
                 ON CONFLICT (key) DO NOTHING",
                &[key, burst, &now_ms],
            )
            .await?;
            // Row-locked until commit: instances spending the same bucket wait in turn.
            let row = tx
                .query_one(
                    "SELECT tokens, at_ms FROM rate_limits WHERE key = $1 FOR UPDATE",
                    &[key],
                )
                .await?;
            let (held, at): (f64, i64) = (row.try_get(0)?, row.try_get(1)?);
            let elapsed = Duration::from_millis(now_ms.saturating_sub(at).max(0) as u64);
            let now = refill(held, elapsed, *burst, *per_sec);
            let wait = wait_for_token(now, *per_sec);
            if !wait.is_zero() {
                tx.commit().await?;
                return Ok(wait);
            }
            tokens.push((key, now));
        }
        for (key, now) in tokens {
            tx.execute(
                "UPDATE rate_limits SET tokens = $2, at_ms = $3 WHERE key = $1",
                &[key, &(now - 1.0), &now_ms],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(Duration::ZERO)
    }

    pub async fn create_invite(&self, code: &str) -> Result<(), DbError> {
        self.client()
            .await?
            .execute("INSERT INTO invites(code, created) VALUES ($1, $2)", &[&code, &now()])
            .await?;
        Ok(())
    }

    pub async fn invites(&self) -> Result<Vec<(String, Option<String>)>, DbError> {
        let rows = self
            .client()
            .await?
            .query("SELECT code, used_by FROM invites ORDER BY created, code", &[])
            .await?;
        Ok(rows
            .iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect::<Result<_, tokio_postgres::Error>>()?)
    }

    // Instances and presence (super::cluster).

    /// Say instance `id` is alive now, its relay at `relay_host` (None: callers use the
    /// host of their own server) and `relay_port`; forget the presence of instances silent
    /// for `forget_after` seconds.
    pub async fn heartbeat(
        &self,
        id: &str,
        relay_host: Option<&str>,
        relay_port: u16,
        forget_after: i64,
    ) -> Result<(), DbError> {
        let c = self.client().await?;
        let port = i32::from(relay_port);
        let now = now();
        c.execute(
            "INSERT INTO instances(id, relay_host, relay_port, last_seen) VALUES ($1, $2, $3, $4)
             ON CONFLICT (id) DO UPDATE SET last_seen = excluded.last_seen",
            &[&id, &relay_host, &port, &now],
        )
        .await?;
        let dead = now - forget_after;
        c.execute(
            "DELETE FROM presence WHERE instance IN (SELECT id FROM instances WHERE last_seen < $1)",
            &[&dead],
        )
        .await?;
        c.execute("DELETE FROM instances WHERE last_seen < $1", &[&dead]).await?;
        Ok(())
    }

    /// Instance `id` stops: its presence goes.
    pub async fn instance_gone(&self, id: &str) -> Result<(), DbError> {
        let c = self.client().await?;
        c.execute("DELETE FROM presence WHERE instance = $1", &[&id]).await?;
        c.execute("DELETE FROM instances WHERE id = $1", &[&id]).await?;
        Ok(())
    }

    /// `address` listens for `service` on connection `conn` of instance `id` (the newest
    /// listen wins, wherever it is).
    pub async fn presence_listen(
        &self,
        address: &str,
        service: &str,
        id: &str,
        conn: u64,
    ) -> Result<(), DbError> {
        let conn = conn as i64;
        self.client()
            .await?
            .execute(
                "INSERT INTO presence(address, service, instance, conn) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (address, service)
                 DO UPDATE SET instance = excluded.instance, conn = excluded.conn",
                &[&address, &service, &id, &conn],
            )
            .await?;
        Ok(())
    }

    /// Instance `id`'s presence is `listens` (address, service, connection), replacing
    /// what the database holds for it; a listen of the same address and service at another
    /// instance stays (it is newer).
    pub async fn presence_replace(
        &self,
        id: &str,
        listens: &[(String, String, u64)],
    ) -> Result<(), DbError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        tx.execute("DELETE FROM presence WHERE instance = $1", &[&id]).await?;
        for (address, service, conn) in listens {
            let conn = *conn as i64;
            tx.execute(
                "INSERT INTO presence(address, service, instance, conn) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (address, service) DO NOTHING",
                &[address, service, &id, &conn],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Connection `conn` of instance `id` no longer listens for `service` (None: for
    /// anything, it closed).
    pub async fn presence_drop(
        &self,
        id: &str,
        conn: u64,
        service: Option<(&str, &str)>,
    ) -> Result<(), DbError> {
        let c = self.client().await?;
        let conn = conn as i64;
        match service {
            Some((address, service)) => {
                c.execute(
                    "DELETE FROM presence WHERE instance = $1 AND conn = $2 AND address = $3
                     AND service = $4",
                    &[&id, &conn, &address, &service],
                )
                .await?
            }
            None => {
                c.execute("DELETE FROM presence WHERE instance = $1 AND conn = $2", &[&id, &conn])
                    .await?
            }
        };
        Ok(())
    }

    /// Where `address` listens, at instances other than `me` seen since `alive_since` and
    /// alive now (holding their lock, see [`listen`]):
    /// `Ok(None)` if nowhere; `Ok(Some((remote, has_service)))` otherwise, for `service`
    /// (or any, if None) where it can.
    pub async fn presence_find(
        &self,
        address: &str,
        service: Option<&str>,
        me: &str,
        alive_since: i64,
    ) -> Result<Option<(Remote, bool)>, DbError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT p.instance, p.service = $2 FROM presence p JOIN instances i
                 ON i.id = p.instance
                 WHERE p.address = $1 AND p.instance <> $3 AND i.last_seen >= $4
                 AND EXISTS (SELECT 1 FROM pg_locks l WHERE l.locktype = 'advisory'
                     AND l.granted AND l.objsubid = 1
                     AND l.database = (SELECT oid FROM pg_database
                                       WHERE datname = current_database())
                     AND ((l.classid::bigint << 32) | l.objid::bigint)
                         = ('x' || lpad(p.instance, 16, '0'))::bit(64)::bigint)
                 ORDER BY (p.service = $2) DESC NULLS LAST LIMIT 1",
                &[&address, &service, &me, &alive_since],
            )
            .await?;
        let Some(r) = rows.first() else { return Ok(None) };
        let has: Option<bool> = r.try_get(1)?;
        Ok(Some((Remote { instance: r.try_get(0)? }, service.is_none() || has == Some(true))))
    }

    /// Send `payload` (at most 7,999 bytes) on channel `channel` (`pg_notify`).
    pub async fn notify(&self, channel: &str, payload: &str) -> Result<(), DbError> {
        self.client().await?.execute("SELECT pg_notify($1, $2)", &[&channel, &payload]).await?;
        Ok(())
    }
}

/// A row of `SELECT serial, identity, not_before, not_after, revoked FROM certificates`.
fn cert(r: &tokio_postgres::Row) -> Result<CertRecord, tokio_postgres::Error> {
    Ok(CertRecord {
        serial: r.try_get(0)?,
        identity: r.try_get(1)?,
        not_before: r.try_get(2)?,
        not_after: r.try_get(3)?,
        revoked: r.try_get(4)?,
    })
}
