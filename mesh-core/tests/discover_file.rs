//! `FileDiscovery` against real files: in-place edits, atomic replace, config-map symlink
//! swaps, bad files, deletion, and the safety-net poll.
#![cfg(feature = "discover-file")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use futures_util::StreamExt;
use mesh_core::discover::{Change, DiscoverError, FileDiscovery};
use tokio::time::timeout;

/// Long enough for any file event to arrive on a loaded machine.
const EVENT: Duration = Duration::from_secs(5);
/// How long "nothing happens" is observed.
const QUIET: Duration = Duration::from_millis(500);

/// A change as a comparable string: `+addr zone weight` or `-addr`.
fn show(change: Change) -> String {
    match change {
        Change::Insert(k, ep) => {
            assert_eq!(k, ep.key());
            format!("+{k} {} {}", ep.zone().unwrap_or("-"), ep.weight().get())
        }
        Change::Remove(k) => format!("-{k}"),
    }
}

/// The next `n` changes, then checks that no more follow.
async fn changes(d: &mut FileDiscovery, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..n {
        let c = timeout(EVENT, d.next())
            .await
            .unwrap_or_else(|_| panic!("timed out after {out:?}"))
            .expect("stream ended")
            .expect("stream yielded an error");
        out.push(show(c));
    }
    assert_quiet(d).await;
    out
}

async fn assert_quiet(d: &mut FileDiscovery) {
    if let Ok(c) = timeout(QUIET, d.next()).await {
        panic!("unexpected change: {:?}", c.map(|c| c.map(show)));
    }
}

/// An endpoints file with one endpoint per `(last octet, zone)`.
fn toml(eps: &[(u8, &str)]) -> String {
    let mut s = String::new();
    for (octet, zone) in eps {
        s += &format!("[[endpoints]]\naddr = \"10.0.0.{octet}:80\"\nzone = \"{zone}\"\n\n");
    }
    if eps.is_empty() {
        s += "endpoints = []\n";
    }
    s
}

/// A discovery on `path` that reacts fast to events but whose poll never fires in a test.
async fn watch(path: &Path) -> FileDiscovery {
    FileDiscovery::builder(path)
        .debounce(Duration::from_millis(30))
        .poll_interval(Duration::from_secs(3600))
        .watch()
        .await
        .unwrap()
}

#[tokio::test]
async fn initial_load_toml_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("e.toml");
    std::fs::write(&path, toml(&[(2, "b"), (1, "a")])).unwrap();
    let mut d = watch(&path).await;
    assert_eq!(
        changes(&mut d, 2).await,
        ["+10.0.0.1:80 a 1", "+10.0.0.2:80 b 1"]
    );

    let path = dir.path().join("e.json");
    std::fs::write(
        &path,
        r#"{"endpoints": [{"addr": "[::1]:90", "weight": 3}]}"#,
    )
    .unwrap();
    let mut d = watch(&path).await;
    assert_eq!(changes(&mut d, 1).await, ["+[::1]:90 - 3"]);
}

#[tokio::test]
async fn in_place_edit_emits_exactly_the_diff() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("e.toml");
    std::fs::write(&path, toml(&[(1, "a"), (2, "a"), (3, "a")])).unwrap();
    let mut d = watch(&path).await;
    changes(&mut d, 3).await;

    // 1 unchanged, 2 changes zone, 3 removed, 4 added.
    std::fs::write(&path, toml(&[(1, "a"), (2, "b"), (4, "a")])).unwrap();
    assert_eq!(
        changes(&mut d, 3).await,
        ["+10.0.0.2:80 b 1", "+10.0.0.4:80 a 1", "-10.0.0.3:80"]
    );

    // To no endpoints at all.
    std::fs::write(&path, toml(&[])).unwrap();
    assert_eq!(
        changes(&mut d, 3).await,
        ["-10.0.0.1:80", "-10.0.0.2:80", "-10.0.0.4:80"]
    );
}

#[tokio::test]
async fn atomic_replace_by_rename() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("e.toml");
    std::fs::write(&path, toml(&[(1, "a")])).unwrap();
    let mut d = watch(&path).await;
    changes(&mut d, 1).await;

    for (i, next) in [[(2, "a")], [(3, "a")]].iter().enumerate() {
        let tmp = dir.path().join(format!(".e.toml.tmp{i}"));
        std::fs::write(&tmp, toml(next)).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        let prev = if i == 0 { 1 } else { 2 };
        assert_eq!(
            changes(&mut d, 2).await,
            [
                format!("+10.0.0.{}:80 a 1", next[0].0),
                format!("-10.0.0.{prev}:80")
            ]
        );
    }
}

#[cfg(unix)]
#[tokio::test]
async fn config_map_symlink_swap() {
    use std::os::unix::fs::symlink;

    // The layout kubelet writes for a config map volume.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir(root.join("..2024_01_01_00_00_00.1")).unwrap();
    std::fs::write(
        root.join("..2024_01_01_00_00_00.1/endpoints.toml"),
        toml(&[(1, "a"), (2, "a")]),
    )
    .unwrap();
    symlink("..2024_01_01_00_00_00.1", root.join("..data")).unwrap();
    symlink("..data/endpoints.toml", root.join("endpoints.toml")).unwrap();

    let mut d = watch(&root.join("endpoints.toml")).await;
    changes(&mut d, 2).await;

    // The update: a new timestamped dir, a new symlink renamed over `..data`, the old dir
    // removed.
    std::fs::create_dir(root.join("..2024_01_02_00_00_00.2")).unwrap();
    std::fs::write(
        root.join("..2024_01_02_00_00_00.2/endpoints.toml"),
        toml(&[(2, "a"), (3, "a")]),
    )
    .unwrap();
    symlink("..2024_01_02_00_00_00.2", root.join("..data_tmp")).unwrap();
    std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
    std::fs::remove_dir_all(root.join("..2024_01_01_00_00_00.1")).unwrap();

    assert_eq!(
        changes(&mut d, 2).await,
        ["+10.0.0.3:80 a 1", "-10.0.0.1:80"]
    );
}

