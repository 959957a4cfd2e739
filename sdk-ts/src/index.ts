// @imd/sdk: the TypeScript client of the imd messaging platform.

export * from "./client.js";
export * from "./errors.js";
export * from "./frame.js";
export * from "./protocol.js";
export * from "./transport.js";
export { VERSION } from "./version.js";
export * from "./gen/imd_pb.js";
