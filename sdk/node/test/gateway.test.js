// The SDK against a running Backstop gateway. Needs:
//   BACKSTOP_TEST_GATEWAY_DSN  a libpq URL of the gateway (skipped when unset)
//   BACKSTOP_TEST_STATE_DIR    the gateway's state directory  } the approval tests are
//   BACKSTOP_CLI               the `backstop` command          } skipped without them
// The gateway must run the policy in test/policy.json: DELETE on sdk_approve_* waits for an
// operator (5 s timeout), DELETE/UPDATE on sdk_frozen_* is blocked, HIGH and CRITICAL risk
// are blocked. The tests create their own tables, through the gateway.

"use strict";

const assert = require("node:assert/strict");
const { execFile } = require("node:child_process");
const { randomBytes } = require("node:crypto");
const { once } = require("node:events");
const { after, before, describe, test } = require("node:test");
const pg = require("pg");

const {
  ApprovalDeniedError,
  ApprovalTimeoutError,
  BackstopBlockedError,
  BackstopError,
  Client,
  Pool,
  backstop,
} = require("../dist/index.js");

const DSN = process.env.BACKSTOP_TEST_GATEWAY_DSN;
const STATE_DIR = process.env.BACKSTOP_TEST_STATE_DIR;
const CLI = process.env.BACKSTOP_CLI;

const NO_GATEWAY = DSN ? false : "set BACKSTOP_TEST_GATEWAY_DSN to run against a gateway";
const NO_OPERATOR =
  NO_GATEWAY ||
  (STATE_DIR && CLI ? false : "set BACKSTOP_TEST_STATE_DIR and BACKSTOP_CLI to decide approvals");

/** Run the operator's command line, e.g. backstop approve 7 --state-dir DIR. */
function operator(...args) {
  return new Promise((resolve, reject) => {
    execFile(
      CLI,
      [...args, "--state-dir", STATE_DIR],
      { timeout: 30_000 },
      (err, stdout, stderr) => {
        if (err) reject(new Error(`${CLI} ${args.join(" ")} failed: ${err.message}\n${stderr}`));
        else resolve(stdout);
      },
    );
  });
}

/** A new table of ten rows (ids 1..10), made through the gateway. */
async function makeTable(client, prefix) {
  const name = `${prefix}_${randomBytes(5).toString("hex")}`;
  await client.query(`CREATE TABLE ${name} (id int PRIMARY KEY, note text)`);
  await client.query(`INSERT INTO ${name} SELECT i, 'row ' || i FROM generate_series(1, 10) AS i`);
  return name;
}

async function ids(client, table) {
  const result = await client.query(`SELECT id FROM ${table} ORDER BY id`);
  return result.rows.map((row) => row.id);
}

const ALL = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10];

