//! Watching a set of files for changes, robustly (feature `file-watch`).
//!
//! [`FileWatch`] is the one file-watching mechanism of the mesh: the endpoints file of
//! [`FileDiscovery`](crate::discover::FileDiscovery) and the PEM credential files of
//! `mesh-spiffe` both use it. It reads a fixed list of paths, which may live in different
//! directories, and [`FileWatch::changed`] waits until the content of any of them differs
//! from what it last reported, then returns the current content of *all* of them as one
//! [`Snapshot`]. What the bytes mean, and whether they are valid, is the caller's business.
//!
//! # How changes are noticed
//!
//! The *parent directory* of each path is watched (each directory once) with the
//! platform's file-event API (`notify`'s recommended watcher, not recursive). Watching the
//! directory rather than the file is what makes replacements visible: editors and config
//! tools write a temporary file and rename it over the old one, and Kubernetes config maps
//! and secrets swap a `..data` symlink (`tls.crt -> ..data/tls.crt`,
//! `..data -> ..2024_01_01_...`) by renaming a new symlink over it; a watch on the file
//! itself would keep following the old inode.
//!
//! Any event in a watched directory (other than opens and reads, which the watch's own
//! reads cause) starts a re-read once the directories have been quiet for the debounce
//! period (default [`DEFAULT_DEBOUNCE`], 100 ms, for at most 10 periods under a steady
//! stream of events), so that a file written in several steps — or a certificate and its
//! key written one after the other — is usually read once it is complete. Every path is
//! then re-read, following symlinks, and compared with the last snapshot: if nothing
//! differs, nothing is reported. In addition every path is re-read on a fixed poll interval
//! (default [`DEFAULT_POLL_INTERVAL`], 10 s) in case an event was missed (a network file
//! system, a watch lost because a directory was replaced, an overflowing event queue, an
//! in-place write to a symlink's target in a directory that is not watched). If the
//! watcher itself stops, the watch logs it and goes on polling.
//!
//! A file larger than [`MAX_FILE_SIZE`] (16 MiB) is not read: it counts as unreadable.
//! A path that cannot be read after the start (deleted, half-replaced, unreadable) appears
//! in the snapshot as its I/O error; it is not fatal. Because a snapshot is reported only
//! when some content changed, a caller that validates the files sees each state of the
//! files once, and retries exactly when something new was written.
//!
//! # Lifetime
//!
//! `FileWatch` spawns nothing: the caller drives it by awaiting
//! [`changed`](FileWatch::changed), typically in a loop inside its own task, and dropping
//! it stops the directory watch.
//!
//! ```no_run
//! use mesh_core::watch::FileWatch;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut watch = FileWatch::builder(["/etc/mesh/svid.pem", "/etc/mesh/svid.key"])
//!     .start()
//!     .await?;
//! let first = watch.snapshot();
//! if let Ok(cert) = first.files()[0].content() {
//!     println!("{} bytes of certificate", cert.len());
//! }
//! loop {
//!     let snapshot = watch.changed().await;
//!     for file in snapshot.files() {
//!         println!("{}: {:?}", file.path().display(), file.content().map(<[u8]>::len));
//!     }
//! }
//! # }
//! ```

use std::collections::BTreeSet;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio::time::{self, Interval, MissedTickBehavior};

/// Default interval of the safety-net poll.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(10);
/// Default quiet period after a file event before the files are read.
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(100);
/// Under a steady stream of events, read anyway after this many debounce periods.
const MAX_DEBOUNCE_ROUNDS: u32 = 10;

/// Why a [`FileWatch`] could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WatchError {
    /// A path could not be read at the start.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A directory could not be watched.
    #[error("watching {path}: {message}")]
    Watch {
        /// The directory.
        path: PathBuf,
        /// The watcher's error.
        message: String,
    },
}

/// The content of one watched path at the time of a [`Snapshot`].
#[derive(Clone, Debug)]
pub struct FileContent {
    path: PathBuf,
    content: Result<Arc<[u8]>, Arc<io::Error>>,
}

impl FileContent {
    /// The path, as given to the watch.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's bytes, or why it could not be read.
    pub fn content(&self) -> Result<&[u8], &io::Error> {
        match &self.content {
            Ok(bytes) => Ok(bytes),
            Err(e) => Err(e),
        }
    }
}

