/**
 * Output folders: checked before a long run starts, and write failures reported in words a user can act on
 * (disk full, read-only file system, no permission) instead of an operating-system error with a stack trace.
 */
import { ClipError } from "../errors.ts";

/** Operating-system error codes of failed writes, and what each means for the user. */
const WRITE_FAILURES: Record<string, string> = {
  ENOSPC: "the disk is full",
  EDQUOT: "the disk quota is exhausted",
  EFBIG: "a file grew past the size the file system or the process limit allows",
  EROFS: "the file system is read-only",
  EACCES: "permission denied",
  EPERM: "permission denied",
  ENOTDIR: "a part of the path is a file, not a folder",
  EISDIR: "a file to write is a folder",
};

/** What went wrong when `e` is a failed file-system write, or undefined for any other error. */
export function describeWriteFailure(e: unknown): string | undefined {
  if (e instanceof ClipError || !(e instanceof Error)) return undefined;
  if (e instanceof Deno.errors.PermissionDenied || e instanceof Deno.errors.NotCapable) return "permission denied";
  if (e instanceof Deno.errors.NotADirectory) return WRITE_FAILURES.ENOTDIR;
  if (e instanceof Deno.errors.IsADirectory) return WRITE_FAILURES.EISDIR;
  const code = (e as { code?: unknown }).code;
  if (typeof code === "string" && code in WRITE_FAILURES) return WRITE_FAILURES[code];
  const os = /\(os error (\d+)\)/.exec(e.message)?.[1];
  const byNumber: Record<string, string> = { "28": "ENOSPC", "122": "EDQUOT", "27": "EFBIG", "30": "EROFS" };
  return os && byNumber[os] ? WRITE_FAILURES[byNumber[os]] : undefined;
}

/**
 * A ClipError for a failed write under `dir`, or `e` itself when it is not a write failure. `advice` says what to do
 * next (e.g. how to resume).
 */
export function writeFailureError(e: unknown, dir: string, advice: string): unknown {
  const reason = describeWriteFailure(e);
  if (reason === undefined) return e;
  return new ClipError(`cannot write to '${dir}': ${reason} (${(e as Error).message}); ${advice}`);
}

/**
 * Creates `dir` (and its parents) if missing and proves it writable by creating and removing a small file, so a run
 * that would fail at its first save fails before any work instead. Throws ClipError naming `flag` and the folder.
 */
export async function ensureWritableFolder(dir: string, flag: string): Promise<void> {
  const probe = `${dir.replace(/\/+$/, "")}/.write-test-${Deno.pid}-${crypto.randomUUID().slice(0, 8)}`;
  try {
    await Deno.mkdir(dir, { recursive: true });
    await Deno.writeFile(probe, new Uint8Array(1), { createNew: true });
    await Deno.remove(probe);
  } catch (e) {
    await Deno.remove(probe).catch(() => {});
    const reason = describeWriteFailure(e) ?? (e as Error).message;
    throw new ClipError(
      `${flag} '${dir}' is not a writable folder: ${reason} (${(e as Error).message}); choose another ${flag} or ` +
        "fix its permissions",
    );
  }
}

/**
 * Checks, without creating anything, that `dir` is a folder or can become one: it is missing, or a folder. A path
 * through a file, or to a file, is a ClipError naming `flag`. For reading an existing output before writing to it.
 */
export async function checkFolderPath(dir: string, flag: string): Promise<void> {
  let info: Deno.FileInfo;
  try {
    info = await Deno.stat(dir);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return;
    const reason = describeWriteFailure(e) ?? (e as Error).message;
    throw new ClipError(
      `${flag} '${dir}' cannot be a folder: ${reason} (${(e as Error).message}); choose another ${flag}`,
    );
  }
  if (!info.isDirectory) throw new ClipError(`${flag} '${dir}' is a file, not a folder; choose another ${flag}`);
}
