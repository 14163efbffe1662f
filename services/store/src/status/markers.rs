//! Sent markers read in bulk: a worker checks a whole fetched batch of jobs in one
//! batched direct get instead of one read per job, and a status read merges a
//! notification's markers (every target, one wildcard get) into its document, because the
//! marker is where a worker records a send.

use super::{DeliveryStatus, SentMarker, State, StatusError, StatusStore, Step, TargetStatus, err};
use herald_protocol::ChannelJob;
use std::collections::{BTreeMap, HashMap};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Subjects per batched direct get (the server bounds one request).
const CHUNK: usize = 256;

/// A marker found for one (channel, target) of a notification.
pub(super) struct FoundMarker {
    channel: String,
    target: String,
    marker: SentMarker,
}

impl StatusStore {
    /// The sent markers of `jobs`, by [`ChannelJob::key`], in one batched direct get per
    /// 256 jobs; jobs without one are absent.
    ///
    /// # Errors
    /// [`StatusError`] when NATS fails.
    pub async fn sent_markers(
        &self,
        jobs: &[&ChannelJob],
    ) -> Result<HashMap<String, SentMarker>, StatusError> {
        let subjects: Vec<String> = jobs
            .iter()
            .map(|j| format!("{}{}", self.sent.prefix, j.key()))
            .collect();
        let mut found = HashMap::new();
        for chunk in subjects.chunks(CHUNK) {
            let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
            for (key, marker) in self.markers_matching(&refs).await? {
                found.insert(key, marker);
            }
        }
        Ok(found)
    }

    /// Every sent marker of notification `key` (its kv-safe id).
    pub(super) async fn markers_of(&self, key: &str) -> Result<Vec<FoundMarker>, StatusError> {
        let filter = format!("{}{key}.>", self.sent.prefix);
        Ok(self
            .markers_matching(&[filter.as_str()])
            .await?
            .into_iter()
            .filter_map(|(k, marker)| {
                let rest = k.strip_prefix(key)?.strip_prefix('.')?;
                let (channel, target) = rest.split_once('.')?;
                Some(FoundMarker {
                    channel: channel.to_string(),
                    target: target.to_string(),
                    marker,
                })
            })
            .collect())
    }

    /// The newest marker of each subject `filters` match, by key. Purged or deleted
    /// markers, and markers that do not parse, are absent.
    async fn markers_matching(
        &self,
        filters: &[&str],
    ) -> Result<Vec<(String, SentMarker)>, StatusError> {
        let msgs = crate::direct::last_of_many(&self.client, &self.sent.stream_name, filters)
            .await
            .map_err(err)?;
        Ok(msgs
            .into_iter()
            .filter(|m| {
                m.headers
                    .get("KV-Operation")
                    .is_none_or(|op| op.as_str() == "PUT")
            })
            .filter_map(|m| {
                let subject = m.headers.get("Nats-Subject")?.as_str();
                let key = subject.strip_prefix(self.sent.prefix.as_str())?.to_string();
                let marker = serde_json::from_slice::<SentMarker>(&m.payload).ok()?;
                Some((key, marker))
            })
            .collect())
    }
}

fn parse(at: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(at, &Rfc3339).ok()
}