/// Two contents are equal when they hold the same bytes, or failed with the same error kind
/// and message.
impl PartialEq for FileContent {
    fn eq(&self, other: &Self) -> bool {
        self.path == other.path
            && match (&self.content, &other.content) {
                (Ok(a), Ok(b)) => a == b,
                (Err(a), Err(b)) => a.kind() == b.kind() && a.to_string() == b.to_string(),
                _ => false,
            }
    }
}

impl Eq for FileContent {}

/// The contents of every watched path, in the order the paths were given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    files: Arc<[FileContent]>,
}

impl Snapshot {
    /// One entry per watched path, in the order given to [`FileWatch::builder`].
    pub fn files(&self) -> &[FileContent] {
        &self.files
    }

    /// The entry of `path` (the first, if it was given twice).
    pub fn get(&self, path: &Path) -> Option<&FileContent> {
        self.files.iter().find(|f| f.path == path)
    }
}

/// The longest poll interval: 30 years, in effect never.
const MAX_POLL_INTERVAL: Duration = Duration::from_secs(30 * 365 * 24 * 60 * 60);

/// Settings of a [`FileWatch`].
///
/// # Defaults
///
/// - `poll_interval`: 10 s ([`DEFAULT_POLL_INTERVAL`]).
/// - `debounce`: 100 ms ([`DEFAULT_DEBOUNCE`]).
#[derive(Clone, Debug)]
pub struct FileWatchBuilder {
    paths: Vec<PathBuf>,
    poll_interval: Duration,
    debounce: Duration,
}

impl FileWatchBuilder {
    /// Re-reads the files at least this often, whether or not an event said they changed
    /// (default 10 s). A zero interval is raised to one millisecond, and one above 30 years
    /// (`Duration::MAX` for "never") is lowered to 30 years, so that deadlines never
    /// overflow.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval.clamp(Duration::from_millis(1), MAX_POLL_INTERVAL);
        self
    }

    /// Waits for this long without file events before reading the files (default 100 ms).
    pub fn debounce(mut self, debounce: Duration) -> Self {
        self.debounce = debounce;
        self
    }

    /// Starts watching the paths' directories and reads every path. Must be called within
    /// a tokio runtime.
    ///
    /// # Errors
    ///
    /// [`WatchError::Read`] for the first path that cannot be read, and
    /// [`WatchError::Watch`] if a directory cannot be watched.
    pub async fn start(self) -> Result<FileWatch, WatchError> {
        // Watch first, then read: a change made in between raises an event and is read
        // again, rather than waiting for the poll. A watch failure is reported after the
        // reads, so that a missing file is named as such.
        let (events_tx, events) = mpsc::channel(1);
        let watcher = watch_dirs(&self.paths, events_tx);

        let mut files = Vec::with_capacity(self.paths.len());
        for path in &self.paths {
            match read_bounded(path).await {
                Ok(bytes) => files.push(FileContent {
                    path: path.clone(),
                    content: Ok(bytes.into()),
                }),
                Err(source) => {
                    return Err(WatchError::Read {
                        path: path.clone(),
                        source,
                    });
                }
            }
        }
        let last = Snapshot {
            files: files.into(),
        };
        let watcher = watcher?;

        let now = time::Instant::now();
        // `poll_interval` is at most 30 years, which the clock holds; should it not, the
        // first poll is as far away as can be said.
        let start = now
            .checked_add(self.poll_interval)
            .or_else(|| now.checked_add(MAX_POLL_INTERVAL))
            .unwrap_or(now);
        let mut poll = time::interval_at(start, self.poll_interval);
        poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Ok(FileWatch {
            paths: self.paths,
            debounce: self.debounce,
            poll,
            events,
            events_open: true,
            pending: None,
            last,
            _watcher: watcher,
        })
    }
}

/// What woke the watch up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wake {
    Event,
    Poll,
}

