//! Endpoints read from a file and reloaded when it changes.
//!
//! # File format
//!
//! TOML, an `[[endpoints]]` table per endpoint in [`Endpoint`]'s serde form:
//!
//! ```toml
//! [[endpoints]]
//! addr = "10.0.0.7:8443"
//! zone = "eu-west-1a"
//!
//! [[endpoints]]
//! addr = "[fd00::8]:8443"
//! weight = 2
//! ```
//!
//! or, when the file name ends in `.json`, JSON: `{"endpoints": [{"addr": "10.0.0.7:8443"}]}`.
//! The `endpoints` key is required (write `endpoints = []` for no endpoints), so that an
//! empty file — typically one caught halfway through a truncate-and-write — is rejected
//! rather than read as "remove every endpoint". Unknown keys and two endpoints at the same
//! address make the file malformed.
//!
//! # How changes are noticed
//!
//! The *parent directory* of the path is watched with the platform's file-event API
//! (`notify`'s recommended watcher, not recursive). Watching the directory rather than the
//! file is what makes replacements visible: editors and config tools write a temporary file
//! and rename it over the old one, and Kubernetes config maps swap a `..data` symlink
//! (`endpoints.toml -> ..data/endpoints.toml`, `..data -> ..2024_01_01_...`) by renaming a
//! new symlink over it; a watch on the file itself would keep following the old inode.
//!
//! Any event in the directory (other than opens and reads, which the source's own reads
//! cause) starts a reload once the directory has been quiet for the debounce period
//! (default 100 ms, for at most 10 periods under a steady stream of events), so that a
//! file being written in several steps is usually read once it is complete. The path is
//! re-read, following symlinks, and its bytes compared with the last good content: an
//! unchanged file emits nothing. In addition the file is re-read on a fixed poll interval
//! (default 10 s) in case an event was missed (a network file system, a watch lost because
//! the directory was replaced, an overflowing event queue).
//!
//! A file that is missing, unreadable or malformed after the source started keeps the last
//! good endpoints: the reason is logged with `tracing::warn!` (once per distinct reason) and
//! the file is tried again on the next event or poll. Deleting the file therefore keeps the
//! endpoints; re-creating it applies the difference.
//!
//! The background task ends, dropping the watcher, as soon as the stream is dropped.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_core::Stream;
use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio::time::{self, MissedTickBehavior};

use super::{Change, DiscoverError, EndpointSet, Updates};
use crate::endpoint::Endpoint;

/// Default interval of the safety-net poll.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(10);
/// Default quiet period after a file event before the file is read.
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(100);
/// Under a steady stream of events, read anyway after this many debounce periods.
const MAX_DEBOUNCE_ROUNDS: u32 = 10;

/// Discovery from a TOML or JSON file, reloaded when the file changes.
///
/// See the [module docs](self) for the file format and the reload algorithm.
///
/// ```no_run
/// use futures_util::StreamExt;
/// use mesh_core::discover::FileDiscovery;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let mut changes = FileDiscovery::watch("/etc/mesh/users-endpoints.toml").await?;
/// while let Some(change) = changes.next().await {
///     println!("{:?}", change?);
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct FileDiscovery {
    updates: Updates,
}

impl FileDiscovery {
    /// Watches `path` with the default settings: see [`FileDiscoveryBuilder`].
    ///
    /// # Errors
    ///
    /// As [`FileDiscoveryBuilder::watch`].
    pub async fn watch(path: impl Into<PathBuf>) -> Result<Self, DiscoverError> {
        Self::builder(path).watch().await
    }

    /// Settings for watching `path`, to adjust before [`watch`](FileDiscoveryBuilder::watch).
    pub fn builder(path: impl Into<PathBuf>) -> FileDiscoveryBuilder {
        FileDiscoveryBuilder {
            path: path.into(),
            poll_interval: DEFAULT_POLL_INTERVAL,
            debounce: DEFAULT_DEBOUNCE,
        }
    }
}

impl Stream for FileDiscovery {
    type Item = Result<Change, DiscoverError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.updates).poll_next(cx)
    }
}

/// How a [`FileDiscovery`] watches its file.
///
/// # Defaults
///
/// - `poll_interval`: 10 s.
/// - `debounce`: 100 ms.
#[derive(Clone, Debug)]
pub struct FileDiscoveryBuilder {
    path: PathBuf,
    poll_interval: Duration,
    debounce: Duration,
}

