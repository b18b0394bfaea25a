"""Kill harness: run a data-set-level command in a subprocess, SIGKILL it at a seeded random point of its writing,
rerun it, and compare the result with an uninterrupted run's.

Commands run in processes forked from a *zygote*: a Python process that imported torch, SimpleITK, nnU-Net and
nnunet-ape once and forks one child per command (a fresh interpreter would spend 3-5 s importing them each time).
Each child reseeds its random generators (as a fresh process would start with different ones), redirects its output
to a log file and runs ``nnunet_ape.cli.main.main(argv)`` (or a helper of this module). nnU-Net reads its folder
variables when imported, so the zygote's ``nnUNet_raw`` / ``nnUNet_preprocessed`` / ``nnUNet_results`` point into
``BASE/cur``, a symlink that :meth:`Zygote.use` turns to the workspace of the run at hand.

Run as ``python kill_harness.py --zygote`` it is the zygote (requests and replies are JSON lines on stdin/stdout).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
VOLATILE_KEYS = {"created", "seconds"}  # JSON keys whose values differ between any two runs (timestamps, timings)
POLL_S = 0.01
PREWARM = [
    "numpy", "scipy.ndimage", "SimpleITK", "nibabel", "blosc2", "torch", "tqdm", "matplotlib.pyplot",
    "nnunetv2.inference.predict_from_raw_data", "nnunetv2.preprocessing.preprocessors.default_preprocessor",
    "nnunetv2.experiment_planning.experiment_planners.default_experiment_planner",
    "nnunetv2.experiment_planning.plan_and_preprocess_api", "nnunetv2.experiment_planning.verify_dataset_integrity",
    "nnunetv2.training.dataloading.nnunet_dataset", "nnunet_ape.cli.main", "nnunet_ape.nnunet.crop_dataset",
    "nnunet_ape.nnunet.localized_predict", "nnunet_ape.nnunet.preprocess_runner", "nnunet_ape.nnunet.preprocessor",
    "nnunet_ape.nnunet.uncrop", "nnunet_ape.nnunet.unlabeled_dataset", "nnunet_ape.embed_files", "nnunet_ape.plots",
    "nnunet_ape.localize.localizer", "nnunet_ape.localize.fit", "nnunet_ape.localize.predict_boxes", "nnunet_ape.bpr.report", "nnunet_ape.case_features",
]


# ----------------------------------------------------------------------------------------------------------- zygote


def _child(request: dict) -> None:
    """In a forked child: fresh random state, output to the log, run the request's target; never returns."""
    import importlib
    import multiprocessing
    import traceback

    import numpy as np
    import torch

    code = 1
    try:
        fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        random.seed()
        np.random.seed()
        torch.seed()
        if request.get("fork_pools"):  # helpers (nnU-Net's checks) start pools: forked workers need no imports
            original = multiprocessing.get_context
            multiprocessing.get_context = lambda method=None: original("fork")
        module, name = request["target"].split(":")
        result = getattr(importlib.import_module(module), name)(request["args"])
        code = result if isinstance(result, int) else 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:  # noqa: BLE001 - the log shows it; the exit code says it
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def zygote_main() -> None:
    """The zygote's loop: ``start`` forks a child (reply: its pid), ``poll`` / ``wait`` report its exit code."""
    import importlib

    os.environ.setdefault("MPLBACKEND", "Agg")
    for module in PREWARM:
        importlib.import_module(module)
    reply = sys.stdout
    print(json.dumps({"ready": os.getpid()}), file=reply, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "start":
            pid = os.fork()
            if pid == 0:
                _child(request)
            print(json.dumps({"pid": pid}), file=reply, flush=True)
        elif request["op"] in ("poll", "wait"):
            flags = os.WNOHANG if request["op"] == "poll" else 0
            done, status = os.waitpid(request["pid"], flags)
            rc = os.waitstatus_to_exitcode(status) if done else None
            print(json.dumps({"rc": rc}), file=reply, flush=True)


class Zygote:
    """The harness's handle on a zygote process (see the module docstring)."""

    def __init__(self, base: Path):
        self.base = Path(base)
        self.cur = self.base / "cur"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg",
               "nnUNet_raw": str(self.cur / "raw"), "nnUNet_preprocessed": str(self.cur / "pre"),
               "nnUNet_results": str(self.cur / "res"), "nnUNet_def_n_proc": "1", "nnUNet_n_proc_DA": "1",
               "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen([sys.executable, "-u", str(HERE / "kill_harness.py"), "--zygote"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, cwd=self.base)
        self.exited: dict[int, int] = {}
        self._reply()

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the kill harness's zygote died")
        return json.loads(line)

    def _ask(self, **request) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def use(self, workspace: Path) -> Path:
        """Point ``BASE/cur`` (the zygote's nnU-Net folders) at ``workspace`` (made with raw/pre/res/out); returns it."""
        for sub in ("raw", "pre", "res", "out", "logs"):
            (workspace / sub).mkdir(parents=True, exist_ok=True)
        link = self.base / ".cur.new"
        link.unlink(missing_ok=True)
        link.symlink_to(workspace.resolve())
        os.replace(link, self.cur)
        return workspace

    def start(self, args: list[str], log: Path, target: str = "nnunet_ape.cli.main:main", fork_pools: bool = False) -> int:
        return self._ask(op="start", target=target, args=[str(a) for a in args], log=str(log), fork_pools=fork_pools)["pid"]

    def poll(self, pid: int) -> int | None:
        """The exit code of child ``pid``, None while it runs (a child's code is asked for once, then kept)."""
        if pid not in self.exited:
            rc = self._ask(op="poll", pid=pid)["rc"]
            if rc is None:
                return None
            self.exited[pid] = rc
        return self.exited[pid]

    def wait(self, pid: int) -> int:
        if pid not in self.exited:
            self.exited[pid] = self._ask(op="wait", pid=pid)["rc"]
        return self.exited[pid]

    def call(self, target: str, args: list, log: Path) -> None:
        """Run ``module:function(args)`` in a child (pools forked); AssertionError with the log's tail if it fails."""
        rc = self.wait(self.start(args, log, target, fork_pools=True))
        assert rc == 0, f"{target} failed:\n{log.read_text()[-3000:]}"

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


# --------------------------------------------------------------------------------------------------------- snapshots


def listing(roots: list[Path]) -> dict[str, tuple]:
    """Every entry under ``roots`` (hidden ones too, symlinks not followed): path -> ("file", size) / ("link",
    target); paths as ``ROOT_NAME/relative``."""
    out: dict[str, tuple] = {}
    for root in roots:
        if not root.exists():
            continue
        for folder, dirs, files in os.walk(root):
            for name in dirs + files:
                path = Path(folder) / name
                key = f"{root.name}/{path.relative_to(root)}"
                try:
                    if path.is_symlink():
                        out[key] = ("link", os.readlink(path))
                    elif path.is_file():
                        out[key] = ("file", path.stat().st_size)
                except FileNotFoundError:  # a staging file the running command just renamed
                    continue
            dirs[:] = [d for d in dirs if not (Path(folder) / d).is_symlink()]
    return out


def _normalized(value, workspace_names: list[str]):
    if isinstance(value, dict):
        return {k: _normalized(v, workspace_names) for k, v in value.items() if k not in VOLATILE_KEYS}
    if isinstance(value, list):
        return [_normalized(v, workspace_names) for v in value]
    if isinstance(value, str):
        for name in workspace_names:
            value = value.replace(name, "<workspace>")
    return value


def content(path: Path, workspace: Path) -> object:
    """What must agree between two runs: JSON up to timestamps and timings (and the workspace's own path), a
    symlink's target, else the file's SHA-256."""
    if path.is_symlink():
        return ("link", os.readlink(path).replace(str(workspace.resolve()), "<workspace>"))
    if path.suffix == ".png":  # figures carry timings in their titles: complete (ends with IEND) is what counts
        return ("png", path.read_bytes()[-8:-4] == b"IEND")
    if path.suffix == ".json":
        try:
            return _normalized(json.loads(path.read_text()), [str(workspace.resolve()), str(workspace)])
        except (json.JSONDecodeError, UnicodeDecodeError):
            return ("torn json", hashlib.sha256(path.read_bytes()).hexdigest())
    return hashlib.sha256(path.read_bytes()).hexdigest()


def hidden(relative: str) -> bool:
    """True for a path with a hidden component (``.Dataset953_X.partial/...``, ``.nnunet_ape_partial/...``)."""
    return any(part.startswith(".") for part in Path(relative).parts)


# --------------------------------------------------------------------------------------------------------- scenario


@dataclass
class Command:
    """A data-set-level command as the harness runs it: ``steps``, argv lists run at once (``--num-parts`` parts),
    in a workspace prepared by ``prepare(workspace)``; ``watch``: the folders (relative to the workspace) it writes
    into, compared between runs."""

    name: str
    steps: list[list[str]]
    prepare: object
    watch: list[str]
    raw_datasets: list[str] = field(default_factory=list)  # written raw datasets, for verify_dataset_integrity
    predictions: dict[str, list[str]] = field(default_factory=dict)  # prediction folder -> expected case files


@dataclass
class RunResult:
    """An uninterrupted run: wall seconds, exit codes, logs, and ``events``: the seconds at which new entries (files
    or folders, staging files included) were seen under the watched folders (one event per look that found any:
    a dataset renamed into place is one event, not one per file)."""

    seconds: float
    codes: list[int]
    logs: list[Path]
    events: list[float] = field(default_factory=list)


class Harness:
    """Runs :class:`Command` scenarios with one :class:`Zygote` under ``base``; ``report`` collects one dict per kill.

    Kill points follow the command's own progress, not the clock (a loaded machine runs the same command at very
    different speeds): the reference run counts its events, the looks at the watched folders that found new entries
    (N); the killed run is killed after ``ceil(u N)`` of its own (at most N - 1), ``u ~ U(0.2, 0.9)``, plus a random delay of up to
    the mean time between two events (so that it lands inside a write as often as between writes)."""

    def __init__(self, base: Path, report: Path | None = None):
        self.base = Path(base)
        self.zygote = Zygote(self.base)
        self.report_path = report
        self.reports: list[dict] = []

    def workspace(self, command: Command, tag: str) -> Path:
        workspace = self.zygote.use(self.base / f"{command.name}-{tag}")
        command.prepare(workspace)
        return workspace

    def launch(self, command: Command, workspace: Path, tag: str) -> tuple[list[int], list[Path]]:
        logs = [workspace / "logs" / f"{tag}-{i}.log" for i in range(len(command.steps))]
        return [self.zygote.start(argv, log) for argv, log in zip(command.steps, logs)], logs

    def run(self, command: Command, workspace: Path, tag: str, until_events: int | None = None) -> RunResult:
        """Run the command's steps to the end, recording its events; with ``until_events``, return (without
        waiting) after that many events, with the pids as ``codes`` and negative seconds."""
        roots = [workspace / w for w in command.watch]
        before = set(listing(roots))
        seen: set[str] = set()
        events: list[float] = []
        began = time.perf_counter()
        pids, logs = self.launch(command, workspace, tag)
        codes: dict[int, int] = {}
        while len(codes) < len(pids):
            new = set(listing(roots)) - before - seen
            if new:
                events.append(time.perf_counter() - began)
            seen |= new
            if until_events is not None and len(events) >= until_events:
                return RunResult(-1.0, pids, logs, events)
            for pid in pids:
                if pid not in codes and (rc := self.zygote.poll(pid)) is not None:
                    codes[pid] = rc
            time.sleep(POLL_S)
        if set(listing(roots)) - before - seen:
            events.append(time.perf_counter() - began)
        return RunResult(time.perf_counter() - began, [codes[p] for p in pids], logs, events)

    def kill_and_rerun(self, command: Command, seed: int, reference: Path, ref: RunResult) -> dict:
        """Run the command in a fresh workspace, SIGKILL it at a seeded point of its progress (see the class),
        check what it left, rerun it and compare with ``reference``. Returns the kill's report entry."""
        rng = random.Random(seed)
        n = len(ref.events)
        target = max(1, min(n - 1, int(np.ceil(rng.uniform(0.2, 0.9) * n))))  # at least one event still to come
        gap = (ref.events[-1] - ref.events[0]) / max(1, n - 1) if n else 0.0
        delay = rng.uniform(0.0, gap)
        workspace = self.workspace(command, f"kill{seed}")
        before = self._visible(workspace, command)
        began = time.perf_counter()
        progress = self.run(command, workspace, f"kill{seed}", until_events=target)
        time.sleep(delay)
        pids = progress.codes if progress.seconds < 0 else []
        killed = [p for p in pids if self.zygote.poll(p) is None]
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
        for pid in killed:
            self.zygote.wait(pid)
        entry = {"command": command.name, "kill": f"seed {seed}: after {target} of {n} writing events + {delay:.2f} s",
                 "uninterrupted_s": round(ref.seconds, 2), "killed_at_s": round(time.perf_counter() - began, 2),
                 "killed": bool(killed)}
        return self._after_kill(command, workspace, reference, before, entry, f"rerun{seed}")

    def paused(self, argv: list[str], pattern: str, flag: Path, log: Path) -> int:
        """Start ``argv`` held before its first rename onto ``pattern`` (:func:`main_paused_at`); returns its pid once
        it waits there (touch ``flag`` to let it go on)."""
        pid = self.zygote.start([pattern, str(flag), *argv], log, "kill_harness:main_paused_at")
        deadline = time.monotonic() + 300
        while not Path(f"{flag}.paused").exists():
            assert self.zygote.poll(pid) is None and time.monotonic() < deadline, f"never paused at {pattern}:\n{_tails([log])}"
            time.sleep(POLL_S)
        return pid

    def kill_at_rename(self, command: Command, when: str, pattern: str, reference: Path) -> dict:
        """Run the command (its first step; the others run normally) in a fresh workspace and have it SIGKILL itself
        ``when`` ("before" or "after") it renames a file or folder onto a path matching the glob ``pattern`` (the
        moves that hand finished data over: a case's last file, a dataset into place); then as
        :meth:`kill_and_rerun`. Fails when the command never made such a rename."""
        tag = f"at-{when}-{pattern.strip('*').replace('/', '_').replace('*', '_')}"
        workspace = self.workspace(command, tag)
        before = self._visible(workspace, command)
        logs = [workspace / "logs" / f"{tag}-{i}.log" for i in range(len(command.steps))]
        pids = [self.zygote.start([when, pattern, *command.steps[0]], logs[0], "kill_harness:main_killed_at")]
        pids += [self.zygote.start(argv, log) for argv, log in zip(command.steps[1:], logs[1:])]
        codes = [self.zygote.wait(p) for p in pids]
        assert codes[0] == -signal.SIGKILL, f"{command.name}: no rename onto {pattern} ({codes}):\n{_tails(logs)}"
        entry = {"command": command.name, "kill": f"{when} its rename onto {pattern}", "killed": True}
        return self._after_kill(command, workspace, reference, before, entry, f"rerun-{tag}")

    def _visible(self, workspace: Path, command: Command) -> dict:
        roots = [workspace / w for w in command.watch]
        return {k: content(workspace / k, workspace) for k in _relative(listing(roots), workspace, command)}

    def _after_kill(self, command: Command, workspace: Path, reference: Path, before: dict, entry: dict, tag: str) -> dict:
        """Check what the kill left, rerun, compare with the reference; record and return the report entry."""
        entry["left"] = describe_leftovers(listing([workspace / w for w in command.watch]))
        problems = self.check_after_kill(workspace, command, reference, before)
        rerun = self.run(command, workspace, tag)
        entry["rerun_codes"] = rerun.codes
        entry["rerun_s"] = round(rerun.seconds, 2)
        assert all(c == 0 for c in rerun.codes), f"{command.name}: the rerun failed:\n{_tails(rerun.logs)}"
        problems += compare(reference, workspace, command)
        entry["held"] = not problems
        entry["problems"] = problems[:5]
        self.reports.append(entry)
        if self.report_path is not None:
            with open(self.report_path, "a") as f:
                f.write(json.dumps(entry) + "\n")
        assert not problems, f"{command.name} ({entry['kill']}):\n" + "\n".join(problems[:10])
        return entry

    def check_after_kill(self, workspace: Path, command: Command, reference: Path, before: dict) -> list[str]:
        """What a killed run left that nnU-Net or a glob could take for data: every visible file (no hidden path
        component) must be as it was before the run or as the uninterrupted run left it, and no ``.tmp_*`` file
        anywhere."""
        problems = []
        roots = [workspace / w for w in command.watch]
        for key in _relative(listing(roots), workspace, command):
            name = Path(key).name
            if name.startswith(".tmp_"):
                problems.append(f"after the kill: {key}: a temporary file of an earlier version")
            if hidden(key) or (workspace / key).is_dir():
                continue
            now = content(workspace / key, workspace)
            if key in before and before[key] == now:
                continue
            if not (reference / key).exists() and not (reference / key).is_symlink():
                problems.append(f"after the kill: {key}: visible, but no uninterrupted run writes it")
            elif content(reference / key, reference) != now:
                problems.append(f"after the kill: {key}: visible but not what an uninterrupted run writes (torn or stale)")
        return problems


def _relative(entries: dict, workspace: Path, command: Command) -> list[str]:
    """Listing keys (``ROOT_NAME/rel``) -> paths relative to the workspace."""
    out = []
    for key in entries:
        root_name, _, rest = key.partition("/")
        root = next(w for w in command.watch if Path(w).name == root_name)
        out.append(str(Path(root) / rest))
    return sorted(out)


def compare(reference: Path, workspace: Path, command: Command) -> list[str]:
    """Differences between a rerun's workspace and the reference's: the same entries (hidden ones included: no
    staging file or folder may stay behind), and the same :func:`content` for each file."""
    problems = []
    ref = _relative(listing([reference / w for w in command.watch]), reference, command)
    got = _relative(listing([workspace / w for w in command.watch]), workspace, command)
    for key in sorted(set(got) - set(ref)):
        problems.append(f"after the rerun: {key}: left behind (an uninterrupted run has no such entry)")
    for key in sorted(set(ref) - set(got)):
        problems.append(f"after the rerun: {key}: missing")
    for key in sorted(set(ref) & set(got)):
        a, b = reference / key, workspace / key
        if a.is_dir() and not a.is_symlink():
            continue
        if content(a, reference) != content(b, workspace):
            problems.append(f"after the rerun: {key}: differs from the uninterrupted run's")
    return problems


def describe_leftovers(entries: dict) -> dict:
    """What a kill left, in numbers: finished visible files, hidden partial-dataset files, staging files."""
    staged = sorted(k for k in entries if "/.nnunet_ape_partial/" in k and entries[k][0] == "file")
    partial = [k for k in entries if ".partial/" in k and entries[k][0] == "file"]
    visible = [k for k in entries if not hidden(k) and entries[k][0] == "file"]
    return {"visible_files": len(visible), "partial_dataset_files": len(partial), "staging_files": len(staged),
            "staged": [Path(k).name for k in staged][:3]}


def _tails(logs: list[Path]) -> str:
    return "\n".join(f"--- {log.name}\n{log.read_text()[-2500:]}" for log in logs if log.exists())


# ------------------------------------------------------------------------------------------- helpers run in children


def main_killed_at(args: list[str]) -> int:
    """``nnunet-ape ARGS[2:]`` that SIGKILLs itself ``args[0]`` ("before" / "after") its first ``os.replace`` onto a
    path matching the glob ``args[1]``: a kill at an exact point of the hand-over of finished data."""
    from fnmatch import fnmatch

    from nnunet_ape.cli.main import main

    when, pattern, *argv = args
    original = os.replace

    def replace(src, dst, *rest, **options):
        hit = fnmatch(str(dst), pattern)
        if hit and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        original(src, dst, *rest, **options)
        if hit and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)

    os.replace = replace
    return main(argv)


