// Transports carry whole frames between the client and a gateway's web
// listener: a WebSocket (binary messages of whole frames) or HTTP
// long-poll sessions (schema/PROTOCOL.md, "Web transports").

/** The kinds of transport, in the order connect tries them by default. */
export type TransportKind = "websocket" | "longpoll";

/** What a transport tells its owner. */
export interface TransportHandlers {
  /** Bytes received: one or more whole frames. */
  onData(data: Uint8Array): void;
  /** The transport is closed, by either side; called once. */
  onClose(err: Error): void;
}

/** Transport is one connection to a gateway, whatever carries it. */
export interface Transport {
  readonly kind: TransportKind;
  /** Where it is connected, for logs. */
  readonly url: string;
  /** Sends whole frames; delivery is in order. Errors close the transport. */
  send(data: Uint8Array): void;
  /** Closes the transport; onClose follows with err (or a plain "closed"). */
  close(err?: Error): void;
}

/** One place to connect to: a WebSocket URL or a long-poll base URL. */
export interface Endpoint {
  kind: TransportKind;
  url: string;
}

/** Where to connect, as the app names it. */
export interface ConnectTarget {
  /**
   * Base URLs of web listeners ("https://chat.example.com",
   * "http://127.0.0.1:7072"): the WebSocket is at /ws, long-poll at /lp.
   */
  urls?: string[];
  /** A WebSocket URL ("wss://chat.example.com/ws"), instead of or besides urls. */
  wsUrl?: string;
  /** A long-poll base URL ("https://chat.example.com/lp"): /open, /send, /poll and /close follow it. */
  lpUrl?: string;
  /** The transports to use, in order of preference. Default: WebSocket, then long-poll. */
  transports?: TransportKind[];
}

/** The environment a transport needs; defaults are the globals. */
export interface TransportEnv {
  /** The WebSocket constructor (Node 20 has one with --experimental-websocket). */
  WebSocket?: typeof WebSocket;
  /** The fetch function. */
  fetch?: typeof fetch;
  /** How long a connect may take, in milliseconds. Default 5000. */
  connectTimeoutMs?: number;
}

/**
 * The endpoints of target, in the order they are tried: for each base URL
 * every transport in order of preference, then wsUrl and lpUrl.
 */
export function endpointsOf(target: ConnectTarget): Endpoint[] {
  const kinds = target.transports ?? ["websocket", "longpoll"];
  const out: Endpoint[] = [];
  for (const base of target.urls ?? []) {
    const u = new URL(base);
    const path = u.pathname.replace(/\/+$/, "");
    for (const kind of kinds) {
      if (kind === "websocket") {
        const ws = new URL(u.href);
        ws.protocol = u.protocol === "https:" ? "wss:" : u.protocol === "http:" ? "ws:" : u.protocol;
        ws.pathname = `${path}/ws`;
        out.push({ kind, url: ws.href });
      } else {
        const lp = new URL(u.href);
        lp.protocol = u.protocol === "wss:" ? "https:" : u.protocol === "ws:" ? "http:" : u.protocol;
        lp.pathname = `${path}/lp`;
        out.push({ kind, url: lp.href.replace(/\/+$/, "") });
      }
    }
  }
  for (const kind of kinds) {
    if (kind === "websocket" && target.wsUrl) {
      out.push({ kind, url: target.wsUrl });
    }
    if (kind === "longpoll" && target.lpUrl) {
      out.push({ kind, url: target.lpUrl.replace(/\/+$/, "") });
    }
  }
  if (out.length === 0) {
    throw new Error("imd: no endpoint to connect to: give urls, wsUrl or lpUrl");
  }
  return out;
}

/** Opens a transport to one endpoint. */
export function openTransport(ep: Endpoint, handlers: TransportHandlers, env: TransportEnv = {}): Promise<Transport> {
  return ep.kind === "websocket" ? openWebSocket(ep.url, handlers, env) : openLongPoll(ep.url, handlers, env);
}

/**
 * Connects to the first endpoint of target that answers: WebSocket first,
 * and long-poll when the WebSocket cannot connect (unless
 * target.transports says otherwise). It rejects with an AggregateError of
 * every failure when none does.
 */
export async function connect(
  target: ConnectTarget,
  handlers: TransportHandlers,
  env: TransportEnv = {},
): Promise<Transport> {
  const errors: unknown[] = [];
  for (const ep of endpointsOf(target)) {
    try {
      return await openTransport(ep, handlers, env);
    } catch (err) {
      errors.push(err);
    }
  }
  throw new AggregateError(errors, "imd: no endpoint could be connected");
}

