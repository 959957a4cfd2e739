// The demo chat page: logs in through the TypeScript SDK (imd-sdk.js, the
// browser bundle of sdk-ts) over the gateway's WebSocket (or long-poll
// where WebSocket cannot connect), lists the
// one-to-one conversations found in the roaming history and in what
// arrives, and chats. Every message is kept once, by msgid, and each
// conversation is shown in msgid order, which keeps each sender's order.
import * as imd from "./imd-sdk.js";

const $ = (id) => document.getElementById(id);
const enc = new TextEncoder();
const dec = new TextDecoder();

// state holds everything the page shows; render() draws it.
const state = {
  client: null,
  me: null, // { appcode, account, uid } once logged in
  convs: new Map(), // "account:uid" -> { peer, msgs: Map(msgid string -> msg), unread }
  receipts: new Set(), // msgids (strings) a terminal of the recipient acknowledged
  current: null, // key of the open conversation
  pending: new Map(), // local id -> { key, text, failed }
  nextLocal: 1,
};

const keyOf = (peer) => `${peer.account}:${peer.uid}`;
const big = (v) => (typeof v === "bigint" ? v : BigInt(v ?? 0));

// ---- login ----

async function init() {
  const saved = JSON.parse(localStorage.getItem("imd-demo-login") || "{}");
  if (saved.appcode) $("appcode").value = saved.appcode;
  if (saved.uid) $("uid").value = saved.uid;
  try {
    const cfg = await (await fetch("config.json")).json();
    $("mint").hidden = !cfg.mint;
    $("mint-help").hidden = !cfg.mint;
  } catch {
    // Without config.json the page still logs in with a pasted token.
  }
  $("mint").addEventListener("click", mintToken);
  $("login").addEventListener("submit", (e) => {
    e.preventDefault();
    login().catch((err) => showError("login-error", err));
  });
  $("logout").addEventListener("click", logout);
  $("new-conv").addEventListener("submit", (e) => {
    e.preventDefault();
    const uid = $("peer-uid").value.trim();
    const account = $("peer-account").value.trim() || String(state.me.account);
    if (!/^\d+$/.test(uid) || !/^\d+$/.test(account)) return;
    openConv(conv({ account: Number(account), uid: BigInt(uid) }).key);
    $("peer-uid").value = "";
    $("text").focus();
  });
  $("compose").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("text").value;
    if (!text || !state.current) return;
    $("text").value = "";
    send(state.current, text);
  });
}

async function mintToken() {
  showError("login-error", "");
  const q = new URLSearchParams({ appcode: $("appcode").value.trim(), uid: $("uid").value.trim() });
  const resp = await fetch(`token?${q}`);
  if (!resp.ok) {
    showError("login-error", `mint: ${(await resp.text()).trim()}`);
    return;
  }
  $("token").value = (await resp.json()).token;
}

async function login() {
  showError("login-error", "");
  const appcode = Number($("appcode").value.trim());
  const uid = BigInt($("uid").value.trim());
  const token = $("token").value.trim();
  setState("connecting");
  // Notifies can come before login() returns (the offline inbox is pulled
  // as soon as the server answers): they wait here until the page knows
  // who it is.
  const early = [];
  // ?transport=websocket or ?transport=longpoll keeps the page on one;
  // by default the SDK tries WebSocket, then long-poll.
  const only = new URLSearchParams(location.search).get("transport");
  const client = new imd.Client({
    urls: [location.origin],
    transports: only ? [only] : undefined,
    platform: "web",
    onC2C: (m) => (state.me ? received(m) : early.push(m)),
    onReceipt: (r) => {
      state.receipts.add(String(r.msgid));
      render();
    },
    onKickout: () => showError("chat-error", "Logged in elsewhere: this page is offline."),
    onState: (s, err) => {
      setState(s, client.onlineLink()?.endpoint.kind);
      if (s === "closed" && err && state.me) showError("chat-error", err);
    },
  });
  let resp;
  try {
    resp = await client.login({ appcode, uid, token });
  } catch (err) {
    await client.close();
    setState("offline");
    throw err;
  }
  state.client = client;
  state.me = { appcode, uid, account: resp.account };
  localStorage.setItem("imd-demo-login", JSON.stringify({ appcode, uid: String(uid) }));
  $("me").textContent = `uid ${uid} · appcode ${appcode} · account ${resp.account}`;
  $("login").hidden = true;
  $("chat").hidden = false;
  $("logout").hidden = false;
  setState(client.getState(), client.onlineLink()?.endpoint.kind);
  for (const m of early.splice(0)) store(m, true);
  await loadHistory();
}

async function logout() {
  await state.client?.logout().catch(() => {});
  location.reload();
}

