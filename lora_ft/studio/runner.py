"""`studio`'s runs: each one lora_ft's own training command in a process of its own, as `compare` starts them (in a
session of its own, so that a signal reaches it only when the studio sends one), queued and run `parallel` at a time.
Each run's state is a JSON file in the workspace (studio/runs/<id>/state.json, written atomically), so that a studio
started again finds its runs: one that was live when the studio died is `interrupted`, resumable. Its progress is
what the run itself logs (runs.PROGRESS_LOG); its output (stdout and stderr) is kept in log.txt beside its state.
The HTTP side is `studio.app`; the workspace's files, checks and listing are `studio.workspace`."""

from __future__ import annotations

import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from ..core import files, registry
from ..core.commands import ServeLimits
from ..core.errors import UserError
from ..engine import runs
from ..serve import pool
from .workspace import ADAPTERS, STATE, Workspace

log = logging.getLogger("lora_ft")

RUNS = "runs"
LIVE = ("running", "stopping")
RESUMABLE = ("stopped", "interrupted")  # and `failed` when it kept a checkpoint
STOPPED_CODES = (128 + signal.SIGINT, 128 + signal.SIGTERM)  # the exit codes of a run stopped by a signal
LOG_TAIL_BYTES = 64 << 10
ERROR_PREFIXES = ("error: ", "internal error: ", "interrupted by ")  # the CLI's one-line endings


