// The "Start run" button of a run link: POST the conf to Airflow's REST API (the UI's session
// cookie authenticates; Airflow validates the conf against the Dag's params), then open the run.
(function () {
  "use strict";
  const button = document.getElementById("start");
  const outcome = document.getElementById("outcome");
  const dagId = button.dataset.dagId;
  const conf = JSON.parse(button.dataset.conf);
  const api = new URL("../../api/v2/dags/" + encodeURIComponent(dagId), window.location.href);
  if (conf === null) { button.disabled = true; return; }

  function show(kind, text) {
    outcome.className = kind;
    outcome.textContent = text;
  }

  async function detail(reply) {
    try {
      const body = await reply.json();
      return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail ?? body);
    } catch (e) {
      return reply.statusText;
    }
  }

  button.addEventListener("click", async function () {
    button.disabled = true;
    show("", "starting…");
    const headers = { "Content-Type": "application/json" };
    if (document.getElementById("unpause").checked) {
      const reply = await fetch(api, { method: "PATCH", headers, credentials: "same-origin",
                                       body: JSON.stringify({ is_paused: false }) });
      if (!reply.ok) {
        show("error", "Could not unpause the Dag (" + reply.status + "): " + await detail(reply));
        button.disabled = false;
        return;
      }
    }
    const reply = await fetch(api + "/dagRuns", {
      method: "POST", headers, credentials: "same-origin",
      body: JSON.stringify({ logical_date: null, conf: conf }),
    });
    if (!reply.ok) {
      show("error", "Airflow refused the run (" + reply.status + "): " + await detail(reply));
      button.disabled = false;
      return;
    }
    const run = await reply.json();
    const runUrl = new URL("../../dags/" + encodeURIComponent(dagId) + "/runs/" +
                           encodeURIComponent(run.dag_run_id), window.location.href);
    show("ok", "Run " + run.dag_run_id + " started; opening it…");
    outcome.dataset.runId = run.dag_run_id;
    window.location.assign(runUrl.href);
  });
})();
