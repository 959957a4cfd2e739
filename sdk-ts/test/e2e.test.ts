// End-to-end tests of the SDK against a real imd, over WebSocket and over
// long-poll, with a Go SDK client (internal/testpeer) on the other end.

import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import { Client, ClientError, StatusError, type C2CMessage, type ClientOptions, type State } from "../src/index.js";
import { buildBins, eventually, Imd, Peer, type Bins } from "./harness.js";

const dec = new TextDecoder();
let bins: Bins;
let imd: Imd;
let nextUid = 1000;

before(async () => {
  bins = await buildBins();
  imd = new Imd(bins);
  await imd.start();
});

after(async () => {
  await imd?.cleanup();
});

/** What a test client saw. */
interface Seen {
  c2c: C2CMessage[];
  states: State[];
  kicked: number;
}

for (const transport of ["websocket", "longpoll"] as const) {
  describe(`over ${transport}`, () => {
    const clients: Client[] = [];
    const peers: Peer[] = [];

    after(async () => {
      await Promise.all(clients.map((c) => c.close().catch(() => {})));
      await Promise.all(peers.map((p) => p.close()));
    });

    function newClient(extra: Partial<ClientOptions> = {}): { client: Client; seen: Seen } {
      const seen: Seen = { c2c: [], states: [], kicked: 0 };
      const client = new Client({
        urls: [imd.webUrl],
        transports: [transport],
        requestTimeoutMs: 5000,
        backoffMinMs: 100,
        backoffMaxMs: 1000,
        onC2C: (m) => {
          seen.c2c.push(m);
        },
        onState: (s) => seen.states.push(s),
        onKickout: () => seen.kicked++,
        ...extra,
      });
      clients.push(client);
      return { client, seen };
    }

    async function loggedIn(uid: number, extra: Partial<ClientOptions> = {}) {
      const c = newClient(extra);
      await c.client.login({ appcode: 101, uid, token: await imd.token(uid) });
      return c;
    }

    async function peer(uid: number): Promise<Peer> {
      const p = await Peer.start(bins, imd, uid);
      peers.push(p);
      return p;
    }

    const texts = (s: Seen) => s.c2c.map((m) => dec.decode(m.content));

    it("logs in", async () => {
      const uid = nextUid++;
      const { client, seen } = await loggedIn(uid);
      assert.equal(client.transportKind, transport);
      assert.equal(client.getState(), "online");
      assert.ok(client.loginInfo!.keepaliveMs > 0);
      assert.equal(client.loginInfo!.account, 1);
      assert.ok((await client.keepalive()) >= 0);
      assert.equal((await client.offlineCount()).count, 0n);
      await client.logout();
      assert.equal(client.getState(), "closed");
      assert.deepEqual(seen.states, ["online", "closed"]);
    });

    it("refuses a wrong token with 2001 and stays usable", async () => {
      const uid = nextUid++;
      const { client } = newClient();
      const token = await imd.token(uid);
      const bad = token.slice(0, -4) + (token.endsWith("AAAA") ? "BBBB" : "AAAA");
      await assert.rejects(client.login({ appcode: 101, uid, token: bad }), (err: unknown) => {
        assert.ok(err instanceof StatusError, String(err));
        assert.equal(err.status, 2001);
        return true;
      });
      await client.login({ appcode: 101, uid, token });
      assert.equal(client.getState(), "online");
    });

    it("is kicked out by a second login of the same terminal", async () => {
      const uid = nextUid++;
      const first = await loggedIn(uid);
      const second = await loggedIn(uid);
      await eventually(() => first.seen.kicked === 1, 10000, "the kickout");
      assert.equal(first.client.getState(), "closed");
      await assert.rejects(first.client.offlineCount(), (err: unknown) => err instanceof ClientError && err.code === "closed");
      assert.equal(second.client.getState(), "online");
      assert.equal(second.seen.kicked, 0);
    });

    it("chats both ways with a Go SDK client", async () => {
      const uid = nextUid++;
      const peerUid = nextUid++;
      const receipts: bigint[] = [];
      const { client, seen } = await loggedIn(uid, { onReceipt: (r) => receipts.push(r.msgid) });
      const p = await peer(peerUid);
      const r1 = await client.sendC2C({ account: 1, uid: peerUid }, 1, "hello from ts");
      assert.ok(r1.msgid > 0n);
      assert.equal(client.sendFloor, r1.msgid);
      const r2 = await client.sendC2C({ account: 1, uid: peerUid }, 1, new TextEncoder().encode("second"));
      assert.ok(r2.msgid > r1.msgid, "after_msgid keeps the order");
      await p.waitFor((e) => e.event === "c2c" && e.content === "second");
      assert.deepEqual(p.received(), ["hello from ts", "second"]);
      // The Go peer acknowledged both: this sender gets a receipt for each.
      await eventually(() => receipts.length === 2, 10000, "the receipts");
      assert.deepEqual(receipts, [r1.msgid, r2.msgid]);

      await p.send(uid, "hello from go");
      await p.send(uid, "again from go");
      await eventually(() => seen.c2c.length === 2, 10000, "two messages");
      assert.deepEqual(texts(seen), ["hello from go", "again from go"]);
      assert.equal(seen.c2c[0].from!.uid, BigInt(peerUid));
      // The Go peer gets a receipt for each once the acks went out.
      await p.waitFor((e) => e.event === "receipt" && e.msgid === String(seen.c2c[1].msgid));

      const h = await client.syncHistory({ account: 1, uid: peerUid }, 0n, 10);
      assert.deepEqual(
        h.messages.map((m) => dec.decode(m.content)),
        ["hello from ts", "second", "hello from go", "again from go"],
      );
    });

    it("pipelines sends made without waiting, and keeps their order", async () => {
      const uid = nextUid++;
      const peerUid = nextUid++;
      const { client } = await loggedIn(uid, { sendWindow: 16 });
      const rx = await loggedIn(peerUid);
      const n = 100;
      const calls = Array.from({ length: n }, (_, i) => client.sendC2C({ account: 1, uid: peerUid }, 1, `p${String(i).padStart(3, "0")}`));
      const answers = await Promise.all(calls);
      for (let i = 1; i < n; i++) {
        assert.ok(answers[i].msgid > answers[i - 1].msgid, `send ${i} got a msgid below send ${i - 1}'s`);
      }
      assert.equal(client.sendFloor, answers[n - 1].msgid);
      await eventually(() => rx.seen.c2c.length >= n, 10000, `${n} messages`);
      const want = Array.from({ length: n }, (_, i) => `p${String(i).padStart(3, "0")}`);
      assert.deepEqual(texts(rx.seen), want);
    });

    it("pulls the offline inbox after login, before live messages, and acks it", async () => {
      const uid = nextUid++;
      const peerUid = nextUid++;
      const p = await peer(peerUid);
      for (let i = 1; i <= 5; i++) {
        await p.send(uid, `offline ${i}`);
      }
      const { client, seen } = await loggedIn(uid, { pageSize: 2 });
      await eventually(() => seen.c2c.length === 5, 10000, "the offline messages");
      assert.deepEqual(texts(seen), [1, 2, 3, 4, 5].map((i) => `offline ${i}`));
      await p.send(uid, "live");
      await eventually(() => seen.c2c.length === 6, 10000, "the live message");
      assert.equal(texts(seen)[5], "live");
      // Every message was acknowledged: the inbox is empty.
      const deadline = Date.now() + 5000;
      let count = -1n;
      while (Date.now() < deadline) {
        count = (await client.offlineCount()).count;
        if (count === 0n) {
          break;
        }
        await new Promise((r) => setTimeout(r, 50));
      }
      assert.equal(count, 0n);
    });

    it("drops duplicates: a retried send is stored once, a message shown before is not shown again", async () => {
      const uid = nextUid++;
      const peerUid = nextUid++;
      const p = await peer(peerUid);
      const { client } = await loggedIn(uid);
      const a = await client.sendC2C({ account: 1, uid: peerUid }, 1, "once", { clientMsgId: "ts-dedup-1" });
      const b = await client.sendC2C({ account: 1, uid: peerUid }, 1, "once", { clientMsgId: "ts-dedup-1" });
      assert.equal(b.msgid, a.msgid);
      assert.equal(b.duplicate, true);
      await p.waitFor((e) => e.event === "c2c" && e.content === "once");
      await new Promise((r) => setTimeout(r, 300));
      assert.deepEqual(p.received(), ["once"]);

      // A terminal that shows a message and dies before its ack gets it
      // again from the inbox: the next run, which remembers the msgid,
      // does not show it but acknowledges it.
      const receiver = nextUid++;
      const sent = await p.send(receiver, "shown before");
      const shown = BigInt(String(sent.msgid));
      const { client: r, seen } = await loggedIn(receiver, { shownMsgids: [shown] });
      await p.send(receiver, "new one");
      await eventually(() => seen.c2c.length === 1, 10000, "the new message");
      assert.deepEqual(texts(seen), ["new one"]);
      let count = -1n;
      for (let i = 0; i < 100 && count !== 0n; i++) {
        count = (await r.offlineCount()).count;
        await new Promise((res) => setTimeout(res, 50));
      }
      assert.equal(count, 0n, "the duplicate was acknowledged");
    });
  });
}

