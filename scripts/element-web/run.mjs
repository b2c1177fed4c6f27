#!/usr/bin/env node
// Drives a built Element Web in headless Chromium against Parvis: two agents log in, share an
// encrypted room and an encrypted DM, edit, react, reply in a thread, send an image, see the
// unread badge, set up key backup and restore history on a new login. See docs/element-web.md.
//
//   node run.mjs <element-webapp-dir> [options]
//
// Options:
//   --out DIR             screenshots, logs and results (default: ./out/<timestamp>)
//   --homeserver URL      use a running homeserver instead of starting Parvis
//   --shared-secret S     its registration.shared_secret (or PARVIS_SHARED_SECRET), to create the two users
//   --parvis-bin PATH     the parvis binary to start (default: `cargo run --bin parvis` in this repository)
//   --database-url URL    PostgreSQL server for the started Parvis (default postgres://postgres@127.0.0.1:5432)
//   --keep-data           keep the started Parvis's database and media folder
//   --chromium PATH       Chromium binary (default /usr/bin/chromium)
//   --timeout-ms N        how long one wait may take (default 30000)
//   --keep-going          after a failed step, run the steps that do not depend on it
//   --headed              show the browser windows (needs a display)

import { spawn, spawnSync } from "node:child_process";
import crypto from "node:crypto";
import fs from "node:fs";
import http from "node:http";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import zlib from "node:zlib";

import { chromium } from "playwright-core";

const SCRIPT_DIR = path.dirname(fileURLToPath(import.meta.url));
const REPO_ROOT = path.resolve(SCRIPT_DIR, "..", "..");

// ---------------------------------------------------------------------------------------------
// Arguments
// ---------------------------------------------------------------------------------------------

function usage(message) {
    if (message) console.error(`error: ${message}\n`);
    console.error(
        "usage: node run.mjs <element-webapp-dir> [--out DIR] [--homeserver URL --shared-secret S]\n" +
            "       [--parvis-bin PATH] [--database-url URL] [--keep-data] [--chromium PATH]\n" +
            "       [--timeout-ms N] [--keep-going] [--headed]",
    );
    process.exit(2);
}

function parseArgs(argv) {
    const opts = {
        out: null,
        homeserver: null,
        sharedSecret: process.env.PARVIS_SHARED_SECRET || null,
        parvisBin: process.env.PARVIS_BIN || null,
        databaseUrl: "postgres://postgres@127.0.0.1:5432",
        keepData: false,
        chromium: "/usr/bin/chromium",
        timeout: 30000,
        keepGoing: false,
        headed: false,
        element: null,
    };
    const valued = {
        "--out": "out",
        "--homeserver": "homeserver",
        "--shared-secret": "sharedSecret",
        "--parvis-bin": "parvisBin",
        "--database-url": "databaseUrl",
        "--chromium": "chromium",
        "--timeout-ms": "timeout",
    };
    for (let i = 0; i < argv.length; i++) {
        const a = argv[i];
        if (a === "-h" || a === "--help") usage();
        else if (a === "--keep-data") opts.keepData = true;
        else if (a === "--keep-going") opts.keepGoing = true;
        else if (a === "--headed") opts.headed = true;
        else if (valued[a]) {
            if (i + 1 >= argv.length) usage(`${a} needs a value`);
            opts[valued[a]] = argv[++i];
        } else if (a.startsWith("--")) usage(`unknown option ${a}`);
        else if (!opts.element) opts.element = a;
        else if (!opts.out) opts.out = a; // second positional: output folder
        else usage(`unexpected argument ${a}`);
    }
    if (!opts.element) usage("the built Element folder is required");
    opts.element = path.resolve(opts.element);
    if (!fs.existsSync(path.join(opts.element, "index.html"))) {
        usage(`${opts.element} has no index.html: give the built webapp folder (e.g. element-web/webapp)`);
    }
    opts.timeout = Number(opts.timeout);
    if (!Number.isFinite(opts.timeout) || opts.timeout <= 0) usage("--timeout-ms must be a positive number");
    if (opts.homeserver && !opts.sharedSecret) {
        usage("--homeserver needs --shared-secret (or PARVIS_SHARED_SECRET) to create the two agents");
    }
    if (opts.homeserver) opts.homeserver = opts.homeserver.replace(/\/+$/, "");
    const stamp = new Date().toISOString().replace(/[:.]/g, "-");
    opts.out = path.resolve(opts.out || path.join(SCRIPT_DIR, "out", stamp));
    return opts;
}

const opts = parseArgs(process.argv.slice(2));
fs.mkdirSync(opts.out, { recursive: true });

const logFile = fs.createWriteStream(path.join(opts.out, "run.log"));
function log(...parts) {
    const line = `[${new Date().toISOString().slice(11, 23)}] ${parts.join(" ")}`;
    console.log(line);
    logFile.write(line + "\n");
}

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function freePort() {
    return new Promise((resolve, reject) => {
        const srv = net.createServer();
        srv.unref();
        srv.on("error", reject);
        srv.listen(0, "127.0.0.1", () => {
            const { port } = srv.address();
            srv.close(() => resolve(port));
        });
    });
}

async function fetchJson(url, init = {}) {
    const res = await fetch(url, {
        ...init,
        headers: { "content-type": "application/json", ...(init.headers || {}) },
    });
    const text = await res.text();
    let body;
    try {
        body = JSON.parse(text);
    } catch {
        body = text;
    }
    if (!res.ok) throw new Error(`${init.method || "GET"} ${url} -> ${res.status} ${text.slice(0, 500)}`);
    return body;
}

