/**
 * backstop(): make a node-postgres Client or Pool speak Backstop, and the drop-in Client and
 * Pool classes that do it from their constructor.
 *
 * Two things change, nothing else:
 *  - errors the gateway sends become typed errors (see errors.ts); other errors pass as is;
 *  - the approval notice becomes an `approvalPending` event, and the end of the held query
 *    an `approvalDecided` event, on the client and on the pool that owns it.
 *
 * A connection runs its queries in order and the gateway answers them in order, so the
 * approval notice always belongs to the first query of the connection that has not finished
 * yet: the one the gateway is holding.
 */

import type { EventEmitter } from "node:events";
import * as pg from "pg";

import { ApprovalDeniedError, ApprovalTimeoutError, translateError } from "./errors";
import { type ApprovalPendingEvent, parseApprovalNotice } from "./notices";

/** How a held statement ended. */
export type ApprovalOutcome =
  /** approved, and the statement completed */
  | "approved"
  /** an operator denied it (the query rejected with ApprovalDeniedError) */
  | "denied"
  /** nobody decided in time (the query rejected with ApprovalTimeoutError) */
  | "timedOut"
  /** it failed otherwise: refused after all, failed in PostgreSQL once approved, or the
   * connection was lost; `error` says which */
  | "failed";

/** The statement an `approvalPending` event announced has finished, one way or another. */
export interface ApprovalDecidedEvent {
  approvalId: number;
  outcome: ApprovalOutcome;
  /** The error the query rejected with (already translated); undefined when approved. */
  error: unknown;
  /** Milliseconds between the notice and the end of the statement. */
  waitedMs: number;
  /** The `approvalPending` event this one closes. */
  pending: ApprovalPendingEvent;
}

/** The events a wrapped client or pool emits, with their listener types. */
export interface BackstopEvents {
  approvalPending: (event: ApprovalPendingEvent) => void;
  approvalDecided: (event: ApprovalDecidedEvent) => void;
}

/** The typed listener methods for Backstop's events (added to a wrapped client or pool). */
export interface BackstopEventSource {
  on<E extends keyof BackstopEvents>(event: E, listener: BackstopEvents[E]): this;
  once<E extends keyof BackstopEvents>(event: E, listener: BackstopEvents[E]): this;
  off<E extends keyof BackstopEvents>(event: E, listener: BackstopEvents[E]): this;
  addListener<E extends keyof BackstopEvents>(event: E, listener: BackstopEvents[E]): this;
  removeListener<E extends keyof BackstopEvents>(event: E, listener: BackstopEvents[E]): this;
  prependListener<E extends keyof BackstopEvents>(event: E, listener: BackstopEvents[E]): this;
  prependOnceListener<E extends keyof BackstopEvents>(event: E, listener: BackstopEvents[E]): this;
}

// eslint-disable-next-line @typescript-eslint/no-explicit-any
type AnyFunction = (...args: any[]) => any;
type Callback = (err: unknown, result?: unknown) => unknown;

interface Held {
  event: ApprovalPendingEvent;
  since: number;
}

interface ClientState {
  held: Held | undefined;
  owner: EventEmitter | undefined;
}

const STATE = Symbol.for("@backstop/pg.client");
const POOL = Symbol.for("@backstop/pg.pool");
const PATCHED = Symbol.for("@backstop/pg.patched");

interface Tagged {
  [STATE]?: ClientState;
  [POOL]?: true;
  [PATCHED]?: true;
}

type ClientLike = EventEmitter & Tagged & { query: AnyFunction; connect: AnyFunction };
type PoolLike = EventEmitter & Tagged & { Client?: unknown; _clients?: unknown };

function emitSafely(target: EventEmitter, name: keyof BackstopEvents, event: unknown): void {
  try {
    target.emit(name, event);
  } catch (err) {
    // A listener that throws must not break the connection's message handling; report it
    // the way an uncaught exception is reported.
    queueMicrotask(() => {
      throw err;
    });
  }
}

function outcomeOf(error: unknown): ApprovalOutcome {
  if (error === undefined || error === null) return "approved";
  if (error instanceof ApprovalDeniedError) return "denied";
  if (error instanceof ApprovalTimeoutError) return "timedOut";
  return "failed";
}

function emitBoth(
  client: EventEmitter,
  state: ClientState,
  name: keyof BackstopEvents,
  event: unknown,
) {
  emitSafely(client, name, event);
  if (state.owner !== undefined && state.owner !== client) emitSafely(state.owner, name, event);
}

/** The end of the query the gateway was holding, if it was holding one. */
function settle(client: EventEmitter, state: ClientState, error: unknown): void {
  const held = state.held;
  if (held === undefined) return;
  state.held = undefined;
  const event: ApprovalDecidedEvent = {
    approvalId: held.event.approvalId,
    outcome: outcomeOf(error),
    error: error ?? undefined,
    waitedMs: Date.now() - held.since,
    pending: held.event,
  };
  emitBoth(client, state, "approvalDecided", event);
}

