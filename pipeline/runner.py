"""``run_pipeline``: the stages in order, each skipped, resumed or run fresh (``pipeline.cache``),
with the one judge server a stage needs kept up for the next stage that needs the same one."""

from __future__ import annotations

import socket
import sys
import time
import uuid
from pathlib import Path

from pipeline.cache import fingerprint, read_marker, remove_outputs, stage_state, write_marker
from pipeline.processes import ProgressView, interrupts_deferred, run_command
from pipeline.stage import Stage, StageFailed, StageResult, shell_line
from serving.openai_server import HOST, VLLMServer


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def start_server(stage: Stage, view_stream) -> None:
    server = stage.server
    print(f"$ {shell_line(server.command())} &", file=view_stream)
    print(f"    log: {server.log_path}; waiting until it serves '{server.model}' "
          "(about a minute on 2 CPU cores)", file=view_stream, flush=True)
    if not port_is_free(server.port):
        raise StageFailed(stage, f"port {server.port} on {HOST} is in use, so the judge server cannot start there; "
                                 f"pass --judge_port with a free port", None)
    server.log_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        server.start()
    except (RuntimeError, TimeoutError) as e:
        raise StageFailed(stage, f"the judge server did not start: {str(e).splitlines()[0]}", server.log_path) from None
    print(f"    judge server ready at {server.base_url} after {server.startup_seconds:.0f} s", file=view_stream, flush=True)


class ServerSlot:
    """The one server the pipeline keeps running: a stage that needs the same server as the stage
    before it finds it up (no second minute of start-up); any other stage stops it first, so the
    training stages get the CPU and memory to themselves."""

    def __init__(self, stream):
        self.stream = stream
        self.running: VLLMServer | None = None

    def prepare(self, stage: Stage) -> None:
        if self.running is not None and (self.running is not stage.server or self.running.proc.poll() is not None):
            self.stop()
        if stage.server is not None and self.running is None:
            start_server(stage, self.stream)
            self.running = stage.server
        elif stage.server is not None:
            print(f"    judge server still up at {stage.server.base_url}", file=self.stream, flush=True)

    def stop(self) -> None:
        if self.running is not None:
            with interrupts_deferred():
                self.running.stop()
            self.running = None


def run_pipeline(stages: list[Stage], out: Path, force: set[str], until: str, stream=None,
                 cwd: Path | None = None) -> list[StageResult]:
    """Run (or skip) ``stages`` in order up to ``until``, each command from ``cwd`` (default: the
    current folder) with its log in ``out/logs``; raises ``StageFailed`` on the first failure."""
    stream = stream or sys.stdout
    cwd = Path(cwd or Path.cwd()).resolve()
    last = [s.name for s in stages].index(until)
    results: list[StageResult] = []
    run_ids: dict[str, str] = {}
    servers = ServerSlot(stream)
    try:
        for i, stage in enumerate(stages):
            log = out / "logs" / f"{stage.key}.log"
            if i > last:
                results.append(StageResult(stage.name, "not run", None, None))
                continue
            fp = fingerprint(stage, dict(run_ids))
            marker = read_marker(out, stage.key)
            state = stage_state(stage, marker, fp, stage.name in force)
            banner = f"[{i + 1}/{len(stages)}] {stage.name}: {stage.title}"
            if state == "done":
                print(f"\n=== {banner}: done earlier ({marker['seconds']:.1f} s), skipped "
                      f"(--force {stage.name} redoes it)", file=stream, flush=True)
                run_ids[stage.key] = marker["run_id"]
                results.append(StageResult(stage.name, "skipped", marker["seconds"], log))
                continue

            print(f"\n=== {banner} " + "=" * max(3, 96 - len(banner)), file=stream)
            missing = [_shown(p, cwd) for p in stage.requires if not p.exists()]
            if missing:
                before = f"; `--until {stages[i - 1].name}` runs the stages before it" if i else ""
                raise StageFailed(stage, f"{', '.join(missing)} not found in this checkout{before}", None)
            if state == "fresh":
                remove_outputs(stage)
            else:
                print("    resuming an interrupted run of the same command (its outputs are kept)", file=stream)
            run_id = uuid.uuid4().hex
            write_marker(out, stage.key, {"stage": stage.name, "status": "running", "run_id": run_id, "fingerprint": fp})
            t0 = time.monotonic()
            servers.prepare(stage)
            print(f"$ {stage.shell_command()}", file=stream)
            print(f"    log: {log}", file=stream, flush=True)
            code = run_command(stage.command, log, ProgressView(stream), cwd, append=state == "resume", env=stage.env)
            server_exit = stage.server.proc.poll() if stage.server is not None and stage.server.proc else None
            seconds = time.monotonic() - t0
            if code != 0:
                reason = f"exit status {code}"
                if code == 3:  # self_ref.generate / self_ref.label: some rows failed for good, the rest are written
                    reason += " (some rows failed for good; rerun the demo: the stage resumes and retries just those)"
                if server_exit is not None:
                    reason += f"; the judge server exited (code {server_exit}) during the stage: see {stage.server.log_path}"
                raise StageFailed(stage, reason, log)
            write_marker(out, stage.key, {"stage": stage.name, "status": "done", "run_id": run_id, "fingerprint": fp,
                                           "seconds": round(seconds, 2), "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
            run_ids[stage.key] = run_id
            print(f"    {stage.name} done in {seconds:.1f} s", file=stream, flush=True)
            results.append(StageResult(stage.name, "resumed" if state == "resume" else "ran", seconds, log))
    finally:
        servers.stop()
    return results


def _shown(path: Path, cwd: Path) -> str:
    """``path`` relative to ``cwd`` when it is inside it (as the user would type it)."""
    try:
        return str(path.resolve().relative_to(cwd))
    except ValueError:
        return str(path)
