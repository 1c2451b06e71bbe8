// classify() runs `backstop classify --json`; these tests need BACKSTOP_CLI (the command)
// and skip without it, except the one about a missing command.

"use strict";

const assert = require("node:assert/strict");
const { describe, test } = require("node:test");

const { BackstopCliError, classify } = require("../dist/index.js");

const NO_CLI = process.env.BACKSTOP_CLI ? false : "set BACKSTOP_CLI to the backstop command";

describe("classify", () => {
  test("returns the risk and one classification per statement", { skip: NO_CLI }, async () => {
    const result = await classify("DELETE FROM orders; SELECT id FROM items WHERE id = 1");
    assert.deepEqual(Object.keys(result).sort(), ["risk", "statements"]);
    assert.ok(["LOW", "MEDIUM", "HIGH", "CRITICAL"].includes(result.risk));
    assert.equal(result.statements.length, 2);
    const [del, select] = result.statements;
    assert.deepEqual(Object.keys(del).sort(), [
      "category",
      "has_where",
      "operation",
      "reasons",
      "risk",
      "table_destructive",
      "tables",
      "unbounded",
    ]);
    assert.equal(del.operation, "DELETE");
    assert.equal(del.category, "WRITE");
    assert.deepEqual(del.tables, ["public.orders"]);
    assert.equal(del.has_where, false);
    assert.equal(del.unbounded, true);
    assert.ok(Array.isArray(del.reasons) && del.reasons.length > 0);
    assert.equal(select.operation, "SELECT");
    assert.equal(select.risk, "LOW");
    assert.equal(result.risk, del.risk, "the overall risk is the worst statement's");
  });

  test("SQL that starts with a dash or spans lines is read whole", { skip: NO_CLI }, async () => {
    const result = await classify("-- cleanup\nDROP TABLE\n  public.old_orders");
    assert.equal(result.statements.length, 1);
    assert.equal(result.statements[0].operation, "DROP_TABLE");
    assert.equal(result.statements[0].table_destructive, true);
  });

  test("the cli option overrides BACKSTOP_CLI", { skip: NO_CLI }, async () => {
    const result = await classify("SELECT 1", { cli: [process.env.BACKSTOP_CLI] });
    assert.equal(result.risk, "LOW");
  });

  test("a missing command is a BackstopCliError", async () => {
    const err = await classify("SELECT 1", { cli: "/nonexistent/backstop" }).then(
      () => assert.fail("classify() succeeded without a command"),
      (e) => e,
    );
    assert.ok(err instanceof BackstopCliError, String(err));
    assert.match(err.message, /not found/);
    assert.deepEqual(err.command, ["/nonexistent/backstop", "classify", "--json"]);
  });
});
