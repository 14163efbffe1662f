// Live delivery on both transports, hello, and the unread count it starts from.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { connect } from '../herald.js';
import { url, uniqueUser, tokenFor, send, recorder } from './env.mjs';

for (const transport of ['ws', 'sse']) {
  test(`receives live notifications over ${transport}`, async () => {
    const user = uniqueUser(`live-${transport}`);
    const before = await send(user, 'before connecting');
    const rec = recorder();
    let hello;
    const conn = connect({ url, token: await tokenFor(user), transport, ...rec.options, onHello: (h) => { hello = h; } });
    try {
      await conn.until((c) => c.state === 'live');
      assert.equal(conn.transport, transport);
      assert.equal(hello.user_id, user);
      assert.equal(hello.last_seq, before.seq);
      assert.equal(conn.unread, 1, 'hello counts the unread one');
      assert.equal(conn.lastSeq, before.seq, 'live only: resumes from where it started');

      const live = await send(user, 'live one');
      await conn.until(() => rec.notifications.length === 1);
      const [n] = rec.notifications;
      assert.equal(n.id, live.id);
      assert.equal(n.seq, live.seq);
      assert.equal(n.title, 'live one');
      assert.equal(n.user_id, user);
      assert.equal(n.type, undefined, 'the frame tag is not part of the notification');
      assert.equal(conn.unread, 2);
      assert.equal(conn.lastSeq, live.seq);
      // `ack` is a WebSocket frame; SSE has no way to send it.
      assert.equal(conn.ack(), transport === 'ws');
      // The connection survives its own frames (the server would close on a bad one).
      const more = await send(user, 'after ack');
      await conn.until(() => rec.notifications.length === 2 && conn.state === 'live');
      assert.equal(rec.notifications[1].id, more.id);
      assert.equal(rec.states.filter((s) => s.s === 'reconnecting').length, 0);
    } finally {
      conn.close();
    }
    assert.equal(conn.state, 'closed');
  });
}

test('after= replays what was missed, in order, then goes live', async () => {
  const user = uniqueUser('replay');
  const sent = [];
  for (let i = 0; i < 5; i += 1) sent.push(await send(user, `offline ${i}`));
  const rec = recorder();
  const conn = connect({ url, token: await tokenFor(user), after: sent[1].seq, ...rec.options });
  try {
    await conn.until(() => rec.notifications.length === 3);
    assert.deepEqual(rec.seqs(), sent.slice(2).map((s) => s.seq));
    assert.equal(conn.unread, 5, 'replayed ones are not counted twice on top of hello');
    const live = await send(user, 'online');
    await conn.until(() => rec.notifications.length === 4);
    assert.equal(rec.notifications[3].id, live.id);
  } finally {
    conn.close();
  }
});