def main_paused_at(args: list[str]) -> int:
    """``nnunet-ape ARGS[2:]`` that stops before its first ``os.replace`` onto a path matching the glob ``args[0]``,
    says so by creating ``args[1] + ".paused"``, and goes on once the file ``args[1]`` exists (at most 300 s later):
    a job held at an exact point while another one starts."""
    from fnmatch import fnmatch

    from nnunet_ape.cli.main import main

    pattern, flag, *argv = args
    original = os.replace
    paused = []

    def replace(src, dst, *rest, **options):
        if not paused and fnmatch(str(dst), pattern):
            paused.append(dst)
            Path(flag + ".paused").touch()
            deadline = time.monotonic() + 300
            while not Path(flag).exists() and time.monotonic() < deadline:
                time.sleep(0.02)
        original(src, dst, *rest, **options)

    os.replace = replace
    return main(argv)


def verify_raw(args: list[str]) -> None:
    """nnU-Net's ``verify_dataset_integrity`` on the raw dataset folder ``args[0]`` (raises when it fails)."""
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    verify_dataset_integrity(args[0], num_processes=1)


def plan_dataset(args: list[str]) -> None:
    """nnU-Net's fingerprint and default experiment planning of dataset id ``args[0]`` (``nnUNetv2_plan_and_preprocess
    --no_pp``), in the zygote's nnUNet_raw / nnUNet_preprocessed."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments

    extract_fingerprints([int(args[0])], num_processes=1, check_dataset_integrity=True)
    plan_experiments([int(args[0])])


if __name__ == "__main__" and sys.argv[1:] == ["--zygote"]:
    zygote_main()
