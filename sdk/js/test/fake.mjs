// A scripted stand-in for a gateway, for what a real Herald will not do on demand: greet
// and drop at once, refuse every upgrade as busy, never answer a frame. Plain node:http;
// just enough of RFC 6455 to accept an upgrade and send text and close frames.
import { createServer } from 'node:http';
import { createHash } from 'node:crypto';
import { once } from 'node:events';

const GUID = '258EAFA5-E914-47DA-95CA-C5AB0DC85B11';

/** A frame the server sends (unmasked, unfragmented). */
function frame(opcode, payload) {
  const len = payload.length;
  const head = len < 126 ? Buffer.from([0x80 | opcode, len]) : Buffer.from([0x80 | opcode, 126, len >> 8, len & 0xff]);
  return Buffer.concat([head, payload]);
}

/** An accepted WebSocket, server side. */
class FakeSocket {
  constructor(socket) {
    this.socket = socket;
    socket.on('data', () => {}); // client frames are not read
    socket.on('error', () => {});
  }

  send(obj) {
    this.socket.write(frame(0x1, Buffer.from(JSON.stringify(obj))));
  }

  /** Sends a close frame and hangs up. */
  close(code = 1011) {
    this.socket.end(frame(0x8, Buffer.from([code >> 8, code & 0xff])));
  }
}

/**
 * Starts a fake gateway on 127.0.0.1. `onUpgrade(upgrade)` decides each WebSocket
 * upgrade: `upgrade.accept()` (returns a FakeSocket) or `upgrade.refuse(status, headers)`.
 * `onRequest(req, res)` answers plain HTTP (the SDK's probe, `/healthz`); by default 404.
 */
export async function fakeGateway({ onUpgrade, onRequest }) {
  const server = createServer((req, res) => {
    if (onRequest) onRequest(req, res);
    else res.writeHead(404).end();
  });
  const sockets = new Set();
  server.on('connection', (s) => { sockets.add(s); s.on('close', () => sockets.delete(s)); });
  server.on('upgrade', (req, socket) => {
    onUpgrade({
      req,
      accept() {
        const key = createHash('sha1').update(req.headers['sec-websocket-key'] + GUID).digest('base64');
        socket.write(`HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ${key}\r\n\r\n`);
        return new FakeSocket(socket);
      },
      refuse(status, headers = {}) {
        const lines = Object.entries({ ...headers, 'content-length': 0, connection: 'close' }).map(([k, v]) => `${k}: ${v}\r\n`);
        socket.end(`HTTP/1.1 ${status} Refused\r\n${lines.join('')}\r\n`);
      },
    });
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    close() {
      for (const s of sockets) s.destroy();
      server.close();
    },
  };
}

/** A `hello` frame as the gateway sends it. */
export const hello = (user = 'fake') => ({ type: 'hello', user_id: user, last_seq: 0, unread: 0, heartbeat_s: 30 });
