/*
 * aigc-bot operator console (GET /operator). Plain JS, no build step.
 *
 * Sign in with an operator token (kept in sessionStorage: this tab only);
 * the lists of waiting and claimed conversations come from
 * GET /api/operator/conversations and stay current through the Server-Sent
 * Events of GET /api/operator/events, read with fetch (so the token travels
 * in the Authorization header, never in a URL). Pick a conversation to read
 * its transcript, claim it, answer, release it to the bot.
 *
 * Everything a user, the bot or an operator wrote is set with textContent:
 * nothing from the server is ever parsed as HTML.
 */
(function () {
  "use strict";

  var TOKEN_KEY = "aigc-bot-operator:token";
  var $ = function (id) { return document.getElementById(id); };

  var state = {
    token: null,
    operator: null,
    conversations: {},   // id -> conversation view
    selected: null,      // id of the conversation shown
    shown: {},           // keys of the messages in the transcript
    stream: null,        // AbortController of the event stream
  };

  // -- helpers -----------------------------------------------------------------------

  function el(tag, props, children) {
    var node = document.createElement(tag);
    Object.keys(props || {}).forEach(function (key) {
      if (key === "text") node.textContent = props[key];
      else if (key === "class") node.className = props[key];
      else if (key.indexOf("aria-") === 0 || key.indexOf("data-") === 0 || key === "role")
        node.setAttribute(key, props[key]);
      else node[key] = props[key];
    });
    (children || []).forEach(function (child) { if (child) node.appendChild(child); });
    return node;
  }

  function storageGet() {
    try { return window.sessionStorage.getItem(TOKEN_KEY); } catch (e) { return null; }
  }
  function storageSet(value) {
    try {
      if (value === null) window.sessionStorage.removeItem(TOKEN_KEY);
      else window.sessionStorage.setItem(TOKEN_KEY, value);
    } catch (e) { /* storage disabled: signed in for this page view only */ }
  }

  function duration(ms) {
    var seconds = Math.max(0, Math.floor(ms / 1000));
    if (seconds < 60) return seconds + " s";
    var minutes = Math.floor(seconds / 60);
    if (minutes < 60) return minutes + " min " + (seconds % 60) + " s";
    var hours = Math.floor(minutes / 60);
    if (hours < 48) return hours + " h " + (minutes % 60) + " min";
    return Math.floor(hours / 24) + " days";
  }

  function clock(at) {
    var moment = new Date(at);
    if (isNaN(moment.getTime())) return "";
    return moment.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  }

  function shortId(view) {
    var id = String(view.user_id || view.chat_id || "");
    return id.length > 6 ? id.slice(-6) : id;
  }

  function personOf(view) {
    if (view.user_name) return view.user_name;
    return (view.platform === "web" ? "Web visitor" : (view.platform || "A") + " user") + " " + shortId(view);
  }

  function announce(text) {
    var announcer = $("announcer");
    announcer.textContent = "";
    window.setTimeout(function () { announcer.textContent = text; }, 50);
  }

  function setStatus(text, isError) {
    var status = $("status");
    status.textContent = text || "";
    status.classList.toggle("error", !!isError);
  }

  function Unauthorized() {}

  async function api(method, path, body) {
    var options = {
      method: method,
      headers: { Authorization: "Bearer " + state.token, Accept: "application/json" },
    };
    if (body !== undefined) {
      options.headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(body);
    }
    var response = await fetch(path, options);
    if (response.status === 401) throw new Unauthorized();
    var data = null;
    try { data = await response.json(); } catch (e) { /* not JSON */ }
    if (!response.ok) {
      var error = new Error((data && data.error) || "The server answered HTTP " + response.status + ".");
      error.status = response.status;
      error.data = data;
      throw error;
    }
    return data;
  }

  function failed(error, what) {
    if (error instanceof Unauthorized) return signOut("Your token was refused. Sign in again.");
    setStatus(what + ": " + (error.message || "the console cannot reach the bot."), true);
  }

  // -- the lists -----------------------------------------------------------------------

  function upsert(view) {
    var known = state.conversations[view.id];
    var isNew = !known || known.state !== view.state;
    state.conversations[view.id] = view;
    renderLists();
    if (view.id === state.selected) renderHead();
    if (isNew && view.state === "waiting") announce(personOf(view) + " on " + view.platform + " is waiting.");
  }

  function sorted(kind) {
    return Object.keys(state.conversations)
      .map(function (id) { return state.conversations[id]; })
      .filter(function (view) { return view.state === kind; })
      .sort(function (a, b) { return a.since < b.since ? 1 : a.since > b.since ? -1 : b.id - a.id; });
  }

  function renderLists() {
    ["waiting", "claimed"].forEach(function (kind) {
      var list = $(kind + "-list");
      var views = sorted(kind);
      var focused = document.activeElement && document.activeElement.getAttribute("data-id");
      list.textContent = "";
      views.forEach(function (view) {
        var button = el("button", {
          type: "button",
          class: "item" + (view.id === state.selected ? " selected" : ""),
          "data-id": String(view.id),
          "aria-current": view.id === state.selected ? "true" : "false",
        }, [
          el("span", { class: "line" }, [
            el("span", { class: "name", text: personOf(view) }),
            el("span", { class: "platform", text: view.platform + (view.user_name ? " · " + shortId(view) : "") }),
          ]),
          el("span", { class: "since", "data-since": view.since, "data-kind": kind,
                       "data-operator": view.operator || "" }),
          el("span", { class: "last", text: view.last_text || "(no message yet)" }),
        ]);
        button.addEventListener("click", function () { select(view.id, true); });
        list.appendChild(el("li", {}, [button]));
        if (focused === String(view.id)) button.focus();
      });
      $(kind + "-count").textContent = String(views.length);
      $(kind + "-empty").hidden = views.length > 0;
    });
    tick();
  }

  function sinceLabel(kind, since, operator) {
    var waited = duration(Date.now() - new Date(since).getTime());
    if (kind === "waiting") return "waiting " + waited;
    if (kind === "claimed") return (operator === state.operator ? "you" : operator || "someone") + " · " + waited;
    return waited;
  }

  function tick() {
    document.querySelectorAll("[data-since]").forEach(function (node) {
      node.textContent = sinceLabel(node.getAttribute("data-kind"), node.getAttribute("data-since"),
                                    node.getAttribute("data-operator"));
    });
  }

  async function loadLists() {
    var answers = await Promise.all([
      api("GET", "/api/operator/conversations?state=waiting"),
      api("GET", "/api/operator/conversations?state=claimed"),
    ]);
    var fresh = {};
    answers.forEach(function (data) {
      (data.conversations || []).forEach(function (view) { fresh[view.id] = view; });
    });
    if (state.selected !== null && !fresh[state.selected] && state.conversations[state.selected]) {
      fresh[state.selected] = state.conversations[state.selected];  // keep the one on screen
    }
    state.conversations = fresh;
    renderLists();
  }

  // -- the conversation ----------------------------------------------------------------

  function renderHead() {
    var view = state.conversations[state.selected];
    if (!view) return;
    $("conversation-title").textContent = personOf(view);
    var where = view.platform + " · chat " + view.chat_id;
    var who = view.state === "claimed"
      ? "claimed by " + (view.operator === state.operator ? "you" : view.operator)
      : view.state === "waiting" ? "waiting for a person" : "with the bot";
    var meta = $("conversation-meta");
    meta.textContent = where + " · " + who + " for ";
    meta.appendChild(el("span", { "data-since": view.since, "data-kind": "for" }));
    var mine = view.state === "claimed" && view.operator === state.operator;
    var other = view.state === "claimed" && !mine;
    $("claim").hidden = mine;
    $("claim").disabled = other;
    $("release").hidden = view.state === "bot" || other;
    $("reply").disabled = other;
    $("send").disabled = other;
    $("reply").placeholder = other ? view.operator + " has this conversation." : "Write to " + personOf(view) + "…";
    tick();
  }

  function messageKey(message) {
    return [message.role, message.at, message.text].join("\u0000");
  }

  function addMessage(message, scroll) {
    var key = messageKey(message);
    if (state.shown[key]) return;
    state.shown[key] = true;
    var transcript = $("transcript");
    var stick = transcript.scrollHeight - transcript.scrollTop - transcript.clientHeight < 80;
    var role = message.role === "user" || message.role === "operator" ? message.role : "bot";
    var view = state.conversations[state.selected] || {};
    var who = role === "user" ? personOf(view) : role === "bot" ? "Bot" : message.author || "Operator";
    transcript.appendChild(el("li", { class: "msg " + role }, [
      el("span", { class: "sr-only", text: (role === "operator" ? "Operator " : role === "bot" ? "" : "Visitor ") + who + " said: " }),
      el("span", { class: "who", "aria-hidden": "true" }, [
        el("span", { text: who }),
        el("time", { dateTime: message.at, text: clock(message.at) }),
      ]),
      el("span", { class: "text", text: message.text }),
    ]));
    if (scroll || stick) transcript.scrollTop = transcript.scrollHeight;
  }

  async function select(id, moveFocus) {
    state.selected = id;
    state.shown = {};
    $("transcript").textContent = "";
    $("placeholder").hidden = true;
    $("chosen").hidden = false;
    setStatus("");
    if (location.hash !== "#conversation=" + id) history.replaceState(null, "", "#conversation=" + id);
    renderLists();
    try {
      var data = await api("GET", "/api/operator/conversations/" + id);
      if (state.selected !== id) return;
      state.conversations[id] = data.conversation;
      renderLists();
      renderHead();
      (data.messages || []).forEach(function (message) { addMessage(message, true); });
      if (moveFocus) $("conversation-title").focus();
    } catch (error) {
      failed(error, "The conversation could not be loaded");
    }
  }

  async function change(what) {
    var id = state.selected;
    if (id === null) return;
    try {
      var data = await api("POST", "/api/operator/conversations/" + id + "/" + what);
      upsert(data.conversation);
      setStatus(what === "claim" ? "You have this conversation." : "Released: the bot answers again.");
      if (what === "claim") $("reply").focus();
      else $("conversation-title").focus();
    } catch (error) {
      if (error.status === 409 && error.data && error.data.conversation) upsert(error.data.conversation);
      failed(error, what === "claim" ? "Not claimed" : "Not released");
    }
  }

  async function sendReply(event) {
    event.preventDefault();
    var field = $("reply");
    var text = field.value.trim();
    var id = state.selected;
    if (!text || id === null) return;
    $("send").disabled = true;
    try {
      var data = await api("POST", "/api/operator/conversations/" + id + "/messages", { text: text });
      field.value = "";
      upsert(data.conversation);
      if (state.selected === id) addMessage(data.message, true);
      setStatus(data.delivered ? "Sent." : "Saved; it will show in the user's history (their platform is not reachable from here).");
    } catch (error) {
      if (error.status === 409 && error.data && error.data.conversation) upsert(error.data.conversation);
      failed(error, "Not sent");
    } finally {
      renderHead();
      field.focus();
    }
  }

  // -- live updates --------------------------------------------------------------------

  function onEvent(name, data) {
    if (name === "ready") {
      $("connection").textContent = "Live";
      $("connection").classList.remove("offline");
      return;
    }
    if (!data || !data.conversation) return;
    var view = data.conversation;
    if (view.state === "bot" && view.id !== state.selected) {
      delete state.conversations[view.id];
      renderLists();
    } else {
      upsert(view);
    }
    if (name === "message" && data.message && view.id === state.selected) addMessage(data.message, false);
  }

  async function readEvents(response) {
    var reader = response.body.getReader();
    var decoder = new TextDecoder();
    var buffer = "";
    for (;;) {
      var chunk = await reader.read();
      if (chunk.done) return;
      buffer += decoder.decode(chunk.value, { stream: true }).replace(/\r\n?/g, "\n");
      var cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        var block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        var name = "message";
        var lines = [];
        block.split("\n").forEach(function (line) {
          if (!line || line.charAt(0) === ":") return;
          var colon = line.indexOf(":");
          var field = colon < 0 ? line : line.slice(0, colon);
          var value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
          if (field === "event") name = value;
          else if (field === "data") lines.push(value);
        });
        if (lines.length) {
          try { onEvent(name, JSON.parse(lines.join("\n"))); } catch (e) { /* a bad event is skipped */ }
        }
      }
    }
  }

  async function listen() {
    var pause = 1000;
    var first = true;
    while (state.token) {
      var controller = new AbortController();
      state.stream = controller;
      try {
        var response = await fetch("/api/operator/events", {
          headers: { Authorization: "Bearer " + state.token, Accept: "text/event-stream" },
          signal: controller.signal,
        });
        if (response.status === 401) return signOut("Your token was refused. Sign in again.");
        if (!response.ok || !response.body) throw new Error("HTTP " + response.status);
        if (!first) {  // catch up on what happened while the stream was down
          await loadLists();
          if (state.selected !== null) await select(state.selected, false);
        }
        first = false;
        pause = 1000;
        await readEvents(response);
      } catch (error) {
        if (controller.signal.aborted) return;
        if (error instanceof Unauthorized) return signOut("Your token was refused. Sign in again.");
      }
      first = false;
      $("connection").textContent = "Reconnecting…";
      $("connection").classList.add("offline");
      await new Promise(function (resolve) { window.setTimeout(resolve, pause); });
      pause = Math.min(pause * 2, 30000);
    }
  }

  // -- signing in and out ----------------------------------------------------------------

  async function signIn(token) {
    state.token = token;
    try {
      state.operator = (await api("GET", "/api/operator/me")).operator;
    } catch (error) {
      state.token = null;
      if (error instanceof Unauthorized) return showSignIn("That token was not accepted.");
      return showSignIn("The console cannot reach the bot: " + (error.message || "try again."));
    }
    $("who-name").textContent = state.operator;
    storageSet(token);
    $("sign-in").hidden = true;
    $("desk").hidden = false;
    $("who").hidden = false;
    $("connection").textContent = "Connecting…";
    listen();
    try {
      await loadLists();
    } catch (error) {
      return failed(error, "The lists could not be loaded");
    }
    var wanted = /^#conversation=(\d+)$/.exec(location.hash);
    if (wanted) select(parseInt(wanted[1], 10), true);
    else if (document.activeElement === document.body || document.activeElement === $("token")) {
      var first = document.querySelector(".list .item");
      (first || $("waiting-title")).focus();
    }
  }

  function showSignIn(message) {
    $("desk").hidden = true;
    $("who").hidden = true;
    $("sign-in").hidden = false;
    $("sign-in-error").textContent = message || "";
    $("token").value = "";
    $("token").focus();
  }

  function signOut(message) {
    state.token = null;
    storageSet(null);
    if (state.stream) state.stream.abort();
    state.conversations = {};
    state.selected = null;
    $("chosen").hidden = true;
    $("placeholder").hidden = false;
    showSignIn(message);
  }

  // -- wiring ------------------------------------------------------------------------------

  $("sign-in-form").addEventListener("submit", function (event) {
    event.preventDefault();
    var token = $("token").value.trim();
    if (!token) {
      $("sign-in-error").textContent = "Enter your operator token.";
      return;
    }
    $("sign-in-error").textContent = "";
    signIn(token);
  });
  $("sign-out").addEventListener("click", function () { signOut(""); });
  $("claim").addEventListener("click", function () { change("claim"); });
  $("release").addEventListener("click", function () { change("release"); });
  $("reply-form").addEventListener("submit", sendReply);
  $("reply").addEventListener("keydown", function (event) {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("reply-form").requestSubmit();
    }
  });
  $("waiting-title").tabIndex = -1;
  window.setInterval(tick, 1000);
  var saved = storageGet();
  if (saved) signIn(saved);
  else showSignIn("");
})();
