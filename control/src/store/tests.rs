use std::sync::Arc;

use bytes::Bytes;

use super::*;

fn open(dir: &tempfile::TempDir, history: usize) -> Arc<dyn Store> {
    let options = EmbeddedStoreOptions {
        history_limit: history,
        ..Default::default()
    };
    Arc::new(EmbeddedStore::open(&dir.path().join("db"), options).expect("open"))
}

fn put(key: &str, value: &str, precondition: Precondition) -> Op {
    Op::Put {
        key: key.into(),
        value: Bytes::from(value.to_string()),
        precondition,
    }
}

#[tokio::test]
async fn revisions_count_transactions_and_cas_guards_updates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir, 100);
    let a = store
        .create("/registry/a".into(), "1".into())
        .await
        .expect("create a");
    assert_eq!((a.create_revision, a.mod_revision), (1, 1));
    let err = store
        .create("/registry/a".into(), "x".into())
        .await
        .expect_err("must be refused");
    assert!(matches!(err, StoreError::AlreadyExists { .. }), "{err}");

    let a2 = store
        .update(
            "/registry/a".into(),
            "2".into(),
            Precondition::ModRevision(1),
        )
        .await
        .expect("cas update");
    assert_eq!((a2.create_revision, a2.mod_revision), (1, 2));
    let err = store
        .update(
            "/registry/a".into(),
            "3".into(),
            Precondition::ModRevision(1),
        )
        .await
        .expect_err("must be refused");
    assert!(
        matches!(
            err,
            StoreError::Conflict {
                expected: 1,
                actual: 2,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        store.current_revision(),
        2,
        "a refused write makes no revision"
    );

    // All or nothing: the second op fails, so the first is not applied either.
    let err = store
        .txn(vec![
            put("/registry/b", "1", Precondition::Absent),
            put("/registry/missing", "1", Precondition::Exists),
        ])
        .await
        .expect_err("must be refused");
    assert!(matches!(err, StoreError::NotFound { .. }), "{err}");
    assert!(store.get("/registry/b").await.expect("get").is_none());
}

#[tokio::test]
async fn list_pages_and_reads_an_older_revision_from_history() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir, 100);
    for name in ["a", "b", "c"] {
        store
            .create(format!("/r/s/{name}"), name.to_string().into())
            .await
            .expect("create");
    }
    store
        .create("/r/t/x".into(), "x".into())
        .await
        .expect("create");
    let first = store.list("/r/s/", None, 2, None).await.expect("list");
    assert_eq!(first.kvs.len(), 2);
    assert_eq!(first.remaining, 1);
    store
        .delete("/r/s/c".into(), Precondition::Exists)
        .await
        .expect("delete");
    store
        .update("/r/s/a".into(), "a2".into(), Precondition::Exists)
        .await
        .expect("update");
    // The rest of the first list, at its revision: c is still there, a unchanged.
    let old = store
        .list("/r/s/", None, 0, Some(first.revision))
        .await
        .expect("old list");
    let values: Vec<_> = old.kvs.iter().map(|kv| kv.value.clone()).collect();
    assert_eq!(
        values,
        vec![Bytes::from("a"), Bytes::from("b"), Bytes::from("c")]
    );
    let rest = store
        .list("/r/s/", Some("/r/s/b"), 2, Some(first.revision))
        .await
        .expect("continue");
    assert_eq!(rest.kvs.len(), 1);
    assert_eq!(rest.kvs[0].key, "/r/s/c");
}

#[tokio::test]
async fn watch_replays_history_then_streams_and_refuses_compacted_revisions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir, 3);
    for i in 0..5 {
        store
            .create(format!("/w/{i}"), "v".into())
            .await
            .expect("create");
    }
    let err = store.watch("/w/", 0).err().expect("compacted");
    assert!(matches!(err, StoreError::Compacted { .. }), "{err}");

    let mut watch = store.watch("/w/", 3).expect("watch");
    assert_eq!(
        watch.next().await.expect("event").expect("ok").kv.key,
        "/w/3"
    );
    assert_eq!(
        watch.next().await.expect("event").expect("ok").kv.key,
        "/w/4"
    );
    store
        .delete("/w/0".into(), Precondition::Exists)
        .await
        .expect("delete");
    let event = watch.next().await.expect("event").expect("ok");
    assert_eq!(event.kind, EventKind::Delete);
    assert_eq!(event.kv.mod_revision, 6);
    assert_eq!(event.prev.as_ref().map(|p| p.mod_revision), Some(1));
}

#[tokio::test]
async fn everything_acknowledged_is_there_after_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = open(&dir, 100);
        let writes = (0..64).map(|i| {
            let store = store.clone();
            async move { store.create(format!("/d/{i:03}"), "v".into()).await }
        });
        for result in futures::future::join_all(writes).await {
            result.expect("create");
        }
        store
            .delete("/d/000".into(), Precondition::Exists)
            .await
            .expect("delete");
    }
    // The writer thread may still hold the file for a moment after the handle is dropped.
    let mut reopened = None;
    for _ in 0..50 {
        match EmbeddedStore::open(&dir.path().join("db"), EmbeddedStoreOptions::default()) {
            Ok(store) => {
                reopened = Some(store);
                break;
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    }
    let store: Arc<dyn Store> = Arc::new(reopened.expect("reopen"));
    assert_eq!(store.current_revision(), 65);
    assert_eq!(store.count("/d/").await.expect("count"), 63);
    let next = store
        .create("/d/new".into(), "v".into())
        .await
        .expect("create");
    assert_eq!(next.mod_revision, 66, "revisions continue after a restart");
}