/// Watches a set of files; see the [module docs](self).
pub struct FileWatch {
    paths: Vec<PathBuf>,
    debounce: Duration,
    poll: Interval,
    events: mpsc::Receiver<()>,
    events_open: bool,
    /// A wake-up not yet followed by a completed read (kept across cancellation).
    pending: Option<Wake>,
    last: Snapshot,
    /// Kept so that the directory watch lives exactly as long as this value.
    _watcher: notify::RecommendedWatcher,
}

impl fmt::Debug for FileWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileWatch")
            .field("paths", &self.paths)
            .field("debounce", &self.debounce)
            .field("poll_interval", &self.poll.period())
            .field("events_open", &self.events_open)
            .finish_non_exhaustive()
    }
}

impl FileWatch {
    /// Settings for watching `paths`, to adjust before [`start`](FileWatchBuilder::start).
    pub fn builder<P: Into<PathBuf>>(paths: impl IntoIterator<Item = P>) -> FileWatchBuilder {
        FileWatchBuilder {
            paths: paths.into_iter().map(Into::into).collect(),
            poll_interval: DEFAULT_POLL_INTERVAL,
            debounce: DEFAULT_DEBOUNCE,
        }
    }

    /// The watched paths, in order.
    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    /// The last snapshot: the one read at the start, or the last one
    /// [`changed`](Self::changed) returned.
    pub fn snapshot(&self) -> Snapshot {
        self.last.clone()
    }

    /// Waits until some file's content differs from the last snapshot and returns the new
    /// snapshot of all files. Never returns otherwise.
    ///
    /// Cancel safe: dropping the future loses no event; the next call picks it up.
    pub async fn changed(&mut self) -> Snapshot {
        loop {
            let wake = match self.pending {
                Some(wake) => wake,
                None => {
                    let wake = self.wait().await;
                    self.pending = Some(wake);
                    wake
                }
            };
            if wake == Wake::Event {
                self.settle().await;
            }
            let snapshot = read_all(&self.paths).await;
            self.pending = None;
            if snapshot != self.last {
                self.last = snapshot.clone();
                return snapshot;
            }
        }
    }

    /// Waits for a file event or the poll.
    async fn wait(&mut self) -> Wake {
        loop {
            tokio::select! {
                ev = self.events.recv(), if self.events_open => match ev {
                    Some(()) => return Wake::Event,
                    // The watcher's thread is gone; keep polling.
                    None => {
                        tracing::warn!(paths = ?self.paths, "file watcher stopped; polling only");
                        self.events_open = false;
                    }
                },
                _ = self.poll.tick() => return Wake::Poll,
            }
        }
    }

    /// Waits until no event has arrived for one debounce period (at most a few periods).
    async fn settle(&mut self) {
        for _ in 0..MAX_DEBOUNCE_ROUNDS {
            time::sleep(self.debounce).await;
            if self.events.try_recv().is_err() {
                break;
            }
        }
    }
}

/// Reads every path, following symlinks.
async fn read_all(paths: &[PathBuf]) -> Snapshot {
    let mut files = Vec::with_capacity(paths.len());
    for path in paths {
        let content = read_bounded(path).await.map(Arc::from).map_err(Arc::new);
        files.push(FileContent {
            path: path.clone(),
            content,
        });
    }
    Snapshot {
        files: files.into(),
    }
}

/// The largest file a watch reads: 16 MiB. Endpoint lists and PEM files are far smaller;
/// a larger file (a wrong path, a runaway writer) is an error, not memory to fill.
pub const MAX_FILE_SIZE: u64 = 16 * 1024 * 1024;

/// `path`'s bytes, refused past [`MAX_FILE_SIZE`].
async fn read_bounded(path: &Path) -> io::Result<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let file = tokio::fs::File::open(path).await?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE_SIZE + 1).read_to_end(&mut bytes).await?;
    if bytes.len() as u64 > MAX_FILE_SIZE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "larger than {} MiB: not read",
                MAX_FILE_SIZE / (1024 * 1024)
            ),
        ));
    }
    Ok(bytes)
}

