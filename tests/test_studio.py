"""`studio` as a real server process on 127.0.0.1 over a workspace holding the tiny GPT-2 and a slice of the SMS
data: a run queued through the API, watched on its event stream, stopped (checkpoint), resumed and finished, listed
and classified with; bad input answered with its one-line error beside the field; a failing run; a studio started
again finding its runs; and the same loop through the page in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx
import pytest

from lora_ft import data
from lora_ft.core.errors import UserError
from lora_ft.engine import runs
from lora_ft.tasks import classify

from .conftest import DATA_DIR, REPO, tree_sha256
from .test_serve import Server

MESSAGES = ["WINNER!! You have been selected to receive a £900 prize reward! Call 09061701461 now", "see you at 5"]
UPLOAD_CAP_MB = 0.01  # a 10 KiB cap on uploads, so that an oversized one is small
# A few hundred tiny steps: long enough to stop in the middle, seconds on 2 cores. fp32: the same on every CPU.
RUN = {"model": "models/tiny", "data": "sms.tsv", "max_steps": 200, "batch_size": 2, "precision": "fp32"}


class Studio(Server):
    """`python -m lora_ft studio --workspace WS --port 0` in its own process, with a client for its API."""

    COMMAND, READY = "studio", r"studio at (http://\S+)/ "

    def __init__(self, workspace: Path, *args: str):
        super().__init__("--workspace", str(workspace), *args, timeout=180)
        self.client = httpx.Client(base_url=self.url, timeout=120)

    def stop(self, signum: int = signal.SIGINT) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signum)
        return self.process.wait(120)

    def wait_for(self, run_id: str, done, timeout: float = 300) -> dict:
        """The run's view once `done(view)` holds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            view = self.client.get(f"/api/runs/{run_id}").json()
            if done(view):
                return view
            time.sleep(0.5)
        pytest.fail(f"run {run_id} did not get there: {view}\n{self.client.get(f'/api/runs/{run_id}/log').json()}")

    def events_until(self, run_id: str, points: int) -> dict:
        """Read the run's event stream until its train-loss curve has `points` points; the last event."""
        with self.client.stream("GET", f"/api/runs/{run_id}/events", timeout=300) as stream:
            assert stream.status_code == 200 and stream.headers["content-type"].startswith("text/event-stream")
            for line in stream.iter_lines():
                if line.startswith("data:"):
                    view = json.loads(line[5:])
                    if len(view["progress"]["train_loss"]) >= points:
                        return view
        pytest.fail("the event stream ended")


def ended(view: dict) -> bool:
    return view["status"] not in ("queued", "running", "stopping")


