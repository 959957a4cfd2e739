// Errors the client returns besides the statuses of the server.

import { statusFatal, statusRetryable, Status } from "./protocol.js";

/** StatusError is a response whose status is not 0: the server refused the request. */
export class StatusError extends Error {
  /** The frame status (the Error body's code). */
  readonly status: number;
  /** The server's detail, for logs (not for matching). */
  readonly detail: string;
  /** The server's retry hint in milliseconds; 0 = use the client's backoff. */
  readonly retryAfterMs: number;

  constructor(status: number, detail = "", retryAfterMs = 0) {
    super(`imd: status ${status}${detail ? `: ${detail}` : ""}`);
    this.name = "StatusError";
    this.status = status;
    this.detail = detail;
    this.retryAfterMs = retryAfterMs;
  }

  /** The same request may succeed later. */
  get retryable(): boolean {
    return statusRetryable(this.status);
  }

  /** The server closes the connection after this status. */
  get fatal(): boolean {
    return statusFatal(this.status);
  }
}

/** What went wrong on the client's side. */
export type ClientErrorCode =
  /** The client was closed, logged out, kicked out or refused for good. */
  | "closed"
  /** No connection came up in time. */
  | "not_connected"
  /** The connection broke while the call was in flight: it may or may not have been served. */
  | "conn_lost"
  /** login() has not succeeded yet. */
  | "not_logged_in"
  /** No response came within the request timeout. */
  | "timeout"
  /** A send used up its attempts; cause is the last error. */
  | "send_failed";

/** ClientError is a failure of the client or of the connection, not a status. */
export class ClientError extends Error {
  readonly code: ClientErrorCode;

  constructor(code: ClientErrorCode, message: string, options?: { cause?: unknown }) {
    super(`imd: ${message}`, options);
    this.name = "ClientError";
    this.code = code;
  }
}

/** Reports whether err may go away if the same call is made again later. */
export function isRetryable(err: unknown): boolean {
  if (err instanceof StatusError) {
    // 1006 on a connection this client logged in means the server no
    // longer counts it as logged in; it closes it, and the request can go
    // again once the client has logged in anew.
    return err.retryable || err.status === Status.NotLoggedIn;
  }
  if (err instanceof ClientError) {
    return err.code === "conn_lost" || err.code === "not_connected" || err.code === "timeout";
  }
  return false;
}