describe("transport fallback", () => {
  it("uses long-poll when the WebSocket cannot connect", async () => {
    const uid = nextUid++;
    const client = new Client({
      wsUrl: "ws://127.0.0.1:1/ws",
      lpUrl: `${imd.webUrl}/lp`,
      connectTimeoutMs: 2000,
    });
    try {
      await client.login({ appcode: 101, uid, token: await imd.token(uid) });
      assert.equal(client.transportKind, "longpoll");
    } finally {
      await client.close();
    }
  });
});

// Last: it restarts the server under every client of the file.
describe("reconnect", () => {
  for (const [transport, how] of [
    ["websocket", "stop"],
    ["longpoll", "stop"],
    ["websocket", "kill"],
    ["longpoll", "kill"],
  ] as const) {
    const cut = how === "stop" ? "drains (SIGTERM, GoAway)" : "is killed (SIGKILL)";
    it(`comes back over ${transport} after the server ${cut} and restarts, logs in again and keeps chatting`, async () => {
      const uid = nextUid++;
      const peerUid = nextUid++;
      const p = await Peer.start(bins, imd, peerUid);
      const seen: C2CMessage[] = [];
      const states: State[] = [];
      const client = new Client({
        urls: [imd.webUrl],
        transports: [transport],
        requestTimeoutMs: 5000,
        backoffMinMs: 100,
        backoffMaxMs: 500,
        onC2C: (m) => {
          seen.push(m);
        },
        onState: (s) => states.push(s),
      });
      try {
        await client.login({ appcode: 101, uid, token: await imd.token(uid) });
        await p.send(uid, "before");
        await eventually(() => seen.length === 1, 10000, "the first message");

        await (how === "stop" ? imd.stop() : imd.kill());
        await eventually(() => client.getState() !== "online", 10000, "the loss");
        await imd.start();
        await eventually(() => client.getState() === "online", 20000, "the reconnect");
        assert.ok(states.includes("offline"), states.join(","));
        assert.equal(client.transportKind, transport);

        // A send while the Go peer may still be reconnecting is stored anyway.
        await client.sendC2C({ account: 1, uid: peerUid }, 1, "after from ts");
        await p.waitFor((e) => e.event === "c2c" && e.content === "after from ts", 30000);
        await p.send(uid, "after from go");
        await eventually(() => seen.length === 2, 15000, "the message after the restart");
        assert.deepEqual(seen.map((m) => dec.decode(m.content)), ["before", "after from go"]);
      } finally {
        await client.close();
        await p.close();
      }
    });
  }
});