describe("through the gateway", { skip: NO_GATEWAY }, () => {
  let pool;
  before(() => {
    pool = new Pool({ connectionString: DSN, max: 3 });
  });
  after(async () => {
    await pool?.end();
  });

  test("a normal query returns its rows", async () => {
    const result = await pool.query("SELECT $1::int + 1 AS n, 'x' AS s", [41]);
    assert.deepEqual(result.rows, [{ n: 42, s: "x" }]);
    const client = new Client(DSN);
    await client.connect();
    try {
      const { rows } = await client.query({ text: "SELECT 1 AS one", rowMode: "array" });
      assert.deepEqual(rows, [[1]]);
    } finally {
      await client.end();
    }
  });

  test("DROP SCHEMA is refused with BackstopBlockedError", async () => {
    const err = await pool.query("DROP SCHEMA sdk_no_such_schema").then(
      () => assert.fail("DROP SCHEMA was not refused"),
      (e) => e,
    );
    assert.ok(err instanceof BackstopBlockedError, String(err));
    assert.ok(err instanceof BackstopError);
    assert.ok(err instanceof pg.DatabaseError);
    assert.equal(err.code, "42501");
    assert.equal(err.kind, "blocked");
    assert.equal(err.rule, "default:CRITICAL");
    assert.match(err.message, /^backstop: DROP SCHEMA /);
    assert.match(err.reason, /^DROP SCHEMA .*blocked/);
  });

  test("a DELETE on a blocked table is refused with the rule's reason; the session goes on", async () => {
    const client = new Client({ connectionString: DSN });
    await client.connect();
    try {
      const table = await makeTable(client, "sdk_frozen");
      const err = await client.query(`DELETE FROM ${table} WHERE id = 1`).then(
        () => assert.fail("the DELETE was not refused"),
        (e) => e,
      );
      assert.ok(err instanceof BackstopBlockedError, String(err));
      assert.equal(err.rule, "sdk-frozen");
      assert.match(err.reason, /sdk_frozen_\* tables are read-only for agents\./);
      assert.equal(err.approvalId, undefined);
      assert.deepEqual(await ids(client, table), ALL);
    } finally {
      await client.end();
    }
  });

  test("the callback form gets the typed error too", async () => {
    const client = new Client(DSN);
    await client.connect();
    try {
      const err = await new Promise((resolve) => {
        client.query("DROP SCHEMA sdk_no_such_schema", (e) => resolve(e));
      });
      assert.ok(err instanceof BackstopBlockedError, String(err));
    } finally {
      await client.end();
    }
  });

  test("a pg.Query (Submittable) gets the typed error too", async () => {
    const client = new Client(DSN);
    await client.connect();
    try {
      const err = await new Promise((resolve) => {
        client.query(new pg.Query("DROP SCHEMA sdk_no_such_schema", (e) => resolve(e)));
      });
      assert.ok(err instanceof BackstopBlockedError, String(err));
      const { rows } = await client.query("SELECT 2 AS two");
      assert.deepEqual(rows, [{ two: 2 }]);
    } finally {
      await client.end();
    }
  });

  test("a connection the gateway refuses rejects connect() with BackstopBlockedError", async () => {
    const options = "-c standard_conforming_strings=off";
    const client = new Client({ connectionString: DSN, options });
    const err = await client.connect().then(
      () => assert.fail("the gateway accepted the connection"),
      (e) => e,
    );
    assert.ok(err instanceof BackstopBlockedError, String(err));
    assert.equal(err.severity, "FATAL");
    assert.match(err.message, /^backstop: connection refused: /);
    const refused = new Pool({ connectionString: DSN, options, max: 1 });
    try {
      const viaPool = await refused.query("SELECT 1").then(
        () => assert.fail("the gateway accepted the pool's connection"),
        (e) => e,
      );
      assert.ok(viaPool instanceof BackstopBlockedError, String(viaPool));
    } finally {
      await refused.end();
    }
  });

  test("errors that are not Backstop's pass through as pg's DatabaseError", async () => {
    const division = await pool.query("SELECT 1 / 0").then(
      () => assert.fail("1 / 0 succeeded"),
      (e) => e,
    );
    assert.ok(division instanceof pg.DatabaseError, String(division));
    assert.ok(!(division instanceof BackstopError));
    assert.equal(division.code, "22012");
    const missing = await pool.query("SELECT * FROM sdk_no_such_table").then(
      () => assert.fail("the table exists"),
      (e) => e,
    );
    assert.ok(missing instanceof pg.DatabaseError);
    assert.ok(!(missing instanceof BackstopError));
    assert.equal(missing.code, "42P01");
  });
});

