/*
 * Browser client for the chat gateway. Plain ES2020 module (strict, own scope), no
 * dependencies, no build step.
 * - Server data (text, names, URLs, details) reaches the DOM only via textContent /
 *   createElement / setAttribute; a URL is used as src/href only if it is http(s).
 * - Every send carries a client_msg_id and the server stores one message per id, so
 *   resending after a drop or a timeout can never duplicate.
 * - Messages live in a Map by id plus an id-sorted array: pushes, history pages and
 *   replies may arrive in any order, and more than once.
 */
const PAGE = 50;               // latest / older page: the server's default
const CATCHUP_PAGE = 200;      // the server's maximum: fewest round trips after a gap
const REQUEST_TIMEOUT = 10000;
const BACKOFF_MIN = 500;
const BACKOFF_MAX = 15000;
const HEALTHY_MS = 10000;      // a socket that lived this long resets the backoff
const SEND_RETRIES = 6;        // automatic resends of a send the server could not finish
const NEAR_TOP = 80;           // px: load older messages
const NEAR_BOTTOM = 120;       // px: still "following" new messages
const ID_RE = /^\d{1,19}$/;

const $ = (id) => document.getElementById(id);
const ui = {
  form: $('connect-form'), token: $('token'), chatId: $('chat-id'), disconnect: $('disconnect'),
  status: $('status'), title: $('chat-title'), banners: $('banners'), scroller: $('scroller'),
  list: $('messages'), older: $('older-status'), empty: $('empty'), jump: $('jump'),
  text: $('text'), send: $('send'), fileUrl: $('file-url'), fileType: $('file-type'),
  sendFile: $('send-file'),
};

// ---- state ----
let creds = null;        // {token, chatId} while the user wants to be connected
let ws = null;           // current socket; events of sockets we gave up on are ignored
let status = 'offline';  // connecting | online | reconnecting | offline
let attempt = 0;         // consecutive failed connects, drives the backoff
let retryTimer = 0;
let tickTimer = 0;
let openedAt = 0;
let lastFrameAt = 0;     // last frame on the current socket: proof it is alive
let synced = false;      // history caught up on the current socket
let syncTries = 0;       // refused history reads since the last successful sync
let hasOlder = true;
let loadingOlder = false;
let stick = true;        // user is at the bottom: new messages scroll into view
let unread = 0;
let ridSeq = 0;

const byId = new Map();      // id -> message as received
const elById = new Map();    // id -> <li>
let order = [];              // ids, numerically ascending
const inflight = new Map();  // request_id -> {kind, event, message, sock, sentAt, timer, pending?}
const pending = [];          // unconfirmed sends, oldest first: {cid, event, message, state, el}

// ---- helpers ----
// Ids may exceed 2^53: compare the decimal strings, not Numbers.
const cmpId = (a, b) => a.length - b.length || (a < b ? -1 : a > b ? 1 : 0);

function randomHex(bytes) {
  const a = crypto.getRandomValues(new Uint8Array(bytes));
  return Array.from(a, (b) => b.toString(16).padStart(2, '0')).join('');
}
const newRequestId = () => `r${(++ridSeq).toString(36)}-${randomHex(4)}`;
// randomUUID exists only in secure contexts; plain http on a LAN host needs ids too.
const newClientMsgId = () => (typeof crypto.randomUUID === 'function' ? crypto.randomUUID() : randomHex(16));

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text != null) node.textContent = text;
  return node;
}

/** Absolute URL if raw is http(s) or relative (resolved against this page), else null. */
function safeUrl(raw) {
  if (typeof raw !== 'string' || !raw.trim() || raw.length > 2048) return null;
  try {
    // Judge the parsed protocol, not the text ("java\tscript:" parses as javascript:),
    // and hand out exactly what was judged.
    const url = new URL(raw.trim(), location.href);
    return url.protocol === 'http:' || url.protocol === 'https:' ? url.href : null;
  } catch {
    return null;
  }
}

function link(href, cls) {
  const a = el('a', cls);
  a.setAttribute('href', href);
  a.setAttribute('target', '_blank');
  a.setAttribute('rel', 'noopener noreferrer');
  return a;
}

