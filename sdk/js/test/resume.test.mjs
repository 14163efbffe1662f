// Reconnects resume from the last seq seen: nothing lost, nothing twice.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { connect } from '../herald.js';
import { url, uniqueUser, tokenFor, send, recorder } from './env.mjs';
import { fakeGateway, hello } from './fake.mjs';

/** A `notification` frame as the gateway sends it. */
const notification = (seq, id) => ({
  type: 'notification', id, seq, user_id: 'fake', title: id, created_at: '2025-01-01T00:00:00Z', read: false,
});

for (const transport of ['ws', 'sse']) {
  test(`forced reconnects while sending lose nothing and duplicate nothing (${transport})`, async () => {
    const user = uniqueUser(`resume-${transport}`);
    const rec = recorder();
    const conn = connect({ url, token: await tokenFor(user), transport, backoffBaseMs: 50, ...rec.options });
    try {
      await conn.until((c) => c.state === 'live');
      const sent = [];
      for (let i = 0; i < 40; i += 1) {
        sent.push(await send(user, `n${i}`));
        // Drop the connection every few sends: some notifications land while it is down.
        if (i % 7 === 3) conn.reconnect();
      }
      await conn.until(() => rec.notifications.length >= sent.length && conn.state === 'live', 20_000);
      assert.deepEqual(rec.seqs(), sent.map((s) => s.seq), 'every notification once, in order');
      assert.deepEqual(rec.notifications.map((n) => n.id), sent.map((s) => s.id));
      const reconnects = rec.states.filter((s) => s.s === 'reconnecting').length;
      assert.ok(reconnects >= 5, `it really reconnected (${reconnects} times)`);
      assert.equal(conn.lastSeq, sent.at(-1).seq);
    } finally {
      conn.close();
    }
  });
}

test('a new connection from lastSeq gets exactly what came after it', async () => {
  const user = uniqueUser('handoff');
  const token = await tokenFor(user);
  const first = recorder();
  let conn = connect({ url, token, ...first.options });
  await conn.until((c) => c.state === 'live');
  const a = await send(user, 'a');
  await conn.until(() => first.notifications.length === 1);
  const position = conn.lastSeq;
  conn.close();
  assert.equal(position, a.seq);

  const b = await send(user, 'b while away');
  const c = await send(user, 'c while away');
  const second = recorder();
  conn = connect({ url, token, after: position, ...second.options });
  try {
    await conn.until(() => second.notifications.length === 2);
    assert.deepEqual(second.seqs(), [b.seq, c.seq]);
  } finally {
    conn.close();
  }
});

test('a refused token is replaced through getToken', async () => {
  const user = uniqueUser('refresh');
  let calls = 0;
  const getToken = async () => { calls += 1; return calls === 1 ? 'not-a-jwt' : tokenFor(user); };
  for (const transport of ['ws', 'sse']) {
    calls = 0;
    const rec = recorder();
    const conn = connect({ url, getToken, transport, sse: 'fetch', backoffBaseMs: 20, ...rec.options });
    try {
      await conn.until((c) => c.state === 'live');
      assert.ok(calls >= 2, `${transport}: asked for a fresh token after the refusal (${calls} calls)`);
      const n = await send(user, `after refresh ${transport}`);
      await conn.until(() => rec.notifications.some((x) => x.id === n.id));
    } finally {
      conn.close();
    }
  }
});

test('a hello below the position (the inbox began again) makes the client take the replay', async () => {
  const afters = [];
  const sockets = [];
  const gateway = await fakeGateway({
    onUpgrade: (upgrade) => {
      afters.push(new URL(upgrade.req.url, 'http://x').searchParams.get('after'));
      const ws = upgrade.accept();
      sockets.push(ws);
      if (sockets.length === 1) {
        // The inbox was recreated: its newest seq is 2, the client's position 50. The
        // gateway replays it all, then 3 and (in time) 51 come live.
        ws.send({ ...hello(), last_seq: 2, unread: 2 });
        for (const seq of [1, 2, 3, 51]) ws.send(notification(seq, `new-${seq}`));
      } else {
        ws.send({ ...hello(), last_seq: 51 });
      }
    },
  });
  const rec = recorder();
  const conn = connect({ url: gateway.url, token: 't', transport: 'ws', after: 50, backoffBaseMs: 1, ...rec.options });
  try {
    await conn.until(() => rec.seqs().includes(51));
    assert.deepEqual(rec.seqs(), [1, 2, 3, 51], 'none dropped as delivered before');
    assert.equal(conn.lastSeq, 51);
    assert.equal(conn.latestSeq, 51);
    // The next connection resumes from the new position.
    sockets[0].close(1011);
    await conn.until(() => afters.length === 2 && conn.state === 'live');
    assert.deepEqual(afters, ['50', '51']);
  } finally {
    conn.close();
    gateway.close();
  }
});

test('a hello at or past the position keeps it: nothing at or below it is delivered again', async () => {
  const gateway = await fakeGateway({
    onUpgrade: (upgrade) => {
      const ws = upgrade.accept();
      // On a cluster the head may be read from a replica a moment behind; the gateway
      // then says last_seq = the client's position.
      ws.send({ ...hello(), last_seq: 50 });
      for (const seq of [49, 50, 51]) ws.send(notification(seq, `n-${seq}`));
    },
  });
  const rec = recorder();
  const conn = connect({ url: gateway.url, token: 't', transport: 'ws', after: 50, ...rec.options });
  try {
    await conn.until(() => rec.notifications.length >= 1 && conn.lastSeq === 51);
    assert.deepEqual(rec.seqs(), [51]);
  } finally {
    conn.close();
    gateway.close();
  }
});
