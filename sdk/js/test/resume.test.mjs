// Reconnects resume from the last seq seen: nothing lost, nothing twice.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { connect } from '../herald.js';
import { url, uniqueUser, tokenFor, send, recorder } from './env.mjs';

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
