// The client: one logged-in session over a WebSocket or long-poll link
// that it keeps alive and brings back after a loss, with the chat delivery
// contract of schema/PROTOCOL.md ("Chat (c2c): what a client must do"):
// sends with a client message id retried until stored, every message shown
// once and acknowledged, the offline inbox pulled after every login before
// live messages, in order.

import { create, fromBinary, type DescMessage, type MessageInitShape, type MessageShape } from "@bufbuild/protobuf";
import {
  C2CAckRequestSchema,
  C2CAckResponseSchema,
  C2CMessageSchema,
  C2CNotifySchema,
  C2CReceiptSchema,
  C2CSendRequestSchema,
  C2CSendResponseSchema,
  GoAwaySchema,
  GroupAckRequestSchema,
  GroupAckResponseSchema,
  GroupCursorSchema,
  GroupNotifySchema,
  GroupPullRequestSchema,
  GroupPullResponseSchema,
  GroupSyncRequestSchema,
  GroupSyncResponseSchema,
  HistorySyncRequestSchema,
  HistorySyncResponseSchema,
  KeepaliveRequestSchema,
  KeepaliveResponseSchema,
  KickReason,
  KickoutSchema,
  LoginRequestSchema,
  LoginResponseSchema,
  LogoutRequestSchema,
  LogoutResponseSchema,
  OfflineCountRequestSchema,
  OfflineCountResponseSchema,
  OfflinePullRequestSchema,
  OfflinePullResponseSchema,
  S2CAckSchema,
  S2CNotifySchema,
  TransientNotifySchema,
  UserSchema,
  type C2CMessage,
  type C2CReceipt,
  type C2CSendRequest,
  type C2CSendResponse,
  type GroupCursor,
  type GroupState,
  type HistorySyncResponse,
  type Kickout,
  type LoginResponse,
  type OfflineCountResponse,
  type S2CNotify,
  type TransientNotify,
  type User,
} from "./gen/imd_pb.js";
import { ClientError, isRetryable, StatusError } from "./errors.js";
import { FLAG_ORDERED, type Frame } from "./frame.js";
import { Link, type LinkOwner } from "./link.js";
import { Cmd, Status } from "./protocol.js";
import { endpointsOf, openTransport, type ConnectTarget, type Endpoint, type TransportEnv } from "./transport.js";
import { VERSION } from "./version.js";

/** The client's connection state, reported to onState. */
export type State =
  /** Connecting or logging in (again). */
  | "connecting"
  /** Logged in. */
  | "online"
  /** The connection was lost; reconnecting after a backoff. */
  | "offline"
  /** Closed, logged out, kicked out or refused: final. */
  | "closed";

/** A notify the client does not handle itself, for onMessage. */
export interface RawMessage {
  cmd: number;
  msgtype: number;
  logid: bigint;
  body: Uint8Array;
}

/** Identifies the session to log in. */
export interface Credentials {
  appcode: number;
  uid: bigint | number;
  /** Presented at login. */
  token?: string;
  /** Called instead before every login, so that a reconnect can use a fresh token. */
  tokenFunc?: () => string | Promise<string>;
}

/** A user to address: the account system and the uid in it. */
export interface UserRef {
  account: number;
  uid: bigint | number;
}

/** Something that may log. */
export interface Logger {
  debug?(msg: string, ...args: unknown[]): void;
  info?(msg: string, ...args: unknown[]): void;
  warn?(msg: string, ...args: unknown[]): void;
}

/** Options of a Client. Unset values get defaults. */
export interface ClientOptions extends ConnectTarget, TransportEnv {
  /**
   * The stable id of the install, sent at login: a login with the same id
   * silently replaces a stale connection of this device, a different one
   * kicks it out (onKickout). Default: a random id per Client.
   */
  deviceId?: string;
  /** Sent at login. Default "web". */
  platform?: string;
  /** Bounds every request. Default 10000 ms. */
  requestTimeoutMs?: number;
  /** Overrides the keepalive interval the server advertises. */
  keepaliveMs?: number;
  /** Bounds of the reconnect backoff (exponential, full jitter). Defaults 200 and 30000 ms. */
  backoffMinMs?: number;
  backoffMaxMs?: number;
  /** Turns automatic reconnection off. */
  noReconnect?: boolean;
  /** The largest frame body the client accepts. Default 1 MiB. */
  maxBody?: number;
  /** How many recent msgids the receiver remembers to drop duplicates. Default 16384. */
  dedupSize?: number;
  /** How long acks wait to be batched. Default 20 ms. */
  ackDelayMs?: number;
  /** Tries of sendC2C. Default 6. */
  sendAttempts?: number;
  /**
   * How many sendC2C calls may be in flight at once, pipelined in call
   * order; more wait for a slot. Default 32 (the gateway allows 64
   * requests in flight per connection).
   */
  sendWindow?: number;
  /** Bounds of the backoff between tries of a send (exponential, jitter). Defaults 100 and 3000 ms. */
  sendBackoffMinMs?: number;
  sendBackoffMaxMs?: number;
  /** The offline pull page size; 0 lets the server choose. */
  pageSize?: number;
  /**
   * The highest msgid this terminal was answered for a message it sent,
   * as kept by an earlier run (see onSentMsgid): the floor of the next
   * sends, so that they stay in order after it.
   */
  sentMsgid?: bigint;
  /** Called when the send floor rises, so that the app can keep it across restarts. */
  onSentMsgid?: (msgid: bigint) => void;
  /** Msgids shown by an earlier run of this terminal, oldest first: they are not shown again. */
  shownMsgids?: bigint[];

  /**
   * Chat messages, one at a time: after every login first those that
   * waited in the terminal's offline inbox (oldest first), then live ones.
   * Each msgid comes once and is acknowledged after the callback returns
   * (or its promise settles), which removes it from the inbox. Without
   * onC2C, c2c notifies go to onMessage and the inbox is not pulled.
   */
  onC2C?: (m: C2CMessage) => void | Promise<void>;
  /** Pushes from app-servers, live or from the inbox, each once, acknowledged after the callback. */
  onS2C?: (n: S2CNotify) => void | Promise<void>;
  /**
   * A terminal of a recipient acknowledged a message this user sent:
   * called once per message (a receipt the server sent for several, in
   * msgids, is handed over as one per msgid, msgids empty).
   */
  onReceipt?: (r: C2CReceipt) => void;
  /** The server kicked this session out; the client is closed and does not reconnect. */
  onKickout?: (k: Kickout) => void;
  /** Every change of state, with the reason when there is one. */
  onState?: (s: State, err?: Error) => void;
  /** Transient messages ("typing..."): never stored, acknowledged or pulled. */
  onTransient?: (n: TransientNotify) => void;
  /**
   * Group messages, chat and system events (m.event set: created, joined,
   * left, dissolved), one at a time on the same queue as onC2C. Each
   * group's messages come in seq order without gaps, each once: a notify
   * lost in a connection cut is pulled again before the ones after it are
   * delivered, and after every login the groups are caught up from this
   * terminal's cursor before live notifies are let through. The messages
   * this client sends with sendGroup come too, once their send is
   * answered. Per group the last seq delivered is acknowledged (a cursor,
   * batched for groupAckDelayMs). Without onGroup, group notifies go to
   * onMessage and nothing is pulled for groups.
   */
  onGroup?: (m: C2CMessage) => void | Promise<void>;
  /** How long group cursors wait to be batched. Default 250 ms; close() and logout() send them at once. */
  groupAckDelayMs?: number;
  /**
   * How long acks of live pushes wait to be batched. They only count the
   * push's statistics, so they go out less often than message acks (each
   * one the gateway does not read is server CPU saved). Default 250 ms; 200
   * waiting, close() and logout() send them at once.
   */
  pushAckDelayMs?: number;
  /**
   * Per group, the last seq shown by an earlier run of this terminal (as
   * kept through onGroupSeq): those seqs are not shown again.
   */
  groupSeqs?: Map<bigint, bigint>;
  /**
   * Called after onGroup returned, with the group and the seq just shown,
   * so that the app can keep them across restarts (groupSeqs).
   */
  onGroupSeq?: (groupId: bigint, seq: bigint) => void;
  /** Every other notify (read marks, presence; groups without onGroup), undecoded. */
  onMessage?: (m: RawMessage) => void;
  logger?: Logger;
}

type Required2<T> = { [K in keyof T]-?: T[K] };
type Tunables = Required2<
  Pick<
    ClientOptions,
    | "requestTimeoutMs"
    | "backoffMinMs"
    | "backoffMaxMs"
    | "maxBody"
    | "dedupSize"
    | "ackDelayMs"
    | "groupAckDelayMs"
    | "pushAckDelayMs"
    | "sendAttempts"
    | "sendWindow"
    | "sendBackoffMinMs"
    | "sendBackoffMaxMs"
    | "pageSize"
    | "deviceId"
    | "platform"
  >
>;

