//! The identity server's data directory:
//!
//! ```text
//! DIR/config.toml   settings (see ServerConfig::documented)
//! DIR/ca.pem        the domain CA certificate
//! DIR/ca.key        the domain CA private key (mode 0600)
//! DIR/q2q.db        users, invites, issued certificates; also the domain and CA fingerprint
//! ```
//!
//! With PostgreSQL (`database` in config.toml, or `--database`) the state is in that
//! database instead of q2q.db, and several instances of the domain share it, each with a
//! copy of this directory (the CA files and config.toml).
//!
//! The CA is made once, by `init`, and never again: a directory whose database knows a CA
//! (or holds users) but whose CA files are missing or different refuses to start. Vertex
//! silently regenerated its CA, invalidating every certificate it had issued.

use super::db::{Db, DbError};
use super::postgres::{PgDb, Target};
use super::store::{Location, Store};
use crate::address::Domain;
use crate::fsutil;
use crate::identity::{CaError, DomainCa};
use std::path::{Path, PathBuf};

pub const CONFIG_FILE: &str = "config.toml";
pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca.key";
pub const DB_FILE: &str = "q2q.db";

/// Why a data directory could not be made or opened.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error("{0} already holds a q2q server (found {1}); refusing to overwrite it")]
    AlreadyInitialised(String, &'static str),
    #[error("{0} is not a q2q server data directory (no {DB_FILE}); run `q2q-server init` first")]
    NotInitialised(String),
    #[error(
        "{dir} has a database for {domain} but its CA ({missing}) is missing; refusing to start \
         rather than make a new CA, which would invalidate every issued certificate. \
         Restore the CA files from backup."
    )]
    CaMissing { dir: String, domain: String, missing: &'static str },
    #[error(
        "the CA in {dir} (fingerprint {found}) is not the one this database was made with \
         ({recorded}); refusing to start. Restore the original ca.pem and ca.key."
    )]
    CaMismatch { dir: String, found: String, recorded: String },
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error("the database in {0} does not name its domain")]
    NoDomain(String),
    #[error("the database names an invalid domain `{0}`")]
    BadDomain(String),
    #[error(
        "the PostgreSQL database already serves {domain} with CA {fingerprint}; for another \
         instance, copy the data directory of one (ca.pem, ca.key, config.toml) instead"
    )]
    DatabaseTaken { domain: String, fingerprint: String },
    #[error(transparent)]
    Config(#[from] super::config::ConfigError),
    #[error("config `database`: {0}")]
    BadLocation(String),
}

/// An opened data directory.
pub struct DataDir {
    pub path: PathBuf,
    pub domain: Domain,
    pub ca: DomainCa,
    /// Users, certificates, invites: the SQLite file or the PostgreSQL database.
    pub store: Store,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DataDirError + '_ {
    move |e| DataDirError::Io(path.display().to_string(), e)
}

/// Where `config` keeps the state.
fn location(config: &super::ServerConfig) -> Result<Location, DataDirError> {
    Location::parse(config.database.as_deref().unwrap_or("")).map_err(DataDirError::BadLocation)
}

/// Open the PostgreSQL database at `url`, over TLS when `config` names a `database_ca`.
async fn open_postgres(url: &str, config: &super::ServerConfig) -> Result<PgDb, DataDirError> {
    let ca = match &config.database_ca {
        Some(path) => Some(std::fs::read(path).map_err(io(path))?),
        None => None,
    };
    let pg = PgDb::open(Target::new(url, ca.as_deref())?).await?;
    if pg.target().is_tls() {
        tracing::info!("database connections: TLS, verified against database_ca");
    }
    Ok(pg)
}

/// The CA files of `dir`, for `domain`: missing ones are an error, never a new CA.
fn read_ca(dir: &Path, domain: &Domain) -> Result<DomainCa, DataDirError> {
    let shown = dir.display().to_string();
    let read = |f: &'static str| match std::fs::read_to_string(dir.join(f)) {
        Ok(t) => Ok(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(DataDirError::CaMissing {
            dir: shown.clone(),
            domain: domain.to_string(),
            missing: f,
        }),
        Err(e) => Err(DataDirError::Io(dir.join(f).display().to_string(), e)),
    };
    let cert = read(CA_CERT_FILE)?;
    let key = read(CA_KEY_FILE)?;
    Ok(DomainCa::load(domain, &cert, &key)?)
}

