// oxide-cluster dashboard: the cluster's nodes, leader and tasks, live, in one small page.
//
// Why it is built this way:
// * Plain ES module, no framework, no build step, no CDN: the file ships in the Python
//   package and works offline; a node is an ops tool, not a web app, and a few hundred
//   lines of DOM code are easier to audit than a bundle.
// * Every data call carries the secret in the X-Cluster-Secret header; the secret lives in
//   sessionStorage (this tab only) and never in a URL. The WebSocket cannot send headers,
//   so it offers the subprotocols "oxide.v1" + "oxide.token.<base64url(secret)>".
// * Untrusted text (commands, labels, task output) only ever goes into textContent, never
//   innerHTML. ANSI colour codes are rendered as classes; other escapes are dropped.
// * Live updates come from the WebSocket ("cluster" events, task output); a light poll
//   (nodes every 2 s, tasks every 10 s) repairs anything missed while disconnected. Tasks
//   are the cluster's (scope=cluster); events only come for this node's own tasks, so
//   while a task on another node is active the task list is polled every 2 s.
// * The queue (GET /queue: the cluster's, with Redis) has no events: polled every 2 s; its
//   depth is drawn over the last 2 minutes from those polls.

const SECRET_KEY = "oxide.secret";
const NODES_EVERY_MS = 2000;
const TASKS_EVERY_MS = 10000;
const TASK_LIMIT = 50;
const QUEUE_EVERY_MS = 2000;
const QUEUE_LIMIT = 50;
const QUEUE_HISTORY = 60;  // depth samples drawn (2 minutes at one per poll)
const MAX_OUTPUT_NODES = 20000;  // DOM nodes in the output pane before old ones are trimmed
const ACTIVE = new Set(["queued", "running"]);

const $ = (id) => document.getElementById(id);

let secret = sessionStorage.getItem(SECRET_KEY);
let timers = [];
let live = null;
const tasks = new Map();  // id -> task JSON
let view = null;          // the open task view
let localNodeId = null;   // the node serving this page
let ticks = 0;            // clock-driven refreshes so far (tests poll on #app[data-ticks])
let queued = [];          // GET /queue's tasks, in dispatch order
const depths = [];        // queue depth, one sample per poll

// -- HTTP ----------------------------------------------------------------------------

class Unauthorized extends Error {}

async function api(path, options = {}, withSecret = secret) {
  const headers = {"X-Cluster-Secret": withSecret || "", ...(options.headers || {})};
  let reply;
  try {
    reply = await fetch(path, {...options, headers, cache: "no-store"});
  } catch (error) {
    throw new Error(`cannot reach this node (${error.message})`);
  }
  if (reply.status === 401) throw new Unauthorized("wrong cluster secret");
  const body = await reply.json().catch(() => ({}));
  if (!reply.ok && reply.status !== 202) {
    const message = body.error ? body.error.message : reply.statusText;
    const error = new Error(`${reply.status}: ${message}`);
    error.status = reply.status;
    throw error;
  }
  return body;
}

function handleError(error) {
  if (error instanceof Unauthorized) {
    signOut("The cluster secret was refused (HTTP 401). Enter the right secret.");
  } else {
    showBanner(error.message);
  }
}

function showBanner(text) {
  $("banner").textContent = text;
  $("banner").hidden = !text;
}

// -- sign in / out -------------------------------------------------------------------

function signOut(message) {
  secret = null;
  sessionStorage.removeItem(SECRET_KEY);
  timers.forEach(clearInterval);
  timers = [];
  if (live) live.stop();
  live = null;
  closeTask();
  tasks.clear();
  queued = [];
  depths.length = 0;
  $("app").hidden = true;
  $("logout").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  $("login-error").hidden = !message;
  $("summary").textContent = "";
  setConn("off", "offline");
  showBanner("");
  $("secret").focus();
}

async function signIn(event) {
  event.preventDefault();
  const candidate = $("secret").value;
  try {
    await api("/api/cluster/leader", {}, candidate);
  } catch (error) {
    $("login-error").textContent = error instanceof Unauthorized
      ? "Wrong secret: the node answered 401 Unauthorized." : error.message;
    $("login-error").hidden = false;
    return;
  }
  secret = candidate;
  sessionStorage.setItem(SECRET_KEY, secret);
  $("secret").value = "";
  start();
}

