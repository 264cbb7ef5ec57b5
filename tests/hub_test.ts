import assert from "node:assert/strict";
import {
  cachedFile,
  type DownloadProgress,
  hubCacheDir,
  hubDownload,
  hubEndpoint,
  HubNotCachedError,
  HubNotFoundError,
  offlineFromEnv,
} from "../lib/io/hub.ts";
import { listPretrained, lookupPretrained, PRETRAINED, pretrainedConfig, resolveModel } from "../lib/io/pretrained.ts";
import { loadStateDict, resolveCheckpoint } from "../lib/io/checkpoint_layout.ts";
import { loadModelConfig } from "../lib/nn/config.ts";
import { ClipError, UsageError } from "../lib/errors.ts";

const MODELS = new URL("./fixtures/models/", import.meta.url).pathname;
const COMMIT = "0123456789abcdef0123456789abcdef01234567";

async function sha256Hex(bytes: Uint8Array<ArrayBuffer>): Promise<string> {
  const digest = await crypto.subtle.digest("SHA-256", bytes);
  return [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, "0")).join("");
}

interface Logged {
  method: string;
  path: string;
  status: number;
  range: string | null;
}

/**
 * A stand-in for the Hugging Face hub on 127.0.0.1: `/{repo}/resolve/{rev}/{file}` answers small files directly and
 * redirects .safetensors files to a `/cdn/` URL with X-Linked-Etag (sha256) and X-Linked-Size, as the hub does for
 * LFS files; the CDN honours Range requests.
 */
class FakeHub {
  readonly log: Logged[] = [];
  /** Announce a size this many bytes off from the truth. */
  sizeSkew = 0;
  #server: Deno.HttpServer<Deno.NetAddr>;

  constructor(private readonly repos: Record<string, string>) {
    this.#server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, (req) => this.#handle(req));
  }

  get url(): string {
    return `http://127.0.0.1:${this.#server.addr.port}`;
  }

  close(): Promise<void> {
    return this.#server.shutdown();
  }

  async #handle(req: Request): Promise<Response> {
    const url = new URL(req.url);
    const res = await this.#respond(req, url);
    this.log.push({
      method: req.method,
      path: decodeURIComponent(url.pathname),
      status: res.status,
      range: req.headers.get("range"),
    });
    return res;
  }

  async #file(repo: string, file: string): Promise<Uint8Array<ArrayBuffer> | null> {
    const dir = this.repos[repo];
    if (!dir || file.includes("/")) return null;
    try {
      return await Deno.readFile(`${dir}/${file}`);
    } catch {
      return null;
    }
  }

  async #respond(req: Request, url: URL): Promise<Response> {
    const cdn = /^\/cdn\/([^/]+\/[^/]+)\/(.+)$/.exec(url.pathname);
    if (cdn) {
      const bytes = (await this.#file(cdn[1], decodeURIComponent(cdn[2])))!;
      const range = /^bytes=(\d+)-$/.exec(req.headers.get("range") ?? "");
      if (!range) return new Response(bytes, { headers: { "Content-Length": String(bytes.length) } });
      const start = Number(range[1]);
      if (start >= bytes.length) {
        return new Response(null, { status: 416, headers: { "Content-Range": `bytes */${bytes.length}` } });
      }
      return new Response(bytes.slice(start), {
        status: 206,
        headers: { "Content-Range": `bytes ${start}-${bytes.length - 1}/${bytes.length}` },
      });
    }
    const m = /^\/([^/]+\/[^/]+)\/resolve\/([^/]+)\/(.+)$/.exec(url.pathname);
    if (!m || !this.repos[m[1]]) {
      return new Response("no such repo", { status: 401, headers: { "X-Error-Code": "RepositoryNotFound" } });
    }
    const [, repo, rev, file] = m;
    if (rev !== "main" && rev !== COMMIT) {
      return new Response("no such revision", { status: 404, headers: { "X-Error-Code": "RevisionNotFound" } });
    }
    const bytes = await this.#file(repo, decodeURIComponent(file));
    if (!bytes) return new Response("no such file", { status: 404, headers: { "X-Error-Code": "EntryNotFound" } });
    const sha = await sha256Hex(bytes);
    if (file.endsWith(".safetensors")) {
      return new Response(null, {
        status: 302,
        headers: {
          "Location": `${this.url}/cdn/${repo}/${file}`,
          "X-Linked-Etag": `"${sha}"`,
          "X-Linked-Size": String(bytes.length + this.sizeSkew),
          "X-Repo-Commit": COMMIT,
          "ETag": `"${sha.slice(0, 40)}"`,
        },
      });
    }
    const headers = {
      "ETag": `W/"${sha.slice(0, 40)}"`,
      "X-Repo-Commit": COMMIT,
      "Content-Length": String(bytes.length),
    };
    return new Response(req.method === "HEAD" ? null : bytes, { headers });
  }
}

