// vitrine's pages: plain JS over the public API (no framework, no CDN). Every request sends
// the key typed into the key panel, if any, as X-API-Key (kept in this tab's sessionStorage).
"use strict";
(() => {
  const body = document.body;
  const ROOT = body.dataset.root || "";
  const READ_KEY = body.dataset.readKey === "true";
  const WRITE_KEY = body.dataset.writeKey === "true";
  const KEY_STORE = "vitrine-key";
  const $ = (sel, el = document) => el.querySelector(sel);

  // --- keys -------------------------------------------------------------------------------
  const key = () => sessionStorage.getItem(KEY_STORE) || "";
  const panel = $("#key-panel");
  function askForKey(why) {
    if (why) $("#key-why").textContent = why;
    panel.hidden = false;
    $("#key-input").focus();
  }
  $("#key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(KEY_STORE, $("#key-input").value.trim());
    panel.hidden = true;
    location.reload();
  });
  $("#key-forget").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORE);
    location.reload();
  });
  if (READ_KEY && !key()) askForKey();

  class ApiError extends Error {
    constructor(status, detail) { super(detail); this.status = status; }
  }

  // One call of the API: JSON or FormData in, parsed JSON out; an error answer is an ApiError
  // with the Problem's detail (a 401 also opens the key panel).
  async function api(path, { method = "GET", data, signal, writeKey } = {}) {
    const headers = {};
    const k = writeKey || key();
    if (k) headers["X-API-Key"] = k;
    let payload;
    if (data instanceof FormData) payload = data;
    else if (data !== undefined) {
      headers["Content-Type"] = "application/json";
      payload = JSON.stringify(data);
    }
    let r;
    try {
      r = await fetch(ROOT + path, { method, headers, body: payload, signal });
    } catch (e) {
      if (e.name === "AbortError") throw e;
      throw new ApiError(0, "The service cannot be reached. Is it running?");
    }
    const json = await r.json().catch(() => ({}));
    if (!r.ok) {
      const detail = json.detail || `HTTP ${r.status}`;
      if (r.status === 401 && !writeKey) {
        askForKey(key() ? "The key you gave was refused: check it and try again."
                        : "This service needs a key to read (search, suggestions, status).");
      }
      if (r.status === 503) {
        const after = r.headers.get("Retry-After");
        throw new ApiError(503, `${detail}${after ? ` (retry in ${after} s)` : ""}`);
      }
      throw new ApiError(r.status, detail);
    }
    return json;
  }

  // A thumbnail: a plain <img src> unless a key must be sent (then fetched as a blob).
  async function setPhoto(img, url) {
    const none = img.parentElement.querySelector(".nophoto");
    if (!url) { img.hidden = true; if (none) none.hidden = false; return; }
    if (none) none.hidden = true;
    img.hidden = false;
    if (!key()) { img.src = url; return; }
    try {
      const r = await fetch(url, { headers: { "X-API-Key": key() } });
      if (r.ok) img.src = URL.createObjectURL(await r.blob());
    } catch (e) { img.hidden = true; if (none) none.hidden = false; }
  }

  const pct = (x) => `${Math.round(x * 100)}%`;
  const pathText = (path) => (path && path.length ? path.join(" › ") : "No category");

  function card(hit, onMore) {
    const li = $("#card-template").content.firstElementChild.cloneNode(true);
    $(".card-title", li).textContent = hit.title || hit.id;
    $(".path", li).textContent = pathText(hit.category_path);
    $(".score", li).textContent = `score ${hit.score.toFixed(2)}`;
    $(".id", li).textContent = hit.id;
    const img = $("img", li);
    img.alt = hit.title || hit.id;
    setPhoto(img, hit.photo_url);
    const more = $(".more", li);
    more.setAttribute("aria-label", `More like “${hit.title || hit.id}”`);
    if (onMore) more.addEventListener("click", () => onMore(hit));
    else more.remove();
    return li;
  }

  function say(el, text, error = false) {
    el.textContent = text;
    el.classList.toggle("error", error);
  }

  // A photo field: a file input inside a drop zone, with a preview and a remove button.
  function photoField(onChange) {
    const zone = $("#drop"), input = $("#photo"), preview = $(".preview", zone);
    let file = null;
    function set(f) {
      file = f || null;
      preview.hidden = !file;
      if (file) $("#preview").src = URL.createObjectURL(file);
      else input.value = "";
      onChange(file);
    }
    input.addEventListener("change", () => set(input.files[0]));
    $("#clear-photo").addEventListener("click", () => { set(null); input.focus(); });
    for (const t of ["dragenter", "dragover"]) {
      zone.addEventListener(t, (ev) => { ev.preventDefault(); zone.classList.add("over"); });
    }
    for (const t of ["dragleave", "drop"]) {
      zone.addEventListener(t, () => zone.classList.remove("over"));
    }
    zone.addEventListener("drop", (ev) => {
      ev.preventDefault();
      const f = [...ev.dataTransfer.files].find((x) => x.type.startsWith("image/"));
      if (f) set(f);
    });
    return () => file;
  }

  // --- buyer page ------------------------------------------------------------------------
  function buyerPage() {
    const form = $("#search-form"), list = $("#results"), status = $("#search-status");
    const photo = photoField(() => {});
    let seq = 0;

    async function run(describe, data) {
      const mine = ++seq;
      say(status, "Searching…");
      form.querySelector("button[type=submit]").disabled = true;
      try {
        const out = await api("/search", { method: "POST", data });
        if (mine !== seq) return;
        list.replaceChildren(...out.results.map((h) => card(h, moreLike)));
        say(status, out.results.length
          ? `${out.results.length} results ${describe}.`
          : `No results ${describe}.`);
      } catch (e) {
        if (mine === seq) say(status, e.message, true);
      } finally {
        form.querySelector("button[type=submit]").disabled = false;
      }
    }

    function moreLike(hit) {
      const data = { listing_id: hit.id, k: 24 };
      const cat = $("#category").value.trim();
      if (cat) data.category = cat;
      run(`like “${hit.title || hit.id}”`, data);
      list.focus?.();
    }

    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const text = $("#q").value.trim(), cat = $("#category").value.trim(), file = photo();
      if (!text && !file) {
        say(status, "Type some words or choose a photo to search with.", true);
        $("#q").focus();
        return;
      }
      const data = new FormData();
      if (text) data.append("text", text);
      if (file) data.append("image", file);
      if (cat) data.append("category", cat);
      data.append("k", "24");
      const what = [text && `for “${text}”`, file && "for your photo", cat && `in ${cat}`]
        .filter(Boolean).join(" ");
      run(what, data);
    });

    // the category filter suggests the first levels the index holds
    if (!READ_KEY || key()) {
      api("/stats").then((s) => {
        $("#categories").replaceChildren(...Object.keys(s.by_category).sort().map((c) => {
          const o = document.createElement("option");
          o.value = c;
          return o;
        }));
      }).catch(() => {});
    }
  }

  // --- seller page -----------------------------------------------------------------------
  function sellPage() {
    const form = $("#sell-form"), status = $("#sell-status");
    let timer = null, inflight = null, seq = 0;
    const photo = photoField(() => schedule(0));

    function schedule(delay = 400) {
      clearTimeout(timer);
      timer = setTimeout(suggest, delay);
    }

    async function suggest() {
      const title = $("#title").value.trim(), desc = $("#description").value.trim();
      const file = photo();
      if (!title && !desc && !file) {
        $("#suggest-body").hidden = true;
        $("#suggest-empty").hidden = false;
        return;
      }
      if (inflight) inflight.abort();
      inflight = new AbortController();
      const mine = ++seq;
      const data = new FormData();
      data.append("title", title);
      if (desc) data.append("description", desc);
      if (file) data.append("image", file);
      try {
        const out = await api("/classify", { method: "POST", data, signal: inflight.signal });
        if (mine === seq) showSuggestion(out);
      } catch (e) {
        if (e.name !== "AbortError" && mine === seq) {
          $("#suggest-empty").hidden = false;
          $("#suggest-body").hidden = true;
          say($("#suggest-empty"), `No suggestion: ${e.message}`, true);
        }
      }
    }

    const REASONS = {
      out_of_catalog: "This product looks unlike every category we know: please check it.",
      low_confidence: "The similar listings disagree: the category is uncertain.",
      no_neighbours: "No labelled listing to compare with yet.",
    };

    function showSuggestion(out) {
      $("#suggest-empty").hidden = true;
      $("#suggest-body").hidden = false;
      const crumbs = out.category_path.map((level, i) => {
        const li = document.createElement("li");
        li.textContent = level;
        li.setAttribute("aria-label", `level ${i + 1}: ${level}, ${pct(out.path_confidence[i] ?? 0)}`);
        const c = document.createElement("span");
        c.className = "conf";
        c.textContent = pct(out.path_confidence[i] ?? 0);
        c.title = "confidence of this level";
        li.append(c);
        return li;
      });
      // pills with a separator between them (outside the list items: read as one path)
      $("#suggest-path").replaceChildren(...crumbs.flatMap((li, i) => {
        if (!i) return [li];
        const sep = document.createElement("li");
        sep.className = "sep";
        sep.setAttribute("aria-hidden", "true");
        sep.textContent = "›";
        return [sep, li];
      }));
      const flag = $("#suggest-flag");
      flag.hidden = !out.uncertain;
      flag.textContent = out.uncertain ? (REASONS[out.uncertain_reason] || "Uncertain.") : "";
      // the first levels the neighbours voted for (a share under 1% is no alternative)
      const alts = Object.entries(out.scores).filter(([, v]) => v >= 0.01)
        .sort((a, b) => b[1] - a[1]).slice(0, 4);
      if (alts.length < 2) {
        const li = document.createElement("li");
        li.className = "hint";
        li.textContent = "None: every similar listing is in this category.";
        $("#suggest-alts").replaceChildren(li);
      } else $("#suggest-alts").replaceChildren(...alts.map(([name, share]) => {
        const li = document.createElement("li");
        const label = document.createElement("span");
        label.textContent = name;
        const bar = document.createElement("span");
        bar.className = "bar";
        bar.setAttribute("aria-hidden", "true");
        const fill = document.createElement("span");
        fill.style.width = pct(share);
        bar.append(fill);
        const v = document.createElement("span");
        v.className = "num";
        v.textContent = pct(share);
        li.append(label, bar, v);
        return li;
      }));
      $("#suggest-neighbours").replaceChildren(...out.neighbours.slice(0, 6).map((h) => card(h)));
    }

    $("#title").addEventListener("input", () => schedule());
    $("#description").addEventListener("input", () => schedule());

    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const title = $("#title").value.trim();
      if (!title) {
        say(status, "Give your listing a title.", true);
        $("#title").focus();
        return;
      }
      const wk = $("#write-key") ? $("#write-key").value.trim() : "";
      if (WRITE_KEY && !wk) {
        say(status, "This service needs the write key to publish: type it above.", true);
        $("#write-key").focus();
        return;
      }
      const id = "web-" + Date.now().toString(36) + "-" + Math.random().toString(36).slice(2, 7);
      const data = new FormData();
      data.append("id", id);
      data.append("title", title);
      const desc = $("#description").value.trim();
      if (desc) data.append("description", desc);
      if (photo()) data.append("image", photo());
      $("#publish").disabled = true;
      say(status, "Publishing…");
      try {
        const acc = await api("/listings", { method: "POST", data, writeKey: wk || undefined });
        say(status, `Accepted as ${acc.id}: indexing…`);
        const st = await poll(acc.id);
        showResult(st);
        say(status, st.status === "indexed" ? "Published: buyers can find it now."
          : st.status === "failed" ? `Not indexed: ${st.error}` : "Still waiting to be indexed.",
          st.status === "failed");
      } catch (e) {
        say(status, e.status === 401 ? "The write key was refused." : e.message, true);
      } finally {
        $("#publish").disabled = false;
      }
    });

    async function poll(id) {
      const until = Date.now() + 60000;
      let st;
      for (let wait = 200; Date.now() < until; wait = Math.min(wait * 1.5, 2000)) {
        st = await api(`/listings/${encodeURIComponent(id)}`);
        showResult(st);
        if (st.status !== "queued") return st;
        await new Promise((r) => setTimeout(r, wait));
      }
      return st;
    }

    function showResult(st) {
      const dl = $("#result-fields");
      const rows = [["Listing id", st.id]];
      const badge = document.createElement("span");
      badge.className = `badge ${st.status}`;
      badge.textContent = st.status;
      rows.push(["Status", badge]);
      if (st.category_path) rows.push(["Category", pathText(st.category_path)]);
      if (st.confidence !== undefined) {
        rows.push(["Confidence", `${pct(st.confidence)}${st.uncertain ? " (uncertain)" : ""}`]);
      }
      const FROM = { seller: "you", predicted: "the similar listings", confirmed: "an operator",
        unconfirmed: "you (a new category: an operator will check it)" };
      if (st.source) rows.push(["Category from", FROM[st.source] || st.source]);
      if (st.duplicates?.length) {
        rows.push(["Looks like", st.duplicates.map((d) =>
          `${d.id} (${d.same_photo ? "same photo" : `similarity ${d.score.toFixed(2)}`})`)
          .join(", ") + ": an operator will check it"]);
      }
      if (st.warning) rows.push(["Note", st.warning]);
      if (st.error) rows.push(["Error", st.error]);
      const items = [];
      for (const [k, v] of rows) {
        const dt = document.createElement("dt");
        dt.textContent = k;
        const dd = document.createElement("dd");
        if (v instanceof Node) dd.append(v); else dd.textContent = v;
        items.push(dt, dd);
      }
      if (st.photo_url) {
        const dt = document.createElement("dt");
        dt.textContent = "Photo";
        const dd = document.createElement("dd");
        const img = document.createElement("img");
        img.alt = st.title || st.id;
        dd.append(img);
        items.push(dt, dd);
        setPhoto(img, st.photo_url);
      }
      dl.replaceChildren(...items);
      $("#result").hidden = false;
    }
  }

  // --- status panel ----------------------------------------------------------------------
  function statusPage() {
    const status = $("#stats-status");
    const fmt = (n) => (n === null || n === undefined ? "–" : n.toLocaleString());
    function rows(el, counts, withBar) {
      const total = Object.values(counts).reduce((a, b) => a + b, 0) || 1;
      const entries = Object.entries(counts).sort((a, b) => b[1] - a[1]);
      if (!entries.length) {
        const tr = document.createElement("tr");
        const td = document.createElement("td");
        td.colSpan = withBar ? 3 : 2;
        td.textContent = "None yet";
        tr.append(td);
        el.replaceChildren(tr);
        return;
      }
      el.replaceChildren(...entries.map(([name, n]) => {
        const tr = document.createElement("tr");
        const a = document.createElement("td");
        a.textContent = name;
        const b = document.createElement("td");
        b.className = "num";
        b.textContent = fmt(n);
        tr.append(a, b);
        if (withBar) {
          const c = document.createElement("td");
          const bar = document.createElement("span");
          bar.className = "bar";
          bar.setAttribute("aria-hidden", "true");
          const fill = document.createElement("span");
          fill.style.width = pct(n / total);
          bar.append(fill);
          c.append(bar);
          tr.append(c);
        }
        return tr;
      }));
    }
    async function load() {
      try {
        const s = await api("/stats");
        $("#t-index").textContent = fmt(s.index_size);
        $("#t-pending").textContent = fmt(s.pending);
        $("#t-lag").textContent = fmt(s.lag);
        $("#t-review").textContent = fmt(s.review);
        $("#t-mode").textContent = s.mode;
        rows($("#by-status"), s.by_status, false);
        rows($("#by-category"), s.by_category, true);
        say(status, `Updated ${new Date().toLocaleTimeString()}.`);
      } catch (e) {
        say(status, e.message, true);
      }
    }
    $("#refresh").addEventListener("click", load);
    setInterval(() => { if (!document.hidden) load(); }, 5000);
    load();
  }

  // --- review queue (operators) -----------------------------------------------------------
  function reviewPage() {
    const status = $("#review-status"), queue = $("#queue");
    const PAGE = 10, NAME_STORE = "vitrine-reviewer";
    const REASONS = {
      mislabel: "Seller's category disagrees with the similar listings",
      uncertain: "Uncertain vote",
      unknown_category: "Category not in the taxonomy",
      duplicate: "Near-duplicate",
    };
    const UNCERTAIN = {
      out_of_catalog: "unlike every category we know",
      low_confidence: "the similar listings disagree",
      no_neighbours: "no labelled listing to compare with",
    };
    let offset = 0, total = 0;
    $("#reviewer").value = sessionStorage.getItem(NAME_STORE) || "";
    $("#reviewer").addEventListener("change", () =>
      sessionStorage.setItem(NAME_STORE, $("#reviewer").value.trim()));

    // note: what to say once loaded (a decision's outcome), instead of the count
    async function load(note, bad = false) {
      const reason = $("#reason").value;
      const q = new URLSearchParams({ offset: String(offset), limit: String(PAGE) });
      if (reason) q.set("reason", reason);
      say(status, "Loading…");
      try {
        const page = await api(`/review?${q}`);
        total = page.total;
        if (!page.items.length && offset > 0) {  // the last entries of a page were decided
          offset = Math.max(0, offset - PAGE);
          return load(note, bad);
        }
        queue.replaceChildren(...page.items.map(entry));
        const upto = offset + page.items.length;
        $("#page-info").textContent = total ? `${offset + 1}–${upto} of ${total}` : "";
        $("#prev").disabled = offset === 0;
        $("#next").disabled = upto >= total;
        const count = total ? `${total} listing${total === 1 ? "" : "s"} to review.`
          : "Nothing to review: the queue is empty.";
        say(status, note ? `${note} ${count}` : count, bad);
      } catch (e) {
        say(status, e.message, true);
      }
    }

    function entry(item) {
      const li = $("#entry-template").content.firstElementChild.cloneNode(true);
      li.dataset.id = item.id;
      $(".entry-title", li).textContent = item.title || item.id;
      const img = $("img", li);
      img.alt = item.title || item.id;
      setPhoto(img, item.photo_url);
      $(".reasons", li).replaceChildren(...item.reasons.map((r) => {
        const b = document.createElement("span");
        b.className = `badge reason ${r}`;
        b.textContent = REASONS[r] || r;
        if (r === "uncertain" && item.uncertain_reason) {
          b.textContent += `: ${UNCERTAIN[item.uncertain_reason] || item.uncertain_reason}`;
        }
        return b;
      }));
      const src = item.source === "unconfirmed" ? " (seller's, not in the taxonomy)"
        : item.source === "seller" ? " (seller's)" : item.source === "predicted" ? " (predicted)" : "";
      $(".now", li).textContent = pathText(item.category_path) + src;
      const conf = item.confidence === null || item.confidence === undefined ? ""
        : ` (${pct(item.confidence)})`;
      $(".predicted", li).textContent = item.predicted_path.length
        ? pathText(item.predicted_path) + conf : "No vote";
      $(".id", li).textContent = item.id;
      $(".version", li).textContent = `version ${item.version}`;
      const confirm = $(".confirm", li), use = $(".use-predicted", li);
      if (item.category_path.length) {
        confirm.textContent = `Confirm ${pathText(item.category_path)}`;
        confirm.addEventListener("click", () => decide(li, item, item.category_path));
      } else confirm.remove();
      const same = item.predicted_path.join("\u0000") === item.category_path.join("\u0000");
      if (item.predicted_path.length && !same) {
        use.textContent = `Use ${pathText(item.predicted_path)}`;
        use.addEventListener("click", () => decide(li, item, item.predicted_path));
      } else use.remove();
      const form = $(".correct", li), input = $(".path-input", li);
      input.id = `path-${item.id}`;
      $("label", form).htmlFor = input.id;
      form.addEventListener("submit", (ev) => {
        ev.preventDefault();
        const path = input.value.split(">>").map((x) => x.trim()).filter(Boolean);
        if (!path.length) { say(status, "Type a category path first.", true); input.focus(); return; }
        decide(li, item, path);
      });
      // a handful of photos per entry: loaded at once (lazy ones below the fold would
      // leave empty frames while the operator compares)
      const eager = (c) => { $("img", c).loading = "eager"; return c; };
      $(".neighbours", li).replaceChildren(...item.neighbours.map((h) => eager(card(h))));
      if (item.duplicates.length) {
        $(".dups", li).hidden = false;
        $(".duplicates", li).replaceChildren(...item.duplicates.map((h) => {
          const c = eager(card(h));
          if (item.same_photo.includes(h.id)) {
            $(".score", c).textContent = `same photo · ${h.score.toFixed(2)}`;
          }
          return c;
        }));
      }
      return li;
    }

    async function decide(li, item, path) {
      const wk = $("#write-key") ? $("#write-key").value.trim() : "";
      if (WRITE_KEY && !wk) {
        say(status, "Changing a category needs the write key: type it above.", true);
        $("#write-key").focus();
        return;
      }
      const data = { category_path: path, version: item.version };
      const who = $("#reviewer").value.trim();
      if (who) data.reviewer = who;
      for (const b of li.querySelectorAll("button")) b.disabled = true;
      try {
        const st = await api(`/listings/${encodeURIComponent(item.id)}/category`,
          { method: "PUT", data, writeKey: wk || undefined });
        li.remove();
        // the queue again (it moved on: the count, the page), then the next entry's button
        await load(`Saved: “${item.title || item.id}” is now ${pathText(st.category_path)}.`);
        $("#queue .entry button")?.focus();
      } catch (e) {
        for (const b of li.querySelectorAll("button")) b.disabled = false;
        if (e.status === 409) {
          load(`Not saved: ${e.message}. The queue was reloaded.`, true);
        } else say(status, e.status === 401 ? "The write key was refused." : e.message, true);
      }
    }

    $("#reason").addEventListener("change", () => { offset = 0; load(); });
    $("#reload").addEventListener("click", () => load());
    $("#prev").addEventListener("click", () => { offset = Math.max(0, offset - PAGE); load(); });
    $("#next").addEventListener("click", () => { offset += PAGE; load(); });
    $("#review-filter").addEventListener("submit", (ev) => { ev.preventDefault(); load(); });
    // the taxonomy's paths as suggestions for a correction
    api("/categories").then((t) => {
      $("#taxonomy").replaceChildren(...t.categories.map((c) => {
        const o = document.createElement("option");
        o.value = c.path.join(" >> ");
        return o;
      }));
    }).catch(() => {});
    if (!READ_KEY || key()) load();
  }

  ({ buyer: buyerPage, sell: sellPage, status: statusPage, review: reviewPage })[body.dataset.page]?.();
})();
