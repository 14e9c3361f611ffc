// A thin bridge from tests/browser.rs to a real headless Chromium, driven by Playwright.
//
// The Rust test owns everything that matters (the cairn server, what is appended, what is
// asserted); this script only does what it is told. It reads one JSON command per line on
// stdin and answers each with one JSON line on stdout: {"ok":true,"value":…} or
// {"ok":false,"error":"…"}. It exits when stdin closes.
//
// Chromium is Debian's (/usr/bin/chromium, or $CHROMIUM): Playwright's own browser
// download cannot reach its servers here. The flags keep Chromium off the network it
// would otherwise call home on at start.
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    // For the memory test: gc() on the page, and unrounded performance.memory figures.
    "--js-flags=--expose-gc",
    "--enable-precise-memory-info",
  ],
});
const page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
// Script errors on the page are collected for the test to assert on.
const pageErrors = [];
page.on("pageerror", (err) => pageErrors.push(String(err)));

const ops = {
  open: ({ url }) => page.goto(url, { waitUntil: "load" }).then(() => null),
  eval: ({ js }) => page.evaluate(js),
  fill: ({ selector, value }) => page.fill(selector, value),
  click: ({ selector }) => page.click(selector),
  press: ({ selector, key }) => page.press(selector, key),
  scheme: ({ value }) => page.emulateMedia({ colorScheme: value }),
  screenshot: ({ path }) => page.screenshot({ path, fullPage: false }).then(() => path),
  errors: () => pageErrors.slice(),
};

for await (const line of createInterface({ input: process.stdin })) {
  if (!line.trim()) continue;
  let reply;
  try {
    const command = JSON.parse(line);
    const op = ops[command.op];
    if (!op) throw new Error("unknown op " + JSON.stringify(command.op));
    const value = await op(command);
    reply = { ok: true, value: value === undefined ? null : value };
  } catch (err) {
    reply = { ok: false, error: String(err && err.stack ? err.stack : err) };
  }
  process.stdout.write(JSON.stringify(reply) + "\n");
}
await browser.close();