/** A PNG image (gradient with a frame), made here so the run needs no sample file. */
function makePng(width, height) {
    const crcTable = Array.from({ length: 256 }, (_, n) => {
        let c = n;
        for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
        return c >>> 0;
    });
    const crc32 = (buf) => {
        let c = 0xffffffff;
        for (const b of buf) c = crcTable[(c ^ b) & 0xff] ^ (c >>> 8);
        return (c ^ 0xffffffff) >>> 0;
    };
    const chunk = (type, data) => {
        const len = Buffer.alloc(4);
        len.writeUInt32BE(data.length);
        const td = Buffer.concat([Buffer.from(type, "ascii"), data]);
        const crc = Buffer.alloc(4);
        crc.writeUInt32BE(crc32(td));
        return Buffer.concat([len, td, crc]);
    };
    const ihdr = Buffer.alloc(13);
    ihdr.writeUInt32BE(width, 0);
    ihdr.writeUInt32BE(height, 4);
    ihdr[8] = 8; // bit depth
    ihdr[9] = 2; // RGB
    const raw = Buffer.alloc((width * 3 + 1) * height);
    for (let y = 0; y < height; y++) {
        const row = y * (width * 3 + 1);
        raw[row] = 0;
        for (let x = 0; x < width; x++) {
            const frame = x < 4 || y < 4 || x >= width - 4 || y >= height - 4;
            const o = row + 1 + x * 3;
            raw[o] = frame ? 20 : Math.round((255 * x) / width);
            raw[o + 1] = frame ? 20 : Math.round((255 * y) / height);
            raw[o + 2] = frame ? 20 : 160;
        }
    }
    return Buffer.concat([
        Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
        chunk("IHDR", ihdr),
        chunk("IDAT", zlib.deflateSync(raw)),
        chunk("IEND", Buffer.alloc(0)),
    ]);
}

// ---------------------------------------------------------------------------------------------
// Parvis: start one (temporary database and media folder) or use the given one
// ---------------------------------------------------------------------------------------------

const cleanups = [];

async function waitForHomeserver(base, timeoutMs, proc) {
    const deadline = Date.now() + timeoutMs;
    while (Date.now() < deadline) {
        if (proc && proc.exitCode !== null) throw new Error(`parvis exited with status ${proc.exitCode}`);
        try {
            const res = await fetch(`${base}/_matrix/client/versions`);
            if (res.ok) return;
        } catch {
            /* not up yet */
        }
        await sleep(500);
    }
    throw new Error(`${base} did not answer /_matrix/client/versions within ${timeoutMs / 1000} s`);
}

async function startParvis() {
    const port = await freePort();
    const base = `http://127.0.0.1:${port}`;
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "parvis-element-web-"));
    const dbName = `parvis_element_web_${Date.now()}_${process.pid}`;
    const secret = crypto.randomBytes(24).toString("hex");
    const dbUrl = `${opts.databaseUrl.replace(/\/+$/, "")}/${dbName}`;
    const configPath = path.join(dir, "parvis.toml");
    fs.writeFileSync(
        configPath,
        [
            `server_name = "localhost"`,
            `public_baseurl = "${base}/"`,
            `[listen]`,
            `client = "127.0.0.1:${port}"`,
            `[database]`,
            `url = "${dbUrl}"`,
            `[logging]`,
            `format = "pretty"`,
            `filter = "info"`,
            `[registration]`,
            `enabled = false`,
            `shared_secret = "${secret}"`,
            `[rate_limits]`,
            `enabled = false`,
            `[media]`,
            `path = "${path.join(dir, "media")}"`,
            "",
        ].join("\n"),
    );
    const [cmd, args] = opts.parvisBin
        ? [opts.parvisBin, ["serve", "--config", configPath]]
        : ["cargo", ["run", "--quiet", "--bin", "parvis", "--", "serve", "--config", configPath]];
    log(`starting Parvis: ${cmd} ${args.join(" ")} (database ${dbName}, ${base})`);
    const serverLog = fs.createWriteStream(path.join(opts.out, "parvis.log"));
    const proc = spawn(cmd, args, {
        cwd: REPO_ROOT,
        env: { ...process.env, NO_COLOR: "1", RUST_LOG: process.env.RUST_LOG || "info" },
        stdio: ["ignore", "pipe", "pipe"],
    });
    proc.stdout.pipe(serverLog);
    proc.stderr.pipe(serverLog);
    cleanups.push(async () => {
        if (proc.exitCode === null) {
            proc.kill("SIGTERM");
            await Promise.race([new Promise((r) => proc.once("exit", r)), sleep(10000)]);
            if (proc.exitCode === null) proc.kill("SIGKILL");
        }
        if (opts.keepData) {
            log(`kept the database ${dbName} and ${dir}`);
            return;
        }
        fs.rmSync(dir, { recursive: true, force: true });
        const drop = spawnSync("psql", [opts.databaseUrl.replace(/\/+$/, "") + "/postgres", "-qc", `DROP DATABASE IF EXISTS "${dbName}"`], {
            encoding: "utf8",
        });
        if (drop.status !== 0) log(`could not drop the database ${dbName} (psql: ${drop.error?.message || drop.stderr.trim()})`);
    });
    // `cargo run` may have to build the server first.
    await waitForHomeserver(base, opts.parvisBin ? 60000 : 1800000, proc);
    log(`Parvis is up at ${base}`);
    return { base, secret };
}

