/**
 * classify(): what Backstop would make of some SQL, without running it.
 *
 * The gateway has no dry-run SQL command, so this runs the operator's command line,
 * `backstop classify --json`, which uses the same classifier as the gateway. It is offline
 * classification: no connection, no policy and no row estimate are involved, so it tells
 * what a statement is and how risky, not whether a given gateway would allow it.
 */

import { spawn } from "node:child_process";

export type Risk = "LOW" | "MEDIUM" | "HIGH" | "CRITICAL";
export type Category = "READ" | "WRITE" | "DDL" | "DCL" | "ADMIN" | "TRANSACTION" | "UNKNOWN";

/** One statement, as `backstop classify --json` prints it. */
export interface StatementClassification {
  /** e.g. "SELECT", "DELETE", "DROP_TABLE", "UNPARSEABLE" */
  operation: string;
  category: Category;
  /** schema-qualified where the SQL or the default search path allows; lower-cased */
  tables: string[];
  has_where: boolean;
  /** no WHERE clause, or one that is always true */
  unbounded: boolean;
  /** drops or empties a whole table, or rewrites every row */
  table_destructive: boolean;
  risk: Risk;
  reasons: string[];
}

/** The output of `backstop classify --json`: the worst risk and one entry per statement. */
export interface Classification {
  risk: Risk;
  statements: StatementClassification[];
}

export interface ClassifyOptions {
  /**
   * The `backstop` command: a path, or a command with leading arguments
   * (e.g. ["python3", "-m", "backstop_core.cli"]). Default: $BACKSTOP_CLI, else "backstop"
   * on the PATH.
   */
  cli?: string | readonly string[];
  /** Kill the command after this long (default 30000 ms). */
  timeoutMs?: number;
  /** Environment for the command (default: this process's). */
  env?: NodeJS.ProcessEnv;
}

/** The `backstop` command could not be run, or did not print what it should. */
export class BackstopCliError extends Error {
  readonly command: readonly string[];
  readonly exitCode: number | null;
  readonly stderr: string;

  constructor(
    message: string,
    command: readonly string[],
    exitCode: number | null,
    stderr: string,
    cause?: unknown,
  ) {
    super(message, cause === undefined ? undefined : { cause });
    this.name = "BackstopCliError";
    this.command = command;
    this.exitCode = exitCode;
    this.stderr = stderr;
  }
}

function command(options: ClassifyOptions): readonly string[] {
  const cli = options.cli ?? (options.env ?? process.env)["BACKSTOP_CLI"] ?? "backstop";
  const parts = typeof cli === "string" ? [cli] : [...cli];
  if (parts.length === 0 || !parts[0]) throw new TypeError("classify(): empty cli command");
  return parts;
}

function isClassification(value: unknown): value is Classification {
  if (typeof value !== "object" || value === null) return false;
  const { risk, statements } = value as { risk?: unknown; statements?: unknown };
  return (
    typeof risk === "string" &&
    Array.isArray(statements) &&
    statements.every(
      (s: unknown) =>
        typeof s === "object" &&
        s !== null &&
        typeof (s as { operation?: unknown }).operation === "string" &&
        Array.isArray((s as { tables?: unknown }).tables),
    )
  );
}

/**
 * Classify SQL (one or more statements) with `backstop classify --json`. The SQL goes to
 * the command's standard input, so it may be of any length and start with anything.
 */
export function classify(sql: string, options: ClassifyOptions = {}): Promise<Classification> {
  const argv = [...command(options), "classify", "--json"];
  const [file, ...args] = argv as [string, ...string[]];
  const timeoutMs = options.timeoutMs ?? 30_000;
  return new Promise<Classification>((resolve, reject) => {
    const child = spawn(file, args, {
      env: options.env ?? process.env,
      stdio: ["pipe", "pipe", "pipe"],
      windowsHide: true,
    });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    let settled = false;
    const finish = (error: BackstopCliError | undefined, value?: Classification) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      if (error !== undefined) reject(error);
      else resolve(value as Classification);
    };
    const timer = setTimeout(() => {
      child.kill("SIGKILL");
      finish(new BackstopCliError(`${file} did not finish within ${timeoutMs} ms`, argv, null, ""));
    }, timeoutMs);
    child.stdout.on("data", (chunk: Buffer) => out.push(chunk));
    child.stderr.on("data", (chunk: Buffer) => err.push(chunk));
    child.on("error", (cause: NodeJS.ErrnoException) => {
      const hint =
        cause.code === "ENOENT"
          ? `: ${file} was not found (install Backstop, or set BACKSTOP_CLI or the cli option)`
          : `: ${cause.message}`;
      finish(new BackstopCliError(`cannot run ${file}${hint}`, argv, null, "", cause));
    });
    child.on("close", (code: number | null) => {
      const stderr = Buffer.concat(err).toString("utf8");
      if (code !== 0) {
        const why = stderr.trim() || `exit status ${code}`;
        finish(new BackstopCliError(`${argv.join(" ")} failed: ${why}`, argv, code, stderr));
        return;
      }
      const stdout = Buffer.concat(out).toString("utf8");
      let parsed: unknown;
      try {
        parsed = JSON.parse(stdout);
      } catch (cause) {
        finish(new BackstopCliError(`${file} printed no JSON`, argv, code, stderr, cause));
        return;
      }
      if (!isClassification(parsed)) {
        finish(new BackstopCliError(`${file} printed unexpected JSON`, argv, code, stderr));
        return;
      }
      finish(undefined, parsed);
    });
    // The command may exit before it reads everything (a bad argument): not our error.
    child.stdin.on("error", () => undefined);
    child.stdin.end(sql, "utf8");
  });
}