impl FileDiscoveryBuilder {
    /// Re-reads the file at least this often, whether or not an event said it changed
    /// (default 10 s). A zero interval is raised to one millisecond.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// Waits for this long without file events before reading the file (default 100 ms).
    pub fn debounce(mut self, debounce: Duration) -> Self {
        self.debounce = debounce;
        self
    }

    /// Reads the file, emits its endpoints as the first changes, and starts watching it in a
    /// background task. Must be called within a tokio runtime.
    ///
    /// # Errors
    ///
    /// [`DiscoverError::Read`] if the file cannot be read, [`DiscoverError::Malformed`] if
    /// it is not a valid endpoint list (the message says where), and
    /// [`DiscoverError::Watch`] if its directory cannot be watched.
    pub async fn watch(self) -> Result<FileDiscovery, DiscoverError> {
        let (content, set) = load(&self.path).await?;

        let (events_tx, events_rx) = mpsc::channel(1);
        let watcher = watch_dir(&self.path, events_tx)?;

        let (tx, updates) = Updates::channel();
        let initial = EndpointSet::new().diff(&set);
        if !initial.is_empty() {
            // The channel is new and holds several batches, so this cannot be full.
            let _ = tx.try_send(initial);
        }
        let task = WatchTask {
            path: self.path,
            poll_interval: self.poll_interval,
            debounce: self.debounce,
            content,
            set,
            last_error: None,
            tx,
            events: events_rx,
            _watcher: watcher,
        };
        tokio::spawn(task.run());
        Ok(FileDiscovery { updates })
    }
}

/// The directory that holds `path`.
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Watches the directory of `path`, signalling `events` on every relevant event.
fn watch_dir(
    path: &Path,
    events: mpsc::Sender<()>,
) -> Result<notify::RecommendedWatcher, DiscoverError> {
    let dir = parent_dir(path);
    let watch_error = |e: notify::Error| DiscoverError::Watch {
        path: dir.to_path_buf(),
        message: e.to_string(),
    };
    let mut watcher =
        notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
            // Our own reads open the file; only a close after writing means anything.
            Ok(ev) if matches!(ev.kind, EventKind::Access(a) if a != AccessKind::Close(AccessMode::Write)) => {}
            // A full channel already holds a wake-up; a closed one means the task is gone.
            _ => {
                let _ = events.try_send(());
            }
        })
        .map_err(watch_error)?;
    watcher
        .watch(dir, RecursiveMode::NonRecursive)
        .map_err(watch_error)?;
    Ok(watcher)
}

/// Reads and parses the endpoints file at `path`, returning its bytes and endpoints.
async fn load(path: &Path) -> Result<(Vec<u8>, EndpointSet), DiscoverError> {
    let content = tokio::fs::read(path)
        .await
        .map_err(|source| DiscoverError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    let set = parse(path, &content)?;
    Ok((content, set))
}

/// Parses an endpoints file: JSON if the name ends in `.json`, TOML otherwise.
fn parse(path: &Path, content: &[u8]) -> Result<EndpointSet, DiscoverError> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct EndpointsFile {
        endpoints: Vec<Endpoint>,
    }

    let malformed = |message: String| DiscoverError::Malformed {
        path: path.to_path_buf(),
        message,
    };
    let is_json = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));
    let file: EndpointsFile = if is_json {
        serde_json::from_slice(content).map_err(|e| malformed(e.to_string()))?
    } else {
        let text =
            std::str::from_utf8(content).map_err(|e| malformed(format!("not UTF-8: {e}")))?;
        toml::from_str(text).map_err(|e| malformed(e.to_string()))?
    };

    let mut seen = HashSet::new();
    for ep in &file.endpoints {
        if !seen.insert(ep.addr()) {
            return Err(malformed(format!(
                "address {} is listed more than once",
                ep.addr()
            )));
        }
    }
    Ok(file.endpoints.into_iter().collect())
}

/// The background task: reloads on events and polls, sends diffs.
struct WatchTask {
    path: PathBuf,
    poll_interval: Duration,
    debounce: Duration,
    /// The bytes of the last good file.
    content: Vec<u8>,
    /// The last endpoints sent.
    set: EndpointSet,
    /// The last failure logged, so that a persisting failure is logged once.
    last_error: Option<String>,
    tx: mpsc::Sender<Vec<Change>>,
    events: mpsc::Receiver<()>,
    /// Kept so that the watch lives exactly as long as the task.
    _watcher: notify::RecommendedWatcher,
}