/** Returns a random client message id: 16 random bytes in hex. */
export function newClientMsgId(): string {
  const b = new Uint8Array(16);
  crypto.getRandomValues(b);
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

/**
 * How long the reconnect backoff may grow while logins are answered with
 * a retryable status: the server is there and will serve again soon.
 */
const BUSY_BACKOFF_MS = 2000;
/**
 * How many KICK_REASON_REPLACED kicks a minute the client takes as stale
 * connections of its own before it concludes that another live client
 * shares its device id and gives up.
 */
const MAX_REPLACED = 30;
/** How long close() waits to send the pending acks. */
const CLOSE_FLUSH_MS = 2000;

const textEncoder = new TextEncoder();

function sleep(ms: number, abort?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (abort?.aborted) {
      resolve();
      return;
    }
    const timer = setTimeout(done, ms);
    function done() {
      clearTimeout(timer);
      abort?.removeEventListener("abort", done);
      resolve();
    }
    abort?.addEventListener("abort", done);
  });
}

function asError(err: unknown): Error {
  return err instanceof Error ? err : new Error(String(err));
}

/**
 * Client is a session with the platform. Create it with `new Client(opts)`
 * (or Client.connect, which connects before it returns), then login().
 * Every method may be called at any time; the calls made while the
 * connection is down wait for the reconnect, up to requestTimeoutMs.
 */
export class Client {
  private readonly opts: ClientOptions;
  private readonly t: Tunables;
  private readonly endpoints: Endpoint[];
  private readonly log: Logger;
  private seq = 0;

  private link: Link | null = null;
  private dialing: Promise<Link> | null = null;
  private upWaiters: (() => void)[] = [];
  private state: State = "connecting";
  private cred: Credentials | null = null;
  private loginResp: LoginResponse | null = null;
  private preferred = 0;
  private replacedAt = 0;
  private replaced = 0;
  private closed = false;
  private closeErr: Error | null = null;
  private readonly stop = new AbortController();
  private keepaliveTimer: ReturnType<typeof setInterval> | null = null;
  private reconnectWanted = false;
  private supervising = false;
  private sentMsgid: bigint;
  private readonly inbox: Inbox | null;

  constructor(opts: ClientOptions) {
    this.opts = opts;
    this.endpoints = endpointsOf(opts);
    this.log = opts.logger ?? {};
    const backoffMinMs = opts.backoffMinMs ?? 200;
    const sendBackoffMinMs = opts.sendBackoffMinMs ?? 100;
    this.t = {
      requestTimeoutMs: opts.requestTimeoutMs ?? 10000,
      backoffMinMs,
      backoffMaxMs: Math.max(opts.backoffMaxMs ?? 30000, backoffMinMs),
      maxBody: opts.maxBody ?? 1 << 20,
      dedupSize: opts.dedupSize ?? 16384,
      ackDelayMs: opts.ackDelayMs ?? 20,
      groupAckDelayMs: opts.groupAckDelayMs ?? 250,
      pushAckDelayMs: opts.pushAckDelayMs ?? 250,
      sendAttempts: opts.sendAttempts ?? 6,
      sendWindow: Math.max(1, opts.sendWindow ?? 32),
      sendBackoffMinMs,
      sendBackoffMaxMs: Math.max(opts.sendBackoffMaxMs ?? 3000, sendBackoffMinMs),
      pageSize: opts.pageSize ?? 0,
      deviceId: opts.deviceId ?? `sdk-ts-${newClientMsgId().slice(0, 16)}`,
      platform: opts.platform ?? "web",
    };
    this.sentMsgid = opts.sentMsgid ?? 0n;
    this.inbox = opts.onC2C || opts.onS2C || opts.onGroup ? new Inbox(this, this.t, opts) : null;
    this.inbox?.remember(opts.shownMsgids ?? []);
    this.inbox?.rememberGroups(opts.groupSeqs);
  }

  /** Creates a client and connects it (without logging in): connection errors surface here. */
  static async connect(opts: ClientOptions): Promise<Client> {
    const c = new Client(opts);
    const l = await c.dialAny();
    c.setLink(l);
    return c;
  }

  /** The device id sent at login. */
  get deviceId(): string {
    return this.t.deviceId;
  }

  /** The current state. */
  getState(): State {
    return this.state;
  }

  /** The server's answer to the last successful login, or null. */
  get loginInfo(): LoginResponse | null {
    return this.loginResp;
  }

  /** The transport of the current connection ("websocket" or "longpoll"), or null. */
  get transportKind(): string | null {
    return this.link && !this.link.err ? this.link.endpoint.kind : null;
  }

  /** The highest msgid this client was answered for a message it sent: the floor of its next sends. */
  get sendFloor(): bigint {
    return this.sentMsgid;
  }

  // ---- connections ----

  private linkOwner: LinkOwner = {
    nextSeq: () => {
      this.seq = (this.seq + 1) >>> 0;
      if (this.seq === 0) {
        this.seq = 1;
      }
      return this.seq;
    },
    notified: (l, f) => this.notified(l, f),
    linkDown: (l, err) => this.linkDown(l, err),
  };

  /** Opens a link to the preferred endpoint, else to the others in order. */
  private async dialAny(): Promise<Link> {
    const n = this.endpoints.length;
    const first = this.preferred;
    const errors: unknown[] = [];
    for (let i = 0; i < n && !this.closed; i++) {
      const idx = (first + i) % n;
      const ep = this.endpoints[idx];
      const l = new Link(this.linkOwner, ep, idx, this.t.maxBody);
      try {
        const tr = await openTransport(
          ep,
          { onData: (d) => l.onData(d), onClose: (e) => l.onClose(e) },
          { WebSocket: this.opts.WebSocket, fetch: this.opts.fetch, connectTimeoutMs: this.opts.connectTimeoutMs },
        );
        l.attach(tr);
        if (this.closed) {
          l.close(new ClientError("closed", "client closed"));
          break;
        }
        this.preferred = idx;
        this.log.debug?.("imd: connected", ep.kind, ep.url);
        return l;
      } catch (err) {
        this.log.debug?.("imd: connect failed", ep.kind, ep.url, err);
        errors.push(err);
      }
    }
    if (this.closed) {
      throw this.closeErr ?? new ClientError("closed", "client closed");
    }
    throw new ClientError("not_connected", "no endpoint could be connected", { cause: new AggregateError(errors) });
  }

  /**
   * Makes the next dial start after l's endpoint when l was the preferred
   * one: l died before a login succeeded on it (or the login failed).
   */
  private skip(l: Link): void {
    const n = this.endpoints.length;
    if (n > 1 && this.preferred === l.idx) {
      this.preferred = (l.idx + 1) % n;
    }
  }

  /** Makes l, a link not logged in yet, the current one; requests wait for its login. */
  private setLink(l: Link): void {
    if (this.closed) {
      l.close(this.closeErr ?? new ClientError("closed", "client closed"));
      throw this.closeErr ?? new ClientError("closed", "client closed");
    }
    this.link = l;
  }

  /**
   * Logs in on the current connection (connecting first if there is
   * none) and remembers the credentials for reconnects. A refused login
   * rejects with a StatusError (2001 a wrong token, ...), and the client
   * stays usable for another login. When the connection dies before the
   * answer, it tries again on the next endpoint (once per endpoint).
   */
  async login(cred: Credentials): Promise<LoginResponse> {
    if (this.closed) {
      throw this.closeErr!;
    }
    let l = this.link;
    const tries = Math.max(2, this.endpoints.length);
    for (let attempt = 1; ; attempt++) {
      if (!l || l.err) {
        l = await this.dialAny();
        this.setLink(l);
      }
      let resp: LoginResponse;
      try {
        resp = await this.loginOn(l, cred);
      } catch (err) {
        if (err instanceof ClientError && err.code === "conn_lost" && attempt < tries && !this.closed) {
          this.skip(l);
          l.close(err);
          l = null;
          continue;
        }
        // The server closes after a refused login; so do we. A login
        // refused on a link that is logged in already (1009) leaves it be.
        if (!l.online) {
          l.close(asError(err));
        }
        throw err;
      }
      // The credentials are set before the link is marked online, so that
      // a loss from now on is one the client recovers from.
      this.cred = cred;
      if (!this.online(l, resp)) {
        if (this.closed) {
          throw this.closeErr!;
        }
        if (this.opts.noReconnect) {
          throw l.err!;
        }
        this.setState("offline", l.err ?? undefined);
        this.wantReconnect();
      }
      return resp;
    }
  }

  private async loginOn(l: Link, cred: Credentials): Promise<LoginResponse> {
    const token = cred.tokenFunc ? await cred.tokenFunc() : (cred.token ?? "");
    // From now on live notifies wait: the server may push one as soon as
    // the session is registered, before the login answer arrives, and it
    // must not overtake older messages still in the inbox.
    this.inbox?.beginLogin();
    return l.roundTrip(
      { cmd: Cmd.Login, appcode: cred.appcode, uid: BigInt(cred.uid) },
      LoginRequestSchema,
      create(LoginRequestSchema, {
        token,
        deviceId: this.t.deviceId,
        platform: this.t.platform,
        sdkVersion: VERSION,
      }),
      LoginResponseSchema,
      this.t.requestTimeoutMs,
    );
  }

