// A link is one transport to a gateway with the request bookkeeping on it:
// responses are matched to requests by seq, notifies go to the client.

import { fromBinary, toBinary, type DescMessage, type MessageShape } from "@bufbuild/protobuf";
import { ErrorSchema } from "./gen/imd_pb.js";
import { ClientError, StatusError } from "./errors.js";
import { encodeFrame, FLAG_ORDERED, FrameDecoder, Kind, kindOf, type Frame, type Header } from "./frame.js";
import type { Endpoint, Transport } from "./transport.js";

/** What a link needs from its owner. */
export interface LinkOwner {
  nextSeq(): number;
  notified(link: Link, frame: Frame): void;
  linkDown(link: Link, err: Error): void;
}

interface Pending {
  resolve(f: Frame): void;
  reject(err: Error): void;
  timer: ReturnType<typeof setTimeout>;
}

/** Decodes the Error body of a response whose status is not 0. */
export function statusErrorOf(h: Header, body: Uint8Array): StatusError {
  try {
    const e = fromBinary(ErrorSchema, body);
    return new StatusError(h.status, e.message, e.retryAfterMs);
  } catch {
    return new StatusError(h.status);
  }
}

export class Link {
  /** Set once a login succeeded on the link. */
  online = false;
  /** Why the link died, once it has. */
  err: Error | null = null;
  transport: Transport | null = null;
  private readonly pending = new Map<number, Pending>();
  private readonly decoder: FrameDecoder;
  private readonly doneWaiters: (() => void)[] = [];

  constructor(
    private readonly owner: LinkOwner,
    readonly endpoint: Endpoint,
    /** Index of the endpoint in the client's list. */
    readonly idx: number,
    maxBody: number,
  ) {
    this.decoder = new FrameDecoder(maxBody);
  }

  /** Attaches the transport once it is open. */
  attach(t: Transport): void {
    this.transport = t;
  }

  /** Bytes from the transport. */
  onData(data: Uint8Array): void {
    if (this.err) {
      return;
    }
    let frames: Frame[];
    try {
      frames = this.decoder.push(data);
    } catch (err) {
      this.fail(new ClientError("conn_lost", `connection lost: ${(err as Error).message}`, { cause: err }));
      return;
    }
    for (const f of frames) {
      if (this.err) {
        return;
      }
      const kind = kindOf(f.header);
      if (kind === Kind.Response) {
        const p = this.pending.get(f.header.seq);
        if (p) {
          this.pending.delete(f.header.seq);
          clearTimeout(p.timer);
          p.resolve(f);
        } else if (f.header.status !== 0) {
          // An error that answers no request of ours: the server says why
          // it is about to close (login timeout, too many connections...).
          this.fail(statusErrorOf(f.header, f.body));
          return;
        }
      } else if (kind === Kind.Notify) {
        this.owner.notified(this, f);
      }
    }
  }

  /** The transport closed. */
  onClose(err: Error): void {
    this.fail(new ClientError("conn_lost", `connection lost: ${err.message}`, { cause: err }));
  }

  /** Marks the link dead with err, closes the transport and fails every pending request. */
  fail(err: Error): void {
    if (this.err) {
      return;
    }
    this.err = err;
    this.transport?.close(err);
    const pend = [...this.pending.values()];
    this.pending.clear();
    for (const p of pend) {
      clearTimeout(p.timer);
      p.reject(err);
    }
    for (const w of this.doneWaiters.splice(0)) {
      w();
    }
    this.owner.linkDown(this, err);
  }

  close(err: Error): void {
    this.fail(err);
  }

  /** Resolves when the link dies. */
  done(): Promise<void> {
    if (this.err) {
      return Promise.resolve();
    }
    return new Promise((resolve) => this.doneWaiters.push(resolve));
  }

  /**
   * Sends a request and resolves with the response's body decoded as
   * respSchema. A status other than 0 rejects with a StatusError, a lost
   * link with ClientError "conn_lost", no answer in timeoutMs with
   * ClientError "timeout".
   */
  async roundTrip<I extends DescMessage, O extends DescMessage>(
    h: Partial<Header> & { cmd: number },
    reqSchema: I,
    req: MessageShape<I>,
    respSchema: O,
    timeoutMs: number,
  ): Promise<MessageShape<O>> {
    const f = await this.roundTripRaw(h, toBinary(reqSchema, req), timeoutMs);
    return fromBinary(respSchema, f.body);
  }

  /** roundTrip without the body codecs. */
  roundTripRaw(h: Partial<Header> & { cmd: number }, body: Uint8Array, timeoutMs: number): Promise<Frame> {
    if (this.err) {
      return Promise.reject(this.err);
    }
    const seq = this.owner.nextSeq();
    const frame = encodeFrame({ ...h, seq, flags: ((h.flags ?? 0) & FLAG_ORDERED) | Kind.Request }, body);
    return new Promise<Frame>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(seq);
        reject(new ClientError("timeout", `no answer to command 0x${h.cmd.toString(16)} within ${timeoutMs} ms`));
      }, timeoutMs);
      this.pending.set(seq, {
        resolve: (f) => (f.header.status !== 0 ? reject(statusErrorOf(f.header, f.body)) : resolve(f)),
        reject,
        timer,
      });
      this.transport!.send(frame);
    });
  }

  /** Sends a notify (an s2c ack) without waiting for anything. */
  notify<I extends DescMessage>(cmd: number, schema: I, m: MessageShape<I>): void {
    if (this.err) {
      throw this.err;
    }
    this.transport!.send(encodeFrame({ cmd, flags: Kind.Notify }, toBinary(schema, m)));
  }
}
