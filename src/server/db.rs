//! The identity server's state: users, invites and every issued certificate, in an
//! embedded SQLite database (WAL, synchronous=FULL: a committed change survives a crash).
//! The default store; [`super::postgres`] is the one several instances share.

use rusqlite::{Connection, OptionalExtension, params};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// What went wrong with the database.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// SQLite failed (disk full, corrupt file, locked too long).
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL failed (unreachable, refused, a statement failed).
    #[error("database error: {}", with_causes(.0))]
    Postgres(#[from] tokio_postgres::Error),
    /// TLS to PostgreSQL cannot be set up (`database_ca` unreadable or holds no CA).
    #[error("database TLS: {0}")]
    Tls(String),
    /// The blocking task running a SQLite call failed (a panic, a poisoned lock).
    #[error("database task failed: {0}")]
    Task(String),
    /// The user name is taken.
    #[error("the user exists already")]
    UserExists,
    /// No such user.
    #[error("no such user")]
    NoSuchUser,
    /// The invite code is unknown or used.
    #[error("the invite code is not valid or was used already")]
    BadInvite,
    /// No certificate with that serial.
    #[error("no certificate with that serial")]
    NoSuchCertificate,
}

/// `e` and its causes, `: `-joined: tokio-postgres keeps the reason (a refused
/// connection, an unknown certificate issuer) in its source, not in its own message.
fn with_causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        cause = c.source();
    }
    text
}

/// One issued certificate as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertRecord {
    pub serial: String,
    pub identity: String,
    pub not_before: i64,
    pub not_after: i64,
    pub revoked: bool,
}

impl CertRecord {
    /// The record of a certificate just issued to `identity`.
    pub fn issued(
        identity: &crate::address::Q2qAddress,
        info: &crate::identity::CertInfo,
    ) -> CertRecord {
        CertRecord {
            serial: info.serial.clone(),
            identity: identity.to_string(),
            not_before: info.not_before,
            not_after: info.not_after,
            revoked: false,
        }
    }

    /// A row of `SELECT serial, identity, not_before, not_after, revoked FROM certificates`.
    fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<CertRecord> {
        Ok(CertRecord {
            serial: r.get(0)?,
            identity: r.get(1)?,
            not_before: r.get(2)?,
            not_after: r.get(3)?,
            revoked: r.get(4)?,
        })
    }
}

/// One user as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    pub name: String,
    pub created: i64,
    pub certificates: i64,
}