const REPOS = {
  "test-org/vit-tiny": `${MODELS}vit_tiny`,
  "test-org/vit-tiny-hf": `${MODELS}vit_tiny_hf`,
  "timm/vit_base_patch32_clip_224.openai": `${MODELS}vit_tiny`,
};

async function withHub(fn: (hub: FakeHub, cacheDir: string) => Promise<void>) {
  const hub = new FakeHub(REPOS);
  const cacheDir = await Deno.makeTempDir();
  try {
    await fn(hub, cacheDir);
  } finally {
    await hub.close().catch(() => {});
    await Deno.remove(cacheDir, { recursive: true });
  }
}

const WEIGHTS = "open_clip_model.safetensors";

Deno.test("hubDownload fills the Hugging Face cache layout, checks sha256 and reports progress", async () => {
  await withHub(async (hub, cacheDir) => {
    const progress: DownloadProgress[] = [];
    const path = await hubDownload("test-org/vit-tiny", WEIGHTS, {
      cacheDir,
      endpoint: hub.url,
      onProgress: (p) => progress.push(p),
    });
    const folder = `${cacheDir}/models--test-org--vit-tiny`;
    const original = await Deno.readFile(`${MODELS}vit_tiny/${WEIGHTS}`);
    const sha = await sha256Hex(original);
    assert.equal(path, `${folder}/snapshots/${COMMIT}/${WEIGHTS}`);
    assert.equal(await Deno.readLink(path), `../../blobs/${sha}`);
    assert.deepEqual(await Deno.readFile(path), original);
    assert.equal((await Deno.readTextFile(`${folder}/refs/main`)).trim(), COMMIT);
    assert.deepEqual([...Deno.readDirSync(`${folder}/blobs`)].map((e) => e.name), [sha]);

    assert.ok(progress.length > 2, `progress called ${progress.length} times`);
    assert.deepEqual(progress.at(-1), {
      repo: "test-org/vit-tiny",
      file: WEIGHTS,
      loaded: original.length,
      total: original.length,
    });
    for (let i = 1; i < progress.length; i++) assert.ok(progress[i].loaded >= progress[i - 1].loaded);

    // A second call finds the blob and downloads nothing.
    const before = hub.log.filter((l) => l.path.startsWith("/cdn/")).length;
    assert.equal(await hubDownload("test-org/vit-tiny", WEIGHTS, { cacheDir, endpoint: hub.url }), path);
    assert.equal(hub.log.filter((l) => l.path.startsWith("/cdn/")).length, before);
  });
});

Deno.test("resolveModel hf-hub: downloads open_clip's layout, then works offline and with the hub gone", async () => {
  await withHub(async (hub, cacheDir) => {
    const online = await resolveModel("hf-hub:test-org/vit-tiny", { cacheDir, endpoint: hub.url });
    const local = await resolveCheckpoint(`${MODELS}vit_tiny`);
    assert.equal(online.naming, "open_clip");
    assert.deepEqual(online.config, local.config);
    assert.deepEqual(online.preprocess, local.preprocess);
    assert.ok(online.weightsPath!.startsWith(`${cacheDir}/models--test-org--vit-tiny/snapshots/${COMMIT}/`));
    assert.deepEqual((await loadStateDict(online)).get("visual.proj"), (await loadStateDict(local)).get("visual.proj"));

    await hub.close();
    const requests = hub.log.length;
    const offline = await resolveModel("hf-hub:test-org/vit-tiny", { cacheDir, endpoint: hub.url, offline: true });
    assert.equal(offline.weightsPath, online.weightsPath);
    // Not told to stay offline, but the hub refuses connections: the cache answers.
    const unreachable = await resolveModel("hf-hub:test-org/vit-tiny", { cacheDir, endpoint: hub.url });
    assert.equal(unreachable.weightsPath, online.weightsPath);
    assert.equal(hub.log.length, requests);
    await assert.rejects(
      resolveModel("hf-hub:test-org/vit-tiny-hf", { cacheDir, endpoint: hub.url }),
      (e: unknown) => e instanceof HubNotCachedError && /cannot reach the hub/.test(e.message),
    );
  });
});

