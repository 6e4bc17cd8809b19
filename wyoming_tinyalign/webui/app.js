// TinyAlign's household page: corrections, deletes, runs and rollbacks through the JSON API (web.py).
// The pages are rendered on the server; this only wires the buttons, the correction form and the keys.
// Every URL is relative to the page, so it works at the server's root and under Home Assistant ingress.
"use strict";

// A browser's change must carry this header (web.py): a cross-site form cannot send it.
const CHANGE = { "X-Requested-With": "tinyalign" };

async function api(method, url, body) {
  const init = { method, headers: { ...CHANGE }, credentials: "same-origin" };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const answer = await fetch(url, init);
  const text = await answer.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch (err) {
    data = null;
  }
  if (!answer.ok) throw new Error((data && data.error) || `${answer.status} ${answer.statusText}`);
  return data;
}

function say(text, bad = false) {
  const status = document.getElementById("status");
  status.textContent = text;
  status.classList.toggle("bad", bad);
}

// ------------------------------------------------------------------------------------ interactions
const rows = () => [...document.querySelectorAll("tr.row")];
const rowOf = (el) => (el && el.closest ? el.closest("tr.row") : null);

function slotOrder(name) {
  const option = document.getElementById("editor").content.querySelector(`option[value="${name}"]`);
  return option ? option.dataset.slots.split(" ").filter(Boolean) : [];
}

function intentText(intent) {
  if (!intent) return "not recognized";
  const slots = slotOrder(intent.name).filter((k) => k in (intent.slots || {}));
  return [intent.name, ...slots.map((k) => `${k}=${intent.slots[k]}`)].join(" | ");
}

function showSlots(form) {
  const option = form.elements.intent.selectedOptions[0];
  const allowed = ((option && option.dataset.slots) || "").split(" ").filter(Boolean);
  for (const label of form.querySelectorAll("[data-slot]")) {
    label.hidden = !allowed.includes(label.dataset.slot);
  }
}

function closeEditor() {
  const open = document.querySelector("tr.editing");
  if (open) open.remove();
}

function openEditor(row) {
  closeEditor();
  const form = document.getElementById("editor").content.firstElementChild.cloneNode(true);
  const holder = document.createElement("tr");
  const cell = document.createElement("td");
  holder.className = "editing";
  cell.colSpan = row.cells.length;
  cell.append(form);
  holder.append(cell);
  row.after(holder);
  const intent = JSON.parse(row.dataset.intent || "null");
  form.elements.text.value = row.dataset.text || "";
  form.elements.intent.value = intent ? intent.name : "";
  for (const input of form.querySelectorAll("[data-slot] input")) {
    input.value = (intent && intent.slots && intent.slots[input.name.slice(5)]) || "";
  }
  showSlots(form);
  form.elements.intent.addEventListener("change", () => showSlots(form));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const name = form.elements.intent.value;
    const slots = {};
    for (const label of form.querySelectorAll("[data-slot]:not([hidden])")) {
      const value = label.querySelector("input").value.trim();
      if (value) slots[label.dataset.slot] = value;
    }
    const body = { text: form.elements.text.value, intent: name ? { name, slots } : null };
    correct(row, body, form.querySelector(".error"));
  });
  form.querySelector(".cancel").addEventListener("click", () => {
    closeEditor();
    row.focus();
  });
  form.elements.text.focus();
  form.elements.text.select();
}

function show(row, item) {
  const fix = item.correction || {};
  const heardIntent = JSON.parse(row.dataset.heardIntent || "null"); // as the page rendered it
  const heard = intentText(heardIntent);
  row.dataset.text = fix.text || item.transcript || "";
  row.dataset.intent = JSON.stringify("intent" in fix ? fix.intent : heardIntent);
  const fixedIntent = "intent" in fix ? intentText(fix.intent) : heard;
  row.querySelector(".fixed-text").textContent = fix.text && fix.text !== item.transcript ? fix.text : "";
  row.querySelector(".fixed-intent").textContent = fixedIntent !== heard ? fixedIntent : "";
  row.querySelector(".label").textContent = item.label_source || "-";
  row.classList.toggle("labelled", Boolean(item.label_source));
}