#[tokio::test]
async fn malformed_file_keeps_the_last_set_until_a_good_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("e.toml");
    std::fs::write(&path, toml(&[(1, "a"), (2, "a")])).unwrap();
    let mut d = watch(&path).await;
    changes(&mut d, 2).await;

    // Garbage, an empty file, and a duplicated address: all ignored.
    std::fs::write(&path, "[[endpoints]\naddr = ").unwrap();
    assert_quiet(&mut d).await;
    std::fs::write(&path, "").unwrap();
    assert_quiet(&mut d).await;
    std::fs::write(&path, toml(&[(5, "a"), (5, "b")])).unwrap();
    assert_quiet(&mut d).await;

    // The next good file is diffed against the last good set, not against nothing.
    std::fs::write(&path, toml(&[(2, "a"), (3, "a")])).unwrap();
    assert_eq!(
        changes(&mut d, 2).await,
        ["+10.0.0.3:80 a 1", "-10.0.0.1:80"]
    );
}

#[tokio::test]
async fn deleted_file_keeps_the_set_and_recreating_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("e.toml");
    std::fs::write(&path, toml(&[(1, "a")])).unwrap();
    let mut d = watch(&path).await;
    changes(&mut d, 1).await;

    std::fs::remove_file(&path).unwrap();
    assert_quiet(&mut d).await;

    std::fs::write(&path, toml(&[(1, "a"), (2, "a")])).unwrap();
    assert_eq!(changes(&mut d, 1).await, ["+10.0.0.2:80 a 1"]);
}

#[tokio::test]
async fn unchanged_rewrites_emit_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("e.toml");
    std::fs::write(&path, toml(&[(1, "a")])).unwrap();
    let mut d = watch(&path).await;
    changes(&mut d, 1).await;

    // The same bytes.
    std::fs::write(&path, toml(&[(1, "a")])).unwrap();
    assert_quiet(&mut d).await;
    // Different bytes, the same endpoints.
    std::fs::write(
        &path,
        "# reformatted\n[[endpoints]]\nzone = \"a\"\naddr = \"10.0.0.1:80\"\nweight = 1\n",
    )
    .unwrap();
    assert_quiet(&mut d).await;
    // And a real change still gets through.
    std::fs::write(&path, toml(&[(1, "b")])).unwrap();
    assert_eq!(changes(&mut d, 1).await, ["+10.0.0.1:80 b 1"]);
}

#[tokio::test]
async fn bad_file_at_start_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.toml");
    let err = FileDiscovery::watch(&missing).await.unwrap_err();
    assert!(matches!(err, DiscoverError::Read { .. }), "{err:?}");
    assert!(err.to_string().contains("missing.toml"), "{err}");

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[[endpoints]]\naddr = \"10.0.0.1:80\"\n[[endpoints]]\naddr = \"10.0.0.2\"\n",
    )
    .unwrap();
    let err = FileDiscovery::watch(&bad).await.unwrap_err();
    assert!(matches!(err, DiscoverError::Malformed { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("bad.toml") && msg.contains("line 4"), "{msg}");

    std::fs::write(&bad, toml(&[(1, "a"), (1, "b")])).unwrap();
    let msg = FileDiscovery::watch(&bad).await.unwrap_err().to_string();
    assert!(msg.contains("10.0.0.1:80"), "{msg}");
}

/// A write through a hard link in another directory raises no event in the watched
/// directory; only the poll can see it.
#[tokio::test]
async fn poll_catches_changes_that_raise_no_event() {
    let watched = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    let path = watched.path().join("e.toml");
    let alias = other.path().join("alias.toml");
    std::fs::write(&path, toml(&[(1, "a")])).unwrap();
    std::fs::hard_link(&path, &alias).unwrap();

    let mut d = FileDiscovery::builder(&path)
        .poll_interval(Duration::from_millis(200))
        .watch()
        .await
        .unwrap();
    changes(&mut d, 1).await;

    std::fs::write(&alias, toml(&[(2, "a")])).unwrap();
    assert_eq!(
        changes(&mut d, 2).await,
        ["+10.0.0.2:80 a 1", "-10.0.0.1:80"]
    );
}

#[tokio::test(flavor = "current_thread")]
async fn dropping_the_stream_stops_the_task() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("e.toml");
    std::fs::write(&path, toml(&[(1, "a")])).unwrap();
    let metrics = tokio::runtime::Handle::current().metrics();
    let before = metrics.num_alive_tasks();

    let d = watch(&path).await;
    assert_eq!(metrics.num_alive_tasks(), before + 1);
    drop(d);
    timeout(EVENT, async {
        while metrics.num_alive_tasks() > before {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the watch task outlived its stream");
}
