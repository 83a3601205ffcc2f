//! File transfer over an in-memory stream (and loopback TCP to a child process for the
//! receiver's resource limits): trees, empty directories, long names, names taken, resume,
//! integrity, hostile names and links, receiver errors as sentences.

use q2q::amp::{AmpBox, AmpReader, write_box};
use q2q::transfer::names::SafeName;
use q2q::transfer::{self, CHUNK, Kind, Outgoing, Quiet, ReceiveOptions, TransferError};
use std::path::{Path, PathBuf};
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

/// The names in `dir`, sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
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
    let data: Vec<u8> = (0..5_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&src, &data).unwrap();
    let dst = t.path().join("inbox");
    let files = transfer::collect(std::slice::from_ref(&src)).unwrap();
    let (a, b) = tokio::io::duplex(1 << 16);
    let opts = ReceiveOptions { dir: dst.clone(), overwrite: false };
    let recv = tokio::spawn(async move { transfer::receive(b, &opts, &mut Quiet).await });
    let cut = CutAfter { inner: a, left: 2_500_000 };
    assert!(transfer::send(cut, &files, &mut Quiet).await.is_err());
    assert!(recv.await.unwrap().is_err());
    assert!(!dst.join("big.bin").exists(), "nothing appears under its name half-written");

    let (sent, got) = run(std::slice::from_ref(&src), &dst, false).await;
    let sent = sent.unwrap();
    got.unwrap();
    assert_eq!(sent.resumed, 1);
    // Two whole chunks had arrived: only the rest crossed the second time.
    assert_eq!(sent.transferred, 5_000_000 - 2 * CHUNK as u64, "only the missing part was sent");
    same(&src, &dst.join("big.bin"));
    assert_eq!(entries(&dst), ["big.bin"], "no partial file left");
}

#[tokio::test]
async fn existing_files_are_kept_and_the_new_one_numbered_unless_overwrite() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("note.txt");
    std::fs::write(&src, b"new").unwrap();
    let dst = t.path().join("inbox");
    std::fs::create_dir_all(&dst).unwrap();
    std::fs::write(dst.join("note.txt"), b"old").unwrap();
    let (sent, _) = run(std::slice::from_ref(&src), &dst, false).await;
    let sent = sent.unwrap();
    assert_eq!(sent.renamed, [("note.txt".to_string(), "note (1).txt".to_string())]);
    assert_eq!(std::fs::read(dst.join("note.txt")).unwrap(), b"old");
    assert_eq!(std::fs::read(dst.join("note (1).txt")).unwrap(), b"new");
    // The same file again is recognised under its new name: nothing moves.
    let (sent, _) = run(std::slice::from_ref(&src), &dst, false).await;
    assert_eq!((sent.unwrap().skipped, entries(&dst).len()), (1, 2));
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
        &AmpBox::command("hello")
            .with("version", transfer::VERSION)
            .with("files", "1")
            .with("bytes", "4"),
    )
    .await
    .unwrap();
    assert_eq!(r.read_box().await.unwrap().unwrap().get_str("_command"), Some("accept"));
    let offer = AmpBox::command("offer").with("name", name).with("size", "4");
    write_box(r.get_mut(), &offer).await.unwrap();
    let reply = r.read_box().await.unwrap().unwrap();
    assert_eq!(reply.get_str("_command"), Some("stop"));
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
}

/// Nothing outside `dir` changed: it is still empty.
fn untouched(dir: &Path) {
    assert_eq!(entries(dir), Vec::<String>::new(), "something was created outside the inbox");
}

