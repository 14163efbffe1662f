//! Reads by stream sequence in runs (`herald_store::direct::by_seqs`) against a real
//! nats-server: every stored message asked for comes back once; deleted ones (at a run's
//! start, inside it, at its end) and ones past the stream's end are absent; nothing that
//! was not asked for is returned. `Inbox::entries_at`, what a worker's batch reads its
//! inbox entries with, calls what neither the direct read nor the stream leader has
//! gone. A worker's check of a target its batch read did not find
//! (`Targets::find_at_leader`) follows registrations, removals and erasure.

use anyhow::Context as _;
use async_nats::jetstream::{self, stream};
use herald_protocol::StoredNotification;
use herald_store::InboxEntry;
use herald_store::direct::by_seqs;
use herald_tests::{Herald, Nats};

#[tokio::test]
async fn reads_by_sequence_return_exactly_the_stored_messages_asked_for() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let client = nats.client().await?;
    let js = jetstream::new(client.clone());
    let stream = js
        .create_stream(stream::Config {
            name: "READS".into(),
            subjects: vec!["reads.>".into()],
            allow_direct: true,
            ..Default::default()
        })
        .await?;
    // 1..=600 over many subjects, as an inbox holds many users.
    for i in 1..=600u64 {
        js.publish(format!("reads.u{}", i % 7), i.to_string().into())
            .await?
            .await?;
    }
    // Runs of the wanted sequences below: 10..=25, 40..=295, 296..=301, 598..=601, 9999.
    // Deleted: the first of a run (10, 40, 296), inside one (11, 12, 20, 300), the last
    // wanted of one (25); 601 and 9999 are past the end.
    let deleted = [10, 11, 12, 20, 25, 40, 296, 300];
    for seq in deleted {
        stream.delete_message(seq).await?;
    }

    let wanted: Vec<u64> = [10, 11, 12, 13, 20, 21, 25, 300, 301, 598, 600, 601, 9_999]
        .into_iter()
        .chain(40..=299) // a run wider than one batch
        .chain([13, 13, 0]) // asked for twice; never stored
        .collect();
    let mut found = std::collections::HashMap::new();
    for run in by_seqs(&client, "READS", &wanted).await {
        for msg in run.read? {
            assert!(run.seqs.contains(&msg.seq), "{} is of its run", msg.seq);
            assert!(found.insert(msg.seq, msg).is_none(), "returned once");
        }
    }

    let mut expected: Vec<u64> = wanted
        .iter()
        .copied()
        .filter(|s| (1..=600).contains(s) && !deleted.contains(s))
        .collect();
    expected.sort_unstable();
    expected.dedup();
    let mut got: Vec<u64> = found.keys().copied().collect();
    got.sort_unstable();
    assert_eq!(got, expected);
    for (seq, msg) in &found {
        assert_eq!(msg.seq, *seq);
        let body = std::str::from_utf8(&msg.payload).context("payload")?;
        assert_eq!(body, seq.to_string(), "the message stored at {seq}");
    }
    assert!(by_seqs(&client, "READS", &[0]).await.is_empty());
    Ok(())
}

#[tokio::test]
async fn inbox_entries_are_found_by_sequence_and_deleted_ones_are_gone() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    let mut sent = Vec::new();
    for (user, title) in [("ann", "one"), ("bob", "two"), ("ann", "three")] {
        sent.push(herald.send(user, title).await?);
    }
    // The second is gone (as after an erase); 10,000 was never written.
    let js = jetstream::new(herald.nats_client().await?);
    js.get_stream(herald_protocol::streams::INBOX)
        .await?
        .delete_message(sent[1].seq)
        .await?;

    let inbox = herald.store_inbox("entries-test").await?;
    let wanted: Vec<u64> = sent.iter().map(|a| a.seq).chain([10_000]).collect();
    let entries = inbox.entries_at(&wanted).await;

    assert_eq!(entries.len(), 4, "one answer per sequence: {entries:?}");
    for accepted in [&sent[0], &sent[2]] {
        let Some(InboxEntry::Stored(bytes)) = entries.get(&accepted.seq) else {
            anyhow::bail!("{} not stored: {entries:?}", accepted.seq);
        };
        let stored: StoredNotification = serde_json::from_slice(bytes)?;
        assert_eq!(stored.id, accepted.id);
    }
    for gone in [sent[1].seq, 10_000] {
        assert!(
            matches!(entries.get(&gone), Some(InboxEntry::Gone)),
            "{gone} is gone: {entries:?}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_target_is_found_at_the_leader_until_it_is_removed() -> anyhow::Result<()> {
    use herald_channels::Platform;
    use herald_protocol::{Channel, UserId};
    use herald_store::targets::{ContactKeys, Targets, target_id};

    let nats = Nats::single().await?;
    let _provisioned = Herald::builder(&nats).start().await?;
    let store = herald_store::connect(&nats.url(), "targets-test").await?;
    let targets = Targets::open(&store.js, ContactKeys::new([7; 32], &[])).await?;
    let user = UserId::new("cleo".to_owned())?;
    targets.add_device(&user, Platform::Ios, "tok-1").await?;
    let registered = targets.targets(&user, Channel::Push).await?;
    let id = target_id(registered.first().context("the registered device")?);
    let at_leader = |user: UserId| {
        let (targets, id) = (&targets, &id);
        async move { targets.find_at_leader(&user, Channel::Push, id).await }
    };

    let found = at_leader(user.clone()).await?;
    assert_eq!(found.as_ref().map(target_id), Some(id.clone()));
    assert!(
        at_leader(UserId::new("nobody".to_owned())?)
            .await?
            .is_none()
    );
    targets.remove_device(&user, "tok-1").await?;
    assert!(at_leader(user.clone()).await?.is_none());
    // Registered again, then erased (a KV purge marker, not an empty list).
    targets.add_device(&user, Platform::Ios, "tok-1").await?;
    assert!(at_leader(user.clone()).await?.is_some());
    targets.erase(&user).await?;
    assert!(at_leader(user).await?.is_none());
    Ok(())
}
