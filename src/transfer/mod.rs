//! Person-to-person file transfer (`q2q-tun send` / `receive`), over one authenticated q2q
//! stream of the service `file`.
//!
//! The conversation is AMP boxes (the same checked parser as the control protocol); file
//! data follows a `chunk` box as raw bytes, up to [`CHUNK`] at a time:
//!
//! ```text
//! sender                                   receiver
//! hello {version, files, dirs, bytes} ──▶
//!                                     ◀──  accept | refuse {reason}
//! dir {name}                          ──▶  (an empty directory)
//!                                     ◀──  done | refuse {reason} | stop {reason}
//! offer {name, size}                  ──▶  (name checked: relative, no `..`; then every
//!                                          component opened beneath the root, no links)
//!                                     ◀──  compare {hash…}     (same-size files there)
//! same {index} | differ               ──▶
//!                                     ◀──  skip | refuse {reason} | stop {reason}
//!                                          | resume {offset, hash of what it has}
//! start {offset}                      ──▶  (the offset, or 0 if the prefix differs)
//! chunk {len, hash} + len bytes ...   ──▶  each chunk's hash checked as it is written;
//!                                     ◀──  (refuse | stop may come early: the sender
//!                                           stops sending data and sends end)
//! end {hash}                          ──▶  the whole file's hash checked, fsync, rename
//!                                     ◀──  done {as} | refuse {reason} | stop {reason}
//! ... next offer ... bye              ──▶
//! ```
//!
//! A file's hash is the BLAKE3 of its chunks' BLAKE3 hashes, in order (as Dropbox's content
//! hash, with BLAKE3 for SHA-256): each byte is hashed once per side, and a resumed prefix is checked by the same
//! function. `refuse` concerns one file (a name this file system cannot hold, a file over the
//! size limit): the rest goes on. `stop` ends the transfer (disk full, no permission).
//!
//! On the receiver, data goes to `.q2q-partial-<hash of name and size>` in the file's
//! directory, which any name the file system holds leaves room for, and is renamed once the
//! whole-file hash matches, so a file never appears half-written under its name. Sending
//! again finds the partial file by the same name and resumes at its end (whole chunks only):
//! only the missing part crosses the network. A name already taken by other content is kept,
//! and the new file arrives as `name (1).ext` (as Taildrop does) unless the receiver passed
//! `--overwrite`; a file identical to one there is skipped.
//!
//! Disk reads, writes and hashing run on blocking threads with a few chunks in flight
//! (bounded channels); the async side only moves buffers between disk and stream.

mod direct;
pub mod names;
pub mod root;
pub mod wire;

use crate::amp::AmpBox;
use direct::AlignedBuf;
use names::{NameError, SafeName};
use root::{Parent, Root, StoreError};
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tracing::warn;
use wire::{Reader, WireError, cmd};

/// Bytes of file data per chunk; resume offsets are whole chunks.
pub const CHUNK: usize = 1 << 20;
/// The transfer protocol version (`hello {version}`): 3 hashes with BLAKE3, 2 with SHA-256.
pub const VERSION: &str = "3";
/// Most files one transfer may offer.
pub const MAX_FILES: usize = 100_000;
/// Chunks in flight between a disk thread and the stream.
const PIPELINE: usize = 4;
/// Bytes written between background flushes to disk.
const FLUSH_EVERY: u64 = 64 << 20;
/// Most `name (n)` variants tried for a taken name.
const MAX_NUMBERED: usize = 1000;
/// Prefix of partial files' names.
pub const PARTIAL_PREFIX: &str = ".q2q-partial-";

/// Why a transfer failed as a whole.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// A local file could not be read.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The connection failed or the other side spoke something else.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The other side broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The receiver refused the whole transfer.
    #[error("the receiver refused: {0}")]
    Refused(String),
    /// The receiver stopped the transfer: nothing more can be stored.
    #[error("the transfer stopped: {0}")]
    Stopped(String),
    /// The sender offered a name that tries to leave the receiving directory.
    #[error(transparent)]
    Name(#[from] NameError),
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

/// A file or directory the receiver did not take, and why (one sentence).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub name: String,
    pub reason: String,
}

