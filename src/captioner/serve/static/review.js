// captioner review: the page. Plain JS, nothing fetched but this server's api/.
"use strict";
const $ = (id) => document.getElementById(id);
const PAGE = 60;
const state = {
  offset: 0, total: 0, items: [], cur: 0, picked: new Set(), editing: false,
  sugs: {}, seq: 0, polling: false, info: null,
};

function say(text, error = false) {
  $("msg").textContent = text;
  $("msg").className = error ? "error" : "";
}

async function api(path, opts = {}) {
  const init = { method: opts.method || "GET", headers: {} };
  if (opts.body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(opts.body);
  }
  const r = await fetch("api/" + path, init);
  let data = null;
  try { data = await r.json(); } catch (e) { data = { detail: r.statusText }; }
  if (r.status === 401) { $("keybox").hidden = false; $("api_key").focus(); }
  if (!r.ok) throw new Error(data && data.detail ? String(data.detail) : "HTTP " + r.status);
  return data;
}

function setUnsaved(n) {
  $("unsaved").textContent = String(n);
  $("unsaved").dataset.n = String(n);
}

function el(tag, attrs = {}, text = "") {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text) e.textContent = text;
  return e;
}

// ---- loading ----

async function loadInfo() {
  const info = await api("info");
  state.info = info;
  $("source").textContent = `${info.source} · ${info.kind} · ${info.total} images`;
  $("ro").hidden = !info.read_only;
  $("notes").hidden = info.notes.length === 0;
  $("nnotes").textContent = String(info.notes.length);
  $("notelist").replaceChildren(...info.notes.map((n) => el("li", {}, n)));
  const sel = $("finding");
  if (sel.options.length === 1) {
    for (const f of info.filters) sel.append(el("option", { value: f }, f));
  }
  $("modelname").textContent = info.model || "(none: start with --model MODEL)";
  for (const id of ["capmissing", "cappicked"]) $(id).disabled = !info.model;
  $("export").hidden = !info.read_only;
  $("cleaned").hidden = info.read_only;
  for (const id of ["save", "undo", "bulkapply"]) if (info.read_only) $(id).disabled = true;
  setUnsaved(info.unsaved);
}

function query() {
  const p = new URLSearchParams({ offset: state.offset, limit: PAGE });
  if ($("q").value) p.set("q", $("q").value);
  if ($("qregex").checked) p.set("regex", "true");
  if ($("finding").value) p.set("finding", $("finding").value);
  return p.toString();
}

async function loadPage(cur = 0) {
  const page = await api("items?" + query());
  state.total = page.total;
  state.items = page.items;
  state.cur = Math.max(0, Math.min(cur, page.items.length - 1));
  setUnsaved(page.unsaved);
  const last = Math.min(state.offset + page.items.length, page.total);
  $("range").textContent = page.total ? `${state.offset + 1}–${last} of ${page.total}` : "none";
  renderGrid();
  renderDetail();
}

// ---- drawing ----

function captionsOf(item) { return item.captions; }

function card(item, i) {
  const c = el("div", { class: "card", "data-id": String(item.id), "data-i": String(i) });
  const img = el("img", { loading: "lazy", alt: item.name, src: `api/thumb/${item.id}` });
  const caps = captionsOf(item);
  const cap = el("div", { class: caps.length ? "cap" : "cap none" },
    caps.length ? caps[0] : "no caption");
  const marks = el("div", { class: "marks" });
  if (item.unsaved) marks.append(el("span", { class: "mark unsaved" }, "edited"));
  if (state.sugs[item.id] && state.sugs[item.id].caption) marks.append(el("span", { class: "mark sug" }, "model"));
  if (item.findings.length) marks.append(el("span", { class: "mark finding", title: item.findings.join(", ") }, "!"));
  c.append(img, marks, cap, el("div", { class: "dim small" }, item.name.split("/").pop()));
  c.classList.toggle("current", i === state.cur);
  c.classList.toggle("picked", state.picked.has(item.id));
  c.classList.toggle("excluded", item.excluded);
  c.addEventListener("click", (ev) => {
    if (ev.shiftKey || ev.ctrlKey || ev.metaKey) togglePick(item.id);
    select(i);
  });
  c.addEventListener("dblclick", () => { select(i); startEdit(); });
  return c;
}

function renderGrid() {
  $("grid").replaceChildren(...state.items.map(card));
}

function current() { return state.items[state.cur]; }

