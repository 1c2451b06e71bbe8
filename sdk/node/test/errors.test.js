// Unit tests: how the gateway's answers are read. They need no gateway and always run.
// Messages are the gateway's own wordings (backstop_core/approvals.py, policy.py).

"use strict";

const assert = require("node:assert/strict");
const { describe, test } = require("node:test");
const pg = require("pg");

const sdk = require("../dist/index.js");

const {
  ApprovalDeniedError,
  ApprovalTimeoutError,
  BackstopBlockedError,
  BackstopError,
  isBackstopError,
  parseApprovalNotice,
  translateError,
} = sdk;

function databaseError(message, code, fields = {}) {
  const err = new pg.DatabaseError(message, message.length, "error");
  err.severity = "ERROR";
  err.code = code;
  Object.assign(err, fields);
  return err;
}

describe("translateError", () => {
  test("a policy block becomes BackstopBlockedError with its rule and reason", () => {
    const message =
      "backstop: DELETE on public.sdk_frozen_1 is blocked by rule 'sdk-frozen'. " +
      "sdk_frozen_* tables are read-only for agents. Ask an operator to run it or to change " +
      "the policy.";
    const source = databaseError(message, "42501", { hint: "a hint" });
    const err = translateError(source);
    assert.ok(err instanceof BackstopBlockedError);
    assert.ok(err instanceof BackstopError);
    assert.ok(err instanceof pg.DatabaseError, "still a node-postgres DatabaseError");
    assert.equal(err.kind, "blocked");
    assert.equal(err.code, "42501");
    assert.equal(err.severity, "ERROR");
    assert.equal(err.hint, "a hint");
    assert.equal(err.message, message);
    assert.equal(err.rule, "sdk-frozen");
    assert.equal(err.reason, message.slice("backstop: ".length));
    assert.equal(err.approvalId, undefined);
    assert.equal(err.cause, source);
  });

  test("a block by a risk default names the default as its rule", () => {
    const err = translateError(
      databaseError(
        "backstop: DROP SCHEMA is blocked by the default for CRITICAL risk. Backstop rates " +
          "it CRITICAL risk: drops a whole schema. Ask an operator to run it or to change the " +
          "policy.",
        "42501",
      ),
    );
    assert.ok(err instanceof BackstopBlockedError);
    assert.equal(err.rule, "default:CRITICAL");
  });

  test("a denial becomes ApprovalDeniedError with id, operator and reason", () => {
    const err = translateError(
      databaseError(
        "backstop: approval 17 for DELETE on public.orders, ~1,204 rows was denied by " +
          "alice: not during business hours: retry tonight",
        "42501",
      ),
    );
    assert.ok(err instanceof ApprovalDeniedError);
    assert.equal(err.kind, "denied");
    assert.equal(err.approvalId, 17);
    assert.equal(err.deniedBy, "alice");
    assert.equal(err.reason, "not during business hours: retry tonight");
  });

  test("a timed-out approval becomes ApprovalTimeoutError (57014)", () => {
    const err = translateError(
      databaseError(
        "backstop: approval 4 for DELETE on public.t, rows unknown timed out: no operator " +
          "decided within 300 s. The statement did not run; ask an operator and retry.",
        "57014",
      ),
    );
    assert.ok(err instanceof ApprovalTimeoutError);
    assert.equal(err.kind, "timedOut");
    assert.equal(err.code, "57014");
    assert.equal(err.approvalId, 4);
    assert.equal(err.timeoutSeconds, 300);
    assert.match(err.reason, /^no operator decided within 300 s\./);
  });

  test("a refusal about an approval that is neither denied nor timed out stays a BackstopError", () => {
    const err = translateError(
      databaseError("backstop: approval 9 was already used; ask again", "42501"),
    );
    assert.ok(err instanceof BackstopError);
    assert.ok(!(err instanceof BackstopBlockedError));
    assert.equal(err.kind, "other");
    assert.equal(err.approvalId, 9);
  });

  test("a refusal at connection time (FATAL 42501) is a block", () => {
    const err = translateError(
      databaseError("backstop: connection refused: standard_conforming_strings off", "42501", {
        severity: "FATAL",
      }),
    );
    assert.ok(err instanceof BackstopBlockedError);
    assert.equal(err.severity, "FATAL");
  });

  test("other errors pass through as the same object", () => {
    const division = databaseError("division by zero", "22012");
    assert.equal(translateError(division), division);
    const cancel = databaseError("canceling statement due to user request", "57014");
    assert.equal(translateError(cancel), cancel);
    const quoted = databaseError("backstop: not a SQLSTATE", "ECONNRESET");
    assert.equal(translateError(quoted), quoted);
    const plain = new Error("backstop: socket closed");
    assert.equal(translateError(plain), plain);
    assert.equal(translateError(undefined), undefined);
    assert.equal(translateError("text"), "text");
    assert.equal(isBackstopError(division), false);
  });

  test("translating twice changes nothing", () => {
    const err = translateError(databaseError("backstop: DO is blocked by rule 'x'.", "42501"));
    assert.equal(translateError(err), err);
    assert.equal(isBackstopError(err), true);
  });
});

describe("parseApprovalNotice", () => {
  test("reads id, operation, tables, estimate and timeout", () => {
    const message =
      "backstop: waiting for approval 12 \u2014 DELETE on public.orders, public.items, " +
      "~1,234 rows; an operator must approve within 300 s";
    const detail = "Operators: backstop approve 12  or  backstop deny 12 --reason TEXT";
    assert.deepEqual(parseApprovalNotice(message, detail), {
      approvalId: 12,
      operation: "DELETE",
      tables: ["public.orders", "public.items"],
      rowEstimate: 1234,
      timeoutSeconds: 300,
      message,
      detail,
    });
  });

  test("unknown rows, no table, fractional timeout", () => {
    const event = parseApprovalNotice(
      "backstop: waiting for approval 3 \u2014 DO on no table, rows unknown; an operator " +
        "must approve within 2.5 s",
    );
    assert.equal(event.approvalId, 3);
    assert.equal(event.operation, "DO");
    assert.deepEqual(event.tables, []);
    assert.equal(event.rowEstimate, null);
    assert.equal(event.timeoutSeconds, 2.5);
    assert.equal(event.detail, undefined);
  });

  test("other notices are not approval notices", () => {
    assert.equal(parseApprovalNotice("backstop: taking a snapshot of public.orders"), undefined);
    assert.equal(parseApprovalNotice('table "x" does not exist, skipping'), undefined);
  });
});