function start() {
  $("login").hidden = true;
  $("app").hidden = false;
  $("logout").hidden = false;
  live = new Live();
  live.connect();
  timers.push(setInterval(refreshNodes, NODES_EVERY_MS));
  timers.push(setInterval(refreshTasks, TASKS_EVERY_MS));
  timers.push(setInterval(refreshQueue, QUEUE_EVERY_MS));
  timers.push(setInterval(tickDurations, 1000));
  // A #task= link opens once the lists are drawn, so they do not push the view away.
  Promise.all([refreshNodes(), refreshTasks(), refreshQueue()]).then(openFromHash);
}

// -- nodes and leader ----------------------------------------------------------------

async function refreshNodes() {
  if (!secret) return;
  try {
    const cluster = await api("/api/cluster/nodes");
    renderNodes(cluster);
    showBanner("");
    // No "task" events reach this page for tasks on other nodes: poll while one is active.
    if ([...tasks.values()].some((task) => ACTIVE.has(task.state)
        && task.node_id !== localNodeId)) refreshTasks();
  } catch (error) {
    handleError(error);
  }
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function bar(value, max, label) {
  const cell = el("td", "bar-cell");
  if (value === null || value === undefined || !max) {
    cell.append(el("span", "muted", "—"));
    return cell;
  }
  const fraction = Math.max(0, Math.min(1, value / max));
  const outer = el("span", "bar");
  const inner = el("span", "fill");
  inner.style.width = `${(fraction * 100).toFixed(1)}%`;
  if (fraction > 0.9) inner.classList.add("hot");
  outer.append(inner);
  cell.append(outer, el("span", "bar-label", label));
  return cell;
}

function renderNodes(cluster) {
  const nodes = [cluster.local_node, ...(cluster.remote_nodes || [])];
  const leader = cluster.leader;  // stated once; each node only says is_leader
  localNodeId = cluster.local_node.node_id;
  $("summary").textContent =
    `${cluster.healthy_nodes}/${cluster.total_nodes} nodes healthy · this node ` +
    short(cluster.local_node.node_id);
  const line = $("leader");
  line.textContent = leader.node_id
    ? `leader ${short(leader.node_id)} · token ${leader.token}` +
      (leader.since ? ` · since ${new Date(leader.since).toLocaleTimeString()}` : "")
    : "no leader";
  line.dataset.leader = leader.node_id || "";
  const rows = nodes.map((node) => {
    const stats = node.stats || {};
    const row = el("tr", "node");
    row.dataset.nodeId = node.node_id;
    row.dataset.state = node.state;
    const name = el("td");
    name.append(el("code", "", short(node.node_id)), " ", el("span", "muted", node.hostname));
    if (node.node_id === cluster.local_node.node_id) name.append(" ", el("span", "tag", "this"));
    if (node.is_leader) {
      row.classList.add("leader");
      name.append(" ", el("span", "tag leader-badge", `leader · token ${leader.token}`));
    }
    const address = node.ip_address ? `${node.ip_address}:${node.api_port}`
      : `${node.hostname}:${node.api_port}`;
    const state = el("td");
    state.append(el("span", `state state-${node.healthy ? "alive" : "down"}`, node.state));
    if (stats.draining) {  // takes no new tasks: the scheduler places elsewhere
      row.classList.add("draining");
      state.append(" ", el("span", "tag draining-badge", "draining"));
    }
    const running = stats.running_tasks ?? null;
    const slots = running === null || stats.free_slots == null ? null
      : running + stats.free_slots;
    const labels = el("td");
    for (const [key, value] of Object.entries(node.labels || {})) {
      labels.append(el("span", "tag", `${key}=${value}`), " ");
    }
    row.append(name, el("td", "", address), state,
      bar(stats.cpu_percent, 100, pct(stats.cpu_percent)),
      bar(stats.memory_percent, 100, pct(stats.memory_percent)),
      bar(running, slots, slots === null ? "" : `${running}/${slots}`),
      labels);
    row.title = `${node.node_id}\nlast seen ${node.last_seen || "?"}`;
    return row;
  });
  $("nodes").replaceChildren(...rows);
}

const pct = (value) => (value === null || value === undefined ? "" : `${Math.round(value)}%`);
const short = (id) => (id ? String(id).slice(0, 12) : "?");

// -- queue ---------------------------------------------------------------------------

async function refreshQueue() {
  if (!secret) return;
  try {
    const body = await api(`/queue?limit=${QUEUE_LIMIT}`);
    queued = body.tasks;
    depths.push(body.queued);
    if (depths.length > QUEUE_HISTORY) depths.shift();
    renderQueue(body);
  } catch (error) {
    handleError(error);
  }
}

// From the task's created_at (its entering node's clock) to now.
function waiting(task) {
  const since = Date.parse(task.created_at);
  if (Number.isNaN(since)) return "";
  const seconds = Math.max(0, (Date.now() - since) / 1000);
  if (seconds < 60) return `${seconds.toFixed(0)} s`;
  const minutes = Math.floor(seconds / 60);
  return minutes < 60 ? `${minutes} min ${Math.round(seconds % 60)} s`
    : `${Math.floor(minutes / 60)} h ${minutes % 60} min`;
}

function renderQueue(body) {
  const depth = $("queue-depth");
  depth.textContent = `${body.queued} queued`;
  depth.dataset.depth = String(body.queued);
  $("queue-by-priority").textContent = Object.entries(body.by_priority || {})
    .sort((a, b) => Number(b[0]) - Number(a[0]))
    .map(([priority, count]) => `priority ${priority}: ${count}`).join(" · ");
  const rows = queued.map((task) => {
    const row = el("tr", "queued");
    row.dataset.taskId = task.id;
    const link = el("a", "", short(task.id));
    link.href = `#task=${encodeURIComponent(task.id)}`;
    const id = el("td");
    id.append(link);
    const command = el("td", "command", commandLine(task));
    command.title = commandLine(task);
    row.append(el("td", "position", task.queue_position), el("td", "priority", task.priority),
      el("td", "group", task.group), el("td", "waiting", waiting(task)), id, command);
    return row;
  });
  $("queue").replaceChildren(...rows);
  $("queue-empty").hidden = rows.length > 0;
  drawDepths();
}

// The depth samples as one line, scaled to the largest depth shown (at least 1).
function drawDepths() {
  const chart = $("queue-chart");
  const top = Math.max(1, ...depths);
  const step = 300 / (QUEUE_HISTORY - 1);
  // One sample is no line yet: draw it across the last step.
  const series = depths.length === 1 ? [depths[0], depths[0]] : depths;
  const offset = QUEUE_HISTORY - series.length;
  const points = series.map((value, index) =>
    `${((offset + index) * step).toFixed(1)},${(38 - (value / top) * 36).toFixed(1)}`);
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("points", points.join(" "));
  const title = document.createElementNS("http://www.w3.org/2000/svg", "title");
  title.textContent = `queue depth, now ${depths.at(-1) ?? 0}, highest shown ${top}`;
  chart.replaceChildren(title, line);
}

// -- tasks ---------------------------------------------------------------------------

async function refreshTasks() {
  if (!secret) return;
  const state = $("state-filter").value;
  // scope=cluster: the tasks of every healthy node, not just of the node serving the page.
  const query = new URLSearchParams({limit: String(TASK_LIMIT), scope: "cluster"});
  if (state) query.set("state", state);
  try {
    const body = await api(`/tasks?${query}`);
    const missing = body.unreachable || [];
    $("tasks-unreachable").textContent = missing.length
      ? `Not listed: the tasks of ${missing.map(short).join(", ")} (no answer).` : "";
    $("tasks-unreachable").hidden = !missing.length;
    const known = new Map(tasks);
    tasks.clear();
    for (const task of body.tasks) {
      tasks.set(task.id, regresses(known.get(task.id), task) ? known.get(task.id) : task);
    }
    renderTasks();
    if (view && tasks.has(view.id)) view.update(tasks.get(view.id));
  } catch (error) {
    handleError(error);
  }
}

// Terminal states never change again; a late reply (e.g. the 202 snapshot of a cancel
// that arrives after the "state" event) must not make a finished task look running.
function regresses(known, task) {
  return Boolean(known) && !ACTIVE.has(known.state) && ACTIVE.has(task.state);
}

function upsertTask(task) {
  if (regresses(tasks.get(task.id), task)) return;
  const filter = $("state-filter").value;
  if (filter && task.state !== filter) tasks.delete(task.id);
  else tasks.set(task.id, task);
  renderTasks();
  if (view && view.id === task.id) view.update(task);
}

// From the task's own timestamps (the owner's clock, whichever node that is); "now" only
// while the task is active, so an ended task's duration never moves. An ended task whose
// finished_at has not arrived yet (a "state" event carries none) shows nothing until then.
function duration(task) {
  const start = Date.parse(task.started_at);
  const end = ACTIVE.has(task.state) ? Date.now() : Date.parse(task.finished_at);
  if (Number.isNaN(start) || Number.isNaN(end)) return "";
  const seconds = Math.max(0, (end - start) / 1000);
  if (seconds < 60) return `${seconds.toFixed(1)} s`;
  const minutes = Math.floor(seconds / 60);
  return minutes < 60 ? `${minutes} min ${Math.round(seconds % 60)} s`
    : `${Math.floor(minutes / 60)} h ${minutes % 60} min`;
}

function commandLine(task) {
  return [task.command, ...(task.args || [])]
    .map((part) => (/^[\w@%+=:,./-]+$/.test(part) ? part : `'${part.replace(/'/g, "'\\''")}'`))
    .join(" ");
}

function taskRow(task) {
  const row = el("tr", "task");
  row.dataset.taskId = task.id;
  row.dataset.state = task.state;
  if (view && view.id === task.id) row.classList.add("selected");
  const id = el("td");
  const link = el("a", "", short(task.id));
  link.href = `#task=${encodeURIComponent(task.id)}`;
  id.append(link);
  const state = el("td");
  state.append(el("span", `state state-${task.state}`, task.state));
  const command = el("td", "command", commandLine(task));
  command.title = commandLine(task);
  row.append(id, state, el("td", "", short(task.node_id)), command,
    el("td", "duration", duration(task)), outcomeCell(task));
  row.addEventListener("click", (event) => {
    // Already open (the hash does not change): just bring the view back into sight.
    if (view && view.id === task.id) $("task-view").scrollIntoView({block: "start"});
    else if (event.target.tagName !== "A") location.hash = `task=${encodeURIComponent(task.id)}`;
  });
  return row;
}

// -- fan-out runs (run --parallel): one row per run, opened to its shards or batches ----

const openRuns = new Set();  // fanout.run values whose tasks are shown

// Progress of a run: tasks ended / tasks (shards: the declared total; a queue's batches
// are only known as they are taken), and how many ended other than succeeded.
function runSummary(members) {
  const first = members[0].fanout;
  const ended = members.filter((task) => !ACTIVE.has(task.state));
  const failures = ended.filter((task) => task.state !== "succeeded").length;
  const total = first.mode === "shards" ? first.total : members.length;
  const unit = first.mode === "shards" ? "shards" : `batches (${first.total} workers)`;
  const state = members.some((task) => ACTIVE.has(task.state)) ? "running"
    : failures ? "failed" : "succeeded";
  return {done: ended.length, total, unit, failures, state};
}

function runDuration(members) {
  const starts = members.map((task) => Date.parse(task.started_at)).filter((t) => !Number.isNaN(t));
  if (!starts.length) return "";
  const active = members.some((task) => ACTIVE.has(task.state));
  const ends = members.map((task) => Date.parse(task.finished_at)).filter((t) => !Number.isNaN(t));
  return duration({state: active ? "running" : "succeeded",
                   started_at: new Date(Math.min(...starts)).toISOString(),
                   finished_at: new Date(Math.max(...ends, Math.min(...starts))).toISOString()});
}

function runRow(run, members) {
  const summary = runSummary(members);
  const opened = openRuns.has(run);
  const row = el("tr", "fanout");
  row.dataset.run = run;
  row.dataset.state = summary.state;
  row.dataset.done = String(summary.done);
  row.dataset.total = String(summary.total);
  row.dataset.failures = String(summary.failures);
  const id = el("td");
  const toggle = el("button", "fanout-toggle", `${opened ? "▾" : "▸"} run ${run.slice(-8)}`);
  toggle.type = "button";
  toggle.setAttribute("aria-expanded", String(opened));
  toggle.title = `fan-out run ${run}: show its tasks`;
  id.append(toggle);
  const state = el("td");
  state.append(el("span", `state state-${summary.state}`, summary.state));
  const nodes = new Set(members.map((task) => task.node_id)).size;
  const command = el("td", "command", commandLine(members[0]));
  command.title = commandLine(members[0]);
  const progress = el("td", "exit progress",
    `${summary.done}/${summary.total} ${summary.unit} done` +
    (summary.failures ? `, ${summary.failures} failed` : ""));
  row.append(id, state, el("td", "", `${nodes} node${nodes === 1 ? "" : "s"}`), command,
    el("td", "duration", runDuration(members)), progress);
  row.addEventListener("click", () => {
    if (openRuns.has(run)) openRuns.delete(run);
    else openRuns.add(run);
    renderTasks();
  });
  return row;
}

function renderTasks() {
  const sorted = [...tasks.values()]
    .sort((a, b) => (b.created_at || "").localeCompare(a.created_at || ""))
    .slice(0, TASK_LIMIT);
  // A run takes the place of its newest task; its tasks follow it, in shard/batch order.
  const runs = new Map();
  for (const task of sorted) {
    if (!task.fanout) continue;
    if (!runs.has(task.fanout.run)) runs.set(task.fanout.run, []);
    runs.get(task.fanout.run).push(task);
  }
  const rows = [];
  const shown = new Set();
  for (const task of sorted) {
    if (!task.fanout) { rows.push(taskRow(task)); continue; }
    if (shown.has(task.fanout.run)) continue;
    shown.add(task.fanout.run);
    const members = runs.get(task.fanout.run);
    members.sort((a, b) => a.fanout.index - b.fanout.index);
    rows.push(runRow(task.fanout.run, members));
    if (openRuns.has(task.fanout.run)) {
      for (const member of members) {
        const row = taskRow(member);
        row.classList.add("fanout-member");
        rows.push(row);
      }
    }
  }
  $("tasks").replaceChildren(...rows);
  $("tasks-empty").hidden = rows.length > 0;
}

// The exit code, else the signal, else the end state; and why, unless the code says it all.
function outcome(task) {
  if (ACTIVE.has(task.state)) return {code: "", reason: ""};
  const code = task.exit_code !== null && task.exit_code !== undefined ? String(task.exit_code)
    : task.signal ? `signal ${task.signal}` : task.state;
  const reason = task.reason && !/^exited with code -?\d+$/.test(task.reason) ? task.reason : "";
  return {code, reason};
}

function outcomeCell(task) {
  const {code, reason} = outcome(task);
  const cell = el("td", "exit");
  cell.append(el("span", "code", code));
  if (reason) {
    cell.append(" ", el("span", "reason muted", reason));
    cell.title = reason;
  }
  return cell;
}

function tickDurations() {
  for (const row of $("tasks").querySelectorAll("tr.task")) {
    const task = tasks.get(row.dataset.taskId);
    if (task && ACTIVE.has(task.state)) row.querySelector(".duration").textContent = duration(task);
  }
  for (const row of $("queue").querySelectorAll("tr.queued")) {
    const task = queued.find((one) => one.id === row.dataset.taskId);
    if (task) row.querySelector(".waiting").textContent = waiting(task);
  }
  if (view) view.renderMeta();
  $("app").dataset.ticks = String(++ticks);
}

// -- task view -----------------------------------------------------------------------

function openFromHash() {
  const match = /^#task=(.+)$/.exec(location.hash);
  if (!secret) return;
  if (!match) { closeTask(); return; }
  const id = decodeURIComponent(match[1]);
  if (view && view.id === id) return;
  closeTask();
  view = new TaskView(id);
  renderTasks();
  // The view sits below up to 50 task rows: bring it to the reader, not the other way.
  $("task-view").scrollIntoView({block: "start"});
}

function closeTask() {
  if (!view) return;
  view.close();
  view = null;
  $("task-view").hidden = true;
  if (location.hash.startsWith("#task=")) {
    history.replaceState(null, "", location.pathname + location.search);
  }
  renderTasks();
}

class TaskView {
  constructor(id) {
    this.id = id;
    this.task = tasks.get(id) || null;
    this.offset = 0;  // bytes of output received so far
    this.decoder = new TextDecoder("utf-8");
    this.ansi = new AnsiWriter($("tv-output"));
    $("tv-output").replaceChildren();
    $("tv-id").textContent = id;
    $("tv-status").textContent = "attaching…";
    $("task-view").hidden = false;
    if (this.task) this.update(this.task);
    api(`/task/${encodeURIComponent(id)}`)
      .then((task) => { if (view === this) this.update(task); })
      .catch((error) => { if (view === this) $("tv-status").textContent = error.message; });
    if (live) live.attach(this);
  }

  update(task) {
    if (regresses(this.task, task)) return;
    this.task = task;
    const state = $("tv-state");
    state.textContent = task.state;
    state.className = `state state-${task.state}`;
    $("tv-command").textContent = commandLine(task);
    $("tv-cancel").disabled = !ACTIVE.has(task.state);
    this.renderMeta();
  }

  renderMeta() {
    const task = this.task;
    if (!task) return;
    const parts = [`node ${short(task.node_id)}`];
    if (task.started_at) parts.push(duration(task));
    if (task.exit_code !== null && task.exit_code !== undefined) parts.push(`exit ${task.exit_code}`);
    if (task.signal) parts.push(`signal ${task.signal}`);
    const usage = task.usage;  // from the cgroup's accounting, or sampled (marked)
    if (usage && usage.cpu_seconds !== null && usage.cpu_seconds !== undefined) {
      let text = `cpu ${Number(usage.cpu_seconds).toFixed(1)} s`;
      if (usage.memory_peak_bytes) text += `, peak memory ${Math.round(usage.memory_peak_bytes / 1048576)} MiB`;
      if (usage.processes_peak) text += `, ${usage.processes_peak} processes`;
      parts.push(usage.source === "sampled" ? `${text} (sampled)` : text);
    }
    if (task.oom_killed) parts.push("OOM killed");
    const {reason} = outcome(task);
    if (reason) parts.push(reason);
    $("tv-meta").textContent = parts.join(" · ");
  }

  output(message) {
    let bytes = message.encoding === "base64" ? base64Bytes(message.data)
      : new TextEncoder().encode(message.data);
    // Replay after a reconnect may overlap what we already have: cut by byte offset.
    if (message.offset < this.offset) bytes = bytes.slice(this.offset - message.offset);
    if (!bytes.length) return;
    this.offset = Math.max(this.offset, message.offset) + bytes.length;
    this.ansi.write(this.decoder.decode(bytes, {stream: true}), message.stream);
    if ($("tv-follow").checked) $("tv-output").scrollTop = $("tv-output").scrollHeight;
  }

  message(message) {
    switch (message.type) {
      case "attached":
        $("tv-status").textContent = "replaying output…";
        break;
      case "output":
        this.output(message);
        break;
      case "live":
        $("tv-status").textContent = "live";
        break;
      case "state":
        this.ansi.write(this.decoder.decode(), "stdout");
        $("tv-status").textContent = `ended: ${message.state}` +
          (message.reason ? ` (${message.reason})` : "");
        this.update({...(this.task || {id: this.id}), ...message, type: undefined});
        // The event has no timestamps: take the ended task's own finished_at from its
        // record (any node answers for any task), so the duration stops where it ended.
        api(`/task/${encodeURIComponent(this.id)}`)
          .then((task) => { if (view === this) this.update(task); })
          .catch(handleError);
        refreshTasks();
        break;
      case "error":
        $("tv-status").textContent = `error: ${message.message}`;
        break;
      default:
        break;
    }
  }

  async cancel() {
    $("tv-cancel").disabled = true;
    try {
      const task = await api(`/task/${encodeURIComponent(this.id)}/cancel`, {method: "POST"});
      $("tv-status").textContent = "cancel requested";
      this.update(task);
    } catch (error) {
      if (error instanceof Unauthorized) handleError(error);
      $("tv-status").textContent = error.status === 409 ? "the task had already ended"
        : `cancel failed: ${error.message}`;
    }
  }

  close() {
    if (live) live.detach(this.id);
  }
}

function base64Bytes(data) {
  const binary = atob(data);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

// -- ANSI colours --------------------------------------------------------------------

// SGR sequences (colours, bold, ...) become classes; every other escape and control
// character (cursor moves, titles, lone CR) is dropped, so output stays plain text.
const ESCAPE = /\x1b\[([0-9;?]*)([@-~])|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]|[\x00-\x08\x0b-\x1f\x7f]/g;
const INCOMPLETE = /\x1b(\[[0-9;?]{0,32}|\][^\x07\x1b]{0,256})?$/;

class AnsiWriter {
  constructor(pre) {
    this.pre = pre;
    this.pending = "";
    this.reset();
  }

  reset() {
    this.fg = null;
    this.bg = null;
    this.bold = false;
    this.dim = false;
    this.italic = false;
    this.underline = false;
  }

  write(text, stream) {
    text = this.pending + text;
    this.pending = "";
    const tail = INCOMPLETE.exec(text);
    if (tail) {  // an escape split across chunks: keep it for the next one
      this.pending = tail[0];
      text = text.slice(0, tail.index);
    }
    const fragment = document.createDocumentFragment();
    let last = 0;
    for (const match of text.matchAll(ESCAPE)) {
      if (match.index > last) fragment.append(this.span(text.slice(last, match.index), stream));
      if (match[2] === "m") this.sgr(match[1]);
      last = match.index + match[0].length;
    }
    if (last < text.length) fragment.append(this.span(text.slice(last), stream));
    this.pre.append(fragment);
    if (this.pre.childNodes.length > MAX_OUTPUT_NODES) this.trim();
  }

  span(text, stream) {
    const classes = [];
    if (stream === "stderr") classes.push("stderr");
    if (this.fg !== null && typeof this.fg === "number") classes.push(`fg${this.fg}`);
    if (this.bg !== null && typeof this.bg === "number") classes.push(`bg${this.bg}`);
    if (this.bold) classes.push("b");
    if (this.dim) classes.push("dim");
    if (this.italic) classes.push("i");
    if (this.underline) classes.push("u");
    if (!classes.length && this.fg === null && this.bg === null) {
      return document.createTextNode(text);
    }
    const span = el("span", classes.join(" "), text);
    if (typeof this.fg === "string") span.style.color = this.fg;
    if (typeof this.bg === "string") span.style.backgroundColor = this.bg;
    return span;
  }

  sgr(params) {
    const codes = params === "" ? [0] : params.split(";").map((p) => Number(p) || 0);
    for (let i = 0; i < codes.length; i++) {
      const code = codes[i];
      if (code === 0) this.reset();
      else if (code === 1) this.bold = true;
      else if (code === 2) this.dim = true;
      else if (code === 3) this.italic = true;
      else if (code === 4) this.underline = true;
      else if (code === 22) { this.bold = false; this.dim = false; }
      else if (code === 23) this.italic = false;
      else if (code === 24) this.underline = false;
      else if (code >= 30 && code <= 37) this.fg = code - 30;
      else if (code >= 90 && code <= 97) this.fg = code - 90 + 8;
      else if (code === 39) this.fg = null;
      else if (code >= 40 && code <= 47) this.bg = code - 40;
      else if (code >= 100 && code <= 107) this.bg = code - 100 + 8;
      else if (code === 49) this.bg = null;
      else if (code === 38 || code === 48) {
        const [color, used] = extendedColor(codes, i + 1);
        if (code === 38) this.fg = color; else this.bg = color;
        i += used;
      }
    }
  }

  trim() {
    const nodes = this.pre.childNodes;
    const drop = Math.floor(nodes.length / 2);
    for (let i = 0; i < drop; i++) this.pre.removeChild(this.pre.firstChild);
    this.pre.prepend(el("span", "muted", "[earlier output trimmed in this view]\n"));
  }
}

// 38;5;N (256 colours) and 38;2;R;G;B (true colour) → a CSS colour; returns [colour, used].
function extendedColor(codes, at) {
  if (codes[at] === 5 && at + 1 < codes.length) {
    const n = codes[at + 1];
    if (n < 16) return [n, 2];
    if (n >= 232) { const v = 8 + (n - 232) * 10; return [`rgb(${v},${v},${v})`, 2]; }
    const c = n - 16;
    const scale = (x) => (x ? 55 + x * 40 : 0);
    return [`rgb(${scale(Math.floor(c / 36))},${scale(Math.floor(c / 6) % 6)},${scale(c % 6)})`, 2];
  }
  if (codes[at] === 2 && at + 3 < codes.length) {
    return [`rgb(${codes[at + 1]},${codes[at + 2]},${codes[at + 3]})`, 4];
  }
  return [null, 0];
}

// -- WebSocket -----------------------------------------------------------------------

function tokenProtocol(value) {
  const bytes = new TextEncoder().encode(value);
  let binary = "";
  for (const byte of bytes) binary += String.fromCharCode(byte);
  return "oxide.token." + btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

function setConn(state, text) {
  $("conn").dataset.state = state;
  $("conn").textContent = text;
}

class Live {
  constructor() {
    this.socket = null;
    this.stopped = false;
    this.delay = 500;
  }

  connect() {
    if (this.stopped) return;
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    setConn("connecting", "connecting…");
    const socket = new WebSocket(`${scheme}//${location.host}/ws`,
      ["oxide.v1", tokenProtocol(secret)]);
    this.socket = socket;
    socket.onopen = () => {
      this.delay = 500;
      setConn("connecting", "subscribing…");
      this.send({op: "subscribe", topic: "cluster"});
      if (view) this.attach(view);
      refreshTasks();  // catch up on events missed while disconnected
    };
    socket.onmessage = (event) => this.received(JSON.parse(event.data));
    socket.onclose = () => {
      if (this.socket !== socket || this.stopped) return;
      setConn("off", "reconnecting…");
      // A refused handshake looks like any close here; the next HTTP call tells 401 apart.
      refreshNodes();
      setTimeout(() => this.connect(), this.delay);
      this.delay = Math.min(this.delay * 2, 10000);
    };
  }

  send(message) {
    if (this.socket && this.socket.readyState === WebSocket.OPEN) {
      this.socket.send(JSON.stringify(message));
    }
  }

  attach(taskView) {
    this.send({op: "attach", task: taskView.id, offset: taskView.offset});
  }

  detach(id) {
    this.send({op: "detach", task: id});
  }

  received(message) {
    if (message.type === "subscribed") {
      setConn("live", "live");  // from here on, no cluster event is missed
    } else if (message.type === "task" && message.task) {
      upsertTask(message.task);
    } else if (message.type === "node" || message.type === "leader") {
      clearTimeout(this.nodesSoon);
      this.nodesSoon = setTimeout(refreshNodes, 100);
    } else if (message.task && view && message.task === view.id) {
      view.message(message);
    }
  }

  stop() {
    this.stopped = true;
    if (this.socket) this.socket.close(1000, "signed out");
  }
}

// -- wiring --------------------------------------------------------------------------

$("login").addEventListener("submit", signIn);
$("logout").addEventListener("click", () => signOut(""));
$("state-filter").addEventListener("change", refreshTasks);
$("tv-cancel").addEventListener("click", () => view && view.cancel());
$("tv-close").addEventListener("click", closeTask);
$("tv-output").addEventListener("scroll", () => {
  const pre = $("tv-output");
  $("tv-follow").checked = pre.scrollHeight - pre.scrollTop - pre.clientHeight < 24;
});
window.addEventListener("hashchange", openFromHash);

if (secret) start(); else signOut("");