function fileIcon() {
  const NS = 'http://www.w3.org/2000/svg';
  const svg = document.createElementNS(NS, 'svg');
  svg.setAttribute('viewBox', '0 0 24 24');
  svg.setAttribute('class', 'file-icon');
  svg.setAttribute('aria-hidden', 'true');
  const path = document.createElementNS(NS, 'path');
  path.setAttribute('d', 'M14 3H7a2 2 0 0 0-2 2v14a2 2 0 0 0 2 2h10a2 2 0 0 0 2-2V8zM14 3v5h5M9 13h6M9 17h6');
  svg.append(path);
  return svg;
}

function fileName(href) {
  try {
    const u = new URL(href);
    const last = u.pathname.split('/').filter(Boolean).pop();
    return last ? decodeURIComponent(last) : u.host;
  } catch {
    return href;   // decodeURIComponent throws on a stray "%"
  }
}

function initialsOf(name) {
  const words = String(name || '').trim().split(/\s+/).filter(Boolean);
  if (!words.length) return '?';
  const first = (w) => Array.from(w)[0];   // Array.from keeps an emoji whole
  return (first(words[0]) + (words.length > 1 ? first(words[words.length - 1]) : '')).toUpperCase();
}

// FNV-1a: ids that differ in one character ("u1", "u2") still get far-apart colours.
function hue(key) {
  let h = 0x811c9dc5;
  for (const ch of String(key)) h = Math.imul(h ^ ch.codePointAt(0), 0x01000193);
  return (h >>> 0) % 360;
}

const fmt = (opts) => new Intl.DateTimeFormat(undefined, opts);
const timeFmt = fmt({ hour: '2-digit', minute: '2-digit' });
const dayFmt = fmt({ day: 'numeric', month: 'short' });
const yearFmt = fmt({ day: 'numeric', month: 'short', year: 'numeric' });
const fullFmt = fmt({ dateStyle: 'full', timeStyle: 'medium' });

// No day separators (every <li> in #messages is a message), so older times name the day.
function timeEl(seconds) {
  const t = el('time', 'time');
  const d = new Date(Number(seconds) * 1000);
  if (seconds == null || Number.isNaN(d.getTime())) return t;
  const now = new Date();
  let label = timeFmt.format(d);
  if (d.toDateString() !== now.toDateString()) {
    label = `${(d.getFullYear() === now.getFullYear() ? dayFmt : yearFmt).format(d)}, ${label}`;
  }
  t.textContent = label;
  t.setAttribute('datetime', d.toISOString());
  t.setAttribute('title', fullFmt.format(d));
  return t;
}

// ---- rendering ----
const URL_IN_TEXT = /\bhttps?:\/\/[^\s<>"']+/gi;

// Text becomes text nodes; only http(s) URLs inside it become anchors.
function appendText(node, text) {
  let last = 0;
  for (const match of text.matchAll(URL_IN_TEXT)) {
    const url = match[0].replace(/[.,;:!?)\]}]+$/, '');   // trailing punctuation is prose
    const href = safeUrl(url);
    if (match.index > last) node.append(text.slice(last, match.index));
    if (href) {
      const a = link(href);
      a.textContent = url;
      node.append(a);
    } else {
      node.append(url);
    }
    last = match.index + url.length;
  }
  if (last < text.length) node.append(text.slice(last));
}

function avatarEl(m) {
  const box = el('span', 'avatar');
  box.setAttribute('aria-hidden', 'true');
  const initials = () => {
    box.replaceChildren(initialsOf(m.username));
    box.classList.add('initials');
    box.style.backgroundColor = `hsl(${hue(m.user_id != null ? m.user_id : m.username)}, 55%, 46%)`;
  };
  const src = safeUrl(m.avatar);
  if (!src) return initials(), box;
  const img = el('img');
  img.alt = '';
  img.loading = 'lazy';
  img.referrerPolicy = 'no-referrer';
  img.addEventListener('error', initials, { once: true });   // missing image: initials
  img.setAttribute('src', src);
  box.append(img);
  return box;
}