impl WatchTask {
    async fn run(mut self) {
        let start = time::Instant::now() + self.poll_interval;
        let mut poll = time::interval_at(start, self.poll_interval);
        poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut events_open = true;
        loop {
            tokio::select! {
                () = self.tx.closed() => return,
                ev = self.events.recv(), if events_open => match ev {
                    Some(()) => {
                        if !self.settle().await {
                            return;
                        }
                    }
                    // The watcher's thread is gone; keep polling.
                    None => {
                        tracing::warn!(path = %self.path.display(), "file watcher stopped; polling only");
                        events_open = false;
                        continue;
                    }
                },
                _ = poll.tick() => {}
            }
            if !self.reload().await {
                return;
            }
        }
    }

    /// Waits until no event has arrived for one debounce period (at most a few periods).
    /// Returns false if the stream was dropped meanwhile.
    async fn settle(&mut self) -> bool {
        for _ in 0..MAX_DEBOUNCE_ROUNDS {
            tokio::select! {
                () = self.tx.closed() => return false,
                () = time::sleep(self.debounce) => {}
            }
            if self.events.try_recv().is_err() {
                break;
            }
        }
        true
    }

    /// Re-reads the file and sends the difference. Returns false if the stream was dropped.
    async fn reload(&mut self) -> bool {
        let (content, set) = match tokio::fs::read(&self.path).await {
            Ok(content) if content == self.content => {
                self.last_error = None;
                return true;
            }
            Ok(content) => match parse(&self.path, &content) {
                Ok(set) => (content, set),
                Err(e) => {
                    self.failed(&e);
                    return true;
                }
            },
            Err(source) => {
                self.failed(&DiscoverError::Read {
                    path: self.path.clone(),
                    source,
                });
                return true;
            }
        };
        self.last_error = None;
        let changes = self.set.diff(&set);
        self.content = content;
        self.set = set;
        tracing::debug!(path = %self.path.display(), changes = changes.len(), "endpoints file reloaded");
        changes.is_empty() || self.tx.send(changes).await.is_ok()
    }

    fn failed(&mut self, error: &DiscoverError) {
        let reason = error.to_string();
        if self.last_error.as_deref() != Some(reason.as_str()) {
            tracing::warn!(
                path = %self.path.display(),
                endpoints = self.set.len(),
                "{reason}; keeping the last good endpoints"
            );
            self.last_error = Some(reason);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(name: &str, text: &str) -> Result<EndpointSet, String> {
        parse(Path::new(name), text.as_bytes()).map_err(|e| e.to_string())
    }

    #[test]
    fn parses_toml_and_json() {
        let toml = parse_str(
            "e.toml",
            "[[endpoints]]\naddr = \"10.0.0.1:80\"\n[[endpoints]]\naddr = \"[::1]:80\"\nweight = 2\n",
        )
        .unwrap();
        let json = parse_str(
            "e.JSON",
            r#"{"endpoints":[{"addr":"10.0.0.1:80"},{"addr":"[::1]:80","weight":2}]}"#,
        )
        .unwrap();
        assert_eq!(toml.len(), 2);
        assert_eq!(toml, json);
        assert!(parse_str("e.toml", "endpoints = []").unwrap().is_empty());
    }

    #[test]
    fn rejects_malformed_files_with_reasons() {
        for (name, text, want) in [
            ("e.toml", "", "missing field `endpoints`"),
            ("e.json", "{}", "missing field `endpoints`"),
            (
                "e.toml",
                "[[endpoint]]\naddr = \"1.2.3.4:1\"",
                "unknown field `endpoint`",
            ),
            ("e.toml", "[[endpoints]]\naddr = \"1.2.3.4\"", "line 2"),
            ("e.json", "{\"endpoints\": [", "line 1"),
            (
                "e.toml",
                "[[endpoints]]\naddr = \"1.2.3.4:1\"\n[[endpoints]]\naddr = \"1.2.3.4:1\"\nzone = \"b\"",
                "address 1.2.3.4:1 is listed more than once",
            ),
        ] {
            let err = parse_str(name, text).unwrap_err();
            assert!(err.contains(want), "{name} {text:?}: {err}");
            assert!(err.contains(name), "{err}");
        }
        let err = parse(Path::new("e.toml"), b"\xff").unwrap_err().to_string();
        assert!(err.contains("not UTF-8"), "{err}");
    }

    #[test]
    fn parent_of_a_bare_name_is_the_current_dir() {
        assert_eq!(parent_dir(Path::new("e.toml")), Path::new("."));
        assert_eq!(parent_dir(Path::new("/a/e.toml")), Path::new("/a"));
    }
}