impl DataDir {
    /// Make a new data directory for `domain` with its SQLite file: the CA, the database,
    /// a documented config.
    pub fn init(
        dir: &Path,
        domain: &Domain,
        config: &super::ServerConfig,
    ) -> Result<DataDir, DataDirError> {
        let ca = Self::make_ca(dir, domain, &[DB_FILE])?;
        let db = Db::open(&dir.join(DB_FILE))?;
        db.set_meta("domain", domain.as_str())?;
        db.set_meta("ca_fingerprint", &ca.fingerprint().to_string())?;
        Self::write_config(dir, config)?;
        Ok(DataDir {
            path: dir.to_path_buf(),
            domain: domain.clone(),
            ca,
            store: Store::sqlite(db),
        })
    }

    /// Make a new data directory for `domain` with its state where `config.database` says:
    /// the SQLite file, or a PostgreSQL database that no domain uses yet (which then
    /// records the domain and the CA fingerprint).
    pub async fn init_at(
        dir: &Path,
        domain: &Domain,
        config: &super::ServerConfig,
    ) -> Result<DataDir, DataDirError> {
        let Location::Postgres(url) = location(config)? else {
            return Self::init(dir, domain, config);
        };
        let pg = open_postgres(&url, config).await?;
        if let Some(fingerprint) = pg.meta("ca_fingerprint").await? {
            let domain = pg.meta("domain").await?.unwrap_or_default();
            return Err(DataDirError::DatabaseTaken { domain, fingerprint });
        }
        let ca = Self::make_ca(dir, domain, &[])?;
        let fingerprint = ca.fingerprint().to_string();
        // Two `init`s racing on one database: the first fingerprint stays, the second
        // learns it lost.
        let recorded = pg.meta_or_set("ca_fingerprint", &fingerprint).await?;
        if recorded != fingerprint {
            let domain = pg.meta("domain").await?.unwrap_or_default();
            return Err(DataDirError::DatabaseTaken { domain, fingerprint: recorded });
        }
        pg.set_meta("domain", domain.as_str()).await?;
        Self::write_config(dir, config)?;
        let store = Store::Postgres(std::sync::Arc::new(pg));
        Ok(DataDir { path: dir.to_path_buf(), domain: domain.clone(), ca, store })
    }