  /**
   * Makes l the current, usable link and starts its keepalive. It returns
   * false, changing nothing, when the client is closed or l has died.
   */
  private online(l: Link, resp: LoginResponse): boolean {
    if (this.closed || l.err) {
      return false;
    }
    this.link = l;
    l.online = true;
    this.loginResp = resp;
    for (const w of this.upWaiters.splice(0)) {
      w();
    }
    this.inbox?.startSync(l);
    this.setState("online");
    const iv = this.opts.keepaliveMs ?? (resp.keepaliveMs || 30000);
    if (this.keepaliveTimer) {
      clearInterval(this.keepaliveTimer);
    }
    const timer = setInterval(() => {
      if (l.err || this.closed) {
        clearInterval(timer);
        return;
      }
      l.roundTrip(
        { cmd: Cmd.Keepalive },
        KeepaliveRequestSchema,
        create(KeepaliveRequestSchema, { clientTimeMs: BigInt(Date.now()) }),
        KeepaliveResponseSchema,
        Math.min(this.t.requestTimeoutMs, iv),
      ).catch((err) => {
        if (!l.err) {
          l.close(new ClientError("conn_lost", `keepalive: ${asError(err).message}`, { cause: err }));
        }
      });
    }, iv);
    this.keepaliveTimer = timer;
    return true;
  }

  private setState(s: State, err?: Error): void {
    if (this.state === s || this.state === "closed") {
      return;
    }
    this.state = s;
    this.log.debug?.("imd: state", s, err?.message ?? "");
    try {
      this.opts.onState?.(s, err);
    } catch (e) {
      this.log.warn?.("imd: onState threw", e);
    }
  }

  /**
   * A link died. Only the loss of a link that was online starts a
   * reconnect: a link that dies before its login succeeded is handled by
   * whoever is logging in on it.
   */
  private linkDown(l: Link, err: Error): void {
    if (this.link !== l) {
      return;
    }
    if (this.keepaliveTimer) {
      clearInterval(this.keepaliveTimer);
      this.keepaliveTimer = null;
    }
    if (!l.online) {
      this.skip(l);
      return;
    }
    if (this.closed) {
      return;
    }
    if (!this.cred || this.opts.noReconnect) {
      if (this.cred) {
        this.shutdown(err);
      }
      return;
    }
    this.setState("offline", err);
    this.wantReconnect();
  }

  private wantReconnect(): void {
    this.reconnectWanted = true;
    if (!this.supervising) {
      void this.supervise();
    }
  }

  /**
   * Reconnects and logs in again after a loss. The first try is at once;
   * then it waits backoffMin/2 plus a random time up to the backoff, which
   * doubles after each failure up to backoffMax, or only up to 2 s while
   * the failure is a status the server answered.
   */
  private async supervise(): Promise<void> {
    this.supervising = true;
    const busyMax = Math.min(this.t.backoffMaxMs, Math.max(this.t.backoffMinMs, BUSY_BACKOFF_MS));
    try {
      while (this.reconnectWanted && !this.closed) {
        this.reconnectWanted = false;
        let backoff = this.t.backoffMinMs;
        for (let attempt = 0; ; attempt++) {
          if (attempt > 0) {
            await sleep(this.t.backoffMinMs / 2 + Math.random() * backoff, this.stop.signal);
          }
          const cred = this.cred;
          if (this.closed || !cred) {
            return; // closed, or logging out
          }
          if (this.link?.online && !this.link.err) {
            break; // a login() of the app got there first
          }
          this.setState("connecting");
          try {
            await this.relogin(cred);
            break;
          } catch (err) {
            if (err instanceof StatusError && !err.retryable) {
              this.log.warn?.("imd: login refused on reconnect; giving up", err);
              this.shutdown(err);
              return;
            }
            if (this.closed) {
              return;
            }
            this.setState("offline", asError(err));
            this.log.debug?.("imd: reconnect failed", attempt, err);
            backoff = Math.min(2 * backoff, err instanceof StatusError ? busyMax : this.t.backoffMaxMs);
          }
        }
      }
    } finally {
      this.supervising = false;
    }
  }

  private async relogin(cred: Credentials): Promise<void> {
    const l = await this.dialAny();
    this.setLink(l);
    let resp: LoginResponse;
    try {
      resp = await this.loginOn(l, cred);
    } catch (err) {
      this.skip(l);
      l.close(asError(err));
      throw err;
    }
    if (!this.online(l, resp)) {
      throw l.err ?? this.closeErr ?? new ClientError("closed", "client closed");
    }
  }

