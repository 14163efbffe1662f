// subscribe()/unsubscribe() settle on the server's answer; subscriptions are stored by the
// server, so a reconnect does not repeat them (which would undo a producer's unsubscribe).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { connect, SubscriptionError } from '../herald.js';
import { url, uniqueUser, tokenFor, openTopic, producer, mySubscriptions, eventually, recorder } from './env.mjs';
import { fakeGateway, hello } from './fake.mjs';

const reconnects = (rec) => rec.states.filter((s) => s.s === 'reconnecting').length;

for (const transport of ['ws', 'sse']) {
  test(`subscribe over ${transport} resolves once the server confirmed, and the topic delivers`, async () => {
    const user = uniqueUser(`topic-${transport}`);
    const topic = openTopic(`news-${transport}`);
    const rec = recorder();
    const conn = connect({ url, token: await tokenFor(user), transport, ...rec.options });
    try {
      await conn.until((c) => c.state === 'live');
      await conn.subscribe(topic);
      const published = await producer('POST', `/v1/topics/${encodeURIComponent(topic)}/publish`, { title: 'to the topic' });
      assert.equal(published.status, 202, JSON.stringify(published.body));
      await conn.until(() => rec.notifications.some((n) => n.topic === topic), 15_000);
      await conn.unsubscribe(topic);
      assert.deepEqual(await mySubscriptions(await tokenFor(user)), []);
    } finally {
      conn.close();
    }
  });

  test(`a refused subscribe over ${transport} rejects with the server's reason`, async () => {
    const user = uniqueUser(`refused-${transport}`);
    const topic = `closed-${user}`; // not among the topics users may join themselves
    const conn = connect({ url, token: await tokenFor(user), transport });
    try {
      await conn.until((c) => c.state === 'live');
      await assert.rejects(conn.subscribe(topic), (err) => {
        assert.ok(err instanceof SubscriptionError, `${err}`);
        assert.equal(err.topic, topic);
        assert.match(err.message, /does not allow users to subscribe themselves/);
        return true;
      });
      assert.equal(conn.state, 'live', 'a refusal is an answer, not a reason to drop');
    } finally {
      conn.close();
    }
  });
}

test('a subscribe the gateway never answers rejects after requestTimeoutMs', async () => {
  const gateway = await fakeGateway({ onUpgrade: (upgrade) => upgrade.accept().send(hello()) });
  const conn = connect({ url: gateway.url, token: 't', transport: 'ws', requestTimeoutMs: 50 });
  try {
    await conn.until((c) => c.state === 'live');
    await assert.rejects(conn.subscribe('silence'), (err) => {
      assert.ok(err instanceof SubscriptionError, `${err}`);
      assert.match(err.message, /did not answer within 50 ms/);
      return true;
    });
  } finally {
    conn.close();
    gateway.close();
  }
});

test("a producer's unsubscribe survives the client's reconnect", async () => {
  const user = uniqueUser('kept-out');
  const token = await tokenFor(user);
  const topic = openTopic('left');
  const rec = recorder();
  const conn = connect({ url, token, transport: 'ws', backoffBaseMs: 20, ...rec.options });
  try {
    await conn.until((c) => c.state === 'live');
    await conn.subscribe(topic);
    assert.deepEqual(await mySubscriptions(token), [topic]);
    const removed = await producer('DELETE', `/v1/topics/${encodeURIComponent(topic)}/subscribers/${encodeURIComponent(user)}`);
    assert.equal(removed.status, 200, JSON.stringify(removed.body));
    assert.equal(removed.body.was_subscribed, true);

    conn.reconnect();
    await conn.until((c) => reconnects(rec) === 1 && c.state === 'live');
    // A frame after the reconnect's hello: the gateway handles a connection's frames in
    // order, so once this one is stored, anything the SDK sent on hello was handled too.
    const marker = openTopic('marker');
    await conn.subscribe(marker);
    const topics = await eventually(async () => {
      const now = await mySubscriptions(token);
      assert.ok(now.includes(marker), JSON.stringify(now));
      return now;
    }, 10_000, 'the marker subscription is stored');
    assert.deepEqual(topics, [marker], 'the topic the producer removed stays removed');
  } finally {
    conn.close();
  }
});