/// What a transfer did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Files offered.
    pub files: usize,
    /// Empty directories offered.
    pub dirs: usize,
    /// Total size of the files.
    pub bytes: u64,
    /// Bytes that crossed the network (less than `bytes` after a resume or a skip).
    pub transferred: u64,
    /// Files identical to one already there.
    pub skipped: usize,
    pub resumed: usize,
    /// Files and directories refused one by one (the rest went on).
    pub refused: Vec<Refusal>,
    /// Files stored under another name because theirs was taken: (offered, stored as).
    pub renamed: Vec<(String, String)>,
}

impl Summary {
    /// `3 files and 1 directory (N bytes, M sent, 1 resumed, 2 already there, 1 refused)`,
    /// with `moved` naming the bytes that crossed (`sent`, `transferred`).
    pub fn line(&self, moved: &str) -> String {
        let mut s = format!("{} file{}", self.files, if self.files == 1 { "" } else { "s" });
        if self.dirs > 0 {
            s +=
                &format!(" and {} director{}", self.dirs, if self.dirs == 1 { "y" } else { "ies" });
        }
        s += &format!(" ({} bytes, {} {moved}", self.bytes, self.transferred);
        if self.resumed > 0 {
            s += &format!(", {} resumed", self.resumed);
        }
        if self.skipped > 0 {
            s += &format!(", {} already there", self.skipped);
        }
        if !self.refused.is_empty() {
            s += &format!(", {} refused", self.refused.len());
        }
        s + ")"
    }
}

/// What an entry to send is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    /// An empty directory (directories with content arrive with it).
    Dir,
}

/// A file or empty directory to send: where it is here and the name it gets there.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub path: PathBuf,
    pub name: SafeName,
    pub size: u64,
    pub kind: Kind,
}

/// The files to send for the command-line arguments: files as their base name, directories
/// recursively under their own name (empty ones too). Symbolic links are not followed
/// (refused). Two arguments with the same base name both go: the receiver keeps the second
/// as `name (1).ext`.
pub fn collect(args: &[PathBuf]) -> Result<Vec<Outgoing>, TransferError> {
    let mut out = Vec::new();
    for arg in args {
        let meta = std::fs::symlink_metadata(arg)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", arg.display())))?;
        let base = match arg.file_name() {
            Some(b) => PathBuf::from(b),
            // `.` or `dir/..`: the directory's own name.
            None => std::fs::canonicalize(arg)?
                .file_name()
                .map(PathBuf::from)
                .ok_or_else(|| NameError::Invalid(arg.display().to_string()))?,
        };
        walk(arg, &base, &meta, &mut out)?;
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
            kind: Kind::File,
        });
    } else if meta.is_dir() {
        let mut entries: Vec<_> = std::fs::read_dir(path)?.collect::<Result<_, _>>()?;
        if entries.is_empty() {
            out.push(Outgoing {
                path: path.to_path_buf(),
                name: SafeName::from_relative(rel)?,
                size: 0,
                kind: Kind::Dir,
            });
        }
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let m = e.path().symlink_metadata()?;
            walk(&e.path(), &rel.join(e.file_name()), &m, out)?;
        }
    }
    Ok(())
}

/// The running content hash of a file: BLAKE3 over its chunks' hashes, in order
/// ([`chunk_hash`]); `finalize` gives the file's hash.
type ListHash = blake3::Hasher;

/// The hash of one chunk: BLAKE3 (32 bytes). BLAKE3 rather than SHA-256: on these machines
/// it hashes 1 MiB chunks about four times as fast (3 against 0.8 GB/s a core, under load),
/// and the sender and the receiver each hash every byte once.
fn chunk_hash(data: &[u8]) -> [u8; 32] {
    *blake3::hash(data).as_bytes()
}

/// The content hash of the first `len` bytes of `file` (from its current position): the
/// hash of its chunks' hashes. Returns the running state, to go on from.
fn chunk_hashes(file: &mut std::fs::File, len: u64) -> std::io::Result<ListHash> {
    let mut list = ListHash::new();
    let mut buf = vec![0u8; CHUNK];
    let mut left = len;
    while left > 0 {
        let want = chunk_len(left);
        file.read_exact(&mut buf[..want])?;
        list.update(&chunk_hash(&buf[..want]));
        left -= want as u64;
    }
    Ok(list)
}

