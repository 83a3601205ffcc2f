//! Where the server's state lives, behind one async API: the embedded SQLite file
//! ([`super::db`], the default: one instance per domain) or a PostgreSQL database
//! ([`super::postgres`], shared by several instances of a domain). The handler and the
//! admin verbs call this and do not know which.

use super::db::{CertRecord, Db, DbError, UserRecord};
use super::postgres::PgDb;
use std::sync::{Arc, Mutex};

/// The open store; cheap to clone.
#[derive(Clone)]
pub enum Store {
    /// The SQLite file of the data directory; its blocking calls run on the blocking pool.
    Sqlite(Arc<Mutex<Db>>),
    /// A PostgreSQL database.
    Postgres(Arc<PgDb>),
}

/// Where to keep the state, as the user names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// The SQLite file in the data directory.
    DataDir,
    /// A PostgreSQL URL (`postgres://user@host:port/db`, or libpq's `host=… dbname=…`).
    Postgres(String),
}

impl Location {
    /// `postgres://…`/`postgresql://…` or libpq key=value text: PostgreSQL; `sqlite` or
    /// empty: the data directory's file.
    pub fn parse(s: &str) -> Result<Location, String> {
        let s = s.trim();
        if s.is_empty() || s == "sqlite" {
            Ok(Location::DataDir)
        } else if s.starts_with("postgres://") || s.starts_with("postgresql://") || s.contains('=')
        {
            Ok(Location::Postgres(s.to_string()))
        } else {
            Err("the database must be `sqlite` or a PostgreSQL URL (postgres://…)".into())
        }
    }
}

/// Run `f` on the SQLite database on the blocking pool.
async fn blocking<T: Send + 'static>(
    db: &Arc<Mutex<Db>>,
    f: impl FnOnce(&mut Db) -> Result<T, DbError> + Send + 'static,
) -> Result<T, DbError> {
    let db = db.clone();
    tokio::task::spawn_blocking(move || {
        let mut db = db.lock().map_err(|_| DbError::Task("database lock poisoned".into()))?;
        f(&mut db)
    })
    .await
    .map_err(|e| DbError::Task(e.to_string()))?
}

/// One method per operation: the SQLite arm runs the [`Db`] call on the blocking pool,
/// the PostgreSQL arm awaits [`PgDb`]'s.
macro_rules! both {
    ($self:ident, |$db:ident| $sqlite:expr, |$pg:ident| $postgres:expr) => {
        match $self {
            Store::Sqlite(d) => blocking(d, move |$db| $sqlite).await,
            Store::Postgres($pg) => $postgres.await,
        }
    };
}

impl Store {
    /// The SQLite store of `db`.
    pub fn sqlite(db: Db) -> Store {
        Store::Sqlite(Arc::new(Mutex::new(db)))
    }

    /// The PostgreSQL database, if this is one.
    pub fn postgres(&self) -> Option<&Arc<PgDb>> {
        match self {
            Store::Postgres(p) => Some(p),
            Store::Sqlite(_) => None,
        }
    }

    pub async fn meta(&self, key: &str) -> Result<Option<String>, DbError> {
        let key = key.to_string();
        both!(self, |db| db.meta(&key), |pg| pg.meta(&key))
    }

    pub async fn set_meta(&self, key: &str, value: &str) -> Result<(), DbError> {
        let (key, value) = (key.to_string(), value.to_string());
        both!(self, |db| db.set_meta(&key, &value), |pg| pg.set_meta(&key, &value))
    }

    pub async fn user_count(&self) -> Result<i64, DbError> {
        both!(self, |db| db.user_count(), |pg| pg.user_count())
    }

    /// Add a user; with `invite`, the code must be unused and is consumed with it.
    pub async fn add_user(
        &self,
        name: &str,
        hash: &str,
        invite: Option<&str>,
    ) -> Result<(), DbError> {
        let (name, hash) = (name.to_string(), hash.to_string());
        let invite = invite.map(str::to_string);
        both!(self, |db| db.add_user(&name, &hash, invite.as_deref()), |pg| pg.add_user(
            &name,
            &hash,
            invite.as_deref()
        ))
    }

    pub async fn password_hash(&self, name: &str) -> Result<Option<String>, DbError> {
        let name = name.to_string();
        both!(self, |db| db.password_hash(&name), |pg| pg.password_hash(&name))
    }

