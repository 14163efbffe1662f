// Where WebSocket is blocked (here: the upgrade URL answers 404), 'auto' moves to SSE; a
// gateway that is down or busy is no such reason.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { connect } from '../herald.js';
import { url, uniqueUser, tokenFor, send, recorder, maxPerUser } from './env.mjs';
import { fakeGateway, hello } from './fake.mjs';

const failures = (rec) => rec.states.filter((s) => s.s === 'reconnecting');
const fellBack = (rec) => rec.errors.some((e) => /falling back/.test(e.message));

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

test('a gateway refusing upgrades as busy (503 + Retry-After) is waited out, not left, and not in lockstep', async () => {
  // Admission control answers every upgrade, and the probe after it, with 503: the
  // gateway is there and works, it only has too many connections opening right now. The
  // probe tells every client the same Retry-After; each must wait it plus its own share
  // of jitter, or a crowd comes back in the same instant.
  const busy = (headers) => ({ 'retry-after': '1', ...headers });
  const gateway = await fakeGateway({
    onUpgrade: (upgrade) => upgrade.refuse(503, busy()),
    onRequest: (req, res) => res.writeHead(req.url.startsWith('/v1/ws') ? 503 : 200, busy()).end(),
  });
  const recs = Array.from({ length: 8 }, () => recorder());
  const conns = recs.map((rec) => connect({ url: gateway.url, token: 't', wsFailuresBeforeFallback: 1, backoffBaseMs: 10, backoffMaxMs: 20, ...rec.options }));
  try {
    await conns[0].until(() => failures(recs[0]).length >= 2);
    await Promise.all(conns.map((conn, i) => conn.until(() => failures(recs[i]).length >= 1)));
    assert.ok(!recs.some(fellBack), 'still on WebSocket');
    const waits = [];
    for (const rec of recs) {
      for (const f of failures(rec)) {
        assert.equal(f.status, 503);
        assert.ok(f.delayMs >= 1000 && f.delayMs <= 2000, `${f.delayMs} ms: the gateway's Retry-After plus jitter up to as much again, not our 20 ms back-off`);
      }
      waits.push(failures(rec)[0].delayMs);
    }
    assert.ok(new Set(waits).size > 1, `every client waits its own time, not all ${waits[0]} ms`);
  } finally {
    for (const conn of conns) conn.close();
    gateway.close();
  }
});

test("a user at the gateway's connection cap (429) stays on WebSocket and gets in once one closes", async () => {
  const user = uniqueUser('at-cap');
  const token = await tokenFor(user);
  assert.ok(maxPerUser >= 1, 'HERALD_MAX_PER_USER');
  const holders = [];
  const rec = recorder();
  let conn;
  try {
    for (let i = 0; i < maxPerUser; i += 1) holders.push(connect({ url, token, transport: 'ws' }));
    for (const h of holders) await h.until((c) => c.state === 'live');
    conn = connect({ url, token, wsFailuresBeforeFallback: 1, backoffBaseMs: 10, backoffMaxMs: 20, ...rec.options });
    await conn.until(() => failures(rec).length >= 3);
    assert.ok(!fellBack(rec), 'still on WebSocket');
    assert.ok(failures(rec).every((f) => f.status === 429), JSON.stringify(failures(rec)));
    holders.shift().close();
    await conn.until((c) => c.state === 'live');
    assert.equal(conn.transport, 'ws');
  } finally {
    conn?.close();
    for (const h of holders) h.close();
  }
});

test('a fixed token closed as expired (4001) reports it through onError and closes, rather than retrying for ever', async () => {
  // After the first connection the token is expired: the gateway closes with 4001, and
  // would refuse every later upgrade (and the probe after it) with 401.
  let upgrades = 0;
  const gateway = await fakeGateway({
    onUpgrade: (upgrade) => {
      upgrades += 1;
      if (upgrades > 1) { upgrade.refuse(401); return; }
      const ws = upgrade.accept();
      ws.send(hello());
      ws.close(4001);
    },
    onRequest: (req, res) => res.writeHead(req.url.startsWith('/v1/ws') ? 401 : 200).end(),
  });
  const rec = recorder();
  const conn = connect({ url: gateway.url, token: 't', backoffBaseMs: 1, backoffMaxMs: 5, ...rec.options });
  try {
    await conn.until((c) => c.state === 'live');
    await conn.until((c) => c.state === 'closed', 3_000).catch(() => {});
    assert.equal(conn.state, 'closed', `still ${conn.state} after ${upgrades} upgrades`);
    assert.ok(rec.errors.some((e) => /expired/.test(e.message)), 'onError says the token expired');
  } finally {
    conn.close();
    gateway.close();
  }
});

test('a fixed token the gateway refuses (upgrade and probe answer 401) reports it through onError and closes', async () => {
  let upgrades = 0;
  const gateway = await fakeGateway({
    onUpgrade: (upgrade) => { upgrades += 1; upgrade.refuse(401); },
    onRequest: (req, res) => res.writeHead(req.url.startsWith('/v1/ws') ? 401 : 200).end(),
  });
  const rec = recorder();
  const conn = connect({ url: gateway.url, token: 't', wsFailuresBeforeFallback: 1, backoffBaseMs: 1, backoffMaxMs: 5, ...rec.options });
  try {
    await conn.until((c) => c.state === 'closed', 3_000).catch(() => {});
    assert.equal(conn.state, 'closed', `still ${conn.state} after ${upgrades} upgrades`);
    assert.equal(upgrades, 1, 'no retry with a token known to be refused');
    assert.ok(rec.errors.some((e) => e.status === 401), 'onError carries the 401');
    assert.ok(!fellBack(rec), 'a refused token is no reason to try SSE');
  } finally {
    conn.close();
    gateway.close();
  }
});

test("a fixed token refused on the browser's EventSource path reports it through onError and closes", async () => {
  // A browser's EventSource: it cannot tell a 401 from a network error, so the SDK must
  // ask. Here every stream is refused with 401 (the token expired).
  let opened = 0;
  class FakeEventSource {
    constructor(u) {
      opened += 1;
      this.url = u;
      setTimeout(() => this.onerror?.(new Event('error')), 0);
    }
    addEventListener() {}
    close() {}
  }
  const gateway = await fakeGateway({
    onUpgrade: (upgrade) => upgrade.refuse(500),
    onRequest: (req, res) => res.writeHead(req.url.startsWith('/v1/sse') ? 401 : 200).end(),
  });
  const saved = globalThis.EventSource;
  globalThis.EventSource = FakeEventSource;
  const rec = recorder();
  const conn = connect({ url: gateway.url, token: 't', transport: 'sse', sse: 'eventsource', backoffBaseMs: 1, backoffMaxMs: 5, ...rec.options });
  try {
    await conn.until((c) => c.state === 'closed', 3_000).catch(() => {});
    assert.equal(conn.state, 'closed', `still ${conn.state} after ${opened} event streams`);
    assert.equal(opened, 1, 'no retry with a token known to be refused');
    assert.ok(rec.errors.some((e) => e.status === 401), 'onError carries the 401');
  } finally {
    conn.close();
    gateway.close();
    globalThis.EventSource = saved;
  }
});
