// What the SDK tests share: the running Herald they are pointed at (the Rust test
// tests/e2e/sdk_js.rs starts one and sets these variables), and small HTTP helpers.
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';

export const url = process.env.HERALD_URL;
export const apiKey = process.env.HERALD_API_KEY;
assert.ok(url && apiKey, 'HERALD_URL and HERALD_API_KEY must point at a running Herald in dev mode (see tests/e2e/sdk_js.rs)');
/** Topics starting with this may be joined by users themselves (that Herald's rule). */
const selfTopicPrefix = process.env.HERALD_SELF_TOPICS ?? '';
/** Connections one user may hold on that Herald's gateway. */
export const maxPerUser = Number(process.env.HERALD_MAX_PER_USER);

/** A user id no other test uses. */
export const uniqueUser = (prefix) => `${prefix}-${randomUUID()}`;

/** A topic no other test uses, that users may join themselves. */
export const openTopic = (name) => {
  assert.ok(selfTopicPrefix, 'HERALD_SELF_TOPICS must name the prefix of self-subscribable topics');
  return `${selfTopicPrefix}${name}-${randomUUID()}`;
};

/** A request as the producer: `{status, body}`. */
export async function producer(method, path, body) {
  const r = await fetch(`${url}${path}`, {
    method,
    headers: { authorization: `Bearer ${apiKey}`, ...(body ? { 'content-type': 'application/json' } : {}) },
    body: body ? JSON.stringify(body) : undefined,
  });
  const text = await r.text();
  return { status: r.status, body: text ? JSON.parse(text) : null };
}

/** The topics `token`'s user follows (`GET /v1/me/subscriptions`). */
export async function mySubscriptions(token) {
  const r = await fetch(`${url}/v1/me/subscriptions`, { headers: { authorization: `Bearer ${token}` } });
  assert.equal(r.status, 200);
  return (await r.json()).topics;
}

/** A token for `user`, minted by the dev-mode endpoint. */
export async function tokenFor(user) {
  const r = await fetch(`${url}/dev/token`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ user_id: user }),
  });
  assert.equal(r.status, 200, `POST /dev/token: ${r.status}`);
  return (await r.json()).token;
}

/** `POST /v1/notify` as the producer; returns `{id, seq}` of the 202. */
export async function send(user, title) {
  const r = await fetch(`${url}/v1/notify`, {
    method: 'POST',
    headers: { authorization: `Bearer ${apiKey}`, 'content-type': 'application/json' },
    body: JSON.stringify({ user_id: user, title }),
  });
  const body = await r.json();
  assert.equal(r.status, 202, `POST /v1/notify: ${JSON.stringify(body)}`);
  return body;
}

/** `GET /v1/me/unread` as `token`. */
export async function unread(token) {
  const r = await fetch(`${url}/v1/me/unread`, { headers: { authorization: `Bearer ${token}` } });
  assert.equal(r.status, 200);
  return r.json();
}

/** Retries `check` until it stops throwing, at most `timeoutMs`. */
export async function eventually(check, timeoutMs = 10_000, what = 'condition') {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      return await check();
    } catch (err) {
      if (Date.now() > deadline) throw new Error(`${what}: did not hold within ${timeoutMs} ms: ${err.message}`);
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  }
}

/** Collects what a connection delivers. */
export function recorder() {
  const rec = { notifications: [], states: [], reads: [], errors: [] };
  rec.options = {
    onNotification: (n) => rec.notifications.push(n),
    onState: (s, d) => rec.states.push({ s, ...d }),
    onRead: (upTo) => rec.reads.push(upTo),
    onError: (e) => rec.errors.push(e),
  };
  rec.seqs = () => rec.notifications.map((n) => n.seq);
  return rec;
}
