//! Person-to-person file transfer (`q2q-tun send` / `receive`), over one authenticated q2q
//! stream of the service `file`.
//!
//! The conversation is AMP boxes (the same checked parser as the control protocol):
//!
//! ```text
//! sender                                   receiver
//! hello {version, files, bytes}     ──▶
//!                                   ◀──    accept | refuse {reason}
//! offer {name, size, sha256}        ──▶    (name checked: relative, no `..`, no links)
//!                                   ◀──    resume {offset} | skip | refuse {reason}
//! chunk {data, sha256} ... end      ──▶    each chunk's hash checked; at the end the
//!                                   ◀──    whole file's, then fsync and rename: done
//! ... next offer ... bye            ──▶
//! ```
//!
//! Data is written to `.NAME.q2q-partial-HASH` beside its final place and renamed only once
//! the whole-file SHA-256 matches, so a file never appears half-written under its name. An
//! interrupted transfer keeps its partial file; sending again resumes at its end (whole
//! chunks only), and only the missing part crosses the network.

pub mod names;

use crate::amp::{AmpBox, AmpReader, write_box};
use names::{NameError, SafeName};
use std::path::{Path, PathBuf};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeekExt, AsyncWrite, AsyncWriteExt};

/// Bytes of file data per chunk box (an AMP value holds at most 65535).
pub const CHUNK: usize = 60_000;
const VERSION: &str = "1";
/// Most files one transfer may offer.
pub const MAX_FILES: usize = 100_000;

/// Why a transfer failed.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("the receiver refused: {0}")]
    Refused(String),
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("{0}: integrity check failed (SHA-256 differs); the partial file was removed")]
    Corrupt(String),
}

fn protocol(e: impl std::fmt::Display) -> TransferError {
    TransferError::Protocol(e.to_string())
}

/// Progress callbacks (a terminal bar, or nothing).
pub trait Progress: Send {
    fn start(&mut self, total: u64);
    fn file(&mut self, name: &str);
    fn advance(&mut self, bytes: u64);
    fn finish(&mut self);
}

/// No progress display.
pub struct Quiet;

impl Progress for Quiet {
    fn start(&mut self, _: u64) {}
    fn file(&mut self, _: &str) {}
    fn advance(&mut self, _: u64) {}
    fn finish(&mut self) {}
}

/// What a transfer did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    pub files: usize,
    /// Total size of the files.
    pub bytes: u64,
    /// Bytes that crossed the network (less than `bytes` after a resume or a skip).
    pub transferred: u64,
    pub skipped: usize,
    pub resumed: usize,
}

/// A file to send: where it is here and the name it gets there.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub path: PathBuf,
    pub name: SafeName,
    pub size: u64,
}

/// The files to send for the command-line arguments: files as their base name, directories
/// recursively under their own name. Symbolic links are not followed (refused).
pub fn collect(args: &[PathBuf]) -> Result<Vec<Outgoing>, TransferError> {
    let mut out = Vec::new();
    for arg in args {
        let meta = std::fs::symlink_metadata(arg)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", arg.display())))?;
        let base = arg.file_name().ok_or_else(|| NameError::Invalid(arg.display().to_string()))?;
        walk(arg, Path::new(base), &meta, &mut out)?;
    }
    if out.len() > MAX_FILES {
        return Err(protocol(format!("more than {MAX_FILES} files")));
    }
    Ok(out)
}

fn walk(
    path: &Path,
    rel: &Path,
    meta: &std::fs::Metadata,
    out: &mut Vec<Outgoing>,
) -> Result<(), TransferError> {
    if meta.file_type().is_symlink() {
        return Err(protocol(format!("{} is a symbolic link: not sent", path.display())));
    }
    if meta.is_file() {
        out.push(Outgoing {
            path: path.to_path_buf(),
            name: SafeName::from_relative(rel)?,
            size: meta.len(),
        });
    } else if meta.is_dir() {
        let mut entries: Vec<_> = std::fs::read_dir(path)?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let m = e.path().symlink_metadata()?;
            walk(&e.path(), &rel.join(e.file_name()), &m, out)?;
        }
    }
    Ok(())
}

