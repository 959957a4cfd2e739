// The end-to-end harness: builds imd and the Go test peer once, runs
// `imd all` on a temporary data dir with every listener on a free port,
// mints tokens and drives Go SDK peers (internal/testpeer) over JSON lines.

import { execFile, spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, rmSync, mkdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";

const run = promisify(execFile);

/** The repository root: this file runs from sdk-ts/dist/test/. */
export const repoRoot = resolve(fileURLToPath(new URL("../../..", import.meta.url)));

export interface Bins {
  imd: string;
  testpeer: string;
}

let built: Promise<Bins> | null = null;

/**
 * Builds imd and the test peer into sdk-ts/.test-bin (once per process).
 * IMD_BIN and IMD_TESTPEER_BIN, when set, name binaries built already.
 */
export function buildBins(): Promise<Bins> {
  built ??= (async () => {
    const dir = join(repoRoot, "sdk-ts", ".test-bin");
    mkdirSync(dir, { recursive: true });
    const imd = process.env.IMD_BIN ?? join(dir, "imd");
    const testpeer = process.env.IMD_TESTPEER_BIN ?? join(dir, "testpeer");
    if (!process.env.IMD_BIN) {
      await run("go", ["build", "-o", imd, "./cmd/imd"], { cwd: repoRoot });
    }
    if (!process.env.IMD_TESTPEER_BIN) {
      await run("go", ["build", "-o", testpeer, "./internal/testpeer"], { cwd: repoRoot });
    }
    return { imd, testpeer };
  })();
  return built;
}

export interface Addrs {
  gateway: string;
  http: string;
  web: string;
  kafka: string;
}

/** One `imd all` process on a data dir it may be restarted on. */
export class Imd {
  readonly dataDir: string;
  addrs: Addrs | null = null;
  private proc: ChildProcess | null = null;
  private exited: Promise<void> | null = null;
  readonly lines: string[] = [];

  constructor(private readonly bins: Bins) {
    this.dataDir = mkdtempSync(join(tmpdir(), "imd-sdk-ts-"));
  }

  /** The base URL of the web listener. */
  get webUrl(): string {
    return `http://${this.addrs!.web}`;
  }

  /**
   * Starts imd: on free ports the first time, on the same ports (and data
   * dir) after a stop, so that clients find it where they left it.
   */
  async start(): Promise<void> {
    const a = this.addrs;
    const args = [
      "all",
      "--data-dir", this.dataDir,
      "--log-format", "json",
      "--gateway-addr", a?.gateway ?? "127.0.0.1:0",
      "--http-addr", a?.http ?? "127.0.0.1:0",
      "--web-addr", a?.web ?? "127.0.0.1:0",
      "--kafka-addr", a?.kafka ?? "127.0.0.1:0",
    ];
    const proc = spawn(this.bins.imd, args, { stdio: ["ignore", "ignore", "pipe"] });
    this.proc = proc;
    this.exited = new Promise((res) => proc.once("exit", () => res()));
    await new Promise<void>((res, rej) => {
      const timer = setTimeout(() => rej(new Error(`imd did not start:\n${this.lines.slice(-20).join("\n")}`)), 30000);
      let kafka = a?.kafka ?? "";
      createInterface({ input: proc.stderr! }).on("line", (line) => {
        this.lines.push(line);
        let m: Record<string, unknown>;
        try {
          m = JSON.parse(line);
        } catch {
          return;
        }
        if (m.msg === "embedded kafka broker started" && Array.isArray(m.addr)) {
          kafka = String(m.addr[0]);
        }
        if (m.msg === "node started") {
          this.addrs = { gateway: String(m.gateway), http: String(m.http), web: String(m.web), kafka };
          clearTimeout(timer);
          res();
        }
      });
      proc.once("exit", (code) => {
        clearTimeout(timer);
        rej(new Error(`imd exited with ${code}:\n${this.lines.slice(-20).join("\n")}`));
      });
    });
  }

  /** Stops imd with SIGTERM (it drains: clients get a GoAway) and waits for it. */
  async stop(): Promise<void> {
    if (!this.proc || this.proc.exitCode !== null) {
      return;
    }
    this.proc.kill("SIGTERM");
    const killer = setTimeout(() => this.proc?.kill("SIGKILL"), 20000);
    await this.exited;
    clearTimeout(killer);
  }

  /** Kills imd at once: connections drop without a frame. */
  async kill(): Promise<void> {
    if (!this.proc || this.proc.exitCode !== null) {
      return;
    }
    this.proc.kill("SIGKILL");
    await this.exited;
  }

  /** Mints a login token for uid on appcode 101. */
  async token(uid: number | bigint, appcode = 101): Promise<string> {
    const { stdout } = await run(this.bins.imd, [
      "token", "--data-dir", this.dataDir, "--appcode", String(appcode), "--uid", String(uid),
    ]);
    return stdout.trim();
  }

  /** The demo HTTP API key of appcode 101. */
  async apiKey(appcode = 101): Promise<string> {
    const { stdout } = await run(this.bins.imd, [
      "token", "--api-key", "--data-dir", this.dataDir, "--appcode", String(appcode),
    ]);
    return stdout.trim();
  }

  /**
   * Creates a group of users of account 1 over the HTTP API (POST
   * /v1/groups) and returns its id; its seq 1 is the CREATED event.
   */
  async createGroup(uids: (number | bigint)[]): Promise<bigint> {
    const res = await fetch(`http://${this.addrs!.http}/v1/groups`, {
      method: "POST",
      headers: { authorization: `Bearer ${await this.apiKey()}`, "content-type": "application/json" },
      body: JSON.stringify({ members: uids.map((uid) => ({ account: 1, uid: Number(uid) })) }),
    });
    const text = await res.text();
    if (res.status !== 200) {
      throw new Error(`create group: HTTP ${res.status}: ${text}`);
    }
    const body = JSON.parse(text) as { group_id: string; seq: number };
    if (body.seq !== 1) {
      throw new Error(`create group: seq ${body.seq}`);
    }
    return BigInt(body.group_id);
  }

  async cleanup(): Promise<void> {
    await this.kill();
    rmSync(this.dataDir, { recursive: true, force: true });
  }
}

/** An event line of the test peer. */
export type PeerEvent = Record<string, unknown> & { event: string };

/** A Go SDK client (internal/testpeer) driven over JSON lines. */
export class Peer {
  readonly events: PeerEvent[] = [];
  private waiters: (() => void)[] = [];
  private readonly proc: ChildProcess;
  private reqs = 0;
  stderr = "";

  private constructor(bins: Bins, gateway: string, readonly uid: number, token: string) {
    this.proc = spawn(bins.testpeer, ["-addr", gateway, "-uid", String(uid), "-token", token], {
      stdio: ["pipe", "pipe", "pipe"],
    });
    this.proc.stderr!.on("data", (d) => (this.stderr += d));
    createInterface({ input: this.proc.stdout! }).on("line", (line) => {
      this.events.push(JSON.parse(line) as PeerEvent);
      for (const w of this.waiters.splice(0)) {
        w();
      }
    });
  }

  /** Starts a peer logged in as uid and waits for its login. */
  static async start(bins: Bins, imd: Imd, uid: number): Promise<Peer> {
    const p = new Peer(bins, imd.addrs!.gateway, uid, await imd.token(uid));
    await p.waitFor((e) => e.event === "ready");
    return p;
  }

  /** Waits for the first event (from the start) that matches. */
  async waitFor(match: (e: PeerEvent) => boolean, timeoutMs = 15000): Promise<PeerEvent> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const e = this.events.find(match);
      if (e) {
        return e;
      }
      if (this.proc.exitCode !== null) {
        throw new Error(`test peer exited: ${this.stderr}`);
      }
      const left = deadline - Date.now();
      if (left <= 0) {
        throw new Error(`test peer: no matching event in ${timeoutMs} ms; events: ${JSON.stringify(this.events)}`);
      }
      await new Promise<void>((res) => {
        const t = setTimeout(res, left);
        this.waiters.push(() => {
          clearTimeout(t);
          res();
        });
      });
    }
  }

  /** Makes the peer send content to uid (account 1) and waits for the answer. */
  async send(toUid: number | bigint, content: string, msgtype = 1): Promise<PeerEvent> {
    const id = `r${++this.reqs}`;
    this.proc.stdin!.write(
      JSON.stringify({ op: "send", id, to_account: 1, to_uid: String(toUid), msgtype, content }) + "\n",
    );
    const e = await this.waitFor((e) => e.id === id, 40000);
    if (e.event !== "sent") {
      throw new Error(`peer send failed: ${JSON.stringify(e)}`);
    }
    return e;
  }

  /** Makes the peer send content to group groupId and waits for the answer (which adds its seq). */
  async sendGroup(groupId: bigint, content: string, msgtype = 1): Promise<PeerEvent> {
    const id = `r${++this.reqs}`;
    this.proc.stdin!.write(
      JSON.stringify({ op: "send_group", id, group_id: String(groupId), msgtype, content }) + "\n",
    );
    const e = await this.waitFor((e) => e.id === id, 40000);
    if (e.event !== "sent") {
      throw new Error(`peer group send failed: ${JSON.stringify(e)}`);
    }
    return e;
  }

  /** The group messages of groupId received, in order. */
  groupEvents(groupId: bigint): PeerEvent[] {
    return this.events.filter((e) => e.event === "group" && e.group_id === String(groupId));
  }

  /** The contents of the chat messages received, in order. */
  received(): string[] {
    return this.events.filter((e) => e.event === "c2c").map((e) => String(e.content));
  }

  async close(): Promise<void> {
    if (this.proc.exitCode !== null) {
      return;
    }
    const exited = new Promise((res) => this.proc.once("exit", res));
    this.proc.stdin!.end(JSON.stringify({ op: "close" }) + "\n");
    const t = setTimeout(() => this.proc.kill("SIGKILL"), 5000);
    await exited;
    clearTimeout(t);
  }
}

/** Polls cond every 20 ms until it holds or timeoutMs passes. */
export async function eventually(cond: () => boolean, timeoutMs = 15000, what = "condition"): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) {
      throw new Error(`timed out waiting for ${what}`);
    }
    await new Promise((r) => setTimeout(r, 20));
  }
}
