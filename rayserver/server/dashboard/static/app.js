/* rayserver dashboard: keeps the page up to date in place from the JSON API: the job
   lists once, then the jobs that change, pushed by the server (GET /v1/events, read
   with fetch so the token stays in the header); an older server is polled instead.

   No build step and no libraries. The token lives in sessionStorage (this tab
   only) and travels only in the Authorization header; previews are fetched
   with fetch() and shown through blob: URLs for the same reason. Every text
   that comes from the server is put in with textContent, never as HTML. */
"use strict";

(() => {
  const TOKEN_KEY = "rayserver.token";
  const JOBS_INTERVAL_MS = 1000;
  const INFO_INTERVAL_MS = 5000;
  const HIDDEN_INTERVAL_MS = 10000;
  const REQUEST_TIMEOUT_MS = 15000;
  const RECONNECT_MS = 2000;
  const RENDER_DELAY_MS = 100;
  const LOG_INTERVAL_MS = 1000;
  const ACTIVE_SHOWN = 200;
  const FINISHED_SHOWN = 20;
  const PREVIEWS_AT_ONCE = 2;
  const LIVE_PREVIEW_MS = 3000;
  const LOG_KEEP_CHARS = 200000;
  const FINAL = new Set(["done", "failed", "cancelled", "interrupted"]);
  const PICTURE_RE = /\.(hdr|pic)$/i;

  const $ = (id) => document.getElementById(id);

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  const state = {
    token: sessionStorage.getItem(TOKEN_KEY),
    auth: true,
    polling: false,
    inFlight: false,
    jobsTimer: null,
    infoTimer: null,
    push: true, // false once the server turned out to have no event stream
    stream: null, // AbortController of the open event stream
    jobs: new Map(), // job id -> job object, as the lists and the events gave it
    renderTimer: null,
    logTimer: null,
    cards: new Map(), // job id -> card record
  };

  // ------------------------------------------------------------------ API

  async function api(path, { method = "GET", token = state.token, as = "json" } = {}) {
    const headers = {};
    if (token) headers["Authorization"] = "Bearer " + token;
    if (as === "json") headers["Accept"] = "application/json";
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), REQUEST_TIMEOUT_MS);
    let response;
    try {
      response = await fetch(path, { method, headers, cache: "no-store", signal: controller.signal });
    } catch (err) {
      throw new ApiError(0, err.name === "AbortError"
        ? "the server did not answer within " + REQUEST_TIMEOUT_MS / 1000 + " s"
        : "the server cannot be reached");
    } finally {
      clearTimeout(timer);
    }
    if (!response.ok) {
      let message = response.status + " " + response.statusText;
      try {
        const body = await response.json();
        if (body && body.error) message = body.error;
      } catch (_) { /* not JSON: keep the status line */ }
      throw new ApiError(response.status, message);
    }
    if (as === "json") return response.json();
    if (as === "blob") return response.blob();
    if (as === "response") return response;
    return response.arrayBuffer();
  }

  // ------------------------------------------------------------------ helpers

  function el(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props)) {
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key.startsWith("aria-") || key.startsWith("data-") || key === "role" || key === "for")
        node.setAttribute(key, value);
      else node[key] = value;
    }
    for (const child of children) if (child) node.append(child);
    return node;
  }

  function announce(message) {
    const region = $("announcer");
    // clearing first makes screen readers repeat an identical message
    region.textContent = "";
    setTimeout(() => { region.textContent = message; }, 50);
  }

  function showConnection(message) {
    const banner = $("connection");
    banner.textContent = message || "";
    banner.hidden = !message;
  }

  function clock(seconds) {
    return seconds ? new Date(seconds * 1000).toLocaleString() : "";
  }

  function duration(seconds) {
    if (seconds == null) return "";
    const s = Math.max(0, Math.round(seconds));
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
    return (h ? h + " h " : "") + (h || m ? m + " min " : "") + r + " s";
  }

  function jobLabel(job) {
    return "job " + job.id + (job.name ? " (" + job.name + ")" : "");
  }

  function mayHavePicture(job) {
    const steps = job.steps || [];
    return steps.some((s) => s.program === "rad" || s.program === "rpict" ||
                             PICTURE_RE.test(s.stdout || "")) ||
           (job.outputs || []).some((o) => PICTURE_RE.test(o.path || ""));
  }

  // A step reading a points file from stdin (rtrace over sensors): maybe a grid (grid.png says).
  function mayHaveGrid(job) {
    return (job.steps || []).some((s) => s.program === "rtrace" && typeof s.stdin === "string");
  }

  // ------------------------------------------------------------------ host info

  // How jobs are confined; "off" is shown as a warning (jobs have the server's rights).
  function showSandbox(box) {
    const el = $("info-sandbox");
    el.classList.toggle("unconfined", !!box && box.mode === "off");
    if (!box) { el.textContent = "unknown"; return; }
    el.textContent = box.mode === "off"
      ? "OFF: jobs run unconfined, with the server's rights"
      : box.mechanism + ", memory limit by " + box.memory_limit;
  }

  async function refreshInfo() {
    try {
      const info = await api("/v1/info", { token: null });
      state.auth = info.auth !== false;
      $("title-host").textContent = "on " + info.hostname;
      document.title = "rayserver on " + info.hostname;
      $("info-hostname").textContent = info.hostname;
      $("info-cpus").textContent = String(info.cpus);
      $("info-load").textContent = Array.isArray(info.load)
        ? info.load.map((v) => Number(v).toFixed(2)).join(", ") : "unknown";
      $("info-radiance").textContent = info.radiance_version || "unknown";
      $("info-jobs").textContent = (info.running ?? "?") + " / " + (info.queued ?? "?");
      $("info-version").textContent = info.version || "";
      showSandbox(info.sandbox);
      return info;
    } catch (err) {
      showConnection("Host information is unavailable: " + err.message + ". Retrying…");
      return null;
    } finally {
      clearTimeout(state.infoTimer);
      state.infoTimer = setTimeout(refreshInfo, INFO_INTERVAL_MS);
    }
  }

  // ------------------------------------------------------------------ sign in

  function showLogin(message) {
    stopPolling();
    $("jobs").hidden = true;
    $("signout").hidden = true;
    $("login").hidden = false;
    $("login-message").textContent = message || "";
    $("token-input").focus();
  }

  async function onLogin(event) {
    event.preventDefault();
    const input = $("token-input");
    const token = input.value.trim();
    if (!token) {
      $("login-message").textContent = "Enter the access token (from config/token on the server).";
      input.focus();
      return;
    }
    try {
      await api("/v1/jobs?limit=1", { token });
    } catch (err) {
      $("login-message").textContent = err.status === 401
        ? "The server refused this token. Check config/token on the server."
        : "Cannot sign in: " + err.message;
      input.select();
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, token);
    state.token = token;
    input.value = "";
    $("login-message").textContent = "";
    $("login").hidden = true;
    startPolling();
    announce("Signed in.");
  }

  function onSignout() {
    sessionStorage.removeItem(TOKEN_KEY);
    state.token = null;
    for (const id of [...state.cards.keys()]) removeCard(id);
    showLogin("Token forgotten. Enter it again to see the jobs.");
  }

  // ------------------------------------------------------------------ jobs

  function startPolling() {
    $("jobs").hidden = false;
    $("signout").hidden = !state.token;
    if (!state.polling) {
      state.polling = true;
      pollJobs();
    }
  }

  function stopPolling() {
    state.polling = false;
    clearTimeout(state.jobsTimer);
    clearInterval(state.logTimer);
    state.logTimer = null;
    if (state.stream) state.stream.abort();
    state.stream = null;
  }

  function signedOut(err) {
    sessionStorage.removeItem(TOKEN_KEY);
    state.token = null;
    showLogin(state.auth ? "Please sign in with the server's access token." : err.message);
  }

  // The lists; then the event stream from their version on (or, from an older
  // server, the lists again every second).
  async function pollJobs() {
    // one poll (or stream) at a time: a visibility change must not start a second loop
    if (!state.polling || state.inFlight || state.stream) return;
    state.inFlight = true;
    let since = null;
    try {
      const [active, finished] = await Promise.all([
        api("/v1/jobs?state=queued,running&limit=" + ACTIVE_SHOWN),
        api("/v1/jobs?state=done,failed,cancelled,interrupted&limit=" + FINISHED_SHOWN),
      ]);
      showConnection("");
      state.jobs = new Map();
      for (const job of [...(active.jobs || []), ...(finished.jobs || [])]) state.jobs.set(job.id, job);
      render(active.jobs || [], finished.jobs || []);
      if (state.push && typeof active.version === "number" && typeof finished.version === "number")
        since = Math.min(active.version, finished.version);
    } catch (err) {
      if (err.status === 401) { signedOut(err); return; }
      showConnection("Cannot update the job list: " + err.message + ". Retrying…");
    } finally {
      state.inFlight = false;
    }
    if (!state.polling) return;
    if (since !== null) { followEvents(since); return; }
    // a tab nobody looks at asks less often; it catches up when shown again
    const wait = document.hidden ? HIDDEN_INTERVAL_MS : JOBS_INTERVAL_MS;
    state.jobsTimer = setTimeout(pollJobs, wait);
  }

  async function followEvents(since) {
    const controller = new AbortController();
    state.stream = controller;
    if (!state.logTimer) state.logTimer = setInterval(readOpenLogs, LOG_INTERVAL_MS);
    let problem = null;
    try {
      const headers = { Accept: "text/event-stream" };
      if (state.token) headers["Authorization"] = "Bearer " + state.token;
      const response = await fetch("/v1/events?since=" + since,
        { headers, cache: "no-store", signal: controller.signal });
      if (response.status === 404) state.push = false; // an older server: poll it
      else if (response.status === 401) problem = new ApiError(401, "token refused");
      else if (!response.ok) problem = new ApiError(response.status, response.statusText);
      else await readEvents(response.body.getReader());
    } catch (err) {
      problem = err;
    } finally {
      if (state.stream === controller) state.stream = null;
    }
    if (!state.polling || controller.signal.aborted) return;
    if (problem && problem.status === 401) { signedOut(problem); return; }
    if (problem) showConnection("The live updates were interrupted. Reconnecting…");
    // the lists again, then a new stream from their version
    state.jobsTimer = setTimeout(pollJobs, state.push ? RECONNECT_MS : 0);
  }

  // Server-sent events: "job" (one changed job), "reset" (load the lists again).
  async function readEvents(reader) {
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let type = "message", data = "";
        for (const line of block.split("\n")) {
          if (line.startsWith("event:")) type = line.slice(6).trim();
          else if (line.startsWith("data:")) data += line.slice(5).trim();
        }
        if (type === "reset") { reader.cancel(); return; }
        if (type === "job" && data) onJobEvent(JSON.parse(data));
      }
    }
  }

  function onJobEvent(job) {
    const known = state.jobs.get(job.id);
    if (known && typeof known.version === "number" && known.version >= job.version) return;
    state.jobs.set(job.id, job);
    showConnection("");
    // several changes in a row make one render
    if (!state.renderTimer) state.renderTimer = setTimeout(renderKnown, RENDER_DELAY_MS);
  }

  // The lists as the server would answer them now, from the jobs we know.
  function renderKnown() {
    state.renderTimer = null;
    const newest = [...state.jobs.values()].sort((a, b) => b.id - a.id);
    const active = newest.filter((j) => !FINAL.has(j.state)).slice(0, ACTIVE_SHOWN);
    const finished = newest.filter((j) => FINAL.has(j.state)).slice(0, FINISHED_SHOWN);
    state.jobs = new Map([...active, ...finished].map((j) => [j.id, j]));
    render(active, finished);
  }

  // An open log of a running job grows without its job object changing.
  function readOpenLogs() {
    if (document.hidden) return;
    for (const card of state.cards.values())
      if (card.details.open && card.job && !FINAL.has(card.job.state)) readLog(card);
  }

  function render(activeJobs, finishedJobs) {
    const seen = new Set();
    placeJobs(activeJobs, $("active-jobs"), seen);
    placeJobs(finishedJobs, $("finished-jobs"), seen);
    for (const id of [...state.cards.keys()]) if (!seen.has(id)) removeCard(id);
    $("active-empty").hidden = activeJobs.length > 0;
    $("finished-empty").hidden = finishedJobs.length > 0;
  }

  function placeJobs(jobs, list, seen) {
    // jobs come newest first; keep that order, moving nodes only when needed
    let previous = null;
    for (const job of jobs) {
      if (seen.has(job.id)) continue;
      seen.add(job.id);
      let card = state.cards.get(job.id);
      if (!card) {
        card = createCard(job);
        state.cards.set(job.id, card);
      }
      updateCard(card, job);
      const wanted = previous ? previous.nextSibling : list.firstChild;
      if (card.root !== wanted || card.root.parentNode !== list) {
        // moving a node drops the focus inside it; put it back
        const focused = card.root.contains(document.activeElement) ? document.activeElement : null;
        list.insertBefore(card.root, wanted);
        if (focused && focused.isConnected) focused.focus({ preventScroll: true });
      }
      previous = card.root;
    }
  }

  function createCard(job) {
    const id = job.id;
    const titleId = "job-" + id + "-title";
    const card = {
      id,
      job: null,
      announcedState: job.state,
      announcedQuarter: Math.floor((job.progress || 0) / 25),
      previewState: "none", // none | loading | shown | absent | error
      blobUrl: null,
      log: { offset: 0, busy: false, decoder: new TextDecoder(), finishedReads: 0 },
    };
    card.title = el("h4", { class: "job-title", id: titleId });
    card.badge = el("span", { class: "state" });
    card.meta = el("p", { class: "job-meta" });
    card.times = el("p", { class: "job-meta" });
    card.reason = el("p", { class: "job-reason" });
    card.progress = el("progress", { max: 100, value: 0, "aria-labelledby": titleId });
    card.progressText = el("span", { class: "progress-text", "aria-hidden": "true" });
    card.cancel = el("button", { type: "button", class: "danger", text: "Cancel" });
    card.cancel.addEventListener("click", () => cancelJob(card));
    card.actions = el("div", { class: "job-actions" });
    card.image = el("img", { alt: "" });
    card.caption = el("figcaption");
    card.figure = el("figure", { class: "preview", hidden: true }, card.image, card.caption);
    card.logText = el("pre", { tabIndex: 0, "aria-label": "Log of job " + id });
    card.details = el("details", { class: "log" }, el("summary", { text: "Log" }), card.logText);
    card.outputsSummary = el("summary", { text: "Outputs" });
    card.outputsList = el("ul", { class: "outputs-list" });
    card.outputs = el("details", { class: "outputs", hidden: true },
      card.outputsSummary, card.outputsList);
    card.outputsShown = "";
    card.details.addEventListener("toggle", () => { if (card.details.open) readLog(card); });
    card.root = el("li", { class: "job", id: "job-" + id, "data-job-id": String(id) },
      el("div", { class: "job-head" }, card.title, card.badge),
      card.meta,
      el("div", { class: "progress-row" }, card.progress, card.progressText),
      card.times,
      card.reason,
      card.actions,
      card.figure,
      card.outputs,
      card.details);
    return card;
  }

  function updateCard(card, job) {
    const old = card.job;
    card.job = job;
    const label = jobLabel(job);
    const progress = Math.max(0, Math.min(100, Number(job.progress) || 0));
    const shownState = job.cancel_requested && !FINAL.has(job.state) ? "cancelling" : job.state;

    card.title.textContent = "#" + job.id + (job.name ? " " + job.name : "");
    card.badge.textContent = shownState;
    card.badge.className = "state state-" + job.state;
    const steps = job.step_count ? " · step " + Math.min(job.current_step + 1 || 1, job.step_count)
      + " of " + job.step_count : "";
    const programs = (job.steps || []).map((s) => s.program).join(", ");
    card.meta.textContent = job.location + ":" + (job.project || ".") + " · " + programs + steps;
    let times = "submitted " + (job.user ? "by " + job.user + " " : "") + clock(job.submitted_at);
    if (job.started_at) times += " · started " + clock(job.started_at);
    if (job.ended_at) times += " · ended " + clock(job.ended_at);
    if (job.wall_time != null && FINAL.has(job.state)) times += " · took " + duration(job.wall_time);
    card.times.textContent = times;
    const waiting = job.waiting_for || [];
    card.reason.textContent = FINAL.has(job.state) && job.state !== "done" && job.reason ? job.reason
      : waiting.length ? "waits for job " + waiting.join(", ") + " to be done" : "";

    if (card.progress.value !== progress) card.progress.value = progress;
    card.progress.setAttribute("aria-valuetext", progress.toFixed(0) + " percent, " + shownState);
    card.progressText.textContent = progress.toFixed(progress < 100 && progress % 1 ? 1 : 0) + " %";

    const cancellable = !FINAL.has(job.state);
    if (cancellable) {
      card.cancel.disabled = !!job.cancel_requested || card.cancelling === true;
      card.cancel.textContent = card.cancel.disabled ? "Cancelling…" : "Cancel";
      card.cancel.setAttribute("aria-label", "Cancel " + label);
      if (!card.cancel.isConnected) card.actions.append(card.cancel);
    } else if (card.cancel.isConnected) {
      // focus would vanish with the button; keep it on the card's log toggle
      const hadFocus = document.activeElement === card.cancel;
      card.cancel.remove();
      if (hadFocus) card.details.querySelector("summary").focus();
    }

    // Announce state changes and each quarter of progress, not every percent.
    if (old && job.state !== card.announcedState) {
      card.announcedState = job.state;
      const why = job.reason && job.state !== "done" ? ": " + job.reason : "";
      announce(label + " is " + (job.state === "done" ? "done" : job.state) + why + ".");
    } else if (job.state === "running") {
      const quarter = Math.floor(progress / 25);
      if (quarter > card.announcedQuarter && quarter < 4) {
        card.announcedQuarter = quarter;
        announce(label + ": " + quarter * 25 + " percent.");
      }
    }

    renderOutputs(card, job);
    if (job.state === "done" && card.previewState === "none" &&
        (mayHavePicture(job) || mayHaveGrid(job))) {
      queuePreview(card);
    } else if (job.state === "running" && mayHavePicture(job)) {
      livePreview(card);
    }
    if (card.details.open && (!FINAL.has(job.state) || card.log.finishedReads < 1)) readLog(card);
  }

  function sizeText(size) {
    if (typeof size !== "number") return "size unknown";
    const units = ["B", "kB", "MB", "GB", "TB"];
    let value = size, unit = 0;
    while (value >= 1000 && unit < units.length - 1) { value /= 1000; unit += 1; }
    return unit ? value.toFixed(1) + " " + units[unit] : size + " B";
  }

  // The files the job created or changed, with their sizes; pictures get a preview button.
  function renderOutputs(card, job) {
    const outputs = job.outputs || [];
    const count = job.outputs_count != null ? job.outputs_count : outputs.length;
    const key = count + ":" + outputs.map((o) => o.path + "=" + o.size).join("|");
    if (key === card.outputsShown) return;
    card.outputsShown = key;
    card.outputs.hidden = count === 0;
    card.outputsSummary.textContent = "Outputs (" + count + (count === 1 ? " file)" : " files)");
    card.outputsList.replaceChildren();
    for (const out of outputs) {
      const item = el("li", {}, el("code", { text: out.path }), " " + sizeText(out.size));
      if (job.state === "done" && PICTURE_RE.test(out.path)) {
        const button = el("button", { type: "button", text: "Preview" });
        button.setAttribute("aria-label", "Preview " + out.path);
        button.addEventListener("click", () => loadPreview(card, out.path));
        item.append(" ", button);
      }
      card.outputsList.append(item);
    }
    if (count > outputs.length) {
      card.outputsList.append(el("li", { text: "… and " + (count - outputs.length) + " more" }));
    }
  }

  function removeCard(id) {
    const card = state.cards.get(id);
    if (!card) return;
    if (card.blobUrl) URL.revokeObjectURL(card.blobUrl);
    card.root.remove();
    state.cards.delete(id);
  }

  async function cancelJob(card) {
    const label = jobLabel(card.job);
    if (!window.confirm("Cancel " + label + "? A running simulation is stopped.")) return;
    card.cancelling = true;
    card.cancel.disabled = true;
    card.cancel.textContent = "Cancelling…";
    try {
      const job = await api("/v1/jobs/" + card.id, { method: "DELETE" });
      updateCard(card, job);
      announce("Cancel requested for " + label + ".");
    } catch (err) {
      card.cancelling = false;
      card.cancel.disabled = false;
      card.cancel.textContent = "Cancel";
      if (err.status === 401) { showLogin("Please sign in again."); return; }
      announce("Could not cancel " + label + ": " + err.message);
      card.reason.textContent = "Cancel failed: " + err.message;
    }
  }

  // ------------------------------------------------------------------ preview and log

  // A page full of finished renders must not ask for all their previews at once.
  const previewQueue = [];
  let previewsLoading = 0;

  function queuePreview(card) {
    card.previewState = "loading";
    previewQueue.push(card);
    pumpPreviews();
  }

  function pumpPreviews() {
    while (previewsLoading < PREVIEWS_AT_ONCE && previewQueue.length) {
      const card = previewQueue.shift();
      if (!state.cards.has(card.id)) continue;
      previewsLoading += 1;
      loadPreview(card).finally(() => { previewsLoading -= 1; pumpPreviews(); });
    }
  }

  // path: one of the job's outputs; none: the picture of its last step that wrote one.
  async function loadPreview(card, path = null) {
    card.figure.hidden = false;
    card.root.classList.add("has-preview");
    card.caption.textContent = "Loading preview…";
    const query = path ? "?path=" + encodeURIComponent(path) : "";
    const grid = !path && !mayHavePicture(card.job);
    const url = "/v1/jobs/" + card.id + (grid ? "/grid.png" : "/preview.png" + query);
    try {
      const response = await api(url, { as: "response" });
      const blob = await response.blob();
      if (!state.cards.has(card.id)) return;
      if (card.blobUrl) URL.revokeObjectURL(card.blobUrl);
      card.blobUrl = URL.createObjectURL(blob);
      const what = path ? path + " of " + jobLabel(card.job) : "the picture of " + jobLabel(card.job);
      card.image.alt = grid ? "False-colour view of the sensor grid of " + jobLabel(card.job)
        : "Preview of " + what + " (tone-mapped)";
      card.image.src = card.blobUrl;
      card.caption.textContent = grid ? gridCaption(response.headers)
        : "Tone-mapped preview" + (path ? " of " + path : "");
      card.previewState = "shown";
    } catch (err) {
      if (err.status === 404) {
        card.previewState = "absent";
        card.figure.hidden = true;
        card.root.classList.remove("has-preview");
      } else {
        card.previewState = "error";
        card.caption.textContent = "No preview: " + err.message;
        if (err.status === 401) showLogin("Please sign in again.");
      }
    }
  }

  function gridCaption(headers) {
    const unit = headers.get("X-Grid-Unit") ? " " + headers.get("X-Grid-Unit") : "";
    return "Sensor grid seen from above (" + headers.get("X-Grid-Points") + " points, " +
      headers.get("X-Grid-Min") + " to " + headers.get("X-Grid-Max") + unit + ")";
  }

  // A running render's picture so far, fetched again every few seconds while it runs.
  async function livePreview(card) {
    const live = card.live || (card.live = { at: 0, busy: false, timer: null });
    if (live.busy || Date.now() - live.at < LIVE_PREVIEW_MS || document.hidden) return;
    live.busy = true;
    live.at = Date.now();
    // Pushed updates come when the job changes, not on a clock: look again in a while
    // whatever arrives meanwhile, as long as the job runs.
    clearTimeout(live.timer);
    live.timer = setTimeout(() => {
      if (state.cards.has(card.id) && card.job.state === "running") livePreview(card);
    }, LIVE_PREVIEW_MS + 50);
    try {
      const response = await api("/v1/jobs/" + card.id + "/preview.png", { as: "response" });
      if (response.status === 204) return; // no picture yet
      const rows = (response.headers.get("X-Preview-Rows") || "").split("/");
      const blob = await response.blob();
      if (!state.cards.has(card.id) || card.job.state !== "running") return;
      if (card.blobUrl) URL.revokeObjectURL(card.blobUrl);
      card.blobUrl = URL.createObjectURL(blob);
      card.figure.hidden = false;
      card.root.classList.add("has-preview");
      card.image.alt = "The picture of " + jobLabel(card.job) + " so far";
      card.image.src = card.blobUrl;
      card.caption.textContent = rows.length === 2
        ? "Picture so far: " + rows[0] + " of " + rows[1] + " scanlines" : "Picture so far";
    } catch (err) {
      // 404: no picture written yet; anything else shows on the next poll again
      if (err.status === 401) showLogin("Please sign in again.");
    } finally {
      live.busy = false;
    }
  }

  async function readLog(card) {
    const log = card.log;
    if (log.busy) return;
    log.busy = true;
    const final = FINAL.has(card.job.state);
    try {
      const bytes = await api("/v1/jobs/" + card.id + "/log?offset=" + log.offset, { as: "bytes" });
      log.offset += bytes.byteLength;
      const text = log.decoder.decode(bytes, { stream: !final });
      if (text) {
        const pre = card.logText;
        const atBottom = pre.scrollHeight - pre.scrollTop - pre.clientHeight < 8;
        let all = pre.textContent + text;
        if (all.length > LOG_KEEP_CHARS) all = "…\n" + all.slice(-LOG_KEEP_CHARS);
        pre.textContent = all;
        if (atBottom) pre.scrollTop = pre.scrollHeight;
      } else if (final && log.offset === 0) {
        card.logText.textContent = "(the log is empty)";
      }
      if (final) log.finishedReads += 1;
    } catch (err) {
      card.logText.textContent = "The log cannot be read: " + err.message;
      if (err.status === 401) showLogin("Please sign in again.");
    } finally {
      log.busy = false;
    }
  }

  // ------------------------------------------------------------------ start

  async function start() {
    $("login-form").addEventListener("submit", onLogin);
    $("signout").addEventListener("click", onSignout);
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden && state.polling) {
        clearTimeout(state.jobsTimer);
        pollJobs();
      }
    });
    const info = await refreshInfo();
    // Without a token where one is needed, ask for it; otherwise poll (a refused
    // or missing token comes back as 401, which shows the form).
    if (info && info.auth !== false && !state.token) showLogin("");
    else startPolling();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