  /** Waits until a logged-in link is up, or timeoutMs passes. */
  private async current(timeoutMs: number): Promise<Link> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      if (this.closed) {
        throw this.closeErr!;
      }
      if (!this.cred) {
        throw new ClientError("not_logged_in", "not logged in");
      }
      const l = this.link;
      if (l && l.online && !l.err) {
        return l;
      }
      const left = deadline - Date.now();
      if (left <= 0) {
        throw new ClientError("not_connected", "not connected");
      }
      await new Promise<void>((resolve) => {
        const done = () => {
          clearTimeout(timer);
          this.stop.signal.removeEventListener("abort", done);
          const i = this.upWaiters.indexOf(done);
          if (i >= 0) {
            this.upWaiters.splice(i, 1);
          }
          resolve();
        };
        const timer = setTimeout(done, left);
        this.upWaiters.push(done);
        this.stop.signal.addEventListener("abort", done);
      });
    }
  }

  // ---- notifies ----

  private notified(l: Link, f: Frame): void {
    const h = f.header;
    try {
      switch (h.cmd) {
        case Cmd.Kickout: {
          const k = fromBinary(KickoutSchema, f.body);
          if (k.reason === KickReason.REPLACED) {
            // A stale connection of this device overtook our login.
            // Reconnecting evicts it, unless this keeps happening: then
            // another live client uses our device id, and we yield to it.
            const now = Date.now();
            if (now - this.replacedAt > 60000) {
              this.replacedAt = now;
              this.replaced = 0;
            }
            if (++this.replaced <= MAX_REPLACED) {
              this.log.info?.("imd: connection replaced by a stale one of this device; reconnecting");
              l.close(new ClientError("conn_lost", "replaced by another connection of this device"));
              return;
            }
          }
          this.shutdown(new ClientError("closed", `kicked out: ${KickReason[k.reason] ?? k.reason}`));
          this.opts.onKickout?.(k);
          return;
        }
        case Cmd.GoAway: {
          const g = fromBinary(GoAwaySchema, f.body);
          if (this.link === l && this.endpoints.length > 1) {
            this.preferred = (this.preferred + 1) % this.endpoints.length; // this gateway is draining
          }
          setTimeout(() => {
            l.close(new ClientError("conn_lost", `server going away: ${g.reason}`));
          }, g.reconnectAfterMs / 4);
          return;
        }
        case Cmd.C2CNotify:
          if (this.inbox && this.opts.onC2C) {
            this.inbox.notified(fromBinary(C2CNotifySchema, f.body).messages);
            return;
          }
          break;
        case Cmd.GroupNotify:
          if (this.inbox && this.opts.onGroup) {
            const n = fromBinary(GroupNotifySchema, f.body);
            for (const m of n.messages) {
              if (m.groupId === 0n) {
                m.groupId = n.groupId;
              }
            }
            this.inbox.takeGroup(n.messages);
            return;
          }
          break;
        case Cmd.S2C:
          if (this.inbox && this.opts.onS2C) {
            this.inbox.pushed(fromBinary(S2CNotifySchema, f.body));
            return;
          }
          break;
        case Cmd.C2CReceipt:
          if (this.opts.onReceipt) {
            const r = fromBinary(C2CReceiptSchema, f.body);
            if (r.msgids.length === 0) {
              this.opts.onReceipt(r);
              return;
            }
            for (const msgid of r.msgids) {
              this.opts.onReceipt(create(C2CReceiptSchema, { msgid, by: r.by, byAppcode: r.byAppcode, atMs: r.atMs }));
            }
            return;
          }
          break;
        case Cmd.Transient:
          if (this.opts.onTransient) {
            this.opts.onTransient(fromBinary(TransientNotifySchema, f.body));
            return;
          }
          break;
      }
      this.opts.onMessage?.({ cmd: h.cmd, msgtype: h.msgtype, logid: h.logid, body: f.body });
    } catch (err) {
      this.log.warn?.(`imd: notify 0x${h.cmd.toString(16)} not handled`, err);
    }
  }

  // ---- requests ----

  /**
   * Sends a request of command cmd on the current connection, waiting for
   * a reconnect if one is under way, and decodes the response. It does
   * not retry: a request that fails with "conn_lost" may or may not have
   * been served.
   */
  async request<I extends DescMessage, O extends DescMessage>(
    cmd: number,
    msgtype: number,
    reqSchema: I,
    req: MessageInitShape<I>,
    respSchema: O,
    timeoutMs = this.t.requestTimeoutMs,
  ): Promise<MessageShape<O>> {
    const start = Date.now();
    const l = await this.current(timeoutMs);
    const left = Math.max(1, timeoutMs - (Date.now() - start));
    return l.roundTrip({ cmd, msgtype }, reqSchema, create(reqSchema, req), respSchema, left);
  }

  /**
   * Sends content to user `to` and resolves once the platform has stored
   * it (the answer means stored, not delivered: onReceipt says when a
   * terminal of the recipient acknowledged it). Lost connections, timeouts
   * and retryable statuses are retried with exponential backoff and
   * jitter, with the same client message id, up to sendAttempts; statuses
   * no retry can cure (4001-4005...) reject at once.
   *
   * Every try carries the highest msgid this client has been answered for
   * (after_msgid), so that the platform gives the new message a greater
   * one. Calls need not wait for each other: each is written at once (up
   * to sendWindow in flight), naming the send before it that has no
   * answer yet, and the platform stores them, and every recipient sees
   * them, in the order of the calls (PROTOCOL.md, "Ordered sends"). A send
   * that failed goes again once the sends before it have resolved or
   * rejected.
   */
  async sendC2C(
    to: UserRef,
    msgtype: number,
    content: Uint8Array | string,
    opts: { clientMsgId?: string } = {},
  ): Promise<C2CSendResponse> {
    const req = create(C2CSendRequestSchema, {
      to: create(UserSchema, { account: to.account, uid: BigInt(to.uid) }),
      clientMsgId: opts.clientMsgId ?? newClientMsgId(),
      content: typeof content === "string" ? textEncoder.encode(content) : content,
    });
    return this.sendOrdered(req, msgtype);
  }

  /** sendC2C's one-to-one sends that have no outcome yet, in call order. */
  private chain: { id: string; done: Promise<void>; resolve: () => void }[] = [];
  /** Resolves when the last try asked for has been written: tries are written in turn. */
  private writeTurn: Promise<void> = Promise.resolve();

  /** The ordered path of sendC2C: pipelined tries, retries in turn. */
  private async sendOrdered(req: C2CSendRequest, msgtype: number): Promise<C2CSendResponse> {
    while (this.chain.length >= this.t.sendWindow) {
      await this.chain[0].done;
    }
    let resolve!: () => void;
    const lk = { id: req.clientMsgId, done: new Promise<void>((r) => (resolve = r)), resolve };
    this.chain.push(lk);
    try {
      let pending = this.writeOrdered(req, msgtype, lk);
      let backoff = this.t.sendBackoffMinMs;
      let attempt = 1;
      let outOfOrder = 0;
      for (;;) {
        try {
          const resp = await pending;
          this.answered(resp.msgid);
          return resp;
        } catch (err) {
          if (!isRetryable(err) || this.closed) {
            throw err;
          }
          if (err instanceof StatusError && err.status === Status.OutOfOrder) {
            // Only says the send before it was not stored yet.
            if (++outOfOrder > 4 * this.t.sendWindow + this.t.sendAttempts) {
              throw new ClientError("send_failed", `send failed after ${outOfOrder} out-of-order answers`, { cause: err });
            }
          } else {
            backoff = await this.backoffStep(attempt, backoff, err);
            attempt++;
          }
          // A retry goes once every send before it has its outcome.
          for (let i = this.chain.indexOf(lk); i > 0; i = this.chain.indexOf(lk)) {
            await this.chain[i - 1].done;
          }
          if (this.closed) {
            throw this.closeErr!;
          }
          pending = this.writeOrdered(req, msgtype, lk);
        }
      }
    } finally {
      this.chain.splice(this.chain.indexOf(lk), 1);
      lk.resolve();
    }
  }

  /**
   * Writes one try of req after the tries asked for before it, naming its
   * predecessor (the nearest earlier send without an outcome) and the
   * send floor as they are when it is written.
   */
  private writeOrdered(
    req: C2CSendRequest,
    msgtype: number,
    lk: { id: string },
  ): Promise<C2CSendResponse> {
    const turn = this.writeTurn;
    let written!: () => void;
    this.writeTurn = new Promise<void>((r) => (written = r));
    return (async () => {
      let answer: Promise<C2CSendResponse>;
      try {
        await turn;
        const start = Date.now();
        const l = await this.current(this.t.requestTimeoutMs);
        const left = Math.max(1, this.t.requestTimeoutMs - (Date.now() - start));
        const i = this.chain.indexOf(lk as (typeof this.chain)[number]);
        req.afterClientMsgId = i > 0 ? this.chain[i - 1].id : "";
        req.afterMsgid = this.sentMsgid;
        answer = l.roundTrip(
          { cmd: Cmd.C2CSend, msgtype, flags: FLAG_ORDERED },
          C2CSendRequestSchema,
          req,
          C2CSendResponseSchema,
          left,
        );
      } finally {
        written();
      }
      return answer;
    })();
  }

  /**
   * Sends content to group groupId and resolves once the platform has
   * stored it; the answer carries the message's seq in the group. It
   * retries like sendC2C (same client message id on every try, backoff,
   * the send floor), and a status no retry can cure rejects at once: 4007
   * (the group does not exist or was dissolved) and 4008 (this user is not
   * a member) among them. With onGroup set, the message is delivered to
   * onGroup too, in its place in the group's order: the platform does not
   * notify the sending terminal of its own message.
   */
  async sendGroup(
    groupId: bigint | number,
    msgtype: number,
    content: Uint8Array | string,
    opts: { clientMsgId?: string } = {},
  ): Promise<C2CSendResponse> {
    const gid = BigInt(groupId);
    const req = create(C2CSendRequestSchema, {
      groupId: gid,
      clientMsgId: opts.clientMsgId ?? newClientMsgId(),
      content: typeof content === "string" ? textEncoder.encode(content) : content,
    });
    const resp = await this.send(req, msgtype);
    const cred = this.cred;
    const login = this.loginResp;
    if (this.inbox && this.opts.onGroup && resp.seq !== 0n && cred && login) {
      // The stored message as far as the answer tells it (its logid
      // excepted); a pull that brings it first wins.
      this.inbox.takeGroup([
        create(C2CMessageSchema, {
          msgid: resp.msgid,
          from: { account: login.account, uid: BigInt(cred.uid) },
          fromAppcode: cred.appcode,
          to: {},
          msgtype,
          content: req.content,
          sentAtMs: resp.storedAtMs,
          clientMsgId: req.clientMsgId,
          groupId: gid,
          seq: resp.seq,
        }),
      ]);
    }
    return resp;
  }

  /** Sends req (a group send) with retries (see sendC2C) and raises the send floor to its answer. */
  private async send(req: C2CSendRequest, msgtype: number): Promise<C2CSendResponse> {
    const resp = await this.retry(async (timeoutMs) => {
      // Every try carries the current floor: the answer to a concurrent
      // send may have raised it since the last try.
      req.afterMsgid = this.sentMsgid;
      const start = Date.now();
      const l = await this.current(timeoutMs);
      const left = Math.max(1, timeoutMs - (Date.now() - start));
      return l.roundTrip({ cmd: Cmd.C2CSend, msgtype }, C2CSendRequestSchema, req, C2CSendResponseSchema, left);
    });
    this.answered(resp.msgid);
    return resp;
  }

  /** Raises the send floor to msgid, the answer to a send. */
  private answered(msgid: bigint): void {
    if (msgid > this.sentMsgid) {
      this.sentMsgid = msgid;
      try {
        this.opts.onSentMsgid?.(msgid);
      } catch (err) {
        this.log.warn?.("imd: onSentMsgid threw", err);
      }
    }
  }

  /**
   * Calls attempt until it succeeds, fails for good or sendAttempts are
   * used up, with exponential backoff and jitter between tries.
   */
  private async retry<T>(attempt: (timeoutMs: number) => Promise<T>): Promise<T> {
    let backoff = this.t.sendBackoffMinMs;
    for (let n = 1; ; n++) {
      try {
        return await attempt(this.t.requestTimeoutMs);
      } catch (err) {
        if (!isRetryable(err) || this.closed) {
          throw err;
        }
        backoff = await this.backoffStep(n, backoff, err);
      }
    }
  }

  /**
   * Follows try number n, which failed with the retryable err: throws
   * send_failed once sendAttempts are used, else waits backoff with jitter
   * (or the server's retry-after) and resolves with the next backoff.
   */
  private async backoffStep(n: number, backoff: number, err: unknown): Promise<number> {
    if (n >= this.t.sendAttempts) {
      throw new ClientError("send_failed", `send failed after ${n} attempts: ${asError(err).message}`, {
        cause: err,
      });
    }
    let wait = backoff / 2 + Math.random() * (backoff / 2);
    if (err instanceof StatusError && err.retryAfterMs > wait) {
      wait = err.retryAfterMs;
    }
    this.log.debug?.("imd: send failed; retrying", n, wait, err);
    await sleep(wait, this.stop.signal);
    if (this.closed) {
      throw this.closeErr!;
    }
    return Math.min(2 * backoff, this.t.sendBackoffMaxMs);
  }

  /**
   * Sends a transient message ("typing...") to a user: not stored, not
   * retried, delivered only to the terminals online now. The answer's
   * delivered counts them.
   */
  sendTransient(to: UserRef, msgtype: number, content: Uint8Array | string): Promise<C2CSendResponse> {
    return this.request(
      Cmd.C2CSend,
      msgtype,
      C2CSendRequestSchema,
      {
        to: { account: to.account, uid: BigInt(to.uid) },
        content: typeof content === "string" ? textEncoder.encode(content) : content,
        transient: true,
      },
      C2CSendResponseSchema,
    );
  }

  /**
   * Returns up to limit messages of this user's history (both sides of
   * every conversation, or of the one with peer), msgid > since, oldest
   * first, from any device. `more` says whether to call again from the
   * last msgid.
   */
  syncHistory(peer: UserRef | null | undefined, since: bigint = 0n, limit = 0): Promise<HistorySyncResponse> {
    return this.request(
      Cmd.HistorySync,
      0,
      HistorySyncRequestSchema,
      {
        peer: peer ? { account: peer.account, uid: BigInt(peer.uid) } : undefined,
        sinceMsgid: since,
        limit,
      },
      HistorySyncResponseSchema,
    );
  }

  /** How many messages wait in this terminal's offline inbox. */
  offlineCount(): Promise<OfflineCountResponse> {
    return this.request(Cmd.OfflineCount, 0, OfflineCountRequestSchema, {}, OfflineCountResponseSchema);
  }

  /** Sends one keepalive and resolves with the round-trip time in milliseconds. */
  async keepalive(): Promise<number> {
    const start = Date.now();
    await this.request(
      Cmd.Keepalive,
      0,
      KeepaliveRequestSchema,
      { clientTimeMs: BigInt(start) },
      KeepaliveResponseSchema,
    );
    return Date.now() - start;
  }

  /** Sends acks on the current link (used by the inbox). */
  async ackC2C(l: Link, msgids: bigint[]): Promise<void> {
    await l.roundTrip(
      { cmd: Cmd.C2CAck },
      C2CAckRequestSchema,
      create(C2CAckRequestSchema, { msgids }),
      C2CAckResponseSchema,
      this.t.requestTimeoutMs,
    );
  }

  /** The current link when it is logged in, else null (used by the inbox). */
  onlineLink(): Link | null {
    const l = this.link;
    return l && l.online && !l.err ? l : null;
  }

  /** Waits for a logged-in link (used by the inbox). */
  waitOnline(timeoutMs: number): Promise<Link> {
    return this.current(timeoutMs);
  }

  /** Aborted when the client closes (used by the inbox). */
  get stopSignal(): AbortSignal {
    return this.stop.signal;
  }

  // ---- the end ----

  /**
   * Ends the session and closes the client. The acknowledgements still
   * waiting to be batched are sent first.
   */
  async logout(): Promise<void> {
    const l = await this.current(this.t.requestTimeoutMs);
    await this.inbox?.finish(this.t.requestTimeoutMs);
    this.cred = null; // the close that follows the logout must not reconnect
    try {
      await l.roundTrip(
        { cmd: Cmd.Logout },
        LogoutRequestSchema,
        create(LogoutRequestSchema, {}),
        LogoutResponseSchema,
        this.t.requestTimeoutMs,
      );
    } finally {
      this.shutdown(new ClientError("closed", "logged out"));
    }
  }

  /**
   * Closes the connection without logging out (the server unregisters the
   * session when it sees the close) and stops reconnecting. It first stops
   * delivering messages and sends the acks of those shown, waiting at most
   * two seconds for a connection to send them on.
   */
  async close(): Promise<void> {
    if (this.closed) {
      return;
    }
    await this.inbox?.finish(Math.min(CLOSE_FLUSH_MS, this.t.requestTimeoutMs));
    this.shutdown(new ClientError("closed", "client closed"));
  }

  private shutdown(reason: Error): void {
    if (this.closed) {
      return;
    }
    this.closed = true;
    this.closeErr = reason instanceof ClientError && reason.code === "closed"
      ? reason
      : new ClientError("closed", `closed: ${reason.message}`, { cause: reason });
    this.stop.abort();
    if (this.keepaliveTimer) {
      clearInterval(this.keepaliveTimer);
      this.keepaliveTimer = null;
    }
    this.inbox?.stop();
    this.link?.close(this.closeErr);
    for (const w of this.upWaiters.splice(0)) {
      w();
    }
    this.setState("closed", reason);
  }

  /** Whether the client is closed for good. */
  get isClosed(): boolean {
    return this.closed;
  }

  /** Pulls one offline page on l (used by the inbox). */
  pullPage(l: Link, after: bigint, ack: bigint[]) {
    return l.roundTrip(
      { cmd: Cmd.OfflinePull },
      OfflinePullRequestSchema,
      create(OfflinePullRequestSchema, { pageSize: this.t.pageSize, afterMsgid: after, ackMsgids: ack }),
      OfflinePullResponseSchema,
      this.t.requestTimeoutMs,
    );
  }

  /** Acknowledges live pushes (used by the inbox). */
  ackS2C(l: Link, pushIds: bigint[]): void {
    l.notify(Cmd.S2CAck, S2CAckSchema, create(S2CAckSchema, { pushIds }));
  }
}