def _first_checkpoint(partial: Path, seconds: float = 300) -> None:
    """Wait until the run has saved its first checkpoint (after its first evaluation): a stop sent before it stops
    the run with nothing to resume from, which is right but not what these tests follow."""
    deadline = time.monotonic() + seconds
    while runs.newest_checkpoint(partial) is None:
        assert time.monotonic() < deadline, f"no checkpoint in {partial} after {seconds} s"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def workspace(tiny_gpt2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model, 200 SMS rows, a data file with a bad row, and a file of the user's own, which nothing may
    change."""
    folder = tmp_path_factory.mktemp("workspace")
    shutil.copytree(tiny_gpt2, folder / "models" / "tiny")
    rows = (DATA_DIR / "sms_spam_collection" / "SMSSpamCollection").read_text(encoding="utf-8").splitlines()[:200]
    (folder / "sms.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (folder / "bad.tsv").write_text("ham\tfine\nspam without a tab\n", encoding="utf-8")
    (folder / "notes.txt").write_text("mine\n", encoding="utf-8")
    (folder / "models" / "broken").mkdir()  # a "model" that is no model: its run fails
    return folder


@pytest.fixture(scope="module")
def studio(workspace: Path):
    mine = tree_sha256(workspace)
    server = Studio(workspace, "--max-upload-mb", str(UPLOAD_CAP_MB))
    yield server
    server.stop()
    assert "Traceback" not in server.output, server.output
    now = tree_sha256(workspace)
    assert {name: now.get(name) for name in mine} == mine  # what the studio did not make is as it was


@pytest.fixture(scope="module")
def finished_run(studio: Studio, workspace: Path) -> dict:
    """A run through the API: queued, streamed until its curve has points, stopped, resumed, finished."""
    response = studio.client.post("/api/runs", json={"task": "spam", "settings": RUN})
    assert response.status_code == 201, response.text
    run_id = response.json()["id"]
    view = studio.events_until(run_id, points=2)
    assert view["status"] == "running" and view["progress"]["last"]["max_steps"] == RUN["max_steps"]
    _first_checkpoint(workspace / "adapters" / f".{run_id}.partial")
    stopping = studio.client.post(f"/api/runs/{run_id}/stop").json()
    assert stopping["status"] == "stopping"
    stopped = studio.wait_for(run_id, ended)
    checkpoint = runs.newest_checkpoint(workspace / "adapters" / f".{run_id}.partial")
    assert stopped["status"] == "stopped" and stopped["resumable"], stopped
    assert checkpoint is not None and stopped["note"] == (
        f"interrupted by SIGINT at step {checkpoint.name.removeprefix('checkpoint-')}, checkpoint saved"
    )
    assert studio.client.post(f"/api/runs/{run_id}/resume").json()["status"] == "queued"
    view = studio.wait_for(run_id, ended)
    assert view["status"] == "finished", view
    return view | {"stopped_at": int(checkpoint.name.removeprefix("checkpoint-"))}


def test_a_run_is_queued_watched_stopped_resumed_and_finished(studio, finished_run, workspace):
    run_id, stopped_at = finished_run["id"], finished_run["stopped_at"]
    assert 0 < stopped_at < RUN["max_steps"]
    steps = [step for step, _ in finished_run["progress"]["train_loss"]]
    every = steps[0]  # Trainer's logging_steps
    # each logged step once: the resumed run's lines superseded those the stopped one wrote after its checkpoint
    assert steps == list(range(every, RUN["max_steps"] + 1, every))
    assert finished_run["metrics"]["examples"] > 0 and 0 <= finished_run["metrics"]["accuracy"] <= 1
    manifest = json.loads((workspace / "adapters" / run_id / "lora_ft.json").read_text())
    assert manifest["training"]["resumed_at_steps"] == [stopped_at]
    log = studio.client.get(f"/api/runs/{run_id}/log").json()["log"]
    assert f"resume with: python -m lora_ft spam --resume adapters/{run_id}" in log
    assert f"--resume {workspace / 'adapters' / run_id}" in log  # the studio resumed it so

    listing = studio.client.get("/api/runs").json()
    (row,) = [a for a in listing["adapters"] if a["name"] == run_id]
    assert row["kind"] == "adapter" and row["task"] == "spam" and row["base"] == "tiny"
    assert row["path"] == f"adapters/{run_id}" and row["value"] == finished_run["metrics"]["accuracy"]
    assert [r["status"] for r in listing["runs"] if r["id"] == run_id] == ["finished"]


def test_a_finished_run_classifies_as_predict_does(studio, finished_run, workspace):
    run_id = finished_run["id"]
    answer = studio.client.post("/v1/classify", json={"model": run_id, "input": MESSAGES})
    assert answer.status_code == 200, answer.text
    expected = classify.predict(workspace / "adapters" / run_id, MESSAGES)
    got = answer.json()["data"]
    assert [p["label"] for p in got] == [p.label for p in expected]
    assert [p["score"] for p in got] == pytest.approx([p.score for p in expected], abs=1e-4)
    models = studio.client.get("/v1/models").json()["data"]
    assert [m["id"] for m in models] == [run_id] and models[0]["serves"] == "classify"
    missing = studio.client.post("/v1/classify", json={"model": "spam-nope", "input": ["x"]})
    assert missing.status_code == 404 and "spam-nope" in missing.json()["error"]["message"]


def test_opened_and_compared(studio, finished_run, workspace):
    run_id = finished_run["id"]
    opened = studio.client.get("/api/adapter", params={"path": f"adapters/{run_id}"}).json()
    assert opened["metrics"]["test"] == finished_run["metrics"]
    assert f"adapters/{run_id}: spam adapter (lora)" in opened["inspection"]
    assert f"adapters/{run_id}/loss.png" in opened["pngs"]
    png = studio.client.get("/api/files", params={"path": f"adapters/{run_id}/loss.png"})
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
    shutil.copytree(workspace / "adapters" / run_id, workspace / "adapters" / "copy")
    try:
        both = studio.client.post("/api/compare", json={"paths": [f"adapters/{run_id}", "adapters/copy"]}).json()
    finally:
        shutil.rmtree(workspace / "adapters" / "copy")
    assert [r["name"] for r in both["results"]["runs"]] == [f"adapters/{run_id}", "adapters/copy"]
    assert both["table"].startswith("| run | method | r |") and both["plot"].startswith("data:image/png;base64,")


BAD_SETTINGS = [  # (settings, the field the error is shown beside, words of the error)
    ({"lr": -1}, "lr", "settings: 'lr' must be > 0, got -1"),
    ({"batch_size": "eight"}, "batch_size", "'batch_size' must be int"),
    ({"max_new_tokens": 8}, "max_new_tokens", "'max_new_tokens' belongs to tasks instruct and prefer, not spam"),
    ({"data": "../sms.tsv"}, "data", "data ../sms.tsv: outside the workspace"),
    ({"data": "/etc/hostname"}, "data", "data /etc/hostname: outside the workspace"),
    ({"data": "link.tsv"}, "data", "data link.tsv: outside the workspace"),
    ({"data": "missing.tsv"}, "data", "missing.tsv: data file not found"),
    ({"model": "/tmp"}, "model", "model /tmp: outside the workspace"),
    ({"output": "elsewhere"}, "output", "the studio names each run's folder"),
]


@pytest.mark.parametrize(("settings", "field", "words"), BAD_SETTINGS)
def test_bad_settings_get_their_error_beside_the_field(studio, workspace, settings, field, words):
    link = workspace / "link.tsv"
    if not link.is_symlink():
        link.symlink_to(DATA_DIR / "sms_spam_collection" / "SMSSpamCollection")  # a symlink out of the workspace
    for path in ("/api/check", "/api/runs"):
        response = studio.client.post(path, json={"task": "spam", "settings": settings})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["field"] == field and words in error["message"], error
    assert studio.client.get("/health").json()["status"] == "ok"


def test_a_bad_data_file_gets_the_readers_own_error(studio, workspace):
    with pytest.raises(UserError) as refused:
        data.read_labeled(workspace / "bad.tsv")
    error = studio.client.post("/api/check", json={"task": "spam", "settings": {"data": "bad.tsv"}}).json()["error"]
    assert error == error | {"field": "data", "message": str(refused.value).replace(f"{workspace}/", "")}
    assert error["message"].startswith("bad.tsv: line 2")


def test_uploads_are_capped_and_read_by_the_same_reader(studio, workspace):
    uploads = workspace / "studio" / "uploads"
    good = (workspace / "sms.tsv").read_bytes()[:6000]
    done = studio.client.post("/api/uploads", params={"name": "my sms.tsv", "task": "spam"}, content=good)
    assert done.status_code == 200, done.text
    assert re.fullmatch(r"studio/uploads/\d{8}-\d{6}-my_sms.tsv", done.json()["path"])
    assert (workspace / done.json()["path"]).read_bytes() == good
    bad = studio.client.post("/api/uploads", params={"name": "bad.tsv"}, content=b"ham\tok\nno tab here\n").json()
    assert bad["error"]["field"] == "data" and "line 2" in bad["error"]["message"]
    big = studio.client.post("/api/uploads", params={"name": "big.tsv"}, content=good * 2)
    assert big.status_code == 413
    assert big.json()["error"]["message"] == "big.tsv: over the 10,485 bytes an upload may be"
    huge = studio.client.post("/api/uploads", params={"name": "huge.tsv"}, content=good * 20)  # refused unread
    assert huge.status_code == 413 and "over this server's" in huge.json()["error"]["message"]
    assert sorted(p.name for p in uploads.iterdir()) == [Path(done.json()["path"]).name]  # refused ones are gone
    traversal = studio.client.post("/api/uploads", params={"name": "../../evil.tsv"}, content=good).json()
    assert traversal["path"].startswith("studio/uploads/") and traversal["path"].endswith("-evil.tsv")


def test_unknown_runs_and_wrong_actions_are_json_errors(studio, finished_run):
    for method, path in (("GET", "/api/runs/nope"), ("GET", "/api/runs/nope/events"), ("POST", "/api/runs/nope/stop")):
        response = studio.client.request(method, path)
        assert response.status_code == 404 and "no run 'nope'" in response.json()["error"]["message"]
    again = studio.client.post(f"/api/runs/{finished_run['id']}/resume")
    assert again.status_code == 400 and "only a stopped or interrupted run can be resumed" in again.text
    unknown = studio.client.post("/api/runs", json={"task": "poetry", "settings": {}})
    assert unknown.status_code == 400 and "unknown task 'poetry'" in unknown.text


def test_a_foreign_host_is_refused_without_a_key(studio):
    """DNS rebinding: a page whose name was made to resolve to 127.0.0.1 sends its own name as Host."""
    refused = studio.client.get("/api/runs", headers={"Host": "evil.example:7860"})
    assert refused.status_code == 421 and refused.json()["error"]["code"] == "host_not_allowed"
    assert studio.client.get("/api/runs", headers={"Host": "localhost:7860"}).status_code == 200


def test_a_failing_run_shows_its_error_and_the_studio_goes_on(studio, finished_run):
    run_id = studio.client.post("/api/runs", json={"task": "spam", "settings": RUN | {"model": "models/broken"}})
    view = studio.wait_for(run_id.json()["id"], ended)
    assert view["status"] == "failed" and view["error"].startswith("error: models/broken"), view
    assert studio.client.get("/api/runs").status_code == 200


SCREENSHOTS = Path(os.environ.get("LORA_FT_SCREENSHOTS", "/tmp/studio_screenshots"))


@pytest.fixture
def browser(tmp_path: Path):
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("Debian's chromium and chromium-driver are not installed (apt-get install chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1360,1000",
                 f"--user-data-dir={tmp_path / 'chromium'}"):  # fmt: skip
        options.add_argument(flag)
    found = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    yield found
    found.quit()


def _field(browser, name: str, value: str) -> None:
    from selenium.webdriver.support.ui import Select

    element = browser.find_element("id", f"f-{name}")
    if element.tag_name == "select":
        Select(element).select_by_visible_text(value)
    else:
        element.clear()
        element.send_keys(value)


def _error_beside(browser, wait, name: str) -> str:
    wait.until(lambda b: b.find_element("id", f"err-{name}").text)
    return browser.find_element("id", f"err-{name}").text


def test_the_page_trains_watches_stops_resumes_opens_and_classifies(studio, browser, workspace, finished_run):
    from selenium.common.exceptions import TimeoutException

    try:
        _page_loop(studio, browser, workspace, finished_run)
    except TimeoutException:
        browser.save_screenshot(str(SCREENSHOTS / "studio-timeout.png"))
        ids = ("figures", "run-error", "banner", "form-error", "recipe")
        shown = {i: browser.find_element("id", i).text for i in ids}
        pytest.fail(f"the page did not get there: {shown}; runs: {studio.client.get('/api/runs').json()['runs']}")


def _page_loop(studio: Studio, browser, workspace: Path, finished_run: dict) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(browser, 300, poll_frequency=0.3)
    browser.get(studio.url + "/")
    wait.until(lambda b: b.find_elements(By.ID, "f-lr") and b.find_element(By.ID, "recipe").text)

    # bad inputs, each shown beside its field
    _field(browser, "lr", "-1")
    assert _error_beside(browser, wait, "lr") == "settings: 'lr' must be > 0, got -1"
    _field(browser, "lr", "0.0005")
    _field(browser, "data", "../outside.tsv")
    assert "data ../outside.tsv: outside the workspace" in _error_beside(browser, wait, "data")
    _field(browser, "data", "bad.tsv")
    wait.until(lambda b: "bad.tsv: line 2" in b.find_element(By.ID, "err-data").text)
    big = workspace.parent / "big.tsv"  # outside the workspace: the browser reads it, the studio gets a copy
    big.write_bytes((workspace / "sms.tsv").read_bytes()[:12000])
    browser.find_element(By.ID, "upload").send_keys(str(big))
    wait.until(lambda b: "over the 10,485 bytes an upload may be" in b.find_element(By.ID, "err-data").text)
    browser.save_screenshot(str(SCREENSHOTS / "studio-bad-input.png"))
    assert studio.client.get("/health").json()["status"] == "ok"

    # the form filled, the recipe it makes, started
    for name, value in {"model": "models/tiny", "data": "sms.tsv", "max_steps": "400", "batch_size": "2"}.items():
        _field(browser, name, value)
    _field(browser, "precision", "fp32")
    recipe = ["task: spam", "model: models/tiny", "data: sms.tsv", "max_steps: 400", "batch_size: 2", "precision: fp32"]
    wait.until(lambda b: b.find_element(By.ID, "recipe").text.splitlines() == recipe)
    assert not browser.find_element(By.ID, "err-data").text
    before = {r["id"] for r in studio.client.get("/api/runs").json()["runs"]}
    browser.find_element(By.ID, "start").click()
    wait.until(lambda b: b.find_element(By.ID, "tab-watch").is_displayed())
    (run_id,) = {r["id"] for r in studio.client.get("/api/runs").json()["runs"]} - before
    assert Select(browser.find_element(By.ID, "watch-run")).first_selected_option.get_attribute("value") == run_id

    chart = browser.find_element(By.ID, "chart-loss")
    wait.until(lambda b: int(chart.get_attribute("data-points") or 0) >= 2)
    assert browser.find_elements(By.CSS_SELECTOR, "#chart-loss canvas")
    browser.save_screenshot(str(SCREENSHOTS / "studio-watch.png"))
    _first_checkpoint(workspace / "adapters" / f".{run_id}.partial")  # a stop before it has nothing to resume
    browser.find_element(By.ID, "stop").click()
    wait.until(lambda b: "stopped" in b.find_element(By.ID, "figures").text)
    assert "checkpoint saved" in browser.find_element(By.ID, "run-error").text
    assert runs.newest_checkpoint(workspace / "adapters" / f".{run_id}.partial") is not None
    browser.find_element(By.ID, "resume").click()
    wait.until(lambda b: "finished" in b.find_element(By.ID, "figures").text)
    every = finished_run["progress"]["train_loss"][0][0]  # the same data and batch size: the same logging steps
    wait.until(lambda b: int(chart.get_attribute("data-points")) == 400 // every)
    assert "test accuracy" in browser.find_element(By.ID, "figures").text
    assert f"--resume {workspace / 'adapters' / run_id}" in browser.find_element(By.ID, "log").text
    browser.save_screenshot(str(SCREENSHOTS / "studio-finished.png"))

    # reloaded, the page shows the same run
    browser.refresh()
    wait.until(lambda b: "finished" in b.find_element(By.ID, "figures").text)

    # the run opened; two compared
    browser.find_element(By.CSS_SELECTOR, 'nav button[data-tab="runs"]').click()
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, f'button.open[data-path="adapters/{run_id}"]'))
    browser.find_element(By.CSS_SELECTOR, f'button.open[data-path="adapters/{run_id}"]').click()
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#opened-test td"))
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#opened-pngs img"))
    assert f"adapters/{run_id}: spam adapter (lora)" in browser.find_element(By.ID, "opened-manifest").text
    for path in (f"adapters/{run_id}", f"adapters/{finished_run['id']}"):
        browser.find_element(By.CSS_SELECTOR, f'#adapters input[data-path="{path}"]').click()
    browser.find_element(By.ID, "compare").click()
    wait.until(lambda b: (b.find_element(By.ID, "compare-plot").get_attribute("src") or "").startswith("data:image"))
    assert len(browser.find_elements(By.CSS_SELECTOR, "#compare-table tr")) == 3
    browser.execute_script("document.getElementById('opened').scrollIntoView()")
    browser.save_screenshot(str(SCREENSHOTS / "studio-runs.png"))

    # tried: a message classified, as predict classifies it
    browser.find_element(By.CSS_SELECTOR, 'nav button[data-tab="try"]').click()
    Select(browser.find_element(By.ID, "try-model")).select_by_visible_text(run_id)
    wait.until(lambda b: "classifies texts" in b.find_element(By.ID, "try-about").text)
    browser.find_element(By.ID, "try-text").send_keys(MESSAGES[0])
    browser.find_element(By.ID, "try-send").click()
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#try-results td.label"))
    (expected,) = classify.predict(workspace / "adapters" / run_id, MESSAGES[:1])
    assert browser.find_element(By.CSS_SELECTOR, "#try-results td.label").text == expected.label
    browser.save_screenshot(str(SCREENSHOTS / "studio-try.png"))
    assert studio.client.get("/health").json()["status"] == "ok"


def test_a_restarted_studio_finds_its_runs_and_an_interrupted_one_resumes(studio, finished_run, workspace):
    """The studio killed (-9, with its run's process) while a run is live: a studio started again shows the finished
    run as it was and the live one as interrupted, and resumes it to the end."""
    run_id = studio.client.post("/api/runs", json={"task": "spam", "settings": RUN}).json()["id"]
    live = studio.events_until(run_id, points=1)
    studio.process.kill()
    studio.process.wait(30)
    os.kill(live["pid"], signal.SIGKILL)
    again = Studio(workspace)
    try:
        views = {r["id"]: r for r in again.client.get("/api/runs").json()["runs"]}
        assert views[finished_run["id"]]["status"] == "finished"
        assert views[run_id]["status"] == "interrupted"
        assert again.client.post(f"/api/runs/{run_id}/resume").status_code == 200
        assert again.wait_for(run_id, ended)["status"] == "finished"
    finally:
        again.stop()
    assert "Traceback" not in again.output, again.output


def test_binding_elsewhere_needs_an_api_key(workspace):
    command = [sys.executable, "-m", "lora_ft", "studio", "--workspace", str(workspace), "--host", "0.0.0.0"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: --host 0.0.0.0 is reachable from other machines: give --api-key to listen there"
    )