class Studio:
    """The workspace's runs: `submit` queues one, `stop` and `resume`; `view` is one run's state and progress."""

    def __init__(self, workspace: Workspace, parallel: int = 1):
        if parallel < 1:
            raise UserError(f"`parallel` must be >= 1, got {parallel}")
        self.workspace, self.parallel = workspace, parallel
        self.folder = workspace.root / STATE / RUNS
        self.lock = threading.Condition()
        self.runs: dict[str, dict[str, Any]] = {}
        self.children: dict[str, subprocess.Popen] = {}
        self.watchers: list[threading.Thread] = []
        self.closing = False
        self.registry = Served(workspace, self)
        self._recover()
        threading.Thread(target=self._schedule, name="studio-queue", daemon=True).start()

    # --- state -----------------------------------------------------------------------------------------------

    def _recover(self) -> None:
        """The runs a studio made here before: a live one whose process still holds its run folder is watched until
        it ends; one whose process is gone is settled from what it left (finished, or interrupted)."""
        for path in sorted(self.folder.glob("*/state.json")):
            run = files.read_json_object(path)
            if run.get("id") != path.parent.name or run.get("task") not in registry.TASKS:
                log.warning("%s: not a studio run's state; left as it is", path)
                continue
            self.runs[run["id"]] = run
            if run["status"] in LIVE:
                if runs.running(runs.partial_folder(self.output(run))) is not None:
                    self._watch(run, None)
                else:
                    self._settle(run, None)

    def _save(self, run: dict[str, Any]) -> None:
        files.write_json_atomically(self.folder / run["id"] / "state.json", run)

    def output(self, run: dict[str, Any]) -> Path:
        return self.workspace.root / ADAPTERS / run["id"]

    def get(self, run_id: str) -> dict[str, Any]:
        run = self.runs.get(run_id)
        if run is None:
            raise NotFound(f"no run {run_id!r} in this studio")
        return run

    # --- queue -----------------------------------------------------------------------------------------------

    def submit(self, task: Any, settings: Any) -> str:
        """Check `settings` (workspace.check) and queue a run of `task` with them; its id."""
        values = self.workspace.check(task, settings)
        with self.lock:
            run_id = self._new_id(task)
            files.write_text_atomically(self.folder / run_id / "recipe.yaml", self.workspace.recipe(task, values))
            now = files.now_iso()
            run = {"id": run_id, "task": task, "settings": values, "status": "queued", "created": now, "queued": now}
            run |= {"output": self.workspace.shown(self.output(run | {"id": run_id})), "resume": False}
            self.runs[run_id] = run
            self._save(run)
            self.lock.notify_all()
        return run_id

    def _new_id(self, task: str) -> str:
        """`task`-date-time, with -2, -3... when that names a run or a folder in adapters/ already."""
        stem = f"{task}-{datetime.now():%Y%m%d-%H%M%S}"
        names = (stem if n == 1 else f"{stem}-{n}" for n in itertools.count(1))
        return next(name for name in names if not self._taken(name))

    def _taken(self, name: str) -> bool:
        output = self.workspace.root / ADAPTERS / name
        made = (self.folder / name, output, runs.partial_folder(output))
        return name in self.runs or any(path.exists() for path in made)

    def stop(self, run_id: str) -> dict[str, Any]:
        """Stop a run as Ctrl-C in its terminal would: one SIGINT, then it saves a checkpoint at the end of its step
        and exits (resumable). A queued run is taken off the queue."""
        with self.lock:
            run = self.get(run_id)
            if run["status"] == "queued":
                run["status"] = "stopped"
            elif run["status"] == "running":
                run["status"], run["stop_asked"] = "stopping", True
                self._signal(run, signal.SIGINT)
            else:
                raise UserError(f"run {run_id} is {run['status']}: only a queued or running run can be stopped")
            self._save(run)
            return dict(run)

    def _signal(self, run: dict[str, Any], signum: int) -> None:
        child = self.children.get(run["id"])
        if child is not None:
            child.send_signal(signum)
        elif runs.running(runs.partial_folder(self.output(run))) == f"PID {run.get('pid')}":  # a run recovered live
            os.kill(run["pid"], signum)

    def resume(self, run_id: str) -> dict[str, Any]:
        """Queue a stopped or interrupted run again: it continues from its newest checkpoint (`--resume`)."""
        with self.lock:
            run = self.get(run_id)
            if run["status"] not in RESUMABLE and not (run["status"] == "failed" and self._checkpoint(run)):
                raise UserError(f"run {run_id} is {run['status']}: only a stopped or interrupted run can be resumed")
            run |= {"status": "queued", "queued": files.now_iso(), "resume": True, "stop_asked": False, "error": None}
            self._save(run)
            self.lock.notify_all()
            return dict(run)

    def _checkpoint(self, run: dict[str, Any]) -> Path | None:
        return runs.newest_checkpoint(runs.partial_folder(self.output(run)))

    def _schedule(self) -> None:
        with self.lock:
            while True:
                queued = self._next()
                if queued is None:
                    self.lock.wait()
                else:
                    self._start(queued)

    def _next(self) -> dict[str, Any] | None:
        live = sum(run["status"] in LIVE for run in self.runs.values())
        if self.closing or live >= self.parallel:
            return None
        return min((r for r in self.runs.values() if r["status"] == "queued"), key=lambda r: r["queued"], default=None)

    def _command(self, run: dict[str, Any]) -> list[str]:
        output = self.output(run)
        if run["resume"] and (runs.partial_folder(output) / runs.RUN_RECORD).is_file():
            return [sys.executable, "-m", "lora_ft", run["task"], "--resume", str(output)]
        recipe = self.folder / run["id"] / "recipe.yaml"
        return [sys.executable, "-m", "lora_ft", run["task"], "--config", str(recipe), "--output", str(output)]

    def _start(self, run: dict[str, Any]) -> None:
        """Start `run`'s process (called with the lock held), and a thread that settles the run when it ends."""
        log_path = self.folder / run["id"] / "log.txt"
        command = self._command(run)
        env = os.environ | {"PYTHONUNBUFFERED": "1"}
        try:
            with open(log_path, "a", encoding="utf-8") as out:
                out.write(f"$ {' '.join(command[1:])}\n")
                out.flush()
                child = subprocess.Popen(
                    command, cwd=self.workspace.root, stdout=out, stderr=subprocess.STDOUT, env=env,
                    start_new_session=True,  # signals from the studio's terminal reach the studio only
                )  # fmt: skip
        except OSError as e:
            run |= {"status": "failed", "error": f"cannot start the run: {e}"}
            self._save(run)
            return
        self.children[run["id"]] = child
        run |= {"status": "running", "started": files.now_iso(), "pid": child.pid, "error": None, "note": None}
        self._save(run)
        self._watch(run, child)

    def _watch(self, run: dict[str, Any], child: subprocess.Popen | None) -> None:
        def wait() -> None:
            if child is not None:
                code = child.wait()
            else:  # a process a studio before this one started: it holds its run folder while it lives
                while runs.running(runs.partial_folder(self.output(run))) is not None:
                    time.sleep(1.0)
                code = None
            with self.lock:
                self.children.pop(run["id"], None)
                self._settle(run, code)
                self.lock.notify_all()

        watcher = threading.Thread(target=wait, name=f"studio-{run['id']}", daemon=True)
        self.watchers.append(watcher)
        watcher.start()

    def _settle(self, run: dict[str, Any], code: int | None) -> None:
        """A run's state once its process has ended with `code` (None: unknown, it was not this studio's child)."""
        finished = (self.output(run) / files.MANIFEST_NAME).is_file()
        last = self._last_line(run)
        if code == 0 or (code is None and finished):
            status = "finished"
        elif code in STOPPED_CODES or code is None:
            status = "stopped" if run.get("stop_asked") and not self.closing else "interrupted"
        else:
            status = "failed"
        run |= {"status": status, "ended": files.now_iso(), "exit_code": code, "pid": None}
        run |= {"error": last if status == "failed" else None, "note": last if status in RESUMABLE else None}
        run["resumable"] = status != "finished" and self._checkpoint(run) is not None
        self._save(run)

    def _last_line(self, run: dict[str, Any]) -> str | None:
        """The run's own one-line ending (its error, or where it was interrupted), from its log."""
        lines = self.log(run["id"]).splitlines()
        return next((line for line in reversed(lines) if line.startswith(ERROR_PREFIXES)), None)

    def close(self) -> None:
        """Stop the live runs as a terminal's Ctrl-C would (each keeps a checkpoint: `interrupted`, resumable) and wait
        for them to end."""
        with self.lock:
            self.closing = True
            for run in self.runs.values():
                if run["status"] == "running":
                    self._signal(run, signal.SIGINT)
        for watcher in self.watchers:
            watcher.join()

    # --- what the page shows ---------------------------------------------------------------------------------

    def listing(self) -> list[dict[str, Any]]:
        with self.lock:
            return sorted((dict(r) for r in self.runs.values()), key=lambda r: r["created"], reverse=True)

    def view(self, run_id: str) -> dict[str, Any]:
        """One run: its state, its progress so far, and once finished its adapter's test metrics."""
        with self.lock:
            run = dict(self.get(run_id))
        run["progress"] = self.progress(run)
        if run["status"] == "finished":
            manifest = files.read_json_object(self.output(run) / files.MANIFEST_NAME)
            run["metrics"] = (manifest.get("metrics") or {}).get("test")
            run["key_metric"] = registry.get(run["task"]).key_metric
        return run

    def progress(self, run: dict[str, Any]) -> dict[str, Any]:
        """The curves (train loss and val metrics by step) and the latest step's figures, from the run's progress
        log: in its run folder while it trains, in its adapter folder once finished. A resumed run's lines after the
        step it resumed at supersede the earlier ones past that step."""
        output = self.output(run)
        path = next((p for p in (runs.partial_folder(output), output) if (p / runs.PROGRESS_LOG).is_file()), None)
        records: list[dict[str, Any]] = []
        for line in (path / runs.PROGRESS_LOG).read_text(encoding="utf-8").splitlines() if path else []:
            try:
                record = json.loads(line)
            except ValueError:  # a line being written
                continue
            if record.get("event") == "begin":
                records = [r for r in records if r["step"] <= record["step"]]
            records.append(record)
        train = [[r["step"], r["loss"]] for r in records if r["event"] == "train"]
        evals = [{"step": r["step"], **r["metrics"]} for r in records if r["event"] == "eval"]
        key = next((r["key"] for r in records if r["event"] == "eval"), None)
        return {"train_loss": train, "val": evals, "key": key, "last": records[-1] if records else None}

    def log(self, run_id: str) -> str:
        path = self.folder / self.get(run_id)["id"] / "log.txt"
        if not path.is_file():
            return ""
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - LOG_TAIL_BYTES))
            return f.read().decode("utf-8", errors="replace")


class NotFound(pool.NotFound):
    """A request names a run or model this studio does not have (HTTP 404)."""


class Served(pool.Registry):
    """`serve`'s registry of the studio's adapters, each loaded the first time it is asked for, named by its run (its
    folder under adapters/); they share bases as `serve`'s do."""

    def __init__(self, workspace: Workspace, studio: Studio):
        super().__init__({}, [], ServeLimits().check(), pool.Stats())
        self.workspace, self.studio, self.adding = workspace, studio, threading.Lock()

    def load_named(self, name: str) -> dict[str, Any]:
        """Load adapters/<name> (a finished run's adapter), unless it is loaded; what /v1/models says of it."""
        with self.adding:
            if name not in self.adapters:
                folder = self.workspace.adapter_named(name)
                if folder is None:
                    raise NotFound(f"no finished adapter {name!r} in {ADAPTERS}/ of this workspace")
                self.add(folder, name)
        return self.adapters[name].describe()

    def get(self, name: str, serves: str) -> pool.Adapter:
        if name not in self.adapters and self.workspace.adapter_named(name) is not None:
            self.load_named(name)
        return super().get(name, serves)
