//! Newest-first inbox pages (`GET …/notifications` without `after`, and `?before=`): the
//! newest `limit` of the view — every lane of the user's own inbox and the big topics
//! they follow, merged — in a few direct gets whatever `limit` is, and page by page the
//! same notifications, in the same order, as reading the inbox forward.

use anyhow::{Context as _, ensure};
use futures::StreamExt as _;
use herald_protocol::{TopicId, UserId};
use herald_tests::{Herald, Nats, eventually, seqs, within};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use std::time::Duration;

const USER: &str = "yan";
const TOPIC: &str = "weekly";

/// Counts the direct gets of the INBOX stream that read `USER`'s lanes or `TOPIC`'s:
/// every request on the subject reaches a plain subscriber too, besides the stream's
/// responders.
struct Reads {
    client: async_nats::Client,
    counted: tokio::sync::mpsc::UnboundedReceiver<usize>,
}

const SUBJECT: &str = "$JS.API.DIRECT.GET.HERALD_INBOX";
const MARK: &[u8] = b"end of the counted reads";

impl Reads {
    async fn start(herald: &Herald) -> anyhow::Result<Reads> {
        let client = herald.nats_client().await?;
        let user = UserId::new(USER)?.token().as_str().to_owned();
        let topic = TopicId::new(TOPIC)?.token();
        let mut requests = client.subscribe(SUBJECT).await?;
        client.flush().await?;
        let (tx, counted) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut count = 0;
            while let Some(request) = requests.next().await {
                if request.payload.as_ref() == MARK {
                    let _ = tx.send(count);
                    continue;
                }
                let body = String::from_utf8_lossy(&request.payload);
                if body.contains(&user) || body.contains(&topic) {
                    count += 1;
                }
            }
        });
        Ok(Reads { client, counted })
    }

    /// The reads so far. Herald sent each before the answer that needed it came back,
    /// so the server had them before this mark, and delivers them before it.
    async fn so_far(&mut self) -> anyhow::Result<usize> {
        self.client.publish(SUBJECT, MARK.into()).await?;
        within(Duration::from_secs(10), "the mark", self.counted.recv())
            .await?
            .context("counting ended")
    }
}

/// 700 notifications over the user's four lanes, with 28 publishes of a big topic they
/// follow in between.
async fn fill(herald: &Herald) -> anyhow::Result<()> {
    let subscribed = herald
        .producer(
            Method::PUT,
            &format!("/v1/topics/{TOPIC}/subscribers/{USER}"),
        )
        .send()
        .await?;
    ensure!(subscribed.status().is_success(), "{}", subscribed.status());
    for chunk in 0..7 {
        let items: Vec<Value> = (0..100)
            .map(|i| {
                let n = chunk * 100 + i;
                let mut item = json!({"user_id": USER, "title": format!("n{n}")});
                // Every lane: inbox only, and the three priority lanes (channel work).
                match n % 4 {
                    0 => item["channels"] = json!(["inbox"]),
                    lane => {
                        item["channels"] = json!(["inbox", "push"]);
                        item["priority"] = json!(["high", "normal", "low"][lane - 1]);
                    }
                }
                item
            })
            .collect();
        let response = herald
            .producer(Method::POST, "/v1/notify/batch")
            .json(&json!({ "notifications": items }))
            .send()
            .await?;
        let body: Value = response.json().await?;
        ensure!(body["accepted"] == 100, "{body}");
        for p in 0..4 {
            let published = herald
                .producer(Method::POST, &format!("/v1/topics/{TOPIC}/publish"))
                .json(&json!({"title": format!("t{chunk}.{p}"), "channels": ["inbox"]}))
                .send()
                .await?;
            ensure!(
                published.status() == StatusCode::ACCEPTED,
                "{}",
                published.status()
            );
        }
    }
    Ok(())
}

