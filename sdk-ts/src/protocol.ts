// Command numbers and status codes of the imd wire protocol, version 1
// (schema/PROTOCOL.md, schema/cmd.go, schema/status.go).

/** Command numbers of the frame header. They are never reused. */
export const Cmd = {
  Login: 0x0001,
  Logout: 0x0002,
  Keepalive: 0x0003,
  Kickout: 0x0004,
  GoAway: 0x0005,
  C2S: 0x0010,
  S2C: 0x0020,
  S2CAck: 0x0021,
  C2CSend: 0x0030,
  C2CNotify: 0x0031,
  C2CAck: 0x0032,
  C2CReceipt: 0x0033,
  OfflineCount: 0x0040,
  OfflinePull: 0x0041,
  HistorySync: 0x0050,
  GroupNotify: 0x0060,
  GroupSync: 0x0061,
  GroupPull: 0x0062,
  GroupAck: 0x0063,
  Transient: 0x0064,
  ConvSync: 0x0070,
  ConvRead: 0x0071,
  ConvMark: 0x0072,
  PresenceSubscribe: 0x0080,
  PresenceNotify: 0x0081,
  GroupPresence: 0x0082,
} as const;

/** Status codes of a response; 0 is success. */
export const Status = {
  OK: 0,
  BadFrame: 1001,
  BadVersion: 1002,
  BodyTooLarge: 1003,
  BadBody: 1004,
  UnknownCmd: 1005,
  NotLoggedIn: 1006,
  UIDMismatch: 1007,
  BadKind: 1008,
  AlreadyLoggedIn: 1009,
  TokenInvalid: 2001,
  TokenExpired: 2002,
  TokenMalformed: 2003,
  UnknownAppCode: 2004,
  TokenMismatch: 2005,
  RateLimited: 3001,
  TooManyConns: 3002,
  LoginTimeout: 3003,
  TooManyInFlight: 3004,
  OutOfOrder: 3005,
  BadRecipient: 4001,
  EmptyContent: 4002,
  BadArgument: 4003,
  UnmappedType: 4004,
  ContentTooLarge: 4005,
  UnknownConn: 4006,
  UnknownGroup: 4007,
  NotMember: 4008,
  GroupFull: 4009,
  GroupExists: 4010,
  TooManyFollowed: 4011,
  Internal: 5001,
  Unavailable: 5002,
  Timeout: 5003,
  ShuttingDown: 5004,
} as const;

const retryableStatuses = new Set<number>([
  Status.RateLimited,
  Status.TooManyConns,
  Status.TooManyInFlight,
  Status.OutOfOrder,
  Status.Internal,
  Status.Unavailable,
  Status.Timeout,
  Status.ShuttingDown,
]);

const fatalStatuses = new Set<number>([
  Status.BadFrame,
  Status.BadVersion,
  Status.BodyTooLarge,
  Status.NotLoggedIn,
  Status.LoginTimeout,
]);

/**
 * Reports whether the same request may succeed later. A code this SDK
 * does not know is not retryable, as the protocol asks.
 */
export function statusRetryable(status: number): boolean {
  return retryableStatuses.has(status);
}

/** Reports whether the server closes the connection after this status. */
export function statusFatal(status: number): boolean {
  return fatalStatuses.has(status);
}