/** Synapse-compatible shared-secret registration (what `register_new_matrix_user` does). */
async function registerUser(base, secret, username, password, displayname) {
    const { nonce } = await fetchJson(`${base}/_synapse/admin/v1/register`);
    const mac = crypto
        .createHmac("sha1", secret)
        .update(`${nonce}\0${username}\0${password}\0notadmin`)
        .digest("hex");
    const res = await fetchJson(`${base}/_synapse/admin/v1/register`, {
        method: "POST",
        body: JSON.stringify({ nonce, username, password, displayname, admin: false, mac }),
    });
    return { userId: res.user_id, localpart: username, password, displayName: displayname };
}

// ---------------------------------------------------------------------------------------------
// Element: a static server for the built folder, with our config.json
// ---------------------------------------------------------------------------------------------

const MIME = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".wasm": "application/wasm",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".ico": "image/x-icon",
    ".woff": "font/woff",
    ".woff2": "font/woff2",
    ".ttf": "font/ttf",
    ".mp3": "audio/mpeg",
    ".ogg": "audio/ogg",
    ".webmanifest": "application/manifest+json",
    ".txt": "text/plain; charset=utf-8",
    ".map": "application/json",
};

async function serveElement(root, config) {
    const configBody = JSON.stringify(config, null, 2);
    fs.writeFileSync(path.join(opts.out, "element-config.json"), configBody);
    const server = http.createServer((req, res) => {
        const url = new URL(req.url, "http://x");
        let rel = decodeURIComponent(url.pathname);
        if (/^\/config(\.[^/]+)?\.json$/.test(rel)) {
            res.writeHead(200, { "content-type": "application/json", "cache-control": "no-store" });
            res.end(configBody);
            return;
        }
        if (rel.endsWith("/")) rel += "index.html";
        const file = path.join(root, path.normalize(rel));
        if (!file.startsWith(root + path.sep)) {
            res.writeHead(403).end();
            return;
        }
        fs.readFile(file, (err, data) => {
            if (err) {
                res.writeHead(404, { "content-type": "text/plain" }).end("not found");
                return;
            }
            res.writeHead(200, {
                "content-type": MIME[path.extname(file).toLowerCase()] || "application/octet-stream",
                "cache-control": "no-store",
            });
            res.end(data);
        });
    });
    const port = await freePort();
    await new Promise((r) => server.listen(port, "127.0.0.1", r));
    cleanups.push(() => new Promise((r) => server.close(r)));
    return `http://127.0.0.1:${port}`;
}

// ---------------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------------

const T = opts.timeout;
const results = [];
const passed = new Set();
let shotIndex = 0;
const agents = {}; // label -> { page, context, user }
const httpErrors = [];
const backupDownloads = {}; // agent label -> successful GET /room_keys/keys count

// Error answers Element expects from a homeserver without these optional features.
const EXPECTED_ERRORS = [
    [/^GET \/_matrix\/client\/unstable\/org\.matrix\.msc2965\/auth_(issuer|metadata) -> 404 .*M_UNRECOGNIZED/, "no OIDC-native login (MSC2965)"],
    [/^GET \/_matrix\/client\/v3\/room_keys\/version -> 404 .*M_NOT_FOUND/, "no key backup yet"],
    [/^GET \/_matrix\/client\/unstable\/org\.matrix\.msc3814\.v1\/dehydrated_device -> 404 .*M_UNRECOGNIZED/, "no dehydrated devices (MSC3814)"],
    [/^GET \/_matrix\/client\/unstable\/org\.matrix\.msc3814\.v1\/dehydrated_device -> 404 .*M_NOT_FOUND/, "dehydrated devices supported, none created yet"],
    [/^GET \/_matrix\/client\/v3\/user\/[^/]+\/account_data\/m\.secret_storage\.default_key -> 404 .*M_NOT_FOUND/, "secret storage not set up yet"],
];

function expectedError(entry) {
    const request = entry.replace(/^[^:]+: /, "");
    const hit = EXPECTED_ERRORS.find(([re]) => re.test(request));
    return hit ? hit[1] : null;
}

class StopRun extends Error {}

/** A short description of what a page shows: open dialogs, error texts, the URL. */
async function describe(page) {
    try {
        const parts = [`url=${page.url()}`];
        const dialogs = await page.locator(".mx_Dialog").allInnerTexts();
        if (dialogs.length) parts.push(`dialog: ${dialogs.map((d) => d.replace(/\s+/g, " ").slice(0, 300)).join(" | ")}`);
        const errors = await page.locator(".mx_ErrorMessage, .mx_Login_error").allInnerTexts();
        if (errors.length) parts.push(`errors: ${errors.map((d) => d.replace(/\s+/g, " ").slice(0, 200)).join(" | ")}`);
        const toasts = await page.locator(".mx_Toast_toast").allInnerTexts();
        if (toasts.length) parts.push(`toasts: ${toasts.map((d) => d.replace(/\s+/g, " ").slice(0, 150)).join(" | ")}`);
        return parts.join("; ");
    } catch (e) {
        return `(page not readable: ${e.message})`;
    }
}

