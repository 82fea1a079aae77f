// wechat-token-server status page: polls ./data, counts down every second, forces refreshes.
// No framework, no build step, no external asset.  Every text from the server goes through
// textContent (never innerHTML), so nothing it says can become markup.
"use strict";
(function () {
  const cards = new Map(); // source name -> {el, deadline (performance.now() ms), src, fetchedAgo0, receivedAt}
  let csrf = "";
  let pollSeconds = 5;
  let timer = null;

  const q = (el, sel) => el.querySelector(sel);
  const now = () => performance.now();

  function two(n) { return String(n).padStart(2, "0"); }

  function fmtLeft(seconds) {
    if (seconds <= 0) return "expired";
    const s = Math.floor(seconds);
    return Math.floor(s / 3600) + ":" + two(Math.floor((s % 3600) / 60)) + ":" + two(s % 60);
  }

  function fmtAgo(seconds) {
    const s = Math.max(0, Math.round(seconds));
    if (s < 60) return s + " s ago";
    if (s < 3600) return Math.floor(s / 60) + " min ago";
    return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min ago";
  }

  // The state shown: refreshing wins, then what the server says, then whether a value exists.
  function stateOf(src) {
    if (src.refreshing) return ["refreshing", "refreshing"];
    if (src.state === "blocked") return ["blocked", "blocked"];
    if (src.state === "quota") return ["quota", "quota reached"];
    if (src.state === "backoff") return ["backoff", "backing off"];
    if (src.state === "waiting") return ["novalue", "waiting"];
    if (src.fetched_at === null) return ["novalue", "no value"];
    if (src.expires_in <= 0) return ["expired", "expired"];
    return [src.state || "ok", src.state || "ok"];
  }

  function showProblem(text) {
    const p = document.getElementById("problem");
    p.textContent = text;
    p.hidden = !text;
  }

  function card(name) {
    let c = cards.get(name);
    if (c) return c;
    const el = document.getElementById("source-card").content.firstElementChild.cloneNode(true);
    el.dataset.source = name;
    q(el, ".name").textContent = name;
    q(el, ".force").addEventListener("click", (ev) => force(name, ev.currentTarget));
    document.getElementById("sources").appendChild(el);
    c = {el: el};
    cards.set(name, c);
    return c;
  }

  function render(data) {
    csrf = data.csrf || csrf;
    pollSeconds = data.poll_seconds || pollSeconds;
    const seen = new Set();
    for (const [name, src] of Object.entries(data.sources || {})) {
      seen.add(name);
      const c = card(name);
      c.src = src;
      c.receivedAt = now();
      c.deadline = c.receivedAt + 1000 * (src.expires_in || 0);
      c.fetchedAgo0 = src.fetched_at === null ? null : data.server_time - src.fetched_at;
      const el = c.el;
      const [key, label] = stateOf(src);
      const badge = q(el, ".state");
      badge.className = "state " + key;
      badge.textContent = label;
      el.dataset.state = key;
      const account = src.account && (data.accounts || {})[src.account];
      q(el, ".which").textContent = src.account
        ? "account " + src.account + (account ? " (" + account.appid + ")" : "") + " · " + src.type
        : "source declared under sources:";
      let calls = src.upstream_calls + " by this instance since it started";
      if (typeof src.calls_today === "number") {
        calls = src.calls_today + (typeof src.quota === "number" ? " / " + src.quota : "") + " today · " + calls;
      }
      q(el, ".calls").textContent = calls;
      q(el, ".holder").textContent = src.lock_holder ? "being fetched by " + src.lock_holder : "nobody is fetching";
      renderTrouble(el, src);
    }
    for (const [name, c] of cards) {
      if (!seen.has(name)) { c.el.remove(); cards.delete(name); }
    }
    renderPlatforms(data.platforms || []);
    document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
    tick();
  }

  // Third-party platforms: a summary per platform, never a list of all its authorizers.
  function add(parent, tag, text, cls) {
    const el = document.createElement(tag);
    if (text !== undefined) el.textContent = text;
    if (cls) el.className = cls;
    parent.appendChild(el);
    return el;
  }

  function renderPlatforms(platforms) {
    const box = document.getElementById("platforms");
    box.replaceChildren();
    box.hidden = platforms.length === 0;
    for (const p of platforms) {
      const card = add(box, "section", undefined, "card platform");
      card.dataset.platform = p.platform;
      const head = add(card, "div", undefined, "head");
      add(head, "h2", "platform " + p.platform + " (" + p.appid + ")", "name");
      const state = p.verify_ticket === "held" ? ["ok", "verify ticket held"] : ["novalue", "waiting for a verify ticket"];
      add(head, "span", state[1], "state " + state[0]);
      add(card, "p", (p.scheduled || 0) + " authorizers scheduled · " + (p.due || 0) + " due now · "
        + (p.claimed || 0) + " being refreshed · " + (p.blocked || 0) + " blocked", "muted counts");
      const blocked = p.blocked_authorizers || [];
      if (blocked.length) {
        const trouble = add(card, "div", undefined, "trouble");
        add(trouble, "p", blocked.length + (p.blocked > blocked.length ? " of " + p.blocked : "") + " blocked authorizer"
          + (blocked.length > 1 ? "s" : "") + ": the merchant must authorise again", "problem-line");
        const list = add(trouble, "ul", undefined, "blocked-list");
        for (const b of blocked) add(list, "li", b.appid + " (errcode " + b.errcode + ")");
      }
      const next = p.authorizers || [];
      if (next.length) {
        add(card, "p", "Next due:", "muted");
        const list = add(card, "ul", undefined, "due-list");
        for (const a of next) add(list, "li", a.appid + " · " + a.what + " · " + (a.due_in > 0 ? "in " + fmtLeft(a.due_in) : "due now") + " · " + a.state);
      }
    }
  }

  function renderTrouble(el, src) {
    const box = q(el, ".trouble");
    const b = src.blocked;
    el.dataset.errcode = b ? String(b.errcode) : "";
    if (b) {
      box.className = "trouble";
      q(box, ".problem-line").textContent = (src.state === "quota" ? "Daily quota reached: errcode " : "Blocked after errcode ") + b.errcode
        + (b.ends_in === null ? "; no call until you force a refresh" : "; ends by itself in " + fmtLeft(b.ends_in));
      q(box, ".errmsg").textContent = b.errmsg ? "WeChat said: " + b.errmsg : "";
      q(box, ".advice").textContent = "What to do: " + b.advice;
      box.hidden = false;
    } else if (src.failures > 0) {
      box.className = "trouble warn";
      q(box, ".problem-line").textContent = src.failures + " failed fetch" + (src.failures > 1 ? "es" : "") + " in a row"
        + (src.retry_in > 0 ? "; next try in about " + Math.ceil(src.retry_in) + " s" : "");
      q(box, ".errmsg").textContent = src.last_error ? "Last error: " + src.last_error : "";
      q(box, ".advice").textContent = "The server retries by itself; the value it holds is served while it lasts.";
      box.hidden = false;
    } else {
      box.hidden = true;
    }
  }

  // Every second, from the numbers of the last poll: no request needed.
  function tick() {
    const t = now();
    for (const c of cards.values()) {
      if (!c.src) continue;
      const left = (c.deadline - t) / 1000;
      q(c.el, ".countdown").textContent = c.src.fetched_at === null ? "—" : fmtLeft(left);
      const fetched = q(c.el, ".fetched");
      if (c.fetchedAgo0 === null) {
        fetched.textContent = "never (no value held)";
      } else {
        const ago = c.fetchedAgo0 + (t - c.receivedAt) / 1000;
        fetched.textContent = new Date(c.src.fetched_at * 1000).toLocaleTimeString() + " (" + fmtAgo(ago) + ")";
      }
    }
  }

  async function poll() {
    clearTimeout(timer);
    try {
      const r = await fetch("data", {credentials: "same-origin", cache: "no-store", headers: {Accept: "application/json"}});
      if (r.status === 401) { location.replace("login"); return; }
      const body = await r.json().catch(() => ({}));
      if (!r.ok) throw new Error(body.errmsg || "HTTP " + r.status);
      render(body);
      showProblem("");
    } catch (e) {
      showProblem("Cannot read the status (" + e.message + "); retrying every " + pollSeconds + " s. The countdowns go on from the last answer.");
    }
    timer = setTimeout(poll, pollSeconds * 1000);
  }

  async function force(name, button) {
    const ok = window.confirm("Force a refresh of " + name + "? A classic token or a ticket is replaced now; "
      + "the one callers hold stays valid about 5 more minutes.");
    if (!ok) return;
    const result = q(button.parentElement, ".result");
    button.disabled = true;
    result.textContent = "refreshing…";
    try {
      const r = await fetch("refresh", {
        method: "POST",
        credentials: "same-origin",
        headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf},
        body: JSON.stringify({source: name}),
      });
      if (r.status === 401) { location.replace("login"); return; }
      const body = await r.json().catch(() => ({}));
      if (r.ok) {
        result.textContent = body.new
          ? "new value fetched at " + new Date().toLocaleTimeString()
          : "kept the value fetched moments ago (refresh.force_min_interval)";
      } else {
        result.textContent = "refused (" + r.status + "): " + (body.errmsg || "no reason given");
      }
    } catch (e) {
      result.textContent = "failed: " + e.message;
    } finally {
      button.disabled = false;
      poll();
    }
  }

  async function logout() {
    try {
      await fetch("logout", {method: "POST", credentials: "same-origin", headers: {"X-CSRF-Token": csrf}});
    } finally {
      location.replace("login");
    }
  }

  document.getElementById("logout").addEventListener("click", logout);
  setInterval(tick, 1000);
  poll();
})();