function attachmentEl(m) {
  const href = safeUrl(m.file_url);
  // javascript:, data: and the like are shown, never followed.
  if (!href) return el('span', 'bad-url', m.file_url == null ? '' : String(m.file_url));
  const a = link(href, 'file');
  const asFile = () => {
    a.className = 'file';
    a.replaceChildren(fileIcon(), el('span', 'file-name', fileName(href)));
  };
  if (m.type !== 'image') return asFile(), a;
  a.className = 'media';
  const img = el('img');
  img.alt = typeof m.text === 'string' && m.text ? m.text : 'Image';
  img.loading = 'lazy';
  img.decoding = 'async';
  img.referrerPolicy = 'no-referrer';
  img.addEventListener('load', () => { if (stick) scrollToBottom(); });
  img.addEventListener('error', asFile, { once: true });
  img.setAttribute('src', href);
  a.append(img);
  return a;
}

function renderMessage(m) {
  const mine = m.is_my === true;
  const type = m.type === 'image' || m.type === 'file' ? m.type : 'text';
  const li = el('li', mine ? 'message mine' : 'message');
  if (m.id) li.dataset.id = m.id;
  li.dataset.type = type;
  if (!mine) li.append(avatarEl(m));
  const bubble = el('div', 'bubble');
  bubble.append(el('span', 'username', typeof m.username === 'string' && m.username ? m.username : 'Unknown'));
  if (type !== 'text') bubble.append(attachmentEl(m));
  const text = el('div', 'text');
  if (typeof m.text === 'string') appendText(text, m.text);
  const meta = el('div', 'meta');
  meta.append(timeEl(m.created_at));
  bubble.append(text, meta);
  li.append(bubble);
  return li;
}

const PENDING_LABEL = { queued: 'waiting for connection', sending: 'sending…', retrying: 'retrying…', failed: 'not sent' };

function renderPending(p) {
  const { type, text, file_url } = p.message;
  const li = renderMessage({ is_my: true, username: 'You', type, text, file_url, created_at: Date.now() / 1000 });
  li.classList.add('pending');
  li.dataset.cid = p.cid;
  const retry = el('button', 'mini retry', 'Retry');
  const discard = el('button', 'mini discard', 'Discard');
  retry.type = discard.type = 'button';
  retry.addEventListener('click', () => {
    p.retries = 0;
    setPendingState(p, 'queued');
    if (synced) transmit(p);
  });
  discard.addEventListener('click', () => dropPending(p));
  li.querySelector('.meta').prepend(el('span', 'state'), retry, discard);
  return li;
}

function setPendingState(p, state) {
  p.state = state;
  p.el.dataset.state = state;
  p.el.querySelector('.state').textContent = PENDING_LABEL[state];
}

function dropPending(p) {
  const i = pending.indexOf(p);
  if (i >= 0) pending.splice(i, 1);
  p.el.remove();
  updateEmpty();
}

// ---- the message list ----
const nearBottom = () => ui.scroller.scrollHeight - ui.scroller.scrollTop - ui.scroller.clientHeight < NEAR_BOTTOM;

function scrollToBottom() {
  ui.scroller.scrollTop = ui.scroller.scrollHeight;
  stick = true;
}

// Inserting above what the user reads (older pages, catch-up) must not move it:
// remember the first visible message and put it back where it was.
function captureAnchor() {
  const top = ui.scroller.getBoundingClientRect().top;
  for (const li of ui.list.children) {
    const r = li.getBoundingClientRect();
    if (r.bottom > top) return { li, offset: r.top - top };
  }
  return null;
}

function restoreAnchor(anchor) {
  if (!anchor || !anchor.li.isConnected) return;
  const now = anchor.li.getBoundingClientRect().top - ui.scroller.getBoundingClientRect().top;
  ui.scroller.scrollTop += now - anchor.offset;
}

function normalise(raw) {
  if (!raw || typeof raw !== 'object') return null;
  const id = typeof raw.id === 'number' && Number.isSafeInteger(raw.id) ? String(raw.id) : raw.id;
  if (typeof id !== 'string' || !ID_RE.test(id)) return null;
  return { ...raw, id: id.replace(/^0+(?=\d)/, '') };
}

/** A confirmed message settles the pending send with the same client_msg_id. */
function settlePending(m) {
  if (m.is_my !== true || typeof m.client_msg_id !== 'string') return;
  const p = pending.find((x) => x.cid === m.client_msg_id);
  if (p) dropPending(p);
}

