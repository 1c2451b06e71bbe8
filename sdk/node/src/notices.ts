/**
 * The NoticeResponse the gateway sends while a statement waits for an operator:
 *
 *   backstop: waiting for approval 12 — DELETE on public.orders, ~3 rows; an operator must
 *   approve within 300 s
 *   DETAIL: Operators: backstop approve 12  or  backstop deny 12 --reason TEXT
 */

/** A statement of this connection is held until an operator approves or denies it. */
export interface ApprovalPendingEvent {
  /** The approval's id, for `backstop approve ID` / `backstop deny ID`. */
  approvalId: number;
  /** The statement's operation, e.g. "DELETE", "DROP_TABLE". */
  operation: string;
  /** The tables it touches, schema-qualified where known. */
  tables: string[];
  /** PostgreSQL's row estimate, or null when unknown. */
  rowEstimate: number | null;
  /** How long the gateway waits for a decision before it refuses the statement. */
  timeoutSeconds: number;
  /** The notice's message, as the gateway wrote it. */
  message: string;
  /** The notice's DETAIL (what an operator runs), when it has one. */
  detail: string | undefined;
}

const WAITING =
  /^backstop: waiting for approval (\d+) [\u2014\u2013-] (\S+) on ([\s\S]*?), (?:~([\d,]+) rows|rows unknown); an operator must approve within ([0-9.eE+-]+) s/;

/** Parse the gateway's approval notice; undefined for any other notice. */
export function parseApprovalNotice(
  message: string,
  detail?: string,
): ApprovalPendingEvent | undefined {
  const match = WAITING.exec(message);
  if (!match) return undefined;
  const [, id, operation, tables, rows, timeout] = match;
  return {
    approvalId: Number(id),
    operation: operation ?? "",
    tables: tables === undefined || tables === "no table" ? [] : tables.split(", "),
    rowEstimate: rows === undefined ? null : Number(rows.replace(/,/g, "")),
    timeoutSeconds: Number(timeout),
    message,
    detail,
  };
}
