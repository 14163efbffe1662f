// Herald client SDK: one plain ES module, no build step, for browsers and Node (>= 22, or
// 20.10+ with --experimental-websocket for the WebSocket transport).
//
// Why it is shaped like this (SPEC.md §5):
// - Delivery is at-least-once across reconnects, so the client resumes from the last seq
//   it delivered (`?after=` on WebSocket, `after` on SSE) and drops anything it has
//   already delivered (by seq, and by id as a second line of defence). A `hello` whose
//   `last_seq` is below that position says the position is from another life of the
//   inbox (recreated or restored): the server replays it all, and the SDK takes it.
// - Reconnect storms are the server's worst case, so every retry waits a random time in
//   [0, min(cap, base * 2^attempt)] ("full jitter"), and a `reconnect` frame's `after_ms`
//   (already jittered by the server) replaces that wait. The attempt count starts over
//   only once a connection has stayed live for `stableMs`: a server that greets and then
//   drops every client at once must not have them all back within the first step.
// - Some networks refuse WebSocket upgrades; after `wsFailuresBeforeFallback` failures
//   before a socket ever opened, the connection moves to Server-Sent Events for good. A
//   WebSocket does not say why its upgrade failed, so after each failure the SDK asks the
//   gateway with a plain GET of the same URL: a busy gateway (503 + Retry-After, 429 at
//   the per-user cap) is waited out and is no reason to leave WebSocket. The wait is
//   `Retry-After` plus full jitter of as much again, never `Retry-After` exactly: every
//   client asking in the same second is told the same time.
// - Topic subscriptions are stored by the server (SPEC §3, §5), so they outlive
//   connections: `subscribe()` asks once and is never repeated on reconnect, where it
//   would undo a producer's `DELETE .../subscribers/{user}` made meanwhile.
// - Browsers' WebSocket and EventSource cannot set headers, so the token travels as
//   `access_token` (SPEC §2); the fetch-based SSE reader (Node, or `sse: 'fetch'`) and the
//   HTTP calls use `Authorization: Bearer`.

/** Close codes the gateway uses (RFC 6455 and Herald's own). */
export const CloseCode = Object.freeze({
  GOING_AWAY: 1001,
  UNSUPPORTED: 1003,
  INVALID_PAYLOAD: 1007,
  POLICY: 1008,
  TOO_BIG: 1009,
  INTERNAL: 1011,
  HEARTBEAT: 4000,
  TOKEN_EXPIRED: 4001,
  SLOW_CONSUMER: 4008,
});

const DEFAULTS = Object.freeze({
  transport: 'auto',
  sse: 'auto',
  backoffBaseMs: 500,
  backoffMaxMs: 30_000,
  wsFailuresBeforeFallback: 3,
  dedupWindow: 2048,
  openTimeoutMs: 10_000,
  stableMs: 10_000,
  requestTimeoutMs: 10_000,
});

/** Longest wait a `Retry-After` may impose, ms. */
const MAX_RETRY_AFTER_MS = 10 * 60_000;

/** Close codes after which the token may be the problem: fetch a fresh one first. */
const AUTH_CLOSE_CODES = new Set([CloseCode.POLICY, CloseCode.TOKEN_EXPIRED, 4003, 4401, 4403]);

/** An HTTP answer that was not a success. */
class HttpError extends Error {
  constructor(status, body) {
    super(`HTTP ${status}${body ? `: ${body}` : ''}`);
    this.name = 'HttpError';
    this.status = status;
    this.body = body;
  }
}

/** `subscribe()`/`unsubscribe()` was refused, or got no answer in time. */
export class SubscriptionError extends Error {
  constructor(topic, reason, status) {
    super(`herald: topic ${JSON.stringify(topic)}: ${reason}`);
    this.name = 'SubscriptionError';
    /** The topic asked for. */
    this.topic = topic;
    /** Why, as the server said it (or that it did not answer). */
    this.reason = reason;
    /** The HTTP status when the request went over HTTP. */
    this.status = status;
  }
}