#[tokio::test]
async fn a_symlinked_parent_is_never_followed() {
    let t = tempfile::tempdir().unwrap();
    let dst = t.path().join("inbox");
    std::fs::create_dir_all(&dst).unwrap();
    let elsewhere = t.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, dst.join("lnk")).unwrap();
    // The sender's tree: lnk/sub/x (deeper than the link: the old receiver made
    // elsewhere/sub before it noticed), lnk/y, and ok.txt beside them.
    let src = t.path().join("send");
    std::fs::create_dir_all(src.join("lnk/sub")).unwrap();
    std::fs::write(src.join("lnk/sub/x"), b"data").unwrap();
    std::fs::write(src.join("lnk/y"), b"data").unwrap();
    std::fs::write(src.join("ok.txt"), b"fine").unwrap();
    let args: Vec<PathBuf> = ["lnk", "ok.txt"].iter().map(|n| src.join(n)).collect();
    let (sent, got) = run(&args, &dst, false).await;
    let sent = sent.unwrap();
    let refused: Vec<_> = sent.refused.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(refused, ["lnk/sub/x", "lnk/y"]);
    assert!(sent.refused[0].reason.contains("symbolic link"), "{:?}", sent.refused);
    assert_eq!(got.unwrap().refused, sent.refused, "both sides give the same reason");
    untouched(&elsewhere);
    same(&src.join("ok.txt"), &dst.join("ok.txt"));
    // A hostile sender offering the deep name directly gets the same answer.
    let (a, b) = tokio::io::duplex(1 << 16);
    let opts = ReceiveOptions { dir: dst.clone(), overwrite: true };
    let recv = tokio::spawn(async move { transfer::receive(b, &opts, &mut Quiet).await });
    let mut r = AmpReader::new(a);
    let hello = AmpBox::command("hello")
        .with("version", transfer::VERSION)
        .with("files", "1")
        .with("bytes", "0");
    write_box(r.get_mut(), &hello).await.unwrap();
    r.read_box().await.unwrap();
    for name in ["lnk/sub/deeper/x", "lnk"] {
        write_box(r.get_mut(), &AmpBox::command("dir").with("name", name)).await.unwrap();
        let reply = r.read_box().await.unwrap().unwrap();
        assert_eq!(reply.get_str("_command"), Some("refuse"), "{name}");
    }
    write_box(r.get_mut(), &AmpBox::command("bye")).await.unwrap();
    recv.await.unwrap().unwrap();
    untouched(&elsewhere);
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
    assert_eq!(sent.transferred, 4_000_000 - CHUNK as u64, "only the rest was sent");
    same(&src, &dst.join("big.bin"));
}

#[tokio::test]
async fn names_up_to_the_file_system_limit_arrive() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    // 240 bytes (the old partial suffix pushed it past 255) and exactly 255, in a directory
    // whose own name is 255 bytes too.
    let n240 = format!("{}.txt", "a".repeat(236));
    let n255 = format!("{}.bin", "é".repeat(125)); // 2 bytes each: 250 + 4 = 254
    let n255 = format!("b{n255}");
    assert_eq!((n240.len(), n255.len()), (240, 255));
    let deep = src.join("d".repeat(255));
    std::fs::create_dir_all(&deep).unwrap();
    let big: Vec<u8> = (0..(CHUNK as u32 * 2 + 7)).map(|i| (i % 249) as u8).collect();
    std::fs::write(src.join(&n240), b"two hundred forty").unwrap();
    std::fs::write(src.join(&n255), &big).unwrap();
    std::fs::write(deep.join(&n255), b"deep").unwrap();
    let dst = t.path().join("inbox");
    let args: Vec<PathBuf> =
        [n240.as_str(), n255.as_str(), &"d".repeat(255)].iter().map(|n| src.join(n)).collect();
    let (sent, got) = run(&args, &dst, false).await;
    let sent = sent.unwrap();
    assert_eq!((sent.files, sent.refused.len()), (3, 0), "{sent:?}");
    got.unwrap();
    same(&src.join(&n240), &dst.join(&n240));
    same(&src.join(&n255), &dst.join(&n255));
    same(&deep.join(&n255), &dst.join("d".repeat(255)).join(&n255));
    assert_eq!(entries(&dst).len(), 3, "no partial file left: {:?}", entries(&dst));
}

#[tokio::test]
async fn empty_directories_arrive() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("project");
    std::fs::create_dir_all(src.join("empty")).unwrap();
    std::fs::create_dir_all(src.join("deep/er/still")).unwrap();
    std::fs::write(src.join("deep/file"), b"x").unwrap();
    let alone = t.path().join("nothing-here");
    std::fs::create_dir_all(&alone).unwrap();
    let dst = t.path().join("inbox");
    let (sent, got) = run(&[src.clone(), alone], &dst, false).await;
    let sent = sent.unwrap();
    assert_eq!((sent.files, sent.dirs), (1, 3));
    assert_eq!(sent.line("sent"), "1 file and 3 directories (1 bytes, 1 sent)");
    assert_eq!(got.unwrap().dirs, 3);
    assert!(dst.join("project/empty").is_dir());
    assert!(dst.join("project/deep/er/still").is_dir());
    assert!(dst.join("nothing-here").is_dir());
    same(&src.join("deep/file"), &dst.join("project/deep/file"));
    // Again: directories that exist are fine.
    let (sent, _) = run(&[src], &dst, false).await;
    assert!(sent.unwrap().refused.is_empty());
}

