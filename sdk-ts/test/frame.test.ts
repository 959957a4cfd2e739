// Unit tests of the frame codec, on the example frames of
// schema/PROTOCOL.md.

import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { fromBinary } from "@bufbuild/protobuf";
import {
  encodeFrame,
  endpointsOf,
  FrameDecoder,
  FrameError,
  Kind,
  kindOf,
  LoginRequestSchema,
  LoginResponseSchema,
  parseHeader,
} from "../src/index.js";

function hex(s: string): Uint8Array {
  const clean = s
    .split("\n")
    .map((l) => l.replace(/#.*/, ""))
    .join(" ")
    .replace(/\s+/g, "");
  return Uint8Array.from(clean.match(/../g)!.map((b) => parseInt(b, 16)));
}

// The login response example of PROTOCOL.md.
const loginResponse = hex(`
58 44 01 01 00 01 00 00 00 00 00 65 00 00 00 00
00 00 00 00 00 00 00 2a 00 00 00 01 00 00 00 00 00 00 30 39 00 00 00 1d
08 01 10 80 d0 ea b6 b7 33 18 b0 ea 01 20 90 bf 05 2a 04 67 77 2d 31 30 80 80 04 38 01
`);

describe("frame codec", () => {
  it("decodes the login response of the protocol document", () => {
    const h = parseHeader(loginResponse);
    assert.equal(kindOf(h), Kind.Response);
    assert.equal(h.cmd, 1);
    assert.equal(h.appcode, 101);
    assert.equal(h.uid, 42n);
    assert.equal(h.seq, 1);
    assert.equal(h.logid, 12345n);
    assert.equal(h.bodyLen, 29);
    const r = fromBinary(LoginResponseSchema, loginResponse.subarray(40));
    assert.equal(r.keepaliveMs, 30000);
    assert.equal(r.serverTimeMs, 1767225600000n);
    assert.equal(r.gateId, "gw-1");
  });

  it("encodes the login request of the protocol document", () => {
    const token = "101.42.1893456000.969DG_jCY6JZX69Gl7LdFgglhV7rAElQfJ6VouAAHaQ";
    const body = new Uint8Array([0x0a, token.length, ...new TextEncoder().encode(token), 0x12, 5, ...new TextEncoder().encode("dev-1")]);
    const f = encodeFrame({ cmd: 1, appcode: 101, uid: 42n, seq: 1 }, body);
    assert.deepEqual(
      Array.from(f.subarray(0, 40)),
      Array.from(hex("58 44 01 00 00 01 00 00 00 00 00 65 00 00 00 00 00 00 00 00 00 00 00 2a 00 00 00 01 00 00 00 00 00 00 00 00 00 00 00 46")),
    );
    assert.equal(fromBinary(LoginRequestSchema, f.subarray(40)).deviceId, "dev-1");
  });

  it("reassembles frames from chunks of any size", () => {
    const frames = [
      encodeFrame({ cmd: 0x31, flags: Kind.Notify, uid: 2n ** 64n - 1n }, new Uint8Array([1, 2, 3])),
      encodeFrame({ cmd: 3, flags: Kind.Response, seq: 7 }),
      encodeFrame({ cmd: 0x30, flags: Kind.Response, seq: 8 }, new Uint8Array(5000).fill(9)),
    ];
    const all = new Uint8Array(frames.reduce((n, f) => n + f.length, 0));
    let at = 0;
    for (const f of frames) {
      all.set(f, at);
      at += f.length;
    }
    for (const size of [1, 7, 40, 41, 1000, all.length]) {
      const d = new FrameDecoder();
      const got = [];
      for (let i = 0; i < all.length; i += size) {
        got.push(...d.push(all.subarray(i, i + size)));
      }
      assert.equal(got.length, 3, `chunks of ${size}`);
      assert.equal(got[0].header.uid, 2n ** 64n - 1n);
      assert.deepEqual(Array.from(got[0].body), [1, 2, 3]);
      assert.equal(got[1].header.seq, 7);
      assert.equal(got[1].body.length, 0);
      assert.equal(got[2].body.length, 5000);
      assert.equal(d.buffered, 0);
    }
  });

  it("rejects bad magic, version, flags and oversized bodies", () => {
    const good = encodeFrame({ cmd: 1 }, new Uint8Array(10));
    const bad = (patch: (b: Uint8Array) => void) => {
      const b = good.slice();
      patch(b);
      return b;
    };
    assert.throws(() => new FrameDecoder().push(bad((b) => (b[0] = 0))), FrameError);
    assert.throws(() => new FrameDecoder().push(bad((b) => (b[2] = 2))), FrameError);
    assert.throws(() => new FrameDecoder().push(bad((b) => (b[3] = 3))), FrameError);
    assert.throws(() => new FrameDecoder().push(bad((b) => (b[3] = 0x20))), FrameError);
    assert.throws(() => new FrameDecoder(5).push(good), FrameError);
  });
});

describe("endpoints", () => {
  it("derives the WebSocket and long-poll URLs from a base URL, WebSocket first", () => {
    assert.deepEqual(endpointsOf({ urls: ["https://chat.example.com"] }), [
      { kind: "websocket", url: "wss://chat.example.com/ws" },
      { kind: "longpoll", url: "https://chat.example.com/lp" },
    ]);
    assert.deepEqual(endpointsOf({ urls: ["http://127.0.0.1:7072/im/"], transports: ["longpoll"] }), [
      { kind: "longpoll", url: "http://127.0.0.1:7072/im/lp" },
    ]);
    assert.deepEqual(endpointsOf({ wsUrl: "ws://h/ws", lpUrl: "http://h/lp/" }), [
      { kind: "websocket", url: "ws://h/ws" },
      { kind: "longpoll", url: "http://h/lp" },
    ]);
  });
});
