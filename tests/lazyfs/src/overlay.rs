//! The unsynced state of one file: pending writes and truncations over its last synced content.
//!
//! A file's backing copy only changes on fsync, so between two fsyncs its logical content is
//! "the backing file, cut at the smallest size it was truncated to, with the pending writes on
//! top". Writes are kept as a sparse map of 4 KiB pages so that reading, writing and syncing
//! cost time in proportion to the bytes touched, not to how many writes came before (a 64 MiB
//! write-ahead log written in small appends stays a map of at most 16k pages).

use std::collections::BTreeMap;
use std::io;

use crate::backing::{Base, Target};

/// Size of one page of pending data.
pub const PAGE: u64 = 4096;
const PAGE_BYTES: usize = PAGE as usize;

/// The largest offset a file may reach, as for `off_t`.
const MAX_SIZE: u64 = i64::MAX as u64;

/// Pending (unsynced) changes of one file.
///
/// Invariants: `base_visible <= size` (base bytes past a truncation never show again), and
/// every page byte at or past `size` is zero (so growing the file shows zeros).
#[derive(Debug, Clone)]
pub struct Overlay {
    /// Size of the backing file when this overlay began, i.e. the last synced size.
    base_size: u64,
    /// How much of the backing file still shows through: the smallest truncation so far.
    base_visible: u64,
    /// Logical size, what `stat` reports.
    size: u64,
    /// Pages written since the last sync, by page index, each a full copy of that page.
    pages: BTreeMap<u64, Box<[u8; PAGE_BYTES]>>,
    /// Bytes written since the last sync, for the power-cut report.
    pending_bytes: u64,
}

impl Overlay {
    /// Starts tracking a file whose backing (synced) copy is `base_size` bytes long.
    pub fn new(base_size: u64) -> Self {
        Self {
            base_size,
            base_visible: base_size,
            size: base_size,
            pages: BTreeMap::new(),
            pending_bytes: 0,
        }
    }

    /// The logical size of the file.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// How many bytes were written since the last sync (overwrites count each time).
    pub fn pending_bytes(&self) -> u64 {
        self.pending_bytes
    }

