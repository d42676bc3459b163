"""The integrity of a Tune experiment folder between a search and its resume (issue 17, item 11).

``Tuner.restore`` unpickles files of the experiment folder in the runs storage: ``tuner.pkl``,
the trial states inside ``experiment_state-*.json``, the searcher's ``basic-variant-state-*.json``,
and the trials' ``error.pkl`` (read back into the results). Whoever can write that folder could
make the next resume run their code. So the search records the SHA-256 of each of those files as
it writes them, in tags of its MLflow parent run (the tracking server's database, which the
bucket's writers cannot change), and :func:`verify_experiment` refuses a restore, naming the file,
when one is unknown or differs from every version the search wrote.

Protected: every file at the top of the experiment folder but Ray's dot-file markers, and every
``*.pkl`` below it except ``params.pkl`` (written by Tune's JSON logger and never read back).
Checkpoints (``state.pt``) are not: they load with ``torch.load(weights_only=True)``, which runs
no code (but whoever can write them can change the weights a search finalises).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
from ray.tune import Callback
from ray.tune.search.basic_variant import BasicVariantGenerator

from echo import tracking

__all__ = ["TAG_PREFIX", "TuneStateError", "RecordingVariantGenerator", "ErrorRecorder", "record_file",
           "verify_experiment", "is_protected"]

TAG_PREFIX = "echo.tune_sha256."
KEEP = 5  # versions remembered per file: the upload of the latest save may not have finished


class TuneStateError(RuntimeError):
    """A Tune experiment folder that must not be restored; the message names the file."""


def is_protected(rel: str) -> bool:
    """Whether the file at ``rel`` (relative to the experiment folder) is read back as a pickle."""
    name = rel.rsplit("/", 1)[-1]
    if "/" not in rel:
        return not name.startswith(".")  # Ray's .validate_storage_marker is checked for existence only
    return name.endswith(".pkl") and name != "params.pkl"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fs(path: str, filesystem: Any) -> tuple[Any, str]:
    return (filesystem, path) if filesystem is not None else (pafs.LocalFileSystem(), path)


def _read(filesystem: Any, path: str) -> bytes:
    with filesystem.open_input_stream(path) as f:
        return f.readall()


class _Tags:
    """The recorded digests of one cell, kept as tags of the search's MLflow parent run: one tag
    per file, ``echo.tune_sha256.<cell>.<16 hex of the path>`` = ``{"path": ..., "sha256": [...]}``."""

    def __init__(self, tracking_uri: str, run_id: str, cell: str):
        self.tracking_uri, self.run_id, self.cell = tracking_uri, run_id, cell
        self._known: dict[str, list[str]] | None = None

    def _key(self, rel: str) -> str:
        return f"{TAG_PREFIX}{self.cell}.{_sha256(rel.encode())[:16]}"

    def recorded(self) -> dict[str, list[str]]:
        """``{path: [digests, newest last]}`` as the run's tags hold them."""
        tags = tracking.client(self.tracking_uri).get_run(self.run_id).data.tags
        prefix = f"{TAG_PREFIX}{self.cell}."
        found = {}
        for key, value in tags.items():
            if key.startswith(prefix):
                entry = json.loads(value)
                found[entry["path"]] = list(entry["sha256"])
        return found

    def add(self, rel: str, digest: str) -> None:
        if self._known is None:
            self._known = self.recorded()  # a resumed search adds to what the interrupted one recorded
        history = self._known.setdefault(rel, [])
        if digest in history:
            return
        history.append(digest)
        del history[:-KEEP]
        tracking.client(self.tracking_uri).set_tag(self.run_id, self._key(rel),
                                                   json.dumps({"path": rel, "sha256": history}))


def record_file(tracking_uri: str, run_id: str, cell: str, experiment_path: str, filesystem: Any,
                rel: str) -> None:
    """Record the digest of ``rel`` as it now is in the experiment folder (``tuner.pkl``, read
    back right after ``Tuner`` wrote it)."""
    fs, root = _fs(experiment_path, filesystem)
    _Tags(tracking_uri, run_id, cell).add(rel, _sha256(_read(fs, f"{root}/{rel}")))


class RecordingVariantGenerator(BasicVariantGenerator):
    """Tune's random/grid search (``BasicVariantGenerator``) that records each state file as it is saved.

    At every save Tune writes the experiment state to the driver's staging folder, then calls
    ``search_alg.save_to_dir(staging, session)``, then uploads the folder: right after the
    searcher's own state is written, the staging files are exactly what goes to storage. This
    runs in a resumed search too (the searcher comes back from ``tuner.pkl``), with the new
    session's folder. Holds names and URIs only (it is pickled with the Tuner and its state).
    """

    def __init__(self, tracking_uri: str, run_id: str, cell: str, experiment_path: str, filesystem: Any = None,
                 max_concurrent: int = 0):
        """Takes the same ``(tracking_uri, run_id, cell, experiment_path, filesystem)`` as the other
        recorders; it reads only the staging folder, so the last two go unused."""
        super().__init__(max_concurrent=max_concurrent)
        self._where = (tracking_uri, run_id, cell)

    def get_state(self) -> Any:
        state = super().get_state()
        if state:
            state.pop("_digest_tags", None)  # a cache of MLflow tags: reloaded, never restored
        return state

    def save_to_dir(self, dirpath: str, session_str: str) -> Any:
        saved = super().save_to_dir(dirpath, session_str)
        tags = getattr(self, "_digest_tags", None) or _Tags(*self._where)
        self._digest_tags = tags
        for path in sorted(Path(dirpath).iterdir()):
            if path.is_file() and not path.name.startswith("tmp-"):
                tags.add(path.name, _sha256(path.read_bytes()))
        return saved


class ErrorRecorder(Callback):
    """Tune callback recording a trial's ``error.pkl`` when Tune reports the error, right after
    writing it to the trial's folder in storage."""

    def __init__(self, tracking_uri: str, run_id: str, cell: str, experiment_path: str, filesystem: Any = None):
        self._where = (tracking_uri, run_id, cell)
        self._filesystem = filesystem

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        name = trial.run_metadata.pickled_error_filename
        if name is None:
            return
        fs, _ = _fs("", self._filesystem)
        path = f"{trial.storage.trial_fs_path}/{name}"
        rel = Path(path).relative_to(trial.storage.experiment_fs_path).as_posix()
        _Tags(*self._where).add(rel, _sha256(_read(fs, path)))


def verify_experiment(tracking_uri: str, run_id: str, cell: str, experiment_path: str, filesystem: Any) -> int:
    """Refuse (``TuneStateError``) to restore the experiment folder if a protected file there
    is not one the search recorded or differs from every version recorded for it. Returns the
    number of files checked."""
    recorded = _Tags(tracking_uri, run_id, cell).recorded()
    fs, root = _fs(experiment_path, filesystem)
    checked = 0
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if info.type != pafs.FileType.File:
            continue
        rel = Path(info.path).relative_to(root).as_posix()
        if not is_protected(rel):
            continue
        if rel not in recorded:
            raise TuneStateError(f"refusing to resume {experiment_path}: {rel} was not written by this search "
                                 "(no digest recorded in its MLflow run); see 'Trust and privacy' in README.md")
        if _sha256(_read(fs, info.path)) not in recorded[rel]:
            raise TuneStateError(f"refusing to resume {experiment_path}: {rel} changed since the search wrote it "
                                 "(its SHA-256 differs from the one recorded in the MLflow run)")
        checked += 1
    return checked
