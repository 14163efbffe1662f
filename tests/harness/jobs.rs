//! Watching the router's output: channel jobs as they pass through NATS on their way to
//! the work streams (a core subscription sees every stored publish), whatever the streams.

use anyhow::Context as _;
use futures::StreamExt as _;
use herald_protocol::ChannelJob;
use std::time::Duration;

/// Channel jobs enqueued after this was created.
#[derive(Debug)]
pub struct JobFeed {
    sub: async_nats::Subscriber,
}

impl JobFeed {
    /// Subscribes to every work subject of `herald` (and waits until the server has it).
    ///
    /// # Errors
    /// When NATS does not answer.
    pub async fn open(herald: &crate::Herald) -> anyhow::Result<Self> {
        let client = herald.nats_client().await?;
        let sub = client
            .subscribe(format!("{}.work.>", herald.subjects().prefix()))
            .await?;
        client.flush().await?;
        Ok(Self { sub })
    }

    /// The next job, within `wait`.
    ///
    /// # Errors
    /// On timeout, or a payload that is not a job.
    pub async fn next(&mut self, wait: Duration) -> anyhow::Result<ChannelJob> {
        let msg = crate::within(wait, "the next channel job", self.sub.next())
            .await?
            .context("job subscription closed")?;
        Ok(serde_json::from_slice(&msg.payload)?)
    }
}
