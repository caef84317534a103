// Types for steer.js (the Steer worker helper for Node.js).
import { EventEmitter } from "node:events";
import { Server } from "node:net";

/** Counters reported to the primary with every heartbeat (shown in Steer's /status). */
export interface Counters {
  accepted: number;
  active: number;
  requests: number;
}

export interface ServeOptions {
  /** How long idle connections are kept once draining, in ms (default 2000). */
  graceMs?: number;
  /** Exit 0 once drained (default true). */
  exit?: boolean;
  /** Port to listen on when not started by Steer (default $PORT, else 8000). */
  port?: number;
}

/** Where a message goes: every other worker, one slot, or the primary's hook. */
export type Recipient = "all" | "primary" | number;

export declare class Worker extends EventEmitter {
  readonly slot: number | null;
  readonly generation: number | null;
  readonly id: number | null;
  readonly supervised: boolean;
  readonly counters: Counters;
  readonly draining: boolean;
  readonly server: Server;
  /**
   * Sends `data` through the primary. Returns false, and sends nothing, when there is no
   * channel or the message is over `MAX_MESSAGE_BYTES` as a JSON line; also false when
   * Node's channel is backed up (the message is still sent, later).
   */
  send(to: Recipient, data: unknown): boolean;
  drain(why?: string): void;
  on(event: "message", listener: (data: unknown, from: number | null) => void): this;
  on(event: "ready", listener: () => void): this;
  on(event: "drain", listener: (why: string) => void): this;
  on(event: "drained", listener: () => void): this;
}

export declare function serve(server: Server, options?: ServeOptions): Worker;
export declare function activated(): boolean;
export declare const PROTOCOL_VERSION: 1;
/** The most bytes one message may have on the channel, as a JSON line (65,536). */
export declare const MAX_MESSAGE_BYTES: 65536;