// ---- receiving ----

interface QItem {
  m?: C2CMessage; // a push has a zero from (see isPush)
  group?: boolean; // a group message: delivered in its group's seq order
  live?: boolean; // a live s2c notify: acked with S2CAck, not from the inbox
  fromPull?: boolean; // an offline or group catch-up page: the next pull acks it
  barrier?: () => void;
}

/** What the client knows of one group. */
interface GroupPos {
  /** The last seq queued for delivery. */
  queued: bigint;
  /** Live messages beyond a gap, by seq. */
  held: C2CMessage[];
  /** The login generation of the gap pull in flight; 0 none. */
  pulling: number;
}

/** Orders group messages by group, then seq. */
function bySeq(a: C2CMessage, b: C2CMessage): number {
  if (a.groupId !== b.groupId) {
    return a.groupId < b.groupId ? -1 : 1;
  }
  return a.seq < b.seq ? -1 : a.seq > b.seq ? 1 : 0;
}

/** Raises the cursor of group id in cursors to seq. */
function raise(cursors: Map<bigint, bigint>, id: bigint, seq: bigint): void {
  if (seq > (cursors.get(id) ?? 0n)) {
    cursors.set(id, seq);
  }
}

/** The most cursors one group-ack request carries. */
const MAX_CURSORS = 100;

/** Thrown inside the group catch-up when its link died or the client closed: the next login catches up again. */
const STOP = new Error("imd: catch-up stopped");

/** Reports whether m is an app-server push (stored with no sender). */
function isPush(m: C2CMessage): boolean {
  return !m.from || (m.from.account === 0 && m.from.uid === 0n);
}

/**
 * Inbox orders, deduplicates and acknowledges what the client receives:
 * chat messages and app-server pushes, live or from the terminal's offline
 * inbox. After every login it pulls the inbox page by page while live
 * notifies wait, then hands those over in msgid order, so the app sees the
 * offline messages first and no message twice. A message of a kind the app
 * has no callback for is neither delivered nor acknowledged: it stays in
 * the inbox.
 *
 * Group messages go through the same queue, each group in seq order. Each
 * group has its own position (queued, the last seq handed to the queue): a
 * live message whose seq is queued+1 is queued; one at or below is a copy
 * and dropped; one beyond is held, and the group is pulled from queued
 * until the gap is filled (a notify was lost in a connection cut). Pulled
 * pages are the store's word: their messages are queued from the first seq
 * above queued, whatever it is (a member's first page starts at its join).
 * The loop records per group the last seq delivered and acknowledges it
 * with batched group cursors. After every login live group messages wait
 * while group-sync and group-pull catch every group up from max(this
 * terminal's cursor, queued); then they go through the live path, which
 * drops what the pages brought.
 */
class Inbox {
  private gen = 0;
  private syncing = false;
  private buffered: QItem[] = [];
  private queue: QItem[] = [];
  private running = false;
  private closing = false;
  private stopped = false;
  /** Resolves when the callback in progress has returned and its ack is queued. */
  private busy: Promise<void> | null = null;
  /** True only while a callback runs synchronously: close() from inside it must not wait for it. */
  private inCallback = false;

  private readonly seen = new Set<bigint>();
  private readonly ring: bigint[] = [];
  private next = 0;

  private pending: bigint[] = []; // delivered from a notify or the last page, not yet acknowledged
  private pendingS2C: bigint[] = []; // live pushes delivered, not yet acknowledged
  private pulled: bigint[] = []; // delivered from an offline page: the next pull acknowledges them
  private ackTimer: ReturnType<typeof setTimeout> | null = null;
  private pushTimer: ReturnType<typeof setTimeout> | null = null; // pushAckDelayMs
  private flushing: Promise<void> | null = null;

  private readonly groups = new Map<bigint, GroupPos>();
  private gsync = false; // catching the groups up after a login: live group messages wait in gbuffer
  private gbuffer: C2CMessage[] = [];
  private readonly gdone = new Map<bigint, bigint>(); // per group, the last seq delivered
  private readonly gpending = new Map<bigint, bigint>(); // cursors to acknowledge
  private readonly gpulled = new Map<bigint, bigint>(); // delivered from a catch-up page: its next pull acks it
  private gackTimer: ReturnType<typeof setTimeout> | null = null;
  private gflushing: Promise<void> | null = null;

