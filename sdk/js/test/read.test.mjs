// markRead moves the unread count here, on the server, and on the user's other devices.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { connect } from '../herald.js';
import { url, uniqueUser, tokenFor, send, unread, eventually, recorder } from './env.mjs';

for (const transport of ['ws', 'sse']) {
  test(`markRead over ${transport} zeroes unread and reaches another device`, async () => {
    const user = uniqueUser(`read-${transport}`);
    const token = await tokenFor(user);
    const phone = recorder();
    const laptop = recorder();
    const a = connect({ url, token, transport, ...phone.options });
    const b = connect({ url, token, transport: 'ws', ...laptop.options });
    try {
      await a.until((c) => c.state === 'live');
      await b.until((c) => c.state === 'live');
      const sent = [];
      for (let i = 0; i < 3; i += 1) sent.push(await send(user, `to read ${i}`));
      await a.until(() => a.unread === 3 && phone.notifications.length === 3);
      await b.until(() => b.unread === 3);

      const left = await a.markRead();
      assert.equal(left, 0);
      assert.equal(a.unread, 0);
      await eventually(async () => {
        const u = await unread(token);
        assert.deepEqual({ unread: u.unread, last_seq: u.last_seq }, { unread: 0, last_seq: sent[2].seq });
      }, 15_000, 'GET /v1/me/unread agrees');
      await b.until(() => b.unread === 0 && laptop.reads.includes(sent[2].seq), 15_000);

      // Reading part of the inbox: the count comes from the server.
      const more = [await send(user, 'x'), await send(user, 'y')];
      await a.until(() => a.unread === 2);
      await a.markRead(more[0].seq);
      await b.until(() => b.unread === 1, 15_000);
      await eventually(async () => assert.equal((await unread(token)).unread, 1), 15_000, 'server count 1');
    } finally {
      a.close();
      b.close();
    }
  });
}

test('a new connection starts from the persisted read position', async () => {
  const user = uniqueUser('read-hello');
  const token = await tokenFor(user);
  const first = connect({ url, token });
  await first.until((c) => c.state === 'live');
  const n = await send(user, 'one');
  await first.until((c) => c.unread === 1);
  await first.markRead(n.seq);
  await eventually(async () => assert.equal((await unread(token)).unread, 0), 15_000);
  first.close();
  const second = connect({ url, token });
  try {
    await second.until((c) => c.state === 'live');
    assert.equal(second.unread, 0, 'hello carries the read position');
  } finally {
    second.close();
  }
});
