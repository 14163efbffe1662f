//! Reading a user's inbox lanes (and a big topic's) forward without making the server
//! count.
//!
//! A batched direct get makes nats-server count what is pending after it
//! (`Nats-Num-Pending`), and counting from a sequence inside a message block loads,
//! indexes and checksums that whole block: profiled during a reconnect storm,
//! `fileStore.NumPending` → `indexCacheBuf` was most of nats-server's CPU, ~9 ms per
//! read on a 30,000-message INBOX, where a single `next_by_subj` costs ~0.3 ms
//! (BENCHMARKS.md, "Session 7"). The reads a reconnect makes — the replay of what it
//! missed, the unread count — usually touch a handful of messages, so they walk one
//! message at a time up to each lane's newest sequence (all lanes' in one `multi_last`),
//! and only a long walk switches to batches, where the count is paid once per page.
//!
//! Lanes are literal subjects ([`herald_protocol::Subjects::inbox_lanes`]): the server
//! finds a literal subject's next message from its per-subject index, a wildcard's by
//! scanning the stream.

use crate::direct::{self, DirectMessage};
use crate::inbox::{Inbox, InboxError};
use async_nats::jetstream::stream::RawMessageErrorKind;
use herald_protocol::streams::INBOX;

/// Subjects per `multi_last` request.
const MULTI_LAST_SUBJECTS: usize = 256;

/// Messages read one at a time before a walk switches to batches.
const SINGLE_READS: usize = 8;

/// Messages counted one at a time before a count asks the server to count.
const COUNT_WALK: u64 = 32;

/// Rounds [`Inbox::count_by_pending`] makes before settling for its last difference.
const COUNT_TRIES: usize = 3;

impl Inbox {
    /// The newest sequence of each of `lanes` that holds anything, as `(lane, seq)`, in
    /// one request.
    pub(crate) async fn lane_lasts(
        &self,
        lanes: &[String],
    ) -> Result<Vec<(String, u64)>, InboxError> {
        let refs: Vec<&str> = lanes.iter().map(String::as_str).collect();
        Ok(direct::last_of_many(&self.nats().consume, INBOX, &refs)
            .await?
            .into_iter()
            .filter_map(|m| {
                let lane = m.headers.get("Nats-Subject")?.as_str().to_owned();
                Some((lane, m.seq))
            })
            .collect())
    }

    /// [`Inbox::lane_lasts`] for any number of lanes: one request per 256. The answer of
    /// one request is one snapshot; a view of more than 256 lanes (a user following over
    /// 80 big topics) spans several, a few milliseconds apart.
    pub(crate) async fn lane_lasts_chunked(
        &self,
        lanes: &[String],
    ) -> Result<Vec<(String, u64)>, InboxError> {
        let mut lasts = Vec::with_capacity(lanes.len());
        for chunk in lanes.chunks(MULTI_LAST_SUBJECTS) {
            lasts.extend(self.lane_lasts(chunk).await?);
        }
        Ok(lasts)
    }

    /// Up to `limit` messages with `seq > after` of the lanes in `lasts`, oldest first,
    /// and whether more follow: each lane that holds anything newer is walked up to its
    /// newest sequence as read in `lasts` (`(lane, seq)`, from [`Inbox::lane_lasts`];
    /// what is stored later comes with the next read).
    pub(crate) async fn walk_lanes(
        &self,
        lasts: &[(String, u64)],
        after: u64,
        limit: usize,
    ) -> Result<(Vec<DirectMessage>, bool), InboxError> {
        let walks = lasts
            .iter()
            .filter(|(_, last)| *last > after)
            .map(|(lane, last)| self.walk(lane, after, *last, limit));
        let mut has_more = false;
        let mut msgs = Vec::new();
        for (lane, more) in futures::future::try_join_all(walks).await? {
            has_more |= more;
            msgs.extend(lane);
        }
        msgs.sort_by_key(|m| m.seq);
        if msgs.len() > limit {
            msgs.truncate(limit);
            has_more = true;
        }
        Ok((msgs, has_more))
    }

