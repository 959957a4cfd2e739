// The frame codec: a fixed 40-byte big-endian header followed by bodylen
// bytes of protobuf body (schema/frame.go).

export const HEADER_LEN = 40;
export const MAGIC0 = 0x58; // 'X'
export const MAGIC1 = 0x44; // 'D'
export const VERSION = 1;
/** The body limit a decoder applies when none is configured. */
export const DEFAULT_MAX_BODY = 64 << 10;

/** The low two bits of the flags byte. */
export const Kind = { Request: 0, Response: 1, Notify: 2 } as const;
export type Kind = (typeof Kind)[keyof typeof Kind];

const KIND_MASK = 0x03;
const RESERVED_MASK = 0xe0;
/**
 * Flag bit 4 of a request: the gateway serves it after the connection's
 * earlier ordered requests were answered (PROTOCOL.md, "Ordered sends").
 */
export const FLAG_ORDERED = 0x10;

/** A decoded frame header. 64-bit fields are bigints. */
export interface Header {
  version: number;
  flags: number;
  cmd: number;
  status: number;
  appcode: number;
  msgtype: number;
  uid: bigint;
  seq: number;
  logid: bigint;
  bodyLen: number;
}

/** A whole frame: its header and its body (bodyLen bytes). */
export interface Frame {
  header: Header;
  body: Uint8Array;
}

/** The fields a sender chooses; everything else defaults to zero. */
export type HeaderInit = Partial<Omit<Header, "bodyLen" | "version">> & { cmd: number };

/** The kind of a header (request, response or notify). */
export function kindOf(h: Pick<Header, "flags">): number {
  return h.flags & KIND_MASK;
}

/** FrameError is a header that cannot be trusted: the stream is unusable after it. */
export class FrameError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "FrameError";
  }
}

/** Encodes one frame: the header, with bodylen set to body.length, then the body. */
export function encodeFrame(h: HeaderInit, body: Uint8Array = new Uint8Array(0)): Uint8Array {
  const out = new Uint8Array(HEADER_LEN + body.length);
  const v = new DataView(out.buffer);
  out[0] = MAGIC0;
  out[1] = MAGIC1;
  out[2] = VERSION;
  out[3] = (h.flags ?? 0) & 0xff;
  v.setUint16(4, h.cmd);
  v.setUint16(6, h.status ?? 0);
  v.setUint32(8, h.appcode ?? 0);
  v.setUint32(12, h.msgtype ?? 0);
  v.setBigUint64(16, BigInt.asUintN(64, h.uid ?? 0n));
  v.setUint32(24, h.seq ?? 0);
  v.setBigUint64(28, BigInt.asUintN(64, h.logid ?? 0n));
  v.setUint32(36, body.length);
  out.set(body, HEADER_LEN);
  return out;
}

/**
 * Decodes and validates a header from the first 40 bytes of b. It throws
 * a FrameError for bad magic, version or flags, or a bodylen over maxBody.
 */
export function parseHeader(b: Uint8Array, maxBody = DEFAULT_MAX_BODY): Header {
  if (b.length < HEADER_LEN) {
    throw new FrameError("short frame header");
  }
  const v = new DataView(b.buffer, b.byteOffset, HEADER_LEN);
  const h: Header = {
    version: b[2],
    flags: b[3],
    cmd: v.getUint16(4),
    status: v.getUint16(6),
    appcode: v.getUint32(8),
    msgtype: v.getUint32(12),
    uid: v.getBigUint64(16),
    seq: v.getUint32(24),
    logid: v.getBigUint64(28),
    bodyLen: v.getUint32(36),
  };
  if (b[0] !== MAGIC0 || b[1] !== MAGIC1) {
    throw new FrameError("bad frame magic");
  }
  if (h.version !== VERSION) {
    throw new FrameError(`unsupported frame version ${h.version}`);
  }
  if ((h.flags & RESERVED_MASK) !== 0 || (h.flags & KIND_MASK) === 3) {
    throw new FrameError(`bad frame flags 0x${h.flags.toString(16)}`);
  }
  if (h.bodyLen > maxBody) {
    throw new FrameError(`frame body of ${h.bodyLen} bytes over the maximum ${maxBody}`);
  }
  return h;
}

/**
 * FrameDecoder turns received bytes, in chunks of any size, into whole
 * frames. A transport that receives whole frames (a WebSocket message)
 * uses it too: it costs one copy and checks every header the same way.
 */
export class FrameDecoder {
  private buf = new Uint8Array(0);
  private start = 0;
  private end = 0;

  constructor(private readonly maxBody = DEFAULT_MAX_BODY) {}

  /** The number of bytes received that do not make a whole frame yet. */
  get buffered(): number {
    return this.end - this.start;
  }

  /**
   * Appends chunk and returns every frame it completes, in order. The
   * bodies are copies: the caller may keep them. A FrameError means the
   * stream is broken; the decoder must not be used after it.
   */
  push(chunk: Uint8Array): Frame[] {
    this.append(chunk);
    const frames: Frame[] = [];
    for (;;) {
      const avail = this.end - this.start;
      if (avail < HEADER_LEN) {
        break;
      }
      const header = parseHeader(this.buf.subarray(this.start, this.start + HEADER_LEN), this.maxBody);
      if (avail < HEADER_LEN + header.bodyLen) {
        break;
      }
      const from = this.start + HEADER_LEN;
      const body = this.buf.slice(from, from + header.bodyLen);
      this.start = from + header.bodyLen;
      frames.push({ header, body });
    }
    if (this.start === this.end) {
      this.start = this.end = 0;
    }
    return frames;
  }

  private append(chunk: Uint8Array): void {
    const need = this.end - this.start + chunk.length;
    if (this.end + chunk.length > this.buf.length) {
      if (need <= this.buf.length) {
        // Room enough once the consumed bytes are dropped.
        this.buf.copyWithin(0, this.start, this.end);
      } else {
        const next = new Uint8Array(Math.max(need, this.buf.length * 2, 4096));
        next.set(this.buf.subarray(this.start, this.end));
        this.buf = next;
      }
      this.end -= this.start;
      this.start = 0;
    }
    this.buf.set(chunk, this.end);
    this.end += chunk.length;
  }
}
