/**
 * Downloading files from a Hugging Face-style model hub into a local cache laid out as huggingface_hub lays it out,
 * so the cache can be shared with Python tools:
 *
 *   CACHE/models--ORG--NAME/blobs/ETAG                 file contents, named by the hub's ETag
 *   CACHE/models--ORG--NAME/snapshots/COMMIT/FILE      symlink to ../../blobs/ETAG
 *   CACHE/models--ORG--NAME/refs/REVISION              the commit a branch or tag pointed to
 *
 * A download goes to blobs/ETAG.incomplete first (held under an exclusive lock, resumed with a Range request after
 * an interruption), is checked against the size the hub announced and, when the ETag is a sha256 (LFS files), against
 * that hash, and only then is renamed into place. Files already cached are used without the network when
 * HF_HUB_OFFLINE is set or the hub cannot be reached.
 */
import { createHash } from "node:crypto";
import { ClipError } from "../errors.ts";

export interface DownloadProgress {
  repo: string;
  file: string;
  /** Bytes on disk so far, including any resumed from an earlier attempt. */
  loaded: number;
  /** Expected size, when the hub said. */
  total: number | null;
}

export interface HubOptions {
  /** Cache root; defaults to hubCacheDir(). */
  cacheDir?: string;
  /** Hub base URL; defaults to $HF_ENDPOINT, else https://huggingface.co. Plain http is allowed only when given explicitly. */
  endpoint?: string;
  /** Branch, tag or commit; defaults to "main". */
  revision?: string;
  /** Use only the cache; defaults to $HF_HUB_OFFLINE. */
  offline?: boolean;
  /** Bearer token for gated or private repositories; defaults to $HF_TOKEN. */
  token?: string;
  onProgress?: (progress: DownloadProgress) => void;
}

/** The file (or repository) does not exist on the hub. */
export class HubNotFoundError extends ClipError {
  override name = "HubNotFoundError";
  constructor(readonly repo: string, readonly file: string, readonly what: "file" | "repo", message: string) {
    super(message);
  }
}

/** The file is needed from the cache (offline, or the hub is unreachable) and is not there. */
export class HubNotCachedError extends ClipError {
  override name = "HubNotCachedError";
  constructor(readonly repo: string, readonly file: string, message: string) {
    super(message);
  }
}

export const DEFAULT_ENDPOINT = "https://huggingface.co";
const METADATA_TIMEOUT_MS = 10_000;
const MAX_REDIRECTS = 5;

type Env = (name: string) => string | undefined;

/** Reads an environment variable, treating a denied permission as unset (library code must not demand --allow-env). */
export const processEnv: Env = (name) => {
  try {
    return Deno.env.get(name);
  } catch {
    return undefined;
  }
};

/** $CLIP_CACHE, else $XDG_CACHE_HOME/clip, else ~/.cache/clip. */
export function hubCacheDir(env: Env = processEnv): string {
  const explicit = env("CLIP_CACHE");
  if (explicit) return explicit;
  const xdg = env("XDG_CACHE_HOME");
  if (xdg) return `${xdg}/clip`;
  const home = env("HOME") ?? env("USERPROFILE");
  if (!home) throw new ClipError("cannot place the model cache: set CLIP_CACHE (or HOME) to a writable folder.");
  return `${home}/.cache/clip`;
}

/** huggingface_hub's reading of HF_HUB_OFFLINE: 1, true, yes or on. */
export function offlineFromEnv(env: Env = processEnv): boolean {
  return ["1", "true", "yes", "on"].includes((env("HF_HUB_OFFLINE") ?? "").toLowerCase());
}

export interface Endpoint {
  url: URL;
  /** Plain http is acceptable (for this endpoint and its redirects) only when the user named such an endpoint. */
  allowHttp: boolean;
}