// loadHistory pulls both sides of every past conversation, oldest first.
async function loadHistory() {
  let since = 0n;
  for (;;) {
    const page = await state.client.syncHistory(null, since, 200);
    for (const m of page.messages) {
      store(m, false);
      if (big(m.msgid) > since) since = big(m.msgid);
    }
    if (!page.more || page.messages.length === 0) break;
  }
  render();
}

// ---- messages ----

function conv(peer) {
  const key = keyOf(peer);
  let c = state.convs.get(key);
  if (!c) {
    c = { key, peer, msgs: new Map(), unread: 0 };
    state.convs.set(key, c);
  }
  return c;
}

// store keeps m in its conversation once, whoever sent it. Group
// messages are not this page's.
function store(m, live) {
  if (big(m.groupId) !== 0n) return false;
  const mine = big(m.from?.uid) === state.me.uid && (m.from?.account ?? 0) === state.me.account;
  const peer = mine ? m.to : m.from;
  const c = conv({ account: peer.account, uid: big(peer.uid) });
  const id = String(m.msgid);
  if (c.msgs.has(id)) return false;
  c.msgs.set(id, { msgid: big(m.msgid), mine, text: dec.decode(m.content), at: Number(m.sentAtMs ?? 0) });
  if (live && !mine && c.key !== state.current) c.unread++;
  return true;
}

function received(m) {
  if (state.me && store(m, true)) render();
}

async function send(key, text) {
  const c = state.convs.get(key);
  const local = state.nextLocal++;
  state.pending.set(local, { key, text, failed: false });
  render();
  try {
    const resp = await state.client.sendC2C(c.peer, 0, enc.encode(text));
    state.pending.delete(local);
    const id = String(resp.msgid);
    if (!c.msgs.has(id)) c.msgs.set(id, { msgid: big(resp.msgid), mine: true, text, at: Number(resp.storedAtMs ?? Date.now()) });
  } catch (err) {
    state.pending.get(local).failed = true;
    showError("chat-error", err);
  }
  render();
}

// ---- drawing ----

function openConv(key) {
  state.current = key;
  state.convs.get(key).unread = 0;
  showError("chat-error", "");
  render();
}

function sorted(c) {
  return [...c.msgs.values()].sort((a, b) => (a.msgid < b.msgid ? -1 : a.msgid > b.msgid ? 1 : 0));
}

function render() {
  const list = $("convs");
  const convs = [...state.convs.values()].sort((a, b) => newest(b) - newest(a));
  list.replaceChildren(
    ...convs.map((c) => {
      const li = el("li", "conv");
      li.dataset.peer = c.key;
      li.setAttribute("aria-current", String(c.key === state.current));
      const last = sorted(c).at(-1);
      if (c.unread) li.append(el("span", "unread", String(c.unread)));
      li.append(el("div", "name", `uid ${c.peer.uid}` + (c.peer.account === state.me.account ? "" : ` (account ${c.peer.account})`)));
      li.append(el("div", "last", last ? (last.mine ? "you: " : "") + last.text : "no messages yet"));
      li.addEventListener("click", () => openConv(c.key));
      return li;
    }),
  );
  const c = state.current && state.convs.get(state.current);
  $("compose").hidden = !c;
  if (!c) return;
  $("peer-title").textContent = `Chat with uid ${c.peer.uid}`;
  const box = $("messages");
  const atBottom = box.scrollTop + box.clientHeight >= box.scrollHeight - 4;
  const items = sorted(c).map((m) => {
    const li = el("li", m.mine ? "msg mine" : "msg");
    li.dataset.msgid = String(m.msgid);
    li.append(el("span", "text", m.text));
    if (m.at) li.append(el("span", "meta", new Date(m.at).toLocaleTimeString()));
    if (m.mine && state.receipts.has(String(m.msgid))) {
      const tick = el("span", "tick", "✓");
      tick.title = "delivered";
      li.append(tick);
      li.dataset.delivered = "true";
    }
    return li;
  });
  for (const [, p] of state.pending) {
    if (p.key !== c.key) continue;
    const li = el("li", p.failed ? "msg mine failed" : "msg mine pending");
    li.append(el("span", "text", p.text));
    li.append(el("span", "meta", p.failed ? "not sent" : "sending…"));
    items.push(li);
  }
  box.replaceChildren(...items);
  if (atBottom) box.scrollTop = box.scrollHeight;
}

function newest(c) {
  let n = 0n;
  for (const id of c.msgs.keys()) if (BigInt(id) > n) n = BigInt(id);
  return Number(n >> 22n); // the msgid's time part orders conversations well enough
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function setState(s, transport) {
  $("state").dataset.state = s;
  $("state").dataset.transport = s === "online" ? (transport ?? "") : "";
  $("state").textContent = s === "online" && transport ? `online · ${transport}` : s;
}

function showError(id, err) {
  $(id).textContent = err ? String(err.message ?? err) : "";
}

init();