async function screenshots(label) {
    shotIndex++;
    const saved = [];
    for (const [name, agent] of Object.entries(agents)) {
        if (!agent.page || agent.page.isClosed()) continue;
        const file = `${String(shotIndex).padStart(2, "0")}-${label}-${name}.png`;
        try {
            await agent.page.screenshot({ path: path.join(opts.out, file), timeout: 15000 });
            saved.push(file);
        } catch (e) {
            log(`  (screenshot ${file} failed: ${e.message.split("\n")[0]})`);
        }
    }
    return saved;
}

async function step(id, title, needs, fn) {
    const missing = needs.filter((n) => !passed.has(n));
    if (missing.length) {
        results.push({ id, title, status: "skipped", detail: `needs ${missing.join(", ")}` });
        log(`- ${id}: skipped (needs ${missing.join(", ")})`);
        return;
    }
    log(`> ${id}: ${title}`);
    const t0 = Date.now();
    try {
        await fn();
        const shots = await screenshots(id);
        passed.add(id);
        results.push({ id, title, status: "pass", ms: Date.now() - t0, shots });
        log(`  ok ${id} (${((Date.now() - t0) / 1000).toFixed(1)} s) ${shots.join(" ")}`);
    } catch (e) {
        const shots = await screenshots(`${id}-FAILED`);
        const states = [];
        for (const [name, agent] of Object.entries(agents)) {
            if (agent.page && !agent.page.isClosed()) states.push(`${name}: ${await describe(agent.page)}`);
        }
        const detail = e.message.split("\n").filter((l) => l.trim()).slice(0, 6).join(" / ");
        results.push({ id, title, status: "fail", ms: Date.now() - t0, detail, states, shots });
        log(`  FAILED ${id}: ${detail}`);
        for (const s of states) log(`    ${s}`);
        log(`    screenshots: ${shots.join(" ")}`);
        if (!opts.keepGoing) throw new StopRun(id);
    }
}

/** Waits for a locator to be visible; on timeout, throws `what` with what the page shows. */
async function see(locator, what, timeout = T) {
    try {
        await locator.first().waitFor({ state: "visible", timeout });
    } catch (e) {
        throw new Error(`${what}: not visible after ${timeout / 1000} s (${await describe(locator.page())})`);
    }
}

async function newAgent(browser, label, user, baseURL) {
    const context = await browser.newContext({
        baseURL,
        viewport: { width: 1280, height: 860 },
        locale: "en-GB",
        permissions: ["clipboard-read", "clipboard-write"],
    });
    context.setDefaultTimeout(T);
    const page = await context.newPage();
    const consoleLog = fs.createWriteStream(path.join(opts.out, `console-${label}.log`));
    page.on("console", (m) => consoleLog.write(`[${m.type()}] ${m.text()}\n`));
    page.on("pageerror", (e) => consoleLog.write(`[pageerror] ${e.message}\n`));
    const httpLog = fs.createWriteStream(path.join(opts.out, `http-${label}.log`));
    page.on("response", async (res) => {
        const url = res.url();
        if (!url.startsWith(hsBase)) return;
        httpLog.write(`${new Date().toISOString().slice(11, 23)} ${res.request().method()} ${url.slice(hsBase.length)} -> ${res.status()}\n`);
        if (res.status() === 200 && /\/room_keys\/keys(\?|\/|$)/.test(url) && res.request().method() === "GET") {
            backupDownloads[label] = (backupDownloads[label] || 0) + 1;
        }
        if (res.status() < 400) return;
        let body = "";
        try {
            body = (await res.text()).slice(0, 300);
        } catch {
            /* body gone */
        }
        const entry = `${label}: ${res.request().method()} ${url.slice(hsBase.length)} -> ${res.status()} ${body}`;
        httpErrors.push(entry);
        consoleLog.write(`[http] ${entry}\n`);
    });
    agents[label] = { context, page, user };
    return page;
}

/** Logs in with the password form and waits until the room list is shown. */
async function login(page, user) {
    await page.goto("/#/login");
    await page.getByRole("textbox", { name: "Username" }).fill(user.localpart);
    await page.getByPlaceholder("Password").fill(user.password);
    await page.getByRole("button", { name: "Sign in" }).click();
}

async function waitForRoomList(page) {
    await see(page.getByRole("navigation", { name: "Room list" }), "the room list after login", 90000);
    // The "Enable desktop notifications" toast covers the room list header: dismiss it.
    const toast = page.locator(".mx_Toast_toast").filter({ hasText: "Enable desktop notifications" });
    try {
        await toast.getByRole("button", { name: "Dismiss" }).click({ timeout: 5000 });
    } catch {
        /* not shown */
    }
}

// Production builds of Element strip data-testid attributes: locate by role, label or class.
function roomList(page) {
    return page.getByRole("listbox", { name: "Room list" });
}

function composer(page, inThread = false) {
    return page.locator(`${inThread ? ".mx_ThreadView" : ".mx_RoomView_body"} .mx_MessageComposer div[contenteditable]`);
}

async function send(page, text, inThread = false) {
    const c = composer(page, inThread);
    await see(c, "the message composer");
    await c.click();
    await c.fill(text);
    await c.press("Enter");
}

function tile(page, text, scope = ".mx_RoomView_body") {
    return page.locator(`${scope} .mx_EventTile`).filter({ hasText: text });
}

