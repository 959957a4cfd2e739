// Browser test of the demo chat page: a real `imd all` on random loopback
// ports, headless Chromium (Debian's, through playwright-core), two users
// chatting both ways over the WebSocket transport, and one of them going
// away and coming back on a new page. It counts the messages in the DOM:
// each must be shown exactly once, in order.
//
// Run: cd internal/web && npm ci && node --test test/
// Environment: IMD_BIN, a built imd to use (default: go build into a
// temporary dir); CHROMIUM, the browser (default /usr/bin/chromium);
// RESULTS_DIR, where the screenshots go (default <repo>/results/web);
// IMD_WEB_TRANSPORT, websocket or longpoll to keep the pages on one
// (default: the SDK's choice, WebSocket first).
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn, execFileSync } from "node:child_process";
import { mkdtempSync, mkdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

const repo = resolve(fileURLToPath(new URL("../../..", import.meta.url)));
const results = process.env.RESULTS_DIR || join(repo, "results", "web");
const WAIT = 20_000; // ms any one expectation may take on a loaded machine

let tmp, imd, web, browser;
const imdLog = [];

before(async () => {
  tmp = mkdtempSync(join(tmpdir(), "imd-web-"));
  let bin = process.env.IMD_BIN;
  if (!bin) {
    bin = join(tmp, "imd");
    execFileSync("go", ["build", "-o", bin, "./cmd/imd"], { cwd: repo, stdio: "inherit" });
  }
  web = await startImd(bin);
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    // Playwright runs the browser on a fresh temporary profile
    // (--user-data-dir) of its own, removed when it closes.
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
});

after(async () => {
  await browser?.close();
  if (imd && imd.exitCode === null) {
    const exited = new Promise((r) => imd.once("exit", r));
    imd.kill("SIGTERM");
    await Promise.race([exited, sleep(10_000)]);
    if (imd.exitCode === null) imd.kill("SIGKILL");
  }
  if (tmp) rmSync(tmp, { recursive: true, force: true });
});

// startImd runs `imd all` with its demo apps (no apps configured, so the
// demo page and its token endpoint are on) and returns the web listener's
// address from the "node started" log line.
function startImd(bin) {
  imd = spawn(bin, [
    "all",
    "--data-dir", join(tmp, "data"),
    "--gateway-addr", "127.0.0.1:0",
    "--web-addr", "127.0.0.1:0",
    "--http-addr", "127.0.0.1:0",
    "--kafka-addr", "127.0.0.1:0",
    "--log-format", "json",
  ], { stdio: ["ignore", "inherit", "pipe"] });
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`imd did not start:\n${imdLog.join("\n")}`)), 60_000);
    imd.once("exit", (code) => reject(new Error(`imd exited ${code}:\n${imdLog.join("\n")}`)));
    createInterface({ input: imd.stderr }).on("line", (line) => {
      imdLog.push(line);
      let rec;
      try {
        rec = JSON.parse(line);
      } catch {
        return;
      }
      if (rec.msg === "node started") {
        clearTimeout(timer);
        if (!rec.web) reject(new Error(`no web listener in ${line}`));
        resolve(rec.web);
      }
    });
  });
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// open logs uid in on appcode in a new browser context (its own storage,
// like another device) with a token from the demo's mint button.
async function open(appcode, uid) {
  const ctx = await browser.newContext({ viewport: { width: 900, height: 560 } });
  const page = await ctx.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(e));
  page.on("console", (m) => m.type() === "error" && errors.push(m.text()));
  page.errors = errors;
  const only = process.env.IMD_WEB_TRANSPORT;
  await page.goto(`http://${web}/demo/${only ? `?transport=${only}` : ""}`);
  await page.fill("#appcode", String(appcode));
  await page.fill("#uid", String(uid));
  await page.click("#mint");
  await page.waitForFunction(() => document.querySelector("#token").value !== "", null, { timeout: WAIT });
  await page.click("#login-btn");
  try {
    await page.waitForSelector('#state[data-state="online"]', { timeout: WAIT });
  } catch (err) {
    const shown = await page.textContent("#login-error");
    throw new Error(`uid ${uid} did not log in: page says "${shown}", errors ${errors.join("; ")}`, { cause: err });
  }
  return page;
}

