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
//! rather than read as "remove every endpoint". Unknown keys, two endpoints at the same
//! address and an address that cannot be a peer (port 0, unspecified, multicast, broadcast:
//! see [`Endpoint`]) make the file malformed. At most
//! [`MAX_ENDPOINTS`] endpoints are used: beyond it, those of the lowest addresses, with a
//! warning.
//!
//! # How changes are noticed
//!
//! Through a [`FileWatch`] on the one path (see the
//! [`watch`](crate::watch) module for the algorithm): the *parent directory* is watched, so
//! that atomic replacement by rename and Kubernetes config-map `..data` symlink swaps are
//! seen; events are debounced (default 100 ms, for at most 10 periods under a steady
//! stream of events), so that a file being written in several steps is usually read once
//! it is complete; and the file is re-read on a fixed poll interval (default 10 s) in case
//! an event was missed. Its bytes are compared with the last good content: an unchanged
//! file emits nothing.
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
use tokio::sync::mpsc;

use super::{Change, DiscoverError, EndpointSet, MAX_ENDPOINTS, Updates};
use crate::endpoint::Endpoint;
use crate::watch::{FileWatch, WatchError};

pub use crate::watch::{DEFAULT_DEBOUNCE, DEFAULT_POLL_INTERVAL};

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
    /// (default 10 s). A zero interval is raised to one millisecond, and one above 30 years
    /// (`Duration::MAX` for "never") is lowered to 30 years.
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
        let watch = FileWatch::builder([&self.path])
            .poll_interval(self.poll_interval)
            .debounce(self.debounce)
            .start()
            .await
            .map_err(|e| match e {
                WatchError::Read { path, source } => DiscoverError::Read { path, source },
                WatchError::Watch { path, message } => DiscoverError::Watch { path, message },
            })?;
        let content = match watch.snapshot().files().first().map(|f| f.content()) {
            Some(Ok(bytes)) => bytes.to_vec(),
            // `start` read the one path successfully.
            _ => Vec::new(),
        };
        let set = parse(&self.path, &content)?;

        let (tx, updates) = Updates::channel();
        let initial = EndpointSet::new().diff(&set);
        if !initial.is_empty() {
            // The channel is new and holds several batches, so this cannot be full.
            let _ = tx.try_send(initial);
        }
        let task = WatchTask {
            path: self.path,
            content,
            set,
            last_error: None,
            tx,
            watch,
        };
        tokio::spawn(task.run());
        Ok(FileDiscovery { updates })
    }
}

/// Parses an endpoints file's content (see the [module docs](self) for the format): JSON
/// if `path` ends in `.json`, TOML otherwise. The file is not read; `path` also names it in
/// errors.
///
/// Exposed for the fuzz targets in `fuzz/`; not a stable API.
///
/// # Errors
///
/// [`DiscoverError::Malformed`], saying where and why.
#[doc(hidden)]
pub fn parse(path: &Path, content: &[u8]) -> Result<EndpointSet, DiscoverError> {
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
    let total = file.endpoints.len();
    let mut set: EndpointSet = file.endpoints.into_iter().collect();
    if set.truncate(MAX_ENDPOINTS) {
        tracing::warn!(
            path = %path.display(),
            "{total} endpoints, more than the {MAX_ENDPOINTS} a source may have; using the \
             {MAX_ENDPOINTS} lowest addresses"
        );
    }
    Ok(set)
}

/// The background task: parses each new snapshot of the file, sends diffs.
struct WatchTask {
    path: PathBuf,
    /// The bytes of the last good file.
    content: Vec<u8>,
    /// The last endpoints sent.
    set: EndpointSet,
    /// The last failure logged, so that a persisting failure is logged once.
    last_error: Option<String>,
    tx: mpsc::Sender<Vec<Change>>,
    /// Owned by the task, so that the watch lives exactly as long as the task.
    watch: FileWatch,
}

impl WatchTask {
    async fn run(mut self) {
        loop {
            let snapshot = tokio::select! {
                () = self.tx.closed() => return,
                snapshot = self.watch.changed() => snapshot,
            };
            let Some(file) = snapshot.files().first() else {
                return;
            };
            if !self.reload(file.content()).await {
                return;
            }
        }
    }

    /// Parses the file's new content and sends the difference. Returns false if the stream
    /// was dropped.
    async fn reload(&mut self, read: Result<&[u8], &std::io::Error>) -> bool {
        let (content, set) = match read {
            Ok(content) if content == self.content => {
                self.last_error = None;
                return true;
            }
            Ok(content) => match parse(&self.path, content) {
                Ok(set) => (content.to_vec(), set),
                Err(e) => {
                    self.failed(&e);
                    return true;
                }
            },
            Err(source) => {
                self.failed(&DiscoverError::Read {
                    path: self.path.clone(),
                    source: std::io::Error::new(source.kind(), source.to_string()),
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
            // An address that cannot be a peer names the entry (its line) and the address.
            (
                "e.toml",
                "[[endpoints]]\naddr = \"10.0.0.1:80\"\n[[endpoints]]\naddr = \"0.0.0.0:80\"",
                "line 4",
            ),
            (
                "e.toml",
                "[[endpoints]]\naddr = \"0.0.0.0:80\"",
                "0.0.0.0:80 is an unspecified address",
            ),
            (
                "e.json",
                r#"{"endpoints":[{"addr":"10.0.0.1:0"}]}"#,
                "10.0.0.1:0 has port 0",
            ),
        ] {
            let err = parse_str(name, text).unwrap_err();
            assert!(err.contains(want), "{name} {text:?}: {err}");
            assert!(err.contains(name), "{err}");
        }
        let err = parse(Path::new("e.toml"), b"\xff").unwrap_err().to_string();
        assert!(err.contains("not UTF-8"), "{err}");
    }

    /// Beyond `MAX_ENDPOINTS`, the lowest addresses are kept rather than the file refused.
    #[test]
    fn endpoints_beyond_the_cap_are_dropped_lowest_kept() {
        let text: String = (0..MAX_ENDPOINTS + 10)
            .map(|i| {
                let (hi, lo) = (i / 250, i % 250 + 1);
                format!("[[endpoints]]\naddr = \"10.0.{hi}.{lo}:80\"\n")
            })
            .rev()
            .collect();
        let set = parse_str("e.toml", &text).unwrap();
        assert_eq!(set.len(), MAX_ENDPOINTS);
        assert_eq!(
            set.iter().next().map(|e| e.addr().to_string()).as_deref(),
            Some("10.0.0.1:80")
        );
        assert!(
            set.iter()
                .all(|e| e.addr() < "10.0.16.97:80".parse().unwrap())
        );
    }
}