Deno.test("resolveModel hf-hub: falls back to transformers' layout when open_clip's is absent", async () => {
  await withHub(async (hub, cacheDir) => {
    const resolved = await resolveModel("hf-hub:test-org/vit-tiny-hf", { cacheDir, endpoint: hub.url });
    assert.equal(resolved.naming, "hf");
    const missing = hub.log.find((l) => l.path.endsWith("/open_clip_config.json"));
    assert.equal(missing?.status, 404);
    const snapshot = `${cacheDir}/models--test-org--vit-tiny-hf/snapshots/${COMMIT}`;
    assert.deepEqual([...Deno.readDirSync(snapshot)].map((e) => e.name).sort(), [
      "config.json",
      "model.safetensors",
      "preprocessor_config.json",
    ]);
    const a = await loadStateDict(resolved);
    const b = await loadStateDict(await resolveCheckpoint(`${MODELS}vit_tiny`));
    for (const [key, t] of b) assert.deepEqual(a.get(key)!.data, t.data, key);
    // Offline, the cached transformers layout is found after open_clip's is found missing from the cache.
    const offline = await resolveModel("hf-hub:test-org/vit-tiny-hf", { cacheDir, endpoint: hub.url, offline: true });
    assert.equal(offline.weightsPath, resolved.weightsPath);
  });
});

Deno.test("an interrupted download resumes from its .incomplete file with a Range request", async () => {
  await withHub(async (hub, cacheDir) => {
    const original = await Deno.readFile(`${MODELS}vit_tiny/${WEIGHTS}`);
    const sha = await sha256Hex(original);
    const blobs = `${cacheDir}/models--test-org--vit-tiny/blobs`;
    await Deno.mkdir(blobs, { recursive: true });
    await Deno.writeFile(`${blobs}/${sha}.incomplete`, original.subarray(0, 1_000_000));
    const progress: DownloadProgress[] = [];
    const path = await hubDownload("test-org/vit-tiny", WEIGHTS, {
      cacheDir,
      endpoint: hub.url,
      onProgress: (p) => progress.push(p),
    });
    assert.deepEqual(await Deno.readFile(path), original);
    const gets = hub.log.filter((l) => l.path.startsWith("/cdn/"));
    assert.deepEqual(gets.map((g) => [g.range, g.status]), [["bytes=1000000-", 206]]);
    assert.equal(progress[0].loaded, 1_000_000);
    assert.equal(progress.at(-1)!.loaded, original.length);
    assert.deepEqual([...Deno.readDirSync(blobs)].map((e) => e.name), [sha]);
  });
});

Deno.test("a resumed download whose bytes do not hash to the ETag is rejected and removed", async () => {
  await withHub(async (hub, cacheDir) => {
    const original = await Deno.readFile(`${MODELS}vit_tiny/${WEIGHTS}`);
    const sha = await sha256Hex(original);
    const blobs = `${cacheDir}/models--test-org--vit-tiny/blobs`;
    await Deno.mkdir(blobs, { recursive: true });
    await Deno.writeFile(`${blobs}/${sha}.incomplete`, new Uint8Array(1000).fill(7));
    await assert.rejects(
      hubDownload("test-org/vit-tiny", WEIGHTS, { cacheDir, endpoint: hub.url }),
      new RegExp(`sha256 is [0-9a-f]{64} but the hub says ${sha}`),
    );
    assert.deepEqual([...Deno.readDirSync(blobs)], []);
    // The next attempt starts over and succeeds.
    assert.deepEqual(
      await Deno.readFile(await hubDownload("test-org/vit-tiny", WEIGHTS, { cacheDir, endpoint: hub.url })),
      original,
    );
  });
});