  constructor(
    private readonly c: Client,
    private readonly t: Tunables,
    private readonly opts: ClientOptions,
  ) {}

  /** Fills the dedup window with ids shown by an earlier run, oldest first. */
  remember(ids: bigint[]): void {
    for (const id of ids.slice(-this.t.dedupSize)) {
      this.firstTime(id);
    }
  }

  /** Sets the positions of the groups shown by an earlier run. */
  rememberGroups(seqs: Map<bigint, bigint> | undefined): void {
    for (const [g, seq] of seqs ?? []) {
      this.groups.set(g, { queued: seq, held: [], pulling: 0 });
      this.gdone.set(g, seq);
    }
  }

  private handles(it: QItem): boolean {
    return isPush(it.m!) ? !!this.opts.onS2C : !!this.opts.onC2C;
  }

  private firstTime(id: bigint): boolean {
    if (this.seen.has(id)) {
      return false;
    }
    if (this.ring.length < this.t.dedupSize) {
      this.ring.push(id);
    } else {
      this.seen.delete(this.ring[this.next]);
      this.ring[this.next] = id;
      this.next = (this.next + 1) % this.ring.length;
    }
    this.seen.add(id);
    return true;
  }

  private push(...items: QItem[]): void {
    this.queue.push(...items);
    if (!this.running) {
      void this.loop();
    }
  }

  /** Queues live items, or holds them while the inbox is pulled. */
  private take(...items: QItem[]): void {
    if (this.syncing) {
      this.buffered.push(...items);
      return;
    }
    this.push(...items);
  }

  notified(messages: C2CMessage[]): void {
    this.take(...messages.map((m) => ({ m })));
  }

  pushed(n: S2CNotify): void {
    if (n.pushId === 0n) {
      return;
    }
    const m = {
      msgid: n.pushId,
      msgtype: n.msgtype,
      content: n.content,
      sentAtMs: n.sentAtMs,
    } as C2CMessage;
    this.take({ m, live: n.needAck });
  }

  /** Delivers queued items to the app one at a time and queues their acks. */
  private async loop(): Promise<void> {
    this.running = true;
    try {
      while (this.queue.length > 0 && !this.stopped) {
        const it = this.queue.shift()!;
        if (it.barrier) {
          it.barrier();
          continue;
        }
        const m = it.m!;
        if (this.closing) {
          continue; // closing: nothing more is shown or acknowledged
        }
        if (it.group) {
          await this.deliverGroup(it, m);
          continue;
        }
        if (!this.handles(it)) {
          continue;
        }
        const first = this.firstTime(m.msgid);
        if (first) {
          await this.call(
            () =>
              isPush(m)
                ? this.opts.onS2C!(
                    create(S2CNotifySchema, {
                      pushId: m.msgid,
                      msgtype: m.msgtype,
                      content: m.content,
                      sentAtMs: m.sentAtMs,
                      needAck: !!it.live,
                    }),
                  )
                : this.opts.onC2C!(m),
            () => this.queueAck(it, m),
          );
        } else {
          // Ack duplicates too: a message shown before and delivered again
          // is still in the inbox because its ack was lost.
          this.queueAck(it, m);
        }
      }
    } finally {
      this.running = false;
    }
  }

  /**
   * Runs an app callback and then done (which records the delivery),
   * marking the inbox busy meanwhile so that close() can wait for it.
   */
  private async call(cb: () => void | Promise<void>, done: () => void): Promise<void> {
    let release!: () => void;
    this.busy = new Promise((r) => (release = r));
    try {
      this.inCallback = true;
      let r: void | Promise<void>;
      try {
        r = cb();
      } finally {
        this.inCallback = false;
      }
      await r;
    } catch (err) {
      // The message reached the app; showing it again would not help.
      this.c["log"].warn?.("imd: message callback threw", err);
    }
    done();
    this.busy = null;
    release();
  }

  /** Hands a group message to onGroup unless its seq was delivered, and queues its cursor. */
  private async deliverGroup(it: QItem, m: C2CMessage): Promise<void> {
    const g = m.groupId;
    if (m.seq <= (this.gdone.get(g) ?? 0n)) {
      return;
    }
    await this.call(
      () => this.opts.onGroup!(m),
      () => {
        this.gdone.set(g, m.seq);
        try {
          this.opts.onGroupSeq?.(g, m.seq);
        } catch (err) {
          this.c["log"].warn?.("imd: onGroupSeq threw", err);
        }
        if (it.fromPull) {
          this.gpulled.set(g, m.seq);
        } else {
          raise(this.gpending, g, m.seq);
          this.scheduleGroupAck();
        }
      },
    );
  }

  /** Arms the timer of the batched group cursors, or flushes them when many groups wait. */
  private scheduleGroupAck(): void {
    if (this.gpending.size >= 200) {
      void this.flushGroupAcks();
    } else if (this.gpending.size > 0 && !this.gackTimer && !this.stopped && !this.closing) {
      this.gackTimer = setTimeout(() => {
        this.gackTimer = null;
        void this.flushGroupAcks();
      }, this.t.groupAckDelayMs);
    }
  }

  /** Empties the pending group cursors. */
  private takeCursors(): GroupCursor[] {
    const out = [...this.gpending].map(([groupId, seq]) => create(GroupCursorSchema, { groupId, seq }));
    this.gpending.clear();
    return out;
  }

  /**
   * Sends the pending group cursors on the current link. Those that
   * cannot go now wait for the next flush: a cursor never moves backwards
   * on the server, so sending one again is harmless.
   */
  private flushGroupAcks(): Promise<void> {
    if (this.gackTimer) {
      clearTimeout(this.gackTimer);
      this.gackTimer = null;
    }
    const run = async (): Promise<void> => {
      if (this.gflushing) {
        await this.gflushing.catch(() => {});
      }
      const cs = this.takeCursors();
      if (cs.length === 0) {
        return;
      }
      const l = this.c.onlineLink();
      const left = l ? await this.sendCursors(l, cs, this.t.requestTimeoutMs) : cs;
      for (const cur of left) {
        raise(this.gpending, cur.groupId, cur.seq);
      }
      if (left.length > 0 && !this.stopped && !this.closing && !this.gackTimer) {
        this.gackTimer = setTimeout(() => {
          this.gackTimer = null;
          void this.flushGroupAcks();
        }, Math.max(this.t.groupAckDelayMs, 500));
      }
    };
    const p = run();
    this.gflushing = p;
    void p.finally(() => {
      if (this.gflushing === p) {
        this.gflushing = null;
      }
    });
    return p;
  }

  /**
   * Acknowledges cursors on l and returns those to try again later. A
   * cursor the server refuses for good (the group went away: 4007, 4008)
   * is dropped; when a request of many is refused, they go again one by
   * one so that one such group does not hold the others back.
   */
  private async sendCursors(l: Link, cs: GroupCursor[], timeoutMs: number): Promise<GroupCursor[]> {
    const left: GroupCursor[] = [];
    for (let i = 0; i < cs.length; i += MAX_CURSORS) {
      const batch = cs.slice(i, i + MAX_CURSORS);
      try {
        await l.roundTrip(
          { cmd: Cmd.GroupAck },
          GroupAckRequestSchema,
          create(GroupAckRequestSchema, { cursors: batch }),
          GroupAckResponseSchema,
          timeoutMs,
        );
      } catch (err) {
        if (isRetryable(err) || l.err) {
          this.c["log"].debug?.("imd: group ack failed; will retry", batch.length, err);
          left.push(...batch);
        } else if (batch.length > 1) {
          for (const cur of batch) {
            left.push(...(await this.sendCursors(l, [cur], timeoutMs)));
          }
        } else {
          this.c["log"].info?.("imd: group ack refused; dropped", batch[0].groupId, batch[0].seq, err);
        }
      }
    }
    return left;
  }

  private queueAck(it: QItem, m: C2CMessage): void {
    if (it.fromPull) {
      this.pulled.push(m.msgid);
    } else if (it.live) {
      this.pendingS2C.push(m.msgid);
    } else if (!isPush(m)) {
      this.pending.push(m.msgid);
    }
    if (this.pendingS2C.length >= 200) {
      this.flushPushAcks();
    } else if (this.pendingS2C.length > 0 && !this.pushTimer) {
      this.pushTimer = setTimeout(() => {
        this.pushTimer = null;
        this.flushPushAcks();
      }, this.t.pushAckDelayMs);
    }
    if (this.pending.length >= 200) {
      void this.flushAcks();
    } else if (this.pending.length > 0 && !this.ackTimer) {
      this.ackTimer = setTimeout(() => {
        this.ackTimer = null;
        void this.flushAcks();
      }, this.t.ackDelayMs);
    }
  }