function insert(m) {
  let lo = 0;
  let hi = order.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (cmpId(order[mid], m.id) < 0) lo = mid + 1; else hi = mid;
  }
  order.splice(lo, 0, m.id);
  const li = renderMessage(m);
  elById.set(m.id, li);
  // Confirmed messages in id order, always above the pending ones.
  const next = lo + 1 < order.length ? elById.get(order[lo + 1]) : ui.list.querySelector('li.pending');
  ui.list.insertBefore(li, next || null);
}

/** Add messages from any frame; how: push | history | older | reply (our own send). */
function merge(list, how) {
  const fresh = [];
  for (const raw of list) {
    const m = normalise(raw);
    if (!m || !creds || (m.chat_id != null && String(m.chat_id) !== creds.chatId)) continue;
    settlePending(m);
    if (byId.has(m.id)) continue;   // normal: pushes overlap catch-up pages
    byId.set(m.id, m);
    fresh.push(m);
  }
  if (!fresh.length) return;
  const follow = how === 'reply' || (how !== 'older' && nearBottom());
  const anchor = follow ? null : captureAnchor();
  for (const m of fresh) insert(m);
  if (follow) scrollToBottom(); else restoreAnchor(anchor);
  if (how === 'push' && (!follow || document.hidden)) unread += fresh.filter((m) => m.is_my !== true).length;
  updateUnread();
  updateEmpty();
  updateOlder();   // the first message of a chat that started empty also starts it
}

function resetChat() {
  byId.clear();
  elById.clear();
  order = [];
  pending.length = 0;
  ui.list.replaceChildren();
  hasOlder = stick = true;
  unread = 0;
  updateOlder();
  updateEmpty();
}

function updateOlder() {
  ui.older.textContent = loadingOlder ? 'Loading earlier messages…'
    : !hasOlder && order.length ? 'Start of the conversation' : '';
}

function updateEmpty() {
  ui.empty.hidden = order.length + pending.length > 0;
  ui.empty.textContent = !creds ? 'Enter a token and a chat id to start.'
    : synced ? 'No messages yet. Say hello!' : 'Loading messages…';
}

function updateUnread() {
  if (stick && !document.hidden) unread = 0;
  ui.jump.hidden = !unread || stick;
  ui.jump.textContent = `${unread} new message${unread === 1 ? '' : 's'} ↓`;
  const name = creds ? `Chat ${creds.chatId}` : 'Chat';
  document.title = unread ? `(${unread}) ${name}` : name;
}

function maybeLoadOlder() {
  if (!synced || !hasOlder || loadingOlder || !order.length || ui.scroller.scrollTop > NEAR_TOP) return;
  if (request('older', 'get_history', { before_id: order[0], limit: PAGE })) {
    loadingOlder = true;
    updateOlder();
  }
}

// ---- banners ----
function showError(detail, type) {
  const text = (typeof detail === 'string' && detail ? detail
    : typeof type === 'string' && type ? type : 'Unknown error').slice(0, 500);
  const last = ui.banners.lastElementChild;
  if (last && last.dataset.text === text) {   // a burst of one error: count, don't stack
    last.dataset.count = String(Number(last.dataset.count) + 1);
    last.querySelector('.banner-count').textContent = `×${last.dataset.count}`;
    return;
  }
  const b = el('div', 'banner');
  b.setAttribute('role', 'alert');
  b.dataset.text = text;
  b.dataset.count = '1';
  if (typeof type === 'string') b.dataset.type = type.slice(0, 40);
  const close = el('button', 'banner-close', '×');
  close.type = 'button';
  close.setAttribute('aria-label', 'Dismiss');
  close.addEventListener('click', () => b.remove());
  b.append(el('span', 'banner-text', text), el('span', 'banner-count'), close);
  ui.banners.append(b);
  while (ui.banners.children.length > 4) ui.banners.firstElementChild.remove();
}

// ---- connection ----
function setStatus(next, label) {
  status = next;
  ui.status.textContent = label || next;
  ui.status.dataset.status = next;
  document.documentElement.dataset.status = next;   // colours the header dot
  ui.disconnect.hidden = !creds;
}

function clearTimers() {
  clearTimeout(retryTimer);
  clearInterval(tickTimer);
  retryTimer = tickTimer = 0;
}