fn chunk_len(left: u64) -> usize {
    usize::try_from(left).map_or(CHUNK, |l| l.min(CHUNK))
}

/// Run blocking work (disk, hashing) off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, TransferError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| TransferError::Io(std::io::Error::other(format!("a disk thread failed: {e}"))))
}

/// A chunk between a disk thread and the stream.
struct Chunk {
    buf: AlignedBuf,
    len: usize,
    digest: [u8; 32],
}

fn parse_u64(b: &AmpBox, k: &str) -> Option<u64> {
    b.get_str(k).and_then(|v| v.parse::<u64>().ok())
}

fn reason(b: &AmpBox) -> String {
    wire::without_urls(b.get_str("reason").unwrap_or("no reason given"))
}

/// Send `files` over `stream` (the sender's side). Files the receiver refuses one by one
/// are listed in the summary; the rest still goes.
pub async fn send<S>(
    stream: S,
    files: &[Outgoing],
    progress: &mut dyn Progress,
) -> Result<Summary, TransferError>
where
    S: AsyncRead + AsyncWrite + Send,
{
    let total: u64 = files.iter().map(|f| f.size).sum();
    let (rd, mut w) = tokio::io::split(stream);
    let mut r = Reader::new(rd);
    let dirs = files.iter().filter(|f| f.kind == Kind::Dir).count();
    let hello = AmpBox::command("hello")
        .with("version", VERSION)
        .with("files", (files.len() - dirs).to_string())
        .with("dirs", dirs.to_string())
        .with("bytes", total.to_string());
    wire::send(&mut w, &hello).await?;
    let answer = r.expect_box().await?;
    if cmd(&answer) != "accept" {
        return Err(TransferError::Refused(reason(&answer)));
    }
    progress.start(total);
    let mut summary = Summary { bytes: total, ..Default::default() };
    for f in files {
        progress.file(f.name.as_str());
        match f.kind {
            Kind::Dir => {
                summary.dirs += 1;
                wire::send(&mut w, &AmpBox::command("dir").with("name", f.name.as_str())).await?;
                let reply = r.expect_box().await?;
                settle(&reply, f, &mut summary)?;
            }
            Kind::File => {
                summary.files += 1;
                send_file(&mut r, &mut w, f, progress, &mut summary).await?;
            }
        }
    }
    wire::send(&mut w, &AmpBox::command("bye")).await?;
    let _ = w.shutdown().await;
    progress.finish();
    Ok(summary)
}

/// The receiver's last word on one entry.
fn settle(reply: &AmpBox, f: &Outgoing, summary: &mut Summary) -> Result<(), TransferError> {
    match cmd(reply) {
        "done" => {
            if let Some(saved) = reply.get_str("as")
                && saved != f.name.as_str()
            {
                summary.renamed.push((f.name.as_str().to_string(), saved.to_string()));
            }
            Ok(())
        }
        "refuse" => {
            summary.refused.push(Refusal { name: f.name.as_str().into(), reason: reason(reply) });
            Ok(())
        }
        "stop" => Err(TransferError::Stopped(reason(reply))),
        other => Err(protocol(format!("unexpected `{other}`"))),
    }
}