/// `doc` with the sends `markers` record: a target not yet `sent` becomes `sent` with the
/// marker's provider, message id and time, unless the document changed it after the
/// marker was written (an operator retried it). Without a document, markers that name
/// their user make one.
pub(super) fn merge(
    id: &str,
    doc: Option<DeliveryStatus>,
    markers: Vec<FoundMarker>,
) -> Option<DeliveryStatus> {
    let mut doc = doc;
    for found in markers {
        let FoundMarker {
            channel,
            target,
            marker,
        } = found;
        let doc = match &mut doc {
            Some(d) => d,
            None => {
                let (Some(user_id), Some(seq)) = (marker.user_id.clone(), marker.seq) else {
                    continue;
                };
                doc.insert(DeliveryStatus {
                    id: id.to_string(),
                    user_id,
                    seq,
                    channels: BTreeMap::new(),
                })
            }
        };
        let list = doc.channels.entry(channel).or_default();
        let idx = match list.iter().position(|t| t.target == target) {
            Some(i) => i,
            None => {
                list.push(TargetStatus {
                    target,
                    state: State::Queued,
                    updated_at: marker.at.clone(),
                    provider: None,
                    provider_message_id: None,
                    retries: 0,
                    reason: None,
                    history: Vec::new(),
                });
                list.len() - 1
            }
        };
        let t = &mut list[idx];
        if t.state == State::Sent {
            continue;
        }
        let later = match (parse(&t.updated_at), parse(&marker.at)) {
            (Some(doc_at), Some(marker_at)) => doc_at > marker_at,
            _ => false,
        };
        // A later state of the document wins (a retry after an older send), except
        // `queued`: the router records it after it enqueues the job, and a fast worker may
        // have sent the job and written its marker before that record lands.
        if later && t.state != State::Queued && !t.history.is_empty() {
            continue;
        }
        t.state = State::Sent;
        t.updated_at = marker.at.clone();
        t.provider = Some(marker.provider.clone());
        t.provider_message_id = marker.provider_message_id.clone();
        if t.history.len() < super::MAX_HISTORY {
            t.history.push(Step {
                state: State::Sent,
                at: marker.at,
                reason: None,
                provider: Some(marker.provider),
            });
        }
    }
    doc
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_protocol::UserId;

    fn marker(at: &str) -> SentMarker {
        SentMarker {
            provider: "apns".into(),
            provider_message_id: Some("m-1".into()),
            at: at.into(),
            user_id: Some(UserId::new("u1").expect("user")),
            seq: Some(7),
        }
    }

    fn found(target: &str, at: &str) -> FoundMarker {
        FoundMarker {
            channel: "push".into(),
            target: target.into(),
            marker: marker(at),
        }
    }

    fn queued(at: &str) -> DeliveryStatus {
        let mut channels = BTreeMap::new();
        channels.insert(
            "push".to_string(),
            vec![TargetStatus {
                target: "t1".into(),
                state: State::Queued,
                updated_at: at.into(),
                provider: None,
                provider_message_id: None,
                retries: 0,
                reason: None,
                history: vec![Step {
                    state: State::Queued,
                    at: at.into(),
                    reason: None,
                    provider: None,
                }],
            }],
        );
        DeliveryStatus {
            id: "n1".into(),
            user_id: UserId::new("u1").expect("user"),
            seq: 7,
            channels,
        }
    }

    #[test]
    fn a_marker_turns_a_queued_target_into_sent() {
        let doc = merge(
            "n1",
            Some(queued("2026-01-01T00:00:00Z")),
            vec![found("t1", "2026-01-01T00:00:01.5Z")],
        )
        .expect("doc");
        let t = &doc.channels["push"][0];
        assert_eq!(t.state, State::Sent);
        assert_eq!(t.provider.as_deref(), Some("apns"));
        assert_eq!(t.provider_message_id.as_deref(), Some("m-1"));
        assert_eq!(t.updated_at, "2026-01-01T00:00:01.5Z");
        let states: Vec<State> = t.history.iter().map(|s| s.state).collect();
        assert_eq!(states, [State::Queued, State::Sent]);
    }

    #[test]
    fn a_later_document_state_wins_over_an_older_marker() {
        let mut doc = queued("2026-01-01T00:00:05Z");
        doc.channels.get_mut("push").expect("push")[0].state = State::Retrying;
        let doc = merge("n1", Some(doc), vec![found("t1", "2026-01-01T00:00:01Z")]).expect("doc");
        assert_eq!(doc.channels["push"][0].state, State::Retrying);
    }

    #[test]
    fn a_queued_record_landing_after_the_send_does_not_hide_it() {
        let doc = merge(
            "n1",
            Some(queued("2026-01-01T00:00:02Z")),
            vec![found("t1", "2026-01-01T00:00:01Z")],
        )
        .expect("doc");
        let t = &doc.channels["push"][0];
        assert_eq!(t.state, State::Sent);
        assert_eq!(t.provider.as_deref(), Some("apns"));
    }

    #[test]
    fn markers_alone_make_a_document_and_add_targets() {
        let doc = merge(
            "n1",
            None,
            vec![
                found("t1", "2026-01-01T00:00:01Z"),
                found("t2", "2026-01-01T00:00:02Z"),
            ],
        )
        .expect("doc");
        assert_eq!(doc.user_id.as_str(), "u1");
        assert_eq!(doc.seq, 7);
        let push = &doc.channels["push"];
        assert_eq!(push.len(), 2);
        assert!(push.iter().all(|t| t.state == State::Sent));
        assert!(merge("n1", None, Vec::new()).is_none());
    }
}
