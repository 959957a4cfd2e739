/** The SDK version sent at login (LoginRequest.sdk_version). */
export const VERSION = "ts-0.1.0";