  /** Sends the acks of live pushes now: statistics, one notify, no retry. */
  private flushPushAcks(): void {
    if (this.pushTimer) {
      clearTimeout(this.pushTimer);
      this.pushTimer = null;
    }
    const pushes = this.pendingS2C;
    this.pendingS2C = [];
    const l = this.c.onlineLink();
    if (pushes.length > 0 && l) {
      try {
        this.c.ackS2C(l, pushes);
      } catch {
        // The link is dead; the statistics miss these acks.
      }
    }
  }

  /**
   * Sends the pending acks on the current link. Acks that cannot go now
   * wait for the next flush (acks are idempotent); if the client closes
   * first, the messages stay in the inbox, come back at the next login,
   * are recognised as duplicates and acknowledged then.
   */
  private flushAcks(): Promise<void> {
    if (this.ackTimer) {
      clearTimeout(this.ackTimer);
      this.ackTimer = null;
    }
    const run = async (): Promise<void> => {
      if (this.flushing) {
        await this.flushing.catch(() => {});
      }
      const ids = this.pending;
      const pushes = this.pendingS2C;
      this.pending = [];
      this.pendingS2C = [];
      if (ids.length === 0 && pushes.length === 0) {
        return;
      }
      const l = this.c.onlineLink();
      let sent = 0;
      if (l) {
        if (pushes.length > 0) {
          // Push acks are statistics: one notify, no retry.
          try {
            this.c.ackS2C(l, pushes);
          } catch {
            // The link is dead; the next login brings what matters again.
          }
        }
        while (sent < ids.length) {
          const n = Math.min(ids.length - sent, 500);
          try {
            await this.c.ackC2C(l, ids.slice(sent, sent + n));
          } catch (err) {
            this.c["log"].debug?.("imd: ack failed; will retry", err);
            break;
          }
          sent += n;
        }
      }
      if (sent < ids.length) {
        this.pending = ids.slice(sent).concat(this.pending);
        if (!this.stopped && !this.closing && !this.ackTimer) {
          // Try again once a link is up; acks of a dead session come back
          // with the next login's pull anyway.
          this.ackTimer = setTimeout(() => {
            this.ackTimer = null;
            void this.flushAcks();
          }, Math.max(this.t.ackDelayMs, 500));
        }
      }
    };
    const p = run();
    this.flushing = p;
    void p.finally(() => {
      if (this.flushing === p) {
        this.flushing = null;
      }
    });
    return p;
  }

  /** Queues items of a page and resolves once the app has been handed each. */
  private deliverAndWait(msgs: C2CMessage[]): Promise<boolean> {
    return new Promise((resolve) => {
      const onStop = () => resolve(false);
      this.c.stopSignal.addEventListener("abort", onStop, { once: true });
      this.push(
        ...msgs.map((m) => ({ m, fromPull: true })),
        {
          barrier: () => {
            this.c.stopSignal.removeEventListener("abort", onStop);
            resolve(true);
          },
        },
      );
    });
  }

  /** Resolves true once everything queued before it was handed to the app, false if the client closes first. */
  private barrier(): Promise<boolean> {
    return this.deliverAndWait([]);
  }

  /** Called before a login request is sent: live notifies wait from then on. */
  beginLogin(): void {
    this.gen++;
    this.syncing = true;
    this.gsync = !!this.opts.onGroup;
  }

  /** Begins pulling the offline inbox and catching the groups up on link l after a login. */
  startSync(l: Link): void {
    void this.sync(l, this.gen);
    if (this.opts.onGroup) {
      void this.groupSync(l, this.gen);
    }
  }

  private async sync(l: Link, gen: number): Promise<void> {
    let after = 0n;
    // A client with only onGroup leaves the offline inbox alone.
    for (;;) {
      if (!this.opts.onC2C && !this.opts.onS2C) {
        break;
      }
      // The pull acknowledges what the previous page showed.
      const ack = this.pulled;
      this.pulled = [];
      let resp;
      try {
        resp = await this.c.pullPage(l, after, ack);
      } catch (err) {
        this.pulled = ack.concat(this.pulled);
        if (l.err || this.stopped) {
          return; // the next login pulls again
        }
        // The store is unavailable: try again shortly on this link.
        this.c["log"].warn?.("imd: offline pull failed; retrying", err);
        await sleep(this.t.sendBackoffMinMs, this.c.stopSignal);
        continue;
      }
      if (!(await this.deliverAndWait(resp.messages))) {
        return;
      }
      for (const m of resp.messages) {
        if (m.msgid > after) {
          after = m.msgid;
        }
      }
      if (!resp.more) {
        break;
      }
    }
    // The last page is acknowledged with the batched acks.
    this.pending.push(...this.pulled);
    this.pulled = [];
    if (this.pending.length > 0 && !this.ackTimer) {
      void this.flushAcks();
    }
    if (this.gen !== gen) {
      return; // a newer login owns the sync now
    }
    const held = this.buffered;
    this.buffered = [];
    held.sort((a, b) => (a.m!.msgid < b.m!.msgid ? -1 : a.m!.msgid > b.m!.msgid ? 1 : 0));
    this.syncing = false;
    this.push(...held);
  }

  // ---- groups ----

  /** The position of group id, created at 0. */
  private group(id: bigint): GroupPos {
    let gs = this.groups.get(id);
    if (!gs) {
      gs = { queued: 0n, held: [], pulling: 0 };
      this.groups.set(id, gs);
    }
    return gs;
  }

  /** Takes live group messages: held back while the groups are caught up after a login, else put in their groups' order. */
  takeGroup(msgs: C2CMessage[]): void {
    if (this.stopped) {
      return;
    }
    if (this.gsync) {
      this.gbuffer.push(...msgs);
      return;
    }
    this.live(msgs);
  }

  /**
   * Puts live messages in their groups' order: the next seq is queued
   * (with the held ones it lets through), a copy is dropped, a seq beyond
   * a gap is held and its group pulled.
   */
  private live(msgs: C2CMessage[]): void {
    const gaps: bigint[] = [];
    for (const m of [...msgs].sort(bySeq)) {
      if (m.groupId === 0n || m.seq === 0n) {
        this.c["log"].warn?.("imd: group message without group or seq", m.groupId, m.seq, m.msgid);
        continue;
      }
      const gs = this.group(m.groupId);
      if (m.seq <= gs.queued) {
        continue; // a copy: a retry, or a pull that overtook the notify
      }
      if (m.seq === gs.queued + 1n) {
        this.queueGroup(gs, m, false);
        this.drain(gs);
        continue;
      }
      let i = 0;
      while (i < gs.held.length && gs.held[i].seq < m.seq) {
        i++;
      }
      if (i === gs.held.length || gs.held[i].seq !== m.seq) {
        gs.held.splice(i, 0, m);
      }
      if (gaps[gaps.length - 1] !== m.groupId) {
        gaps.push(m.groupId);
      }
    }
    this.pullGaps(gaps);
  }

  /** Queues a message of a pulled page unless it is at or below the group's position. */
  private pulledOne(gs: GroupPos, m: C2CMessage, fromPull: boolean): void {
    if (m.seq <= gs.queued) {
      return;
    }
    this.queueGroup(gs, m, fromPull);
    this.drain(gs);
  }

  private queueGroup(gs: GroupPos, m: C2CMessage, fromPull: boolean): void {
    gs.queued = m.seq;
    this.push({ m, group: true, fromPull });
  }

  /** Queues the held messages that follow the position and drops those at or below it. */
  private drain(gs: GroupPos): void {
    while (gs.held.length > 0) {
      const h = gs.held[0];
      if (h.seq === gs.queued + 1n) {
        this.queueGroup(gs, h, false);
      } else if (h.seq > gs.queued) {
        return;
      }
      gs.held.shift();
    }
  }

  /**
   * Starts a pull for each group of ids that holds messages beyond a gap
   * and has none running. Nothing is pulled while catching up, which
   * pulls every group anyway.
   */
  private pullGaps(ids: bigint[]): void {
    if (this.gsync || this.stopped) {
      return;
    }
    for (const id of ids) {
      const gs = this.groups.get(id);
      if (gs && gs.held.length > 0 && gs.pulling !== this.gen) {
        gs.pulling = this.gen;
        void this.gapPull(this.gen, id, gs);
      }
    }
  }

