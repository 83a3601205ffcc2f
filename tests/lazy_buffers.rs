//! Zeroed stream-sized buffers take resident memory only as they are touched, and give it
//! back when freed, once the daemon fixed glibc's mmap threshold
//! (`q2q::sys::fix_mmap_threshold`), even after a big block was freed (which, left alone,
//! raises the threshold: buffers then come from the heap and stay with the process). Its own
//! test binary: one test, so no other thread allocates.

fn rss_kib() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

const N: usize = 200;
const SIZE: usize = 256 << 10;

/// `N` zeroed buffers of `SIZE`, each followed by a small allocation that stays (as a
/// daemon's other state would), so freed buffers are not at the heap's top.
fn buffers(pins: &mut Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    (0..N)
        .map(|_| {
            let b = vec![0u8; SIZE];
            pins.push(vec![1u8; 512]);
            b
        })
        .collect()
}

#[test]
fn zeroed_buffers_commit_only_touched_pages_and_return_when_freed() {
    if !cfg!(all(target_os = "linux", target_env = "gnu")) {
        println!("SKIPPED: glibc only");
        return;
    }
    // A bulk stream's 8 MiB buffer, touched and freed: glibc would now raise its threshold.
    let mut big = vec![0u8; 8 << 20];
    big.iter_mut().step_by(4096).for_each(|b| *b = 1);
    drop(std::hint::black_box(big));
    assert!(q2q::sys::fix_mmap_threshold(128 << 10));
    let whole = N * SIZE / 1024;
    let mut pins = Vec::new();
    let before = rss_kib();
    // A burst of bulk streams: every page written, then closed.
    let mut bufs = buffers(&mut pins);
    for b in &mut bufs {
        b.iter_mut().step_by(4096).for_each(|x| *x = 1);
    }
    let full = rss_kib().saturating_sub(before);
    drop(std::hint::black_box(bufs));
    // A burst of short streams: one page written in each.
    let mut bufs = buffers(&mut pins);
    for b in &mut bufs {
        b[0] = 1;
    }
    let short = rss_kib().saturating_sub(before);
    println!(
        "{N} zeroed buffers of {} KiB: all pages written RSS +{full} KiB; freed, then {N} more with \
         one page written: RSS +{short} KiB (whole: {whole} KiB)",
        SIZE / 1024
    );
    assert!(full >= whole / 2, "the written buffers did not show in RSS: +{full} KiB");
    assert!(short < whole / 4, "RSS stayed at +{short} KiB of {whole} KiB");
    drop(std::hint::black_box((bufs, pins)));
}
