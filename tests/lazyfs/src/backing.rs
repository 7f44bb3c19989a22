//! How pending state meets the backing file: reading the last synced content under it, and
//! writing it back on fsync. Both are traits so the overlay logic can be tested on buffers.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Where the last synced content is read from: the backing file, or a buffer in tests.
pub trait Base {
    /// Reads up to `buf.len()` bytes at `offset`; fewer only at end of file.
    ///
    /// # Errors
    /// An I/O error of the underlying file.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
}

impl Base for [u8] {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(self.len());
        let n = buf.len().min(self.len() - start);
        buf[..n].copy_from_slice(&self[start..start + n]);
        Ok(n)
    }
}

impl Base for File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        read_full(self, buf, offset)
    }
}

/// Reads until `buf` is full or the file ends, retrying short reads.
///
/// # Errors
/// An I/O error of the file.
pub fn read_full(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match FileExt::read_at(file, &mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Where pending state is applied on fsync: the backing file, or a buffer in tests.
pub trait Target {
    /// Cuts or extends (with zeros) to `len` bytes.
    ///
    /// # Errors
    /// An I/O error of the underlying file.
    fn set_len(&mut self, len: u64) -> io::Result<()>;
    /// Writes all of `data` at `offset`.
    ///
    /// # Errors
    /// An I/O error of the underlying file.
    fn write_all_at(&mut self, data: &[u8], offset: u64) -> io::Result<()>;
}

impl Target for Vec<u8> {
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.resize(usize::try_from(len).map_err(io::Error::other)?, 0);
        Ok(())
    }

    fn write_all_at(&mut self, data: &[u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(io::Error::other)?;
        if self.len() < start + data.len() {
            self.resize(start + data.len(), 0);
        }
        self[start..start + data.len()].copy_from_slice(data);
        Ok(())
    }
}

impl Target for &File {
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }

    fn write_all_at(&mut self, data: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(*self, data, offset)
    }
}
