// Types for steer.js (the Steer worker helper for Node.js).
import { Socket as DgramSocket } from "node:dgram";
import { EventEmitter } from "node:events";
import { Server } from "node:net";

/** Counters reported to the primary with every heartbeat (shown in Steer's /status). */
export interface Counters {
  accepted: number;
  active: number;
  requests: number;
}

/** One socket Steer (or systemd) passed to this process. */
export interface Listener {
  /** From LISTEN_FDNAMES: `--listen NAME=...`, `tcp-8000` when unnamed, `unknown` if unset. */
  name: string;
  /** A bound UDP socket, or any other socket ("tcp": Steer passes listening ones); null if not a socket. */
  kind: "tcp" | "udp" | null;
  /** For a UDP socket; null for TCP. */
  family: "IPv4" | "IPv6" | null;
  /** 3, 4, ... in the order of `--listen`. */
  fd: number;
}

export interface WorkerOptions {
  /** How long idle connections are kept once draining, in ms (default 2000). */
  graceMs?: number;
  /** How long a draining UDP socket must go without a datagram before it is closed (default 50). */
  udpQuietMs?: number;
  /** Exit 0 once drained (default true). */
  exit?: boolean;
}

export interface ServeOptions extends WorkerOptions {
  /** The inherited TCP socket to listen on, by name (default: the first TCP one). */
  listener?: string;
  /** Port to listen on when not started by Steer (default $PORT, else 8000). */
  port?: number;
}

export interface UdpOptions {
  /** Port to bind when not started by Steer (default $UDP_PORT, else 8053). */
  port?: number;
  /** Address to bind when not started by Steer (default 127.0.0.1). */
  address?: string;
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
  /** The server given to `serve`, or null. */
  readonly server: Server | null;
  /** Every TCP server this worker drains. */
  readonly servers: Server[];
  /** Every dgram socket this worker drains. */
  readonly udpSockets: DgramSocket[];
  /** Listens on the inherited TCP socket `name` (default: the first TCP one). */
  listen(server: Server, name?: string, options?: { port?: number }): Server;
  /**
   * A dgram socket on the inherited UDP socket `name` (default: the first UDP one), udp4 or
   * udp6 after its address. On drain it is read until quiet for `udpQuietMs`, then closed.
   */
  udpSocket(name?: string, options?: UdpOptions): DgramSocket;
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
/** A worker with no server yet: add them with `listen` and `udpSocket`. */
export declare function worker(options?: WorkerOptions): Worker;
/** The sockets passed to this process, in order; empty without Steer. */
export declare function listeners(): Listener[];
export declare function activated(): boolean;
export declare const PROTOCOL_VERSION: 1;
/** The most bytes one message may have on the channel, as a JSON line (65,536). */
export declare const MAX_MESSAGE_BYTES: 65536;