    pub async fn set_password_hash(&self, name: &str, hash: &str) -> Result<(), DbError> {
        let (name, hash) = (name.to_string(), hash.to_string());
        both!(self, |db| db.set_password_hash(&name, &hash), |pg| pg
            .set_password_hash(&name, &hash))
    }

    /// Remove a user and revoke every certificate issued to them.
    pub async fn remove_user(&self, name: &str, identity: &str) -> Result<(), DbError> {
        let (name, identity) = (name.to_string(), identity.to_string());
        both!(self, |db| db.remove_user(&name, &identity), |pg| pg.remove_user(&name, &identity))
    }

    pub async fn list_users(&self, domain: &str) -> Result<Vec<UserRecord>, DbError> {
        let domain = domain.to_string();
        both!(self, |db| db.list_users(&domain), |pg| pg.list_users(&domain))
    }

    pub async fn record_certificate(&self, c: &CertRecord) -> Result<(), DbError> {
        let c = c.clone();
        both!(self, |db| db.record_certificate(&c), |pg| pg.record_certificate(&c))
    }

    pub async fn certificates(&self, identity: Option<&str>) -> Result<Vec<CertRecord>, DbError> {
        let identity = identity.map(str::to_string);
        both!(self, |db| db.certificates(identity.as_deref()), |pg| pg
            .certificates(identity.as_deref()))
    }

    pub async fn certificate(&self, serial: &str) -> Result<Option<CertRecord>, DbError> {
        let serial = serial.to_string();
        both!(self, |db| db.certificate(&serial), |pg| pg.certificate(&serial))
    }

    /// Record `c`, renewed from `previous`, unless its identity renewed `max` times at or
    /// after `since` (Unix seconds): then false, nothing recorded.
    pub async fn record_renewal_limited(
        &self,
        c: &CertRecord,
        previous: &str,
        since: i64,
        max: i64,
    ) -> Result<bool, DbError> {
        let (c, previous) = (c.clone(), previous.to_string());
        both!(
            self,
            |db| {
                if db.renewals_since(&c.identity, since)? >= max {
                    return Ok(false);
                }
                db.record_renewal(&c, &previous).map(|()| true)
            },
            |pg| pg.record_renewal_limited(&c, &previous, since, max)
        )
    }

    pub async fn is_revoked(&self, serial: &str) -> Result<bool, DbError> {
        let serial = serial.to_string();
        both!(self, |db| db.is_revoked(&serial), |pg| pg.is_revoked(&serial))
    }

    /// Changes whenever a certificate is revoked (polled by the revocation watcher).
    pub async fn revocation_generation(&self) -> Result<i64, DbError> {
        both!(self, |db| db.revocation_generation(), |pg| pg.revocation_generation())
    }

    /// The revoked certificates not expired at `now`: the domain's revocation list.
    pub async fn revoked_unexpired(
        &self,
        now: i64,
    ) -> Result<Vec<crate::identity::revocation::Revoked>, DbError> {
        both!(self, |db| db.revoked_unexpired(now), |pg| pg.revoked_unexpired(now))
    }

    pub async fn revoke(&self, serial: &str) -> Result<(), DbError> {
        let serial = serial.to_string();
        both!(self, |db| db.revoke(&serial), |pg| pg.revoke(&serial))
    }

    pub async fn create_invite(&self, code: &str) -> Result<(), DbError> {
        let code = code.to_string();
        both!(self, |db| db.create_invite(&code), |pg| pg.create_invite(&code))
    }

    /// Invites as (code, used_by).
    pub async fn invites(&self) -> Result<Vec<(String, Option<String>)>, DbError> {
        both!(self, |db| db.invites(), |pg| pg.invites())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations() {
        assert_eq!(Location::parse("").unwrap(), Location::DataDir);
        assert_eq!(Location::parse("sqlite").unwrap(), Location::DataDir);
        assert!(matches!(
            Location::parse("postgres://q2q@127.0.0.1/q2q"),
            Ok(Location::Postgres(_))
        ));
        assert!(matches!(
            Location::parse("host=/run/postgresql dbname=q2q"),
            Ok(Location::Postgres(_))
        ));
        assert!(Location::parse("mysql://x").is_err());
    }
}