async fn send_file<R, W>(
    r: &mut Reader<R>,
    w: &mut W,
    f: &Outgoing,
    progress: &mut dyn Progress,
    summary: &mut Summary,
) -> Result<(), TransferError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let offer =
        AmpBox::command("offer").with("name", f.name.as_str()).with("size", f.size.to_string());
    wire::send(w, &offer).await?;
    let mut reply = r.expect_box().await?;
    if cmd(&reply) == "compare" {
        let theirs = reply.get("hash").unwrap_or_default().to_vec();
        let (path, size) = (f.path.clone(), f.size);
        let mine = blocking(move || {
            chunk_hashes(&mut std::fs::File::open(path)?, size).map(|h| h.finalize())
        })
        .await??;
        let answer = match theirs.chunks(32).position(|h| h == mine.as_bytes()) {
            Some(i) => AmpBox::command("same").with("index", i.to_string()),
            None => AmpBox::command("differ"),
        };
        wire::send(w, &answer).await?;
        reply = r.expect_box().await?;
    }
    match cmd(&reply) {
        "skip" => {
            summary.skipped += 1;
            progress.advance(f.size);
            return Ok(());
        }
        "resume" => {}
        _ => {
            progress.advance(f.size);
            return settle(&reply, f, summary);
        }
    }
    let offset = parse_u64(&reply, "offset").ok_or_else(|| protocol("bad offset"))?;
    if offset > f.size || offset % CHUNK as u64 != 0 {
        return Err(protocol(format!("receiver asked to resume {} at {offset}", f.name.as_str())));
    }
    // Resume only if the receiver's prefix is this file's.
    let (start, list) = if offset > 0 {
        let path = f.path.clone();
        let prefix =
            blocking(move || chunk_hashes(&mut std::fs::File::open(path)?, offset)).await??;
        if reply.get("hash") == Some(prefix.finalize().as_bytes().as_slice()) {
            (offset, prefix)
        } else {
            (0, ListHash::new())
        }
    } else {
        (0, ListHash::new())
    };
    wire::send(w, &AmpBox::command("start").with("offset", start.to_string())).await?;
    if start > 0 {
        summary.resumed += 1;
        progress.advance(start);
    }

    let (tx, mut rx) = tokio::sync::mpsc::channel::<Chunk>(PIPELINE);
    let (back_tx, back_rx) = std::sync::mpsc::channel::<AlignedBuf>();
    let (path, size, shown) = (f.path.clone(), f.size, f.name.as_str().to_string());
    let reader = tokio::task::spawn_blocking(move || {
        read_chunks(&path, &shown, start, size, list, &tx, &back_rx)
    });
    let mut early = None;
    loop {
        tokio::select! {
            biased;
            b = r.read_box() => {
                early = Some(b?.ok_or_else(|| WireError::Lost("the receiver closed the connection".into()))?);
                break;
            }
            c = rx.recv() => {
                let Some(c) = c else { break };
                let head = AmpBox::command("chunk")
                    .with("len", c.len.to_string())
                    .with("hash", c.digest.as_slice());
                wire::put(w, &head).await?;
                w.write_all(c.buf.get(c.len)).await.map_err(|e| wire::lost(&e))?;
                summary.transferred += c.len as u64;
                progress.advance(c.len as u64);
                let _ = back_tx.send(c.buf);
            }
        }
    }
    drop(rx);
    let read =
        reader.await.map_err(|e| std::io::Error::other(format!("a disk thread failed: {e}")));
    let reply = match early {
        Some(b) => {
            // The receiver gave up on this file: it reads on until `end`.
            wire::send(w, &AmpBox::command("end")).await?;
            b
        }
        None => {
            let whole = read??.finalize();
            wire::send(w, &AmpBox::command("end").with("hash", whole.as_bytes().as_slice()))
                .await?;
            r.expect_box().await?
        }
    };
    settle(&reply, f, summary)
}

/// The disk side of sending a file: read chunks from `start`, hash each, hand them over.
fn read_chunks(
    path: &Path,
    shown: &str,
    start: u64,
    size: u64,
    mut list: ListHash,
    tx: &tokio::sync::mpsc::Sender<Chunk>,
    back: &std::sync::mpsc::Receiver<AlignedBuf>,
) -> std::io::Result<ListHash> {
    let mut file = std::fs::File::open(path)?;
    file.seek(std::io::SeekFrom::Start(start))?;
    let mut left = size - start;
    while left > 0 {
        let len = chunk_len(left);
        let mut buf = back.try_recv().unwrap_or_else(|_| AlignedBuf::new());
        file.read_exact(buf.get_mut(len)).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => {
                std::io::Error::other(format!("{shown} became shorter while it was being sent"))
            }
            _ => std::io::Error::new(e.kind(), format!("{}: {e}", path.display())),
        })?;
        let digest = chunk_hash(buf.get(len));
        list.update(&digest);
        if tx.blocking_send(Chunk { buf, len, digest }).is_err() {
            // The stream side stopped (the receiver refused the file): nothing more to do.
            break;
        }
        left -= len as u64;
    }
    Ok(list)
}

