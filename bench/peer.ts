/**
 * Finds and runs the PyTorch peer (bench/peer/run.py) with Debian's Python, which is where python3-torch installs.
 * When torch is missing, one bounded `apt-get install` is tried; whatever goes wrong comes back as a reason, never as
 * an exception, so that the bench still writes its own rows.
 */

export const PEER_PYTHON = "/usr/bin/python3";
const INSTALL_SECONDS = 600;
const PEER_SECONDS = 40 * 60;

export interface PeerOutput {
  python: string;
  torch: string;
  blas: string;
  threadsTried: number[];
  rows: Record<
    string,
    { value: number | null; unit: string; note: string; threads: number; byThreads: Record<string, number | null> }
  >;
  checks: Record<string, unknown>;
  errors: string[];
}

async function quiet(cmd: string, args: string[], seconds: number, env?: Record<string, string>) {
  try {
    const out = await new Deno.Command(cmd, {
      args,
      env,
      stdout: "piped",
      stderr: "piped",
      signal: AbortSignal.timeout(seconds * 1000),
    }).output();
    const text = new TextDecoder().decode(out.success ? out.stdout : out.stderr).trim();
    return { ok: out.success, text, code: out.code };
  } catch (e) {
    return { ok: false, text: (e as Error).message, code: -1 };
  }
}

async function torchVersion(): Promise<string | null> {
  const r = await quiet(PEER_PYTHON, ["-c", "import torch, numpy; print(torch.__version__)"], 120);
  return r.ok ? r.text : null;
}

/** null when the peer can run; otherwise why not. */
export async function peerUnavailable(): Promise<string | null> {
  if (await torchVersion()) return null;
  console.error(`no torch for ${PEER_PYTHON}: trying apt-get install python3-torch (up to ${INSTALL_SECONDS} s)`);
  const install = await quiet(
    "apt-get",
    ["install", "-y", "-q", "python3-torch", "python3-pil", "libopenblas0-pthread"],
    INSTALL_SECONDS,
    { DEBIAN_FRONTEND: "noninteractive" },
  );
  if (await torchVersion()) return null;
  const last = install.text.split("\n").pop() ?? "";
  return `${PEER_PYTHON} has no torch and apt-get install python3-torch failed (${
    install.code === -1 ? last : `exit ${install.code}: ${last}`
  })`;
}

/** Runs the peer on a plan file; its progress goes to stderr. */
export async function runPeer(planPath: string): Promise<PeerOutput | string> {
  const script = new URL("./peer/run.py", import.meta.url).pathname;
  try {
    const out = await new Deno.Command(PEER_PYTHON, {
      args: [script, planPath],
      // Keeps the peer's imports from leaving __pycache__ folders in the repository.
      env: { PYTHONDONTWRITEBYTECODE: "1" },
      stdout: "piped",
      stderr: "inherit",
      signal: AbortSignal.timeout(PEER_SECONDS * 1000),
    }).output();
    if (!out.success) return `the peer exited with code ${out.code}`;
    const lines = new TextDecoder().decode(out.stdout).trim().split("\n");
    return JSON.parse(lines[lines.length - 1]) as PeerOutput;
  } catch (e) {
    return `the peer failed: ${(e as Error).message}`;
  }
}