    /// Records a write of `data` at `offset`, growing the file if it ends past the end.
    ///
    /// # Errors
    /// `EFBIG` past the largest file size, or an error reading the part of a page that the
    /// write does not cover from `base`.
    pub fn write(
        &mut self,
        base: &(impl Base + ?Sized),
        offset: u64,
        data: &[u8],
    ) -> io::Result<()> {
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|&end| end <= MAX_SIZE)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EFBIG))?;
        let mut pos = offset;
        while pos < end {
            let index = pos / PAGE;
            let page_start = index * PAGE;
            let in_page = (pos - page_start) as usize;
            let n = (PAGE_BYTES - in_page).min((end - pos) as usize);
            let page = match self.pages.entry(index) {
                std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::btree_map::Entry::Vacant(e) => {
                    let mut page = Box::new([0u8; PAGE_BYTES]);
                    // A page copies whatever of the base still shows there, unless this
                    // write replaces all of it anyway.
                    let whole = in_page == 0 && n == PAGE_BYTES;
                    if !whole && page_start < self.base_visible {
                        let visible = (self.base_visible - page_start).min(PAGE) as usize;
                        base.read_at(&mut page[..visible], page_start)?;
                    }
                    e.insert(page)
                }
            };
            let from = (pos - offset) as usize;
            page[in_page..in_page + n].copy_from_slice(&data[from..from + n]);
            pos += n as u64;
        }
        self.size = self.size.max(end);
        self.pending_bytes += data.len() as u64;
        Ok(())
    }

    /// Records a truncation (or extension with zeros) to `size` bytes.
    ///
    /// # Errors
    /// `EFBIG` past the largest file size.
    pub fn truncate(&mut self, size: u64) -> io::Result<()> {
        if size > MAX_SIZE {
            return Err(io::Error::from_raw_os_error(libc::EFBIG));
        }
        if size < self.size {
            // Pages past the cut go; the page holding the cut keeps only its head, so that
            // growing the file again shows zeros there, as on a real file system.
            let first_gone = size.div_ceil(PAGE);
            self.pages.split_off(&first_gone);
            let tail = (size % PAGE) as usize;
            if tail != 0
                && let Some(page) = self.pages.get_mut(&(size / PAGE))
            {
                page[tail..].fill(0);
            }
            self.base_visible = self.base_visible.min(size);
        }
        self.size = size;
        Ok(())
    }

    /// Grows the file to at least `size` bytes (`fallocate` without `KEEP_SIZE`).
    ///
    /// # Errors
    /// `EFBIG` past the largest file size.
    pub fn extend_to(&mut self, size: u64) -> io::Result<()> {
        if size > self.size {
            self.truncate(size)?;
        }
        Ok(())
    }

    /// Reads up to `len` bytes at `offset` of the logical content; short at end of file.
    ///
    /// # Errors
    /// An error reading the backing part from `base`.
    pub fn read(
        &self,
        base: &(impl Base + ?Sized),
        offset: u64,
        len: usize,
    ) -> io::Result<Vec<u8>> {
        if offset >= self.size || len == 0 {
            return Ok(Vec::new());
        }
        let end = self.size.min(offset.saturating_add(len as u64));
        let mut out = vec![0u8; (end - offset) as usize];
        let base_end = end.min(self.base_visible);
        if offset < base_end {
            base.read_at(&mut out[..(base_end - offset) as usize], offset)?;
        }
        for (&index, page) in self.pages.range(offset / PAGE..=(end - 1) / PAGE) {
            let page_start = index * PAGE;
            let from = page_start.max(offset);
            let to = (page_start + PAGE).min(end);
            out[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&page[(from - page_start) as usize..(to - page_start) as usize]);
        }
        Ok(out)
    }

    /// Makes `target` (which holds the last synced content) equal to the logical content.
    ///
    /// The net effect of the pending writes and truncations is applied rather than each one
    /// in turn: the result is the same, and it writes every page once.
    ///
    /// # Errors
    /// An I/O error of `target`; it may then hold part of the pending changes.
    pub fn apply(&self, target: &mut impl Target) -> io::Result<()> {
        if self.base_visible < self.base_size {
            target.set_len(self.base_visible)?;
        }
        if self.size != self.base_visible {
            target.set_len(self.size)?;
        }
        // Adjacent pages go out in one write, so a log appended page after page is written
        // with a few large writes.
        let mut run: Vec<u8> = Vec::new();
        let mut run_start = 0;
        for (&index, page) in &self.pages {
            let page_start = index * PAGE;
            let len = (self.size - page_start).min(PAGE) as usize;
            if run_start + run.len() as u64 != page_start || run.len() >= 1 << 20 {
                if !run.is_empty() {
                    target.write_all_at(&run, run_start)?;
                }
                run.clear();
                run_start = page_start;
            }
            run.extend_from_slice(&page[..len]);
        }
        if !run.is_empty() {
            target.write_all_at(&run, run_start)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;

    use super::*;

    /// What the file should read as after `apply`, and through `read`.
    fn logical(overlay: &Overlay, base: &[u8]) -> Vec<u8> {
        overlay.read(base, 0, usize::MAX).unwrap()
    }

    fn synced(overlay: &Overlay, base: &[u8]) -> Vec<u8> {
        let mut target = base.to_vec();
        overlay.apply(&mut target).unwrap();
        target
    }

    #[test]
    fn untouched_overlay_reads_the_base() {
        let base = b"hello world".to_vec();
        let overlay = Overlay::new(base.len() as u64);
        assert_eq!(logical(&overlay, &base), base);
        assert_eq!(overlay.read(&base[..], 6, 3).unwrap(), b"wor");
        assert_eq!(overlay.read(&base[..], 11, 3).unwrap(), b"");
        assert_eq!(synced(&overlay, &base), base);
    }

    #[test]
    fn writes_show_over_the_base_and_grow_the_file() {
        let base = b"0123456789".to_vec();
        let mut overlay = Overlay::new(10);
        overlay.write(&base[..], 2, b"ab").unwrap();
        overlay.write(&base[..], 8, b"XYZ").unwrap();
        assert_eq!(overlay.size(), 11);
        assert_eq!(logical(&overlay, &base), b"01ab4567XYZ");
        assert_eq!(overlay.read(&base[..], 3, 6).unwrap(), b"b4567X");
        assert_eq!(overlay.pending_bytes(), 5);
        assert_eq!(synced(&overlay, &base), b"01ab4567XYZ");
    }

    #[test]
    fn a_write_past_the_end_leaves_a_zero_hole() {
        let base = b"abc".to_vec();
        let mut overlay = Overlay::new(3);
        overlay.write(&base[..], 5000, b"z").unwrap();
        let mut want = b"abc".to_vec();
        want.resize(5000, 0);
        want.push(b'z');
        assert_eq!(logical(&overlay, &base), want);
        assert_eq!(synced(&overlay, &base), want);
    }

    #[test]
    fn writes_spanning_pages_and_overwrites_keep_the_latest_bytes() {
        let base = vec![7u8; 3 * PAGE_BYTES];
        let mut overlay = Overlay::new(base.len() as u64);
        let data: Vec<u8> = (0..PAGE_BYTES + 100).map(|i| (i % 251) as u8).collect();
        overlay.write(&base[..], PAGE - 50, &data).unwrap();
        overlay.write(&base[..], PAGE, b"again").unwrap();
        let mut want = base.clone();
        want[PAGE_BYTES - 50..PAGE_BYTES - 50 + data.len()].copy_from_slice(&data);
        want[PAGE_BYTES..PAGE_BYTES + 5].copy_from_slice(b"again");
        assert_eq!(logical(&overlay, &base), want);
        assert_eq!(synced(&overlay, &base), want);
    }

    #[test]
    fn truncation_hides_the_base_and_regrowth_reads_zeros() {
        let base = vec![9u8; 2 * PAGE_BYTES];
        let mut overlay = Overlay::new(base.len() as u64);
        overlay.write(&base[..], 10, b"written").unwrap();
        overlay.truncate(12).unwrap();
        assert_eq!(
            logical(&overlay, &base),
            b"\x09\x09\x09\x09\x09\x09\x09\x09\x09\x09wr"
        );
        overlay.truncate(20).unwrap();
        let mut want = vec![9u8; 10];
        want.extend_from_slice(b"wr");
        want.resize(20, 0);
        assert_eq!(logical(&overlay, &base), want);
        // A later write past the old cut must not bring back base bytes around it.
        overlay.write(&base[..], PAGE + 1, b"q").unwrap();
        want.resize(PAGE_BYTES + 1, 0);
        want.push(b'q');
        assert_eq!(logical(&overlay, &base), want);
        assert_eq!(synced(&overlay, &base), want);
    }

    #[test]
    fn truncate_to_zero_then_write_replaces_the_file() {
        let base = b"old content that is long".to_vec();
        let mut overlay = Overlay::new(base.len() as u64);
        overlay.truncate(0).unwrap();
        assert_eq!(overlay.size(), 0);
        overlay.write(&base[..], 0, b"new").unwrap();
        assert_eq!(logical(&overlay, &base), b"new");
        assert_eq!(synced(&overlay, &base), b"new");
    }

    #[test]
    fn extend_to_only_grows() {
        let base = b"abcdef".to_vec();
        let mut overlay = Overlay::new(6);
        overlay.extend_to(4).unwrap();
        assert_eq!(overlay.size(), 6);
        overlay.extend_to(8).unwrap();
        assert_eq!(logical(&overlay, &base), b"abcdef\0\0");
        assert_eq!(synced(&overlay, &base), b"abcdef\0\0");
    }

    #[test]
    fn many_small_appends_stay_compact() {
        let mut overlay = Overlay::new(0);
        let empty: &[u8] = &[];
        let mut want = Vec::new();
        for i in 0..10_000u32 {
            let record = i.to_le_bytes().repeat(25); // 100 bytes, not page aligned
            overlay.write(empty, want.len() as u64, &record).unwrap();
            want.extend_from_slice(&record);
        }
        assert_eq!(overlay.pages.len(), want.len().div_ceil(PAGE_BYTES));
        assert_eq!(logical(&overlay, empty), want);
        assert_eq!(
            overlay.read(empty, 123_456, 10).unwrap(),
            want[123_456..123_466]
        );
        assert_eq!(synced(&overlay, empty), want);
    }

    #[test]
    fn apply_to_a_real_file_matches_the_logical_view() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![1u8; 10_000]).unwrap();
        let file = File::options().read(true).write(true).open(&path).unwrap();
        let mut overlay = Overlay::new(10_000);
        overlay.write(&file, 9_000, &[2u8; 3_000]).unwrap();
        overlay.truncate(11_000).unwrap();
        overlay.write(&file, 100, b"x").unwrap();
        let want = overlay.read(&file, 0, usize::MAX).unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            vec![1u8; 10_000],
            "unsynced data leaked"
        );
        overlay.apply(&mut &file).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), want);
        assert_eq!(want.len(), 11_000);
    }

    #[test]
    fn oversized_offsets_are_refused() {
        let mut overlay = Overlay::new(0);
        let empty: &[u8] = &[];
        let err = overlay.write(empty, MAX_SIZE, b"x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EFBIG));
        assert!(overlay.truncate(MAX_SIZE + 1).is_err());
    }
}