function toBytes(data: ArrayBuffer | ArrayBufferView): Uint8Array {
  if (data instanceof Uint8Array) {
    return data;
  }
  if (ArrayBuffer.isView(data)) {
    return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  }
  return new Uint8Array(data);
}

/** Opens a WebSocket to url; it resolves once the connection is open. */
export function openWebSocket(url: string, handlers: TransportHandlers, env: TransportEnv = {}): Promise<Transport> {
  const WS = env.WebSocket ?? globalThis.WebSocket;
  if (typeof WS !== "function") {
    return Promise.reject(new Error("imd: no WebSocket in this environment (Node 20 needs --experimental-websocket)"));
  }
  const timeoutMs = env.connectTimeoutMs ?? 5000;
  return new Promise((resolve, reject) => {
    let ws: WebSocket;
    try {
      ws = new WS(url);
    } catch (err) {
      reject(err);
      return;
    }
    ws.binaryType = "arraybuffer";
    let open = false;
    let closed = false;
    const finish = (err: Error) => {
      if (closed) {
        return;
      }
      closed = true;
      clearTimeout(timer);
      if (open) {
        handlers.onClose(err);
      } else {
        reject(err);
      }
    };
    const timer = setTimeout(() => {
      finish(new Error(`imd: WebSocket ${url}: no connection within ${timeoutMs} ms`));
      ws.close();
    }, timeoutMs);
    const t: Transport = {
      kind: "websocket",
      url,
      send(data) {
        if (closed) {
          return;
        }
        try {
          ws.send(data);
        } catch (err) {
          t.close(err instanceof Error ? err : new Error(String(err)));
        }
      },
      close(err) {
        finish(err ?? new Error("imd: closed"));
        try {
          ws.close(1000);
        } catch {
          // Closing a socket that is closing already changes nothing.
        }
      },
    };
    ws.onopen = () => {
      open = true;
      clearTimeout(timer);
      resolve(t);
    };
    ws.onmessage = (ev: MessageEvent) => {
      if (closed) {
        return;
      }
      if (typeof ev.data === "string") {
        // The protocol has no text messages: the stream cannot be trusted.
        t.close(new Error("imd: WebSocket text message from the server"));
        return;
      }
      handlers.onData(toBytes(ev.data as ArrayBuffer));
    };
    ws.onerror = () => {
      finish(new Error(`imd: WebSocket ${url}: connection error`));
    };
    ws.onclose = (ev: CloseEvent) => {
      finish(new Error(`imd: WebSocket ${url} closed (code ${ev.code}${ev.reason ? `, ${ev.reason}` : ""})`));
    };
  });
}

/** The answer to /lp/open. */
interface OpenAnswer {
  session: string;
  poll_ms?: number;
}

/**
 * Opens a long-poll session at base (".../lp"): POST /open, then a poll
 * always pending, and sends queued so that one POST /send at a time is in
 * flight (the order of frames is the order of sends).
 */
export async function openLongPoll(base: string, handlers: TransportHandlers, env: TransportEnv = {}): Promise<Transport> {
  // A browser's fetch must be called with the global object as this: kept
  // as a method of the transport it throws "Illegal invocation".
  const given = env.fetch ?? globalThis.fetch;
  if (typeof given !== "function") {
    throw new Error("imd: no fetch in this environment");
  }
  const f: typeof fetch = (input, init) => given.call(globalThis, input, init);
  const timeoutMs = env.connectTimeoutMs ?? 5000;
  const res = await f(`${base}/open`, { method: "POST", signal: AbortSignal.timeout(timeoutMs) });
  if (!res.ok) {
    throw new Error(`imd: long-poll ${base}/open: HTTP ${res.status}`);
  }
  const answer = (await res.json()) as OpenAnswer;
  if (!answer || typeof answer.session !== "string" || answer.session === "") {
    throw new Error(`imd: long-poll ${base}/open: no session in the answer`);
  }
  return new LongPoll(base, answer.session, answer.poll_ms ?? 30000, handlers, f, timeoutMs);
}

class LongPoll implements Transport {
  readonly kind = "longpoll" as const;
  private closed = false;
  private readonly abort = new AbortController();
  private queue: Uint8Array[] = [];
  private sending = false;