/// Receiving options.
#[derive(Debug, Clone)]
pub struct ReceiveOptions {
    pub dir: PathBuf,
    /// Replace files that exist with other content (else the new one is `name (1).ext`).
    pub overwrite: bool,
}

/// Receive files from `stream` into `opts.dir` (the receiver's side).
pub async fn receive<S>(
    stream: S,
    opts: &ReceiveOptions,
    progress: &mut dyn Progress,
) -> Result<Summary, TransferError>
where
    S: AsyncRead + AsyncWrite + Send,
{
    let (rd, mut w) = tokio::io::split(stream);
    let mut r = Reader::new(rd);
    let hello = r.expect_box().await?;
    if cmd(&hello) != "hello" || hello.get_str("version") != Some(VERSION) {
        let why = format!(
            "the sender speaks transfer protocol version {}, this receiver {VERSION}: both need \
             the same q2q release",
            hello.get_str("version").unwrap_or("unknown")
        );
        let _ = wire::send(&mut w, &AmpBox::command("refuse").with("reason", &why)).await;
        return Err(TransferError::Refused(why));
    }
    let files = parse_u64(&hello, "files").ok_or_else(|| protocol("bad hello"))?;
    let dirs = parse_u64(&hello, "dirs").unwrap_or(0);
    let total = parse_u64(&hello, "bytes").ok_or_else(|| protocol("bad hello"))?;
    if files.saturating_add(dirs) > MAX_FILES as u64 {
        let why = format!("more than {MAX_FILES} files in one transfer");
        let _ = wire::send(&mut w, &AmpBox::command("refuse").with("reason", &why)).await;
        return Err(TransferError::Refused(why));
    }
    let dir = opts.dir.clone();
    let root = match blocking(move || Root::open(&dir)).await? {
        Ok(root) => Arc::new(root),
        Err(e) => {
            let why = root::describe_io(&e, &opts.dir.display().to_string()).to_string();
            let _ = wire::send(&mut w, &AmpBox::command("refuse").with("reason", &why)).await;
            return Err(TransferError::Refused(why));
        }
    };
    wire::send(&mut w, &AmpBox::command("accept")).await?;
    progress.start(total);
    let mut summary = Summary { bytes: total, ..Default::default() };
    loop {
        let b = r.read_box().await?.ok_or_else(|| {
            WireError::Lost("the sender closed the connection before it finished".into())
        })?;
        let is_dir = match cmd(&b) {
            "bye" => break,
            "offer" => false,
            "dir" => true,
            other => return Err(protocol(format!("unexpected `{other}`"))),
        };
        let name = match b.get_str("name").map(SafeName::parse) {
            Some(Ok(n)) => n,
            Some(Err(e)) => {
                let _ = wire::send(&mut w, &AmpBox::command("stop").with("reason", e.to_string()))
                    .await;
                return Err(e.into());
            }
            None => return Err(protocol("an offer without a name")),
        };
        progress.file(name.as_str());
        let outcome = if is_dir {
            summary.dirs += 1;
            let (root, n) = (root.clone(), name.clone());
            match blocking(move || root.make_dir(&n)).await? {
                Ok(()) => {
                    wire::send(&mut w, &AmpBox::command("done")).await?;
                    Ok(())
                }
                Err(e) => Err(e),
            }
        } else {
            summary.files += 1;
            let size = parse_u64(&b, "size").ok_or_else(|| protocol("an offer without a size"))?;
            let file = Incoming { name: name.clone(), size };
            receive_file(&mut r, &mut w, &root, &file, opts, progress, &mut summary).await?
        };
        match outcome {
            Ok(()) => {}
            Err(StoreError::ThisFile(why)) => {
                warn!(name = name.as_str(), reason = %why, "refused a file");
                wire::send(&mut w, &AmpBox::command("refuse").with("reason", &why)).await?;
                summary.refused.push(Refusal { name: name.as_str().into(), reason: why });
            }
            Err(StoreError::Everything(why)) => {
                let _ = wire::send(&mut w, &AmpBox::command("stop").with("reason", &why)).await;
                return Err(TransferError::Stopped(why));
            }
        }
    }
    progress.finish();
    Ok(summary)
}

