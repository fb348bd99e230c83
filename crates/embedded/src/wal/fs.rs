//! The file operations of the log writer, behind a small seam: the real files in production,
//! a fault-injecting double in unit tests (a write that fails half-way for lack of space, an
//! fsync that fails, a cut-back that fails).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

/// One segment file of the log, opened for appending.
pub(crate) trait LogFile: Send {
    /// Appends `buf` at the end of the file. On error some prefix of `buf` may be in the file.
    fn append(&mut self, buf: &[u8]) -> io::Result<()>;
    /// `fdatasync`: everything appended so far is durable once this returns `Ok`.
    fn sync_data(&mut self) -> io::Result<()>;
    /// Cuts the file back to `len` bytes (drops the partial bytes of a failed append).
    fn truncate(&mut self, len: u64) -> io::Result<()>;
}

/// Opening segment files and checking for free space.
pub(crate) trait LogFs: Send + Sync + 'static {
    /// Opens `path` for appending, creating it if `create`.
    fn open_append(&self, path: &Path, create: bool) -> io::Result<Box<dyn LogFile>>;
    /// fsyncs a directory (after creating a file in it).
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Is there room for `bytes` more bytes in `dir`? Writes a probe file of that size and
    /// removes it again.
    fn probe(&self, dir: &Path, bytes: usize) -> io::Result<()>;
}

/// A write failed because the file system is out of space (or over a quota): the failed
/// write can be cut back and retried once room is made.
pub(crate) fn is_disk_full(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    )
}

/// The real file system.
pub(crate) struct RealFs;

struct RealFile(File);

impl LogFile for RealFile {
    fn append(&mut self, buf: &[u8]) -> io::Result<()> {
        self.0.write_all(buf)
    }

    fn sync_data(&mut self) -> io::Result<()> {
        self.0.sync_data()
    }

    fn truncate(&mut self, len: u64) -> io::Result<()> {
        // The file is opened with O_APPEND: the next append goes to the new end.
        self.0.set_len(len)
    }
}

pub(crate) const PROBE_FILE: &str = "space-probe.tmp";

impl LogFs for RealFs {
    fn open_append(&self, path: &Path, create: bool) -> io::Result<Box<dyn LogFile>> {
        let f = OpenOptions::new().create(create).append(true).open(path)?;
        Ok(Box::new(RealFile(f)))
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        crate::store::snapshot::sync_dir(dir)
    }

    fn probe(&self, dir: &Path, bytes: usize) -> io::Result<()> {
        let path = dir.join(PROBE_FILE);
        let result = File::create(&path).and_then(|mut f| {
            // Written, not just allocated: a write is what the log will do. Block allocation
            // (tmpfs, ext4's delayed allocation alike) reserves space at write time.
            let chunk = vec![0u8; bytes.min(1 << 20)];
            let mut left = bytes;
            while left > 0 {
                let n = left.min(chunk.len());
                f.write_all(&chunk[..n])?;
                left -= n;
            }
            Ok(())
        });
        let removed = fs::remove_file(&path);
        result?;
        match removed {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
pub(crate) mod faulty {
    //! A [`LogFs`] over real files whose operations fail on demand.

    use super::*;
    use std::sync::{Arc, Mutex};

    /// What fails next. Each `Some` stays until the test clears it.
    #[derive(Debug, Default)]
    pub(crate) struct Faults {
        /// Appends write at most this many bytes, then fail with this error.
        pub append: Option<(usize, io::ErrorKind)>,
        pub sync: Option<io::ErrorKind>,
        pub truncate: Option<io::ErrorKind>,
        pub open: Option<io::ErrorKind>,
        pub probe: Option<io::ErrorKind>,
        /// Calls made, for assertions.
        pub probes: usize,
        pub truncates: Vec<u64>,
    }

    #[derive(Clone, Default)]
    pub(crate) struct FaultyFs(pub Arc<Mutex<Faults>>);

    impl FaultyFs {
        pub fn set(&self, f: impl FnOnce(&mut Faults)) {
            f(&mut self.0.lock().unwrap());
        }
        pub fn get<R>(&self, f: impl FnOnce(&Faults) -> R) -> R {
            f(&self.0.lock().unwrap())
        }
    }

    struct FaultyFile {
        file: File,
        faults: Arc<Mutex<Faults>>,
    }

    fn err(kind: io::ErrorKind) -> io::Error {
        io::Error::new(kind, format!("injected {kind:?}"))
    }

    impl LogFile for FaultyFile {
        fn append(&mut self, buf: &[u8]) -> io::Result<()> {
            let fault = self.faults.lock().unwrap().append;
            match fault {
                Some((room, kind)) => {
                    self.file.write_all(&buf[..room.min(buf.len())])?;
                    Err(err(kind))
                }
                None => self.file.write_all(buf),
            }
        }

        fn sync_data(&mut self) -> io::Result<()> {
            match self.faults.lock().unwrap().sync {
                Some(kind) => Err(err(kind)),
                None => self.file.sync_data(),
            }
        }

        fn truncate(&mut self, len: u64) -> io::Result<()> {
            let mut f = self.faults.lock().unwrap();
            f.truncates.push(len);
            match f.truncate {
                Some(kind) => Err(err(kind)),
                None => self.file.set_len(len),
            }
        }
    }

    impl LogFs for FaultyFs {
        fn open_append(&self, path: &Path, create: bool) -> io::Result<Box<dyn LogFile>> {
            if let Some(kind) = self.0.lock().unwrap().open {
                return Err(err(kind));
            }
            let file = OpenOptions::new().create(create).append(true).open(path)?;
            Ok(Box::new(FaultyFile {
                file,
                faults: self.0.clone(),
            }))
        }

        fn sync_dir(&self, dir: &Path) -> io::Result<()> {
            RealFs.sync_dir(dir)
        }

        fn probe(&self, dir: &Path, bytes: usize) -> io::Result<()> {
            let fault = {
                let mut f = self.0.lock().unwrap();
                f.probes += 1;
                f.probe
            };
            match fault {
                Some(kind) => Err(err(kind)),
                None => RealFs.probe(dir, bytes),
            }
        }
    }
}
