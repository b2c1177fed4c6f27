// Parvis driven by matrix-js-sdk, Element Web's engine, with its Rust crypto (in-memory stores).
//
//   PARVIS_PASSWORD=... node e2ee.mjs <homeserver-url> <localpart-a> <localpart-b>
//
// Both users must exist with that password (tests/integration/js_sdk.rs creates them). The script
// logs them in, then:
//   1. A sets up cross-signing, secret storage and a key backup (what Element's "set up secure
//      backup" does);
//   2. A creates a private encrypted room and invites B, B joins, messages both ways are decrypted
//      by the other side, and the server only stored `m.room.encrypted`;
//   3. the same in a DM (`is_direct`, `m.direct` account data on both sides);
//   4. A's room keys reach the server-side backup;
//   5. A logs in again (new device, empty crypto store), cannot decrypt the history, unlocks secret
//      storage with the recovery key (cross-signing its new device), restores the backup and then
//      decrypts every earlier message;
//   6. the clients sync with lazy-loaded members as Element does, so sending into an encrypted
//      room loaded the member list with `GET /rooms/{id}/members?not_membership=leave&at=<token>`:
//      at least one such request was made and answered 200.
// Progress goes to stdout; any failure prints a message to stderr and exits non-zero.
// PARVIS_JS_SDK_LOG=debug shows the SDK's own logs (stderr), PARVIS_JS_REQUESTS=1 lists every
// request made.

import * as sdk from "matrix-js-sdk";
import { decodeRecoveryKey } from "matrix-js-sdk/lib/crypto-api/recovery-key.js";

const OVERALL_TIMEOUT_MS = Number(process.env.PARVIS_JS_TIMEOUT_MS ?? 240_000);
const STEP_TIMEOUT_MS = 30_000;

const [baseUrl, localpartA, localpartB] = process.argv.slice(2);
const password = process.env.PARVIS_PASSWORD;
if (!baseUrl || !localpartA || !localpartB || !password) {
    process.stderr.write("usage: PARVIS_PASSWORD=... node e2ee.mjs <homeserver-url> <localpart-a> <localpart-b>\n");
    process.exit(64);
}

// The SDK logs through `console`, a lot. Its output goes to stderr, warnings and errors only
// unless PARVIS_JS_SDK_LOG names a lower level (trace, debug, info); stdout is the script's own
// progress.
const out = (line) => process.stdout.write(`${line}\n`);
const errOut = (line) => process.stderr.write(`${line}\n`);
const SDK_LEVELS = { trace: 0, debug: 1, log: 2, info: 2, warn: 3, error: 4 };
const sdkThreshold = SDK_LEVELS[process.env.PARVIS_JS_SDK_LOG ?? "warn"] ?? SDK_LEVELS.warn;
const consoleError = console.error.bind(console);
for (const [method, level] of Object.entries(SDK_LEVELS)) {
    console[method] = (...args) => {
        if (level >= sdkThreshold) consoleError(`[sdk ${method}]`, ...args);
    };
}

const started = Date.now();
const elapsed = () => `${((Date.now() - started) / 1000).toFixed(1)}s`;
let lastStep = "start";
const step = (msg) => {
    lastStep = msg;
    out(`[${elapsed()}] ${msg}`);
};

const clients = [];
let finished = false;

function fail(msg, err) {
    if (finished) return;
    finished = true;
    errOut(`FAILED after ${elapsed()} (last step done: ${lastStep}): ${msg}`);
    if (err) errOut(String(err?.stack ?? err));
    dumpUnexpectedResponses();
    for (const c of clients) c.stopClient();
    process.exit(1);
}

const overall = setTimeout(() => fail(`overall timeout of ${OVERALL_TIMEOUT_MS} ms`), OVERALL_TIMEOUT_MS);
process.on("unhandledRejection", (err) => fail("unhandled promise rejection", err));
process.on("uncaughtException", (err) => fail("uncaught exception", err));

function assert(cond, msg) {
    if (!cond) throw new Error(`assertion failed: ${msg}`);
}

