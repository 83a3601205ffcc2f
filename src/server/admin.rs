//! Admin verbs of `q2q-server`, working on the data directory and its store (the SQLite
//! file, or the PostgreSQL database its config.toml names; safe while the server runs:
//! both serialise writers).

use super::datadir::DataDir;
use super::db::{CertRecord, DbError, UserRecord};
use crate::address::{Q2qAddress, User};
use anyhow::{Context, bail};
use std::path::Path;

async fn open(dir: &Path) -> anyhow::Result<DataDir> {
    Ok(DataDir::open_at(dir, None).await?)
}

fn user(name: &str, dir: &DataDir) -> anyhow::Result<(User, Q2qAddress)> {
    let user = User::parse(name.split('@').next().unwrap_or(name))?;
    if let Some((_, d)) = name.split_once('@')
        && d != dir.domain.as_str()
    {
        bail!("this server is for {}, not {d}", dir.domain);
    }
    Ok((user.clone(), Q2qAddress::new(user, dir.domain.clone())))
}

fn check_len(password: &str, dir: &Path) -> anyhow::Result<()> {
    let config = super::ServerConfig::load(&dir.join(super::datadir::CONFIG_FILE))?;
    if password.chars().count() < config.min_password_len {
        bail!("the password must be at least {} characters long", config.min_password_len);
    }
    Ok(())
}

pub async fn add_user(dir: &Path, name: &str, password: String) -> anyhow::Result<Q2qAddress> {
    let d = open(dir).await?;
    let (user, address) = user(name, &d)?;
    check_len(&password, dir)?;
    let hash = super::password::Hasher::default().hash(password).await?;
    match d.store.add_user(user.as_str(), &hash, None).await {
        Err(DbError::UserExists) => bail!("{address} exists already"),
        r => r.context("cannot add the user")?,
    }
    Ok(address)
}

pub async fn remove_user(dir: &Path, name: &str) -> anyhow::Result<Q2qAddress> {
    let d = open(dir).await?;
    let (user, address) = user(name, &d)?;
    match d.store.remove_user(user.as_str(), &address.to_string()).await {
        Err(DbError::NoSuchUser) => bail!("{address} is not registered"),
        r => r.context("cannot remove the user")?,
    }
    Ok(address)
}

pub async fn set_password(dir: &Path, name: &str, password: String) -> anyhow::Result<Q2qAddress> {
    let d = open(dir).await?;
    let (user, address) = user(name, &d)?;
    check_len(&password, dir)?;
    let hash = super::password::Hasher::default().hash(password).await?;
    match d.store.set_password_hash(user.as_str(), &hash).await {
        Err(DbError::NoSuchUser) => bail!("{address} is not registered"),
        r => r.context("cannot set the password")?,
    }
    Ok(address)
}

pub async fn list_users(dir: &Path) -> anyhow::Result<(String, Vec<UserRecord>)> {
    let d = open(dir).await?;
    let users = d.store.list_users(d.domain.as_str()).await?;
    Ok((d.domain.to_string(), users))
}

/// A new random 128-bit invite code, stored unused.
pub async fn create_invite(dir: &Path) -> anyhow::Result<String> {
    let d = open(dir).await?;
    let code = hex::encode(rand::random::<[u8; 16]>());
    d.store.create_invite(&code).await?;
    Ok(code)
}

pub async fn list_invites(dir: &Path) -> anyhow::Result<Vec<(String, Option<String>)>> {
    Ok(open(dir).await?.store.invites().await?)
}

pub async fn list_certificates(dir: &Path, name: Option<&str>) -> anyhow::Result<Vec<CertRecord>> {
    let d = open(dir).await?;
    let identity = name.map(|n| user(n, &d).map(|(_, a)| a.to_string())).transpose()?;
    Ok(d.store.certificates(identity.as_deref()).await?)
}

pub async fn revoke(dir: &Path, serial: &str) -> anyhow::Result<()> {
    let d = open(dir).await?;
    match d.store.revoke(&serial.to_ascii_lowercase()).await {
        Err(DbError::NoSuchCertificate) => bail!("no certificate with serial {serial}"),
        r => Ok(r?),
    }
}