describe("approvals", { skip: NO_OPERATOR }, () => {
  test("approved: approvalPending, the operator approves, the query resolves", async () => {
    const pool = new Pool({ connectionString: DSN, max: 2 });
    try {
      const table = await makeTable(pool, "sdk_approve");
      const pending = once(pool, "approvalPending");
      const decided = once(pool, "approvalDecided");
      const query = pool.query(`DELETE FROM ${table} WHERE id <= $1 RETURNING id`, [3]);
      const [event] = await pending;
      assert.equal(typeof event.approvalId, "number");
      assert.equal(event.operation, "DELETE");
      assert.deepEqual(event.tables, [`public.${table}`]);
      assert.equal(event.timeoutSeconds, 5);
      assert.ok(event.rowEstimate === null || Number.isInteger(event.rowEstimate));
      assert.match(
        event.message,
        new RegExp(`^backstop: waiting for approval ${event.approvalId} `),
      );
      assert.match(event.detail, new RegExp(`backstop approve ${event.approvalId}\\b`));

      await operator("approve", String(event.approvalId), "--reason", "sdk test");
      const result = await query;
      assert.deepEqual(result.rows.map((row) => row.id).sort(), [1, 2, 3]);
      const [done] = await decided;
      assert.equal(done.approvalId, event.approvalId);
      assert.equal(done.outcome, "approved");
      assert.equal(done.error, undefined);
      assert.equal(done.pending, event);
      assert.deepEqual(await ids(pool, table), [4, 5, 6, 7, 8, 9, 10]);
    } finally {
      await pool.end();
    }
  });

  test("pipelined queries: the events belong to the held one", async () => {
    const client = new Client({ connectionString: DSN, pipeline: true });
    await client.connect();
    try {
      const table = await makeTable(client, "sdk_approve");
      const seen = [];
      client.on("approvalPending", (e) => seen.push(`pending ${e.approvalId}`));
      client.on("approvalDecided", (e) => seen.push(`decided ${e.approvalId} ${e.outcome}`));
      const pending = once(client, "approvalPending");
      const first = client.query("SELECT 1 AS n").then((r) => seen.push(`first ${r.rows[0].n}`));
      const held = client
        .query(`DELETE FROM ${table} WHERE id = $1`, [1])
        .then((r) => seen.push(`held ${r.rowCount}`));
      const last = client.query("SELECT 3 AS n").then((r) => seen.push(`last ${r.rows[0].n}`));
      const [event] = await pending;
      await operator("approve", String(event.approvalId));
      await Promise.all([first, held, last]);
      const id = event.approvalId;
      assert.deepEqual(seen, [
        "first 1",
        `pending ${id}`,
        `decided ${id} approved`,
        "held 1",
        "last 3",
      ]);
    } finally {
      await client.end();
    }
  });

  test("denied: the query rejects with ApprovalDeniedError carrying the reason", async () => {
    const client = new Client(DSN);
    await client.connect();
    try {
      const table = await makeTable(client, "sdk_approve");
      const pending = once(client, "approvalPending");
      const decided = once(client, "approvalDecided");
      // Settle the query's outcome at once: the denial can arrive while the operator's
      // process is still exiting, before anything else would observe the rejection.
      const outcome = client.query(`DELETE FROM ${table} WHERE id > 5`).then(
        () => null,
        (e) => e,
      );
      const [event] = await pending;
      await operator("deny", String(event.approvalId), "--reason", "not in this test");
      const err = await outcome;
      assert.ok(err !== null, "the denied DELETE ran");
      assert.ok(err instanceof ApprovalDeniedError, String(err));
      assert.ok(err instanceof BackstopError);
      assert.equal(err.code, "42501");
      assert.equal(err.approvalId, event.approvalId);
      assert.equal(err.reason, "not in this test");
      assert.equal(typeof err.deniedBy, "string");
      assert.ok(err.deniedBy.length > 0);
      const [done] = await decided;
      assert.equal(done.outcome, "denied");
      assert.equal(done.error, err);
      // The session stays usable, and nothing was deleted.
      assert.deepEqual(await ids(client, table), ALL);
    } finally {
      await client.end();
    }
  });

  test("timed out: a wrapped pg.Client rejects with ApprovalTimeoutError", async () => {
    const client = backstop(new pg.Client(DSN));
    await client.connect();
    try {
      const table = await makeTable(client, "sdk_approve");
      const pending = once(client, "approvalPending");
      const decided = once(client, "approvalDecided");
      const query = client.query(`DELETE FROM ${table} WHERE id = 10`);
      const [event] = await pending;
      const err = await query.then(
        () => assert.fail("the DELETE ran without a decision"),
        (e) => e,
      );
      assert.ok(err instanceof ApprovalTimeoutError, String(err));
      assert.equal(err.code, "57014");
      assert.equal(err.approvalId, event.approvalId);
      assert.equal(err.timeoutSeconds, event.timeoutSeconds);
      const [done] = await decided;
      assert.equal(done.outcome, "timedOut");
      assert.ok(done.waitedMs >= 1000);
      assert.deepEqual(await ids(client, table), ALL);
    } finally {
      await client.end();
    }
  });
});
