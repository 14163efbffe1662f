//! Reads a worker makes before it drops a job as gone, against a real nats-server:
//! `Inbox::entry_at` calls gone only what neither a direct get nor the stream leader has,
//! and `Targets::find_at_leader` (for a target a batch's read did not find) follows
//! registrations, removals and erasure.

use anyhow::Context as _;
use async_nats::jetstream;
use herald_protocol::StoredNotification;
use herald_store::InboxEntry;
use herald_tests::{Herald, Nats};

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
    for accepted in [&sent[0], &sent[2]] {
        let InboxEntry::Stored(bytes) = inbox.entry_at(accepted.seq).await else {
            anyhow::bail!("{} is not stored", accepted.seq);
        };
        let stored: StoredNotification = serde_json::from_slice(&bytes)?;
        assert_eq!(stored.id, accepted.id);
    }
    for gone in [sent[1].seq, 10_000] {
        let entry = inbox.entry_at(gone).await;
        assert!(matches!(entry, InboxEntry::Gone), "{gone}: {entry:?}");
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
