//! `herald topic …`: bulk subscribe, publish, and follow a fan-out from a terminal.
//!
//! These commands are HTTP clients of a running Herald (`--api-url`), not processes of
//! the mesh: an operator subscribing a million users or watching a big publish reach
//! its subscribers should not need curl loops. Long operations draw a progress bar on
//! stderr (plain lines when stderr is not a terminal) and print a JSON summary on stdout,
//! so the commands script well. The fan-out's progress is the one the API shows
//! (`GET /v1/topics/{topic}/publishes/{id}`); the command reads it a few times a second.

use crate::cli::Common;
use crate::config::Settings;
use clap::{Args, Subcommand};
use futures::StreamExt as _;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::time::Duration;

/// The API's most user ids per bulk subscribe request.
const BULK: usize = 10_000;
/// Bulk requests in flight.
const BULK_IN_FLIGHT: usize = 4;
/// How often a followed fan-out's progress is read.
const POLL: Duration = Duration::from_millis(250);

type CliError = Box<dyn std::error::Error + Send + Sync>;

/// `herald topic`.
#[derive(Debug, Clone, Args)]
pub struct TopicArgs {
    /// What to do.
    #[command(subcommand)]
    pub action: TopicAction,
    /// Base URL of Herald's HTTP API.
    #[arg(
        long,
        global = true,
        env = "HERALD_API_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub api_url: String,
    /// Producer API key (scopes publish and read) [env: HERALD_API_KEY]; without it, the
    /// config file's, or the development key `herald up` keeps in its data dir.
    #[arg(long, global = true, value_name = "KEY")]
    pub api_key: Option<String>,
    /// Data directory of `herald up`, for its development key [default: .herald]
    #[arg(long, global = true, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// TOML configuration file.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// `herald topic` actions.
#[derive(Debug, Clone, Subcommand)]
pub enum TopicAction {
    /// Subscribe users to a topic in bulk (10,000 per request), with a progress bar.
    Subscribe {
        /// The topic.
        topic: String,
        /// User ids to subscribe.
        users: Vec<String>,
        /// A file of user ids, one per line (`-` reads stdin); blank lines are skipped.
        #[arg(long, value_name = "FILE")]
        file: Option<PathBuf>,
        /// User ids per request (the API takes at most 10,000).
        #[arg(long, default_value_t = BULK as u64, value_parser = clap::value_parser!(u64).range(1..=BULK as u64))]
        batch: u64,
    },
    /// Publish to a topic, then follow its fan-out to the end with a progress bar.
    Publish {
        /// The topic.
        topic: String,
        /// Title.
        #[arg(long)]
        title: Option<String>,
        /// Body.
        #[arg(long)]
        body: Option<String>,
        /// Channels, comma-separated (inbox, push, email, sms, webhook).
        #[arg(long, value_delimiter = ',')]
        channels: Vec<String>,
        /// Category (preferences and caps apply per category).
        #[arg(long)]
        category: Option<String>,
        /// Lane: high, normal or low.
        #[arg(long)]
        priority: Option<String>,
        /// Any other fields of the publish, as a JSON object (flags win over it).
        #[arg(long, value_name = "JSON")]
        json: Option<String>,
        /// Idempotency key: the same key again gives the same publish, sent once.
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Print the 202 and return without following the fan-out.
        #[arg(long)]
        no_wait: bool,
    },
    /// Follow a publish's fan-out until it is done.
    Progress {
        /// The topic.
        topic: String,
        /// The publish id (from the 202).
        id: String,
    },
    /// How many subscribers a topic has.
    Info {
        /// The topic.
        topic: String,
    },
}

/// Runs a `herald topic` command.
///
/// # Errors
/// When the API key is missing, the API cannot be reached, or it refuses the request
/// (its JSON error is shown).
pub async fn run(args: TopicArgs) -> Result<(), CliError> {
    let client = Client::new(&args)?;
    match args.action {
        TopicAction::Subscribe {
            topic,
            users,
            file,
            batch,
        } => {
            let mut ids = users;
            if let Some(file) = file {
                ids.extend(read_ids(&file)?);
            }
            // At most BULK: the parser's range says so.
            subscribe(&client, &topic, ids, usize::try_from(batch).unwrap_or(BULK)).await
        }
        TopicAction::Publish {
            topic,
            title,
            body,
            channels,
            category,
            priority,
            json: extra,
            idempotency_key,
            no_wait,
        } => {
            let mut doc = match extra {
                Some(text) => match serde_json::from_str::<Value>(&text) {
                    Ok(Value::Object(map)) => map,
                    Ok(_) => return Err("--json must be a JSON object".into()),
                    Err(e) => return Err(format!("--json is not valid JSON: {e}").into()),
                },
                None => serde_json::Map::new(),
            };
            for (field, value) in [
                ("title", title),
                ("body", body),
                ("category", category),
                ("priority", priority),
            ] {
                if let Some(v) = value {
                    doc.insert(field.into(), Value::String(v));
                }
            }
            if !channels.is_empty() {
                doc.insert("channels".into(), json!(channels));
            }
            let answer = client
                .publish(&topic, &Value::Object(doc), idempotency_key.as_deref())
                .await?;
            if no_wait {
                println!("{answer}");
                return Ok(());
            }
            let id = answer["id"]
                .as_str()
                .ok_or("the API's 202 has no publish id")?;
            eprintln!(
                "accepted publish {id} to {topic}: {} subscribers, {} path",
                answer["subscribers"], answer["path"]
            );
            let done = follow(&client, &topic, id).await?;
            println!("{}", json!({"publish": answer, "fanout": done}));
            Ok(())
        }
        TopicAction::Progress { topic, id } => {
            let done = follow(&client, &topic, &id).await?;
            println!("{}", json!({"id": id, "topic": topic, "fanout": done}));
            Ok(())
        }
        TopicAction::Info { topic } => {
            println!("{}", client.get(&topic_path(&topic, "")).await?);
            Ok(())
        }
    }
}

/// An HTTP client of the producer API with its key.
struct Client {
    http: reqwest::Client,
    base: String,
    key: String,
}

impl Client {
    fn new(args: &TopicArgs) -> Result<Self, CliError> {
        let common = Common {
            api_key: args.api_key.clone(),
            data_dir: args.data_dir.clone(),
            config: args.config.clone(),
            ..Common::default()
        };
        let settings = Settings::load(common.config.as_deref(), &common)?;
        let key = settings
            .api_key
            .clone()
            .or_else(|| crate::up::dev_api_key(&settings.data_dir))
            .ok_or(
                "no API key: pass --api-key or set HERALD_API_KEY (with `herald up`, the key \
                 is in <data dir>/credentials.toml and is found by --data-dir)",
            )?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(300))
            .build()?;
        Ok(Self {
            http,
            base: args.api_url.trim_end_matches('/').to_owned(),
            key,
        })
    }

