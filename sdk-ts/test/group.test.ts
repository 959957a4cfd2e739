// End-to-end tests of group chat against a real imd, over WebSocket and
// over long-poll, with a Go SDK client (internal/testpeer) in the group:
// messages both ways in seq order, each once; the catch-up after a login;
// a gap left by lost notifies or a cut connection filled by a pull; the
// batched cursors.

import { fromBinary } from "@bufbuild/protobuf";
import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import {
  Client,
  ClientError,
  Cmd,
  GroupNotifySchema,
  GroupEventKind,
  GroupSyncRequestSchema,
  GroupSyncResponseSchema,
  type C2CMessage,
  type ClientOptions,
  type Frame,
  type State,
} from "../src/index.js";
import { buildBins, eventually, Imd, Peer, type Bins } from "./harness.js";

const dec = new TextDecoder();
let bins: Bins;
let imd: Imd;
let nextUid = 5000;

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
  group: C2CMessage[];
  states: State[];
}

/** Asserts that msgs are seqs from..to of their group, each once, in order. */
function assertSeqs(msgs: C2CMessage[], from: number, to: number): void {
  assert.deepEqual(
    msgs.map((m) => Number(m.seq)),
    Array.from({ length: to - from + 1 }, (_, i) => from + i),
  );
  assert.equal(new Set(msgs.map((m) => m.msgid)).size, msgs.length, "each msgid once");
}

