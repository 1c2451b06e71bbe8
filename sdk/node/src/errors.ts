/**
 * Backstop's refusals as typed errors.
 *
 * The gateway refuses a statement the way PostgreSQL reports an error: an ErrorResponse
 * with a SQLSTATE and a message that starts with "backstop: ". node-postgres turns that into
 * a DatabaseError; translateError() turns such a DatabaseError into one of the classes
 * below and leaves every other error untouched.
 */

import { DatabaseError } from "pg";

/** What kind of refusal an error is. */
export type BackstopErrorKind = "blocked" | "denied" | "timedOut" | "other";

/** The SQLSTATE of a statement refused by policy or denied by an operator. */
export const SQLSTATE_REFUSED = "42501";
/** The SQLSTATE of a statement whose approval timed out. */
export const SQLSTATE_APPROVAL_TIMEOUT = "57014";

const PREFIX = "backstop: ";
const SQLSTATE = /^[0-9A-Z]{5}$/;
// "backstop: approval 7 for DELETE on public.t, ~3 rows was denied by alice: REASON"
const DENIED = /^backstop: approval (\d+) for ([\s\S]*?) was denied by ([\s\S]*?): ([\s\S]*)$/;
// "backstop: approval 7 for DELETE on public.t, ~3 rows timed out: no operator decided ..."
const TIMED_OUT = /^backstop: approval (\d+) for ([\s\S]*?) timed out: ([\s\S]*)$/;
const TIMEOUT_SECONDS = /decided within ([0-9.eE+-]+) s\b/;
// Any other message about one approval, e.g. "backstop: approval 7 was already used; ask again"
const ABOUT_APPROVAL = /^backstop: approval (\d+)\b/;
const RULE = /\bis blocked by rule '([^']*)'/;
const DEFAULT_RULE = /\bis blocked by the default for ([A-Z]+) risk\b/;

const FIELDS = [
  "severity",
  "code",
  "detail",
  "hint",
  "position",
  "internalPosition",
  "internalQuery",
  "where",
  "schema",
  "table",
  "column",
  "dataType",
  "constraint",
  "file",
  "line",
  "routine",
] as const;

interface Source {
  message: string;
  code: string;
  length?: unknown;
}

interface Details {
  kind: BackstopErrorKind;
  reason: string;
  approvalId?: number | undefined;
}

/**
 * A statement (or connection) that Backstop refused. It is a node-postgres DatabaseError,
 * so code that handles those keeps working; `cause` is the DatabaseError it was made from.
 */
export class BackstopError extends DatabaseError {
  /** The SQLSTATE: 42501 (refused or denied), 57014 (approval timed out), or another. */
  declare code: string;
  /** Which refusal this is; the subclasses narrow it. */
  readonly kind: BackstopErrorKind;
  /** Why, in words: the policy's reason, the operator's reason, or the timeout's. */
  readonly reason: string;
  /** The approval the statement waited for, when it waited for one. */
  readonly approvalId?: number;

  constructor(message: string, source: Source, details: Details) {
    super(message, typeof source.length === "number" ? source.length : 0, "error");
    const from = source as unknown as Record<string, unknown>;
    const self = this as unknown as Record<string, unknown>;
    for (const field of FIELDS) {
      if (from[field] !== undefined) self[field] = from[field];
    }
    this.code = source.code;
    this.kind = details.kind;
    this.reason = details.reason;
    if (details.approvalId !== undefined) this.approvalId = details.approvalId;
    if (source instanceof Error) {
      this.cause = source;
    }
  }
}

/** Refused by the policy (or by a safety check) without asking anyone: SQLSTATE 42501. */
export class BackstopBlockedError extends BackstopError {
  declare readonly kind: "blocked";
  /** The policy rule that blocked it ("default:HIGH" for a risk default), when named. */
  readonly rule?: string;

  constructor(message: string, source: Source) {
    super(message, source, { kind: "blocked", reason: message.slice(PREFIX.length) });
    const named = RULE.exec(message)?.[1];
    const risk = DEFAULT_RULE.exec(message)?.[1];
    const rule = named ?? (risk === undefined ? undefined : `default:${risk}`);
    if (rule !== undefined) this.rule = rule;
  }
}

/** An operator denied the approval the statement waited for: SQLSTATE 42501. */
export class ApprovalDeniedError extends BackstopError {
  declare readonly kind: "denied";
  declare readonly approvalId: number;
  /** Who denied it. */
  readonly deniedBy: string;

  constructor(
    message: string,
    source: Source,
    approvalId: number,
    deniedBy: string,
    reason: string,
  ) {
    super(message, source, { kind: "denied", reason, approvalId });
    this.deniedBy = deniedBy;
  }
}

/** Nobody decided within the approval timeout; the statement did not run: SQLSTATE 57014. */
export class ApprovalTimeoutError extends BackstopError {
  declare readonly kind: "timedOut";
  declare readonly approvalId: number;
  /** The approval timeout the gateway applied, when the message names it. */
  readonly timeoutSeconds?: number;

  constructor(message: string, source: Source, approvalId: number, reason: string) {
    super(message, source, { kind: "timedOut", reason, approvalId });
    const seconds = TIMEOUT_SECONDS.exec(reason)?.[1];
    if (seconds !== undefined && Number.isFinite(Number(seconds))) {
      this.timeoutSeconds = Number(seconds);
    }
  }
}

function backstopSource(err: unknown): Source | undefined {
  if (typeof err !== "object" || err === null) return undefined;
  const { message, code } = err as { message?: unknown; code?: unknown };
  if (typeof message !== "string" || typeof code !== "string") return undefined;
  if (!message.startsWith(PREFIX) || !SQLSTATE.test(code)) return undefined;
  return err as Source;
}

/** True when `err` is an error the gateway sent (typed already or not). */
export function isBackstopError(err: unknown): boolean {
  return err instanceof BackstopError || backstopSource(err) !== undefined;
}

/**
 * The typed Backstop error for a DatabaseError the gateway sent; any other value is
 * returned as it is (the same object).
 */
export function translateError<T>(err: T): T | BackstopError {
  if (err instanceof BackstopError) return err;
  const source = backstopSource(err);
  if (source === undefined) return err;
  const { message, code } = source;
  if (code === SQLSTATE_APPROVAL_TIMEOUT) {
    const timedOut = TIMED_OUT.exec(message);
    if (timedOut) {
      return new ApprovalTimeoutError(message, source, Number(timedOut[1]), timedOut[3] ?? "");
    }
  }
  if (code === SQLSTATE_REFUSED) {
    const denied = DENIED.exec(message);
    if (denied) {
      return new ApprovalDeniedError(
        message,
        source,
        Number(denied[1]),
        denied[3] ?? "",
        denied[4] ?? "",
      );
    }
    if (!ABOUT_APPROVAL.test(message)) {
      return new BackstopBlockedError(message, source);
    }
  }
  const about = ABOUT_APPROVAL.exec(message);
  return new BackstopError(message, source, {
    kind: "other",
    reason: message.slice(PREFIX.length),
    approvalId: about ? Number(about[1]) : undefined,
  });
}