async function correct(row, body, error) {
  try {
    const item = await api("PUT", `api/interactions/${row.dataset.id}/correction`, body);
    show(row, item);
    closeEditor();
    say("Saved: it learns from this tonight.");
    step(row, 1);
  } catch (err) {
    if (error) error.textContent = err.message;
    else say(err.message, true);
  }
}

async function remove(row) {
  try {
    await api("DELETE", `api/interactions/${row.dataset.id}`);
    const list = rows();
    const next = list[list.indexOf(row) + 1] || list[list.indexOf(row) - 1];
    closeEditor();
    row.remove();
    say("Deleted, with its recording.");
    if (next) next.focus();
  } catch (err) {
    say(err.message, true);
  }
}

function step(row, by) {
  const list = rows();
  if (!list.length) return;
  const at = list.indexOf(row);
  const target = list[at < 0 ? 0 : Math.min(list.length - 1, Math.max(0, at + by))];
  target.focus();
  target.scrollIntoView({ block: "nearest" });
}

function play(row) {
  const audio = row.querySelector("audio");
  if (!audio) return;
  if (audio.paused) audio.play().catch((err) => say(err.message, true));
  else audio.pause();
}

function heardRight(row) {
  const body = { text: row.dataset.heardText, intent: JSON.parse(row.dataset.heardIntent || "null") };
  correct(row, body, null);
}

document.addEventListener("click", (event) => {
  const button = event.target.closest("button");
  const row = rowOf(button);
  if (!button || !row) return;
  if (button.classList.contains("fix")) openEditor(row);
  else if (button.classList.contains("right")) heardRight(row);
  else if (button.classList.contains("delete")) remove(row);
});

document.addEventListener("keydown", (event) => {
  const editing = event.target.closest && event.target.closest("tr.editing");
  if (editing && event.key === "Escape") {
    const row = editing.previousElementSibling;
    closeEditor();
    row.focus();
    return;
  }
  const typing = event.target.closest && event.target.closest("input, select, textarea, form");
  if (typing || event.ctrlKey || event.metaKey || event.altKey || !rows().length) return;
  const row = rowOf(document.activeElement);
  const by = { j: 1, ArrowDown: 1, k: -1, ArrowUp: -1 }[event.key];
  if (by) {
    event.preventDefault();
    step(row, by);
  } else if (row && ((event.key === "Enter" && document.activeElement === row) || event.key === "e")) {
    event.preventDefault();
    if (row.querySelector("button.fix")) openEditor(row);
  } else if (row && event.key === "p") {
    play(row);
  } else if (row && event.key === "y" && row.querySelector("button.right")) {
    heardRight(row);
  }
});

const deleteAll = document.getElementById("delete-all");
if (deleteAll) {
  deleteAll.addEventListener("click", async () => {
    if (!window.confirm(`${deleteAll.textContent}, with what was heard? This cannot be undone.`)) return;
    try {
      const answer = await api("DELETE", "api/interactions");
      say(`Deleted ${answer.deleted}.`);
      window.location.reload();
    } catch (err) {
      say(err.message, true);
    }
  });
}

// ---------------------------------------------------------------------------------------- learning
function watch() {
  const timer = window.setInterval(async () => {
    try {
      const answer = await api("GET", "api/adaptations?limit=1");
      if (!answer.running) {
        window.clearInterval(timer);
        window.location.reload();
      }
    } catch (err) {
      say(err.message, true);
    }
  }, 2000);
}

const runNow = document.getElementById("run-now");
if (runNow) {
  runNow.addEventListener("click", async () => {
    runNow.disabled = true;
    try {
      await api("POST", "api/adapt");
      say("Learning started; this page updates when it is done.");
      watch();
    } catch (err) {
      say(err.message, true);
      runNow.disabled = false;
    }
  });
}
if (document.body.dataset.running === "1") watch();

for (const button of document.querySelectorAll("button.rollback")) {
  button.addEventListener("click", async () => {
    const to = button.dataset.to;
    const question = !to
      ? "Go back to the version promoted before?"
      : button.dataset.rejected
        ? `Serve ${to} anyway? Its night did not find it better (see why in its row).`
        : `Serve ${to}?`;
    if (!window.confirm(question)) return;
    try {
      const answer = await api("POST", "api/rollback", to ? { to } : undefined);
      say(`Now serving ${answer.served}.`);
      window.location.reload();
    } catch (err) {
      say(err.message, true);
    }
  });
}
