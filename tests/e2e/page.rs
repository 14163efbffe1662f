//! The demo page at `/` in a real headless Chromium (Debian's `chromium`, driven over the
//! DevTools protocol), in two tabs of one user — WebSocket and SSE (EventSource): log in,
//! receive a notification sent through the API, mark it read in one tab and see both
//! badges go to 0, and survive a restart of the Herald serving the page without losing or
//! repeating one; and hold one connection however quickly Connect is clicked.

use anyhow::{Context as _, ensure};
use chromiumoxide::browser::{Browser, BrowserConfig};
use chromiumoxide::page::Page;
use futures::StreamExt as _;
use herald::mesh::Roles;
use herald_tests::{Herald, Nats, eventually, within};
use reqwest::Method;
use serde_json::Value;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

/// Bound on the page reacting to one thing.
const PAGE_WAIT: Duration = Duration::from_secs(15);
/// Bound on the page catching up after a restart (the server spreads reconnects over 5 s).
const RESTART_WAIT: Duration = Duration::from_secs(45);

/// `HERALD_CHROMIUM`, else `chromium` on PATH, else `/usr/bin/chromium`.
fn chromium() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("HERALD_CHROMIUM") {
        return Ok(PathBuf::from(path));
    }
    let on_path = std::env::var_os("PATH").into_iter().flat_map(|p| {
        std::env::split_paths(&p)
            .flat_map(|dir| ["chromium", "chromium-browser"].map(|name| dir.join(name)))
            .collect::<Vec<_>>()
    });
    on_path
        .chain([PathBuf::from("/usr/bin/chromium")])
        .find(|p| p.is_file())
        .context("chromium not found: run scripts/install-test-deps.sh (apt-get install chromium) or set HERALD_CHROMIUM")
}

/// A headless Chromium that is killed when dropped.
struct Chromium {
    browser: Browser,
    handler: tokio::task::JoinHandle<()>,
    _profile: tempfile::TempDir,
}

impl Chromium {
    async fn launch() -> anyhow::Result<Chromium> {
        let profile = tempfile::tempdir().context("profile dir")?;
        let config = BrowserConfig::builder()
            .chrome_executable(chromium()?)
            .user_data_dir(profile.path())
            // Tests run as root in containers, where Chromium's sandbox cannot start.
            .no_sandbox()
            .arg("--disable-dev-shm-usage")
            .arg("--disable-gpu")
            .launch_timeout(Duration::from_secs(30))
            .request_timeout(Duration::from_secs(15))
            .build()
            .map_err(anyhow::Error::msg)?;
        let (browser, mut handler) = Browser::launch(config)
            .await
            .context("launching chromium")?;
        // The handler drives the DevTools connection; events it cannot parse are not fatal.
        let handler = tokio::spawn(async move { while handler.next().await.is_some() {} });
        Ok(Chromium {
            browser,
            handler,
            _profile: profile,
        })
    }

    async fn close(mut self) {
        let _ = within(
            Duration::from_secs(10),
            "closing chromium",
            self.browser.close(),
        )
        .await;
        let _ = within(
            Duration::from_secs(10),
            "chromium exit",
            self.browser.wait(),
        )
        .await;
        self.handler.abort();
    }
}

/// Evaluates `expression` in the page and returns its JSON value.
async fn eval(page: &Page, expression: &str) -> anyhow::Result<Value> {
    page.evaluate(expression)
        .await
        .with_context(|| format!("evaluating {expression}"))?
        .into_value::<Value>()
        .context("result is not JSON")
}

/// What the page shows: `{state, transport, reconnects, badge, items: [{id, seq, unread}]}`.
async fn snapshot(page: &Page) -> anyhow::Result<Value> {
    eval(
        page,
        r#"({
            state: document.getElementById('state').dataset.state ?? null,
            transport: document.getElementById('state').dataset.transport ?? null,
            reconnects: Number(document.getElementById('state').dataset.reconnects ?? 0),
            badge: document.getElementById('badge').hidden ? 0 : Number(document.getElementById('badge').textContent),
            items: [...document.querySelectorAll('#list li')].map((li) => ({
                id: li.dataset.id, seq: Number(li.dataset.seq), unread: li.classList.contains('unread'),
            })),
        })"#,
    )
    .await
}