function renderDetail() {
  const item = current();
  $("detail").hidden = !item;
  if (!item) return;
  if ($("big").dataset.id !== String(item.id)) {
    $("big").src = `api/image/${item.id}`;
    $("big").dataset.id = String(item.id);
  }
  $("name").textContent = item.name;
  const flags = [];
  if (item.unsaved) flags.push("unsaved");
  if (item.excluded) flags.push("excluded");
  if (item.locked) flags.push("not editable: " + item.locked);
  if (item.missing) flags.push(item.missing);
  flags.push(...item.findings);
  $("flags").replaceChildren(...flags.map((f) => el("span", { class: "badge warn" }, f)));
  const caps = captionsOf(item);
  $("captions").replaceChildren(...(caps.length ? caps.map((c) => el("li", {}, c))
    : [el("li", { class: "none" }, "no caption")]));
  $("captions").hidden = state.editing;
  $("editor").hidden = !state.editing;
  const sug = state.sugs[item.id];
  $("suggestion").hidden = !sug;
  if (sug) {
    $("sugcaption").textContent = sug.caption || ("failed: " + (sug.error || "?"));
    const parts = [];
    if (sug.wer !== null && sug.wer !== undefined) parts.push(`WER ${sug.wer}`);
    if (sug.cider !== null && sug.cider !== undefined) parts.push(`CIDEr ${sug.cider}`);
    $("sugscore").textContent = parts.join(" · ");
    $("accept").disabled = !sug.caption;
  }
  $("exclude").textContent = item.excluded ? "Include (x)" : "Exclude (x)";
  $("pick").textContent = state.picked.has(item.id) ? "Unpick (space)" : "Pick (space)";
}

function refreshItem(item) {
  const i = state.items.findIndex((x) => x.id === item.id);
  if (i < 0) return;
  state.items[i] = item;
  const old = $("grid").children[i];
  if (old) old.replaceWith(card(item, i));
  if (i === state.cur) renderDetail();
}

async function reloadItem(id) { refreshItem(await api(`items/${id}`)); }

// ---- moving ----

function select(i) {
  if (state.editing) commitEdit();
  const cards = $("grid").children;
  if (cards[state.cur]) cards[state.cur].classList.remove("current");
  state.cur = i;
  if (cards[i]) {
    cards[i].classList.add("current");
    cards[i].scrollIntoView({ block: "nearest" });
  }
  renderDetail();
}

async function move(step) {
  const i = state.cur + step;
  if (i >= 0 && i < state.items.length) return select(i);
  if (step > 0 && state.offset + PAGE < state.total) { state.offset += PAGE; await loadPage(0); }
  else if (step < 0 && state.offset > 0) { state.offset = Math.max(0, state.offset - PAGE); await loadPage(PAGE - 1); }
}

async function turnPage(step) {
  const next = state.offset + step * PAGE;
  if (next < 0 || next >= state.total) return;
  state.offset = next;
  await loadPage(0);
}

// ---- editing ----

function startEdit() {
  const item = current();
  if (!item || state.info.read_only) return say("this source is read-only: export it to edit", true);
  if (item.locked) return say(item.locked, true);
  state.editing = true;
  $("editor").value = captionsOf(item).join("\n");
  renderDetail();
  $("editor").focus();
  $("editor").select();
}

function cancelEdit() {
  state.editing = false;
  renderDetail();
  $("grid").focus();
}

async function commitEdit() {
  if (!state.editing) return;
  state.editing = false;
  const item = current();
  const captions = $("editor").value.split("\n").map((s) => s.trim()).filter((s) => s);
  renderDetail();
  $("grid").focus();
  try {
    const r = await api(`items/${item.id}`, { method: "PUT", body: { captions } });
    setUnsaved(r.unsaved);
    refreshItem(r.item);
    say(r.changed ? `edited ${item.name}` : "no change");
  } catch (e) { say(e.message, true); }
}

async function save() {
  if (state.editing) await commitEdit();
  try {
    const r = await api("save", { method: "POST" });
    setUnsaved(r.unsaved);
    say(r.files.length ? `saved ${r.files.length} file(s); ${r.backups.length} backup(s)` : "nothing to save");
    $("msg").dataset.saved = String(Date.now());
    await loadPage(state.cur);
  } catch (e) { say(e.message, true); }
}

async function undo() {
  try {
    const r = await api("undo", { method: "POST" });
    setUnsaved(r.unsaved);
    say(r.undone ? `undid: ${r.undone}` : "nothing to undo");
    await loadPage(state.cur);
  } catch (e) { say(e.message, true); }
}

