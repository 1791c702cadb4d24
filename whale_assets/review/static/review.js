// The review page's actions: buttons and keyboard shortcuts post to the app's JSON API,
// then load the photo that most needs a human next. Nothing here is loaded from elsewhere.
(function () {
  "use strict";
  const body = document.body;
  const status = document.getElementById("status");
  const reviewer = document.getElementById("reviewer");
  const KEY = "whale-review-reviewer";

  function say(message, bad) {
    status.textContent = message;
    status.className = bad ? "bad" : "ok";
  }

  if (reviewer) {
    reviewer.value = localStorage.getItem(KEY) || "";
    reviewer.addEventListener("input", () => localStorage.setItem(KEY, reviewer.value.trim()));
  }
  const flash = sessionStorage.getItem("whale-review-flash");
  if (flash) {
    sessionStorage.removeItem("whale-review-flash");
    const [bad, message] = JSON.parse(flash);
    say(message, bad);
  }

  const batch = body.dataset.batch;
  if (!batch) return; // the list of batches: nothing to act on
  const photo = body.dataset.photo === "" ? null : Number(body.dataset.photo);

  function go(target, message, bad) {
    if (message) sessionStorage.setItem("whale-review-flash", JSON.stringify([!!bad, message]));
    const query = target === null || target === undefined || target === "" ? "" : "?photo=" + encodeURIComponent(target);
    location.href = "/batch/" + encodeURIComponent(batch) + query;
  }

  async function post(action, data) {
    const name = reviewer ? reviewer.value.trim() : "";
    if (!name) {
      if (reviewer) reviewer.focus();
      throw new Error("Enter your name as reviewer first: every decision is kept with who took it.");
    }
    const response = await fetch("/api/batch/" + encodeURIComponent(batch) + "/" + action, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(Object.assign({}, data, { reviewer: name })),
    });
    let answer;
    try {
      answer = await response.json();
    } catch (e) {
      answer = { error: response.status + " " + response.statusText };
    }
    if (!response.ok) {
      let why = answer.error || answer.detail || response.statusText;
      if (typeof why !== "string") why = JSON.stringify(why);
      throw new Error(why);
    }
    return answer;
  }

  let busy = false;
  async function act(work) {
    if (busy) return;
    busy = true;
    try {
      await work();
    } catch (e) {
      say(e.message, true);
    } finally {
      busy = false;
    }
  }

  function decide(action, individual) {
    return act(async () => {
      const answer = await post("decide", { photo: photo, action: action, individual_id: individual || "" });
      const d = answer.decision;
      const what = d.action === "skip" ? "skipped" : d.action + " " + d.individual_id;
      go(answer.next === null ? photo : answer.next, d.image + ": " + what + " (waiting to be enrolled: press E to enrol)");
    });
  }

  function undo() {
    return act(async () => {
      const answer = await post("undo", {});
      go(answer.next, "undone: " + answer.undone.image + " " + answer.undone.action + " " + answer.undone.individual_id);
    });
  }

  function enrol() {
    return act(async () => {
      say("enrolling: checking, cropping and embedding the decided photos…", false);
      const answer = await post("enrol", {});
      go(photo, answer.message);
    });
  }

  const newId = document.getElementById("new-id");
  function markNew() {
    return decide("new", newId ? newId.value.trim() : "");
  }

  document.querySelectorAll("button.confirm").forEach((b) => b.addEventListener("click", () => decide("confirm", b.dataset.individual)));
  const bind = (id, fn) => {
    const el = document.getElementById(id);
    if (el) el.addEventListener("click", fn);
  };
  bind("new-individual", markNew);
  bind("skip", () => decide("skip", ""));
  bind("undo", undo);
  bind("enrol", enrol);

  document.addEventListener("keydown", (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    if (e.target.matches("input, textarea, select")) {
      if (e.key === "Escape") e.target.blur();
      if (e.key === "Enter" && e.target === newId) {
        e.preventDefault();
        markNew();
      }
      return;
    }
    const key = e.key.toLowerCase();
    if (key >= "1" && key <= "5") {
      const b = document.getElementById("confirm-" + key);
      if (b) b.click();
    } else if (key === "n") {
      markNew();
    } else if (key === "s") {
      decide("skip", "");
    } else if (key === "u") {
      undo();
    } else if (key === "e") {
      enrol();
    } else if ((key === "j" || key === "arrowright") && body.dataset.next !== "") {
      go(body.dataset.next);
    } else if ((key === "k" || key === "arrowleft") && body.dataset.prev !== "") {
      go(body.dataset.prev);
    } else {
      return;
    }
    e.preventDefault();
  });
})();