async fn sha256_file(path: &Path, limit: Option<u64>) -> std::io::Result<ring::digest::Context> {
    let mut f = tokio::fs::File::open(path).await?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    let mut left = limit.unwrap_or(u64::MAX);
    while left > 0 {
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = f.read(&mut buf[..want]).await?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
        left -= n as u64;
    }
    Ok(ctx)
}

async fn read_reply<S: AsyncRead + Unpin>(r: &mut AmpReader<S>) -> Result<AmpBox, TransferError> {
    r.read_box()
        .await
        .map_err(protocol)?
        .ok_or_else(|| protocol("the other side closed the stream"))
}

fn cmd(b: &AmpBox) -> &str {
    b.get_str(crate::amp::COMMAND).unwrap_or("")
}

/// Send `files` over `stream` (the sender's side).
pub async fn send<S>(
    stream: S,
    files: &[Outgoing],
    progress: &mut dyn Progress,
) -> Result<Summary, TransferError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let total: u64 = files.iter().map(|f| f.size).sum();
    let mut r = AmpReader::new(stream);
    let hello = AmpBox::command("hello")
        .with("version", VERSION)
        .with("files", files.len().to_string())
        .with("bytes", total.to_string());
    write_box(r.get_mut(), &hello).await.map_err(protocol)?;
    let answer = read_reply(&mut r).await?;
    if cmd(&answer) != "accept" {
        return Err(TransferError::Refused(
            answer.get_str("reason").unwrap_or("no reason given").into(),
        ));
    }
    progress.start(total);
    let mut summary = Summary { files: files.len(), bytes: total, ..Default::default() };
    for f in files {
        progress.file(f.name.as_str());
        let hash = sha256_file(&f.path, None).await?.finish();
        let offer = AmpBox::command("offer")
            .with("name", f.name.as_str())
            .with("size", f.size.to_string())
            .with("sha256", hex::encode(hash.as_ref()));
        write_box(r.get_mut(), &offer).await.map_err(protocol)?;
        let reply = read_reply(&mut r).await?;
        let offset = match cmd(&reply) {
            "skip" => {
                summary.skipped += 1;
                progress.advance(f.size);
                continue;
            }
            "resume" => reply
                .get_str("offset")
                .and_then(|o| o.parse::<u64>().ok())
                .ok_or_else(|| protocol("bad offset"))?,
            _ => {
                return Err(TransferError::Refused(
                    reply.get_str("reason").unwrap_or("refused").into(),
                ));
            }
        };
        if offset > f.size || offset % CHUNK as u64 != 0 {
            return Err(protocol(format!(
                "receiver asked to resume {} at {offset}",
                f.name.as_str()
            )));
        }
        if offset > 0 {
            summary.resumed += 1;
            progress.advance(offset);
        }
        let mut file = tokio::fs::File::open(&f.path).await?;
        file.seek(std::io::SeekFrom::Start(offset)).await?;
        let mut left = f.size - offset;
        let mut buf = vec![0u8; CHUNK];
        while left > 0 {
            let want = CHUNK.min(usize::try_from(left).unwrap_or(CHUNK));
            file.read_exact(&mut buf[..want]).await?;
            let digest = ring::digest::digest(&ring::digest::SHA256, &buf[..want]);
            let chunk =
                AmpBox::command("chunk").with("data", &buf[..want]).with("sha256", digest.as_ref());
            write_box(r.get_mut(), &chunk).await.map_err(protocol)?;
            left -= want as u64;
            summary.transferred += want as u64;
            progress.advance(want as u64);
        }
        write_box(r.get_mut(), &AmpBox::command("end")).await.map_err(protocol)?;
        let done = read_reply(&mut r).await?;
        if cmd(&done) != "done" {
            return Err(TransferError::Refused(done.get_str("reason").unwrap_or("refused").into()));
        }
    }
    write_box(r.get_mut(), &AmpBox::command("bye")).await.map_err(protocol)?;
    let _ = r.get_mut().shutdown().await;
    progress.finish();
    Ok(summary)
}