    async fn get(&self, path: &str) -> Result<Value, CliError> {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.key)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        answer(r).await
    }

    async fn post(&self, path: &str, body: &Value, key: Option<&str>) -> Result<Value, CliError> {
        let mut req = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.key)
            .json(body);
        if let Some(key) = key {
            req = req.header("Idempotency-Key", key);
        }
        let r = req.send().await.map_err(|e| self.unreachable(e))?;
        answer(r).await
    }

    async fn publish(
        &self,
        topic: &str,
        doc: &Value,
        key: Option<&str>,
    ) -> Result<Value, CliError> {
        self.post(&topic_path(topic, "/publish"), doc, key).await
    }

    fn unreachable(&self, e: reqwest::Error) -> CliError {
        let mut why = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            why = format!("{why}: {s}");
            source = s.source();
        }
        format!(
            "cannot reach Herald's API at {} ({why}); is it running? (--api-url or HERALD_API_URL)",
            self.base
        )
        .into()
    }
}

/// `/v1/topics/{topic}{rest}`, the topic escaped as one path segment.
fn topic_path(topic: &str, rest: &str) -> String {
    let mut url = reqwest::Url::parse("http://x/v1/topics/").expect("a valid base URL");
    url.path_segments_mut()
        .expect("an http URL has path segments")
        .pop_if_empty()
        .push(topic);
    format!("{}{rest}", url.path())
}

/// The API's JSON answer, or its JSON error as the message.
async fn answer(r: reqwest::Response) -> Result<Value, CliError> {
    let status = r.status();
    let text = r.text().await?;
    if status.is_success() {
        return Ok(serde_json::from_str(&text).unwrap_or(Value::String(text)));
    }
    let why = serde_json::from_str::<Value>(&text)
        .ok()
        .map(|v| v["error"].clone())
        .filter(|e| !e.is_null())
        .map_or(text, |e| e.to_string());
    Err(format!("the API answered {status}: {why}").into())
}

fn read_ids(file: &std::path::Path) -> Result<Vec<String>, CliError> {
    let text = if file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin())?
    } else {
        std::fs::read_to_string(file).map_err(|e| format!("reading {}: {e}", file.display()))?
    };
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect())
}

fn bar(total: u64, template: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

async fn subscribe(
    client: &Client,
    topic: &str,
    ids: Vec<String>,
    batch: usize,
) -> Result<(), CliError> {
    if ids.is_empty() {
        return Err("no user ids: name them, or pass --file".into());
    }
    let total = ids.len();
    let bar = bar(
        total as u64,
        "subscribing [{bar:40}] {pos}/{len} ({per_sec}, eta {eta})",
    );
    let path = topic_path(topic, "/subscribers");
    let mut requests = futures::stream::iter(ids.chunks(batch).map(|chunk| {
        let body = json!({ "user_ids": chunk });
        let path = &path;
        async move {
            client.post(path, &body, None).await?;
            Ok::<_, CliError>(chunk.len())
        }
    }))
    .buffer_unordered(BULK_IN_FLIGHT);
    while let Some(done) = requests.next().await {
        match done {
            Ok(n) => bar.inc(n as u64),
            Err(e) => {
                bar.abandon();
                return Err(e);
            }
        }
    }
    bar.finish();
    let info = client.get(&topic_path(topic, "")).await?;
    println!(
        "{}",
        json!({"topic": topic, "requested": total, "subscribers": info["subscribers"]})
    );
    Ok(())
}

/// Shows a fan-out's progress until its state is `done`; returns the last progress.
async fn follow(client: &Client, topic: &str, id: &str) -> Result<Value, CliError> {
    let path = topic_path(topic, &format!("/publishes/{id}"));
    let bar = bar(
        0,
        "fan-out [{bar:40}] {pos}/{len} subscribers ({per_sec}, eta {eta}) {msg}",
    );
    loop {
        let status = client.get(&path).await?;
        let p = &status["fanout"];
        let total = p["total"].as_u64().unwrap_or(0);
        bar.set_length(total);
        bar.set_position(p["done"].as_u64().unwrap_or(0));
        if let Some(routed) = p["routed"].as_u64().filter(|_| p["path"] == "topic") {
            bar.set_message(format!("{routed} handed on for channel work"));
        }
        if p["state"] == "done" {
            bar.finish();
            return Ok(p.clone());
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::topic_path;

    #[test]
    fn topics_are_one_escaped_path_segment() {
        assert_eq!(topic_path("news", "/publish"), "/v1/topics/news/publish");
        assert_eq!(topic_path("a/b c", ""), "/v1/topics/a%2Fb%20c");
    }
}