/** Forget the current socket now; its unanswered sends go back in the queue. */
function detach() {
  const sock = ws;
  ws = null;
  synced = loadingOlder = false;
  for (const req of inflight.values()) {
    clearTimeout(req.timer);
    if (req.pending && req.pending.state === 'sending') setPendingState(req.pending, 'queued');
  }
  inflight.clear();
  // A resend waiting out its pause goes with the queue: the next socket sends it.
  for (const p of pending) if (p.state === 'retrying') setPendingState(p, 'queued');
  updateOlder();
  return sock;
}

function openSocket() {
  clearTimers();
  setStatus('connecting');
  updateEmpty();
  let sock;
  try {
    sock = new WebSocket(`${location.protocol === 'https:' ? 'wss:' : 'ws:'}//${location.host}/ws`);
  } catch (e) {
    showError(`Cannot open the connection: ${e.message}`);
    return scheduleReconnect();
  }
  ws = sock;
  // Each handler checks sock === ws: a socket we gave up on may still fire events.
  sock.addEventListener('open', () => {
    if (sock !== ws) return;
    openedAt = lastFrameAt = Date.now();
    setStatus('online');
    sync();
  });
  sock.addEventListener('message', (ev) => {
    if (sock !== ws) return;
    lastFrameAt = Date.now();
    onFrame(ev.data);
  });
  sock.addEventListener('close', (ev) => { if (sock === ws) onClose(ev); });
}

function onClose(ev) {
  const lived = openedAt && Date.now() - openedAt >= HEALTHY_MS;
  openedAt = 0;
  detach();
  if (!creds) return setStatus('offline');
  if (ev.code === 1008 || ev.code === 1009) {
    showError(`Connection closed by the server (${ev.code}${ev.reason ? `: ${ev.reason}` : ''}).`, 'closed');
  }
  // 1001 is a planned restart, and a long-lived socket that drops is a fresh failure:
  // both come back quickly. Anything else keeps growing the delay.
  if (ev.code === 1001 || lived) attempt = 0;
  scheduleReconnect();
}

function scheduleReconnect() {
  clearTimers();
  const base = Math.min(BACKOFF_MAX, BACKOFF_MIN * 2 ** attempt);
  // Equal jitter (half fixed, half random): clients dropped by one server restart
  // must not all come back in the same instant.
  const delay = base / 2 + Math.random() * (base / 2);
  const at = Date.now() + delay;
  attempt = Math.min(attempt + 1, 16);
  retryTimer = setTimeout(openSocket, delay);
  const tick = () => setStatus('reconnecting', `reconnecting in ${Math.max(1, Math.ceil((at - Date.now()) / 1000))}s`);
  tick();
  tickTimer = setInterval(tick, 250);
}

/** A socket that stopped answering: close it without waiting for TCP to notice. */
function forceReconnect() {
  const sock = detach();
  try { if (sock) sock.close(4000, 'no reply'); } catch { /* already closing */ }
  if (creds) scheduleReconnect();
}

function connect(token, chatId) {
  token = String(token == null ? '' : token).trim();
  chatId = String(chatId == null ? '' : chatId).trim();
  if (!token || !chatId) {
    showError('Enter a token and a chat id to connect.');
    return false;
  }
  // Another user or chat invalidates what is shown (is_my depends on the token).
  const same = creds && creds.token === token && creds.chatId === chatId;
  clearTimers();
  const old = detach();
  if (old) old.close(1000, 'reconnecting');
  creds = { token, chatId };
  if (!same) resetChat();
  ui.title.textContent = `Chat #${chatId}`;
  attempt = 0;
  updateUnread();
  openSocket();
  return true;
}

function disconnect() {
  creds = null;
  clearTimers();
  const old = detach();
  if (old) old.close(1000, 'bye');
  setStatus('offline');
  updateEmpty();
}

// ---- requests and replies ----
function request(kind, event, message, extra) {
  if (!ws || ws.readyState !== WebSocket.OPEN || !creds) return null;
  const rid = newRequestId();
  try {
    ws.send(JSON.stringify({ chat_id: creds.chatId, token: creds.token, event_type: event, message, request_id: rid }));
  } catch {
    return null;
  }
  const req = { kind, event, message, sock: ws, sentAt: Date.now(), ...extra };
  req.timer = setTimeout(() => onTimeout(rid), REQUEST_TIMEOUT);
  inflight.set(rid, req);
  return rid;
}

/** The latest page on a fresh start, else everything after our newest message. */
function sync() {
  if (!order.length) request('latest', 'get_history', null);
  else request('catchup', 'get_history', { after_id: order[order.length - 1], limit: CATCHUP_PAGE });
}