/// Receiving options.
#[derive(Debug, Clone)]
pub struct ReceiveOptions {
    pub dir: PathBuf,
    /// Replace files that exist with other content.
    pub overwrite: bool,
}

/// Receive files from `stream` into `opts.dir` (the receiver's side).
pub async fn receive<S>(
    stream: S,
    opts: &ReceiveOptions,
    progress: &mut dyn Progress,
) -> Result<Summary, TransferError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut r = AmpReader::new(stream);
    let hello = read_reply(&mut r).await?;
    let parse_u64 = |b: &AmpBox, k: &str| b.get_str(k).and_then(|v| v.parse::<u64>().ok());
    if cmd(&hello) != "hello" || hello.get_str("version") != Some(VERSION) {
        let refuse =
            AmpBox::command("refuse").with("reason", "unsupported transfer protocol version");
        let _ = write_box(r.get_mut(), &refuse).await;
        return Err(protocol("unsupported transfer protocol version"));
    }
    let files = parse_u64(&hello, "files").ok_or_else(|| protocol("bad hello"))?;
    let total = parse_u64(&hello, "bytes").ok_or_else(|| protocol("bad hello"))?;
    if files > MAX_FILES as u64 {
        let _ = write_box(r.get_mut(), &AmpBox::command("refuse").with("reason", "too many files"))
            .await;
        return Err(protocol("too many files"));
    }
    tokio::fs::create_dir_all(&opts.dir).await?;
    let root = tokio::fs::canonicalize(&opts.dir).await?;
    write_box(r.get_mut(), &AmpBox::command("accept")).await.map_err(protocol)?;
    progress.start(total);
    let mut summary = Summary { bytes: total, ..Default::default() };
    loop {
        let b = read_reply(&mut r).await?;
        match cmd(&b) {
            "bye" => break,
            "offer" => {}
            other => return Err(protocol(format!("unexpected `{other}`"))),
        }
        summary.files += 1;
        let name = match b.get_str("name").map(SafeName::parse) {
            Some(Ok(n)) => n,
            Some(Err(e)) => {
                let _ = write_box(
                    r.get_mut(),
                    &AmpBox::command("refuse").with("reason", e.to_string()),
                )
                .await;
                return Err(e.into());
            }
            None => return Err(protocol("offer without a name")),
        };
        let size = parse_u64(&b, "size").ok_or_else(|| protocol("offer without a size"))?;
        let want_hash = b
            .get_str("sha256")
            .and_then(|h| hex::decode(h).ok())
            .filter(|h| h.len() == 32)
            .ok_or_else(|| protocol("bad sha256"))?;
        progress.file(name.as_str());
        match receive_file(&mut r, &root, &name, size, &want_hash, opts, progress).await? {
            FileOutcome::Skipped => summary.skipped += 1,
            FileOutcome::Received { transferred, resumed } => {
                summary.transferred += transferred;
                summary.resumed += usize::from(resumed);
            }
        }
    }
    progress.finish();
    Ok(summary)
}

enum FileOutcome {
    Skipped,
    Received { transferred: u64, resumed: bool },
}

async fn refuse<S: AsyncWrite + Unpin>(w: &mut S, reason: String) -> TransferError {
    let _ = write_box(w, &AmpBox::command("refuse").with("reason", &reason)).await;
    TransferError::Refused(reason)
}

