//! File transfer over an in-memory stream: trees, resume, integrity, hostile names,
//! no overwriting.

use q2q::amp::{AmpBox, AmpReader, write_box};
use q2q::transfer::{self, Quiet, ReceiveOptions, TransferError};
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::AsyncWrite;

fn tree(root: &Path) {
    std::fs::create_dir_all(root.join("docs/deep")).unwrap();
    std::fs::write(root.join("a.txt"), b"hello").unwrap();
    std::fs::write(root.join("docs/empty"), b"").unwrap();
    let big: Vec<u8> = (0..1_000_003u32).map(|i| (i * 31 % 253) as u8).collect();
    std::fs::write(root.join("docs/deep/big.bin"), big).unwrap();
}

async fn run(
    src: &[std::path::PathBuf],
    dir: &Path,
    overwrite: bool,
) -> (Result<transfer::Summary, TransferError>, Result<transfer::Summary, TransferError>) {
    let files = transfer::collect(src).unwrap();
    let (a, b) = tokio::io::duplex(1 << 20);
    let opts = ReceiveOptions { dir: dir.to_path_buf(), overwrite };
    let recv = tokio::spawn(async move { transfer::receive(b, &opts, &mut Quiet).await });
    let sent = transfer::send(a, &files, &mut Quiet).await;
    (sent, recv.await.unwrap())
}

fn same(a: &Path, b: &Path) {
    assert_eq!(std::fs::read(a).unwrap(), std::fs::read(b).unwrap(), "{} differs", b.display());
}

#[tokio::test]
async fn a_tree_arrives_identical() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("project");
    tree(&src);
    let dst = t.path().join("inbox");
    let (sent, got) = run(std::slice::from_ref(&src), &dst, false).await;
    let sent = sent.unwrap();
    assert_eq!((sent.files, sent.transferred), (3, 1_000_008));
    assert_eq!(got.unwrap().files, 3);
    for f in ["a.txt", "docs/empty", "docs/deep/big.bin"] {
        same(&src.join(f), &dst.join("project").join(f));
    }
    // Sending again: identical files are skipped, nothing crosses.
    let (sent, _) = run(std::slice::from_ref(&src), &dst, false).await;
    let sent = sent.unwrap();
    assert_eq!((sent.skipped, sent.transferred), (3, 0));
}

/// Fails every write after `left` bytes: the sender "killed" halfway.
struct CutAfter<W> {
    inner: W,
    left: usize,
}

impl<W: AsyncWrite + Unpin> AsyncWrite for CutAfter<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.left == 0 {
            return Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "killed")));
        }
        let n = buf.len().min(self.left);
        let me = &mut *self;
        match Pin::new(&mut me.inner).poll_write(cx, &buf[..n]) {
            Poll::Ready(Ok(k)) => {
                me.left -= k;
                Poll::Ready(Ok(k))
            }
            other => other,
        }
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<W: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for CutAfter<W> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

#[tokio::test]
async fn an_interrupted_transfer_resumes_where_it_stopped() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("big.bin");
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&src, &data).unwrap();
    let dst = t.path().join("inbox");
    let files = transfer::collect(std::slice::from_ref(&src)).unwrap();
    let (a, b) = tokio::io::duplex(1 << 16);
    let opts = ReceiveOptions { dir: dst.clone(), overwrite: false };
    let recv = tokio::spawn(async move { transfer::receive(b, &opts, &mut Quiet).await });
    let cut = CutAfter { inner: a, left: 1_500_000 };
    assert!(transfer::send(cut, &files, &mut Quiet).await.is_err());
    assert!(recv.await.unwrap().is_err());
    assert!(!dst.join("big.bin").exists(), "nothing appears under its name half-written");

    let (sent, got) = run(std::slice::from_ref(&src), &dst, false).await;
    let sent = sent.unwrap();
    got.unwrap();
    assert_eq!(sent.resumed, 1);
    assert!(sent.transferred < 1_600_000, "only the missing part was sent: {}", sent.transferred);
    same(&src, &dst.join("big.bin"));
    let leftovers: Vec<_> =
        std::fs::read_dir(&dst).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers.len(), 1, "no partial file left: {leftovers:?}");
}