/// A file offered.
#[derive(Clone)]
struct Incoming {
    name: SafeName,
    size: u64,
}

/// Where a file will go, found on a blocking thread.
struct Place {
    parent: Parent,
    /// Names of same-size files there, with their content hashes.
    candidates: Vec<(String, blake3::Hash)>,
    /// The first free `name (n)` (or the name itself with overwrite).
    free: usize,
}

fn place(root: &Root, file: &Incoming, overwrite: bool) -> Result<Place, StoreError> {
    let shown = file.name.as_str();
    let parent = root.parent(&file.name)?;
    let mut candidates = Vec::new();
    let mut free = None;
    for n in 0..MAX_NUMBERED {
        let candidate = names::numbered(&parent.base, n, root.name_max());
        let st = match parent.stat(&candidate) {
            Err(nix::errno::Errno::ENOENT) => {
                free = Some(n);
                break;
            }
            Err(e) => return Err(root::describe(e, shown)),
            Ok(st) => st,
        };
        if Parent::is_file(&st) && u64::try_from(st.st_size).ok() == Some(file.size) {
            let mut f = parent.open_read(&candidate).map_err(|e| root::describe(e, shown))?;
            let hash = chunk_hashes(&mut f, file.size).map_err(|e| root::describe_io(&e, shown))?;
            candidates.push((candidate, hash.finalize()));
        } else if overwrite && !Parent::is_file(&st) {
            return Err(StoreError::ThisFile(format!(
                "{shown} exists at the receiver and is not a regular file"
            )));
        }
        if overwrite {
            free = Some(0);
            break;
        }
    }
    let free = free.ok_or_else(|| {
        StoreError::ThisFile(format!(
            "{shown}: {MAX_NUMBERED} files of that name are there already"
        ))
    })?;
    Ok(Place { parent, candidates, free })
}

/// The partial file for `file`: its name, the open file, and how much of it to keep.
struct Partial {
    name: String,
    file: std::fs::File,
    offset: u64,
    prefix: ListHash,
}

fn open_partial(parent: &Parent, file: &Incoming) -> Result<Partial, StoreError> {
    let shown = file.name.as_str();
    let mut key = blake3::Hasher::new();
    key.update(file.name.as_str().as_bytes());
    key.update(&[0]);
    key.update(&file.size.to_be_bytes());
    let name = format!("{PARTIAL_PREFIX}{}", hex::encode(&key.finalize().as_bytes()[..16]));
    let mut f = parent.open_write(&name).map_err(|e| root::describe(e, shown))?;
    let have = f.metadata().map_err(|e| root::describe_io(&e, shown))?.len();
    let offset = (have.min(file.size) / CHUNK as u64) * CHUNK as u64;
    let prefix = chunk_hashes(&mut f, offset).map_err(|e| root::describe_io(&e, shown))?;
    Ok(Partial { name, file: f, offset, prefix })
}

/// The disk side of receiving a file: check each chunk's hash, write it, hash the list.
/// Whole chunks bypass the page cache ([`direct`]); what goes through it is flushed to disk
/// in the background as it comes, so that the final fsync does not wait for all of it.
fn write_chunks(
    mut p: Partial,
    start: u64,
    shown: &str,
    mut rx: tokio::sync::mpsc::Receiver<Chunk>,
    back: &tokio::sync::mpsc::UnboundedSender<AlignedBuf>,
) -> Result<(ListHash, Partial), StoreError> {
    let io = |e: std::io::Error| root::describe_io(&e, shown);
    let mut list = if start == p.offset { p.prefix.clone() } else { ListHash::new() };
    p.file.set_len(start).map_err(io)?;
    p.file.seek(std::io::SeekFrom::Start(start)).map_err(io)?;
    let mut out = direct::DirectWriter::new(&p.file, start.is_multiple_of(direct::ALIGN as u64));
    let flushing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut flushed = 0u64;
    while let Some(c) = rx.blocking_recv() {
        let data = c.buf.get(c.len);
        let digest = chunk_hash(data);
        if digest != c.digest {
            return Err(StoreError::ThisFile(format!(
                "{shown}: a chunk failed its integrity check (its hash differs); send it again"
            )));
        }
        out.write_all(data).map_err(io)?;
        list.update(&digest);
        let _ = back.send(c.buf);
        if out.buffered - flushed >= FLUSH_EVERY
            && !flushing.swap(true, std::sync::atomic::Ordering::AcqRel)
            && let Ok(f) = out.file().try_clone()
        {
            flushed = out.buffered;
            let flushing = flushing.clone();
            std::thread::spawn(move || {
                let _ = f.sync_data();
                flushing.store(false, std::sync::atomic::Ordering::Release);
            });
        }
    }
    tracing::debug!(name = shown, direct = out.is_direct(), buffered = out.buffered, "file stored");
    drop(out);
    // Also what the device holds in its own cache after the direct writes.
    p.file.sync_all().map_err(io)?;
    Ok((list, p))
}