export function hubEndpoint(explicit?: string, env: Env = processEnv): Endpoint {
  const given = explicit ?? env("HF_ENDPOINT");
  const raw = given ?? DEFAULT_ENDPOINT;
  let url: URL;
  try {
    url = new URL(raw);
  } catch {
    throw new ClipError(`hub endpoint '${raw}' is not a URL; set HF_ENDPOINT to something like ${DEFAULT_ENDPOINT}.`);
  }
  if (url.protocol !== "https:" && !(url.protocol === "http:" && given !== undefined)) {
    throw new ClipError(`hub endpoint '${raw}' must use https.`);
  }
  return { url, allowHttp: url.protocol === "http:" };
}

const REPO_ID = /^[A-Za-z0-9][A-Za-z0-9_.-]*\/[A-Za-z0-9_.-]+$/;

export function validateRepoId(repo: string): void {
  if (!REPO_ID.test(repo) || repo.includes("..")) {
    throw new ClipError(`'${repo}' is not a hub repository id; expected ORG/NAME (letters, digits, '-', '_', '.').`);
  }
}

function validateRelativePath(path: string, what: string): void {
  if (
    path === "" || path.startsWith("/") || path.includes("\\") ||
    path.split("/").some((p) => p === "" || p === "." || p === "..")
  ) {
    throw new ClipError(`${what} '${path}' must be a plain relative path.`);
  }
}

function repoFolder(cacheDir: string, repo: string): string {
  return `${cacheDir}/models--${repo.replace("/", "--")}`;
}

const COMMIT_HASH = /^[0-9a-f]{40}$/;

async function exists(path: string): Promise<boolean> {
  try {
    await Deno.stat(path);
    return true;
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return false;
    throw e;
  }
}

/** The cached copy of a file at a revision, or null. */
export async function cachedFile(
  cacheDir: string,
  repo: string,
  file: string,
  revision = "main",
): Promise<string | null> {
  const folder = repoFolder(cacheDir, repo);
  let commit = revision;
  if (!COMMIT_HASH.test(revision)) {
    try {
      commit = (await Deno.readTextFile(`${folder}/refs/${revision}`)).trim();
    } catch (e) {
      if (e instanceof Deno.errors.NotFound) return null;
      throw e;
    }
  }
  const path = `${folder}/snapshots/${commit}/${file}`;
  return await exists(path) ? path : null;
}

interface FileMetadata {
  etag: string;
  commit: string;
  size: number | null;
  /** Where the bytes are served from (a CDN for large files). */
  location: URL;
}