Deno.test("a download whose size differs from the announced size is rejected", async () => {
  await withHub(async (hub, cacheDir) => {
    hub.sizeSkew = 100;
    const size = (await Deno.stat(`${MODELS}vit_tiny/${WEIGHTS}`)).size;
    await assert.rejects(
      hubDownload("test-org/vit-tiny", WEIGHTS, { cacheDir, endpoint: hub.url }),
      new RegExp(`announced ${size + 100}`),
    );
    assert.equal(await cachedFile(cacheDir, "test-org/vit-tiny", WEIGHTS), null);
    assert.deepEqual(
      [...Deno.readDirSync(`${cacheDir}/models--test-org--vit-tiny/blobs`)].filter((e) =>
        !e.name.endsWith(".incomplete")
      ),
      [],
    );
  });
});

Deno.test("two concurrent downloads of one file take turns and agree", async () => {
  await withHub(async (hub, cacheDir) => {
    const opts = { cacheDir, endpoint: hub.url };
    const [a, b] = await Promise.all([
      hubDownload("test-org/vit-tiny", WEIGHTS, opts),
      hubDownload("test-org/vit-tiny", WEIGHTS, opts),
    ]);
    assert.equal(a, b);
    assert.deepEqual(await Deno.readFile(a), await Deno.readFile(`${MODELS}vit_tiny/${WEIGHTS}`));
    assert.equal(hub.log.filter((l) => l.path.startsWith("/cdn/")).length, 1);
  });
});

Deno.test("hub errors: missing file, unknown repository, offline without a cache", async () => {
  await withHub(async (hub, cacheDir) => {
    await assert.rejects(
      hubDownload("test-org/vit-tiny", "nope.json", { cacheDir, endpoint: hub.url }),
      (e: unknown) => e instanceof HubNotFoundError && e.what === "file" && /has no file 'nope\.json'/.test(e.message),
    );
    await assert.rejects(
      hubDownload("test-org/unknown", "config.json", { cacheDir, endpoint: hub.url }),
      (e: unknown) => e instanceof HubNotFoundError && e.what === "repo" && /HF_TOKEN/.test(e.message),
    );
    await assert.rejects(
      hubDownload("test-org/vit-tiny", "config.json", { cacheDir, endpoint: hub.url, offline: true }),
      (e: unknown) => e instanceof HubNotCachedError && /offline mode is on/.test(e.message),
    );
    await assert.rejects(hubDownload("../evil", "x", { cacheDir, endpoint: hub.url }), /not a hub repository id/);
    await assert.rejects(hubDownload("a/b", "../x", { cacheDir, endpoint: hub.url }), /must be a plain relative path/);
  });
});

Deno.test("cache folder, endpoint and offline settings come from the environment", () => {
  const env = (vars: Record<string, string>) => (name: string) => vars[name];
  assert.equal(hubCacheDir(env({ CLIP_CACHE: "/c", XDG_CACHE_HOME: "/x", HOME: "/h" })), "/c");
  assert.equal(hubCacheDir(env({ XDG_CACHE_HOME: "/x", HOME: "/h" })), "/x/clip");
  assert.equal(hubCacheDir(env({ HOME: "/h" })), "/h/.cache/clip");
  assert.throws(() => hubCacheDir(env({})), /set CLIP_CACHE/);
  assert.equal(hubEndpoint(undefined, env({})).url.href, "https://huggingface.co/");
  assert.equal(hubEndpoint(undefined, env({ HF_ENDPOINT: "http://127.0.0.1:9" })).allowHttp, true);
  assert.equal(hubEndpoint("https://mirror.example/hf", env({})).allowHttp, false);
  assert.throws(() => hubEndpoint("ftp://x", env({})), /must use https/);
  assert.equal(offlineFromEnv(env({ HF_HUB_OFFLINE: "1" })), true);
  assert.equal(offlineFromEnv(env({ HF_HUB_OFFLINE: "0" })), false);
  assert.equal(offlineFromEnv(env({})), false);
});