    /// Up to `limit` messages of `lane` with `after < seq <= last`, oldest first, and
    /// whether more remain below `last`.
    ///
    /// Every message of the lane up to `last` is read, or the read fails: a page merges
    /// several lanes, and one lane read short while another is read to its end would
    /// move the reader's position past what the short one missed, for good. On a
    /// cluster any replica answers a direct get, and one may not yet hold what the
    /// replica that answered `last` held: when the answers stop before `last`, the
    /// stream leader (which holds everything a replica does) is asked for the next one,
    /// and only its "nothing" ends the walk short (deleted since `last` was read).
    async fn walk(
        &self,
        lane: &str,
        after: u64,
        last: u64,
        limit: usize,
    ) -> Result<(Vec<DirectMessage>, bool), InboxError> {
        let mut out: Vec<DirectMessage> = Vec::new();
        let mut from = after.saturating_add(1);
        let mut batched = false;
        while out.len() < limit && from <= last {
            if out.len() >= SINGLE_READS && !batched {
                // A long read: the rest in one batch, its count paid once.
                batched = true;
                let (rest, _) = self
                    .subject_after(lane, from - 1, limit - out.len())
                    .await?;
                out.extend(rest.into_iter().take_while(|m| m.seq <= last));
                if let Some(m) = out.last() {
                    from = from.max(m.seq.saturating_add(1));
                }
                continue; // done, or short of `last`: read on one at a time
            }
            let msg = match direct::next(&self.nats().consume, INBOX, lane, from).await? {
                Some(msg) => Some(msg),
                None => self.leader_next(lane, from).await?,
            };
            let Some(msg) = msg else {
                break;
            };
            if msg.seq > last {
                break;
            }
            from = msg.seq.saturating_add(1);
            out.push(msg);
        }
        let more = out.len() >= limit && out.last().is_some_and(|m| m.seq < last);
        Ok((out, more))
    }

    /// The first message of `lane` with sequence ≥ `from`, as the stream leader has it
    /// (`STREAM.MSG.GET`, never a replica behind it); `None` when there is none.
    async fn leader_next(
        &self,
        lane: &str,
        from: u64,
    ) -> Result<Option<DirectMessage>, InboxError> {
        let unavailable = |e: &dyn std::fmt::Display| InboxError::Unavailable(e.to_string().into());
        let stream = self
            .nats()
            .js_consume
            .get_stream_no_info(INBOX)
            .await
            .map_err(|e| unavailable(&e))?;
        match stream
            .raw_message_builder()
            .sequence(from)
            .next_by_subject(lane)
            .send()
            .await
        {
            Ok(m) => Ok(Some(DirectMessage {
                seq: m.sequence,
                pending: None,
                headers: m.headers,
                payload: m.payload,
            })),
            Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(unavailable(&e)),
        }
    }

    /// Messages of literal `lane` with `after < seq <= last`. Walked one at a time up
    /// to `last` when there are few (exact, and nothing stored since counts); when
    /// there are many, the rest is left to [`Inbox::count_by_pending`].
    pub(crate) async fn count_between(
        &self,
        lane: String,
        after: u64,
        last: u64,
    ) -> Result<u64, InboxError> {
        let mut counted = 0;
        let mut from = after.saturating_add(1);
        while from <= last {
            if counted == COUNT_WALK {
                return Ok(counted + self.count_by_pending(&lane, from - 1, last).await?);
            }
            match direct::next(&self.nats().consume, INBOX, &lane, from).await? {
                Some(msg) if msg.seq <= last => {
                    counted += 1;
                    from = msg.seq.saturating_add(1);
                }
                _ => break,
            }
        }
        Ok(counted)
    }

    /// [`Inbox::count_between`] by the server's count. JetStream counts only to the end
    /// of the stream, so this counts everything after `after`, then what is after
    /// `last`: if that is what it was before the first count (nothing, at the head),
    /// nothing was stored in between and the difference is exact. Otherwise it counts
    /// again, a few times at most; on a subject written to without pause the last
    /// difference may miss the newest few.
    async fn count_by_pending(&self, lane: &str, after: u64, last: u64) -> Result<u64, InboxError> {
        let mut newer_before = 0;
        let mut counted = 0;
        for _ in 0..COUNT_TRIES {
            let all = self.subject_count_after(lane, after).await?;
            let newer = self.subject_count_after(lane, last).await?;
            counted = all.saturating_sub(newer);
            if newer == newer_before {
                break;
            }
            newer_before = newer;
        }
        Ok(counted)
    }
}
