//! A real [`Provider`] whose answers a test scripts: each send takes the next scripted
//! answer (then the fallback), and every call is recorded with its time, so tests can see
//! how the worker runtime reacts to each error class.

use herald_channels::{Delivery, Platform, Provider, SendError, Sent, Target};
use herald_protocol::Channel;
use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// One scripted answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Accept.
    Ok,
    /// 429 with `Retry-After`.
    Throttled(Duration),
    /// 5xx.
    Transient,
    /// 503 with `Retry-After`.
    Unavailable(Duration),
    /// 400.
    Permanent,
    /// Unregistered token.
    InvalidTarget,
}

/// A recorded call.
#[derive(Debug, Clone)]
pub struct Call {
    /// When.
    pub at: Instant,
    /// What.
    pub delivery: Delivery,
    /// The answer given.
    pub answer: Answer,
}

/// The scripted provider.
#[derive(Debug)]
pub struct Scripted {
    name: String,
    channel: Channel,
    script: Mutex<VecDeque<Answer>>,
    fallback: Mutex<Answer>,
    delay: Mutex<Duration>,
    calls: Mutex<Vec<Call>>,
    by_title: Mutex<std::collections::HashMap<String, Answer>>,
    platform: Option<Platform>,
}

impl Scripted {
    /// A provider `name` on `channel` that answers `Ok` unless scripted otherwise.
    pub fn new(name: &str, channel: Channel) -> Self {
        Self {
            name: name.to_string(),
            channel,
            script: Mutex::new(VecDeque::new()),
            fallback: Mutex::new(Answer::Ok),
            delay: Mutex::new(Duration::ZERO),
            calls: Mutex::new(Vec::new()),
            by_title: Mutex::default(),
            platform: None,
        }
    }

    /// A push provider `name` that takes devices of `platform` only (as APNs takes iOS
    /// tokens and FCM Android ones).
    pub fn for_platform(name: &str, platform: Platform) -> Self {
        Self {
            platform: Some(platform),
            ..Self::new(name, Channel::Push)
        }
    }

    /// Always answers sends of notifications titled `title` with `answer` (whatever
    /// their order among concurrent sends), ahead of the script.
    pub fn answer_title(&self, title: &str, answer: Answer) {
        self.by_title
            .lock()
            .expect("by_title lock")
            .insert(title.to_string(), answer);
    }

    /// Queues answers for the next sends.
    pub fn script(&self, answers: impl IntoIterator<Item = Answer>) {
        self.script.lock().expect("script lock").extend(answers);
    }

    /// The answer once the script is used up.
    pub fn fallback(&self, answer: Answer) {
        *self.fallback.lock().expect("fallback lock") = answer;
    }

    /// Each send takes this long.
    pub fn delay(&self, delay: Duration) {
        *self.delay.lock().expect("delay lock") = delay;
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().expect("calls lock").clone()
    }

    /// Calls for notification `id`.
    pub fn calls_for(&self, id: &str) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| c.delivery.id == id)
            .collect()
    }
}

#[async_trait::async_trait]
impl Provider for Scripted {
    fn name(&self) -> &str {
        &self.name
    }

    fn channel(&self) -> Channel {
        self.channel
    }

    fn accepts(&self, target: &Target) -> bool {
        if let (Some(only), Target::Device { platform, .. }) = (self.platform, target)
            && *platform != only
        {
            return false;
        }
        matches!(
            (self.channel, target),
            (Channel::Push, Target::Device { .. })
                | (Channel::Email, Target::Email { .. })
                | (Channel::Sms, Target::Phone { .. })
                | (Channel::Webhook, Target::Webhook { .. })
        )
    }

    async fn send(&self, delivery: &Delivery) -> Result<Sent, SendError> {
        let delay = *self.delay.lock().expect("delay lock");
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let by_title = delivery
            .title
            .as_ref()
            .and_then(|t| self.by_title.lock().expect("by_title lock").get(t).cloned());
        let answer = match by_title {
            Some(a) => a,
            None => self
                .script
                .lock()
                .expect("script lock")
                .pop_front()
                .unwrap_or_else(|| self.fallback.lock().expect("fallback lock").clone()),
        };
        self.calls.lock().expect("calls lock").push(Call {
            at: Instant::now(),
            delivery: delivery.clone(),
            answer: answer.clone(),
        });
        match answer {
            Answer::Ok => Ok(Sent {
                provider_message_id: Some(format!("{}-{}", self.name, delivery.id)),
            }),
            Answer::Throttled(d) => Err(SendError::Throttled {
                retry_after: Some(d),
                detail: "429 Too Many Requests".into(),
            }),
            Answer::Transient => Err(SendError::transient("503 Service Unavailable")),
            Answer::Unavailable(d) => Err(SendError::Transient {
                detail: "503 Service Unavailable".into(),
                retry_after: Some(d),
            }),
            Answer::Permanent => Err(SendError::Permanent {
                detail: "400 InvalidPayload".into(),
            }),
            Answer::InvalidTarget => Err(SendError::InvalidTarget {
                detail: "410 Unregistered".into(),
            }),
        }
    }
}