function afterSync() {
  synced = true;
  syncTries = 0;
  updateEmpty();
  updateOlder();
  for (const p of pending) if (p.state === 'queued') transmit(p);
  maybeLoadOlder();
}

function onTimeout(rid) {
  const req = inflight.get(rid);
  if (!req) return;
  inflight.delete(rid);
  if (req.sock !== ws) return;
  // Frames arrived since the request went out: the server is slow, not gone, so ask
  // again on this socket. Nothing arrived: the socket is dead, reconnect.
  const alive = lastFrameAt > req.sentAt;
  if (req.kind === 'send') {
    const p = req.pending;
    if (!pending.includes(p) || p.state !== 'sending') return;
    if (alive) return transmit(p);   // same client_msg_id: stored at most once
  } else if (req.kind === 'older') {
    loadingOlder = false;
    updateOlder();
    if (alive) return;
  } else if (alive) {
    return request(req.kind, req.event, req.message);
  }
  forceReconnect();
}

function onFrame(data) {
  let f;
  try {
    f = JSON.parse(data);
  } catch {
    return;   // not a frame of ours
  }
  if (!f || typeof f !== 'object') return;
  const rid = typeof f.request_id === 'string' ? f.request_id : null;
  const req = rid ? inflight.get(rid) : undefined;
  if (req) {
    clearTimeout(req.timer);
    inflight.delete(rid);
  }

  if (f.type !== 'success') {
    const kind = req && req.kind;
    if (kind === 'send' && pending.includes(req.pending)) {
      if (retryLater(req.pending, f.type)) return;
      setPendingState(req.pending, 'failed');
      req.pending.el.title = typeof f.detail === 'string' ? f.detail : String(f.type);
    } else if (kind === 'older') {
      loadingOlder = false;
      updateOlder();
    } else if (kind === 'latest' || kind === 'catchup') {
      if (f.type === 'server_error' || f.type === 'rate_limited') {
        // Transient: ask again rather than leave a gap, after a growing pause with
        // jitter, so the clients of a restarted server do not all come back at once.
        const sock = ws;
        syncTries += 1;
        const base = Math.min(BACKOFF_MAX, BACKOFF_MIN * 2 ** syncTries);
        setTimeout(() => { if (ws === sock && !synced) request(kind, req.event, req.message); },
          base / 2 + Math.random() * (base / 2));
      } else {
        afterSync();   // permanent (bad token, no chat): queued sends will report it too
      }
    }
    return showError(f.detail, f.type);
  }

  const list = Array.isArray(f.messages) ? f.messages : [];
  // Pushes have no request_id; a reply we stopped waiting for still carries messages.
  if (!req) return merge(list, rid ? 'history' : 'push');
  if (req.kind === 'latest') {
    merge(list, 'history');
    hasOlder = list.length >= PAGE;
    afterSync();
  } else if (req.kind === 'catchup') {
    merge(list, 'history');
    // Page on from this page's last id, not our newest: pushes may already have
    // delivered messages beyond the gap the next page still has to fill.
    const ids = list.map(normalise).filter(Boolean).map((m) => m.id).sort(cmpId);
    if (list.length >= CATCHUP_PAGE && ids.length) {
      request('catchup', 'get_history', { after_id: ids[ids.length - 1], limit: CATCHUP_PAGE });
    } else {
      afterSync();
    }
  } else if (req.kind === 'older') {
    loadingOlder = false;
    merge(list, 'older');
    hasOlder = list.length >= req.message.limit;
    updateOlder();
    maybeLoadOlder();   // a tall screen may still show no scrollbar
  } else if (req.kind === 'send') {
    merge(list, 'reply');
    // The echoed client_msg_id normally settles it; this covers a reply without one.
    if (pending.includes(req.pending) && list.length) dropPending(req.pending);
  }
}

// ---- sending ----
/**
 * A timed-out or rate-limited send is sent again, after a growing pause, with the same
 * client_msg_id: if the first attempt was stored after all, the server answers with it.
 */