/** Listen for approval notices on a client; idempotent. Returns its state. */
function track(client: ClientLike, owner?: EventEmitter): ClientState {
  let state = client[STATE];
  if (state === undefined) {
    const created: ClientState = { held: undefined, owner: undefined };
    state = created;
    Object.defineProperty(client, STATE, { value: created });
    client.on("notice", (notice: { message?: unknown; detail?: unknown }) => {
      const message = typeof notice?.message === "string" ? notice.message : "";
      const detail = typeof notice?.detail === "string" ? notice.detail : undefined;
      const event = parseApprovalNotice(message, detail);
      if (event === undefined) return;
      created.held = { event, since: Date.now() };
      emitBoth(client, created, "approvalPending", event);
    });
  }
  if (owner !== undefined && state.owner === undefined) state.owner = owner;
  return state;
}

function isThenable(value: unknown): value is PromiseLike<unknown> {
  return (
    typeof value === "object" &&
    value !== null &&
    typeof (value as { then?: unknown }).then === "function"
  );
}

/** A Submittable (pg.Query, pg-cursor, pg-query-stream): translate what it is told. */
function patchSubmittable(client: ClientLike, state: ClientState, submittable: Tagged): void {
  if (submittable[PATCHED]) return;
  Object.defineProperty(submittable, PATCHED, { value: true });
  const target = submittable as unknown as Record<string, unknown>;
  const handleError = target["handleError"];
  if (typeof handleError === "function") {
    target["handleError"] = function (this: unknown, err: unknown, ...rest: unknown[]) {
      const translated = translateError(err);
      settle(client, state, translated);
      return handleError.call(this, translated, ...rest);
    };
  }
  const handleReadyForQuery = target["handleReadyForQuery"];
  if (typeof handleReadyForQuery === "function") {
    target["handleReadyForQuery"] = function (this: unknown, ...args: unknown[]) {
      settle(client, state, undefined);
      return handleReadyForQuery.apply(this, args);
    };
  }
}

/** Client#query with Backstop's errors translated, in every calling form pg accepts. */
function backstopQuery(client: ClientLike, query: AnyFunction, args: unknown[]): unknown {
  const state = track(client);
  const [config, values, callback] = args;
  if (
    config !== null &&
    typeof config === "object" &&
    typeof (config as { submit?: unknown }).submit === "function"
  ) {
    patchSubmittable(client, state, config as Tagged);
    return query.apply(client, args);
  }
  const wrap =
    (cb: AnyFunction): Callback =>
    (err, result) => {
      const translated = err ? translateError(err) : err;
      settle(client, state, translated || undefined);
      return cb.call(client, translated, result);
    };
  if (typeof callback === "function") {
    return query.call(client, config, values, wrap(callback as AnyFunction));
  }
  if (typeof values === "function") {
    return query.call(client, config, wrap(values as AnyFunction));
  }
  if (
    config !== null &&
    typeof config === "object" &&
    typeof (config as { callback?: unknown }).callback === "function"
  ) {
    const own = { ...(config as Record<string, unknown>) };
    own["callback"] = wrap(own["callback"] as AnyFunction);
    return query.call(client, own, ...args.slice(1));
  }
  // Promise form. The held query is settled from pg's callback, synchronously, so the
  // approval events stay in step with the connection even when queries are pipelined.
  let fail: ((err: unknown) => void) | undefined;
  let done: ((result: unknown) => void) | undefined;
  const finished = new Promise<unknown>((resolve, reject) => {
    done = resolve;
    fail = reject;
  });
  const callbackForm: Callback = (err, result) => {
    if (err) {
      const translated = translateError(err);
      settle(client, state, translated);
      fail?.(translated);
    } else {
      settle(client, state, undefined);
      done?.(result);
    }
  };
  const returned: unknown = query.call(client, config, values, callbackForm);
  if (isThenable(returned)) {
    // Not the pg Client this was written for: it ignored the callback. Use its promise.
    return awaitAndTranslate(client, state, returned);
  }
  return rejectWithCallerStack(finished);
}

async function rejectWithCallerStack(finished: Promise<unknown>): Promise<unknown> {
  try {
    return await finished;
  } catch (err) {
    // As pg does for its promises: a stack that leads back to the caller, not to the socket.
    if (err instanceof Error) Error.captureStackTrace(err);
    throw err;
  }
}

async function awaitAndTranslate(
  client: EventEmitter,
  state: ClientState,
  returned: PromiseLike<unknown>,
): Promise<unknown> {
  try {
    const result = await returned;
    settle(client, state, undefined);
    return result;
  } catch (err) {
    const translated = translateError(err);
    settle(client, state, translated);
    throw translated;
  }
}