// chatWith opens the conversation with uid from the new-chat box.
async function chatWith(page, uid) {
  await page.fill("#peer-uid", String(uid));
  await page.click("#new-conv button");
  await page.waitForSelector("#compose:not([hidden])", { timeout: WAIT });
}

async function send(page, ...texts) {
  for (const t of texts) {
    await page.fill("#text", t);
    await page.press("#text", "Enter");
  }
  // Answered (stored) when no message is pending any more.
  await page.waitForFunction(() => !document.querySelector("#messages .pending"), null, { timeout: WAIT });
}

// shown returns the texts of the open conversation, top to bottom.
const shown = (page) => page.$$eval("#messages .msg .text", (els) => els.map((e) => e.textContent));

// expectShown waits until the open conversation holds exactly want; a
// message shown twice or out of order never matches.
async function expectShown(page, want) {
  const deadline = Date.now() + WAIT;
  let got;
  while (Date.now() < deadline) {
    got = await shown(page);
    if (got.length >= want.length) break;
    await sleep(100);
  }
  await sleep(300); // a duplicate that arrives a little late still counts
  assert.deepEqual(await shown(page), want);
}

async function screenshot(page, name) {
  mkdirSync(results, { recursive: true });
  await page.screenshot({ path: join(results, name) });
}

test("two users chat both ways, and one comes back on a new page", { timeout: 180_000 }, async (t) => {
  const alice = await open(101, 1001);
  let bob = await open(102, 1002); // the freight PC app: the same account system

  await chatWith(alice, 1002);
  await send(alice, "a1 hello bob", "a2 are you there?", "a3 order 77 is ready");

  // Bob's list shows the conversation as it arrives; he opens it.
  const conv = bob.locator('#convs .conv[data-peer="1:1001"]');
  await conv.waitFor({ timeout: WAIT });
  await conv.click();
  await expectShown(bob, ["a1 hello bob", "a2 are you there?", "a3 order 77 is ready"]);

  // Bob's terminal acknowledged each one: Alice sees a tick on all three.
  await alice.waitForFunction(() => document.querySelectorAll("#messages .msg.mine .tick").length === 3, null, { timeout: WAIT });

  await send(bob, "b1 on my way", "b2 ten minutes");
  const both = ["a1 hello bob", "a2 are you there?", "a3 order 77 is ready", "b1 on my way", "b2 ten minutes"];
  await expectShown(alice, both);
  await expectShown(bob, both);

  // Bob goes offline (closes the page); Alice writes meanwhile.
  await bob.context().close();
  await send(alice, "a4 still coming?", "a5 call me");
  const whileAway = [...both, "a4 still coming?", "a5 call me"];
  await expectShown(alice, whileAway);

  // Bob comes back on a new page: history and the offline inbox both
  // hold a4 and a5; each is shown once.
  bob = await open(102, 1002);
  const back = bob.locator('#convs .conv[data-peer="1:1001"]');
  await back.waitFor({ timeout: WAIT });
  await back.click();
  await expectShown(bob, whileAway);

  await send(bob, "b3 back online");
  const all = [...whileAway, "b3 back online"];
  await expectShown(bob, all);
  await expectShown(alice, all);

  // Every one of Alice's five messages was delivered to some terminal of
  // Bob's, the last two when he came back.
  await alice.waitForFunction(() => document.querySelectorAll("#messages .msg.mine .tick").length === 5, null, { timeout: WAIT });

  await screenshot(alice, "alice.png");
  await screenshot(bob, "bob.png");
  const transport = await alice.getAttribute("#state", "data-transport");
  t.diagnostic(`the pages ran over ${transport}; screenshots in ${results}`);
  for (const [who, page] of [["alice", alice], ["bob", bob]]) {
    // Chromium logs a refused WebSocket handshake as an error; the SDK
    // then falls back to long-poll by design, so that line is an error
    // only when the page did not end up on long-poll.
    const errors = page.errors.filter((e) => !(transport === "longpoll" && /^WebSocket connection to .* failed/.test(e)));
    assert.deepEqual(errors, [], `${who}'s page logged errors`);
  }
});
