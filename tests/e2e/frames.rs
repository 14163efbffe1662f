//! Client frames on the WebSocket: garbage is closed with the right code without
//! disturbing anyone else, and `read` frames move the read position.

use anyhow::ensure;
use herald_tests::{Herald, Nats, Resume, eventually};
use reqwest::Method;
use serde_json::{Value, json};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_frames_close_only_their_own_connection() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    let mut bystander = herald.ws("wendy", Resume::Live).await?;
    bystander.hello().await?;

    let oversized = json!({"type": "ack", "up_to": 1, "pad": "x".repeat(17 * 1024)}).to_string();
    let cases = [
        ("binary", Message::binary(vec![1u8, 2, 3]), 1003),
        ("not JSON", Message::text("hello?"), 1007),
        ("unknown type", Message::text(r#"{"type":"explode"}"#), 1008),
        ("missing field", Message::text(r#"{"type":"read"}"#), 1008),
        (
            "negative seq",
            Message::text(r#"{"type":"read","up_to":-1}"#),
            1008,
        ),
        ("over 16 KiB", Message::text(oversized), 1009),
    ];
    for (what, frame, code) in cases {
        let mut ws = herald.ws("mallory", Resume::Live).await?;
        ws.hello().await?;
        ws.send(frame).await?;
        assert_eq!(ws.closed_with().await?, code, "{what} frame");
    }

    // Everyone else is still served, and mallory can come back.
    let n = herald.send("wendy", "still here").await?;
    assert_eq!(bystander.take(1).await?[0]["seq"], n.seq);
    let mut again = herald.ws("mallory", Resume::Live).await?;
    again.hello().await?;
    let n = herald.send("mallory", "welcome back").await?;
    assert_eq!(again.take(1).await?[0]["seq"], n.seq);
    // Well-formed frames keep the connection open.
    again
        .send(Message::text(r#"{"type":"ack","up_to":1}"#))
        .await?;
    again
        .send(Message::text(r#"{"type":"subscribe","topic":"news"}"#))
        .await?;
    // A topic that does not allow self-subscription is answered, not closed.
    let answer = again.next_frame().await?;
    assert_eq!(answer["type"], "subscription", "{answer}");
    assert_eq!(answer["subscribed"], false, "{answer}");
    let n = herald.send("mallory", "still open").await?;
    assert_eq!(again.take(1).await?[0]["seq"], n.seq);
    Ok(())
}

async fn unread(herald: &Herald, user: &str) -> anyhow::Result<Value> {
    let response = herald
        .user(Method::GET, "/v1/me/unread", user)
        .send()
        .await?;
    herald_tests::herald::json_ok(response).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_frame_moves_the_unread_count() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    let mut seqs = Vec::new();
    for i in 0..3 {
        seqs.push(herald.send("xena", &format!("n{i}")).await?.seq);
    }
    assert_eq!(
        unread(&herald, "xena").await?,
        json!({"unread": 3, "last_seq": seqs[2], "seen_seq": 0})
    );
    let mut ws = herald.ws("xena", Resume::After(0)).await?;
    assert_eq!(ws.hello().await?["unread"], 3);
    ws.take(3).await?;

    ws.send(Message::text(
        json!({"type": "read", "up_to": seqs[1]}).to_string(),
    ))
    .await?;
    // The connection stays open after a read frame.
    let n = herald.send("xena", "n3").await?;
    assert_eq!(ws.take(1).await?[0]["seq"], n.seq);
    seqs.push(n.seq);
    eventually(Duration::from_secs(5), "unread drops to 2", || async {
        let now = unread(&herald, "xena").await?;
        ensure!(
            now == json!({"unread": 2, "last_seq": seqs[3], "seen_seq": 0}),
            "{now}"
        );
        Ok(())
    })
    .await?;
    let page = herald.my_page("xena", "after=0").await?;
    let read: Vec<&Value> = page["items"]
        .as_array()
        .map(|i| i.iter().map(|n| &n["read"]).collect())
        .unwrap_or_default();
    assert_eq!(
        read,
        [&json!(true), &json!(true), &json!(false), &json!(false)],
        "{page}"
    );
    // Reading never moves backwards.
    ws.send(Message::text(
        json!({"type": "read", "up_to": seqs[0]}).to_string(),
    ))
    .await?;
    // A read past the newest notification stops at the newest, so later ones stay unread.
    ws.send(Message::text(
        json!({"type": "read", "up_to": 1_000_000}).to_string(),
    ))
    .await?;
    eventually(Duration::from_secs(5), "everything read", || async {
        let now = unread(&herald, "xena").await?;
        ensure!(now["unread"] == 0, "{now}");
        Ok(())
    })
    .await?;
    let n = herald.send("xena", "new").await?;
    assert_eq!(
        unread(&herald, "xena").await?,
        json!({"unread": 1, "last_seq": n.seq, "seen_seq": 0})
    );
    // Another user's read position is untouched.
    herald.send("yuri", "hi").await?;
    assert_eq!(unread(&herald, "yuri").await?["unread"], 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_flood_closes_only_the_flooding_connection() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    let mut calm = herald.ws("xena", Resume::Live).await?;
    calm.hello().await?;
    let mut flood = herald.ws("yuri", Resume::Live).await?;
    flood.hello().await?;
    // Far past the default 50 frames/s (bursts of 100).
    for _ in 0..300 {
        if flood
            .send(Message::text(r#"{"type":"ack","up_to":0}"#))
            .await
            .is_err()
        {
            break;
        }
    }
    assert_eq!(flood.closed_with().await?, 1008);
    let n = herald.send("xena", "unaffected").await?;
    assert_eq!(calm.take(1).await?[0]["seq"], n.seq);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_on_one_device_reaches_the_others_live() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    let mut phone = herald.ws("zoe", Resume::Live).await?;
    phone.hello().await?;
    let mut laptop = herald.ws("zoe", Resume::Live).await?;
    laptop.hello().await?;
    let mut stranger = herald.ws("zed", Resume::Live).await?;
    stranger.hello().await?;
    let a = herald.send("zoe", "one").await?;
    let b = herald.send("zoe", "two").await?;
    assert_eq!(phone.take(2).await?.len(), 2);
    assert_eq!(laptop.take(2).await?.len(), 2);

    // Read on the phone: every device of the user is told, the phone included.
    let read = json!({"type": "read", "up_to": a.seq}).to_string();
    phone.send(Message::text(read)).await?;
    for device in [&mut phone, &mut laptop] {
        let frame = device.next_frame().await?;
        assert_eq!(frame, json!({"type": "read", "up_to": a.seq}));
    }

    // Read over HTTP: both devices are told.
    let resp = herald
        .user(Method::POST, "/v1/me/read", "zoe")
        .json(&json!({"up_to": b.seq}))
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    for device in [&mut phone, &mut laptop] {
        let frame = device.next_frame().await?;
        assert_eq!(frame, json!({"type": "read", "up_to": b.seq}));
    }
    // Another user hears nothing of it: the next frame they get is their own notification.
    let own = herald.send("zed", "mine").await?;
    assert_eq!(stranger.take(1).await?[0]["seq"], own.seq);
    Ok(())
}

/// A text frame that is not UTF-8 is closed with 1007 (RFC 6455 §7.4.1, invalid payload
/// data) and a reason, as a non-JSON one is; the connection is not just dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_frame_that_is_not_utf8_is_closed_with_1007() -> anyhow::Result<()> {
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    let mut ws = herald.ws("mallory", Resume::Live).await?;
    ws.hello().await?;
    let bad = Frame::message(vec![0x7b, 0xff, 0xfe, 0x7d], OpCode::Data(Data::Text), true);
    ws.send(Message::Frame(bad)).await?;
    assert_eq!(ws.closed_with().await?, 1007, "invalid UTF-8 text frame");
    Ok(())
}