for (const transport of ["websocket", "longpoll"] as const) {
  describe(`groups over ${transport}`, () => {
    const clients: Client[] = [];
    const peers: Peer[] = [];

    after(async () => {
      await Promise.all(clients.map((c) => c.close().catch(() => {})));
      await Promise.all(peers.map((p) => p.close()));
    });

    async function loggedIn(uid: number, extra: Partial<ClientOptions> = {}) {
      const seen: Seen = { group: [], states: [] };
      const client = new Client({
        urls: [imd.webUrl],
        transports: [transport],
        requestTimeoutMs: 5000,
        backoffMinMs: 100,
        backoffMaxMs: 1000,
        onGroup: (m) => {
          seen.group.push(m);
        },
        onState: (s) => seen.states.push(s),
        ...extra,
      });
      clients.push(client);
      await client.login({ appcode: 101, uid, token: await imd.token(uid) });
      return { client, seen };
    }

    async function peer(uid: number): Promise<Peer> {
      const p = await Peer.start(bins, imd, uid);
      peers.push(p);
      return p;
    }

    /** Waits until this terminal's cursor of group gid reaches seq. */
    async function ackedUpTo(client: Client, gid: bigint, seq: bigint): Promise<void> {
      let acked = -1n;
      const deadline = Date.now() + 10000;
      while (Date.now() < deadline) {
        const r = await client.request(Cmd.GroupSync, 0, GroupSyncRequestSchema, {}, GroupSyncResponseSchema);
        acked = r.groups.find((g) => g.groupId === gid)?.ackedSeq ?? -1n;
        if (acked === seq) {
          return;
        }
        await new Promise((res) => setTimeout(res, 50));
      }
      assert.equal(acked, seq, "the terminal's cursor");
    }

    const texts = (msgs: C2CMessage[]) => msgs.map((m) => dec.decode(m.content));

    it("chats in a group both ways with a Go SDK client, in seq order, each message once", async () => {
      const uid = nextUid++;
      const peerUid = nextUid++;
      const p = await peer(peerUid);
      const { client, seen } = await loggedIn(uid);
      const gid = await imd.createGroup([uid, peerUid]);
      await eventually(() => seen.group.length === 1, 10000, "the created event");
      assert.equal(seen.group[0].event?.kind, GroupEventKind.GROUP_EVENT_CREATED);
      assert.equal(seen.group[0].groupId, gid);

      const r1 = await client.sendGroup(gid, 1, "ts 1", { clientMsgId: `ts-group-${transport}` });
      assert.equal(r1.seq, 2n);
      assert.equal((await p.sendGroup(gid, "go 1")).seq, "3");
      const r2 = await client.sendGroup(gid, 1, new TextEncoder().encode("ts 2"));
      assert.equal(r2.seq, 4n);
      assert.ok(r2.msgid > r1.msgid, "after_msgid keeps the order");
      assert.equal((await p.sendGroup(gid, "go 2")).seq, "5");
      // A retry with the same client message id is stored once and not shown again.
      const again = await client.sendGroup(gid, 1, "ts 1", { clientMsgId: `ts-group-${transport}` });
      assert.equal(again.duplicate, true);
      assert.equal(again.seq, 2n);

      await eventually(() => seen.group.length >= 5, 10000, "five group messages");
      await new Promise((r) => setTimeout(r, 300));
      assertSeqs(seen.group, 1, 5);
      assert.deepEqual(texts(seen.group.slice(1)), ["ts 1", "go 1", "ts 2", "go 2"]);
      assert.equal(seen.group[1].from!.uid, BigInt(uid), "the sender's own message, from the send's answer");
      assert.equal(seen.group[2].from!.uid, BigInt(peerUid));

      await p.waitFor((e) => e.event === "group" && e.seq === "5");
      assert.deepEqual(
        p.groupEvents(gid).map((e) => [e.seq, e.content]),
        [["1", ""], ["2", "ts 1"], ["3", "go 1"], ["4", "ts 2"], ["5", "go 2"]],
      );
      // The cursor went out batched: the server counts all five acknowledged.
      await ackedUpTo(client, gid, 5n);
    });

    it("catches a group up after a new login, page by page, before live messages", async () => {
      const uid = nextUid++;
      const peerUid = nextUid++;
      const p = await peer(peerUid);
      const first = await loggedIn(uid);
      const gid = await imd.createGroup([uid, peerUid]);
      await eventually(() => first.seen.group.length === 1, 10000, "the created event");
      // close() sends the cursor of what was shown at once.
      await first.client.close();
      for (let i = 1; i <= 5; i++) {
        await p.sendGroup(gid, `offline ${i}`);
      }

      const { client, seen } = await loggedIn(uid, { pageSize: 2 });
      await eventually(() => seen.group.length === 5, 10000, "the messages sent while offline");
      assertSeqs(seen.group, 2, 6);
      assert.deepEqual(texts(seen.group), [1, 2, 3, 4, 5].map((i) => `offline ${i}`));
      await p.sendGroup(gid, "live");
      await eventually(() => seen.group.length === 6, 10000, "the live message");
      assertSeqs(seen.group, 2, 7);
      assert.equal(texts(seen.group)[5], "live");
      await ackedUpTo(client, gid, 7n);
    });

    it("does not show again the seqs an earlier run reported through onGroupSeq", async () => {
      const uid = nextUid++;
      const peerUid = nextUid++;
      const p = await peer(peerUid);
      const gid = await imd.createGroup([uid, peerUid]);
      for (let i = 1; i <= 3; i++) {
        await p.sendGroup(gid, `m${i}`);
      }
      // An earlier run showed seqs 1 to 4 (the created event and m1 to
      // m3) and died before its cursor went out.
      const saved = new Map<bigint, bigint>();
      const { client, seen } = await loggedIn(uid, {
        groupSeqs: new Map([[gid, 4n]]),
        onGroupSeq: (g, seq) => saved.set(g, seq),
      });
      await p.sendGroup(gid, "m4");
      await eventually(() => seen.group.length === 1, 10000, "the new message");
      await new Promise((r) => setTimeout(r, 300));
      assertSeqs(seen.group, 5, 5);
      assert.equal(saved.get(gid), 5n);
      await ackedUpTo(client, gid, 5n);
    });

    it("fills a gap left by lost notifies with a pull, without a new login", async () => {
      const uid = nextUid++;
      const peerUid = nextUid++;
      const p = await peer(peerUid);
      const { client, seen } = await loggedIn(uid);
      const gid = await imd.createGroup([uid, peerUid]);
      await eventually(() => seen.group.length === 1, 10000, "the created event");

      // Lose the group notifies of the next two messages, as a connection
      // cut between the server and this client would.
      let dropping = true;
      let dropped = 0;
      const hook = client as unknown as { notified: (l: unknown, f: Frame) => void };
      const notified = hook.notified.bind(client);
      hook.notified = (l, f) => {
        if (dropping && f.header.cmd === Cmd.GroupNotify) {
          dropped += fromBinary(GroupNotifySchema, f.body).messages.length;
          return;
        }
        notified(l, f);
      };
      await p.sendGroup(gid, "lost 1");
      await p.sendGroup(gid, "lost 2");
      await eventually(() => dropped === 2, 10000, "the lost notifies");
      dropping = false;
      assert.equal(seen.group.length, 1);

      // The next notify is beyond a gap: it is held, the group pulled.
      await p.sendGroup(gid, "after the gap");
      await eventually(() => seen.group.length === 4, 10000, "the gap filled");
      assertSeqs(seen.group, 1, 4);
      assert.deepEqual(texts(seen.group.slice(1)), ["lost 1", "lost 2", "after the gap"]);
      assert.deepEqual(seen.states, ["online"], "no new login");
      await ackedUpTo(client, gid, 4n);
    });

    it("gets the messages sent while its connection was cut, once each, in order", async () => {
      const uid = nextUid++;
      const peerUid = nextUid++;
      const p = await peer(peerUid);
      const { client, seen } = await loggedIn(uid);
      const gid = await imd.createGroup([uid, peerUid]);
      await eventually(() => seen.group.length === 1, 10000, "the created event");

      const link = (client as unknown as { link: { close(err: Error): void } }).link;
      link.close(new ClientError("conn_lost", "cut by the test"));
      const sends = [p.sendGroup(gid, "cut 1")];
      await eventually(() => client.getState() !== "online", 5000, "the cut");
      sends.push(p.sendGroup(gid, "cut 2"));
      await Promise.all(sends);
      await eventually(() => client.getState() === "online", 15000, "the reconnect");
      await p.sendGroup(gid, "back");
      await eventually(() => seen.group.length === 4, 10000, "every message");
      await new Promise((r) => setTimeout(r, 300));
      assertSeqs(seen.group, 1, 4);
      assert.deepEqual(texts(seen.group.slice(1)), ["cut 1", "cut 2", "back"]);
      assert.ok(seen.states.includes("offline"), seen.states.join(","));
      await ackedUpTo(client, gid, 4n);
    });
  });
}