#[tokio::test]
async fn the_same_name_twice_keeps_both() {
    let t = tempfile::tempdir().unwrap();
    for (d, text) in [("d1", "first"), ("d2", "second"), ("d3", "first")] {
        std::fs::create_dir_all(t.path().join(d)).unwrap();
        std::fs::write(t.path().join(d).join("same.txt"), text).unwrap();
    }
    let args: Vec<PathBuf> =
        ["d1", "d2"].iter().map(|d| t.path().join(d).join("same.txt")).collect();
    let dst = t.path().join("inbox");
    let (sent, got) = run(&args, &dst, false).await;
    let sent = sent.unwrap();
    assert_eq!(sent.renamed, [("same.txt".to_string(), "same (1).txt".to_string())]);
    assert_eq!(got.unwrap().renamed, sent.renamed);
    assert_eq!(std::fs::read_to_string(dst.join("same.txt")).unwrap(), "first");
    assert_eq!(std::fs::read_to_string(dst.join("same (1).txt")).unwrap(), "second");
    // Sending both again, and a third copy of the first: all recognised, nothing new.
    let mut again = args.clone();
    again.push(t.path().join("d3/same.txt"));
    let (sent, _) = run(&again, &dst, false).await;
    let sent = sent.unwrap();
    assert_eq!((sent.skipped, sent.transferred), (3, 0));
    assert_eq!(entries(&dst), ["same (1).txt", "same.txt"]);
}

#[tokio::test]
async fn a_name_the_receiver_cannot_hold_is_refused_alone() {
    let t = tempfile::tempdir().unwrap();
    let a = t.path().join("a.txt");
    let b = t.path().join("b.bin");
    let wide_src = t.path().join("wide");
    std::fs::write(&a, b"before").unwrap();
    std::fs::write(&b, vec![7u8; 3 * CHUNK / 2]).unwrap();
    std::fs::write(&wide_src, b"from a file system with longer names").unwrap();
    // 100 CJK characters: 300 bytes of UTF-8, a valid name on APFS (255 UTF-16 units) but
    // too long for ext4 or tmpfs (255 bytes).
    let wide = "中".repeat(100);
    let mut files = transfer::collect(std::slice::from_ref(&a)).unwrap();
    for (name, path) in [(format!("dir/{wide}"), &wide_src), (wide.clone(), &wide_src)] {
        files.push(Outgoing {
            path: path.clone(),
            name: SafeName::parse(&name).unwrap(),
            size: 36,
            kind: Kind::File,
        });
    }
    files.extend(transfer::collect(std::slice::from_ref(&b)).unwrap());
    let dst = t.path().join("inbox");
    let (x, y) = tokio::io::duplex(1 << 20);
    let opts = ReceiveOptions { dir: dst.clone(), overwrite: false };
    let recv = tokio::spawn(async move { transfer::receive(y, &opts, &mut Quiet).await });
    let sent = transfer::send(x, &files, &mut Quiet).await.unwrap();
    let got = recv.await.unwrap().unwrap();
    assert_eq!(sent.refused.len(), 2, "{sent:?}");
    assert_eq!(got.refused, sent.refused, "the reason is shown on both sides");
    let why = &sent.refused[0].reason;
    assert!(
        why.contains("too long for the receiver's file system") && why.contains("300 bytes"),
        "{why}"
    );
    same(&a, &dst.join("a.txt"));
    same(&b, &dst.join("b.bin"));
    assert_eq!(
        entries(&dst),
        ["a.txt", "b.bin"],
        "nothing made for the refused names (not even dir/)"
    );
}

// --- Receiver errors, with the receiver in a child process (its own limits and privileges),
// --- over loopback TCP.

/// The receiving side when this test binary runs as a child (else nothing): connect to
/// Q2Q_TEST_RECEIVER's address, receive into its directory, print the outcome.
#[tokio::test]
async fn receiver_child() {
    let Ok(spec) = std::env::var("Q2Q_TEST_RECEIVER") else { return };
    let (addr, dir) = spec.split_once(' ').unwrap();
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let opts = ReceiveOptions { dir: dir.into(), overwrite: false };
    match transfer::receive(stream, &opts, &mut Quiet).await {
        Ok(s) => {
            for r in s.refused {
                println!("RECEIVER refused: {}", r.reason);
            }
            println!("RECEIVER ok");
        }
        Err(e) => println!("RECEIVER error: {e}"),
    }
}

/// Send `files` to a receiver child started under `wrapper` (a command prefix that sets its
/// limits); returns the sender's result and the child's output lines.
async fn to_child(
    wrapper: &[&str],
    dir: &Path,
    files: &[PathBuf],
) -> (Result<transfer::Summary, TransferError>, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut cmd = std::process::Command::new(wrapper[0]);
    cmd.args(&wrapper[1..])
        .arg(&exe)
        .args(["--exact", "receiver_child", "--nocapture", "--test-threads=1"])
        .env("Q2Q_TEST_RECEIVER", format!("{addr} {}", dir.display()))
        .stdout(std::process::Stdio::piped());
    let child = cmd.spawn().unwrap();
    let (stream, _) = tokio::time::timeout(std::time::Duration::from_secs(60), listener.accept())
        .await
        .expect("the receiver child connects")
        .unwrap();
    let files = transfer::collect(files).unwrap();
    let sent = transfer::send(stream, &files, &mut Quiet).await;
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap()).await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let lines = text
        .lines()
        .filter_map(|l| l.find("RECEIVER").map(|i| &l[i..]))
        .collect::<Vec<_>>()
        .join("\n");
    (sent, lines)
}