/** Client#connect with a refusal at connection time (FATAL 42501) translated. */
function backstopConnect(client: ClientLike, connect: AnyFunction, args: unknown[]): unknown {
  const [callback] = args;
  if (typeof callback === "function") {
    return connect.call(client, (err: unknown, ...rest: unknown[]) =>
      callback.call(client, err ? translateError(err) : err, ...rest),
    );
  }
  const returned: unknown = connect.apply(client, args);
  if (!isThenable(returned)) return returned;
  return Promise.resolve(returned).catch((err: unknown) => {
    throw translateError(err);
  });
}

function patchClientInstance(client: ClientLike, owner?: EventEmitter): void {
  track(client, owner);
  if (client[PATCHED]) return;
  Object.defineProperty(client, PATCHED, { value: true });
  const query = client.query;
  const connect = client.connect;
  client.query = function (this: ClientLike, ...args: unknown[]) {
    return backstopQuery(this, query, args);
  };
  client.connect = function (this: ClientLike, ...args: unknown[]) {
    return backstopConnect(this, connect, args);
  };
}

function isPool(target: object): target is PoolLike {
  return "totalCount" in target && "idleCount" in target && "waitingCount" in target;
}

function patchPool(pool: PoolLike): void {
  if (pool[POOL]) return;
  Object.defineProperty(pool, POOL, { value: true });
  const Base = pool.Client;
  if (typeof Base === "function") {
    // Every client the pool makes from now on, from its constructor (so that a refusal
    // while connecting is typed too).
    const Wrapped = class extends (Base as new (...args: unknown[]) => ClientLike) {
      constructor(...args: unknown[]) {
        super(...args);
        patchClientInstance(this, pool);
      }
    };
    Object.defineProperty(Wrapped, "name", { value: (Base as { name?: string }).name || "Client" });
    pool.Client = Wrapped;
  }
  // Clients made before backstop() was called, or by a factory that ignores pool.Client.
  if (Array.isArray(pool._clients)) {
    for (const client of pool._clients as ClientLike[]) patchClientInstance(client, pool);
  }
  pool.on("connect", (client: ClientLike) => patchClientInstance(client, pool));
}

/**
 * Wrap an existing node-postgres Client or Pool (or a pool's client) for a Backstop
 * gateway, in place, and return it typed with Backstop's events. Calling it again on the
 * same object does nothing more.
 */
export function backstop<T extends pg.Pool | pg.ClientBase>(target: T): T & BackstopEventSource;
export function backstop(target: object): unknown {
  if (isPool(target)) {
    patchPool(target);
  } else if (
    typeof (target as { query?: unknown }).query === "function" &&
    typeof (target as { on?: unknown }).on === "function"
  ) {
    patchClientInstance(target as ClientLike);
  } else {
    throw new TypeError("backstop() expects a node-postgres Client or Pool");
  }
  return target;
}

/**
 * node-postgres's Client for a Backstop gateway: typed errors and approval events.
 * Use it exactly like pg.Client (it is a subclass).
 */
class BackstopClient extends pg.Client {
  constructor(config?: string | pg.ClientConfig) {
    super(config);
    track(this as unknown as ClientLike);
  }
}

// On the prototype rather than on each instance, so that subclasses can override them.
{
  const proto = BackstopClient.prototype as unknown as Record<string, unknown> & Tagged;
  const query = pg.Client.prototype.query as AnyFunction;
  const connect = pg.Client.prototype.connect as AnyFunction;
  proto["query"] = function (this: ClientLike, ...args: unknown[]) {
    return backstopQuery(this, query, args);
  };
  proto["connect"] = function (this: ClientLike, ...args: unknown[]) {
    return backstopConnect(this, connect, args);
  };
  Object.defineProperty(proto, PATCHED, { value: true });
}

/**
 * node-postgres's Pool for a Backstop gateway: every client it makes has typed errors, and
 * approval events are emitted on the client and on the pool. Use it exactly like pg.Pool
 * (it is a subclass).
 */
class BackstopPool extends pg.Pool {
  constructor(config?: pg.PoolConfig) {
    super(config);
    patchPool(this as unknown as PoolLike);
  }
}

Object.defineProperty(BackstopClient, "name", { value: "Client" });
Object.defineProperty(BackstopPool, "name", { value: "Pool" });

/** A pg.Client with Backstop's typed errors and events. */
export type Client = BackstopClient & BackstopEventSource;
/** A pg.Client with Backstop's typed errors and events. */
export const Client = BackstopClient as unknown as {
  new (config?: string | pg.ClientConfig): Client;
  prototype: Client;
};

/** A pg.Pool with Backstop's typed errors and events, on the pool and on its clients. */
export type Pool = BackstopPool & BackstopEventSource;
/** A pg.Pool with Backstop's typed errors and events, on the pool and on its clients. */
export const Pool = BackstopPool as unknown as {
  new (config?: pg.PoolConfig): Pool;
  prototype: Pool;
};
