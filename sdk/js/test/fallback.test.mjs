// Where WebSocket is blocked (here: the upgrade URL answers 404), 'auto' moves to SSE.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { connect } from '../herald.js';
import { url, uniqueUser, tokenFor, send, recorder } from './env.mjs';

test('falls back to SSE when the WebSocket upgrade is refused, and keeps its position', async () => {
  const user = uniqueUser('fallback');
  const earlier = await send(user, 'sent before connecting');
  const rec = recorder();
  const conn = connect({
    url,
    token: await tokenFor(user),
    after: 0,
    wsUrl: url.replace(/^http/, 'ws') + '/no-websocket-here',
    wsFailuresBeforeFallback: 2,
    backoffBaseMs: 20,
    ...rec.options,
  });
  try {
    await conn.until((c) => c.state === 'live');
    assert.equal(conn.transport, 'sse');
    const failures = rec.states.filter((s) => s.s === 'reconnecting').length;
    assert.equal(failures, 2, 'two WebSocket failures, then SSE');
    assert.ok(rec.errors.some((e) => /falling back to SSE/.test(e.message)), 'the fallback is reported');
    await conn.until(() => rec.notifications.length === 1);
    assert.equal(rec.notifications[0].id, earlier.id, 'replayed from after=0 over SSE');
    const live = await send(user, 'live over sse');
    await conn.until(() => rec.notifications.length === 2);
    assert.equal(rec.notifications[1].id, live.id);
  } finally {
    conn.close();
  }
});

test("transport 'ws' never falls back", async () => {
  const user = uniqueUser('no-fallback');
  const rec = recorder();
  const conn = connect({
    url,
    token: await tokenFor(user),
    transport: 'ws',
    wsUrl: url.replace(/^http/, 'ws') + '/no-websocket-here',
    wsFailuresBeforeFallback: 1,
    backoffBaseMs: 10,
    backoffMaxMs: 20,
    ...rec.options,
  });
  try {
    await conn.until(() => rec.states.filter((s) => s.s === 'reconnecting').length >= 4);
    assert.equal(conn.transport, null);
    assert.notEqual(conn.state, 'live');
  } finally {
    conn.close();
  }
});

test('a server that is down (a restart) does not count as WebSocket being blocked', async () => {
  const rec = recorder();
  // Port 1 refuses everything: WebSocket and /healthz alike.
  const conn = connect({
    url: 'http://127.0.0.1:1',
    token: 'unused',
    wsFailuresBeforeFallback: 1,
    backoffBaseMs: 10,
    backoffMaxMs: 20,
    ...rec.options,
  });
  try {
    await conn.until(() => rec.states.filter((s) => s.s === 'reconnecting').length >= 3);
    assert.ok(!rec.errors.some((e) => /falling back/.test(e.message)), 'still on WebSocket');
  } finally {
    conn.close();
  }
});