  /**
   * Pulls group id from its position until the messages it holds follow
   * on, so that they can be delivered. A later login stops it: its
   * catch-up pulls the group instead.
   */
  private async gapPull(gen: number, id: bigint, gs: GroupPos): Promise<void> {
    let backoff = this.t.sendBackoffMinMs;
    let empty = 0;
    try {
      for (;;) {
        // After pages that brought nothing the held messages wait for the
        // next notify of the group or the next login. Seven, as the Go
        // SDK: in a DC that does not order the group the gap reaches the
        // store by replication, which can take seconds after a restart.
        if (this.gen !== gen || this.stopped || gs.held.length === 0 || empty >= 7) {
          return;
        }
        const after = gs.queued;
        try {
          const l = await this.c.waitOnline(this.t.requestTimeoutMs);
          const resp = await l.roundTrip(
            { cmd: Cmd.GroupPull },
            GroupPullRequestSchema,
            create(GroupPullRequestSchema, { groupId: id, afterSeq: after, pageSize: this.t.pageSize }),
            GroupPullResponseSchema,
            this.t.requestTimeoutMs,
          );
          if (this.gen !== gen) {
            return;
          }
          const before = gs.queued;
          for (const m of resp.messages.sort(bySeq)) {
            m.groupId = id;
            this.pulledOne(gs, m, false);
          }
          if (gs.queued > before) {
            empty = 0;
            backoff = this.t.sendBackoffMinMs;
            continue;
          }
          empty++;
        } catch (err) {
          if (err instanceof StatusError && !isRetryable(err)) {
            // The group is gone for this user (4007, 4008): what it holds
            // will never follow on.
            if (this.gen === gen) {
              this.c["log"].info?.("imd: group pull refused; dropping the held messages", id, gs.held.length, err);
              gs.held = [];
            }
            return;
          }
          if (!isRetryable(err)) {
            return; // closed or logged out
          }
          this.c["log"].debug?.("imd: group pull failed; retrying", id, err);
        }
        await sleep(backoff, this.c.stopSignal);
        backoff = Math.min(2 * backoff, this.t.sendBackoffMaxMs);
      }
    } finally {
      if (gs.pulling === gen) {
        gs.pulling = 0;
      }
    }
  }

  /**
   * Sends a request of the catch-up on l, retrying statuses and timeouts
   * that may pass with backoff. It throws STOP when l dies or the client
   * closes, or the error of a refusal no retry can cure.
   */
  private async catchUpRequest<I extends DescMessage, O extends DescMessage>(
    l: Link,
    cmd: number,
    reqSchema: I,
    req: MessageShape<I>,
    respSchema: O,
  ): Promise<MessageShape<O>> {
    let backoff = this.t.sendBackoffMinMs;
    for (let n = 1; ; n++) {
      try {
        return await l.roundTrip({ cmd }, reqSchema, req, respSchema, this.t.requestTimeoutMs);
      } catch (err) {
        if (l.err || this.stopped) {
          throw STOP;
        }
        if (!isRetryable(err)) {
          throw err;
        }
        // A server with no group store answers 5002 for as long as it
        // runs: one warning, then quieter.
        (n === 1 ? this.c["log"].warn : this.c["log"].debug)?.("imd: group catch-up failed; retrying", cmd, n, err);
        await sleep(backoff, this.c.stopSignal);
        if (l.err || this.stopped) {
          throw STOP;
        }
        backoff = Math.min(2 * backoff, this.t.sendBackoffMaxMs);
      }
    }
  }

  /**
   * Catches the user's groups up after the login of generation gen on l
   * (group-sync, then group-pull pages of every group behind), then lets
   * the live messages held back meanwhile through.
   */
  private async groupSync(l: Link, gen: number): Promise<void> {
    let groups: GroupState[] = [];
    try {
      const resp = await this.catchUpRequest(
        l,
        Cmd.GroupSync,
        GroupSyncRequestSchema,
        create(GroupSyncRequestSchema, {}),
        GroupSyncResponseSchema,
      );
      groups = resp.groups;
    } catch (err) {
      if (err === STOP) {
        return;
      }
      // A server without groups (or refusing): nothing to catch up; the
      // live messages still go through.
      this.c["log"].warn?.("imd: group sync refused", err);
    }
    for (const st of groups) {
      if (!(await this.catchUp(l, gen, st))) {
        return;
      }
    }
    if (this.gen !== gen || this.stopped) {
      return; // a newer login owns the catch-up now
    }
    this.gsync = false;
    const buf = this.gbuffer;
    this.gbuffer = [];
    const gaps: bigint[] = [];
    for (const [id, gs] of this.groups) {
      this.drain(gs); // held across the login
      if (gs.held.length > 0) {
        gaps.push(id);
      }
    }
    this.pullGaps(gaps);
    this.live(buf);
  }

  /**
   * Pulls group st from max(this terminal's cursor, the client's
   * position) to its head, waiting for each page to be delivered before
   * the next pull acknowledges it; the batched cursors take the last
   * page. It returns false when the catch-up has to stop.
   */
  private async catchUp(l: Link, gen: number, st: GroupState): Promise<boolean> {
    const id = st.groupId;
    if (this.gen !== gen) {
      return false;
    }
    const gs = this.group(id);
    if (st.ackedSeq > gs.queued) {
      // Acknowledged by this terminal before (by an earlier client whose
      // state is lost, say): not shown again.
      gs.queued = st.ackedSeq;
      this.drain(gs);
    }
    let after = gs.queued;
    const done = this.gdone.get(id) ?? 0n;
    if (done > st.ackedSeq && done <= st.headSeq) {
      // Shown, but the cursor was lost (a cut, a close without a link).
      raise(this.gpending, id, done);
      this.scheduleGroupAck();
    }
    if (st.headSeq <= after) {
      return true;
    }
    let ack = 0n;
    const putBack = () => {
      if (ack > 0n) {
        raise(this.gpending, id, ack);
        this.scheduleGroupAck();
      }
    };
    for (;;) {
      let resp;
      try {
        resp = await this.catchUpRequest(
          l,
          Cmd.GroupPull,
          GroupPullRequestSchema,
          create(GroupPullRequestSchema, { groupId: id, afterSeq: after, pageSize: this.t.pageSize, ackSeq: ack }),
          GroupPullResponseSchema,
        );
      } catch (err) {
        putBack();
        if (err === STOP) {
          return false;
        }
        // 4007 or 4008: the group went away since the sync.
        this.c["log"].info?.("imd: group pull refused", id, err);
        return true;
      }
      ack = 0n;
      if (this.gen !== gen) {
        return false;
      }
      for (const m of resp.messages.sort(bySeq)) {
        m.groupId = id;
        this.pulledOne(gs, m, true);
        if (m.seq > after) {
          after = m.seq;
        }
      }
      if (!(await this.barrier())) {
        return false;
      }
      ack = this.gpulled.get(id) ?? 0n;
      this.gpulled.delete(id);
      if (!resp.more || resp.messages.length === 0) {
        break;
      }
    }
    putBack(); // the last page goes with the batched cursors
    return true;
  }

  /**
   * Stops the delivery of messages and sends the acks of those shown,
   * waiting for a connection up to timeoutMs: close() and logout() call
   * it so that the next client of the terminal does not get them again.
   */
  async finish(timeoutMs: number): Promise<void> {
    this.closing = true;
    const deadline = Date.now() + timeoutMs;
    const busy = this.busy;
    if (busy && !this.inCallback) {
      await Promise.race([busy, sleep(timeoutMs)]);
    }
    if (this.flushing) {
      await Promise.race([this.flushing.catch(() => {}), sleep(Math.max(0, deadline - Date.now()))]);
    }
    if (this.gflushing) {
      await Promise.race([this.gflushing.catch(() => {}), sleep(Math.max(0, deadline - Date.now()))]);
    }
    if (this.ackTimer) {
      clearTimeout(this.ackTimer);
      this.ackTimer = null;
    }
    if (this.pushTimer) {
      clearTimeout(this.pushTimer);
      this.pushTimer = null;
    }
    if (this.gackTimer) {
      clearTimeout(this.gackTimer);
      this.gackTimer = null;
    }
    const ids = this.pending.concat(this.pulled);
    const pushes = this.pendingS2C;
    this.pending = [];
    this.pulled = [];
    this.pendingS2C = [];
    for (const [g, seq] of this.gpulled) {
      raise(this.gpending, g, seq);
    }
    this.gpulled.clear();
    const cursors = this.takeCursors();
    if (ids.length === 0 && pushes.length === 0 && cursors.length === 0) {
      return;
    }
    let l: Link;
    try {
      l = await this.c.waitOnline(Math.max(1, deadline - Date.now()));
    } catch (err) {
      this.c["log"].info?.("imd: acks not sent before closing", ids.length, err);
      return;
    }
    if (pushes.length > 0) {
      try {
        this.c.ackS2C(l, pushes);
      } catch {
        // Statistics only.
      }
    }
    if (cursors.length > 0) {
      const left = await this.sendCursors(l, cursors, Math.max(1, deadline - Date.now()));
      if (left.length > 0) {
        this.c["log"].info?.("imd: group cursors not sent before closing", left.length);
      }
    }
    for (let sent = 0; sent < ids.length; sent += 500) {
      try {
        await this.c.ackC2C(l, ids.slice(sent, sent + 500));
      } catch (err) {
        this.c["log"].info?.("imd: acks not sent before closing", ids.length - sent, err);
        return;
      }
    }
  }

  /** The client is closed: drop everything. */
  stop(): void {
    this.stopped = true;
    this.queue = [];
    this.buffered = [];
    this.gbuffer = [];
    for (const gs of this.groups.values()) {
      gs.held = [];
    }
    if (this.ackTimer) {
      clearTimeout(this.ackTimer);
      this.ackTimer = null;
    }
    if (this.pushTimer) {
      clearTimeout(this.pushTimer);
      this.pushTimer = null;
    }
    if (this.gackTimer) {
      clearTimeout(this.gackTimer);
      this.gackTimer = null;
    }
  }
}