/**
 * Opens a connection and keeps it open until `close()`.
 * @param {import('./herald').ConnectOptions} options
 * @returns {HeraldConnection}
 */
export function connect(options) {
  return new HeraldConnection(options);
}

/** A self-healing real-time connection to Herald. */
export class HeraldConnection {
  #opts;
  #token = null;
  #state = 'connecting';
  #transport = null;
  #closed = false;
  #attempt = 0;
  #wsFailures = 0;
  #useSse = false;
  #refreshToken = false;
  #nextDelayMs = null;
  #timer = null;
  #current = null; // { kind, close(), send?(obj) }
  #position; // resume point: everything up to it has been delivered or skipped on purpose
  #deliveredMax = 0; // highest seq handed to the application
  #recentIds = new Set();
  #latestSeq = 0; // newest seq known to exist
  #countedUpTo = 0; // notifications up to this seq are already in #unread (from hello)
  #unread = 0;
  #liveSince = null; // Date.now() at the current connection's hello
  #waiters = new Set();
  #generation = 0; // bumped whenever a pending attempt must not go ahead

  constructor(options) {
    if (!options || (options.token == null && typeof options.getToken !== 'function')) {
      throw new TypeError('herald: connect() needs `token` or `getToken`');
    }
    const url = options.url ?? globalThis.location?.origin;
    if (!url) throw new TypeError('herald: connect() needs `url` outside a browser page');
    this.#opts = { ...DEFAULTS, ...options, url: String(url).replace(/\/+$/, '') };
    if (!['auto', 'ws', 'sse'].includes(this.#opts.transport)) {
      throw new TypeError(`herald: unknown transport ${this.#opts.transport}`);
    }
    this.#token = options.token ?? null;
    this.#position = Number.isSafeInteger(options.after) ? options.after : null;
    if (this.#position != null) this.#deliveredMax = this.#position;
    this.#useSse = this.#opts.transport === 'sse' || (this.#opts.transport === 'auto' && !this.#WebSocket());
    queueMicrotask(() => this.#open());
  }

  /** `'connecting' | 'live' | 'reconnecting' | 'closed'`. */
  get state() { return this.#state; }
  /** `'ws' | 'sse'` while connected, else `null`. */
  get transport() { return this.#transport; }
  /** The seq the next connection resumes after (`null` before the first hello). */
  get lastSeq() { return this.#position; }
  /** Unread notifications, from `hello`, live notifications and `read` frames. */
  get unread() { return this.#unread; }
  /** The newest seq known to exist in the user's inbox. */
  get latestSeq() { return this.#latestSeq; }

  /**
   * Marks everything up to and including `upTo` (default: the newest known) as read.
   * Over WebSocket a `read` frame; otherwise `POST /v1/me/read`.
   * @returns {Promise<number>} the unread count as this client now knows it.
   */
  async markRead(upTo = this.#latestSeq) {
    if (!Number.isSafeInteger(upTo) || upTo < 0) throw new TypeError('herald: markRead(upTo) needs a seq');
    if (this.#current?.kind === 'ws' && this.#current.send({ type: 'read', up_to: upTo })) {
      if (upTo >= this.#latestSeq) this.#setUnread(0);
      return this.#unread;
    }
    const body = await this.#http('POST', '/v1/me/read', { up_to: upTo });
    if (typeof body?.unread === 'number') this.#setUnread(body.unread);
    if (typeof body?.last_seq === 'number') this.#latestSeq = Math.max(this.#latestSeq, body.last_seq);
    return this.#unread;
  }

  /**
   * Records that the user has seen everything up to `upTo` live (SPEC: drives escalation
   * to push). WebSocket only; returns whether the frame was sent.
   */
  ack(upTo = this.#deliveredMax) {
    if (!Number.isSafeInteger(upTo) || upTo < 0) throw new TypeError('herald: ack(upTo) needs a seq');
    return this.#current?.kind === 'ws' ? this.#current.send({ type: 'ack', up_to: upTo }) : false;
  }

  /**
   * Joins a topic, for good: the server stores the subscription, so it holds across
   * reconnects and devices until `unsubscribe()` (or a producer) ends it. Over an open
   * WebSocket a `subscribe` frame, answered by a `subscription` frame; otherwise `POST
   * /v1/me/subscriptions`. Resolves once the server confirmed; rejects with a
   * `SubscriptionError` when it refused (or did not answer within `requestTimeoutMs`).
   */
  subscribe(topic) {
    return this.#subscription(String(topic), true);
  }

  /** Leaves a topic; resolves and rejects as `subscribe()` does. */
  unsubscribe(topic) {
    return this.#subscription(String(topic), false);
  }

  async #subscription(topic, join) {
    const conn = this.#current;
    if (conn?.kind === 'ws' && conn.ask) {
      const answer = conn.ask(topic, join);
      if (answer) return answer;
    }
    try {
      await this.#http(join ? 'POST' : 'DELETE', '/v1/me/subscriptions', { topic });
    } catch (err) {
      if (err instanceof HttpError && err.status >= 400 && err.status < 500) {
        let reason = err.body;
        try { reason = JSON.parse(err.body).error.message ?? reason; } catch { /* not JSON */ }
        throw new SubscriptionError(topic, reason || `HTTP ${err.status}`, err.status);
      }
      throw err;
    }
  }

  /** Drops the current connection and reconnects at once, resuming from `lastSeq`. */
  reconnect() {
    if (this.#closed) return;
    this.#nextDelayMs = 0;
    this.#teardown();
    this.#schedule({ reason: 'reconnect requested' });
  }

  /** Resolves when `predicate(this)` holds (checked after every event), or rejects after
   *  `timeoutMs`. Handy for tests and UIs that await a state. */
  until(predicate, timeoutMs = 10_000) {
    if (predicate(this)) return Promise.resolve(this);
    return new Promise((resolve, reject) => {
      const waiter = { predicate, resolve, reject };
      waiter.timer = setTimeout(() => {
        this.#waiters.delete(waiter);
        reject(new Error(`herald: condition not met within ${timeoutMs} ms (state ${this.#state})`));
      }, timeoutMs);
      this.#waiters.add(waiter);
    });
  }

  /** Closes for good. */
  close() {
    if (this.#closed) return;
    this.#closed = true;
    clearTimeout(this.#timer);
    this.#teardown();
    this.#setState('closed', {});
    for (const w of this.#waiters) { clearTimeout(w.timer); w.reject(new Error('herald: connection closed')); }
    this.#waiters.clear();
  }

  // ---- connection lifecycle ------------------------------------------------------------

  async #open() {
    if (this.#closed) return;
    const generation = this.#generation;
    let token;
    try {
      token = await this.#currentToken();
    } catch (err) {
      if (generation !== this.#generation) return;
      this.#emit('onError', err);
      this.#schedule({ reason: 'token unavailable' });
      return;
    }
    // reconnect() or close() while the token was on its way: that attempt is void.
    if (this.#closed || generation !== this.#generation) return;
    if (this.#useSse) this.#openSse(token);
    else this.#openWs(token);
  }

  #openWs(token) {
    const WS = this.#WebSocket();
    const url = new URL(this.#opts.wsUrl ?? this.#opts.url.replace(/^http/, 'ws') + '/v1/ws');
    if (this.#position != null) url.searchParams.set('after', String(this.#position));
    url.searchParams.set('access_token', token);
    let opened = false;
    let socket;
    try {
      socket = new WS(url.toString());
    } catch (err) {
      this.#wsFailed(err, url);
      return;
    }
    // Subscription requests awaiting their answer, oldest first. The gateway handles one
    // client frame at a time and answers each `subscribe`/`unsubscribe` with a
    // `subscription` frame naming the topic, so the first request for a topic is the one
    // an answer for it settles (one that timed out stays, to absorb its late answer).
    const asked = [];
    const conn = {
      kind: 'ws',
      close: () => { try { socket.close(1000, 'client closing'); } catch { /* already closed */ } },
      send: (frame) => {
        if (socket.readyState !== 1) return false;
        socket.send(JSON.stringify(frame));
        return true;
      },
      // A promise of the answer, or null when the socket cannot send now.
      ask: (topic, join) => {
        if (!conn.send({ type: join ? 'subscribe' : 'unsubscribe', topic })) return null;
        return new Promise((resolve, reject) => {
          const request = { topic, join, resolve, reject, settled: false };
          request.timer = setTimeout(() => {
            request.settled = true;
            reject(new SubscriptionError(topic, `the gateway did not answer within ${this.#opts.requestTimeoutMs} ms`));
          }, this.#opts.requestTimeoutMs);
          asked.push(request);
        });
      },
    };
    const answered = (frame) => {
      const i = asked.findIndex((r) => r.topic === frame.topic);
      if (i < 0) return;
      const [request] = asked.splice(i, 1);
      clearTimeout(request.timer);
      if (request.settled) return;
      request.settled = true;
      if (frame.error) request.reject(new SubscriptionError(request.topic, String(frame.error)));
      else request.resolve();
    };
    // The socket ended with requests unanswered: the frame may or may not have been
    // handled. Both requests are idempotent on the server, so ask again over HTTP, in the
    // same order; after close() there is nobody to ask for.
    const unanswered = () => {
      const left = asked.splice(0).filter((r) => !r.settled);
      for (const r of left) { clearTimeout(r.timer); r.settled = true; }
      if (left.length === 0) return;
      if (this.#closed) {
        for (const r of left) r.reject(new SubscriptionError(r.topic, 'the connection was closed before the gateway answered'));
        return;
      }
      (async () => {
        for (const r of left) {
          try { await this.#subscription(r.topic, r.join); r.resolve(); } catch (err) { r.reject(err); }
        }
      })();
    };
    this.#current = conn;
    // Some WebSocket implementations (Node 20's) report a refused upgrade with `error`
    // and never `close`; a hung upgrade reports nothing. Either counts as a failure.
    let failed = false;
    const fail = (why) => {
      if (this.#current !== conn || opened || failed) return;
      failed = true;
      clearTimeout(openTimer);
      try { socket.close(); } catch { /* not open */ }
      this.#wsFailed(new Error(why), url);
    };
    const openTimer = setTimeout(() => fail('websocket did not open in time'), this.#opts.openTimeoutMs);
    socket.onopen = () => { opened = true; clearTimeout(openTimer); };
    socket.onmessage = (event) => {
      if (this.#current !== conn) return;
      if (typeof event.data !== 'string') return;
      let frame;
      try { frame = JSON.parse(event.data); } catch { return; }
      if (frame.type === 'hello') {
        this.#wsFailures = 0;
        this.#transport = 'ws';
      } else if (frame.type === 'subscription') {
        answered(frame);
      }
      this.#onFrame(frame);
    };
    socket.onerror = () => fail('websocket failed before opening'); // once open, onclose follows
    socket.onclose = (event) => {
      if (!opened) { fail(`websocket closed before opening (code ${event.code})`); return; }
      unanswered();
      if (this.#current !== conn) return;
      this.#current = null;
      this.#transport = null;
      if (event.code === CloseCode.TOKEN_EXPIRED && !this.#canRefreshToken()) {
        // The one token we have expired, and nothing can give us another: every retry
        // would be refused. Say so and stop, as the SSE path does on 401.
        this.#emit('onError', new Error(`herald: the token expired (close ${event.code}) and there is no getToken to renew it; closing`));
        this.close();
        return;
      }
      if (AUTH_CLOSE_CODES.has(event.code)) this.#refreshToken = true;
      if (event.code === CloseCode.SLOW_CONSUMER && this.#nextDelayMs == null) {
        // Resume right away (jittered a little): we were only slow, nothing is wrong.
        this.#nextDelayMs = Math.random() * this.#opts.backoffBaseMs;
      }
      this.#schedule({ code: event.code, reason: event.reason });
    };
  }

  #wsFailed(err, wsUrl) {
    // A failed upgrade looks the same to a browser whatever the status (401, 404, 503, a
    // proxy): a fresh token costs little and rules out expiry.
    this.#refreshToken = true;
    // Only a WebSocket failure while the gateway answers plain HTTP, and is not busy,
    // says "WebSocket is blocked"; a server that is down (a restart) or refusing
    // connections for now (a reconnect storm) must not push us onto SSE.
    const probe = { kind: 'probe', close() {} };
    this.#current = probe;
    this.#probe(wsUrl).then((answer) => {
      if (this.#closed || this.#current !== probe) return;
      this.#current = null;
      const detail = { reason: err.message };
      if (answer?.status === 503 || answer?.status === 429) {
        // Admission control said no (503: too many opening, with Retry-After; 429: this
        // user's connection cap). The probe got past authentication with this token.
        this.#refreshToken = false;
        // Never exactly the server's time: the probe tells every client the same "busy
        // until", and a crowd that waited exactly that would come back in the same
        // instant and fill the gateway again. Full jitter on top: [r, 2r].
        const waitMs = retryAfterMs(answer.retryAfter);
        if (waitMs != null) this.#nextDelayMs = waitMs + Math.random() * Math.max(waitMs, this.#opts.backoffBaseMs);
        Object.assign(detail, { reason: 'gateway busy', status: answer.status });
      } else if (answer?.status === 401 || answer?.status === 403) {
        if (!this.#canRefreshToken()) {
          // A fixed token the gateway refuses stays refused: stop, as the SSE path does.
          this.#emit('onError', new HttpError(answer.status, 'the gateway refused the token for WebSocket, and there is no getToken to renew it; closing'));
          this.close();
          return;
        }
        Object.assign(detail, { reason: 'token refused', status: answer.status });
      } else if (answer) {
        this.#wsFailures += 1;
      }
      if (this.#opts.transport === 'auto' && this.#wsFailures >= this.#opts.wsFailuresBeforeFallback) {
        this.#useSse = true;
        this.#nextDelayMs = 0;
        this.#emit('onError', new Error(`herald: WebSocket failed ${this.#wsFailures} times before opening while HTTP works; falling back to SSE`));
      }
      this.#schedule(detail);
    });
  }

  /**
   * Asks the gateway what a failed upgrade could not tell: a plain GET of the WebSocket
   * URL (same token) is answered with what admission says now — 503 + Retry-After while
   * busy, 429 at the user's cap, 401 for the token, 426 when it would take the upgrade.
   * `{status, retryAfter}`; `{status: 0}` when only `/healthz` answered (a gateway too old
   * to answer the probe cross-origin); null when nothing did (down).
   */
  async #probe(wsUrl) {
    const httpUrl = String(wsUrl).replace(/^ws/, 'http');
    try {
      const r = await fetch(httpUrl, { cache: 'no-store', signal: AbortSignal.timeout(5_000) });
      r.body?.cancel().catch(() => {});
      return { status: r.status, retryAfter: r.headers.get('retry-after') };
    } catch {
      // Down, or a cross-origin answer the browser would not let us read.
    }
    try {
      // `no-cors`: an opaque answer is enough to know the server is there, cross-origin too.
      await fetch(this.#opts.url + '/healthz', { mode: 'no-cors', cache: 'no-store', signal: AbortSignal.timeout(5_000) });
      return { status: 0 };
    } catch {
      return null;
    }
  }

  #openSse(token) {
    const ES = globalThis.EventSource;
    const useEventSource = this.#opts.sse === 'eventsource' || (this.#opts.sse === 'auto' && typeof ES === 'function');
    if (useEventSource) this.#openEventSource(ES, token);
    else this.#openFetchSse(token);
  }

  #sseUrl() {
    const url = new URL(this.#opts.sseUrl ?? this.#opts.url + '/v1/sse');
    if (this.#position != null) url.searchParams.set('after', String(this.#position));
    return url;
  }

  #openEventSource(ES, token) {
    const url = this.#sseUrl();
    url.searchParams.set('access_token', token);
    const source = new ES(url.toString());
    const conn = { kind: 'sse', close: () => source.close() };
    this.#current = conn;
    let greeted = false;
    const onEvent = (event) => {
      if (this.#current !== conn) return;
      let frame;
      try { frame = JSON.parse(event.data); } catch { return; }
      if (frame.type === 'hello') {
        greeted = true;
        this.#transport = 'sse';
      }
      this.#onFrame(frame);
    };
    for (const name of ['message', 'hello', 'notification', 'batch', 'read', 'reconnect']) {
      source.addEventListener(name, onEvent);
    }
    source.onerror = () => {
      // EventSource would retry by itself, with the old URL (old `after`, old token).
      // Take over: close it and reconnect on our own schedule.
      if (this.#current !== conn) return;
      source.close();
      this.#refreshToken = true;
      this.#current = null;
      this.#transport = null;
      if (!greeted && !this.#canRefreshToken()) {
        // It never opened, and EventSource does not say why. With a fixed token a 401
        // (an expired token) would repeat for ever: ask, and stop on one.
        this.#checkSseToken(url);
        return;
      }
      this.#schedule({ reason: 'event stream interrupted' });
    };
  }

  /** After an EventSource failed to open with a fixed token: a plain GET of the same URL
   *  says whether the token is refused (then `onError` and close) or not (retry). */
  #checkSseToken(url) {
    const probe = { kind: 'probe', close() {} };
    this.#current = probe;
    const abort = new AbortController();
    const timeout = setTimeout(() => abort.abort(), 5_000);
    fetch(url, { cache: 'no-store', signal: abort.signal })
      .then((r) => r.status, () => null) // down, or a cross-origin answer we may not read
      .then((status) => {
        clearTimeout(timeout);
        abort.abort(); // a stream that did open is not read
        if (this.#closed || this.#current !== probe) return;
        this.#current = null;
        if (status === 401 || status === 403) {
          this.#emit('onError', new HttpError(status, 'the gateway refused the token for SSE, and there is no getToken to renew it; closing'));
          this.close();
          return;
        }
        this.#schedule({ reason: 'event stream interrupted', ...(status ? { status } : {}) });
      });
  }

  #openFetchSse(token) {
    const abort = new AbortController();
    const conn = { kind: 'sse', close: () => abort.abort() };
    this.#current = conn;
    let watchdog = null;
    const arm = (seconds) => {
      clearTimeout(watchdog);
      // Keep-alive comments arrive every heartbeat_s: silence for 2.5 beats means dead.
      if (seconds > 0) watchdog = setTimeout(() => abort.abort(new Error('no keep-alive from server')), seconds * 2500);
    };
    let heartbeatS = 0;
    const run = async () => {
      const response = await fetch(this.#sseUrl(), {
        headers: { authorization: `Bearer ${token}`, accept: 'text/event-stream' },
        signal: abort.signal,
        cache: 'no-store',
      });
      if (!response.ok) throw new HttpError(response.status, await response.text().catch(() => ''));
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = '';
      let data = [];
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return;
        arm(heartbeatS);
        buffer += value;
        let newline;
        while ((newline = buffer.search(/\r\n|\r|\n/)) >= 0) {
          const line = buffer.slice(0, newline);
          buffer = buffer.slice(newline + (buffer.startsWith('\r\n', newline) ? 2 : 1));
          if (line === '') {
            // End of one event.
            if (data.length > 0 && this.#current === conn) {
              let frame = null;
              try { frame = JSON.parse(data.join('\n')); } catch { /* not ours */ }
              if (frame?.type === 'hello') {
                this.#transport = 'sse';
                heartbeatS = Number(frame.heartbeat_s) || 0;
                arm(heartbeatS);
              }
              if (frame) this.#onFrame(frame);
            }
            data = [];
          } else if (line.startsWith('data:')) {
            data.push(line.slice(line.startsWith('data: ') ? 6 : 5));
          }
          // `event:`, `id:`, `retry:` and `:` comments: the frame's own `type` and `seq`
          // carry everything needed.
        }
      }
    };
    run().then(
      () => this.#sseEnded(conn, null),
      (err) => this.#sseEnded(conn, err),
    ).finally(() => clearTimeout(watchdog));
  }

  #sseEnded(conn, err) {
    if (this.#current !== conn) return;
    this.#current = null;
    this.#transport = null;
    if (err instanceof HttpError && (err.status === 401 || err.status === 403)) {
      if (!this.#canRefreshToken()) {
        this.#emit('onError', err);
        this.close();
        return;
      }
      this.#refreshToken = true;
    }
    if (err) this.#emit('onError', err);
    this.#schedule({ reason: err ? err.message : 'event stream ended' });
  }

  #schedule(detail) {
    if (this.#closed) return;
    this.#generation += 1;
    clearTimeout(this.#timer);
    // The back-off starts over only after a connection that stayed up: one that went
    // live and dropped at once is a failure like any other.
    if (this.#liveSince != null && Date.now() - this.#liveSince >= this.#opts.stableMs) this.#attempt = 0;
    this.#liveSince = null;
    let delayMs = this.#nextDelayMs;
    this.#nextDelayMs = null;
    if (delayMs == null) {
      const ceiling = Math.min(this.#opts.backoffMaxMs, this.#opts.backoffBaseMs * 2 ** this.#attempt);
      delayMs = Math.random() * ceiling; // full jitter
      // Only waits of our own choosing grow the next one; a server's (`reconnect`,
      // `Retry-After`) or the application's (`reconnect()`) are no failed attempt.
      this.#attempt = Math.min(this.#attempt + 1, 30);
    }
    this.#setState('reconnecting', { ...detail, delayMs, attempt: this.#attempt });
    this.#timer = setTimeout(() => this.#open(), delayMs);
  }

  #teardown() {
    this.#generation += 1;
    const current = this.#current;
    this.#current = null;
    this.#transport = null;
    current?.close();
  }

  /** Whether a refused token can be replaced (the application gave `getToken`). */
  #canRefreshToken() {
    return typeof this.#opts.getToken === 'function';
  }

  async #currentToken() {
    if (typeof this.#opts.getToken === 'function' && (this.#token == null || this.#refreshToken)) {
      this.#token = await this.#opts.getToken();
      this.#refreshToken = false;
    }
    return this.#token;
  }

  // ---- frames ---------------------------------------------------------------------------

  #onFrame(frame) {
    switch (frame.type) {
      case 'hello':
        this.#liveSince = Date.now();
        if (this.#position != null && (frame.last_seq ?? 0) < this.#position) {
          // The inbox's newest seq is below our position: the position is from another
          // life of the inbox (its stream was recreated or restored, so seqs began
          // again), and the server replays the whole inbox. Take it: seqs we delivered
          // before say nothing now (ids we remember still drop what we had).
          this.#position = 0;
          this.#deliveredMax = 0;
          this.#latestSeq = 0;
        }
        this.#latestSeq = Math.max(this.#latestSeq, frame.last_seq ?? 0);
        // A live-only start resumes, next time, from where this connection started.
        if (this.#position == null) this.#position = frame.last_seq ?? 0;
        // `unread` counts the replay that follows too: do not count those twice.
        this.#countedUpTo = frame.last_seq ?? 0;
        this.#setUnread(frame.unread ?? 0);
        this.#emit('onHello', frame);
        this.#setState('live', { transport: this.#transport });
        break;
      case 'notification':
        this.#deliver(frame);
        break;
      case 'batch':
        for (const item of frame.items ?? []) this.#deliver(item);
        break;
      case 'read':
        this.#onRead(frame.up_to);
        break;
      case 'reconnect':
        // The server spreads its clients over a window; use its delay, not ours.
        this.#nextDelayMs = Math.max(0, Number(frame.after_ms) || 0);
        break;
      default:
        break; // frames this SDK does not know yet
    }
    this.#checkWaiters();
  }

  #deliver(raw) {
    const { type: _type, ...n } = raw;
    if (!Number.isSafeInteger(n.seq)) return;
    if (n.seq <= this.#deliveredMax || this.#recentIds.has(n.id)) return; // duplicate
    this.#deliveredMax = n.seq;
    this.#position = Math.max(this.#position ?? 0, n.seq);
    this.#latestSeq = Math.max(this.#latestSeq, n.seq);
    this.#recentIds.add(n.id);
    if (this.#recentIds.size > this.#opts.dedupWindow) {
      this.#recentIds.delete(this.#recentIds.values().next().value);
    }
    if (n.seq > this.#countedUpTo) {
      this.#countedUpTo = n.seq;
      if (!n.read) this.#setUnread(this.#unread + 1);
    }
    this.#emit('onNotification', n);
  }

  #onRead(upTo) {
    if (!Number.isSafeInteger(upTo)) return;
    this.#emit('onRead', upTo);
    if (upTo >= this.#latestSeq) {
      this.#setUnread(0);
    } else {
      // Read up to somewhere in the middle: only the server knows how many are left.
      this.#http('GET', '/v1/me/unread').then(
        (body) => { if (typeof body?.unread === 'number') { this.#setUnread(body.unread); this.#checkWaiters(); } },
        (err) => this.#emit('onError', err),
      );
    }
  }

  #setUnread(n) {
    if (n === this.#unread) return;
    this.#unread = n;
    this.#emit('onUnread', n);
  }

  #setState(state, detail) {
    this.#state = state;
    this.#emit('onState', state, detail);
    this.#checkWaiters();
  }

  #checkWaiters() {
    for (const w of this.#waiters) {
      let ok = false;
      try { ok = w.predicate(this); } catch (err) { this.#waiters.delete(w); clearTimeout(w.timer); w.reject(err); continue; }
      if (ok) { this.#waiters.delete(w); clearTimeout(w.timer); w.resolve(this); }
    }
  }

  #emit(name, ...args) {
    const handler = this.#opts[name];
    if (typeof handler !== 'function') return;
    try { handler(...args); } catch (err) {
      // An application bug must not break delivery.
      if (name !== 'onError') this.#emit('onError', err);
    }
  }

  // ---- HTTP -----------------------------------------------------------------------------

  async #http(method, path, body) {
    for (let tries = 0; ; tries += 1) {
      const token = await this.#currentToken();
      const response = await fetch(this.#opts.url + path, {
        method,
        headers: {
          authorization: `Bearer ${token}`,
          ...(body === undefined ? {} : { 'content-type': 'application/json' }),
        },
        body: body === undefined ? undefined : JSON.stringify(body),
      });
      if (response.status === 401 && tries === 0 && typeof this.#opts.getToken === 'function') {
        this.#refreshToken = true;
        continue;
      }
      const text = await response.text();
      if (!response.ok) throw new HttpError(response.status, text);
      return text ? JSON.parse(text) : null;
    }
  }

  #WebSocket() {
    return this.#opts.WebSocket ?? globalThis.WebSocket;
  }
}

/** A `Retry-After` value (seconds or an HTTP date) in ms, or null. */
function retryAfterMs(value) {
  if (value == null || value.trim() === '') return null;
  const secs = Number(value);
  const ms = Number.isFinite(secs) ? secs * 1000 : Date.parse(value) - Date.now();
  return Number.isFinite(ms) ? Math.min(Math.max(ms, 0), MAX_RETRY_AFTER_MS) : null;
}