function togglePick(id) {
  if (state.picked.has(id)) state.picked.delete(id); else state.picked.add(id);
  const i = state.items.findIndex((x) => x.id === id);
  if ($("grid").children[i]) $("grid").children[i].classList.toggle("picked", state.picked.has(id));
  renderDetail();
}

async function toggleExclude() {
  const item = current();
  if (!item) return;
  try {
    await api("exclude", { method: "POST", body: { ids: [item.id], excluded: !item.excluded } });
    await reloadItem(item.id);
  } catch (e) { say(e.message, true); }
}

// ---- bulk ----

function bulkBody(apply) {
  const op = $("bulkop").value;
  const body = { op, apply, find: $("bulkfind").value, replace: $("bulkreplace").value,
    regex: $("bulkregex").checked, text: $("bulktext").value };
  const scope = $("bulkscope").value;
  if (scope === "picked") body.ids = [...state.picked];
  if (scope === "search") {
    body.q = $("q").value; body.q_regex = $("qregex").checked;
    body.finding = $("finding").value || null; body.scope = "search";
  }
  return body;
}

function showBulk(r) {
  const rows = r.changes.map((c) => {
    const tr = el("tr");
    tr.append(el("td", {}, c.name), el("td"), el("td"));
    tr.children[1].append(el("del", {}, c.before.join(" | ")));
    tr.children[2].append(el("ins", {}, c.after.join(" | ")));
    return tr;
  });
  const head = el("tr");
  head.append(el("th", {}, "image"), el("th", {}, "before"), el("th", {}, "after"));
  const table = el("table");
  table.append(head, ...rows);
  const more = r.count > r.changes.length ? ` (first ${r.changes.length} shown)` : "";
  const what = r.applied ? `changed ${r.count} image(s)` : `${r.count} image(s) would change${more}`;
  $("bulkresult").replaceChildren(el("div", { id: "bulkcount", "data-count": String(r.count) }, what), table);
}

async function bulk(apply) {
  try {
    const r = await api("bulk", { method: "POST", body: bulkBody(apply) });
    showBulk(r);
    $("bulkapply").disabled = apply || r.count === 0 || state.info.read_only;
    if (apply) { setUnsaved(r.unsaved); say(`bulk edit: ${r.count} image(s) changed (not saved yet)`); await loadPage(state.cur); }
  } catch (e) { say(e.message, true); }
}

// ---- the model ----

async function caption(body) {
  try {
    const r = await api("caption", { method: "POST", body });
    showCaptionState(r);
    poll();
  } catch (e) { say(e.message, true); }
}

function showCaptionState(r) {
  for (const [id, s] of Object.entries(r.suggestions)) state.sugs[id] = s;
  state.seq = Math.max(state.seq, r.seq);
  const err = r.error ? ` · error: ${r.error}` : "";
  $("capstate").textContent = r.total ? `${r.done}/${r.total} captioned${r.failed ? `, ${r.failed} failed` : ""}${r.running ? " …" : " · done"}${err}` : "";
  $("capstate").dataset.running = String(r.running);
}

async function poll() {
  if (state.polling) return;
  state.polling = true;
  try {
    for (;;) {
      const r = await api("caption?since=" + state.seq);
      const fresh = Object.keys(r.suggestions).length > 0;
      showCaptionState(r);
      if (fresh) { renderGrid(); renderDetail(); }
      if (!r.running) break;
      await new Promise((res) => setTimeout(res, 400));
    }
  } catch (e) { say(e.message, true); }
  state.polling = false;
}

async function decide(accept) {
  const item = current();
  if (!item || !state.sugs[item.id]) return;
  try {
    const r = await api(`suggestions/${item.id}/${accept ? "accept" : "reject"}`, { method: "POST" });
    delete state.sugs[item.id];
    setUnsaved(r.unsaved);
    refreshItem(r.item);
    say(accept ? `accepted the model's caption for ${item.name}` : "rejected");
  } catch (e) { say(e.message, true); }
}

// ---- data check ----

async function check(start) {
  try {
    const r = await api("findings", start ? { method: "POST" } : {});
    const counts = Object.entries(r.counts).map(([k, n]) => `${n} ${k}`).join(", ");
    $("checkstate").textContent = r.status === "running" ? `checking… ${r.hashed} images`
      : r.status === "done" ? (counts || "clean") : r.status === "failed" ? "failed: " + r.error : "";
    if (r.status === "running") setTimeout(() => check(false), 700);
    else if (r.status === "done" && start !== null) await loadPage(state.cur);
  } catch (e) { say(e.message, true); }
}