/** Waits until `page` shows `text` as a decrypted message; explains decryption failures. */
async function seeMessage(page, text, who, scope = ".mx_RoomView_body") {
    try {
        await tile(page, text, scope).locator(".mx_EventTile_body").first().waitFor({ state: "visible", timeout: T * 2 });
    } catch {
        const utd = await page.locator(`${scope} .mx_DecryptionFailureBody`).allInnerTexts();
        const hint = utd.length
            ? `instead the timeline has ${utd.length} undecryptable message(s): "${[...new Set(utd)].join('", "')}"`
            : await describe(page);
        throw new Error(`${who} does not see the message "${text}" decrypted; ${hint}`);
    }
}

async function roomIdOf(page) {
    const m = decodeURIComponent(page.url()).match(/#\/room\/(![^/?]+)/);
    return m ? m[1] : null;
}

async function openRoom(page, name) {
    const item = roomList(page).getByRole("option", { name: new RegExp(`^Open room ${escapeRe(name)}`) });
    await see(item, `the room "${name}" in the room list`);
    await item.first().click();
    await see(page.locator(".mx_RoomHeader").getByText(name, { exact: true }), `the header of "${name}"`);
}

function escapeRe(s) {
    return s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}

async function hoverActions(page, text) {
    const line = tile(page, text).locator(".mx_EventTile_line").first();
    await line.hover();
    return tile(page, text).getByRole("toolbar", { name: "Message Actions" });
}

/** Counts the sessions in the server-side key backup, per room, as seen by the page's client. */
async function backupState(page) {
    return page.evaluate(async () => {
        const cli = window.mxMatrixClientPeg.get();
        const cryptoApi = cli.getCrypto();
        const info = await cryptoApi.getKeyBackupInfo();
        const active = await cryptoApi.getActiveSessionBackupVersion();
        if (!info) return { version: null, active, rooms: {} };
        const keys = await cli.http.authedRequest("GET", "/room_keys/keys", { version: info.version });
        const rooms = {};
        for (const [roomId, room] of Object.entries(keys.rooms || {})) rooms[roomId] = Object.keys(room.sessions || {}).length;
        return { version: info.version, active, rooms };
    });
}

let hsBase;

/** Why Element may have skipped cross-signing: what the homeserver advertises. */
async function crossSigningHint() {
    try {
        const versions = await fetchJson(`${hsBase}/_matrix/client/versions`);
        const flag = versions.unstable_features?.["org.matrix.e2e_cross_signing"];
        return flag
            ? ""
            : ' (the homeserver\'s /versions does not advertise unstable_features "org.matrix.e2e_cross_signing": true, ' +
                  "so Element does not bootstrap cross-signing after login)";
    } catch (e) {
        return ` (could not read /versions: ${e.message})`;
    }
}

async function main() {
    let secret = opts.sharedSecret;
    if (opts.homeserver) {
        hsBase = opts.homeserver;
        await waitForHomeserver(hsBase, 10000);
        log(`using the homeserver at ${hsBase}`);
    } else {
        const started = await startParvis();
        hsBase = started.base;
        secret = started.secret;
    }

    const suffix = crypto.randomBytes(3).toString("hex");
    const password = `Parvis-e2e-${crypto.randomBytes(6).toString("hex")}`;
    const alice = await registerUser(hsBase, secret, `agent-a-${suffix}`, password, `Anne ${suffix}`);
    const bob = await registerUser(hsBase, secret, `agent-b-${suffix}`, password, `Bruno ${suffix}`);
    const serverName = alice.userId.split(":").slice(1).join(":");
    log(`agents: ${alice.userId}, ${bob.userId} (password ${password})`);

    const elementUrl = await serveElement(opts.element, {
        default_server_config: { "m.homeserver": { base_url: hsBase, server_name: serverName } },
        disable_custom_urls: true,
        disable_guests: true,
        disable_3pid_login: true,
        brand: "Element",
        default_country_code: "FR",
        show_labs_settings: false,
        room_directory: { servers: [serverName] },
        setting_defaults: { "UIFeature.registration": false, "UIFeature.passwordReset": false },
        // "What's new" pop-overs anchored on the room list would cover the buttons the run clicks.
        features: { feature_release_announcement: false },
    });
    log(`Element (${opts.element}) served at ${elementUrl}`);

    const browser = await chromium.launch({
        executablePath: opts.chromium,
        headless: !opts.headed,
        args: ["--no-sandbox", "--disable-dev-shm-usage"],
    });
    cleanups.unshift(() => browser.close());
    log(`Chromium ${browser.version()}`);

    const room = `Service urbanisme ${suffix}`;
    const msgA = `Bonjour de A ${suffix}`;
    const msgB = `Bonjour de B ${suffix}`;
    const msgAEdited = `Bonjour de A, corrigé ${suffix}`;
    const threadReply = `Réponse en fil ${suffix}`;
    const dmA = `Message privé de A ${suffix}`;
    const dmB = `Réponse privée de B ${suffix}`;
    const unread = [`Non lu 1 ${suffix}`, `Non lu 2 ${suffix}`];
    let pageA, pageB, roomId, dmRoomId, recoveryKey;

    await step("login-a", "agent A logs in with a password", [], async () => {
        pageA = await newAgent(browser, "A", alice, elementUrl);
        await login(pageA, alice);
        await waitForRoomList(pageA);
    });

    await step("login-b", "agent B logs in with a password", [], async () => {
        pageB = await newAgent(browser, "B", bob, elementUrl);
        await login(pageB, bob);
        await waitForRoomList(pageB);
    });

    await step("cross-signing", "Element set up cross-signing for both agents at login", ["login-a", "login-b"], async () => {
        for (const [who, page] of [["A", pageA], ["B", pageB]]) {
            const deadline = Date.now() + T;
            let ready = false;
            while (Date.now() < deadline && !ready) {
                ready = await page.evaluate(() => window.mxMatrixClientPeg.get().getCrypto().isCrossSigningReady());
                if (!ready) await sleep(500);
            }
            if (!ready) throw new Error(`${who}'s session has no cross-signing set up${await crossSigningHint()}`);
        }
    });

    await step("create-room", "A creates a private encrypted room", ["login-a"], async () => {
        await pageA.getByRole("navigation", { name: "Room list" }).getByRole("button", { name: "Add" }).click();
        await pageA.getByRole("menuitem", { name: "New room" }).click();
        const dialog = pageA.locator(".mx_CreateRoomDialog");
        await see(dialog, "the create room dialog");
        await dialog.getByRole("textbox", { name: "Name" }).fill(room);
        await dialog.getByRole("button", { name: "Create room" }).click();
        await dialog.waitFor({ state: "hidden" });
        await see(pageA.locator(".mx_RoomHeader").getByText(room, { exact: true }), "the new room's header");
        await see(
            pageA.locator(".mx_RoomView_body .mx_cryptoEvent").getByText("Encryption enabled"),
            'the "Encryption enabled" notice of the new room',
        );
        roomId = await roomIdOf(pageA);
        log(`  room ${roomId}`);
    });

    await step("invite", "A invites B to the room", ["create-room", "login-b"], async () => {
        await pageA.getByRole("button", { name: "Room info" }).first().click();
        await pageA.locator(".mx_RightPanel").getByRole("menuitem", { name: "Invite" }).click();
        const dialog = pageA.locator(".mx_InviteDialog_other");
        await see(dialog, "the invite dialog");
        await dialog.locator(".mx_InviteDialog_editor input").fill(bob.userId);
        const option = dialog.getByRole("option").filter({ hasText: bob.userId });
        await see(option, `${bob.userId} among the invite suggestions`);
        await option.first().click();
        await dialog.getByRole("button", { name: "Invite" }).click();
        await dialog.waitFor({ state: "hidden" });
        await pageA.locator(".mx_RightPanel").getByRole("button", { name: "Close" }).first().click().catch(() => {});
        await see(pageA.locator(".mx_RoomView_body").getByText(`invited ${bob.displayName}`), "the invitation in A's timeline");
    });

    await step("join", "B accepts the invitation and joins", ["invite"], async () => {
        const invite = roomList(pageB).getByRole("option", { name: `Open room ${room} invitation.` });
        await see(invite, "the invitation in B's room list");
        await invite.click();
        await pageB.locator(".mx_RoomView").getByRole("button", { name: "Accept" }).click();
        await see(composer(pageB), "B's composer after joining");
        await see(pageA.locator(".mx_RoomView_body").getByText(`${bob.displayName} joined the room`), "B's join in A's timeline");
    });

    await step("message-a-to-b", "A sends a message, B reads it decrypted", ["join"], async () => {
        await send(pageA, msgA);
        await seeMessage(pageA, msgA, "A");
        await seeMessage(pageB, msgA, "B");
    });

    await step("message-b-to-a", "B answers, A reads it decrypted", ["join"], async () => {
        await send(pageB, msgB);
        await seeMessage(pageB, msgB, "B");
        await seeMessage(pageA, msgB, "A");
    });

    await step("edit", "A edits the message, B sees the new text", ["message-a-to-b"], async () => {
        const actions = await hoverActions(pageA, msgA);
        await actions.getByRole("button", { name: "Edit" }).click();
        const editor = pageA.locator(".mx_EditMessageComposer div[contenteditable]");
        await see(editor, "the edit composer");
        await editor.press("ControlOrMeta+a");
        await editor.pressSequentially(msgAEdited);
        await editor.press("Enter");
        await seeMessage(pageA, msgAEdited, "A");
        await seeMessage(pageB, msgAEdited, "B");
        await see(tile(pageB, msgAEdited).locator(".mx_EventTile_edited"), 'the "(edited)" mark on B\'s side');
    });

    await step("reaction", "B reacts with 👍, A sees the reaction", ["edit"], async () => {
        const actions = await hoverActions(pageB, msgAEdited);
        await actions.getByRole("button", { name: "React" }).click();
        const picker = pageB.locator(".mx_EmojiPicker");
        await see(picker, "the emoji picker");
        await picker.getByRole("textbox").fill("thumbs up");
        await pageB.getByRole("gridcell", { name: "👍" }).first().click();
        await pageB.keyboard.press("Escape").catch(() => {});
        const rowA = tile(pageA, msgAEdited).locator(".mx_ReactionsRow");
        await see(rowA.getByRole("button").filter({ hasText: "👍" }), "B's 👍 under A's message (A's side)");
        const text = (await rowA.getByRole("button").filter({ hasText: "👍" }).first().innerText()).replace(/\s+/g, "");
        if (!text.includes("1")) throw new Error(`A's reaction button reads "${text}", expected a count of 1`);
    });

    await step("thread", "B replies in a thread, A reads the reply", ["edit"], async () => {
        const actions = await hoverActions(pageB, msgAEdited);
        await actions.getByRole("button", { name: "Reply in thread" }).click();
        await see(pageB.locator(".mx_ThreadView"), "B's thread panel");
        await send(pageB, threadReply, true);
        await seeMessage(pageB, threadReply, "B (thread panel)", ".mx_ThreadView");
        const summary = tile(pageA, msgAEdited).locator(".mx_ThreadSummary");
        await see(summary, "the thread summary under A's message");
        await summary.first().click();
        await seeMessage(pageA, threadReply, "A (thread panel)", ".mx_ThreadView");
        for (const p of [pageA, pageB]) {
            await p.locator(".mx_RightPanel").getByRole("button", { name: "Close" }).first().click().catch(() => {});
        }
    });

    await step("image", "A uploads an image, B sees it", ["join"], async () => {
        await pageA
            .locator(".mx_RoomView_body .mx_MessageComposer_actions input[type='file']")
            .setInputFiles({ name: `plan-${suffix}.png`, mimeType: "image/png", buffer: makePng(320, 200) });
        await pageA.locator(".mx_Dialog").getByRole("button", { name: "Upload" }).click();
        for (const [who, p] of [["A", pageA], ["B", pageB]]) {
            const img = tile(p, "").locator(".mx_MImageBody img").last();
            await see(img, `the image in ${who}'s timeline`, T * 2);
            const deadline = Date.now() + T;
            let size = 0;
            while (Date.now() < deadline) {
                size = await img.evaluate((i) => (i.complete ? i.naturalWidth : 0)).catch(() => 0);
                if (size > 0) break;
                await sleep(250);
            }
            if (!size) throw new Error(`${who}'s image did not load (download or decryption failed)`);
        }
    });

    await step("dm", "A starts an encrypted DM with B, both read each other", ["login-a", "login-b"], async () => {
        await pageA.getByRole("navigation", { name: "Room list" }).getByRole("button", { name: "Add" }).click();
        await pageA.getByRole("menuitem", { name: "Start chat" }).click();
        const dialog = pageA.locator(".mx_InviteDialog_other");
        await see(dialog, "the start chat dialog");
        await dialog.locator(".mx_InviteDialog_editor input").fill(bob.userId);
        const option = dialog.getByRole("option").filter({ hasText: bob.userId });
        await see(option, `${bob.userId} among the suggestions`);
        await option.first().click();
        await dialog.getByRole("button", { name: "Go" }).click();
        await dialog.waitFor({ state: "hidden" });
        await send(pageA, dmA);
        await seeMessage(pageA, dmA, "A");
        await see(pageA.locator(".mx_RoomView_body .mx_cryptoEvent").getByText("Encryption enabled"), "the DM's encryption notice");
        dmRoomId = await roomIdOf(pageA);
        log(`  DM ${dmRoomId}`);
        const invite = roomList(pageB).getByRole("option", { name: `Open room ${alice.displayName} invitation.` });
        await see(invite, "the DM invitation in B's room list");
        await invite.click();
        await pageB.locator(".mx_RoomView").getByRole("button", { name: /^(Start chatting|Accept)$/ }).click();
        await seeMessage(pageB, dmA, "B");
        await send(pageB, dmB);
        await seeMessage(pageA, dmB, "A");
    });

    await step("unread-badge", "B, elsewhere, gets an unread badge of 2 on the room", ["join"], async () => {
        // B looks at another room (the DM if there is one, else Home) while A writes twice.
        if (passed.has("dm")) await openRoom(pageB, alice.displayName);
        else await pageB.goto("/#/home");
        await openRoom(pageA, room);
        for (const text of unread) {
            await send(pageA, text);
            await seeMessage(pageA, text, "A");
        }
        const item = roomList(pageB).getByRole("option", { name: `Open room ${room} with 2 unread messages.` });
        try {
            await item.waitFor({ state: "visible", timeout: T * 2 });
        } catch {
            const label = await pageB
                .getByRole("listbox", { name: "Room list" })
                .getByRole("option", { name: new RegExp(`^Open room ${escapeRe(room)}`) })
                .first()
                .getAttribute("aria-label")
                .catch(() => null);
            throw new Error(`B's room list does not show 2 unread messages on "${room}" (its label: ${JSON.stringify(label)})`);
        }
        const badge = (await item.innerText()).replace(/\s+/g, " ");
        if (!/\b2\b/.test(badge)) throw new Error(`B's room list item reads "${badge}", expected a badge with 2`);
    });

    await step("backup", "A sets up key storage and recovery (Secure Backup)", ["message-a-to-b", "message-b-to-a"], async () => {
        await pageA.getByRole("button", { name: "User menu" }).click();
        await pageA.getByRole("menuitem", { name: "All settings", exact: true }).click();
        await pageA.locator(".mx_TabbedView_tabLabels .mx_TabbedView_tabLabel", { hasText: "Encryption" }).click();
        const tab = pageA.locator(".mx_Dialog").filter({ has: pageA.locator(".mx_UserSettingsDialog") });
        const setUp = tab.getByRole("button", { name: "Set up recovery" });
        await tab.getByText(/Set up recovery|Device not verified|Change recovery key/).first().waitFor({ timeout: T }).catch(() => {});
        if (await tab.getByText("Device not verified").isVisible()) {
            throw new Error(`Settings > Encryption says "Device not verified" instead of offering "Set up recovery"${await crossSigningHint()}`);
        }
        await see(setUp, 'the "Set up recovery" button in Settings > Encryption');
        const storage = tab.getByRole("switch", { name: "Allow key storage" });
        if ((await storage.count()) && !(await storage.isChecked())) await storage.click();
        await setUp.click();
        await tab.getByRole("button", { name: "Continue" }).click();
        await see(tab.locator(".mx_KeyPanel_key"), "the new recovery key");
        recoveryKey = (await tab.locator(".mx_KeyPanel_key").innerText()).trim();
        fs.writeFileSync(path.join(opts.out, "recovery-key-A.txt"), recoveryKey + "\n");
        await tab.getByRole("button", { name: "Continue" }).click();
        await tab.getByRole("textbox").fill(recoveryKey);
        await tab.getByRole("button", { name: "Finish set up" }).click();
        await see(tab.getByRole("button", { name: "Change recovery key" }), "recovery set up (Change recovery key)", T * 2);
        await screenshots("backup-settings");
        await pageA.getByRole("button", { name: "Close dialog", exact: true }).click();
        // Wait until the server-side backup holds the room keys of both conversations (A's and B's sessions).
        const rooms = [roomId, dmRoomId].filter(Boolean);
        const deadline = Date.now() + T * 3;
        let state;
        while (Date.now() < deadline) {
            state = await backupState(pageA);
            if (state.version && state.active === state.version && rooms.every((r) => (state.rooms[r] || 0) >= 2)) break;
            await sleep(1000);
        }
        log(`  backup: ${JSON.stringify(state)}`);
        if (!state?.version) throw new Error("no key backup version on the server");
        if (state.active !== state.version) throw new Error(`A's client does not back up to the server's version (${JSON.stringify(state)})`);
        const short = rooms.filter((r) => (state.rooms[r] || 0) < 2);
        if (short.length) throw new Error(`the backup lacks room keys for ${short.join(", ")}: ${JSON.stringify(state.rooms)}`);
    });

    await step("restore", "a new login of A restores the history from the backup", ["backup"], async () => {
        // Close A's first session (without logging out) so that it cannot share keys with the new one.
        await agents.A.context.close();
        agents.A.page = null;
        const page = await newAgent(browser, "A2", alice, elementUrl);
        await login(page, alice);
        const useKey = page.locator(".mx_AuthPage").getByRole("button", { name: "Use recovery key" });
        await see(useKey, 'the "Confirm your identity" screen with "Use recovery key"', 90000);
        await useKey.click();
        const dialogKey = page.locator(".mx_Dialog").getByRole("button", { name: "Use recovery key" });
        if (await dialogKey.isVisible().catch(() => false)) await dialogKey.click();
        await page.locator(".mx_Dialog").getByTitle("Recovery key").fill(recoveryKey);
        await page.getByRole("button", { name: "Continue", disabled: false }).click();
        await page.getByRole("button", { name: "Done" }).click();
        await waitForRoomList(page);
        await openRoom(page, room);
        await seeMessage(page, msgAEdited, "A's new session");
        await seeMessage(page, msgB, "A's new session");
        await screenshots("restore-room");
        if (passed.has("dm")) {
            await openRoom(page, bob.displayName);
            await seeMessage(page, dmA, "A's new session (DM)");
            await seeMessage(page, dmB, "A's new session (DM)");
        }
        // A's first session is closed: the keys can only have come from the server-side backup.
        if (!backupDownloads.A2) throw new Error("A's new session decrypted the history without downloading the key backup?");
        log(`  A2 downloaded room keys from the backup ${backupDownloads.A2} time(s)`);
    });
}

async function finish(code) {
    for (const c of cleanups.splice(0)) {
        try {
            await c();
        } catch (e) {
            log(`cleanup: ${e.message}`);
        }
    }
    const lines = ["| step | result | detail |", "|---|---|---|"];
    for (const r of results) {
        const mark = r.status === "pass" ? "✅ pass" : r.status === "fail" ? "❌ fail" : "⏭ skipped";
        lines.push(`| ${r.id} — ${r.title || ""} | ${mark} | ${(r.detail || "").replace(/\|/g, "\\|")} |`);
    }
    fs.writeFileSync(path.join(opts.out, "results.md"), lines.join("\n") + "\n");
    fs.writeFileSync(path.join(opts.out, "results.json"), JSON.stringify({ results, httpErrors }, null, 2));
    fs.writeFileSync(
        path.join(opts.out, "http-errors.log"),
        httpErrors.map((e) => `${e}${expectedError(e) ? `   [expected: ${expectedError(e)}]` : ""}`).join("\n") + "\n",
    );
    const count = (s) => results.filter((r) => r.status === s).length;
    log("");
    for (const l of lines) log(l);
    log(`${count("pass")} passed, ${count("fail")} failed, ${count("skipped")} skipped`);
    if (httpErrors.length) {
        const unexpected = httpErrors.filter((e) => !expectedError(e));
        log(`${httpErrors.length} homeserver error answers seen by Element (http-errors.log), ${unexpected.length} unexpected`);
        for (const e of [...new Set(unexpected)]) log(`  unexpected: ${e}`);
    }
    log(`screenshots and logs: ${opts.out}`);
    logFile.end();
    process.exit(code);
}

process.on("SIGINT", () => finish(130));

try {
    await main();
    await finish(results.some((r) => r.status !== "pass") ? 1 : 0);
} catch (e) {
    if (!(e instanceof StopRun)) {
        log(`error: ${e.stack || e.message}`);
        await screenshots("error");
    }
    await finish(1);
}