/// The open SQLite database (blocking: [`super::store::Store`] runs it off the async
/// threads).
pub struct Db {
    conn: Connection,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    created INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS certificates (
    serial TEXT PRIMARY KEY,
    identity TEXT NOT NULL,
    not_before INTEGER NOT NULL,
    not_after INTEGER NOT NULL,
    issued INTEGER NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS certificates_identity ON certificates(identity);
CREATE TABLE IF NOT EXISTS renewals (
    serial TEXT PRIMARY KEY,
    previous TEXT NOT NULL,
    identity TEXT NOT NULL,
    at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS renewals_identity ON renewals(identity, at);
CREATE TABLE IF NOT EXISTS revocations (
    serial TEXT PRIMARY KEY,
    at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS invites (
    code TEXT PRIMARY KEY,
    created INTEGER NOT NULL,
    used_by TEXT
);
";

/// The `meta` key of [`Db::revocation_generation`].
const REVOCATION_GENERATION: &str = "revocation_generation";

/// Count a change of the revocations (inside the transaction that made it).
fn bump_revocations(tx: &rusqlite::Transaction<'_>) -> Result<(), DbError> {
    tx.execute(
        "INSERT INTO meta(key, value) VALUES (?1, '1')
         ON CONFLICT(key) DO UPDATE SET value = CAST(value AS INTEGER) + 1",
        [REVOCATION_GENERATION],
    )?;
    Ok(())
}

pub(super) fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

impl Db {
    /// Open (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Db, DbError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.execute_batch(SCHEMA)?;
        Ok(Db { conn })
    }

    pub fn meta(&self, key: &str) -> Result<Option<String>, DbError> {
        Ok(self
            .conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()?)
    }

    pub fn set_meta(&self, key: &str, value: &str) -> Result<(), DbError> {
        self.conn.execute(
            "INSERT INTO meta(key, value) VALUES (?1, ?2)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            [key, value],
        )?;
        Ok(())
    }

    pub fn user_count(&self) -> Result<i64, DbError> {
        Ok(self.conn.query_row("SELECT count(*) FROM users", [], |r| r.get(0))?)
    }

    /// Add a user; with `invite`, the code must be unused and is consumed in the same
    /// transaction.
    pub fn add_user(
        &mut self,
        name: &str,
        hash: &str,
        invite: Option<&str>,
    ) -> Result<(), DbError> {
        let tx = self.conn.transaction()?;
        if let Some(code) = invite {
            let n = tx.execute(
                "UPDATE invites SET used_by = ?1 WHERE code = ?2 AND used_by IS NULL",
                [name, code],
            )?;
            if n != 1 {
                return Err(DbError::BadInvite);
            }
        }
        match tx.execute(
            "INSERT INTO users(name, password_hash, created) VALUES (?1, ?2, ?3)",
            params![name, hash, now()],
        ) {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                return Err(DbError::UserExists);
            }
            r => r?,
        };
        tx.commit()?;
        Ok(())
    }

    pub fn password_hash(&self, name: &str) -> Result<Option<String>, DbError> {
        Ok(self
            .conn
            .query_row("SELECT password_hash FROM users WHERE name = ?1", [name], |r| r.get(0))
            .optional()?)
    }

    pub fn set_password_hash(&self, name: &str, hash: &str) -> Result<(), DbError> {
        let n = self
            .conn
            .execute("UPDATE users SET password_hash = ?2 WHERE name = ?1", [name, hash])?;
        if n == 1 { Ok(()) } else { Err(DbError::NoSuchUser) }
    }

    /// Remove a user and revoke every certificate issued to them.
    pub fn remove_user(&mut self, name: &str, identity: &str) -> Result<(), DbError> {
        let tx = self.conn.transaction()?;
        if tx.execute("DELETE FROM users WHERE name = ?1", [name])? != 1 {
            return Err(DbError::NoSuchUser);
        }
        tx.execute("UPDATE certificates SET revoked = 1 WHERE identity = ?1", [identity])?;
        tx.execute(
            "INSERT OR IGNORE INTO revocations(serial, at)
             SELECT serial, ?2 FROM certificates WHERE identity = ?1",
            params![identity, now()],
        )?;
        bump_revocations(&tx)?;
        tx.commit()?;
        Ok(())
    }

    pub fn list_users(&self, domain: &str) -> Result<Vec<UserRecord>, DbError> {
        let mut st = self.conn.prepare(
            "SELECT u.name, u.created,
                    (SELECT count(*) FROM certificates c WHERE c.identity = u.name || '@' || ?1)
             FROM users u ORDER BY u.name",
        )?;
        let rows = st.query_map([domain], |r| {
            Ok(UserRecord { name: r.get(0)?, created: r.get(1)?, certificates: r.get(2)? })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn record_certificate(&self, c: &CertRecord) -> Result<(), DbError> {
        self.conn.execute(
            "INSERT INTO certificates(serial, identity, not_before, not_after, issued, revoked)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![c.serial, c.identity, c.not_before, c.not_after, now(), c.revoked],
        )?;
        Ok(())
    }

    pub fn certificates(&self, identity: Option<&str>) -> Result<Vec<CertRecord>, DbError> {
        let mut st = self.conn.prepare(
            "SELECT serial, identity, not_before, not_after, revoked FROM certificates
             WHERE ?1 IS NULL OR identity = ?1 ORDER BY issued, serial",
        )?;
        let rows = st.query_map([identity], CertRecord::from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The certificate recorded with `serial`, if any.
    pub fn certificate(&self, serial: &str) -> Result<Option<CertRecord>, DbError> {
        Ok(self
            .conn
            .query_row(
                "SELECT serial, identity, not_before, not_after, revoked FROM certificates
                 WHERE serial = ?1",
                [serial],
                CertRecord::from_row,
            )
            .optional()?)
    }

    /// Record `c`, issued by renewing the certificate `previous`, in one transaction.
    pub fn record_renewal(&mut self, c: &CertRecord, previous: &str) -> Result<(), DbError> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT INTO certificates(serial, identity, not_before, not_after, issued, revoked)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![c.serial, c.identity, c.not_before, c.not_after, now(), c.revoked],
        )?;
        tx.execute(
            "INSERT INTO renewals(serial, previous, identity, at) VALUES (?1, ?2, ?3, ?4)",
            params![c.serial, previous, c.identity, now()],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// How many certificates of `identity` were issued by renewal at or after `since`
    /// (Unix seconds).
    pub fn renewals_since(&self, identity: &str, since: i64) -> Result<i64, DbError> {
        Ok(self.conn.query_row(
            "SELECT count(*) FROM renewals WHERE identity = ?1 AND at >= ?2",
            params![identity, since],
            |r| r.get(0),
        )?)
    }

    pub fn is_revoked(&self, serial: &str) -> Result<bool, DbError> {
        Ok(self
            .conn
            .query_row("SELECT revoked FROM certificates WHERE serial = ?1", [serial], |r| r.get(0))
            .optional()?
            .unwrap_or(false))
    }

    /// Revoke the certificate `serial`, record when, and count a change of the
    /// revocations ([`Db::revocation_generation`]), in one transaction.
    pub fn revoke(&self, serial: &str) -> Result<(), DbError> {
        let tx = self.conn.unchecked_transaction()?;
        let n = tx.execute("UPDATE certificates SET revoked = 1 WHERE serial = ?1", [serial])?;
        if n != 1 {
            return Err(DbError::NoSuchCertificate);
        }
        tx.execute(
            "INSERT OR IGNORE INTO revocations(serial, at) VALUES (?1, ?2)",
            params![serial, now()],
        )?;
        bump_revocations(&tx)?;
        tx.commit()?;
        Ok(())
    }

    /// A number that changes whenever a certificate is revoked (by this process or
    /// another): a running server polls it (one row read) to learn of revocations at once.
    pub fn revocation_generation(&self) -> Result<i64, DbError> {
        Ok(self.meta(REVOCATION_GENERATION)?.and_then(|v| v.parse().ok()).unwrap_or(0))
    }

    /// The revoked certificates that have not expired at `now` (Unix seconds), with when
    /// they were revoked (their issue time if that was not recorded): the domain's
    /// revocation list.
    pub fn revoked_unexpired(
        &self,
        now: i64,
    ) -> Result<Vec<crate::identity::revocation::Revoked>, DbError> {
        let mut st = self.conn.prepare(
            "SELECT c.serial, COALESCE(r.at, c.issued) FROM certificates c
             LEFT JOIN revocations r ON r.serial = c.serial
             WHERE c.revoked = 1 AND c.not_after >= ?1 ORDER BY c.serial",
        )?;
        let rows = st.query_map([now], |r| {
            Ok(crate::identity::revocation::Revoked { serial: r.get(0)?, at: r.get(1)? })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn create_invite(&self, code: &str) -> Result<(), DbError> {
        self.conn
            .execute("INSERT INTO invites(code, created) VALUES (?1, ?2)", params![code, now()])?;
        Ok(())
    }

    /// Invites as (code, used_by).
    pub fn invites(&self) -> Result<Vec<(String, Option<String>)>, DbError> {
        let mut st =
            self.conn.prepare("SELECT code, used_by FROM invites ORDER BY created, code")?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_invites_certificates() {
        let d = tempfile::tempdir().unwrap();
        let mut db = Db::open(&d.path().join("q2q.db")).unwrap();
        db.add_user("alice", "h1", None).unwrap();
        assert!(matches!(db.add_user("alice", "h2", None), Err(DbError::UserExists)));
        assert_eq!(db.password_hash("alice").unwrap().as_deref(), Some("h1"));
        db.create_invite("abc").unwrap();
        assert!(matches!(db.add_user("bob", "h", Some("nope")), Err(DbError::BadInvite)));
        db.add_user("bob", "h", Some("abc")).unwrap();
        assert!(matches!(db.add_user("carol", "h", Some("abc")), Err(DbError::BadInvite)));
        assert_eq!(db.password_hash("carol").unwrap(), None);
        let rec = CertRecord {
            serial: "01".into(),
            identity: "alice@example.com".into(),
            not_before: 1,
            not_after: 2,
            revoked: false,
        };
        db.record_certificate(&rec).unwrap();
        assert_eq!(db.list_users("example.com").unwrap()[0].certificates, 1);
        assert_eq!(db.certificate("01").unwrap(), Some(rec.clone()));
        assert_eq!(db.certificate("02").unwrap(), None);
        let renewed = CertRecord { serial: "02".into(), ..rec.clone() };
        assert_eq!(db.renewals_since("alice@example.com", 0).unwrap(), 0);
        db.record_renewal(&renewed, "01").unwrap();
        assert!(db.record_renewal(&renewed, "01").is_err(), "a serial is recorded once");
        assert_eq!(db.renewals_since("alice@example.com", 0).unwrap(), 1);
        assert_eq!(db.renewals_since("alice@example.com", now() + 10).unwrap(), 0);
        assert_eq!(db.list_users("example.com").unwrap()[0].certificates, 2);
        assert_eq!(db.revocation_generation().unwrap(), 0);
        db.revoke("02").unwrap();
        assert_eq!(db.revocation_generation().unwrap(), 1);
        let listed: Vec<String> =
            db.revoked_unexpired(0).unwrap().into_iter().map(|r| r.serial).collect();
        assert_eq!(listed, ["02"]);
        assert!(db.revoked_unexpired(3).unwrap().is_empty(), "expired ones leave the list");
        assert!(matches!(db.revoke("99"), Err(DbError::NoSuchCertificate)));
        assert_eq!(db.revocation_generation().unwrap(), 1);
        db.remove_user("alice", "alice@example.com").unwrap();
        assert_eq!(db.revocation_generation().unwrap(), 2);
        assert!(db.is_revoked("01").unwrap());
        assert_eq!(db.user_count().unwrap(), 1);
    }
}