    /// The CA files of a new directory (refusing a directory that has them, or `others`).
    fn make_ca(
        dir: &Path,
        domain: &Domain,
        others: &[&'static str],
    ) -> Result<DomainCa, DataDirError> {
        for f in [CA_KEY_FILE, CA_CERT_FILE].iter().chain(others) {
            if dir.join(f).exists() {
                return Err(DataDirError::AlreadyInitialised(dir.display().to_string(), f));
            }
        }
        fsutil::create_private_dir(dir).map_err(io(dir))?;
        let ca = DomainCa::generate(domain)?;
        // Key first: a crash after it leaves a directory `init` refuses to reuse, never a
        // certificate without its key.
        let key_path = dir.join(CA_KEY_FILE);
        fsutil::write_new(&key_path, ca.key_pem().as_bytes(), 0o600).map_err(io(&key_path))?;
        let cert_path = dir.join(CA_CERT_FILE);
        fsutil::write_new(&cert_path, ca.cert_pem().as_bytes(), 0o644).map_err(io(&cert_path))?;
        Ok(ca)
    }

    /// The documented config.toml, unless there is one (mode 0600 when it names a
    /// database, whose URL may hold a password).
    fn write_config(dir: &Path, config: &super::ServerConfig) -> Result<(), DataDirError> {
        let config_path = dir.join(CONFIG_FILE);
        if !config_path.exists() {
            let mode = if config.database.is_some() { 0o600 } else { 0o644 };
            fsutil::write_atomic(&config_path, config.documented().as_bytes(), mode)
                .map_err(io(&config_path))?;
        }
        Ok(())
    }

    /// Open an existing data directory with its SQLite file, checking that its CA is the
    /// one it was made with.
    pub fn open(dir: &Path) -> Result<DataDir, DataDirError> {
        let shown = dir.display().to_string();
        let db_path = dir.join(DB_FILE);
        if !db_path.exists() {
            return Err(DataDirError::NotInitialised(shown));
        }
        let db = Db::open(&db_path)?;
        let domain_s = db.meta("domain")?.ok_or_else(|| DataDirError::NoDomain(shown.clone()))?;
        let domain = Domain::parse(&domain_s).map_err(|_| DataDirError::BadDomain(domain_s))?;
        let ca = read_ca(dir, &domain)?;
        let found = ca.fingerprint().to_string();
        match db.meta("ca_fingerprint")? {
            Some(recorded) if recorded == found => {}
            Some(recorded) => return Err(DataDirError::CaMismatch { dir: shown, found, recorded }),
            None => db.set_meta("ca_fingerprint", &found)?,
        }
        Ok(DataDir { path: dir.to_path_buf(), domain, ca, store: Store::sqlite(db) })
    }

    /// Open an existing data directory with its state where `database` says (None: the
    /// `database` of its config.toml; there too none: the SQLite file), checking that its
    /// CA is the one the database was made with.
    pub async fn open_at(dir: &Path, database: Option<&str>) -> Result<DataDir, DataDirError> {
        let mut config = super::ServerConfig::load(&dir.join(CONFIG_FILE))?;
        if let Some(d) = database {
            config.database = Some(d.to_string());
        }
        let Location::Postgres(url) = location(&config)? else {
            return Self::open(dir);
        };
        let shown = dir.display().to_string();
        if !dir.join(CA_CERT_FILE).exists() && !dir.join(CA_KEY_FILE).exists() {
            return Err(DataDirError::NotInitialised(shown));
        }
        let pg = open_postgres(&url, &config).await?;
        let domain_s =
            pg.meta("domain").await?.ok_or_else(|| DataDirError::NoDomain(shown.clone()))?;
        let domain = Domain::parse(&domain_s).map_err(|_| DataDirError::BadDomain(domain_s))?;
        let ca = read_ca(dir, &domain)?;
        let found = ca.fingerprint().to_string();
        match pg.meta("ca_fingerprint").await? {
            Some(recorded) if recorded == found => {}
            Some(recorded) => return Err(DataDirError::CaMismatch { dir: shown, found, recorded }),
            None => pg.set_meta("ca_fingerprint", &found).await?,
        }
        let store = Store::Postgres(std::sync::Arc::new(pg));
        Ok(DataDir { path: dir.to_path_buf(), domain, ca, store })
    }

    pub fn config_path(&self) -> PathBuf {
        self.path.join(CONFIG_FILE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn init_once_and_never_regenerate() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("srv");
        let domain = Domain::parse("example.com").unwrap();
        let made = DataDir::init(&dir, &domain, &Default::default()).unwrap();
        let fp = made.ca.fingerprint();
        drop(made);
        let mode = std::fs::metadata(dir.join(CA_KEY_FILE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches!(
            DataDir::init(&dir, &domain, &Default::default()),
            Err(DataDirError::AlreadyInitialised(..))
        ));
        assert_eq!(DataDir::open(&dir).unwrap().ca.fingerprint(), fp);

        // A lost CA is an error, not a new CA.
        let key = std::fs::read(dir.join(CA_KEY_FILE)).unwrap();
        std::fs::remove_file(dir.join(CA_KEY_FILE)).unwrap();
        let err = DataDir::open(&dir).err().unwrap();
        assert!(matches!(err, DataDirError::CaMissing { missing: CA_KEY_FILE, .. }), "{err}");
        // A swapped CA is refused too.
        let other = tempfile::tempdir().unwrap();
        let o = DataDir::init(other.path(), &domain, &Default::default()).unwrap();
        std::fs::write(dir.join(CA_KEY_FILE), o.ca.key_pem()).unwrap();
        std::fs::write(dir.join(CA_CERT_FILE), o.ca.cert_pem()).unwrap();
        assert!(matches!(DataDir::open(&dir), Err(DataDirError::CaMismatch { .. })));
        drop(key);
    }
}
