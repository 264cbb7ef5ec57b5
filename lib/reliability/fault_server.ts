/**
 * An HTTP/1.1 file server on 127.0.0.1 that injects faults, written on raw TCP so that it can misbehave in ways a
 * well-behaved server library will not: an HTTP 500, a connection closed in the middle of a body, a body that stops
 * and never finishes, or no answer at all. Each path has a queue of faults, one per request; when the queue is empty
 * the file is served properly, honouring a `Range: bytes=N-` request with 206.
 */

export type FaultKind = "http-500" | "reset" | "stall" | "no-response";

export const FAULT_KINDS: readonly FaultKind[] = ["http-500", "reset", "stall", "no-response"];

export interface FaultServerOptions {
  /** Path (e.g. `/shard-0.tar`) to contents. */
  files: Map<string, Uint8Array>;
  /** Path to the faults its successive requests get. */
  faults: Map<string, FaultKind[]>;
}

const encoder = new TextEncoder();

export class FaultServer {
  readonly injected: Record<FaultKind, number> = { "http-500": 0, reset: 0, stall: 0, "no-response": 0 };
  /** Requests per path. */
  readonly requests = new Map<string, number>();
  /** Requests that asked for a byte range (a resumed download). */
  rangeRequests = 0;
  readonly #listener: Deno.Listener;
  readonly #open = new Set<Deno.Conn>();
  readonly #files: Map<string, Uint8Array>;
  readonly #faults: Map<string, FaultKind[]>;
  readonly #accepting: Promise<void>;

  private constructor(listener: Deno.Listener, opts: FaultServerOptions) {
    this.#listener = listener;
    this.#files = opts.files;
    this.#faults = new Map([...opts.faults].map(([k, v]) => [k, [...v]]));
    this.#accepting = this.#accept();
  }

  static start(opts: FaultServerOptions): FaultServer {
    return new FaultServer(Deno.listen({ hostname: "127.0.0.1", port: 0 }), opts);
  }

  url(path: string): string {
    return `http://127.0.0.1:${(this.#listener.addr as Deno.NetAddr).port}${path}`;
  }

  async close(): Promise<void> {
    this.#listener.close();
    for (const conn of this.#open) closeQuietly(conn);
    await this.#accepting;
  }

  async #accept(): Promise<void> {
    for (;;) {
      let conn: Deno.Conn;
      try {
        conn = await this.#listener.accept();
      } catch {
        return; // closed
      }
      this.#open.add(conn);
      this.#serve(conn).catch(() => {}).finally(() => {
        this.#open.delete(conn);
        closeQuietly(conn);
      });
    }
  }

  async #serve(conn: Deno.Conn): Promise<void> {
    const head = await readHead(conn);
    if (head === null) return;
    const [requestLine, ...headerLines] = head.split("\r\n");
    const path = requestLine.split(" ")[1] ?? "/";
    this.requests.set(path, (this.requests.get(path) ?? 0) + 1);
    const fault = this.#faults.get(path)?.shift();
    if (fault) this.injected[fault]++;
    const file = this.#files.get(path);
    if (fault === "no-response") return await waitForClose(conn);
    if (fault === "http-500" || !file) {
      const status = fault ? "500 Internal Server Error" : "404 Not Found";
      return await writeAll(conn, response(status, [], encoder.encode(status)));
    }
    const range = headerLines.map((l) => /^range:\s*bytes=(\d+)-\s*$/i.exec(l)).find((m) => m);
    if (range) this.rangeRequests++;
    const start = range ? Math.min(Number(range[1]), file.length) : 0;
    const body = file.subarray(start);
    const headers = range ? [`Content-Range: bytes ${start}-${file.length - 1}/${file.length}`] : [];
    const head200 = response(range ? "206 Partial Content" : "200 OK", headers, body, false);
    await writeAll(conn, head200);
    if (fault === "reset") {
      await writeAll(conn, body.subarray(0, body.length >> 1));
      return; // the connection closes with the body half sent
    }
    if (fault === "stall") {
      await writeAll(conn, body.subarray(0, Math.min(body.length >> 2, 4096)));
      return await waitForClose(conn);
    }
    await writeAll(conn, body);
  }
}

function response(status: string, headers: string[], body: Uint8Array, withBody = true): Uint8Array {
  const head = encoder.encode(
    [`HTTP/1.1 ${status}`, `Content-Length: ${body.length}`, "Connection: close", ...headers, "", ""].join("\r\n"),
  );
  if (!withBody) return head;
  const out = new Uint8Array(head.length + body.length);
  out.set(head);
  out.set(body, head.length);
  return out;
}

async function readHead(conn: Deno.Conn): Promise<string | null> {
  const buffer = new Uint8Array(16384);
  let used = 0;
  while (used < buffer.length) {
    const n = await conn.read(buffer.subarray(used));
    if (n === null) return null;
    used += n;
    const text = new TextDecoder().decode(buffer.subarray(0, used));
    const end = text.indexOf("\r\n\r\n");
    if (end >= 0) return text.slice(0, end);
  }
  return null;
}

async function writeAll(conn: Deno.Conn, bytes: Uint8Array): Promise<void> {
  for (let at = 0; at < bytes.length;) at += await conn.write(bytes.subarray(at));
}

/** Holds the connection open, sending nothing, until the client gives up (or the server closes). */
async function waitForClose(conn: Deno.Conn): Promise<void> {
  const sink = new Uint8Array(1024);
  while ((await conn.read(sink).catch(() => null)) !== null) { /* discard */ }
}

function closeQuietly(conn: Deno.Conn): void {
  try {
    conn.close();
  } catch {
    // already closed
  }
}