async fn receive_file<R, W>(
    r: &mut Reader<R>,
    w: &mut W,
    root: &Arc<Root>,
    file: &Incoming,
    opts: &ReceiveOptions,
    progress: &mut dyn Progress,
    summary: &mut Summary,
) -> Result<Result<(), StoreError>, TransferError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let shown = file.name.as_str().to_string();
    let (root2, f2, overwrite) = (root.clone(), file.clone(), opts.overwrite);
    let place = match blocking(move || place(&root2, &f2, overwrite)).await? {
        Ok(p) => p,
        Err(e) => return Ok(Err(e)),
    };
    if !place.candidates.is_empty() {
        let hashes: Vec<u8> =
            place.candidates.iter().flat_map(|(_, h)| h.as_bytes().to_vec()).collect();
        wire::send(w, &AmpBox::command("compare").with("hash", hashes)).await?;
        let answer = r.expect_box().await?;
        match cmd(&answer) {
            "same" => {
                let i = parse_u64(&answer, "index")
                    .and_then(|i| usize::try_from(i).ok())
                    .filter(|i| *i < place.candidates.len())
                    .ok_or_else(|| protocol("bad index"))?;
                let saved = &place.candidates[i].0;
                wire::send(w, &AmpBox::command("skip").with("as", saved)).await?;
                summary.skipped += 1;
                progress.advance(file.size);
                return Ok(Ok(()));
            }
            "differ" => {}
            other => return Err(protocol(format!("unexpected `{other}`"))),
        }
    }
    let Place { parent, free, .. } = place;
    let parent = Arc::new(parent);
    let (p2, f2) = (parent.clone(), file.clone());
    let partial = match blocking(move || open_partial(&p2, &f2)).await? {
        Ok(p) => p,
        Err(e) => return Ok(Err(e)),
    };
    let resume = AmpBox::command("resume")
        .with("offset", partial.offset.to_string())
        .with("hash", partial.prefix.finalize().as_bytes().as_slice());
    wire::send(w, &resume).await?;
    let start_box = r.expect_box().await?;
    let start = match (cmd(&start_box), parse_u64(&start_box, "offset")) {
        ("start", Some(s)) if s == 0 || s == partial.offset => s,
        _ => return Err(protocol("expected start at 0 or at the offset offered")),
    };
    if start > 0 {
        summary.resumed += 1;
    }
    progress.advance(start);

    let (tx, rx) = tokio::sync::mpsc::channel::<Chunk>(PIPELINE);
    let (back_tx, mut back_rx) = tokio::sync::mpsc::unbounded_channel::<AlignedBuf>();
    let shown2 = shown.clone();
    let mut writer = Some(tokio::task::spawn_blocking(move || {
        write_chunks(partial, start, &shown2, rx, &back_tx)
    }));
    let mut tx = Some(tx);
    // Set once the writer gave up (the sender was told at once; data is then discarded).
    let mut failed: Option<StoreError> = None;
    let mut got = start;
    let data = async {
        loop {
            let b = r.expect_box().await?;
            match cmd(&b) {
                "chunk" => {}
                "end" => return Ok(b.get("hash").map(<[u8]>::to_vec)),
                other => return Err(protocol(format!("unexpected `{other}` in a file"))),
            }
            let len = parse_u64(&b, "len")
                .and_then(|l| usize::try_from(l).ok())
                .filter(|l| *l <= CHUNK)
                .ok_or_else(|| protocol("a chunk without a valid length"))?;
            let digest: [u8; 32] = b
                .get("hash")
                .and_then(|d| d.try_into().ok())
                .ok_or_else(|| protocol("a chunk without a hash"))?;
            if got + len as u64 > file.size {
                let why = format!("{shown}: the sender sent more data than it announced");
                let _ = wire::send(w, &AmpBox::command("stop").with("reason", &why)).await;
                return Err(protocol(why));
            }
            let mut buf = back_rx.try_recv().unwrap_or_else(|_| AlignedBuf::new());
            r.read_exact(buf.get_mut(len)).await?;
            got += len as u64;
            progress.advance(len as u64);
            if failed.is_some() {
                continue;
            }
            let chunk = Chunk { buf, len, digest };
            if let Some(t) = &tx
                && t.send(chunk).await.is_err()
            {
                tx = None;
                let e = match writer.take() {
                    Some(h) => match h.await {
                        Ok(Err(e)) => e,
                        _ => StoreError::ThisFile(format!(
                            "{shown}: the receiver's disk thread failed"
                        )),
                    },
                    None => {
                        StoreError::ThisFile(format!("{shown}: the receiver's disk thread failed"))
                    }
                };
                // Tell the sender now; it stops sending and ends the file.
                let word = if matches!(e, StoreError::Everything(_)) { "stop" } else { "refuse" };
                wire::send(w, &AmpBox::command(word).with("reason", e.to_string())).await?;
                failed = Some(e);
            }
        }
    }
    .await;
    let sent_hash = match data {
        Ok(h) => h,
        Err(e) => {
            // Let the disk thread finish what it has, so that a resume finds it.
            drop(tx);
            if let Some(h) = writer.take() {
                let _ = h.await;
            }
            return Err(e);
        }
    };
    if let Some(e) = failed {
        warn!(name = %shown, reason = %e, "could not store a file");
        return match e {
            StoreError::Everything(why) => Err(TransferError::Stopped(why)),
            StoreError::ThisFile(why) => {
                summary.refused.push(Refusal { name: shown, reason: why });
                Ok(Ok(()))
            }
        };
    }
    drop(tx);
    let written = match writer.take() {
        Some(h) => {
            h.await.map_err(|e| std::io::Error::other(format!("a disk thread failed: {e}")))?
        }
        None => return Err(protocol("no disk thread")),
    };
    summary.transferred += got - start;
    let (list, partial) = match written {
        Ok(x) => x,
        Err(e) => return Ok(Err(e)),
    };
    let partial_name = partial.name.clone();
    drop(partial);
    if got != file.size || sent_hash.as_deref() != Some(list.finalize().as_bytes().as_slice()) {
        let p2 = parent.clone();
        let _ = blocking(move || p2.remove(&partial_name)).await;
        return Ok(Err(StoreError::ThisFile(format!(
            "{shown}: integrity check failed (the hash differs); the partial file was removed, \
             send it again"
        ))));
    }
    let (p2, name_max, overwrite) = (parent.clone(), root.name_max(), opts.overwrite);
    let renamed = blocking(move || -> Result<String, StoreError> {
        for n in free..MAX_NUMBERED {
            let candidate = names::numbered(&p2.base, n, name_max);
            match p2.rename(&partial_name, &candidate, overwrite) {
                Ok(()) => {
                    p2.sync();
                    return Ok(candidate);
                }
                Err(nix::errno::Errno::EEXIST) if !overwrite => continue,
                Err(e) => return Err(root::describe(e, &candidate)),
            }
        }
        Err(StoreError::ThisFile(format!("{MAX_NUMBERED} files of that name are there already")))
    })
    .await?;
    let saved = match renamed {
        Ok(s) => s,
        Err(e) => return Ok(Err(e)),
    };
    let full = match file.name.as_str().rsplit_once('/') {
        Some((dir, _)) => format!("{dir}/{saved}"),
        None => saved.clone(),
    };
    if full != file.name.as_str() {
        summary.renamed.push((file.name.as_str().to_string(), full.clone()));
    }
    wire::send(w, &AmpBox::command("done").with("as", &full)).await?;
    Ok(Ok(()))
}
