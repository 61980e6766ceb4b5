//! The watch history bounded in bytes, and watchers reading it in place (issue 15, item 4).

use std::sync::Arc;

use bytes::Bytes;

use super::*;

fn open(dir: &tempfile::TempDir, limit: usize, bytes: usize) -> Arc<dyn Store> {
    let options = EmbeddedStoreOptions {
        history_limit: limit,
        history_bytes: bytes,
    };
    Arc::new(EmbeddedStore::open(&dir.path().join("db"), options).expect("open"))
}

fn big(generation: usize, size: usize) -> Bytes {
    Bytes::from(vec![b'a' + (generation % 26) as u8; size])
}

#[tokio::test]
async fn the_history_keeps_a_byte_budget_not_just_a_count() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The count limit alone would keep all 30 versions (30 MiB).
    let store = open(&dir, 20_000, 4 * 1024 * 1024);
    store
        .create("/h/big".into(), big(0, 1 << 20))
        .await
        .expect("create");
    for generation in 1..30 {
        store
            .update(
                "/h/big".into(),
                big(generation, 1 << 20),
                Precondition::Exists,
            )
            .await
            .expect("update");
    }
    let current = store.current_revision();
    assert_eq!(current, 30);
    let err = store
        .watch("/h/", 0)
        .err()
        .expect("early revisions evicted");
    let StoreError::Compacted { oldest, .. } = err else {
        panic!("expected Compacted, got {err}");
    };
    // Each 1 MiB update counts with its previous version: about two fit in 4 MiB.
    assert!(oldest >= current - 3, "oldest kept {oldest} of {current}");
    // The newest revisions are still there for a resume.
    let mut watch = store.watch("/h/", current - 1).expect("recent resume");
    let event = watch.next().await.expect("event").expect("ok");
    assert_eq!(event.revision(), current);
}

#[tokio::test]
async fn the_newest_event_stays_even_when_it_alone_is_over_the_budget() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir, 100, 1024);
    let mut watch = store.watch("/h/", 0).expect("watch");
    store
        .create("/h/a".into(), big(0, 64 * 1024))
        .await
        .expect("create");
    let event = watch.next().await.expect("event").expect("ok");
    assert_eq!(event.kv.value.len(), 64 * 1024);
}

#[tokio::test]
async fn watchers_share_the_history_instead_of_copying_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir, 1_000, usize::MAX);
    for i in 0..50 {
        store
            .create(format!("/s/{i:02}"), "v".into())
            .await
            .expect("create");
    }
    // 100 watchers from the start: each used to get its own copy of the backlog.
    let mut watchers: Vec<_> = (0..100)
        .map(|_| store.watch("/s/", 0).expect("watch"))
        .collect();
    let first = watchers[0].next().await.expect("event").expect("ok");
    // Held by the history and by this test, by no watcher that has not read it.
    assert_eq!(Arc::strong_count(&first), 2);
    drop(first);
    for watcher in &mut watchers[1..] {
        let event = watcher.next().await.expect("event").expect("ok");
        assert_eq!(event.kv.key, "/s/00");
    }
}

#[tokio::test]
async fn a_watcher_that_falls_behind_gets_an_error_after_a_gapless_prefix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir, 5, usize::MAX);
    let mut watch = store.watch("/b/", 0).expect("watch");
    for i in 0..3 {
        store
            .create(format!("/b/{i}"), "v".into())
            .await
            .expect("create");
    }
    assert_eq!(
        watch.next().await.expect("event").expect("ok").revision(),
        1
    );
    assert_eq!(
        watch.next().await.expect("event").expect("ok").revision(),
        2
    );
    // It stops reading; ten more writes push revision 3 out of the history.
    for i in 3..13 {
        store
            .create(format!("/b/{i}"), "v".into())
            .await
            .expect("create");
    }
    tokio::time::timeout(std::time::Duration::from_secs(30), watch.fell_behind())
        .await
        .expect("fell_behind resolves once unread events are evicted");
    let err = watch
        .next()
        .await
        .expect("an error, not the end")
        .expect_err("never a silent skip to revision 8");
    let StoreError::WatcherBehind { revision, oldest } = err else {
        panic!("expected WatcherBehind, got {err}");
    };
    assert_eq!(revision, 2);
    assert!(oldest > 3, "{oldest}");
}

#[tokio::test]
async fn several_events_of_one_revision_all_reach_the_watcher() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir, 100, usize::MAX);
    let mut watch = store.watch("/m/", 0).expect("watch");
    let ops = (0..3)
        .map(|i| Op::Put {
            key: format!("/m/{i}"),
            value: "v".into(),
            precondition: Precondition::Absent,
        })
        .collect();
    store.txn(ops).await.expect("txn");
    store
        .create("/m/3".into(), "v".into())
        .await
        .expect("create");
    let mut seen = Vec::new();
    for _ in 0..4 {
        let event = watch.next().await.expect("event").expect("ok");
        seen.push((event.kv.key.clone(), event.revision()));
    }
    assert_eq!(
        seen,
        vec![
            ("/m/0".to_string(), 1),
            ("/m/1".to_string(), 1),
            ("/m/2".to_string(), 1),
            ("/m/3".to_string(), 2)
        ]
    );
}

#[tokio::test]
async fn a_watch_on_one_prefix_skips_others_and_reports_their_revisions_as_seen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir, 100, usize::MAX);
    let mut watch = store.watch("/p/", 0).expect("watch");
    store
        .create("/q/x".into(), "v".into())
        .await
        .expect("create");
    store
        .create("/p/a".into(), "v".into())
        .await
        .expect("create");
    let event = watch.next().await.expect("event").expect("ok");
    assert_eq!((event.kv.key.as_str(), event.revision()), ("/p/a", 2));
    store
        .create("/q/y".into(), "v".into())
        .await
        .expect("create");
    // Nothing for this prefix: next() waits, but has moved past revision 3.
    let waited = tokio::time::timeout(std::time::Duration::from_millis(200), watch.next()).await;
    assert!(waited.is_err(), "no event under /p/");
    assert_eq!(watch.last_revision(), 3);
}