function normalizeEtag(raw: string | null): string | null {
  if (!raw) return null;
  return raw.replace(/^W\//, "").replace(/^"|"$/g, "");
}

function checkProtocol(url: URL, endpoint: Endpoint): void {
  if (url.protocol === "https:" || (url.protocol === "http:" && endpoint.allowHttp)) return;
  throw new ClipError(`refusing to download from '${url.href}': only https is allowed.`);
}

function requestHeaders(
  url: URL,
  endpoint: Endpoint,
  token: string | undefined,
  extra: Record<string, string> = {},
): Headers {
  const headers = new Headers({ "Accept-Encoding": "identity", ...extra });
  // The token is for the hub only, never for a CDN it redirects to.
  if (token && url.origin === endpoint.url.origin) headers.set("Authorization", `Bearer ${token}`);
  return headers;
}

function statusError(status: number, repo: string, file: string, headers: Headers): ClipError {
  const code = headers.get("x-error-code");
  if (status === 404 && code !== "RepositoryNotFound" && code !== "RevisionNotFound") {
    return new HubNotFoundError(repo, file, "file", `hub repository ${repo} has no file '${file}'.`);
  }
  if (status === 404 || status === 401 || status === 403) {
    const what = code === "RevisionNotFound" ? "revision" : "repository";
    return new HubNotFoundError(
      repo,
      file,
      "repo",
      `hub ${what} for ${repo} was not found or needs access (HTTP ${status}); check the name, or set HF_TOKEN for a gated or private repository.`,
    );
  }
  return new ClipError(`hub answered HTTP ${status} for ${repo}/${file}; try again later.`);
}

/**
 * Asks the hub what a file's ETag, size and commit are, as huggingface_hub does: HEAD on the resolve URL without
 * following the redirect to the CDN, whose own ETag is not the file's hash.
 */
async function fetchMetadata(
  repo: string,
  file: string,
  revision: string,
  endpoint: Endpoint,
  token: string | undefined,
): Promise<FileMetadata> {
  const filePath = file.split("/").map(encodeURIComponent).join("/");
  const base = endpoint.url.pathname.replace(/\/$/, "");
  let url = new URL(`${base}/${repo}/resolve/${encodeURIComponent(revision)}/${filePath}`, endpoint.url);
  for (let hop = 0; hop <= MAX_REDIRECTS; hop++) {
    checkProtocol(url, endpoint);
    const res = await fetch(url, {
      method: "HEAD",
      redirect: "manual",
      headers: requestHeaders(url, endpoint, token),
      signal: AbortSignal.timeout(METADATA_TIMEOUT_MS),
    });
    await res.body?.cancel();
    const linkedEtag = res.headers.get("x-linked-etag");
    const location = res.headers.get("location");
    if (res.status >= 300 && res.status < 400 && location) {
      const next = new URL(location, url);
      // A redirect within the hub without file metadata means a renamed repository: ask again there.
      if (!linkedEtag && next.origin === endpoint.url.origin) {
        url = next;
        continue;
      }
      return metadataFrom(res.headers, next, repo, file, revision);
    }
    if (!res.ok) throw statusError(res.status, repo, file, res.headers);
    return metadataFrom(res.headers, url, repo, file, revision);
  }
  throw new ClipError(`hub redirected more than ${MAX_REDIRECTS} times for ${repo}/${file}.`);
}

function metadataFrom(headers: Headers, location: URL, repo: string, file: string, revision: string): FileMetadata {
  const etag = normalizeEtag(headers.get("x-linked-etag") ?? headers.get("etag"));
  if (!etag || !/^[A-Za-z0-9_.-]+$/.test(etag)) {
    throw new ClipError(
      `hub gave no usable ETag for ${repo}/${file}, so it cannot be cached; is HF_ENDPOINT a Hugging Face hub?`,
    );
  }
  const sizeText = headers.get("x-linked-size") ?? headers.get("content-length");
  const size = sizeText !== null && /^\d+$/.test(sizeText) ? Number(sizeText) : null;
  const commit = headers.get("x-repo-commit") ?? revision;
  if (!/^[A-Za-z0-9_.-]+$/.test(commit)) throw new ClipError(`hub gave an invalid commit '${commit}' for ${repo}.`);
  return { etag, commit, size, location };
}

/** GET following redirects by hand, so every hop is checked for https and the token stays with the hub. */
async function fetchContent(
  url: URL,
  endpoint: Endpoint,
  token: string | undefined,
  extra: Record<string, string>,
): Promise<Response> {
  for (let hop = 0; hop <= MAX_REDIRECTS; hop++) {
    checkProtocol(url, endpoint);
    const res = await fetch(url, { redirect: "manual", headers: requestHeaders(url, endpoint, token, extra) });
    const location = res.headers.get("location");
    if (res.status >= 300 && res.status < 400 && location) {
      await res.body?.cancel();
      url = new URL(location, url);
      continue;
    }
    return res;
  }
  throw new ClipError(`download redirected more than ${MAX_REDIRECTS} times at '${url.href}'.`);
}

async function writeAll(file: Deno.FsFile, bytes: Uint8Array): Promise<void> {
  let written = 0;
  while (written < bytes.length) written += await file.write(bytes.subarray(written));
}

async function sha256OfFile(path: string): Promise<string> {
  const hash = createHash("sha256");
  const file = await Deno.open(path, { read: true });
  try {
    const buf = new Uint8Array(1 << 20);
    while (true) {
      const n = await file.read(buf);
      if (n === null) break;
      hash.update(buf.subarray(0, n));
    }
  } finally {
    file.close();
  }
  return hash.digest("hex");
}

function parseContentRangeStart(value: string | null): { start: number; total: number | null } | null {
  const m = value ? /^bytes (\d+)-\d+\/(\d+|\*)$/.exec(value.trim()) : null;
  if (!m) return null;
  return { start: Number(m[1]), total: m[2] === "*" ? null : Number(m[2]) };
}

/**
 * Fills blobs/ETAG from the hub, resuming blobs/ETAG.incomplete. The .incomplete file is held under an exclusive
 * lock so two processes fetching the same model take turns instead of interleaving bytes.
 */
async function downloadBlob(
  blobPath: string,
  meta: FileMetadata,
  repo: string,
  file: string,
  endpoint: Endpoint,
  options: HubOptions,
): Promise<void> {
  const partialPath = `${blobPath}.incomplete`;
  const partial = await Deno.open(partialPath, { read: true, write: true, create: true });
  try {
    await partial.lock(true);
    if (await exists(blobPath)) return; // another process finished it while we waited
    let have = (await partial.stat()).size;
    if (meta.size !== null && have > meta.size) {
      await partial.truncate(0);
      have = 0;
    }
    const progress = (loaded: number, total: number | null) => options.onProgress?.({ repo, file, loaded, total });

    let total = meta.size;
    if (!(meta.size !== null && have === meta.size)) {
      const res = await fetchContent(
        meta.location,
        endpoint,
        options.token,
        have > 0 ? { Range: `bytes=${have}-` } : {},
      );
      if (res.status === 206) {
        const range = parseContentRangeStart(res.headers.get("content-range"));
        if (!range || range.start !== have) {
          await res.body?.cancel();
          throw new ClipError(
            `hub answered a resume of ${repo}/${file} with the wrong range (${
              res.headers.get("content-range")
            }); run again.`,
          );
        }
        total ??= range.total;
      } else if (res.status === 200) {
        have = 0;
        await partial.truncate(0);
        const length = res.headers.get("content-length");
        if (total === null && length !== null) total = Number(length);
        else if (total !== null && length !== null && Number(length) !== total) {
          await res.body?.cancel();
          throw new ClipError(
            `${repo}/${file}: the hub announced ${total} bytes but serves ${length}; not caching it.`,
          );
        }
      } else if (res.status === 416 && have > 0) {
        // Nothing left to fetch: the earlier attempt got everything; the checks below decide if it is good.
        await res.body?.cancel();
      } else {
        await res.body?.cancel();
        throw statusError(res.status, repo, file, res.headers);
      }
      if (res.status !== 416 && res.body) {
        await partial.seek(have, Deno.SeekMode.Start);
        progress(have, total);
        try {
          for await (const chunk of res.body) {
            await writeAll(partial, chunk);
            have += chunk.length;
            progress(have, total);
          }
        } catch (e) {
          throw new ClipError(
            `download of ${repo}/${file} was interrupted after ${have} bytes (${
              (e as Error).message
            }); run again to resume it.`,
          );
        }
      }
    }

    const size = (await partial.stat()).size;
    if (total !== null && size !== total) {
      await Deno.remove(partialPath).catch(() => {});
      throw new ClipError(
        `${repo}/${file}: downloaded ${size} bytes but the hub announced ${total}; the partial file was removed, run again.`,
      );
    }
    if (/^[0-9a-f]{64}$/.test(meta.etag)) {
      const actual = await sha256OfFile(partialPath);
      if (actual !== meta.etag) {
        await Deno.remove(partialPath).catch(() => {});
        throw new ClipError(
          `${repo}/${file}: sha256 is ${actual} but the hub says ${meta.etag}; the download was removed, run again.`,
        );
      }
    }
    await partial.sync();
    // Renamed while still locked, so a process waiting on the lock finds the blob in place when it gets it.
    await Deno.rename(partialPath, blobPath);
  } finally {
    partial.close();
  }
}

async function writeTextAtomic(path: string, text: string): Promise<void> {
  const temp = `${path}.tmp-${Deno.pid}-${crypto.randomUUID().slice(0, 8)}`;
  await Deno.writeTextFile(temp, text);
  await Deno.rename(temp, path);
}

/** Points snapshots/COMMIT/FILE at the blob: a relative symlink, or a copy where symlinks are not allowed. */
async function linkSnapshot(folder: string, commit: string, file: string, etag: string): Promise<string> {
  const snapshotPath = `${folder}/snapshots/${commit}/${file}`;
  await Deno.mkdir(snapshotPath.slice(0, snapshotPath.lastIndexOf("/")), { recursive: true });
  const depth = file.split("/").length + 1;
  const target = `${"../".repeat(depth)}blobs/${etag}`;
  try {
    if ((await Deno.readLink(snapshotPath)) === target) return snapshotPath;
  } catch { /* absent or not a link */ }
  // Made under a private name and renamed into place, so concurrent downloads of the same file never collide.
  const temp = `${snapshotPath}.tmp-${Deno.pid}-${crypto.randomUUID().slice(0, 8)}`;
  try {
    await Deno.symlink(target, temp);
  } catch {
    await Deno.copyFile(`${folder}/blobs/${etag}`, temp);
  }
  await Deno.rename(temp, snapshotPath);
  return snapshotPath;
}

/**
 * Returns the local path of FILE from hub repository REPO at a revision, downloading it into the cache if needed.
 * Throws HubNotFoundError when the hub says the file does not exist, HubNotCachedError when the hub cannot be used
 * (offline or unreachable) and the cache does not have the file.
 */
export async function hubDownload(repo: string, file: string, options: HubOptions = {}): Promise<string> {
  validateRepoId(repo);
  validateRelativePath(file, "hub file");
  const revision = options.revision ?? "main";
  validateRelativePath(revision, "revision");
  const cacheDir = options.cacheDir ?? hubCacheDir();
  const folder = repoFolder(cacheDir, repo);
  const token = options.token ?? processEnv("HF_TOKEN");

  if (options.offline ?? offlineFromEnv()) {
    const cached = await cachedFile(cacheDir, repo, file, revision);
    if (cached) return cached;
    throw new HubNotCachedError(
      repo,
      file,
      `${repo}/${file} is not in the cache at ${cacheDir} and offline mode is on (HF_HUB_OFFLINE); run once with network access.`,
    );
  }

  const endpoint = hubEndpoint(options.endpoint);
  let meta: FileMetadata;
  try {
    meta = await fetchMetadata(repo, file, revision, endpoint, token);
  } catch (e) {
    if (e instanceof ClipError) throw e;
    // The hub is unreachable (no network, DNS, timeout): a cached copy is as good as it gets.
    const cached = await cachedFile(cacheDir, repo, file, revision);
    if (cached) return cached;
    throw new HubNotCachedError(
      repo,
      file,
      `cannot reach the hub at ${endpoint.url.origin} (${
        (e as Error).message
      }) and ${repo}/${file} is not cached in ${cacheDir}.`,
    );
  }

  await Deno.mkdir(`${folder}/blobs`, { recursive: true });
  const blobPath = `${folder}/blobs/${meta.etag}`;
  if (!await exists(blobPath)) await downloadBlob(blobPath, meta, repo, file, endpoint, { ...options, token });
  if (!COMMIT_HASH.test(revision)) {
    const refPath = `${folder}/refs/${revision}`;
    await Deno.mkdir(refPath.slice(0, refPath.lastIndexOf("/")), { recursive: true });
    await writeTextAtomic(refPath, meta.commit);
  }
  return await linkSnapshot(folder, meta.commit, file, meta.etag);
}
