/**
 * @backstop/pg — node-postgres for a Backstop gateway.
 *
 *   import { Pool, BackstopBlockedError, ApprovalDeniedError } from "@backstop/pg";
 */

export {
  ApprovalDeniedError,
  ApprovalTimeoutError,
  BackstopBlockedError,
  BackstopError,
  type BackstopErrorKind,
  isBackstopError,
  SQLSTATE_APPROVAL_TIMEOUT,
  SQLSTATE_REFUSED,
  translateError,
} from "./errors";
export { type ApprovalPendingEvent, parseApprovalNotice } from "./notices";
export {
  type ApprovalDecidedEvent,
  type ApprovalOutcome,
  backstop,
  type BackstopEvents,
  type BackstopEventSource,
  Client,
  Pool,
} from "./wrap";
export {
  BackstopCliError,
  type Category,
  type Classification,
  classify,
  type ClassifyOptions,
  type Risk,
  type StatementClassification,
} from "./classify";
