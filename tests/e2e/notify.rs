//! `POST /v1/notify`: 202 only once durable, idempotency, and inbox paging.

use anyhow::{Context as _, ensure};
use herald_tests::{Herald, Nats};
use reqwest::Method;
use serde_json::{Value, json};

fn seqs(page: &Value) -> Vec<u64> {
    page["items"]
        .as_array()
        .map(|items| items.iter().filter_map(|n| n["seq"].as_u64()).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_means_readable_at_once() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    for i in 0..5 {
        let body = json!({"user_id": "alice", "title": format!("hello {i}"), "data": {"i": i}});
        let accepted = herald.accept(&body).await?;
        // No waiting: the 202 promised it is stored.
        let page = herald
            .page("alice", &format!("after={}", accepted.seq - 1))
            .await?;
        let first = &page["items"][0];
        ensure!(
            first["id"] == accepted.id.as_str(),
            "202 {accepted:?} but the inbox starts with {first}"
        );
        assert_eq!(first["seq"], accepted.seq);
        assert_eq!(first["user_id"], "alice");
        assert_eq!(first["title"], format!("hello {i}"));
        assert_eq!(first["data"]["i"], i);
        assert_eq!(first["read"], false);
        assert!(first["created_at"].is_string(), "{first}");
    }
    assert_eq!(herald.inbox("alice").await?.len(), 5);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key_header_returns_the_first_answer() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    let body = json!({"user_id": "carol", "title": "your order shipped"});
    let send = || async {
        herald
            .producer(Method::POST, "/v1/notify")
            .header("Idempotency-Key", "order-42-shipped")
            .json(&body)
            .send()
            .await
            .context("POST /v1/notify")
    };
    let first = herald_tests::herald::accepted(send().await?).await?;
    let second = herald_tests::herald::accepted(send().await?).await?;
    assert_eq!(
        first, second,
        "a repeated Idempotency-Key must return the first id and seq"
    );
    let other = herald.send("carol", "something else").await?;
    assert_ne!(other.id, first.id);
    let ids: Vec<Value> = herald
        .inbox("carol")
        .await?
        .into_iter()
        .map(|n| n["id"].clone())
        .collect();
    assert_eq!(
        ids,
        vec![json!(first.id), json!(other.id)],
        "exactly one copy of the keyed notification"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key_field_works_like_the_header() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    let body = json!({"user_id": "dave", "title": "welcome", "idempotency_key": "welcome-dave"});
    let first = herald.accept(&body).await?;
    let second = herald.accept(&body).await?;
    assert_eq!(first, second);
    let inbox = herald.inbox("dave").await?;
    assert_eq!(inbox.len(), 1, "one copy: {inbox:?}");
    assert_eq!(inbox[0]["id"], first.id.as_str());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_pages_forward_with_after_and_backward_with_before() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    let mut sent = Vec::new();
    for i in 1..=5 {
        sent.push(herald.send("erin", &format!("n{i}")).await?.seq);
        // Another user's notifications interleave in the stream; erin's pages skip them.
        herald.send("frank", &format!("noise {i}")).await?;
    }
    let s = |i: usize| sent[i - 1];

    let page = herald.my_page("erin", "after=0&limit=2").await?;
    assert_eq!(seqs(&page), [s(1), s(2)]);
    assert_eq!(page["has_more"], true, "{page}");
    assert_eq!(page["next_after"], s(2));
    let page = herald
        .my_page("erin", &format!("after={}&limit=2", s(2)))
        .await?;
    assert_eq!(seqs(&page), [s(3), s(4)]);
    assert_eq!(page["has_more"], true, "{page}");
    let page = herald
        .my_page("erin", &format!("after={}&limit=2", s(4)))
        .await?;
    assert_eq!(seqs(&page), [s(5)]);
    assert_eq!(page["has_more"], false, "{page}");
    assert_eq!(page["next_after"], s(5));
    let page = herald
        .my_page("erin", &format!("after={}&limit=2", s(5)))
        .await?;
    assert_eq!(seqs(&page), Vec::<u64>::new());
    assert_eq!(page["has_more"], false, "{page}");
    assert_eq!(page["next_after"], s(5), "an empty page keeps the cursor");

    // Without a cursor: the newest page; then older ones with `before`.
    let page = herald.my_page("erin", "limit=2").await?;
    assert_eq!(seqs(&page), [s(4), s(5)]);
    assert_eq!(page["has_more"], true, "{page}");
    assert_eq!(page["prev_before"], s(4));
    let page = herald
        .my_page("erin", &format!("before={}&limit=2", s(4)))
        .await?;
    assert_eq!(seqs(&page), [s(2), s(3)]);
    assert_eq!(page["has_more"], true, "{page}");
    let page = herald
        .my_page("erin", &format!("before={}&limit=2", s(2)))
        .await?;
    assert_eq!(seqs(&page), [s(1)]);
    assert_eq!(page["has_more"], false, "{page}");

    // A `before` past the stream's last sequence is the newest page too, as a sentinel
    // such as u64::MAX is meant: not an empty inbox (NATS refuses an `up_to_seq` past
    // the stream's end). frank's last notification is the stream's last message.
    let last = herald.send("frank", "the stream's last").await?.seq;
    for before in [last + 1, last + 2, 999_999, u64::MAX] {
        for page in [
            herald
                .my_page("erin", &format!("before={before}&limit=2"))
                .await?,
            herald
                .page("erin", &format!("before={before}&limit=2"))
                .await?,
        ] {
            assert_eq!(seqs(&page), [s(4), s(5)], "before={before}: {page}");
            assert_eq!(page["has_more"], true, "before={before}: {page}");
            assert_eq!(page["prev_before"], s(4), "before={before}: {page}");
        }
    }

    // The producer's view of the same inbox is the same.
    let page = herald.page("erin", "after=0&limit=500").await?;
    assert_eq!(seqs(&page), sent);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_and_live_step_past_undecodable_inbox_messages() -> anyhow::Result<()> {
    let nats = herald_tests::Nats::single().await?;
    let herald = herald_tests::Herald::builder(&nats).start().await?;
    let first = herald.send("quinn", "before junk").await?;
    // Junk written straight into the user's inbox subject (a misconfigured permission).
    let user = herald_protocol::UserId::new("quinn")?;
    let js = async_nats::jetstream::new(herald.nats_client().await?);
    for _ in 0..3 {
        js.publish(
            herald
                .subjects()
                .inbox_entry(&user, herald_protocol::Priority::Normal),
            "not a notification".into(),
        )
        .await?
        .await?;
    }
    let mut ws = herald
        .ws("quinn", herald_tests::Resume::After(first.seq))
        .await?;
    ws.hello().await?;
    let after = herald.send("quinn", "after junk").await?;
    let got = ws.take(1).await?;
    assert_eq!(got[0]["seq"], after.seq, "the live path skipped the junk");
    // A page that holds only junk still moves the cursor on.
    let page = herald
        .page("quinn", &format!("after={}&limit=3", first.seq))
        .await?;
    assert_eq!(page["items"].as_array().map(Vec::len), Some(0), "{page}");
    let next = page["next_after"].as_u64().unwrap_or_default();
    assert!(next > first.seq, "cursor moved: {page}");
    let rest = herald.page("quinn", &format!("after={next}")).await?;
    assert_eq!(rest["items"][0]["seq"], after.seq, "{rest}");
    Ok(())
}