/// Sends `items` in batches of 1,000.
async fn send_all(herald: &Herald, items: Vec<Value>) -> anyhow::Result<()> {
    for chunk in items.chunks(1000) {
        let body: Value = herald
            .producer(Method::POST, "/v1/notify/batch")
            .json(&json!({ "notifications": chunk }))
            .send()
            .await?
            .json()
            .await?;
        ensure!(body["accepted"] == chunk.len(), "{body}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_inbox_pages_back_in_a_few_reads_a_page() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    // 2,400 of the user's among 3,000 of others, unevenly: a stretch of theirs alone,
    // one in ten among others', then alone again.
    let mut items = Vec::new();
    let mut mine = 0;
    for i in 0..5400 {
        let theirs = match i {
            0..1200 => true,
            1200..4200 => i % 10 == 0,
            _ => true,
        };
        let user = if theirs { USER } else { "someone-else" };
        if theirs {
            mine += 1;
        }
        items.push(json!({"user_id": user, "title": format!("n{i}"), "channels": ["inbox"]}));
    }
    send_all(&herald, items).await?;
    let forward = herald.inbox(USER).await?;
    ensure!(forward.len() == mine, "{} of {mine}", forward.len());

    let mut reads = Reads::start(&herald).await?;
    let mut back: Vec<Value> = Vec::new();
    let mut query = "limit=20".to_owned();
    let mut most = 0;
    for _ in 0..150 {
        let before = reads.so_far().await?;
        let page = herald.page(USER, &query).await?;
        let took = reads.so_far().await? - before;
        most = most.max(took);
        let items = page["items"].as_array().context("items")?;
        let mut older = items.clone();
        older.extend(back);
        back = older;
        if page["has_more"] != true {
            break;
        }
        let before = page["prev_before"].as_u64().context("prev_before")?;
        query = format!("before={before}&limit=20");
    }
    let ids = |items: &[Value]| -> Vec<Value> { items.iter().map(|n| n["id"].clone()).collect() };
    ensure!(
        ids(&back) == ids(&forward),
        "paged back: {} items, forward: {}",
        back.len(),
        forward.len()
    );
    eprintln!("pages of 20 back through {mine}: at most {most} direct gets a page");
    // Walking back one message at a time took 21 a page.
    ensure!(most <= 8, "{most} direct gets for a page of 20");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newest_first_pages_take_a_few_reads_and_match_the_forward_read() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats)
        .topics(herald_api::TopicSettings {
            big_threshold: 0,
            ..Default::default()
        })
        .start()
        .await?;
    fill(&herald).await?;
    let forward = eventually(
        Duration::from_secs(20),
        "every notification and publish in the view",
        || async {
            let all = herald.inbox(USER).await?;
            ensure!(all.len() == 728, "{} so far", all.len());
            Ok(all)
        },
    )
    .await?;
    let ids = |items: &[Value]| -> Vec<String> {
        items
            .iter()
            .map(|n| n["id"].as_str().unwrap_or_default().to_owned())
            .collect()
    };

    // The newest 500, counted.
    let mut reads = Reads::start(&herald).await?;
    let started = std::time::Instant::now();
    let page = herald.page(USER, "limit=500").await?;
    let elapsed = started.elapsed();
    let newest = reads.so_far().await?;
    let items = page["items"].as_array().context("items")?;
    ensure!(
        ids(items) == ids(&forward[228..]),
        "the newest 500, oldest first: {:?}…",
        &seqs(items)[..5]
    );
    ensure!(page["has_more"] == true, "{}", page["has_more"]);
    eprintln!(
        "newest-first page of 500 over 4 lanes and a big topic: {newest} direct gets, {elapsed:?}"
    );
    // Walking back one message at a time took 501 for the user's lanes alone.
    ensure!(newest <= 40, "{newest} direct gets for one page");

    // Page back from there with `before`, 37 at a time, to the start.
    let mut back: Vec<Value> = items.clone();
    let mut before = page["prev_before"].as_u64().context("prev_before")?;
    loop {
        let page = herald
            .page(USER, &format!("before={before}&limit=37"))
            .await?;
        let items = page["items"].as_array().context("items")?;
        let mut older = items.clone();
        older.extend(back);
        back = older;
        if page["has_more"] != true {
            break;
        }
        before = page["prev_before"].as_u64().context("prev_before")?;
    }
    ensure!(
        ids(&back) == ids(&forward),
        "paged back: {} items, forward: {}",
        back.len(),
        forward.len()
    );
    Ok(())
}