  constructor(
    readonly url: string,
    private readonly session: string,
    private readonly pollMs: number,
    private readonly handlers: TransportHandlers,
    private readonly fetchFn: typeof fetch,
    private readonly requestTimeoutMs: number,
  ) {
    void this.pollLoop();
  }

  private endpoint(op: string): string {
    return `${this.url}/${op}?s=${encodeURIComponent(this.session)}`;
  }

  send(data: Uint8Array): void {
    if (this.closed) {
      return;
    }
    this.queue.push(data);
    if (!this.sending) {
      void this.sendLoop();
    }
  }

  private async sendLoop(): Promise<void> {
    this.sending = true;
    try {
      while (!this.closed && this.queue.length > 0) {
        // Everything queued while the previous POST was in flight goes in
        // one body: frames are whole and back to back, as on a socket.
        const parts = this.queue;
        this.queue = [];
        const body = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
        let at = 0;
        for (const p of parts) {
          body.set(p, at);
          at += p.length;
        }
        let res: Response;
        const limit = withTimeout(this.abort.signal, this.requestTimeoutMs * 2);
        try {
          res = await this.fetchFn(this.endpoint("send"), {
            method: "POST",
            headers: { "content-type": "application/octet-stream" },
            body,
            signal: limit.signal,
          });
          await res.arrayBuffer();
        } catch (err) {
          this.fail(new Error(`imd: long-poll send: ${errText(err)}`));
          return;
        } finally {
          limit.done();
        }
        if (res.status === 404) {
          this.fail(new Error("imd: long-poll session closed by the server"));
          return;
        }
        if (!res.ok) {
          this.fail(new Error(`imd: long-poll send: HTTP ${res.status}`));
          return;
        }
      }
    } finally {
      this.sending = false;
    }
  }

  private async pollLoop(): Promise<void> {
    while (!this.closed) {
      let res: Response;
      let data: Uint8Array;
      // A poll that the server holds longer than poll_ms plus a grace has
      // been lost on the way (a proxy, a sleeping laptop).
      const limit = withTimeout(this.abort.signal, this.pollMs + 15000);
      try {
        res = await this.fetchFn(this.endpoint("poll"), { method: "POST", signal: limit.signal });
        if (res.status === 404) {
          this.fail(new Error("imd: long-poll session closed by the server"));
          return;
        }
        if (!res.ok) {
          void res.body?.cancel();
          this.fail(new Error(`imd: long-poll poll: HTTP ${res.status}`));
          return;
        }
        data = new Uint8Array(await res.arrayBuffer());
      } catch (err) {
        this.fail(new Error(`imd: long-poll poll: ${errText(err)}`));
        return;
      } finally {
        limit.done();
      }
      if (this.closed) {
        return;
      }
      if (data.length > 0) {
        this.handlers.onData(data);
      }
    }
  }

  private fail(err: Error): void {
    if (this.closed) {
      return;
    }
    this.closed = true;
    this.queue = [];
    this.abort.abort();
    this.handlers.onClose(err);
  }

  close(err?: Error): void {
    if (this.closed) {
      return;
    }
    // The server ends the session at once (a logout's answer has been
    // read by now); a lost close is cleaned up by its idle timeout.
    this.fetchFn(this.endpoint("close"), { method: "POST", signal: AbortSignal.timeout(this.requestTimeoutMs) })
      .then((res) => res.body?.cancel())
      .catch(() => {});
    this.fail(err ?? new Error("imd: closed"));
  }
}

/**
 * A signal that aborts with parent or after ms, whichever comes first
 * (AbortSignal.any is too recent for some browsers still in use). Call
 * done once the request is over: it drops the timer and the listener.
 */
function withTimeout(parent: AbortSignal, ms: number): { signal: AbortSignal; done(): void } {
  const ac = new AbortController();
  const timer = setTimeout(() => ac.abort(new DOMException("timed out", "TimeoutError")), ms);
  const onAbort = () => ac.abort(parent.reason);
  const done = () => {
    clearTimeout(timer);
    parent.removeEventListener("abort", onAbort);
  };
  if (parent.aborted) {
    onAbort();
  } else {
    parent.addEventListener("abort", onAbort, { once: true });
  }
  return { signal: ac.signal, done };
}

function errText(err: unknown): string {
  if (err instanceof Error) {
    const cause = (err as { cause?: unknown }).cause;
    return cause instanceof Error ? `${err.message} (${cause.message})` : err.message;
  }
  return String(err);
}