#[tokio::test]
async fn existing_files_are_not_overwritten_unless_asked() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("note.txt");
    std::fs::write(&src, b"new").unwrap();
    let dst = t.path().join("inbox");
    std::fs::create_dir_all(&dst).unwrap();
    std::fs::write(dst.join("note.txt"), b"old").unwrap();
    let (sent, _) = run(std::slice::from_ref(&src), &dst, false).await;
    assert!(sent.unwrap_err().to_string().contains("exists with other content"));
    assert_eq!(std::fs::read(dst.join("note.txt")).unwrap(), b"old");
    let (sent, _) = run(std::slice::from_ref(&src), &dst, true).await;
    sent.unwrap();
    assert_eq!(std::fs::read(dst.join("note.txt")).unwrap(), b"new");
}

/// A hostile sender offering `name`: the receiver refuses before writing anything.
async fn hostile(name: &str) -> (String, tempfile::TempDir) {
    let t = tempfile::tempdir().unwrap();
    let dst = t.path().join("inbox");
    let (a, b) = tokio::io::duplex(1 << 16);
    let opts = ReceiveOptions { dir: dst.clone(), overwrite: true };
    let recv = tokio::spawn(async move { transfer::receive(b, &opts, &mut Quiet).await });
    let mut r = AmpReader::new(a);
    write_box(
        r.get_mut(),
        &AmpBox::command("hello").with("version", "1").with("files", "1").with("bytes", "4"),
    )
    .await
    .unwrap();
    assert_eq!(r.read_box().await.unwrap().unwrap().get_str("_command"), Some("accept"));
    let offer = AmpBox::command("offer")
        .with("name", name)
        .with("size", "4")
        .with("sha256", "00".repeat(32));
    write_box(r.get_mut(), &offer).await.unwrap();
    let reply = r.read_box().await.unwrap().unwrap();
    assert_eq!(reply.get_str("_command"), Some("refuse"));
    let err = recv.await.unwrap().unwrap_err().to_string();
    (format!("{err} | {}", reply.get_str("reason").unwrap_or("")), t)
}

#[tokio::test]
async fn hostile_names_are_refused() {
    for name in ["../../etc/passwd", "/etc/passwd", "a/../../x"] {
        let (why, t) = hostile(name).await;
        assert!(why.contains("refused file name"), "{name}: {why}");
        assert!(!t.path().join("etc").exists());
    }
    // A link planted inside the target directory does not lead the write outside.
    let t = tempfile::tempdir().unwrap();
    let dst = t.path().join("inbox");
    std::fs::create_dir_all(&dst).unwrap();
    let outside = t.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, dst.join("sub")).unwrap();
    let src = t.path().join("sub");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("x"), b"data").unwrap();
    let (sent, _) = run(&[src], &dst, false).await;
    assert!(sent.unwrap_err().to_string().contains("outside the target directory"));
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
}

/// Fails every read after `left` bytes: the receiver "killed" halfway.
struct ReadCut<S> {
    inner: S,
    left: usize,
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for ReadCut<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.left == 0 {
            return Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "killed")));
        }
        let me = &mut *self;
        let mut tmp = vec![0u8; buf.remaining().min(me.left)];
        let mut limited = tokio::io::ReadBuf::new(&mut tmp);
        let r = Pin::new(&mut me.inner).poll_read(cx, &mut limited);
        let n = limited.filled().len();
        buf.put_slice(&tmp[..n]);
        me.left -= n;
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadCut<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[tokio::test]
async fn a_killed_receiver_resumes_too() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("big.bin");
    let data: Vec<u8> = (0..4_000_000u32).map(|i| (i * 13 % 241) as u8).collect();
    std::fs::write(&src, &data).unwrap();
    let dst = t.path().join("inbox");
    let files = transfer::collect(std::slice::from_ref(&src)).unwrap();
    let (a, b) = tokio::io::duplex(1 << 16);
    let opts = ReceiveOptions { dir: dst.clone(), overwrite: false };
    // The receiver dies after reading about 1.5 MB.
    let cut = ReadCut { inner: b, left: 1_500_000 };
    let recv = tokio::spawn(async move { transfer::receive(cut, &opts, &mut Quiet).await });
    let sent = transfer::send(a, &files, &mut Quiet).await;
    assert!(recv.await.unwrap().is_err());
    assert!(sent.is_err(), "the sender notices the receiver is gone");
    assert!(!dst.join("big.bin").exists(), "nothing under its name");

    let (sent, got) = run(std::slice::from_ref(&src), &dst, false).await;
    got.unwrap();
    let sent = sent.unwrap();
    assert_eq!(sent.resumed, 1);
    assert!(sent.transferred < 3_000_000, "only the rest was sent: {}", sent.transferred);
    same(&src, &dst.join("big.bin"));
}