Deno.test("pretrained tags map to their hub repositories and activation", async () => {
  assert.deepEqual(lookupPretrained("ViT-B-32:openai"), {
    arch: "ViT-B-32",
    tag: "openai",
    hub: "timm/vit_base_patch32_clip_224.openai",
    quick_gelu: true,
  });
  assert.equal(lookupPretrained("ViT-B-32:laion2b_s34b_b79k")!.hub, "laion/CLIP-ViT-B-32-laion2B-s34B-b79K");
  assert.equal(lookupPretrained("ViT-B-32:laion2b_s34b_b79k")!.quick_gelu, undefined);
  assert.equal(lookupPretrained("RN50:openai")!.hub, "timm/resnet50_clip.openai");
  assert.equal(lookupPretrained("ViT-B-16:openai")!.hub, "timm/vit_base_patch16_clip_224.openai");
  assert.equal(lookupPretrained("ViT-L-14:openai")!.hub, "timm/vit_large_patch14_clip_224.openai");
  assert.equal(lookupPretrained("not-a-tag"), null);
  assert.throws(
    () => lookupPretrained("ViT-B-32:nope"),
    (e: unknown) => e instanceof UsageError && /available: openai, /.test(e.message),
  );
  for (const arch of Object.keys(PRETRAINED)) await loadModelConfig(arch); // every tagged architecture has a config
  assert.ok(listPretrained().includes("RN50x4:openai"));

  const openai = await pretrainedConfig(lookupPretrained("ViT-B-32:openai")!);
  assert.equal(openai.config.quick_gelu, true);
  const laion = await pretrainedConfig(lookupPretrained("ViT-L-14:laion2b_s32b_b82k")!);
  assert.equal(laion.config.quick_gelu, false);
  assert.deepEqual(laion.preprocess.mean, [0.5, 0.5, 0.5]);
});

Deno.test("resolveModel: tags download their weights; names, configs and folders resolve locally", async () => {
  await withHub(async (hub, cacheDir) => {
    // The fake hub serves vit_tiny's weights under the ViT-B-32 openai repository name: resolving works, and
    // loading then reports the first tensor that does not fit ViT-B-32.
    const tagged = await resolveModel("ViT-B-32:openai", { cacheDir, endpoint: hub.url });
    assert.equal(tagged.config.quick_gelu, true);
    assert.equal(tagged.config.vision_cfg.width, 768);
    assert.ok(tagged.weightsPath!.startsWith(`${cacheDir}/models--timm--vit_base_patch32_clip_224.openai/snapshots/`));
    await assert.rejects(
      loadStateDict(tagged),
      /'positional_embedding' has shape \[77, 64\] but the config needs \[77, 512\]/,
    );

    const builtin = await resolveModel("test-vit-micro", { cacheDir, endpoint: hub.url, offline: true });
    assert.equal(builtin.weightsPath, null);
    assert.equal(builtin.preprocess.size, 16);
    const fromJson = await resolveModel(`${MODELS}rn_tiny/open_clip_config.json`, { offline: true });
    assert.equal(fromJson.weightsPath, null);
    assert.deepEqual(fromJson.config.vision_cfg.layers, [1, 1, 1, 1]);
    const fromDir = await resolveModel(`${MODELS}rn_tiny`, { offline: true });
    assert.equal(fromDir.weightsPath, `${MODELS}rn_tiny/open_clip_model.safetensors`);
    const fromFile = await resolveModel(`${MODELS}vit_tiny_hf/model.safetensors`, { offline: true });
    assert.equal(fromFile.naming, "hf");

    await assert.rejects(
      resolveModel("ViT-Q-99", { offline: true }),
      (e: unknown) => e instanceof UsageError && /unknown model 'ViT-Q-99'/.test(e.message),
    );
    await assert.rejects(resolveModel("hf-hub:justone", { offline: true }), /expected hf-hub:ORG\/NAME/);
    await assert.rejects(
      resolveModel("RN50:openai", { cacheDir, offline: true }),
      (e: unknown) =>
        e instanceof ClipError &&
        /timm\/resnet50_clip\.openai\/open_clip_model\.safetensors is not in the cache/.test(e.message),
    );
  });
});
