// The back-off starts over only after a connection that stayed up (`stableMs`): a gateway
// that greets and then drops every client must not have them back in a tight loop.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { connect } from '../herald.js';
import { recorder } from './env.mjs';
import { fakeGateway, hello } from './fake.mjs';

/** The back-off step of every wait so far. */
const attempts = (rec) => rec.states.filter((s) => s.s === 'reconnecting').map((s) => s.attempt);
const lives = (rec) => rec.states.filter((s) => s.s === 'live').length;

test('a gateway that greets and drops at once does not reset the back-off', async () => {
  const gateway = await fakeGateway({
    onUpgrade: (upgrade) => {
      const ws = upgrade.accept();
      ws.send(hello());
      ws.close(1011);
    },
  });
  const rec = recorder();
  const conn = connect({ url: gateway.url, token: 't', transport: 'ws', backoffBaseMs: 1, ...rec.options });
  try {
    await conn.until(() => attempts(rec).length >= 6);
    assert.ok(lives(rec) >= 6, `each connection went live before it dropped (${lives(rec)})`);
    assert.deepEqual(attempts(rec).slice(0, 6), [1, 2, 3, 4, 5, 6], 'every drop is one more step');
  } finally {
    conn.close();
    gateway.close();
  }
});

test('a connection that stayed live for stableMs (default 10 s) starts the back-off over', async (t) => {
  // Only `Date` is mocked: the SDK measures how long a connection lived with it.
  t.mock.timers.enable({ apis: ['Date'], now: 1_000_000 });
  const accepted = [];
  const gateway = await fakeGateway({
    onUpgrade: (upgrade) => {
      const ws = upgrade.accept();
      ws.send(hello());
      accepted.push(ws);
    },
  });
  const rec = recorder();
  const conn = connect({ url: gateway.url, token: 't', transport: 'ws', backoffBaseMs: 1, ...rec.options });
  // Connection `k` stays live `ms` (on the mocked clock) and is dropped: the step of the
  // wait that follows.
  const dropAfter = async (k, ms) => {
    await conn.until(() => lives(rec) > k && accepted.length > k);
    t.mock.timers.tick(ms);
    accepted[k].close(1011);
    await conn.until(() => attempts(rec).length > k);
    return attempts(rec)[k];
  };
  try {
    assert.equal(await dropAfter(0, 0), 1);
    assert.equal(await dropAfter(1, 0), 2);
    assert.equal(await dropAfter(2, 9_999), 3, 'live for less than 10 s: one more failed attempt');
    assert.equal(await dropAfter(3, 10_000), 1, 'live for 10 s: the back-off starts over');
    assert.equal(await dropAfter(4, 0), 2);
  } finally {
    conn.close();
    gateway.close();
  }
});