fn ids(snapshot: &Value) -> Vec<String> {
    snapshot["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|i| i["id"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Keeps every WebSocket the page makes in `window.sockets` (run before the page's own
/// scripts).
const RECORD_SOCKETS: &str = r"
    window.sockets = [];
    const Native = window.WebSocket;
    window.WebSocket = class extends Native {
        constructor(...args) { super(...args); window.sockets.push(this); }
    };
";

/// Connect clicked twice in a row — the second click comes while the first is still
/// waiting for its token — leaves one connection: the second click's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_clicked_twice_holds_one_connection() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).dev_mode().start().await?;
    let user = "clicks twice";
    let chromium = Chromium::launch().await?;
    let result = async {
        let tab = chromium.browser.new_page("about:blank").await?;
        tab.evaluate_on_new_document(RECORD_SOCKETS).await?;
        tab.goto(format!("{}/", herald.base_url())).await?;
        eval(
            &tab,
            &format!(
                "document.getElementById('user').value = {}; \
                 document.getElementById('connect').click(); \
                 document.getElementById('connect').click(); true",
                Value::from(user)
            ),
        )
        .await?;
        eventually(PAGE_WAIT, "the page goes live", || async {
            let s = snapshot(&tab).await?;
            ensure!(s["state"] == "live" && s["transport"] == "ws", "{s}");
            Ok(())
        })
        .await?;
        // A delivery end to end: a connection of the first click, had one been made, would
        // be open by now as well (both clicks waited for the same two requests).
        let n = herald.send(user, "one connection").await?;
        eventually(PAGE_WAIT, "the notification is shown", || async {
            let s = snapshot(&tab).await?;
            ensure!(ids(&s) == [n.id.clone()], "{s}");
            Ok(())
        })
        .await?;
        let sockets = eval(&tab, "window.sockets.map((s) => s.readyState)").await?;
        assert_eq!(
            sockets,
            serde_json::json!([1]),
            "one WebSocket, open (readyState of each the page made)"
        );
        anyhow::Ok(())
    }
    .await;
    chromium.close().await;
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_receives_marks_read_and_survives_a_restart_in_chromium() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let mut herald = Herald::builder(&nats).dev_mode().start().await?;
    // A second API process on the same NATS: producers keep sending while the one serving
    // the page restarts.
    let producer = Herald::builder(&nats)
        .roles(Roles {
            api: true,
            gateway: false,
            router: false,
            ingest: false,
        })
        .start()
        .await?;
    let user = "page user ✓";
    let chromium = Chromium::launch().await?;
    let result = async {
        // Two tabs of the same user: one on WebSocket (the default), one on SSE (the
        // browser's EventSource, token in the query).
        let base = format!("{}/?user={}", herald.base_url(), herald_tests::encode(user));
        let mut tabs = Vec::new();
        for (url, transport) in [
            (base.clone(), "ws"),
            (format!("{base}&transport=sse"), "sse"),
        ] {
            let tab = chromium
                .browser
                .new_page(url.as_str())
                .await
                .context("opening the page")?;
            eventually(PAGE_WAIT, "the page goes live", || async {
                let s = snapshot(&tab).await?;
                ensure!(s["state"] == "live" && s["transport"] == transport, "{s}");
                Ok(())
            })
            .await?;
            tabs.push((tab, transport));
        }

        // A notification through the API appears, unread, in both.
        let first = herald.send(user, "hello from the API").await?;
        for (tab, _) in &tabs {
            eventually(PAGE_WAIT, "the notification is shown, unread", || async {
                let s = snapshot(tab).await?;
                ensure!(ids(&s) == [first.id.clone()], "{s}");
                ensure!(s["items"][0]["unread"] == true && s["badge"] == 1, "{s}");
                Ok(())
            })
            .await?;
            let title = eval(tab, "document.querySelector('#list li .t').textContent").await?;
            assert_eq!(title, "hello from the API");
        }

        // Mark read in the first tab: the badge goes to 0 there, in the other tab (a read
        // event), and the server agrees.
        let (page, _) = &tabs[0];
        // Real input goes to the tab in front (the SSE tab was opened last).
        page.bring_to_front().await?;
        page.find_element("#mark-read").await?.click().await?;
        for (tab, _) in &tabs {
            eventually(PAGE_WAIT, "the badge goes to 0", || async {
                let s = snapshot(tab).await?;
                ensure!(s["badge"] == 0 && s["items"][0]["unread"] == false, "{s}");
                Ok(())
            })
            .await?;
        }
        eventually(PAGE_WAIT, "GET /v1/me/unread agrees", || async {
            let body: Value = herald
                .user(Method::GET, "/v1/me/unread", user)
                .send()
                .await?
                .json()
                .await?;
            ensure!(
                body["unread"] == 0 && body["last_seq"] == first.seq,
                "{body}"
            );
            Ok(())
        })
        .await?;

        // Restart the Herald serving the page while notifications keep coming.
        let mut sent = vec![first];
        sent.push(producer.send(user, "just before the restart").await?);
        herald.stop().await?;
        for i in 0..5 {
            sent.push(
                producer
                    .send(user, &format!("during the restart {i}"))
                    .await?,
            );
        }
        herald.start_again().await?;
        for i in 0..3 {
            sent.push(
                producer
                    .send(user, &format!("after the restart {i}"))
                    .await?,
            );
        }
        sent.push(herald.send(user, "through the restarted one").await?);

        let mut expected: Vec<u64> = sent.iter().map(|n| n.seq).collect();
        expected.sort_unstable_by(|a, b| b.cmp(a));
        for (tab, transport) in &tabs {
            let shown = eventually(RESTART_WAIT, "every notification shown", || async {
                let s = snapshot(tab).await?;
                let shown = ids(&s);
                ensure!(
                    shown.len() >= sent.len() && s["state"] == "live",
                    "{} of {} shown: {s}",
                    shown.len(),
                    sent.len()
                );
                Ok(s)
            })
            .await?;
            assert_eq!(
                shown["transport"], *transport,
                "a restart is no reason to change transport: {shown}"
            );
            assert!(
                shown["reconnects"].as_u64() >= Some(1),
                "the page really reconnected: {shown}"
            );
            let mut counts: HashMap<String, usize> = HashMap::new();
            for id in ids(&shown) {
                *counts.entry(id).or_default() += 1;
            }
            for n in &sent {
                assert_eq!(
                    counts.get(&n.id),
                    Some(&1),
                    "{transport}: {} (seq {}) shown exactly once: {shown}",
                    n.id,
                    n.seq
                );
            }
            assert_eq!(
                counts.len(),
                sent.len(),
                "{transport}: nothing else shown: {shown}"
            );
            // Newest first, strictly by seq.
            let seqs: Vec<u64> = shown["items"]
                .as_array()
                .context("items")?
                .iter()
                .filter_map(|i| i["seq"].as_u64())
                .collect();
            assert_eq!(seqs, expected, "{transport}");
            // Everything after the read position is unread, and the badge says so.
            assert_eq!(shown["badge"], sent.len() - 1, "{transport}: {shown}");
        }
        anyhow::Ok(())
    }
    .await;
    chromium.close().await;
    result
}