fn have(tool: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn is_root() -> bool {
    nix_euid() == 0
}

fn nix_euid() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2))
                .and_then(|u| u.parse().ok())
        })
        .unwrap_or(u32::MAX)
}

/// One sentence, no library URL, no Debug dump.
fn a_sentence(text: &str) {
    assert!(!text.contains("http") && !text.contains("Os {") && !text.contains('\n'), "{text:?}");
}

#[tokio::test]
async fn a_file_over_the_receivers_size_limit_is_refused_alone_with_a_sentence() {
    // RLIMIT_FSIZE (prlimit) in the child, with SIGXFSZ ignored so that writes fail with
    // EFBIG as a full disk fails them with ENOSPC. No root needed.
    if !have("prlimit") {
        eprintln!("SKIPPED: prlimit (util-linux) is not installed");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let small = t.path().join("small.txt");
    let big = t.path().join("big.bin");
    let after = t.path().join("after.txt");
    std::fs::write(&small, b"small").unwrap();
    std::fs::write(&big, vec![1u8; 5 * CHUNK]).unwrap();
    std::fs::write(&after, b"after").unwrap();
    let dst = t.path().join("inbox");
    let limit = format!("--fsize={}", 3 * CHUNK);
    let wrapper = ["sh", "-c", "trap '' XFSZ; exec prlimit \"$0\" -- \"$@\"", &limit];
    let (sent, child) = to_child(&wrapper, &dst, &[small.clone(), big, after.clone()]).await;
    let sent = sent.unwrap();
    assert_eq!(sent.refused.len(), 1, "{sent:?} / {child}");
    let why = &sent.refused[0].reason;
    assert_eq!(why, "big.bin is larger than the receiver may store (its file size limit)");
    a_sentence(why);
    assert!(child.contains(&format!("RECEIVER refused: {why}")), "{child}");
    same(&small, &dst.join("small.txt"));
    same(&after, &dst.join("after.txt"));
    assert!(!dst.join("big.bin").exists());
}

#[tokio::test]
async fn a_read_only_inbox_reaches_the_sender_as_a_sentence() {
    let t = tempfile::tempdir().unwrap();
    let dst = t.path().join("inbox");
    std::fs::create_dir_all(&dst).unwrap();
    std::fs::set_permissions(&dst, std::os::unix::fs::PermissionsExt::from_mode(0o555)).unwrap();
    let f = t.path().join("a.txt");
    std::fs::write(&f, b"hello").unwrap();
    // Root writes anywhere: take its override capabilities away from the child.
    let wrapper: &[&str] = if is_root() {
        if !have("setpriv") {
            eprintln!("SKIPPED: running as root and setpriv (util-linux) is not installed");
            return;
        }
        &["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner"]
    } else {
        &["env"]
    };
    let (sent, child) = to_child(wrapper, &dst, &[f]).await;
    let err = sent.unwrap_err().to_string();
    assert_eq!(
        err,
        "the transfer stopped: the receiver has no permission to write into its receiving directory"
    );
    a_sentence(&err);
    assert_eq!(child, format!("RECEIVER error: {err}"));
    std::fs::set_permissions(&dst, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    assert_eq!(entries(&dst), Vec::<String>::new());
}

#[tokio::test]
async fn a_full_disk_reaches_the_sender_as_a_sentence() {
    // A 2 MiB tmpfs in a mount namespace of the child's own: root only (else skipped; the
    // size-limit test above covers the same path without root).
    if !is_root() || !have("unshare") {
        eprintln!("SKIPPED: a tmpfs needs root and unshare");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let dst = t.path().join("inbox");
    std::fs::create_dir_all(&dst).unwrap();
    let f = t.path().join("big.bin");
    std::fs::write(&f, vec![3u8; 4 * CHUNK]).unwrap();
    let mount =
        format!("mount -t tmpfs -o size=2m q2q-test {} && exec \"$0\" \"$@\"", dst.display());
    let wrapper = ["unshare", "--mount", "--propagation", "private", "sh", "-c", &mount];
    let (sent, child) = to_child(&wrapper, &dst, &[f]).await;
    let err = sent.unwrap_err().to_string();
    assert_eq!(err, "the transfer stopped: the receiver's disk is full");
    assert_eq!(child, format!("RECEIVER error: {err}"));
    assert_eq!(entries(&dst), Vec::<String>::new(), "the tmpfs was the child's alone");
}