/// The directory that holds `path`.
pub(crate) fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Watches the directory of every path, signalling `events` on every relevant event.
fn watch_dirs(
    paths: &[PathBuf],
    events: mpsc::Sender<()>,
) -> Result<notify::RecommendedWatcher, WatchError> {
    let dirs: BTreeSet<&Path> = paths.iter().map(|p| parent_dir(p)).collect();
    let watch_error = |dir: &Path, e: notify::Error| WatchError::Watch {
        path: dir.to_path_buf(),
        message: e.to_string(),
    };
    let first = dirs.first().copied().unwrap_or(Path::new("."));
    let mut watcher =
        notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
            // Our own reads open the files; only a close after writing means anything.
            Ok(ev) if matches!(ev.kind, EventKind::Access(a) if a != AccessKind::Close(AccessMode::Write)) => {}
            // A full channel already holds a wake-up; a closed one means the watch is gone.
            _ => {
                let _ = events.try_send(());
            }
        })
        .map_err(|e| watch_error(first, e))?;
    for dir in dirs {
        watcher
            .watch(dir, RecursiveMode::NonRecursive)
            .map_err(|e| watch_error(dir, e))?;
    }
    Ok(watcher)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parent_of_a_bare_name_is_the_current_dir() {
        assert_eq!(parent_dir(Path::new("e.toml")), Path::new("."));
        assert_eq!(parent_dir(Path::new("/a/e.toml")), Path::new("/a"));
    }

    /// A file past the size bound is not read: at the start, an error naming it; later,
    /// an unreadable file in the snapshot.
    #[tokio::test]
    async fn files_past_the_size_bound_are_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(MAX_FILE_SIZE + 1).unwrap();
        let err = FileWatch::builder([&path]).start().await.unwrap_err();
        assert!(
            err.to_string().ends_with("larger than 16 MiB: not read"),
            "{err}"
        );
        file.set_len(MAX_FILE_SIZE).unwrap();
        let watch = FileWatch::builder([&path]).start().await.unwrap();
        assert_eq!(
            watch.snapshot().files()[0].content().unwrap().len() as u64,
            MAX_FILE_SIZE
        );
        file.set_len(MAX_FILE_SIZE + 1).unwrap();
        let snapshot = read_all(std::slice::from_ref(&path)).await;
        assert_eq!(
            snapshot.files()[0].content().unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
    }

    #[tokio::test]
    async fn reports_only_changes_across_directories() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let pa = a.path().join("a");
        let pb = b.path().join("b");
        std::fs::write(&pa, "1").unwrap();
        std::fs::write(&pb, "x").unwrap();
        let mut watch = FileWatch::builder([&pa, &pb])
            .debounce(Duration::from_millis(20))
            .poll_interval(Duration::from_secs(3600))
            .start()
            .await
            .unwrap();
        assert_eq!(watch.snapshot().files()[0].content().unwrap(), b"1");

        std::fs::write(&pb, "y").unwrap();
        let snap = time::timeout(Duration::from_secs(5), watch.changed())
            .await
            .unwrap();
        assert_eq!(snap.get(&pa).unwrap().content().unwrap(), b"1");
        assert_eq!(snap.get(&pb).unwrap().content().unwrap(), b"y");

        // A deletion is reported as an error; the same bytes again are not a change.
        std::fs::remove_file(&pa).unwrap();
        let snap = time::timeout(Duration::from_secs(5), watch.changed())
            .await
            .unwrap();
        let err = snap.files()[0].content().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        std::fs::write(&pb, "y").unwrap();
        assert!(
            time::timeout(Duration::from_millis(300), watch.changed())
                .await
                .is_err()
        );
    }

    /// `Duration::MAX` ("never poll") once overflowed the first poll's deadline and
    /// panicked.
    #[tokio::test(start_paused = true)]
    async fn a_poll_interval_of_duration_max_does_not_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a");
        std::fs::write(&path, "1").unwrap();
        let mut watch = FileWatch::builder([&path])
            .poll_interval(Duration::MAX)
            .start()
            .await
            .unwrap();
        assert!(
            time::timeout(Duration::from_secs(3600), watch.changed())
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn missing_file_at_start_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let ok = dir.path().join("ok");
        std::fs::write(&ok, "1").unwrap();
        let err = FileWatch::builder([ok, dir.path().join("nope.pem")])
            .start()
            .await
            .unwrap_err();
        assert!(matches!(err, WatchError::Read { .. }), "{err:?}");
        assert!(err.to_string().contains("nope.pem"), "{err}");
    }
}