/** Polls `probe` until it returns a truthy value; throws with `what` after `timeoutMs`. */
async function waitFor(what, probe, timeoutMs = STEP_TIMEOUT_MS) {
    const deadline = Date.now() + timeoutMs;
    let lastErr;
    for (;;) {
        try {
            const v = await probe();
            if (v) return v;
        } catch (e) {
            lastErr = e;
        }
        if (Date.now() > deadline) {
            throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${lastErr ? `: ${lastErr.stack ?? lastErr}` : ""}`);
        }
        await new Promise((r) => setTimeout(r, 100));
    }
}

// ---- HTTP: every request the SDK makes is recorded (method, path and query, status). ----

/** @type {{ client: string, method: string, url: URL, status: number, body?: string }[]} */
const requests = [];

function recordingFetch(label) {
    return async (input, init) => {
        const url = new URL(typeof input === "string" || input instanceof URL ? input : input.url);
        const method = (init?.method ?? (typeof input === "object" && input.method) ?? "GET").toUpperCase();
        const entry = { client: label, method, url, status: 0 };
        if (/\/user\/[^/]+\/filter$/.test(url.pathname) && typeof init?.body === "string") entry.body = init.body;
        requests.push(entry);
        try {
            const resp = await fetch(input, init);
            entry.status = resp.status;
            return resp;
        } catch (e) {
            entry.status = -1;
            throw e;
        }
    };
}

/** Lists the responses that were not 2xx (401s are UIA challenges, 404s probes). */
function dumpUnexpectedResponses(print = errOut) {
    const odd = requests.filter((r) => r.status !== 0 && (r.status < 200 || r.status >= 300));
    if (odd.length === 0) return;
    print("non-2xx responses seen:");
    for (const r of odd) print(`  ${r.client} ${r.method} ${r.url.pathname}${r.url.search} -> ${r.status}`);
}

/** A plain HTTP call, outside the SDK: the server's own view. */
async function api(token, method, path, body) {
    const resp = await fetch(`${baseUrl}/_matrix/client/v3${path}`, {
        method,
        headers: { Authorization: `Bearer ${token}`, ...(body ? { "Content-Type": "application/json" } : {}) },
        body: body ? JSON.stringify(body) : undefined,
    });
    const text = await resp.text();
    if (!resp.ok) throw new Error(`${method} ${path} -> ${resp.status} ${text}`);
    return JSON.parse(text);
}

// ---- Clients ----

async function login(localpart, deviceName) {
    const anon = sdk.createClient({ baseUrl, fetchFn: recordingFetch(`${localpart}(login)`) });
    const res = await anon.loginRequest({
        type: "m.login.password",
        identifier: { type: "m.id.user", user: localpart },
        password,
        initial_device_display_name: deviceName,
    });
    return { userId: res.user_id, deviceId: res.device_id, accessToken: res.access_token };
}

/**
 * A started client as Element Web starts it: Rust crypto in memory, lazy-loaded members,
 * threads, detached pending events. `secretStorageKey` answers the SDK's requests for the
 * secret storage key (Element asks the user for the recovery key there).
 */
async function startClient(label, session, secretStorageKey) {
    const client = sdk.createClient({
        baseUrl,
        ...session,
        store: new sdk.MemoryStore(),
        fetchFn: recordingFetch(label),
        cryptoCallbacks: {
            getSecretStorageKey: async ({ keys }) => {
                const k = secretStorageKey.current;
                if (!k) throw new Error(`${label}: secret storage key asked for before it is known`);
                // A has one secret storage key: it is the one asked for.
                return [Object.keys(keys)[0], k];
            },
        },
    });
    clients.push(client);
    await client.initRustCrypto({ useIndexedDB: false });
    const prepared = new Promise((resolve, reject) => {
        client.on(sdk.ClientEvent.Sync, (state, _prev, data) => {
            if (state === sdk.SyncState.Prepared) resolve();
            if (state === sdk.SyncState.Error) reject(new Error(`${label}: sync error: ${data?.error?.stack ?? data?.error}`));
        });
    });
    await client.startClient({
        lazyLoadMembers: true,
        initialSyncLimit: 20,
        threadSupport: true,
        pendingEventOrdering: sdk.PendingEventOrdering.Detached,
    });
    await prepared;
    step(`${label} (${session.userId} / ${session.deviceId}) synced`);
    return client;
}

/** Element's UIA answer for device signing key upload: password, retried with the session. */
function passwordUia(userId) {
    return async (makeRequest) => {
        try {
            await makeRequest(null);
        } catch (e) {
            if (!e?.data?.flows) throw e;
            await makeRequest({
                type: "m.login.password",
                identifier: { type: "m.id.user", user: userId },
                password,
                session: e.data.session,
            });
        }
    };
}

function event(client, roomId, eventId) {
    return client.getRoom(roomId)?.findEventById(eventId);
}

/** Waits until `client` has `eventId` decrypted with the given body. */
async function waitDecrypted(label, client, roomId, eventId, body) {
    await waitFor(`${label} to decrypt ${eventId}`, async () => {
        const ev = event(client, roomId, eventId);
        if (!ev) return false;
        await client.decryptEventIfNeeded(ev);
        if (ev.isDecryptionFailure()) return false;
        return ev.getType() === "m.room.message";
    });
    const ev = event(client, roomId, eventId);
    assert(ev.getWireType() === "m.room.encrypted", `${eventId} came in encrypted (wire type ${ev.getWireType()})`);
    assert(ev.getContent().body === body, `${label} decrypted "${ev.getContent().body}", expected "${body}"`);
    step(`${label} decrypted "${body}"`);
}

async function send(label, client, roomId, body) {
    const { event_id } = await client.sendMessage(roomId, { msgtype: "m.text", body });
    step(`${label} sent "${body}" (${event_id})`);
    return event_id;
}

/** The server stored ciphertext only: `/messages` shows each event as `m.room.encrypted`. */
async function assertStoredEncrypted(token, roomId, sent) {
    const res = await api(token, "GET", `/rooms/${encodeURIComponent(roomId)}/messages?dir=b&limit=100`);
    for (const { eventId, body } of sent) {
        const ev = res.chunk.find((e) => e.event_id === eventId);
        assert(ev, `/messages returns ${eventId}`);
        assert(ev.type === "m.room.encrypted", `${eventId} is stored as m.room.encrypted, not ${ev.type}`);
        assert(ev.content.algorithm === "m.megolm.v1.aes-sha2", `${eventId} is megolm: ${JSON.stringify(ev.content)}`);
        assert(!JSON.stringify(ev).includes(body), `the server's copy of ${eventId} does not contain the plaintext`);
    }
    assert(!res.chunk.some((e) => e.type === "m.room.message"), "no plaintext m.room.message in the room");
}

async function waitMembership(label, client, roomId, userId, membership) {
    await waitFor(`${label} to see ${userId} ${membership} in ${roomId}`, () =>
        client.getRoom(roomId)?.getMember(userId)?.membership === membership,
    );
}

// ---- The scenario ----

async function main() {
    const sessionA1 = await login(localpartA, "Element Web (A, first device)");
    const sessionB = await login(localpartB, "Element Web (B)");
    const A = sessionA1.userId;
    const B = sessionB.userId;
    const keyA = { current: null };
    const a1 = await startClient("A1", sessionA1, keyA);
    const b = await startClient("B", sessionB, { current: null });
    const cryptoA1 = a1.getCrypto();

    // 1. Secure backup, as Element sets it up: cross-signing, then secret storage with a new
    // recovery key and a new key backup.
    await cryptoA1.bootstrapCrossSigning({ authUploadDeviceSigningKeys: passwordUia(A) });
    let recoveryKey;
    await cryptoA1.bootstrapSecretStorage({
        setupNewSecretStorage: true,
        setupNewKeyBackup: true,
        createSecretStorageKey: async () => {
            recoveryKey = await cryptoA1.createRecoveryKeyFromPassphrase();
            keyA.current = recoveryKey.privateKey;
            return recoveryKey;
        },
    });
    assert(recoveryKey?.encodedPrivateKey, "a recovery key was generated");
    assert(await cryptoA1.isCrossSigningReady(), "A1: cross-signing is ready");
    assert(await cryptoA1.isSecretStorageReady(), "A1: secret storage is ready");
    const backupVersion = await cryptoA1.getActiveSessionBackupVersion();
    assert(backupVersion, "A1: a key backup is active");
    const serverBackup = await api(sessionA1.accessToken, "GET", "/room_keys/version");
    assert(serverBackup.version === backupVersion, `the server's latest backup is ${backupVersion}: ${JSON.stringify(serverBackup)}`);
    step(`A1 set up cross-signing, secret storage and key backup version ${backupVersion}`);

    // 2. A private encrypted room: A creates it, invites B, B joins.
    const encryption = { type: "m.room.encryption", state_key: "", content: { algorithm: "m.megolm.v1.aes-sha2" } };
    const { room_id: roomId } = await a1.createRoom({
        name: "Astreinte chiffrée",
        preset: sdk.Preset.PrivateChat,
        initial_state: [encryption],
    });
    step(`A1 created encrypted room ${roomId}`);
    await a1.invite(roomId, B);
    await waitFor("B to receive the invite", () => b.getRoom(roomId)?.getMyMembership() === "invite");
    await b.joinRoom(roomId);
    await waitMembership("A1", a1, roomId, B, "join");
    await waitFor("B to see the room as encrypted", () => b.getCrypto().isEncryptionEnabledInRoom(roomId));
    step("B joined the room");

    const roomSent = [];
    const m1 = { eventId: await send("A1", a1, roomId, "Code du portail : 4721"), body: "Code du portail : 4721" };
    roomSent.push(m1);
    await waitDecrypted("B", b, roomId, m1.eventId, m1.body);
    const m2 = { eventId: await send("B", b, roomId, "Bien reçu, merci"), body: "Bien reçu, merci" };
    roomSent.push(m2);
    await waitDecrypted("A1", a1, roomId, m2.eventId, m2.body);
    await assertStoredEncrypted(sessionA1.accessToken, roomId, roomSent);
    step("the server stored only m.room.encrypted in the room");

    // 3. A DM, created as Element creates one, then marked in `m.direct` by both sides.
    const { room_id: dmId } = await a1.createRoom({
        preset: sdk.Preset.TrustedPrivateChat,
        visibility: sdk.Visibility.Private,
        is_direct: true,
        invite: [B],
        initial_state: [encryption],
    });
    await a1.setAccountData(sdk.EventType.Direct, { [B]: [dmId] });
    step(`A1 created DM ${dmId}`);
    await waitFor("B to receive the DM invite", () => b.getRoom(dmId)?.getMyMembership() === "invite");
    const invite = b.getRoom(dmId).getMember(B)?.events.member;
    assert(invite?.getContent().is_direct === true, `B's invite is marked is_direct: ${JSON.stringify(invite?.getContent())}`);
    await b.joinRoom(dmId);
    await b.setAccountData(sdk.EventType.Direct, { [A]: [dmId] });
    await waitMembership("A1", a1, dmId, B, "join");
    const directA = await api(sessionA1.accessToken, "GET", `/user/${encodeURIComponent(A)}/account_data/m.direct`);
    assert(directA[B]?.includes(dmId), `A's m.direct names the DM: ${JSON.stringify(directA)}`);
    const directB = await api(sessionB.accessToken, "GET", `/user/${encodeURIComponent(B)}/account_data/m.direct`);
    assert(directB[A]?.includes(dmId), `B's m.direct names the DM: ${JSON.stringify(directB)}`);
    await waitFor("A1 to sync its m.direct", () => a1.getAccountData(sdk.EventType.Direct)?.getContent()[B]?.includes(dmId));
    step("B joined the DM; m.direct set on both sides");

    const dmSent = [];
    const d1 = { eventId: await send("B", b, dmId, "Tu es d'astreinte ce week-end ?"), body: "Tu es d'astreinte ce week-end ?" };
    dmSent.push(d1);
    await waitDecrypted("A1", a1, dmId, d1.eventId, d1.body);
    const d2 = { eventId: await send("A1", a1, dmId, "Oui, samedi et dimanche"), body: "Oui, samedi et dimanche" };
    dmSent.push(d2);
    await waitDecrypted("B", b, dmId, d2.eventId, d2.body);
    await assertStoredEncrypted(sessionB.accessToken, dmId, dmSent);
    step("the server stored only m.room.encrypted in the DM");

    // 4. A's room keys reach the backup: its own two outbound sessions and B's two.
    const sessionsOf = (backup, room) => Object.keys(backup.rooms?.[room]?.sessions ?? {}).length;
    await waitFor("A1's four room keys in the server-side backup", async () => {
        const keys = await api(sessionA1.accessToken, "GET", `/room_keys/keys?version=${backupVersion}`);
        return sessionsOf(keys, roomId) >= 2 && sessionsOf(keys, dmId) >= 2;
    }, 60_000); // the SDK waits up to 10 s before an upload
    const info = await api(sessionA1.accessToken, "GET", `/room_keys/version/${backupVersion}`);
    step(`the backup holds ${info.count} room keys (etag ${info.etag})`);

    // 5. A new login of A: a fresh device with an empty crypto store.
    const sessionA2 = await login(localpartA, "Element Web (A, new device)");
    const keyA2 = { current: null };
    const a2 = await startClient("A2", sessionA2, keyA2);
    const cryptoA2 = a2.getCrypto();
    const history = [...roomSent.map((m) => [roomId, m]), ...dmSent.map((m) => [dmId, m])];
    for (const [room, m] of history) {
        const ev = await waitFor(`A2 to have ${m.eventId} in its timeline`, () => event(a2, room, m.eventId));
        await a2.decryptEventIfNeeded(ev);
        assert(ev.isDecryptionFailure(), `A2 cannot decrypt ${m.eventId} before restoring the backup`);
    }
    step("A2 sees the history but cannot decrypt it");

    // Element, after a login, asks whether the account has cross-signing keys (downloading them):
    // here they do, so it offers "Verify with recovery key". The user types the recovery key; the
    // SDK reads the cross-signing keys from secret storage and signs the new device.
    assert(await cryptoA2.userHasCrossSigningKeys(A, true), "A2: the account has cross-signing keys");
    const typed = recoveryKey.encodedPrivateKey;
    keyA2.current = decodeRecoveryKey(typed);
    await cryptoA2.bootstrapCrossSigning({ authUploadDeviceSigningKeys: passwordUia(A) });
    assert(await cryptoA2.isCrossSigningReady(), "A2: cross-signing is ready after unlocking secret storage");
    // The signature reaches A2's own view of its device through the device-list stream (sync,
    // then /keys/query), A1's the same way.
    await waitFor("A2 to see itself cross-signed by A's self-signing key", async () =>
        (await cryptoA2.getDeviceVerificationStatus(A, sessionA2.deviceId))?.crossSigningVerified,
    );
    await waitFor("A1 to see A2 as verified", async () =>
        (await cryptoA1.getDeviceVerificationStatus(A, sessionA2.deviceId))?.crossSigningVerified,
    );
    step("A2 verified itself with the recovery key; A1 sees it verified");

    // Restore from the backup, as Element's RestoreKeyBackupDialog does.
    await cryptoA2.loadSessionBackupPrivateKeyFromSecretStorage();
    const check = await cryptoA2.checkKeyBackupAndEnable();
    assert(check?.backupInfo?.version === backupVersion, `A2 found backup version ${backupVersion}`);
    assert(check.trustInfo.trusted, "A2 trusts the backup");
    const restored = await cryptoA2.restoreKeyBackup();
    step(`A2 restored ${restored.imported} of ${restored.total} room keys from the backup`);
    assert(restored.imported >= 4, `at least 4 room keys imported, got ${JSON.stringify(restored)}`);
    for (const [room, m] of history) await waitDecrypted("A2", a2, room, m.eventId, m.body);

    // A2 can take part too: its message is decrypted by B (A2 loads the members itself).
    const a2m = { eventId: await send("A2", a2, roomId, "Message du nouvel appareil"), body: "Message du nouvel appareil" };
    await waitDecrypted("B", b, roomId, a2m.eventId, a2m.body);

    // 6. Element's lazy member loading was exercised and answered.
    const membersAt = requests.filter(
        (r) => /\/rooms\/[^/]+\/members$/.test(r.url.pathname) && r.url.searchParams.has("at"),
    );
    for (const r of membersAt) step(`seen: ${r.client} ${r.method} ${r.url.pathname}${r.url.search} -> ${r.status}`);
    assert(membersAt.length > 0, "at least one GET /rooms/{id}/members?at=... request was made");
    const bad = membersAt.filter((r) => r.status !== 200);
    assert(bad.length === 0, `every members?at= request answered 200, not: ${bad.map((r) => r.status).join(", ")}`);
    assert(
        membersAt.every((r) => r.url.searchParams.get("not_membership") === "leave"),
        "the SDK asked for members with not_membership=leave",
    );
    // The sync filters the clients uploaded ask for lazy-loaded members, and were accepted.
    const filters = requests.filter((r) => r.body !== undefined && r.method === "POST");
    assert(filters.length >= 3, `each client uploaded a sync filter (${filters.length})`);
    for (const f of filters) {
        assert(f.status === 200, `filter upload answered ${f.status}`);
        const lazy = JSON.parse(f.body).room?.state?.lazy_load_members;
        assert(lazy === true, `the sync filter has room.state.lazy_load_members: ${f.body}`);
    }
    step(`${requests.length} requests, ${membersAt.length} members?at= requests, all answered 200`);
}

try {
    await main();
} catch (e) {
    fail(e?.message ?? String(e), e);
}
if (!finished) {
    finished = true;
    clearTimeout(overall);
    for (const c of clients) c.stopClient();
    if (process.env.PARVIS_JS_REQUESTS) {
        for (const r of requests) out(`  ${r.client} ${r.method} ${r.url.pathname}${r.url.search} -> ${r.status}`);
    }
    dumpUnexpectedResponses(out);
    out(`PASSED in ${elapsed()}`);
    process.exit(0);
}