function retryLater(p, type) {
  if ((type !== 'server_error' && type !== 'rate_limited') || p.retries >= SEND_RETRIES) return false;
  p.retries += 1;
  setPendingState(p, 'retrying');
  const sock = ws;
  const base = Math.min(BACKOFF_MAX, BACKOFF_MIN * 2 ** p.retries);
  setTimeout(() => {
    if (p.state === 'retrying' && ws === sock && synced && pending.includes(p)) transmit(p);
  }, base / 2 + Math.random() * (base / 2));
  return true;
}

function transmit(p) {
  setPendingState(p, request('send', p.event, p.message, { pending: p }) ? 'sending' : 'queued');
}

function enqueue(event, message) {
  if (!creds) {
    showError('Connect to a chat first.');
    return null;
  }
  const p = { cid: message.client_msg_id, event, message, state: 'queued', retries: 0, el: null };
  p.el = renderPending(p);
  pending.push(p);
  ui.list.append(p.el);
  setPendingState(p, 'queued');
  scrollToBottom();
  updateEmpty();
  if (synced) transmit(p);   // else afterSync() sends it once history has caught up
  return p.cid;
}

function sendText(text) {
  if (typeof text !== 'string' || !text.trim()) return null;
  return enqueue('send_message', { type: 'text', text, client_msg_id: newClientMsgId() });
}

function sendFile(url, type, caption) {
  url = typeof url === 'string' ? url.trim() : '';
  if (!url) {
    showError('Enter the URL of the image or file to send.');
    return null;
  }
  const text = typeof caption === 'string' && caption.trim() ? caption : null;
  return enqueue('send_file', { type: type === 'file' ? 'file' : 'image', file_url: url, text, client_msg_id: newClientMsgId() });
}

// ---- wiring ----
function autoGrow() {
  ui.text.style.height = 'auto';
  ui.text.style.height = `${Math.min(ui.text.scrollHeight + 2, 160)}px`;
}

function onSendClick() {
  if (sendText(ui.text.value)) {
    ui.text.value = '';
    autoGrow();
  }
  ui.text.focus();
}

function onSendFileClick() {
  if (!ui.fileUrl.value.trim()) ui.fileUrl.focus();
  // The message box doubles as the caption, so one composer serves both kinds.
  if (sendFile(ui.fileUrl.value, ui.fileType.value, ui.text.value)) {
    ui.fileUrl.value = ui.text.value = '';
    autoGrow();
  }
}

ui.form.addEventListener('submit', (e) => {
  e.preventDefault();
  connect(ui.token.value, ui.chatId.value);
});
ui.disconnect.addEventListener('click', disconnect);
ui.send.addEventListener('click', onSendClick);
ui.sendFile.addEventListener('click', onSendFileClick);
ui.text.addEventListener('input', autoGrow);
ui.text.addEventListener('keydown', (e) => {
  // isComposing / 229: the Enter that confirms an IME candidate must not send.
  if (e.key === 'Enter' && !e.shiftKey && !e.isComposing && e.keyCode !== 229) {
    e.preventDefault();
    onSendClick();
  }
});
ui.fileUrl.addEventListener('keydown', (e) => {
  if (e.key === 'Enter' && !e.isComposing) {
    e.preventDefault();
    onSendFileClick();
  }
});
ui.scroller.addEventListener('scroll', () => {
  stick = nearBottom();
  updateUnread();
  maybeLoadOlder();
}, { passive: true });
ui.jump.addEventListener('click', () => {
  scrollToBottom();
  updateUnread();
});
document.addEventListener('visibilitychange', updateUnread);
// Back on the network: no point sitting out the rest of a long backoff.
window.addEventListener('online', () => {
  if (creds && !ws) {
    attempt = 0;
    openSocket();
  }
});

// Test hook; state() returns copies so a test cannot corrupt the client.
window.chatClient = Object.freeze({
  state: () => ({
    status,
    chatId: creds ? creds.chatId : null,
    messages: order.map((id) => ({ ...byId.get(id) })),
    pending: pending.map((p) => ({ client_msg_id: p.cid, state: p.state, event_type: p.event, message: { ...p.message } })),
  }),
  connect,
  disconnect,
  send: sendText,
  sendFile,
});

const params = new URLSearchParams(location.search);
ui.token.value = params.get('token') || '';
ui.chatId.value = params.get('chat_id') || '';
setStatus('offline');
updateEmpty();
if (ui.token.value.trim() && ui.chatId.value.trim()) connect(ui.token.value, ui.chatId.value);
