// Types for herald.js (the Herald client SDK). SPEC.md §4–§5 define the shapes.

/** A notification as delivered (SPEC §4). */
export interface Notification {
  id: string;
  seq: number;
  user_id: string;
  category?: string | null;
  priority?: 'high' | 'normal' | 'low';
  title?: string | null;
  body?: string | null;
  data?: Record<string, unknown>;
  topic?: string | null;
  created_at: string;
  read: boolean;
  [extra: string]: unknown;
}

/** The first frame of every connection. */
export interface Hello {
  type: 'hello';
  user_id: string;
  last_seq: number;
  unread: number;
  heartbeat_s: number;
}

export type ConnectionState = 'connecting' | 'live' | 'reconnecting' | 'closed';
export type Transport = 'ws' | 'sse';

/** Why the state changed: the transport once live; the wait and cause when reconnecting. */
export interface StateDetail {
  transport?: Transport | null;
  delayMs?: number;
  attempt?: number;
  code?: number;
  reason?: string;
  /** The HTTP status the gateway gave a probe after a failed upgrade (503/429: busy,
   *  waited out without counting toward the SSE fallback; 401/403: the token). */
  status?: number;
}

export interface ConnectOptions {
  /** Herald's base URL, e.g. `https://herald.example.com`. Defaults to the page's origin. */
  url?: string;
  /** A user JWT. Give this or `getToken`. */
  token?: string;
  /** Called for the first token and whenever the server may have refused the current one.
   *  Without it, a `token` the server refuses or expires (401/403, close 4001) ends the
   *  connection: `onError`, then state `'closed'`. */
  getToken?: () => string | Promise<string>;
  /** Resume after this seq (replay what came after it). Omitted: live only from now. */
  after?: number;
  /** `'auto'` (default): WebSocket, falling back to SSE when WebSocket is blocked. */
  transport?: 'auto' | 'ws' | 'sse';
  /** SSE reader: the browser's EventSource (token in the query) or fetch streaming. */
  sse?: 'auto' | 'eventsource' | 'fetch';
  /** Overrides the WebSocket endpoint (default `<url>/v1/ws`, scheme ws/wss). */
  wsUrl?: string;
  /** Overrides the SSE endpoint (default `<url>/v1/sse`). */
  sseUrl?: string;
  /** A WebSocket constructor (e.g. from the `ws` package) where there is no global one. */
  WebSocket?: unknown;
  /** First backoff ceiling, ms (default 500); doubles per failed attempt. */
  backoffBaseMs?: number;
  /** Largest backoff ceiling, ms (default 30000). The wait is uniform in [0, ceiling]. */
  backoffMaxMs?: number;
  /** How long a connection must stay live before the backoff starts over from
   *  `backoffBaseMs`, ms (default 10000). A connection dropped sooner counts as one more
   *  failed attempt, so a server that greets and then drops every client at once does
   *  not have them all back in a tight loop. */
  stableMs?: number;
  /** WebSocket failures before opening after which `'auto'` moves to SSE for good
   *  (default 3). Only failures while the gateway answers HTTP and is not busy count:
   *  after each, a plain GET of the WebSocket URL asks it, and a 503 or 429 (busy, or the
   *  user's connection cap) is waited out instead: its `Retry-After` plus a random share
   *  of as much again, so clients told the same time do not all return at once. */
  wsFailuresBeforeFallback?: number;
  /** A WebSocket that has not opened after this long counts as failed (default 10000). */
  openTimeoutMs?: number;
  /** How many recent ids are remembered for de-duplication (default 2048). */
  dedupWindow?: number;
  /** How long `subscribe()`/`unsubscribe()` wait for the gateway's answer over
   *  WebSocket before rejecting, ms (default 10000). */
  requestTimeoutMs?: number;
  onNotification?: (notification: Notification) => void;
  onState?: (state: ConnectionState, detail: StateDetail) => void;
  /** The user's read position moved (this device or another). */
  onRead?: (upTo: number) => void;
  onUnread?: (unread: number) => void;
  onHello?: (hello: Hello) => void;
  onError?: (error: Error) => void;
}

/** Close codes the gateway uses. */
export declare const CloseCode: Readonly<{
  GOING_AWAY: 1001;
  UNSUPPORTED: 1003;
  INVALID_PAYLOAD: 1007;
  POLICY: 1008;
  TOO_BIG: 1009;
  INTERNAL: 1011;
  HEARTBEAT: 4000;
  /** The token expired: reconnect with a fresh one. With a fixed `token` (no
   *  `getToken`) the connection reports it through `onError` and closes. */
  TOKEN_EXPIRED: 4001;
  SLOW_CONSUMER: 4008;
}>;

/** `subscribe()`/`unsubscribe()` was refused (the topic does not allow users to join
 *  themselves, a malformed name, the store unavailable) or got no answer in time. */
export declare class SubscriptionError extends Error {
  readonly name: 'SubscriptionError';
  /** The topic asked for. */
  readonly topic: string;
  /** Why, in the server's words (or that it did not answer). */
  readonly reason: string;
  /** The HTTP status, when the request went over HTTP (no open WebSocket). */
  readonly status?: number;
}

export declare class HeraldConnection {
  constructor(options: ConnectOptions);
  readonly state: ConnectionState;
  readonly transport: Transport | null;
  /** The seq the next connection resumes after (`null` before the first hello). */
  readonly lastSeq: number | null;
  readonly unread: number;
  /** The newest seq known to exist in the user's inbox. */
  readonly latestSeq: number;
  /** Marks read up to `upTo` (default: newest known); resolves with the unread count. */
  markRead(upTo?: number): Promise<number>;
  /** Seen live up to `upTo` (default: newest delivered); WebSocket only. */
  ack(upTo?: number): boolean;
  /** Joins `topic` for good (the server stores it: it holds across reconnects and is not
   *  repeated by them). Resolves once the server confirmed; rejects with a
   *  `SubscriptionError` when it refused or did not answer within `requestTimeoutMs`. */
  subscribe(topic: string): Promise<void>;
  /** Leaves `topic`; settles as `subscribe` does. */
  unsubscribe(topic: string): Promise<void>;
  /** Drops the current connection and reconnects now, resuming from `lastSeq`. */
  reconnect(): void;
  /** Resolves once `predicate` holds; rejects after `timeoutMs` (default 10000). */
  until(predicate: (connection: HeraldConnection) => boolean, timeoutMs?: number): Promise<HeraldConnection>;
  close(): void;
}

/** Opens a self-healing connection. */
export declare function connect(options: ConnectOptions): HeraldConnection;
