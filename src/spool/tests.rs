//! The spool on real redb files in temp directories: group commit, the disk-full hold and
//! release, reopen after a failed commit and after a poisoned read, maintenance that survives
//! a failed commit, damaged records, and a dying writer. Disk errors come from
//! [`super::fault`], which fails the real backend's calls with a real errno.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::timeout;

use super::fault::Faults;
use super::testing::{append, config, entry, overwrite_record, stop, WAIT};
use super::*;
use crate::config::SpoolConfig;

fn read_all(spool: &Spool) -> ReadBatch {
    spool.read_from(1, usize::MAX, usize::MAX).unwrap()
}

fn open(config: &SpoolConfig, faults: &Arc<Faults>) -> (Spool, SpoolWriter) {
    Spool::open_faulty(config, faults.clone()).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn group_commit_merges_same_tag_requests_and_answers_after_the_commit() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, writer) = Spool::open(&config(&dir)).unwrap();
    let mut answers = Vec::new();
    for (tag, i) in [("a", 1), ("b", 2), ("a", 3)] {
        let e = entry(i);
        let cost = Spool::cost(Signal::Logs, None, tag.as_bytes(), &e);
        assert!(spool.try_reserve(cost));
        answers.push(spool.append(
            Signal::Logs,
            None,
            Bytes::from(tag),
            Bytes::from(e),
            1,
            cost,
        ));
    }
    let mut keys = Vec::new();
    for rx in answers {
        keys.push(timeout(WAIT, rx).await.unwrap().unwrap().unwrap());
    }
    let batch = read_all(&spool);
    // One group (the writer took all three at once) or several: either way every request
    // is in exactly one record, in order, and same-tag requests of a group share one.
    let events: u32 = batch.records.iter().map(|r| r.events).sum();
    assert_eq!(events, 3);
    if keys[0] == keys[2] {
        let a = batch.records.iter().find(|r| r.key == keys[0]).unwrap();
        assert_eq!(&a.entries.to_bytes()[..], [entry(1), entry(3)].concat());
    }
    assert_ne!(keys[0], keys[1]);
    let ids: std::collections::HashSet<_> = batch.records.iter().map(|r| r.chunk_id).collect();
    assert_eq!(ids.len(), batch.records.len(), "one chunk id per record");
    assert_eq!(spool.stats().records, batch.records.len() as u64);
    let stored: u64 = batch.records.iter().map(|r| r.stored_len()).sum();
    assert_eq!(spool.stats().bytes, stored, "the budget follows the file");
    stop(writer).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_commit_answers_its_group_with_the_error_and_the_next_group_commits() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Faults::new();
    let (spool, writer) = open(&config(&dir), &faults);
    append(&spool, "t", &entry(1), 1).await.unwrap();
    faults.fail_writes(libc::EIO);
    let failed = append(&spool, "t", &entry(2), 1).await;
    let error = failed.expect_err("a commit on a failing disk must not be acked");
    assert!(matches!(&error, SpoolError::Commit(_)), "{error:?}");
    assert!(!error.is_disk_full());
    assert!(faults.failures() > 0);
    faults.fail_writes(0);
    append(&spool, "t", &entry(3), 1).await.unwrap();
    let batch = read_all(&spool);
    let events: Vec<u8> = batch
        .records
        .iter()
        .flat_map(|r| r.entries.to_bytes().to_vec())
        .collect();
    assert_eq!(
        events,
        [entry(1), entry(3)].concat(),
        "the failed request is not stored"
    );
    assert_eq!(spool.stats().records, batch.records.len() as u64);
    stop(writer).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_holds_requests_unacked_and_releases_them_when_space_returns() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Faults::new();
    let config = config(&dir);
    let reserve = dir.path().join("spool.redb.reserve");
    let (spool, writer) = open(&config, &faults);
    assert!(reserve.exists(), "the disk reserve is taken at open");
    faults.fail_writes(libc::ENOSPC);
    let e = entry(7);
    let cost = Spool::cost(Signal::Logs, None, b"t", &e);
    assert!(spool.try_reserve(cost));
    let mut rx = spool.append(
        Signal::Logs,
        None,
        Bytes::from("t"),
        Bytes::from(e.clone()),
        1,
        cost,
    );
    // Held, not failed: no answer while the disk is full, and ingress gets no budget.
    let start = std::time::Instant::now();
    while !spool.stats().disk_full {
        assert!(start.elapsed() < WAIT, "the full disk was never noticed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        !reserve.exists(),
        "the reserve is released so deletes can commit"
    );
    assert!(spool.stats().full);
    assert!(!spool.try_reserve(1));
    assert!(
        timeout(Duration::from_millis(700), &mut rx).await.is_err(),
        "answered while the disk is full"
    );
    faults.fail_writes(0);
    let key = timeout(WAIT, rx).await.unwrap().unwrap().unwrap();
    assert!(!spool.stats().disk_full);
    assert!(spool.try_reserve(1));
    assert!(reserve.exists(), "the reserve is taken again");
    let batch = read_all(&spool);
    assert_eq!(batch.records.len(), 1);
    assert_eq!(batch.records[0].key, key);
    assert_eq!(&batch.records[0].entries.to_bytes()[..], &e[..]);
    stop(writer).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_poisoned_read_reopens_the_spool_and_the_read_waits_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(&dir);
    let (spool, writer) = Spool::open(&config).unwrap();
    let big = entry(1).repeat(20_000);
    for _ in 0..20 {
        append(&spool, "t", &big, 20_000).await.unwrap();
    }
    stop(writer).await;
    // Cold cache: a fresh open, so reads go to the (failing) file.
    let faults = Faults::new();
    let (spool, writer) = open(&config, &faults);
    faults.fail_reads(libc::EIO);
    let healer = {
        let faults = faults.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            faults.fail_reads(0);
        })
    };
    let reader = spool.clone();
    let batch = tokio::task::spawn_blocking(move || reader.read_from(1, usize::MAX, usize::MAX))
        .await
        .unwrap()
        .expect("a transient EIO must delay the read, not fail it");
    healer.join().unwrap();
    assert!(faults.failures() > 0, "the fault never hit the spool");
    assert_eq!(batch.records.len(), 20);
    assert!(batch.records.iter().all(|r| r.entries.len() == big.len()));
    // Writes go on after the reopen.
    append(&spool, "t", &entry(2), 1).await.unwrap();
    assert_eq!(read_all(&spool).records.len(), 21);
    stop(writer).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_handle_poisoned_by_a_reader_does_not_fail_the_next_group() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(&dir);
    let (spool, writer) = Spool::open(&config).unwrap();
    let big = entry(1).repeat(20_000);
    for _ in 0..10 {
        append(&spool, "t", &big, 20_000).await.unwrap();
    }
    stop(writer).await;
    let faults = Faults::new();
    let (spool, writer) = open(&config, &faults);
    faults.fail_reads(libc::EIO);
    let reader = spool.clone();
    let read = std::thread::spawn(move || reader.read_from(1, usize::MAX, usize::MAX));
    while faults.failures() == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    faults.fail_reads(0);
    // The handle is poisoned now; this group must still be stored and acked.
    append(&spool, "t", &entry(2), 1).await.unwrap();
    let read = read.join().unwrap().expect("the read waits for the reopen");
    assert!(read.records.len() >= 10, "{} records", read.records.len());
    assert_eq!(read_all(&spool).records.len(), 11);
    stop(writer).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_letter_whose_commit_fails_is_kept_for_the_next_commit() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Faults::new();
    let (spool, writer) = open(&config(&dir), &faults);
    let key = append(&spool, "t", &entry(1), 1).await.unwrap();
    let stored = read_all(&spool).records[0].stored_len();
    faults.fail_writes(libc::EIO);
    spool.dead_letter(key, stored, "poison".into(), "agg".into());
    // The commit that carries it fails (and the writer reopens).
    let start = std::time::Instant::now();
    while faults.failures() == 0 {
        assert!(start.elapsed() < WAIT);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    faults.fail_writes(0);
    timeout(WAIT, spool.flush()).await.unwrap().unwrap();
    assert!(
        read_all(&spool).records.is_empty(),
        "the record left the queue"
    );
    let dead = spool.dead_letters(0, 10).unwrap();
    assert_eq!(dead.len(), 1, "and is a dead letter, not lost");
    assert_eq!(dead[0].reason, "poison");
    assert_eq!(
        spool.stats().bytes,
        0,
        "its bytes were released once, not twice or never"
    );
    stop(writer).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn records_that_do_not_decode_are_reported_apart_not_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(&dir);
    let (spool, writer) = Spool::open(&config).unwrap();
    for i in 1..=3 {
        append(&spool, &format!("tag{i}"), &entry(i), 1)
            .await
            .unwrap();
    }
    stop(writer).await;
    overwrite_record(&config.path, 2, &[9, 1, 2, 3]);
    let (spool, writer) = Spool::open(&config).unwrap();
    let batch = read_all(&spool);
    let keys: Vec<u64> = batch.records.iter().map(|r| r.key).collect();
    assert_eq!(keys, vec![1, 3]);
    assert_eq!(
        batch.damaged,
        vec![DamagedRecord {
            key: 2,
            stored_len: 4,
            error: RecordError::Version(9)
        }]
    );
    assert_eq!(batch.last_key(), Some(3));
    assert!(matches!(spool.read(2).unwrap(), Some(Err(_))));
    // Dead-lettering it keeps its bytes for inspection.
    spool.dead_letter(2, 4, "does not decode".into(), String::new());
    timeout(WAIT, spool.flush()).await.unwrap().unwrap();
    assert_eq!(
        spool.dead_letters(0, 10).unwrap()[0].payload,
        vec![9u8, 1, 2, 3]
    );
    stop(writer).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_split_replaces_the_record_and_the_budget_counts_only_the_parts() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, writer) = Spool::open(&config(&dir)).unwrap();
    let entries = [entry(1), entry(2), entry(3)].concat();
    let key = append(&spool, "t", &entries, 3).await.unwrap();
    let parts = vec![
        (1, Bytes::from(entry(1))),
        (2, Bytes::from([entry(2), entry(3)].concat())),
    ];
    let keys = timeout(WAIT, spool.split(key, parts))
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(keys.len(), 2);
    let batch = read_all(&spool);
    assert_eq!(
        batch.records.iter().map(|r| r.key).collect::<Vec<_>>(),
        keys
    );
    let stored: u64 = batch.records.iter().map(|r| r.stored_len()).sum();
    assert_eq!(spool.stats().bytes, stored);
    // A record that is gone splits into nothing.
    let gone = spool.split(key, vec![(1, Bytes::from(entry(1)))]);
    assert_eq!(
        timeout(WAIT, gone).await.unwrap().unwrap().unwrap(),
        Vec::<u64>::new()
    );
    stop(writer).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_writer_that_dies_is_reported_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, writer) = Spool::open(&config(&dir)).unwrap();
    let died = writer.died();
    spool.panic_writer();
    let reason = timeout(WAIT, died).await.expect("death not reported");
    assert!(reason.contains("panicked"), "{reason}");
    assert!(reason.contains("unit test"), "{reason}");
    // And it does not stay silent for requests either.
    let answer = spool.append(
        Signal::Logs,
        None,
        Bytes::from("t"),
        Bytes::from(entry(1)),
        1,
        0,
    );
    assert!(timeout(WAIT, answer)
        .await
        .unwrap()
        .map_or(true, |r| r.is_err()));
    stop(writer).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_delete_with_no_ingest_is_durable_after_the_lazy_flush_commit() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(&dir);
    let (spool, writer) = Spool::open(&config).unwrap();
    let kept = append(&spool, "kept", &entry(1), 1).await.unwrap();
    let acked = append(&spool, "acked", &entry(2), 1).await.unwrap();
    let stored = read_all(&spool).records[1].stored_len();
    let commits = spool.stats().commits;
    spool.delete(acked, stored);
    // No request follows: the delete is committed on its own (within LAZY_FLUSH), durably.
    let start = std::time::Instant::now();
    while spool.stats().commits == commits {
        assert!(start.elapsed() < WAIT, "the delete was never committed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // What a crash now would leave: the file as it is on disk, opened by another handle.
    let copy = dir.path().join("after-crash.redb");
    std::fs::copy(&config.path, &copy).unwrap();
    let reader = SpoolReader::open(&copy, 1 << 20).unwrap();
    let left: Vec<u64> = reader
        .read_from(1, 10)
        .unwrap()
        .records
        .iter()
        .map(|r| r.key)
        .collect();
    assert_eq!(
        left,
        [kept],
        "the acked record is gone from the file, the other stays"
    );
    drop(reader);
    stop(writer).await;
}

/// What is queued per destination follows every way a record comes and goes, and is read back
/// from the file after a restart (route "original" starts its pipelines from it).
#[tokio::test(flavor = "multi_thread")]
async fn queued_by_destination_follows_appends_splits_deletes_and_dead_letters_across_restarts() {
    use super::testing::append_to;
    let dir = tempfile::tempdir().unwrap();
    let a: SocketAddr = "192.0.2.1:24224".parse().unwrap();
    let b: SocketAddr = "[2001:db8::2]:24224".parse().unwrap();
    let (spool, writer) = Spool::open(&config(&dir)).unwrap();
    let three = [entry(1), entry(2), entry(3)].concat();
    let split_me = append_to(&spool, Some(a), "t", &three, 3).await.unwrap();
    let delete_me = append_to(&spool, Some(a), "u", &entry(4), 1).await.unwrap();
    let dead = append_to(&spool, Some(b), "t", &entry(5), 1).await.unwrap();
    append(&spool, "direct", &entry(6), 1).await.unwrap();
    let stored = |key: u64| read_all(&spool).records.into_iter().find(|r| r.key == key);
    let len_of = |key: u64| stored(key).unwrap().stored_len();
    let (delete_len, dead_len) = (len_of(delete_me), len_of(dead));
    let records_of = |spool: &Spool| {
        spool
            .queued_by_destination()
            .into_iter()
            .map(|(d, q)| (d, q.records))
            .collect::<Vec<_>>()
    };
    assert_eq!(records_of(&spool), vec![(a, 2), (b, 1)]);

    let parts = vec![
        (1, Bytes::from(entry(1))),
        (2, Bytes::from([entry(2), entry(3)].concat())),
    ];
    let keys = timeout(WAIT, spool.split(split_me, parts))
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    spool.delete(delete_me, delete_len);
    spool.dead_letter(dead, dead_len, "test".into(), "unit".into());
    spool.flush().await.unwrap();
    // The split's parts kept the destination; the deleted and dead-lettered records are gone.
    assert_eq!(records_of(&spool), vec![(a, 2)]);
    let bytes: u64 = keys.iter().map(|&k| len_of(k)).sum();
    assert_eq!(spool.queued_by_destination()[0].1.bytes, bytes);
    stop(writer).await;

    let (spool, writer) = Spool::open(&config(&dir)).unwrap();
    assert_eq!(records_of(&spool), vec![(a, 2)]);
    // A dead letter put back is queued for its destination again.
    let letter = spool.dead_letters(1, 10).unwrap().remove(0);
    let requeued = timeout(WAIT, spool.requeue_dead(letter.id))
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(requeued.is_some());
    assert_eq!(records_of(&spool), vec![(a, 2), (b, 1)]);
    stop(writer).await;
}

/// A damaged value's destination cannot be read when it is removed, so its count stays; once
/// the spool is empty the table is cleared, and nothing is reported queued any more.
#[tokio::test(flavor = "multi_thread")]
async fn queued_by_destination_is_cleared_when_the_spool_empties_after_a_damaged_value() {
    use super::testing::append_to;
    let dir = tempfile::tempdir().unwrap();
    let config = config(&dir);
    let a: SocketAddr = "192.0.2.1:24224".parse().unwrap();
    let (spool, writer) = Spool::open(&config).unwrap();
    let damaged = append_to(&spool, Some(a), "t", &entry(1), 1).await.unwrap();
    let kept = append_to(&spool, Some(a), "t", &entry(2), 1).await.unwrap();
    stop(writer).await;
    overwrite_record(&config.path, damaged, b"\x7f\x00garbage");

    let (spool, writer) = Spool::open(&config).unwrap();
    assert_eq!(spool.queued_by_destination()[0].1.records, 2);
    spool.dead_letter(damaged, 9, "damaged".into(), "unit".into());
    spool.flush().await.unwrap();
    // Still counted: the removal could not tell whose it was.
    assert_eq!(spool.queued_by_destination()[0].1.records, 2);
    let kept_len = read_all(&spool).records[0].stored_len();
    spool.delete(kept, kept_len);
    spool.flush().await.unwrap();
    assert_eq!(spool.queued_by_destination(), vec![]);
    stop(writer).await;
    let (spool, writer) = Spool::open(&config).unwrap();
    assert_eq!(spool.queued_by_destination(), vec![]);
    stop(writer).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kept_parts_say_where_they_end_and_the_request_stored_whole_leaves_its_mark() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, writer) = Spool::open(&config(&dir)).unwrap();
    let conn = 0xfeed_u128;
    let staged = |spool: &Spool| spool.staged(conn).unwrap();
    assert_eq!(staged(&spool), Kept::default(), "nothing kept yet");
    for (offset, stream_end, part) in [(0, 1_005, &b"hello "[..]), (6, 1_010, &b"world"[..])] {
        let rx = spool.stage(conn, offset, stream_end, Bytes::from_static(part));
        timeout(WAIT, rx).await.unwrap().unwrap().unwrap();
    }
    let kept = staged(&spool);
    assert_eq!(kept.prefix, b"hello world");
    assert_eq!(kept.stream_end, Some(1_010), "where the last part ends");
    assert_eq!(spool.staged_connections().unwrap(), vec![conn]);

    // The whole request (11 kept + 4 more bytes) is stored: the parts go, a mark stays.
    let e = entry(1);
    let cost = Spool::cost(Signal::Logs, None, b"t", &e);
    assert!(spool.try_reserve(cost));
    let unstage = Some(Unstage {
        conn,
        stream_end: Some(1_014),
    });
    let rx = spool.append_unstaging(
        Signal::Logs,
        None,
        Bytes::from("t"),
        Bytes::from(e),
        1,
        cost,
        unstage,
    );
    timeout(WAIT, rx).await.unwrap().unwrap().unwrap();
    let mark = staged(&spool);
    assert!(mark.prefix.is_empty(), "a mark keeps no bytes");
    assert_eq!(mark.stream_end, Some(1_014));

    // The next request kept in part replaces the mark.
    let rx = spool.stage(conn, 0, 1_020, Bytes::from_static(b"next"));
    timeout(WAIT, rx).await.unwrap().unwrap().unwrap();
    let kept = staged(&spool);
    assert_eq!(
        (kept.prefix.as_slice(), kept.stream_end),
        (&b"next"[..], Some(1_020))
    );

    // The connection ends: nothing of it stays.
    spool.unstage(conn);
    timeout(WAIT, spool.flush()).await.unwrap().unwrap();
    assert_eq!(staged(&spool), Kept::default());
    assert!(spool.staged_connections().unwrap().is_empty());
    stop(writer).await;
}