async fn receive_file<S>(
    r: &mut AmpReader<S>,
    root: &Path,
    name: &SafeName,
    size: u64,
    want_hash: &[u8],
    opts: &ReceiveOptions,
    progress: &mut dyn Progress,
) -> Result<FileOutcome, TransferError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let target = name.under(root);
    let parent = target.parent().unwrap_or(root).to_path_buf();
    tokio::fs::create_dir_all(&parent).await?;
    // A link planted inside the target directory must not lead the write elsewhere.
    let real_parent = tokio::fs::canonicalize(&parent).await?;
    if !real_parent.starts_with(root) {
        return Err(refuse(
            r.get_mut(),
            format!("refused file name `{}`: it leads outside the target directory", name.as_str()),
        )
        .await);
    }
    let base = target.file_name().and_then(|n| n.to_str()).unwrap_or("file").to_string();
    let target = real_parent.join(&base);
    if let Ok(meta) = tokio::fs::symlink_metadata(&target).await {
        if !meta.is_file() {
            return Err(refuse(
                r.get_mut(),
                format!("{} exists and is not a regular file", name.as_str()),
            )
            .await);
        }
        if meta.len() == size && sha256_file(&target, None).await?.finish().as_ref() == want_hash {
            write_box(r.get_mut(), &AmpBox::command("skip")).await.map_err(protocol)?;
            progress.advance(size);
            return Ok(FileOutcome::Skipped);
        }
        if !opts.overwrite {
            return Err(refuse(
                r.get_mut(),
                format!(
                    "{} exists with other content (the receiver can allow --overwrite)",
                    name.as_str()
                ),
            )
            .await);
        }
    }
    let partial = real_parent.join(format!(".{base}.q2q-partial-{}", hex::encode(&want_hash[..8])));
    let have = tokio::fs::metadata(&partial).await.map(|m| m.len()).unwrap_or(0);
    let offset = (have.min(size) / CHUNK as u64) * CHUNK as u64;
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(&partial)
        .await?;
    file.set_len(offset).await?;
    file.seek(std::io::SeekFrom::Start(offset)).await?;
    let mut whole = sha256_file(&partial, Some(offset)).await?;
    write_box(r.get_mut(), &AmpBox::command("resume").with("offset", offset.to_string()))
        .await
        .map_err(protocol)?;
    progress.advance(offset);
    let mut got = offset;
    loop {
        let b = read_reply(r).await?;
        match cmd(&b) {
            "chunk" => {
                let data = b.get("data").unwrap_or_default();
                let digest = ring::digest::digest(&ring::digest::SHA256, data);
                if b.get("sha256") != Some(digest.as_ref()) {
                    drop(file);
                    let _ = tokio::fs::remove_file(&partial).await;
                    return Err(refuse(
                        r.get_mut(),
                        format!("{}: a chunk failed its integrity check", name.as_str()),
                    )
                    .await);
                }
                if got + data.len() as u64 > size {
                    return Err(refuse(
                        r.get_mut(),
                        format!("{}: more data than announced", name.as_str()),
                    )
                    .await);
                }
                file.write_all(data).await?;
                whole.update(data);
                got += data.len() as u64;
                progress.advance(data.len() as u64);
            }
            "end" => break,
            other => return Err(protocol(format!("unexpected `{other}` in a file"))),
        }
    }
    file.sync_all().await?;
    drop(file);
    if got != size || whole.finish().as_ref() != want_hash {
        let _ = tokio::fs::remove_file(&partial).await;
        let _ = write_box(
            r.get_mut(),
            &AmpBox::command("refuse").with("reason", "integrity check failed"),
        )
        .await;
        return Err(TransferError::Corrupt(name.as_str().to_string()));
    }
    tokio::fs::rename(&partial, &target).await?;
    if let Ok(d) = std::fs::File::open(&real_parent) {
        let _ = d.sync_all();
    }
    write_box(r.get_mut(), &AmpBox::command("done")).await.map_err(protocol)?;
    Ok(FileOutcome::Received { transferred: got - offset, resumed: offset > 0 })
}
