//! Writing received files around the page cache (`O_DIRECT`), with buffers aligned for it.
//!
//! Why: a received file is written once and not read back soon, and copying it into the page
//! cache was the largest single cost of receiving (a fifth of all CPU samples of a lab send,
//! `perf record -a`; on these virtual machines, fresh memory is slow to touch: `dd` wrote
//! 1 GiB in 4–5 s buffered, 0.7 s with `O_DIRECT`). With `O_DIRECT` the device reads our buffer
//! itself. Linux requires the buffer, the length and the file offset of such a write to be
//! aligned to the device's logical block size; [`ALIGN`] (4096 bytes) covers the usual 512
//! and 4096. Whole chunks are multiples of it and start at multiples of it; the last, shorter
//! chunk of a file (and everything on a file system that refuses `O_DIRECT`) is written
//! through the page cache as before.

use super::CHUNK;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use std::fs::File;
use std::io::Write;

/// Alignment of direct writes: buffer address, length and file offset (bytes).
pub const ALIGN: usize = 4096;

/// A buffer of [`CHUNK`] bytes whose start is aligned to [`ALIGN`].
pub struct AlignedBuf {
    vec: Vec<u8>,
    start: usize,
}

impl AlignedBuf {
    /// A zeroed buffer of [`CHUNK`] bytes.
    pub fn new() -> AlignedBuf {
        let vec = vec![0u8; CHUNK + ALIGN];
        // `align_offset` may give up (usize::MAX) in theory; an unaligned buffer only means
        // the writes of this chunk go through the page cache.
        let start = vec.as_ptr().align_offset(ALIGN).min(ALIGN);
        AlignedBuf { vec, start }
    }

    /// The first `len` bytes (at most [`CHUNK`]).
    pub fn get(&self, len: usize) -> &[u8] {
        &self.vec[self.start..self.start + len]
    }

    /// The first `len` bytes (at most [`CHUNK`]), to fill.
    pub fn get_mut(&mut self, len: usize) -> &mut [u8] {
        &mut self.vec[self.start..self.start + len]
    }
}

/// Appends to a file with `O_DIRECT` while every write allows it, through the page cache
/// after the first that does not (and for good, so the file offset of later direct writes
/// never needs checking). The flag is cleared again when the writer is dropped (it belongs
/// to the open file, which other descriptors of it share).
pub struct DirectWriter<'a> {
    file: &'a File,
    direct: bool,
    /// Bytes written through the page cache (what a background flush has to push).
    pub buffered: u64,
}

impl<'a> DirectWriter<'a> {
    /// Writes to `file` from its current offset, which must be a multiple of [`ALIGN`] for
    /// direct writes to be tried (the caller says so with `aligned_offset`).
    pub fn new(file: &'a File, aligned_offset: bool) -> DirectWriter<'a> {
        let mut w = DirectWriter { file, direct: false, buffered: 0 };
        if aligned_offset {
            w.direct = w.set_direct(true);
        }
        w
    }

    /// Whether writes still bypass the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// The file (for background flushes).
    pub fn file(&self) -> &File {
        self.file
    }

    /// Turn `O_DIRECT` on or off; whether it is now on.
    fn set_direct(&mut self, on: bool) -> bool {
        let Ok(bits) = fcntl(self.file, FcntlArg::F_GETFL) else { return false };
        let mut flags = OFlag::from_bits_truncate(bits);
        flags.set(OFlag::O_DIRECT, on);
        // A file system without O_DIRECT refuses the flag (EINVAL): write buffered there.
        fcntl(self.file, FcntlArg::F_SETFL(flags)).is_ok() && on
    }

    fn fall_back(&mut self) {
        self.direct = false;
        // If the flag cannot be cleared, the next write fails as the last did, and the
        // error reaches the caller.
        let _ = self.set_direct(false);
    }

    /// Append all of `data`.
    ///
    /// # Errors
    /// The write's error (disk full, I/O error); `EINVAL` from a direct write is not an error
    /// but the end of direct writes for this file.
    pub fn write_all(&mut self, mut data: &[u8]) -> std::io::Result<()> {
        while !data.is_empty() {
            let aligned =
                (data.as_ptr() as usize).is_multiple_of(ALIGN) && data.len().is_multiple_of(ALIGN);
            if self.direct && !aligned {
                self.fall_back();
            }
            match { self.file }.write(data) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    if !self.direct {
                        self.buffered += n as u64;
                    }
                    data = &data[n..];
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if self.direct && e.raw_os_error() == Some(nix::libc::EINVAL) => {
                    self.fall_back();
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl Drop for DirectWriter<'_> {
    fn drop(&mut self) {
        if self.direct {
            let _ = self.set_direct(false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek};

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    #[test]
    fn aligned_buffer_is_aligned_and_chunk_sized() {
        let mut b = AlignedBuf::new();
        assert_eq!(b.get(CHUNK).len(), CHUNK);
        assert_eq!(b.get_mut(CHUNK).as_ptr() as usize % ALIGN, 0);
    }

    #[test]
    fn whole_chunks_then_a_short_tail_arrive_intact() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut f = File::create_new(&path).unwrap();
        let mut w = DirectWriter::new(&f, true);
        let started_direct = w.is_direct();
        let mut expected = Vec::new();
        for (i, len) in [CHUNK, CHUNK, 12_345].into_iter().enumerate() {
            let mut b = AlignedBuf::new();
            b.get_mut(len).copy_from_slice(&pattern(len, i as u8));
            w.write_all(b.get(len)).unwrap();
            expected.extend_from_slice(b.get(len));
        }
        // The short tail is never written direct (its length is not aligned).
        assert!(!w.is_direct());
        if started_direct {
            assert_eq!(w.buffered, 12_345, "whole chunks are written direct");
        } else {
            eprintln!("note: this file system refuses O_DIRECT: only the buffered path ran");
        }
        drop(w);
        f.sync_all().unwrap();
        f.rewind().unwrap();
        let mut got = Vec::new();
        f.read_to_end(&mut got).unwrap();
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "the file differs from what was written");
    }

    #[test]
    fn an_unaligned_offset_writes_through_the_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"abc").unwrap();
        let mut file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.seek(std::io::SeekFrom::End(0)).unwrap();
        let mut w = DirectWriter::new(&file, false);
        let mut b = AlignedBuf::new();
        b.get_mut(ALIGN).fill(7);
        w.write_all(b.get(ALIGN)).unwrap();
        assert!(!w.is_direct());
        assert_eq!(std::fs::read(&path).unwrap().len(), 3 + ALIGN);
    }
}