// ---- wiring ----

function bulkFields() {
  const replace = $("bulkop").value === "replace";
  $("findbox").hidden = !replace;
  $("textbox").hidden = replace;
  $("bulkapply").disabled = true;
}

let searchTimer = null;
function searchSoon() {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(() => { state.offset = 0; loadPage(0).catch((e) => say(e.message, true)); }, 250);
}

document.addEventListener("keydown", (ev) => {
  const ctrl = ev.ctrlKey || ev.metaKey;
  const inEditor = ev.target === $("editor");
  if (ctrl && ev.key.toLowerCase() === "s") { ev.preventDefault(); save(); return; }
  if (inEditor) {
    if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); commitEdit(); }
    else if (ev.key === "Escape") { ev.preventDefault(); cancelEdit(); }
    return;
  }
  const typing = ["INPUT", "TEXTAREA", "SELECT"].includes(ev.target.tagName);
  if (typing) { if (ev.key === "Escape") ev.target.blur(); return; }
  if (ctrl && ev.key.toLowerCase() === "z") { ev.preventDefault(); undo(); return; }
  if (ctrl || ev.altKey) return;
  const keys = {
    j: () => move(1), ArrowRight: () => move(1), ArrowDown: () => move(1),
    k: () => move(-1), ArrowLeft: () => move(-1), ArrowUp: () => move(-1),
    e: startEdit, Enter: startEdit, x: toggleExclude, " ": () => current() && togglePick(current().id),
    a: () => decide(true), r: () => decide(false), "/": () => $("q").focus(),
    PageDown: () => turnPage(1), PageUp: () => turnPage(-1),
  };
  const fn = keys[ev.key];
  if (fn && !(ev.key === "Enter" && ev.target.tagName === "BUTTON")) { ev.preventDefault(); fn(); }
});

$("save").onclick = save;
$("undo").onclick = undo;
$("prev").onclick = () => turnPage(-1);
$("next").onclick = () => turnPage(1);
$("q").oninput = searchSoon;
$("qregex").onchange = searchSoon;
$("finding").onchange = () => { state.offset = 0; loadPage(0).catch((e) => say(e.message, true)); };
$("check").onclick = () => check(true);
$("bulkop").onchange = bulkFields;
$("bulkpreview").onclick = () => bulk(false);
$("bulkapply").onclick = () => bulk(true);
for (const id of ["bulkfind", "bulkreplace", "bulktext", "bulkregex", "bulkscope"]) $(id).addEventListener("input", () => { $("bulkapply").disabled = true; });
$("capmissing").onclick = () => caption({ uncaptioned: true });
$("cappicked").onclick = () => caption({ ids: state.picked.size ? [...state.picked] : (current() ? [current().id] : []) });
$("accept").onclick = () => decide(true);
$("reject").onclick = () => decide(false);
$("exclude").onclick = toggleExclude;
$("pick").onclick = () => current() && togglePick(current().id);
$("cleaned").onclick = async () => {
  try { const r = await api("cleaned", { method: "POST" }); $("filestate").textContent = `wrote ${r.file} (${r.kept} images)`; }
  catch (e) { say(e.message, true); }
};
$("export").onclick = async () => {
  try { const r = await api("export", { method: "POST" }); $("filestate").textContent = `exported ${r.images} images to ${r.folder}: run captioner review on it to edit`; }
  catch (e) { say(e.message, true); }
};
$("login").onclick = async () => {
  try { await api("login", { method: "POST", body: { key: $("api_key").value } }); $("keybox").hidden = true; await start(); }
  catch (e) { say(e.message, true); }
};
window.addEventListener("beforeunload", (ev) => {
  if ($("unsaved").dataset.n && $("unsaved").dataset.n !== "0") { ev.preventDefault(); ev.returnValue = ""; }
});

async function start() {
  try {
    await loadInfo();
    await loadPage(0);
    await check(null);
    const r = await api("caption");
    showCaptionState(r);
    if (r.running) poll(); else if (Object.keys(r.suggestions).length) { renderGrid(); renderDetail(); }
    $("grid").focus();
    document.body.dataset.ready = "1";
  } catch (e) { say(e.message, true); }
}
start();
